#!/bin/bash
# Entrypoint wrapper for mongo:7 (docker-compose.yml). A replica set with authentication needs a
# key file for its members to authenticate each other, even a set of one node; mongod refuses
# `--auth --replSet` without one. Made once, random, in the config volume, then the image's own
# entrypoint runs (it creates the root user and runs docker-entrypoint-initdb.d on a new volume).
set -euo pipefail
key=/data/configdb/replica.key
if [ ! -s "$key" ]; then
  (umask 077 && head -c 756 /dev/urandom | base64 -w0 >"$key")
fi
chown mongodb:mongodb "$key"
chmod 400 "$key"
exec docker-entrypoint.sh "$@"
