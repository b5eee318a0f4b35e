#!/usr/bin/env bash
# Sets up what the checks need on a fresh machine, then runs ruff, mypy (strict),
# import-linter and pytest. README and .ci/run call this.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian tools the shell API scripts use (curl, jq) and the browser the dashboard tests drive
# (chromium, through Playwright: Playwright's own browser downloads are never used); nginx and
# openssl, with which tests/unit/test_docker_files.py runs docker/nginx.conf (`nginx -t`, then a
# local proxy; the machine's policy-rc.d keeps the package from starting a server); install only
# what is missing.
missing=()
# a C/C++ compiler for llama.cpp (llama-cpp-python builds it from source on the first install)
command -v g++ >/dev/null 2>&1 || missing+=(g++)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v jq >/dev/null 2>&1 || missing+=(jq)
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
[ -x /usr/sbin/nginx ] || missing+=(nginx)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c 'import llama_cpp' >/dev/null 2>&1; then
  echo "== building llama.cpp (llama-cpp-python) for the llama_cpp engine: about 6 min on 2 cores the first time"
fi
./scripts/install_deps.sh dev

./scripts/lint.sh
echo "== pytest"
.venv/bin/pytest -q "$@"
