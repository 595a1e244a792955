"""A fake ``grain fit`` worker (no training) and helpers for the sweep tests.

The fake parses the sweep's command line and writes a ``result.json`` whose metrics depend on method, lr and
seed: validation prefers lr ``1e-3`` and test prefers ``1e-2`` (so a choice made on test would differ);
``--fail GROUPING:SEED`` makes that run exit with status 3, ``--mode min`` reports an RMSE-like metric.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from grain_lightning.sweep.runner import Run

FAKE_WORKER = r"""
import argparse, json, os, sys

p = argparse.ArgumentParser()
p.add_argument("--config", required=True)
p.add_argument("--seed_everything", type=int, required=True)
p.add_argument("--model.lr", dest="lr", type=float, required=True)
p.add_argument("--trainer.default_root_dir", dest="root", required=True)
p.add_argument("--result_json", required=True)
p.add_argument("--model.grain.aggregation", dest="aggregation", default="grain")
p.add_argument("--model.grain.grouping", dest="grouping", default="sample")
p.add_argument("--model.grain.step_norm", dest="step_norm", default=None)
p.add_argument("--model.grain.blockwise", dest="blockwise", default="false")
p.add_argument("--fail", action="append", default=[])
p.add_argument("--mode", default="max")
args = p.parse_args()
open(args.config).read()

tag = "mean" if args.aggregation == "mean" else args.grouping
print(f"fake fit: {tag} lr={args.lr} seed={args.seed_everything}")
if f"{tag}:{args.seed_everything}" in args.fail:
    print("simulated failure: loss is nan", file=sys.stderr)
    sys.exit(3)
base = {"mean": 0.70, "sample": 0.75, "4": 0.72, "8": 0.73, "key:labels": 0.74}[tag]
base += 0.01 * (args.step_norm == "mean") + 0.02 * (args.blockwise == "true")
seed = 0.01 * args.seed_everything
val = base + seed + (0.1 if args.lr == 1e-3 else 0.0)
test = base + seed + (0.1 if args.lr == 1e-2 else 0.0)
curve = [{"step": 10 * (i + 1), "epoch": i, "val_acc": val - 0.05 * (2 - i)} for i in range(3)]
monitor, test_metric = "val_acc", "test_acc"
if args.mode == "min":
    val, test, monitor, test_metric = 1 - val, 1 - test, "val_rmse", "test_rmse"
    curve = [{"step": c["step"], "epoch": c["epoch"], "val_rmse": 1 - c["val_acc"]} for c in curve]
result = {"seed": args.seed_everything, "lr": args.lr, "monitor": monitor, "mode": args.mode,
          "test_metric": test_metric, "val": {monitor: val, "val_loss": 1 - val},
          "test": {test_metric: test, "test_loss": 1 - test}, "wall_s": 0.5, "steps": 30, "curve": curve,
          "threads": [os.environ.get(v) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")]}
with open(args.result_json + ".part", "w") as f:
    json.dump(result, f)
os.replace(args.result_json + ".part", args.result_json)
"""


@pytest.fixture
def fake_worker(tmp_path: Path) -> list[str]:
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    return [sys.executable, str(script)]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text("model:\n  lr: 0.001\n")
    return path


def write_result(
    out: Path,
    run: Run,
    val: float,
    test: float,
    *,
    mode: str = "max",
    curve: bool = True,
) -> None:
    """Write ``run``'s result.json directly (report tests without a worker)."""
    d = run.directory(out)
    d.mkdir(parents=True, exist_ok=True)
    points = [{"step": 10 * (i + 1), "epoch": i, "val_acc": val - 0.01 * (2 - i)} for i in range(3)] if curve else []
    result = {
        "seed": run.seed,
        "lr": run.lr,
        "monitor": "val_acc",
        "mode": mode,
        "test_metric": "test_acc",
        "val": {"val_acc": val, "val_loss": 1 - val},
        "test": {"test_acc": test, "test_loss": 1 - test},
        "wall_s": 1.0 + run.seed,
        "steps": 30,
        "curve": points,
    }
    (d / "result.json").write_text(json.dumps(result))
