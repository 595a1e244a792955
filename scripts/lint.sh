#!/usr/bin/env bash
# Lint, format check and type check (creates/refreshes .venv first). Run by .ci/run before the tests.
# To fix what ruff can fix itself: .venv/bin/ruff check --fix . && .venv/bin/ruff format .
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
