#!/usr/bin/env bash
# Run the main demo on built-in data (creates/refreshes .venv first). Extra arguments go to the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m grain_lightning.demo "$@"
