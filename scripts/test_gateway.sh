#!/usr/bin/env bash
# Quick check of a RUNNING gateway: health, token, one chat (bash + curl + jq).
#   GATEWAY_PASSWORD=... ./scripts/test_gateway.sh
# Environment: GATEWAY_URL (http://127.0.0.1:8080), GATEWAY_USER (admin), GATEWAY_PASSWORD
# (required), GATEWAY_MODEL (demo). Exits non-zero on the first failed check.
set -euo pipefail
# shellcheck source=scripts/api_checks.sh
. "$(dirname "$0")/api_checks.sh"

basic_checks
echo "PASS  $CHECKS checks against $GATEWAY_URL"
