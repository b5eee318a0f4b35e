# shellcheck shell=bash
# Shared helpers for the seed-style API scripts (test_gateway.sh, test_complete_api.sh).
# Sourced, not run. Needs bash, curl and jq; checks a RUNNING gateway.
#   GATEWAY_URL (http://127.0.0.1:8080)  GATEWAY_USER (admin)  GATEWAY_PASSWORD (required)
#   GATEWAY_MODEL (demo)  GATEWAY_TIMEOUT (seconds per request, 120)
# Every check prints one line; the first failure prints what was expected and the body, exit 1.

GATEWAY_URL=${GATEWAY_URL:-http://127.0.0.1:8080}
GATEWAY_URL=${GATEWAY_URL%/}
GATEWAY_USER=${GATEWAY_USER:-admin}
GATEWAY_MODEL=${GATEWAY_MODEL:-demo}
GATEWAY_TIMEOUT=${GATEWAY_TIMEOUT:-120}
if [ -z "${GATEWAY_PASSWORD:-}" ]; then
  echo "FAIL  GATEWAY_PASSWORD is not set (the password of $GATEWAY_USER)" >&2
  exit 2
fi
for tool in curl jq; do
  command -v "$tool" >/dev/null 2>&1 || { echo "FAIL  $tool is not installed (apt-get install $tool)" >&2; exit 2; }
done

CHECKS=0
STATUS=""
BODY=""
_BODY_FILE=$(mktemp)
trap 'rm -f "$_BODY_FILE"' EXIT

ok() { CHECKS=$((CHECKS + 1)); printf 'ok    %s\n' "$*"; }
skip() { printf 'skip  %s\n' "$*"; }
fail() {
  printf 'FAIL  %s\n' "$1" >&2
  [ -n "${2:-}" ] && printf '      %s\n' "$2" >&2
  printf '      last response: HTTP %s %s\n' "${STATUS:-?}" "$(printf '%s' "$BODY" | head -c 600)" >&2
  exit 1
}

# call METHOD PATH [curl args...]: sets STATUS and BODY; a connection failure is a failure.
call() {
  local method=$1 path=$2
  shift 2
  local out
  BODY=""
  STATUS=""
  : >"$_BODY_FILE"
  if ! out=$(curl -sS -o "$_BODY_FILE" -w '%{http_code}' --max-time "$GATEWAY_TIMEOUT" \
    -X "$method" "$GATEWAY_URL$path" "$@" 2>&1); then
    STATUS="000"
    out=${out%000}
    fail "$method $path: no answer from the gateway at $GATEWAY_URL" "${out%$'\n'}"
  fi
  STATUS=$out
  BODY=$(cat "$_BODY_FILE")
}

# expect NAME STATUS [JQ_FILTER...]: the status must match and every filter must be true.
# Filters get the body as input and $model/$id/... from JQ_ARGS (an array of jq --arg pairs).
JQ_ARGS=()
expect() {
  local name=$1 want=$2
  shift 2
  [ "$STATUS" = "$want" ] || fail "$name" "expected HTTP $want, got HTTP $STATUS"
  printf '%s' "$BODY" | jq -e . >/dev/null 2>&1 || fail "$name" "the body is not JSON"
  local filter
  for filter in "$@"; do
    printf '%s' "$BODY" | jq -e "${JQ_ARGS[@]}" "$filter" >/dev/null 2>&1 \
      || fail "$name" "expected: $filter"
  done
  ok "$name"
}

field() { printf '%s' "$BODY" | jq -r "$1"; }

chat_body() {  # chat_body MODEL TEXT -> JSON request
  jq -cn --arg model "$1" --arg text "$2" \
    '{model: $model, messages: [{role: "user", content: $text}], max_tokens: 32}'
}

# chat MODEL TEXT [curl args...]: POST /api/chat with a token and an X-Client-ID
chat() {
  local model=$1 text=$2
  shift 2
  call POST /api/chat -H "Authorization: Bearer $TOKEN" -H "X-Client-ID: api-check" \
    -H "Content-Type: application/json" -d "$(chat_body "$model" "$text")" "$@"
}

CHAT_OK=(
  '.status == "completed"'
  '.request_id == .id and (.id | type == "string") and (.id | length > 0)'
  '(.message.content | type == "string") and (.message.content | length > 0)'
  '.usage.total_tokens > 0'
)

# The checks both scripts make: health, token, one chat. Sets TOKEN, CHAT_ID, CHAT_CONTENT, MODEL.
basic_checks() {
  call GET /health
  expect "GET /health is healthy with database ok" 200 '.status == "healthy"' '.database == "ok"' \
    '.timestamp | type == "string"'

  call POST /auth/token --data-urlencode "username=$GATEWAY_USER" --data-urlencode "password=$GATEWAY_PASSWORD"
  expect "POST /auth/token gives a bearer token" 200 '.token_type == "bearer"' \
    '(.access_token | type == "string") and (.access_token | length > 20)' '.expires_in > 0'
  TOKEN=$(field .access_token)

  chat "$GATEWAY_MODEL" "Hello from the API checks"
  expect "POST /api/chat ($GATEWAY_MODEL) completes with content and usage" 200 "${CHAT_OK[@]}"
  # shellcheck disable=SC2034  # used by the scripts that source this file
  CHAT_ID=$(field .id)
  # shellcheck disable=SC2034
  CHAT_CONTENT=$(field .message.content)
  # shellcheck disable=SC2034
  MODEL=$(field .model)
}
