#!/usr/bin/env bash
# Installs the Python dependencies into .venv: requirements.txt (or requirements-dev.txt with
# `dev`), then the packages that must be installed without their declared dependencies
# (requirements-nodeps.txt explains why). quickstart.sh and scripts/test.sh call this.
set -euo pipefail
cd "$(dirname "$0")/.."
file=requirements.txt
[ "${1:-}" = dev ] && file=requirements-dev.txt
.venv/bin/python -m pip install --quiet --upgrade pip >/dev/null
.venv/bin/python -m pip install --quiet -r "$file"
.venv/bin/python -m pip install --quiet --no-deps -r requirements-nodeps.txt
