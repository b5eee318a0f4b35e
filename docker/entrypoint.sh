#!/bin/sh
# Container entrypoint: create the first admin user when the database has none (password from
# GATEWAY_ADMIN_PASSWORD, at least 12 characters), then replace this shell with the daemon so
# that SIGTERM reaches it directly (it drains the queue and stops its engines).
# Both read GATEWAY_CONFIG, MONGODB_URI and the other GATEWAY_* variables themselves.
set -eu
python -m app.cli users ensure-admin
exec python -m app "$@"
