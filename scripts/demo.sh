#!/usr/bin/env bash
# Run the main demo on built-in data (creates/refreshes .venv first):
#   1. GRAIN vs the plain mean fine-tuning the pretrained all-MiniLM-L6-v2 to predict the rating of 64 clothing
#      reviews (3 seeds, grain sweep; a few minutes on 2 cores; the report goes to out/grain-clothing);
#   2. Light-FMP's three stages on the packaged UCI Adult data: kept fields and the before/after table.
# Extra arguments go to the Light-FMP pipeline (e.g. --output_dir out/adult --model.backbone dlrm).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
echo "== GRAIN demo: grain sweep --config configs/grain_clothing.yaml (MiniLM, 64 reviews, 3 seeds) =="
.venv/bin/grain sweep --config configs/grain_clothing.yaml --seeds 3 --methods mean,grain-chunks4 --lrs 1e-4 \
  --jobs 2 --output_dir out/grain-clothing
echo
echo "== Light-FMP demo: lightfmp pipeline --config configs/adult.yaml =="
exec .venv/bin/lightfmp pipeline --config configs/adult.yaml --output_dir out/lightfmp-adult "$@"
