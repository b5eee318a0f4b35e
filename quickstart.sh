#!/usr/bin/env bash
# One command from a fresh Debian machine (python3 only) to a running gateway:
#   Debian tools (curl, jq, python3-venv) -> .venv + requirements.txt -> data dir
#   -> .env with a random GATEWAY_JWT_SECRET -> first admin user -> the daemon.
#
#   ./quickstart.sh                 set up (reusing what exists), then run the gateway
#   ./quickstart.sh --setup-only    set up and exit
#
# Environment (all optional; the gateway reads them itself):
#   GATEWAY_CONFIG (config/config.yaml)  GATEWAY_PORT (8080)  GATEWAY_DATA_DIR (data)
#   GATEWAY_ADMIN_PASSWORD (else a random one is printed once)  MONGODB_URI (embedded)
#   GATEWAY_ENV_FILE (.env)  PYTHON (python3)
# The gateway is started with `exec`, so Ctrl-C / SIGTERM to this script reach the gateway,
# which drains, stops its engines and its embedded database, then exits.
set -euo pipefail
cd "$(dirname "$0")"

SETUP_ONLY=0
for arg in "$@"; do
  case "$arg" in
    --setup-only) SETUP_ONLY=1 ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "quickstart: unknown argument: $arg (try --help)" >&2; exit 2 ;;
  esac
done

PYTHON=${PYTHON:-python3}
ENV_FILE=${GATEWAY_ENV_FILE:-.env}
say() { printf '==> %s\n' "$*"; }

# -- 1. Debian packages ---------------------------------------------------------------------
missing=()
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v jq >/dev/null 2>&1 || missing+=(jq)
# a C/C++ compiler: pip builds llama.cpp (the chat engine) from source on the first install
command -v g++ >/dev/null 2>&1 || missing+=(g++)
if [ ! -x .venv/bin/python ] && ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
  missing+=(python3-venv)   # Debian's python3 ships without ensurepip
fi
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=(); else SUDO=(sudo); fi
  say "installing Debian packages: ${missing[*]}"
  "${SUDO[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# -- 2. virtual environment -----------------------------------------------------------------
if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv .venv
fi
req_hash=$(cat requirements.txt requirements-nodeps.txt | sha256sum | cut -d' ' -f1)
stamp=.venv/.quickstart-requirements.sha256
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$req_hash" ]; then
  if ! .venv/bin/python -c 'import llama_cpp' >/dev/null 2>&1; then
    say "installing requirements.txt into .venv, building llama.cpp for the chat model"
    say "(about 6 minutes on 2 cores the first time; pip caches the build for later installs)"
  else
    say "installing requirements.txt into .venv"
  fi
  ./scripts/install_deps.sh
  echo "$req_hash" >"$stamp"
else
  say "reusing .venv (requirements.txt unchanged)"
fi

# -- 3. .env with a real secret, then export it (values already in the environment win) -----
declare -A dotenv=()
read_dotenv() {  # KEY=VALUE lines, as app/settings.py reads them (last one wins)
  dotenv=()
  [ -f "$ENV_FILE" ] || return 0
  local line key value
  while IFS= read -r line || [ -n "$line" ]; do
    line="${line#"${line%%[![:space:]]*}"}"
    case "$line" in ''|'#'*) continue ;; esac
    line="${line#export }"
    key="${line%%=*}"; value="${line#*=}"
    key="${key%"${key##*[![:space:]]}"}"
    [[ "$key" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || continue
    value="${value#"${value%%[![:space:]]*}"}"; value="${value%"${value##*[![:space:]]}"}"
    if [[ "$value" =~ ^\"(.*)\"$ || "$value" =~ ^\'(.*)\'$ ]]; then value="${BASH_REMATCH[1]}"; fi
    dotenv[$key]=$value
  done <"$ENV_FILE"
}
read_dotenv
if [ -z "${dotenv[GATEWAY_JWT_SECRET]+x}" ] \
  || ! .venv/bin/python -c 'import sys; from app.settings import check_secret; check_secret(sys.argv[1])' \
       "${dotenv[GATEWAY_JWT_SECRET]}" 2>/dev/null; then
  if [ -n "${dotenv[GATEWAY_JWT_SECRET]+x}" ]; then
    say "GATEWAY_JWT_SECRET in $ENV_FILE is empty, short or a placeholder; replacing it"
    sed -i -E '/^[[:space:]]*(export[[:space:]]+)?GATEWAY_JWT_SECRET[[:space:]]*=/d' "$ENV_FILE"
  fi
  secret=$(.venv/bin/python -c 'import secrets; print(secrets.token_hex(32))')
  if [ -s "$ENV_FILE" ] && [ -n "$(tail -c1 "$ENV_FILE")" ]; then echo >>"$ENV_FILE"; fi
  (umask 077; echo "GATEWAY_JWT_SECRET=$secret" >>"$ENV_FILE")
  say "wrote a new GATEWAY_JWT_SECRET to $ENV_FILE"
  read_dotenv
else
  say "reusing GATEWAY_JWT_SECRET from $ENV_FILE"
fi
chmod 600 "$ENV_FILE"
for key in "${!dotenv[@]}"; do
  if [ -z "${!key:-}" ]; then export "$key=${dotenv[$key]}"; fi
done

# -- 4. data dir, config --------------------------------------------------------------------
export GATEWAY_DATA_DIR=${GATEWAY_DATA_DIR:-data}
export GATEWAY_CONFIG=${GATEWAY_CONFIG:-config/config.yaml}
mkdir -p "$GATEWAY_DATA_DIR"
[ -f "$GATEWAY_CONFIG" ] || { echo "quickstart: config file $GATEWAY_CONFIG not found" >&2; exit 2; }
# host, port and first model as the gateway will see them (config + environment)
info=$(.venv/bin/python - "$GATEWAY_CONFIG" <<'EOF'
import sys
from pathlib import Path
from app.settings import load_settings
s = load_settings(Path(sys.argv[1]))
host = s.server.host if s.server.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
print(host, s.server.port, next(iter(s.models), "MODEL"))
EOF
)
read -r HOST PORT MODEL <<<"$info"

# -- 5. first admin user --------------------------------------------------------------------
say "checking for an admin user (data dir $GATEWAY_DATA_DIR)"
admin_out=$(.venv/bin/python -m app.cli --config "$GATEWAY_CONFIG" users ensure-admin)
echo "$admin_out"
if [ -n "${GATEWAY_ADMIN_PASSWORD:-}" ]; then
  shown_password="\$GATEWAY_ADMIN_PASSWORD"   # shown literally, expanded by the user's shell
elif [[ "$admin_out" =~ with\ password:\ ([^[:space:]]+) ]]; then
  shown_password=${BASH_REMATCH[1]}
else
  shown_password='<admin password>'
fi

if [ "$SETUP_ONLY" = 1 ]; then
  say "setup done; run ./quickstart.sh to start the gateway"
  exit 0
fi

# -- 6. run ---------------------------------------------------------------------------------
URL="http://$HOST:$PORT"
cat <<EOF

Gateway starting on $URL (config $GATEWAY_CONFIG, data $GATEWAY_DATA_DIR). Try:

  curl -s $URL/health | jq
  TOKEN=\$(curl -s -X POST $URL/auth/token -d username=admin -d "password=$shown_password" | jq -r .access_token)
  curl -s $URL/api/chat -H "Authorization: Bearer \$TOKEN" -H 'X-Client-ID: quickstart' \\
       -H 'Content-Type: application/json' \\
       -d '{"model": "$MODEL", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 32}' | jq
  curl -s $URL/admin/queue/$MODEL -H "Authorization: Bearer \$TOKEN" | jq
  # a real model answers: SmolLM2-135M-Instruct on llama.cpp (CPU); /v1 works with any OpenAI SDK
  # real OCR on the CPU (RapidOCR): any image or PDF of yours
  curl -s $URL/api/ocr -H "Authorization: Bearer \$TOKEN" -H 'X-Client-ID: quickstart' \
       -F file=@/path/to/scan.png | jq '.text'

Ctrl-C (or SIGTERM to pid $$) stops the gateway, its engines and its database.

EOF
exec .venv/bin/python -m app --config "$GATEWAY_CONFIG"
