#!/usr/bin/env bash
# Static checks: ruff (lint + format), mypy --strict, import-linter layering contracts.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== ruff"
.venv/bin/ruff check app tests scripts
.venv/bin/ruff format --check app tests scripts
echo "== mypy (strict)"
.venv/bin/mypy
echo "== import-linter"
.venv/bin/lint-imports
