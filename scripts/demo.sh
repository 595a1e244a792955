#!/usr/bin/env bash
# Run the main demo on built-in data (creates/refreshes .venv first):
#   1. GRAIN vs plain mean when fine-tuning a pretrained model on small noisy data (5 seeds);
#   2. Light-FMP's three stages on the packaged UCI Adult data: kept fields and the before/after table.
# Extra arguments go to the Light-FMP pipeline (e.g. --output_dir out/adult --model.backbone dlrm).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
echo "== GRAIN demo =="
.venv/bin/python -m grain_lightning.demo
echo
echo "== Light-FMP demo: lightfmp pipeline --config configs/adult.yaml =="
exec .venv/bin/lightfmp pipeline --config configs/adult.yaml --output_dir out/lightfmp-adult "$@"
