"""Light-FMP against feature-selection baselines at the same field budget (ERASE-style protocol).

    python benchmarks/bench_selection.py --data adult --seeds 3 --budget 6
    python benchmarks/bench_selection.py --data synthetic --seeds 3 --budget 6
    python benchmarks/bench_selection.py --data movielens --seeds 3 --budget 4   # ../shared/data/movielens-100k

For each seed, in one process:
* ``full``: the model without gates trained on the whole training split (``full_epochs``), no pruning;
* stage 1 once: backbone + hard-concrete gates on ``pretrain_fraction`` of the training split
  (``pretrain_epochs``), shared by every method;
* for each method of :mod:`lightfmp.selection` (``lightfmp``, ``random``, ``univariate``, ``permutation``,
  ``lasso``, ``autofield``): stage 2 keeps that method's ``--budget`` best fields of the same stage-1
  checkpoint, stage 3 continues training the pruned model on the rest of the training split
  (``finetune_epochs``), the same for all. Methods that fit a model of their own (permutation, lasso,
  autofield) train it on the pretrain subset for ``pretrain_epochs``.

Reported per method (mean and std over seeds): test AUC and LogLoss after stage 3, fields kept, selection
cost (all of stage 2: scoring the fields, including the baselines' own fits, and building the pruned model),
and total cost (stage-1 fit + stage 2 + stage-3 fit; data reading and encoding excluded, the same for all), in
CPU seconds of this process (means) and wall seconds (median over seeds; other jobs on a shared machine inflate
single runs several-fold, CPU seconds much less). The full model's total is its one fit.

All methods continue from the stage-1 weights of the gated model, so every method's stage 3 starts from the same
network; fields that Light-FMP's gates closed in stage 1 start stage 3 with less-trained embeddings, a head
start for ``lightfmp`` that stage 3 has to make up for the others.

Epochs are those of ``benchmarks/bench_lightfmp.py`` (adult: 8 / 3 / 3 for stage 1 / stage 3 / full), except
that the synthetic set uses 50k rows, not 100k. On 2 shared, loaded CPU cores adult took 1.5 min (idle) to 8 min
(loaded) for ``--seeds 3``; synthetic about 5.5 min per seed (loaded), so use ``--seeds 1`` there for a quick look;
``--pretrain-epochs`` and ``--finetune-epochs`` override them. Rows go to ``--csv``; a PNG of AUC against fields
kept goes to ``--png`` when matplotlib is installed (it is not a dependency: otherwise a note is printed).
"""

from __future__ import annotations

import argparse
import shutil
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
from lightfmp.selection import METHODS

ROOT = Path(__file__).resolve().parents[1]
METHOD_ORDER = ["lightfmp", "random", "univariate", "permutation", "lasso", "autofield"]
DATASETS: dict[str, dict[str, Any]] = {
    "adult": {
        "data": {"format": "adult", "batch_size": 256, "eval_batch_size": 4096, "pretrain_fraction": 0.2},
        "model": {"backbone": "dcnv2", "embedding_dim": 16, "hidden": (256, 128), "lr": 0.01, "l0_weight": 0.005},
        "pretrain_epochs": 8,
        "finetune_epochs": 3,
        "full_epochs": 3,
    },
    "synthetic": {
        "data": {
            "format": "synthetic",
            "synthetic_rows": 50_000,
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
        "selection_seconds": 0.0,
        "total_seconds": throughput.seconds,
        "selection_cpu_seconds": 0.0,
        "total_cpu_seconds": throughput.cpu_seconds,
        "kept": "",
    }


def run_methods(
    cfg: dict[str, Any], data: dict[str, Any], seed: int, budget: int, methods: list[str], tmp: Path
) -> list[dict[str, Any]]:
    L.seed_everything(seed, verbose=False)
    dm = CTRDataModule(**data, subset="pretrain", seed=seed)
    first = stages.pretrain(trainer(cfg["pretrain_epochs"]), LightFMPModule(**cfg["model"]), dm, tmp / "stage1")
    rows = []
    for method in methods:
        out = tmp / method
        shutil.copytree(tmp / "stage1", out)
        L.seed_everything(seed, verbose=False)
        start, cpu_start = time.perf_counter(), time.process_time()
        _, _, pruned = stages.prune(out, dm, top_k=budget, selection=method, selection_epochs=cfg["pretrain_epochs"])
        prune_seconds, prune_cpu = time.perf_counter() - start, time.process_time() - cpu_start
        last = stages.finetune(trainer(cfg["finetune_epochs"]), dm, out)
        rows.append(
            {
                "method": method,
                "auc": last["auc"],
                "logloss": last["logloss"],
                "fields": last["fields"],
                "selection_seconds": pruned["selection_seconds"],
                "total_seconds": first["train_seconds"] + prune_seconds + last["train_seconds"],
                "selection_cpu_seconds": prune_cpu,
                "total_cpu_seconds": first["train_cpu_seconds"] + prune_cpu + last["train_cpu_seconds"],
                "kept": " ".join(pruned["kept_fields"]),
                "pretrain_seconds": first["train_seconds"],
                "finetune_seconds": last["train_seconds"],
                "pretrain_auc": first["auc"],
                "pruned_auc": pruned["auc"],
            }
        )
    return rows


def summarise(rows: pd.DataFrame) -> pd.DataFrame:
    def ms(s: pd.Series, fmt: str) -> str:
        sd = statistics.stdev(s) if len(s) > 1 else 0.0
        return f"{s.mean():{fmt}} +- {sd:{fmt}}"

    full_auc = rows[rows.method == "full"].auc.mean()
    out = []
    for method, g in rows.groupby("method", sort=False):
        kept = g.kept.iloc[0] if (g.kept == g.kept.iloc[0]).all() else f"{g.kept.iloc[0]} (seed {g.seed.iloc[0]})"
        out.append(
            {
                "method": method,
                "seeds": len(g),
                "fields": f"{g.fields.mean():.0f}",
                "test AUC": ms(g.auc, ".4f"),
                "dAUC vs full": f"{g.auc.mean() - full_auc:+.4f}",
                "test LogLoss": ms(g.logloss, ".4f"),
                "selection CPU s": f"{g.selection_cpu_seconds.mean():.1f}",
                "total CPU s": f"{g.total_cpu_seconds.mean():.1f}",
                "total wall s (median)": f"{g.total_seconds.median():.1f}",
                "kept fields": kept if method != "full" else "all",
            }
        )
    return pd.DataFrame(out)


def plot(rows: pd.DataFrame, path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no PNG written ({path} skipped); the CSV has the same numbers")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, g in rows.groupby("method", sort=False):
        ax.errorbar(g.fields.mean(), g.auc.mean(), yerr=g.auc.std() if len(g) > 1 else 0, fmt="o", label=method)
    ax.set_xlabel("fields kept")
    ax.set_ylabel("test AUC")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="adult", choices=sorted(DATASETS))
    ap.add_argument("--seeds", type=int, default=3, help="number of seeds (0 .. N-1)")
    ap.add_argument("--budget", type=int, default=6, help="fields every method keeps (k)")
    ap.add_argument("--methods", nargs="+", default=METHOD_ORDER, choices=sorted(METHODS))
    ap.add_argument("--movielens", default=str(ROOT / ".." / "shared" / "data" / "movielens-100k"))
    ap.add_argument("--pretrain-epochs", type=int, default=None)
    ap.add_argument("--finetune-epochs", type=int, default=None)
    ap.add_argument("--csv", default=None, help="default benchmarks/results/selection_<data>.csv")
    ap.add_argument("--png", default=None, help="default benchmarks/results/selection_<data>.png")
    args = ap.parse_args()
    cfg = dict(DATASETS[args.data])
    for key in ("pretrain_epochs", "finetune_epochs"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    data = dict(cfg["data"])
    if args.data == "movielens":
        if not Path(args.movielens).is_dir():
            ap.error(f"no MovieLens directory at {args.movielens}; pass --movielens PATH")
        data["path"] = args.movielens
    rows = []
    start = time.perf_counter()
    for seed in range(args.seeds):
        with tempfile.TemporaryDirectory() as tmp:
            for row in [run_full(cfg, data, seed), *run_methods(cfg, data, seed, args.budget, args.methods, Path(tmp))]:
                rows.append({"data": args.data, "seed": seed, "budget": args.budget, **row})
                print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()}, flush=True)
    table = pd.DataFrame(rows)
    results = ROOT / "benchmarks" / "results"
    csv = Path(args.csv) if args.csv else results / f"selection_{args.data}.csv"
    png = Path(args.png) if args.png else results / f"selection_{args.data}.png"
    csv.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(csv, index=False)
    pd.set_option("display.width", 250)
    pd.set_option("display.max_colwidth", 80)
    print(
        f"\n{args.data}, budget k={args.budget}, seeds 0..{args.seeds - 1} (benchmark wall time "
        f"{time.perf_counter() - start:.0f} s)"
    )
    print(summarise(table).to_string(index=False))
    print(f"\nrows written to {csv}")
    plot(table, png, f"{args.data}: test AUC at k={args.budget} fields")


if __name__ == "__main__":
    main()
