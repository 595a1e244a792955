#!/usr/bin/env bash
# Create or refresh the project's virtual environment in .venv (idempotent).
#
# Why a script and not a bare `pip install -e .`: PyPI's torchrec wheel requires the CUDA
# build of fbgemm-gpu and pins torchmetrics==1.0.3; installing it with its dependencies
# breaks the CPU import. We install the CPU kernels (fbgemm-gpu-cpu) and torchrec with
# --no-deps, plus torchrec's light runtime dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PY="${PYTHON:-python3}"
STAMP="$VENV/.grain-setup-stamp"
want="$(cat pyproject.toml requirements.txt scripts/setup_env.sh | sha256sum | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  exit 0
fi
echo "[setup] creating/refreshing $VENV (one-time, a few minutes)" >&2
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# torch first, pinned, so nothing else can pull a multi-GB CUDA build.
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
"$VENV/bin/python" -m pip install --quiet -r requirements.txt
"$VENV/bin/python" -m pip install --quiet --no-deps "torchrec==1.8.0"
"$VENV/bin/python" -m pip install --quiet --no-deps -e .
"$VENV/bin/python" -c "import torch, lightning, torchrec, grain_lightning, lightfmp; print('[setup] ok: torch', torch.__version__, 'lightning', lightning.__version__, 'torchrec', torchrec.__version__)" >&2
echo "$want" > "$STAMP"
