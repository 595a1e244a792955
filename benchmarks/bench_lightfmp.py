"""Full model vs Light-FMP (pretrain -> prune -> finetune) on real and synthetic data, side by side.

    python benchmarks/bench_lightfmp.py --movielens ../shared/data/movielens-100k --seeds 0 1 2
    python benchmarks/bench_lightfmp.py --datasets adult --seeds 0      # quick

For each data set and seed, in the same process:
* ``full``: the model without gates trained on the whole training split for ``full_epochs``;
* ``lightfmp``: stage 1 on ``pretrain_fraction`` of the training split (``pretrain_epochs``, with gates), stage 2
  prune (fields with keep probability > 0.5), stage 3 on the rest of the training split (``finetune_epochs``).
Both are scored on the same test split (AUC over the whole split, LogLoss). Training time counts the fit loops
only (data reading and encoding excluded, the same for both), as wall-clock seconds and as CPU seconds of this
process; the summary's ratios use CPU seconds, which other jobs on a shared machine disturb much less than
wall time. ``sps`` / ``cpu_sps`` are training samples per (CPU) second of the final model (for Light-FMP: the
pruned model in stage 3). Rows go to ``--csv`` and a summary is printed.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd

from lightfmp import stages
from lightfmp.data.datamodule import CTRDataModule
from lightfmp.lightning_module import LightFMPModule, evaluate

DATASETS: dict[str, dict[str, Any]] = {
    "adult": {
        "data": {"format": "adult", "batch_size": 256, "eval_batch_size": 4096, "pretrain_fraction": 0.2},
        "model": {"backbone": "dcnv2", "embedding_dim": 16, "hidden": (256, 128), "lr": 0.01, "l0_weight": 0.005},
        "pretrain_epochs": 8,
        "finetune_epochs": 3,
        "full_epochs": 3,
    },
    "movielens": {
        "data": {
            "format": "movielens",
            "split": "chronological",
            "batch_size": 512,
            "eval_batch_size": 8192,
            "pretrain_fraction": 0.2,
        },
        "model": {"backbone": "dcnv2", "embedding_dim": 16, "hidden": (256, 128), "lr": 0.01, "l0_weight": 0.01},
        "pretrain_epochs": 6,
        "finetune_epochs": 2,
        "full_epochs": 2,
    },
    "synthetic": {
        "data": {
            "format": "synthetic",
            "synthetic_rows": 100_000,
            "synthetic_num_informative": 6,
            "batch_size": 512,
            "eval_batch_size": 8192,
            "pretrain_fraction": 0.2,
        },
        "model": {"backbone": "mlp", "embedding_dim": 8, "hidden": (128, 64), "lr": 0.01, "l0_weight": 0.02},
        "pretrain_epochs": 5,
        "finetune_epochs": 2,
        "full_epochs": 2,
    },
    "synthetic-large": {
        "data": {
            "format": "synthetic",
            "synthetic_rows": 500_000,
            "synthetic_cardinality": 10_000,
            "synthetic_num_informative": 6,
            "batch_size": 1024,
            "eval_batch_size": 16384,
            "pretrain_fraction": 0.1,
        },
        "model": {"backbone": "dcnv2", "embedding_dim": 16, "hidden": (256, 128), "lr": 0.01, "l0_weight": 0.02},
        "pretrain_epochs": 3,
        "finetune_epochs": 1,
        "full_epochs": 1,
    },
}


def trainer(epochs: int) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def run_full(cfg: dict[str, Any], data: dict[str, Any], seed: int) -> dict[str, Any]:
    L.seed_everything(seed, verbose=False)
    dm = CTRDataModule(**data, subset="full", seed=seed)
    module = LightFMPModule(**cfg["model"], field_mask=False)
    throughput = stages.timed_fit(trainer(cfg["full_epochs"]), module, dm)
    scores = evaluate(module, dm.test_dataloader())
    return {
        "method": "full",
        "auc": scores["auc"],
        "logloss": scores["logloss"],
        "fields": module.feature_spec.num_fields,
        "parameters": module.num_parameters(),
        "train_seconds": throughput.seconds,
        "train_cpu_seconds": throughput.cpu_seconds,
        "sps": throughput.samples_per_second,
        "cpu_sps": throughput.samples / throughput.cpu_seconds,
        "kept": "",
    }


def run_lightfmp(cfg: dict[str, Any], data: dict[str, Any], seed: int, out: Path) -> dict[str, Any]:
    L.seed_everything(seed, verbose=False)
    dm = CTRDataModule(**data, subset="pretrain", seed=seed)
    module = LightFMPModule(**cfg["model"], field_mask=True)
    first = stages.pretrain(trainer(cfg["pretrain_epochs"]), module, dm, out)
    start = time.perf_counter()
    _, _, pruned = stages.prune(out, dm)
    prune_seconds = time.perf_counter() - start
    last = stages.finetune(trainer(cfg["finetune_epochs"]), dm, out)
    return {
        "method": "lightfmp",
        "auc": last["auc"],
        "logloss": last["logloss"],
        "fields": last["fields"],
        "parameters": last["parameters"],
        "train_seconds": first["train_seconds"] + last["train_seconds"],
        "train_cpu_seconds": first["train_cpu_seconds"] + last["train_cpu_seconds"],
        "sps": last["samples_per_second"],
        "cpu_sps": last["train_samples"] / last["train_cpu_seconds"],
        "kept": " ".join(pruned["kept_fields"]),
        "pretrain_seconds": first["train_seconds"],
        "prune_seconds": prune_seconds,
        "finetune_seconds": last["train_seconds"],
        "pretrain_auc": first["auc"],
        "pruned_auc": pruned["auc"],
    }


def summarise(rows: pd.DataFrame) -> pd.DataFrame:
    out = []
    for dataset, group in rows.groupby("dataset", sort=False):
        full, fmp = group[group.method == "full"], group[group.method == "lightfmp"]

        def ms(s: pd.Series, fmt: str) -> str:
            sd = statistics.stdev(s) if len(s) > 1 else 0.0
            return f"{s.mean():{fmt}} +- {sd:{fmt}}"

        out.append(
            {
                "dataset": dataset,
                "seeds": len(full),
                "full AUC": ms(full.auc, ".4f"),
                "Light-FMP AUC": ms(fmp.auc, ".4f"),
                "dAUC": f"{fmp.auc.mean() - full.auc.mean():+.4f}",
                "full LogLoss": ms(full.logloss, ".4f"),
                "Light-FMP LogLoss": ms(fmp.logloss, ".4f"),
                "fields": f"{int(full.fields.iloc[0])} -> {fmp.fields.mean():.1f}",
                "params": f"{int(full.parameters.mean())} -> {int(fmp.parameters.mean())}",
                "train CPU s (stages 1+3 / full)": f"{fmp.train_cpu_seconds.mean():.1f} / "
                f"{full.train_cpu_seconds.mean():.1f} = "
                f"{fmp.train_cpu_seconds.mean() / full.train_cpu_seconds.mean():.2f}x",
                "wall s": f"{fmp.train_seconds.mean():.1f} / {full.train_seconds.mean():.1f}",
                "samples per CPU s, pruned vs full": f"{fmp.cpu_sps.mean():.0f} / {full.cpu_sps.mean():.0f} = "
                f"{fmp.cpu_sps.mean() / full.cpu_sps.mean():.2f}x",
                "goal AUC >= full - 0.001": bool(fmp.auc.mean() >= full.auc.mean() - 0.001),
            }
        )
    return pd.DataFrame(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=None, choices=sorted(DATASETS))
    ap.add_argument("--movielens", default=None, help="GroupLens ml-100k or ml-1m directory (not shipped)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--csv", default="benchmarks/results/lightfmp.csv")
    ap.add_argument("--pretrain-epochs", type=int, default=None, help="override every data set's stage-1 epochs")
    args = ap.parse_args()
    datasets = args.datasets or [d for d in DATASETS if d not in ("movielens", "synthetic-large")] + (
        ["movielens"] if args.movielens else []
    )
    if "movielens" in datasets and not args.movielens:
        ap.error("--movielens PATH is needed for the movielens data set")
    rows = []
    for name in datasets:
        cfg = dict(DATASETS[name])
        if args.pretrain_epochs is not None:
            cfg["pretrain_epochs"] = args.pretrain_epochs
        data = dict(cfg["data"], **({"path": args.movielens} if name == "movielens" else {}))
        for seed in args.seeds:
            with tempfile.TemporaryDirectory() as tmp:
                for row in (run_full(cfg, data, seed), run_lightfmp(cfg, data, seed, Path(tmp))):
                    rows.append({"dataset": name, "seed": seed, **row})
                    print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()}, flush=True)
    table = pd.DataFrame(rows)
    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.csv, index=False)
    pd.set_option("display.width", 250)
    print("\n" + summarise(table).to_string(index=False))
    print(f"\nrows written to {args.csv}")


if __name__ == "__main__":
    main()
