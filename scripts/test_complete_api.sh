#!/usr/bin/env bash
# shellcheck disable=SC2016  # $model, $id, ... in single quotes are jq variables (JQ_ARGS)
# Full check of a RUNNING gateway's HTTP contract (bash + curl + jq): everything
# test_gateway.sh checks, plus auth failures, header and body validation, unknown models,
# aliases, job lookup, the admin queue view, idempotency and priorities.
#   GATEWAY_PASSWORD=... ./scripts/test_complete_api.sh
# Environment: GATEWAY_URL (http://127.0.0.1:8080), GATEWAY_USER (admin, must be an admin),
# GATEWAY_PASSWORD (required), GATEWAY_MODEL (demo), GATEWAY_MODEL_ALIAS (optional: another
# name of the same model). Exits non-zero on the first failed check.
set -euo pipefail
# shellcheck source=scripts/api_checks.sh
. "$(dirname "$0")/api_checks.sh"

basic_checks
JQ_ARGS=(--arg model "$MODEL" --arg id "$CHAT_ID" --arg content "$CHAT_CONTENT")
BODY_JSON=$(chat_body "$GATEWAY_MODEL" "hello")

# -- authentication -------------------------------------------------------------------------
call POST /auth/token --data-urlencode "username=$GATEWAY_USER" --data-urlencode "password=wrong-$GATEWAY_PASSWORD"
expect "POST /auth/token with a wrong password is 401" 401 '.detail | type == "string"' '(has("access_token")) | not'

call POST /api/chat -H "X-Client-ID: api-check" -H "Content-Type: application/json" -d "$BODY_JSON"
expect "POST /api/chat without a token is 401" 401 '.detail | test("Authorization")'

call POST /api/chat -H "Authorization: Bearer not.a.jwt" -H "X-Client-ID: api-check" \
  -H "Content-Type: application/json" -d "$BODY_JSON"
expect "POST /api/chat with a garbage token is 401" 401 '.detail | type == "string"' '.code == "invalid_credentials"'

call GET "/admin/queue/$MODEL" -H "Authorization: Bearer garbage"
expect "GET /admin/queue with a garbage token is 401" 401 '.detail | type == "string"'

# -- request validation ---------------------------------------------------------------------
chat "$GATEWAY_MODEL" "hello" -H "X-Priority: urgent"
expect "X-Priority: urgent is 400" 400 '.detail | test("X-Priority")'

call POST /api/chat -H "Authorization: Bearer $TOKEN" -H "Content-Type: application/json" -d "$BODY_JSON"
expect "missing X-Client-ID is 400" 400 '.detail | test("X-Client-ID")'

chat "no-such-model-$$" "hello"
expect "unknown model is 404 and names the known model" 404 '.detail | test("no-such-model")' \
  '.detail | contains($model)' '.code == "model_not_found"'

call POST /api/chat -H "Authorization: Bearer $TOKEN" -H "X-Client-ID: api-check" \
  -H "Content-Type: application/json" -d "$(jq -cn --arg m "$GATEWAY_MODEL" '{model: $m, messages: []}')"
expect "empty messages is 422" 422 '.code == "validation_error"' \
  '[.detail[] | select(.loc | index("messages"))] | length > 0'

# -- aliases ----------------------------------------------------------------------------------
if [ -n "${GATEWAY_MODEL_ALIAS:-}" ]; then
  chat "$GATEWAY_MODEL_ALIAS" "Hello through an alias"
  expect "POST /api/chat via alias $GATEWAY_MODEL_ALIAS is served by $MODEL" 200 "${CHAT_OK[@]}" '.model == $model'
else
  skip "chat via an alias (set GATEWAY_MODEL_ALIAS)"
fi

# -- jobs and the admin queue view ------------------------------------------------------------
call GET "/api/jobs/$CHAT_ID" -H "Authorization: Bearer $TOKEN"
expect "GET /api/jobs/{id} of the chat: succeeded, same content" 200 '.id == $id' '.request_id == $id' \
  '.state == "succeeded"' '.status == "completed"' '.model == $model' '.result.message.content == $content'

call GET "/api/jobs/job_does_not_exist_$$" -H "Authorization: Bearer $TOKEN"
expect "GET /api/jobs/{unknown id} is 404" 404 '.detail | type == "string"'

call GET "/admin/queue/$MODEL" -H "Authorization: Bearer $TOKEN"
expect "GET /admin/queue/$MODEL has capacity and counts the chat" 200 '.model == $model' \
  '.capacity.primary >= 1' '.capacity.primary == .max_concurrent' '.total_processed >= 1' \
  '.processing >= 0 and .waiting >= 0' '.utilization >= 0 and .utilization <= 1'

# -- idempotency ------------------------------------------------------------------------------
KEY="api-check-$$-$RANDOM$RANDOM"
chat "$GATEWAY_MODEL" "idempotent hello" -H "Idempotency-Key: $KEY"
expect "first POST with Idempotency-Key completes" 200 "${CHAT_OK[@]}"
FIRST_ID=$(field .id)
chat "$GATEWAY_MODEL" "idempotent hello" -H "Idempotency-Key: $KEY"
JQ_ARGS=(--arg id "$FIRST_ID")
expect "second POST with the same Idempotency-Key returns the same job" 200 "${CHAT_OK[@]}" '.id == $id'
JQ_ARGS=()
[ "$FIRST_ID" != "$CHAT_ID" ] || fail "an Idempotency-Key request reused an unrelated job" "id $FIRST_ID"

# -- priorities -------------------------------------------------------------------------------
for priority in high low; do
  chat "$GATEWAY_MODEL" "hello at $priority priority" -H "X-Priority: $priority"
  JQ_ARGS=(--arg p "$priority")
  expect "X-Priority: $priority completes" 200 "${CHAT_OK[@]}" '.priority == $p'
done

# -- operations: models, usage, missing models, auto-switch, metrics ----------------------------
JQ_ARGS=(--arg model "$MODEL")
call GET /admin/models -H "Authorization: Bearer $TOKEN"
expect "GET /admin/models lists $MODEL with its state" 200 '.[$model].status | type == "string"' \
  '.[$model].max_concurrent >= 1'

call GET "/admin/usage?window=24h" -H "Authorization: Bearer $TOKEN"
expect "GET /admin/usage?window=24h reports per model" 200 '.window_seconds == 86400' \
  '.models | type == "object"' '.total_requests >= 0'

call GET "/admin/usage?window=forever" -H "Authorization: Bearer $TOKEN"
expect "GET /admin/usage with a bad window is 400" 400 '.detail | test("not a duration")'

call GET /admin/missing-models -H "Authorization: Bearer $TOKEN"
expect "GET /admin/missing-models lists the unknown model asked for above" 200 'type == "array"' \
  '[.[] | select(.model_name | startswith("no-such-model")) | .configured == false] | any'

call GET /admin/autoswitch -H "Authorization: Bearer $TOKEN"
expect "GET /admin/autoswitch says whether it is on and shows decisions" 200 '.enabled | type == "boolean"' \
  '.decisions | type == "array"'

call POST /admin/autoswitch/evaluate -H "Authorization: Bearer $TOKEN"
expect "POST /admin/autoswitch/evaluate is a dry run with reasons" 200 '.dry_run == true' \
  '.summary | type == "string"' '.actions | type == "array"'

METRICS=$(curl -sS --max-time 10 "$GATEWAY_URL/metrics" -H "Authorization: Bearer $TOKEN" || true)
if printf '%s' "$METRICS" | grep -q '^gateway_build_info{'; then
  ok "GET /metrics (admin token) is Prometheus text with gateway_build_info"
elif [ -z "$METRICS" ] || printf '%s' "$METRICS" | grep -q '"code"'; then
  skip "GET /metrics (disabled or not reachable with this token: $(printf '%s' "$METRICS" | head -c 120))"
else
  BODY=$METRICS STATUS=200 fail "GET /metrics" "no gateway_build_info line"
fi

echo "PASS  $CHECKS checks against $GATEWAY_URL"
