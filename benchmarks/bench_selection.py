"""Light-FMP against feature-selection baselines at the same field budget (ERASE-style protocol).

    python benchmarks/bench_selection.py --data adult --seeds 3 --budget 6
    python benchmarks/bench_selection.py --data synthetic --seeds 3 --budget 6
    python benchmarks/bench_selection.py --data movielens --seeds 3 --budget 4   # ../shared/data/movielens-100k
    python benchmarks/bench_selection.py --data criteo --data-path train.txt --seeds 1 --budget 6

For each seed, in one process:
* ``full``: the model without gates trained on the whole training split (``full_epochs``), no pruning;
* stage 1 once: backbone + hard-concrete gates on ``pretrain_fraction`` of the training split
  (``pretrain_epochs``), shared by every method;
* two budgets: ``fixed k`` = ``--budget``, and ``Light-FMP's k`` = the number of fields Light-FMP's gates keep
  with its default rule (prune without top_k, keep probability > 0.5) for that seed's stage-1 model;
* for each method of :mod:`lightfmp.selection` (``lightfmp``, ``random``, ``univariate``, ``permutation``,
  ``lasso``, ``autofield``) and each budget: stage 2 keeps that method's k best fields of the same stage-1
  checkpoint, stage 3 continues training the pruned model on the rest of the training split
  (``finetune_epochs``), the same for all. Methods that fit a model of their own (permutation, lasso,
  autofield) train it on the pretrain subset for ``pretrain_epochs``. The field scores do not depend on k, so
  each method scores the fields once per seed (at ``--budget``) and the second budget prunes from the same
  scores; its selection cost is reported as that of the first. ``lightfmp`` at its own k is the threshold rule
  itself. Where Light-FMP's k equals ``--budget`` for a seed, that seed's fixed-k rows are reused for both.

Reported per budget and method (mean and std over seeds): test AUC and LogLoss after stage 3, fields kept,
selection cost (all of stage 2: scoring the fields, including the baselines' own fits, and building the pruned
model), and total cost (stage-1 fit + stage 2 + stage-3 fit; data reading and encoding excluded, the same for
all), in CPU seconds of this process (means) and wall seconds (median over seeds; other jobs on a shared machine
inflate single runs several-fold, CPU seconds much less). The full model's total is its one fit. ``kept
fields`` shows seed 0's fields, marked ``(seed 0)`` where the seeds differ (cut to 60 characters).

Fairness caveat: all methods continue from the stage-1 weights of the gated model, i.e. every method prunes from
the same gated stage-1 checkpoint and every method's stage 3 starts from the same network; fields that
Light-FMP's gates closed in stage 1 start stage 3 with less-trained embeddings, a head start for ``lightfmp``
that stage 3 has to make up for the others.

Epochs are those of ``benchmarks/bench_lightfmp.py`` (adult: 8 / 3 / 3 for stage 1 / stage 3 / full), except
that the synthetic set uses 50k rows, not 100k; criteo follows ``configs/criteo.yaml`` (2 / 1, full 2).
``--pretrain-epochs`` and ``--finetune-epochs`` override them. ``--data criteo`` needs ``--data-path`` (a
Criteo-format TSV: label, I1..I13, C1..C26, tab-separated, no header); ``--data movielens`` reads
``--data-path`` (default ../shared/data/movielens-100k next to the repository). Rows go to ``--csv``, a PNG of
test AUC against fields kept (one line per method through its two budgets, the full model as a dashed
horizontal line) to ``--png``; both default to ``benchmarks/results/selection_<data>.{csv,png}``. matplotlib
(``requirements.txt``, extra ``dev``) draws the PNG; without it a note is printed instead.

Measured 2026-12-06 on the 2-core CPU machine (torch 2.13 CPU; load average 1.0-1.8 during the runs, mostly
the runs themselves), with the three commands above (default epochs), one after another; the whole runs took
112 s (adult), 29 s (synthetic) and 110 s (movielens). Results:
``benchmarks/results/selection_{adult,synthetic,movielens}.csv`` and ``.png``. The tables below are those
printed, without the columns seeds (3), total wall s and kept fields (see the CSVs):

adult, budgets: fixed k = 6, Light-FMP's k = 12 / 12 / 11 (per seed), seeds 0..2 (benchmark wall time 112 s)
| budget | method | fields | test AUC | dAUC vs full | test LogLoss | selection CPU s | total CPU s |
|---|---|---|---|---|---|---|---|
| all | full | 14 | 0.9044 +- 0.0044 | +0.0000 | 0.3262 +- 0.0079 | 0.0 | 5.8 |
| fixed k | lightfmp | 6 | 0.9009 +- 0.0016 | -0.0035 | 0.3284 +- 0.0057 | 0.1 | 7.2 |
| fixed k | random | 6 | 0.8605 +- 0.0337 | -0.0439 | 0.3793 +- 0.0384 | 0.1 | 7.2 |
| fixed k | univariate | 6 | 0.8839 +- 0.0039 | -0.0205 | 0.3554 +- 0.0062 | 0.1 | 7.2 |
| fixed k | permutation | 6 | 0.8955 +- 0.0051 | -0.0089 | 0.3359 +- 0.0096 | 2.9 | 9.7 |
| fixed k | lasso | 6 | 0.8818 +- 0.0250 | -0.0226 | 0.3524 +- 0.0343 | 2.3 | 9.3 |
| fixed k | autofield | 6 | 0.8968 +- 0.0071 | -0.0076 | 0.3353 +- 0.0119 | 9.7 | 16.4 |
| Light-FMP's k | lightfmp | 11.7 | 0.9034 +- 0.0029 | -0.0010 | 0.3276 +- 0.0056 | 0.1 | 8.2 |
| Light-FMP's k | random | 11.7 | 0.8958 +- 0.0106 | -0.0086 | 0.3373 +- 0.0155 | 0.1 | 7.8 |
| Light-FMP's k | univariate | 11.7 | 0.9032 +- 0.0028 | -0.0011 | 0.3276 +- 0.0056 | 0.1 | 8.2 |
| Light-FMP's k | permutation | 11.7 | 0.9019 +- 0.0024 | -0.0024 | 0.3320 +- 0.0009 | 2.9 | 11.3 |
| Light-FMP's k | lasso | 11.7 | 0.9029 +- 0.0026 | -0.0015 | 0.3280 +- 0.0058 | 2.3 | 10.5 |
| Light-FMP's k | autofield | 11.7 | 0.9027 +- 0.0047 | -0.0016 | 0.3273 +- 0.0064 | 9.7 | 17.3 |

synthetic, budgets: fixed k = 6, Light-FMP's k = 5 / 6 / 5 (per seed), seeds 0..2 (benchmark wall time 29 s)
| budget | method | fields | test AUC | dAUC vs full | test LogLoss | selection CPU s | total CPU s |
|---|---|---|---|---|---|---|---|
| all | full | 39 | 0.8692 +- 0.0077 | +0.0000 | 0.3780 +- 0.0048 | 0.0 | 2.0 |
| fixed k | lightfmp | 6 | 0.8821 +- 0.0154 | +0.0129 | 0.3648 +- 0.0182 | 0.0 | 2.1 |
| fixed k | random | 6 | 0.6258 +- 0.1392 | -0.2435 | 0.5348 +- 0.0637 | 0.0 | 2.1 |
| fixed k | univariate | 6 | 0.8869 +- 0.0153 | +0.0176 | 0.3584 +- 0.0114 | 0.1 | 2.2 |
| fixed k | permutation | 6 | 0.8869 +- 0.0153 | +0.0176 | 0.3584 +- 0.0114 | 1.5 | 3.6 |
| fixed k | lasso | 6 | 0.8869 +- 0.0153 | +0.0176 | 0.3584 +- 0.0114 | 1.0 | 3.1 |
| fixed k | autofield | 6 | 0.8869 +- 0.0153 | +0.0176 | 0.3584 +- 0.0114 | 1.6 | 3.8 |
| Light-FMP's k | lightfmp | 5.3 | 0.8770 +- 0.0228 | +0.0078 | 0.3689 +- 0.0209 | 0.0 | 2.1 |
| Light-FMP's k | random | 5.3 | 0.5930 +- 0.0897 | -0.2763 | 0.5536 +- 0.0319 | 0.0 | 2.1 |
| Light-FMP's k | univariate | 5.3 | 0.8770 +- 0.0228 | +0.0078 | 0.3689 +- 0.0209 | 0.1 | 2.2 |
| Light-FMP's k | permutation | 5.3 | 0.8770 +- 0.0228 | +0.0078 | 0.3689 +- 0.0209 | 1.5 | 3.6 |
| Light-FMP's k | lasso | 5.3 | 0.8748 +- 0.0263 | +0.0055 | 0.3720 +- 0.0250 | 1.0 | 3.0 |
| Light-FMP's k | autofield | 5.3 | 0.8659 +- 0.0294 | -0.0033 | 0.3851 +- 0.0392 | 1.6 | 3.7 |

movielens, budgets: fixed k = 4, Light-FMP's k = 5 / 5 / 3 (per seed), seeds 0..2 (benchmark wall time 110 s)
| budget | method | fields | test AUC | dAUC vs full | test LogLoss | selection CPU s | total CPU s |
|---|---|---|---|---|---|---|---|
| all | full | 8 | 0.6996 +- 0.0026 | +0.0000 | 0.6246 +- 0.0032 | 0.0 | 5.0 |
| fixed k | lightfmp | 4 | 0.7041 +- 0.0066 | +0.0045 | 0.6219 +- 0.0041 | 0.1 | 6.5 |
| fixed k | random | 4 | 0.6214 +- 0.0624 | -0.0781 | 0.6727 +- 0.0402 | 0.1 | 6.6 |
| fixed k | univariate | 4 | 0.7010 +- 0.0029 | +0.0014 | 0.6243 +- 0.0026 | 0.1 | 6.7 |
| fixed k | permutation | 4 | 0.7159 +- 0.0035 | +0.0164 | 0.6129 +- 0.0025 | 3.1 | 10.1 |
| fixed k | lasso | 4 | 0.7096 +- 0.0103 | +0.0100 | 0.6172 +- 0.0071 | 2.9 | 9.6 |
| fixed k | autofield | 4 | 0.6906 +- 0.0392 | -0.0089 | 0.6270 +- 0.0232 | 11.5 | 18.2 |
| Light-FMP's k | lightfmp | 4.3 | 0.7062 +- 0.0021 | +0.0067 | 0.6196 +- 0.0021 | 0.1 | 6.4 |
| Light-FMP's k | random | 4.3 | 0.6193 +- 0.0537 | -0.0802 | 0.6734 +- 0.0344 | 0.1 | 6.7 |
| Light-FMP's k | univariate | 4.3 | 0.6971 +- 0.0097 | -0.0024 | 0.6262 +- 0.0076 | 0.1 | 6.9 |
| Light-FMP's k | permutation | 4.3 | 0.7076 +- 0.0027 | +0.0081 | 0.6182 +- 0.0011 | 3.1 | 9.7 |
| Light-FMP's k | lasso | 4.3 | 0.7128 +- 0.0048 | +0.0132 | 0.6156 +- 0.0022 | 2.9 | 9.5 |
| Light-FMP's k | autofield | 4.3 | 0.6994 +- 0.0334 | -0.0001 | 0.6221 +- 0.0203 | 11.5 | 17.7 |

Where a baseline beats Light-FMP (mean test AUC; the std over 3 seeds is often as large as the gap):
* adult: no baseline beats ``lightfmp`` at either budget. At k=6 it is ahead of the next best (autofield) by
  0.004 and within 0.004 of the full model; at its own k (11.7) univariate, lasso, autofield and permutation
  are within 0.0015, i.e. tied.
* synthetic: at k=6 univariate, permutation, lasso and autofield all pick the same fields and beat ``lightfmp``
  by 0.005 (0.8869 vs 0.8821), because in one seed Light-FMP's top 6 differ from theirs; at Light-FMP's own k
  (5.3) univariate and permutation tie it, lasso and autofield are below. All but random beat the full model
  (33 of its 39 fields are noise).
* movielens: at k=4 permutation (+0.012, 0.7159 vs 0.7041) and lasso (+0.006) beat ``lightfmp``; at its own k
  (4.3) lasso (+0.007) and permutation (+0.001) do. These baselines pay for it with their own fit (3 CPU s of
  selection vs 0.1). Univariate and autofield are below ``lightfmp`` at both budgets; random is far below
  everywhere.
Given the caveat above (every method prunes from the same gated stage-1 checkpoint, a head start for
``lightfmp``), the baselines' wins are if anything understated.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import bench_lightfmp
import lightning as L
import pandas as pd
from bench_lightfmp import trainer

from lightfmp import stages
from lightfmp.data.datamodule import CTRDataModule
from lightfmp.lightning_module import LightFMPModule
from lightfmp.selection import METHODS

ROOT = Path(__file__).resolve().parents[1]
METHOD_ORDER = ["lightfmp", "random", "univariate", "permutation", "lasso", "autofield"]
# Adult and MovieLens as in bench_lightfmp (same settings, so the two benchmarks' rows compare); synthetic
# with 50,000 rows instead of 100,000 (every method refits on it, for each seed and budget)
DATASETS: dict[str, dict[str, Any]] = {
    "adult": bench_lightfmp.DATASETS["adult"],
    "movielens": bench_lightfmp.DATASETS["movielens"],
    "synthetic": {
        **bench_lightfmp.DATASETS["synthetic"],
        "data": {**bench_lightfmp.DATASETS["synthetic"]["data"], "synthetic_rows": 50_000},
    },
    # configs/criteo.yaml: sequential 8:1:1 split, rare ids (< 10) to the OOV row, 2 epochs stage 1, 1 stage 3
    "criteo": {
        "data": {
            "format": "criteo",
            "split": "sequential",
            "batch_size": 4096,
            "eval_batch_size": 16384,
            "min_count": 10,
            "pretrain_fraction": 0.1,
        },
        "model": {"backbone": "dcnv2", "embedding_dim": 16, "hidden": (400, 400), "lr": 0.001, "l0_weight": 0.02},
        "pretrain_epochs": 2,
        "finetune_epochs": 1,
        "full_epochs": 2,
    },
}
# datasets read from a file or directory the user names (--data-path); the others are packaged or generated
NEEDS_PATH = {"movielens": "directory with u.data, u.item, u.user", "criteo": "Criteo-format TSV file"}
FIXED, OWN = "fixed k", "Light-FMP's k"


def run_full(cfg: dict[str, Any], data: dict[str, Any], seed: int) -> dict[str, Any]:
    """The full model without gates on the whole training split (``bench_lightfmp.run_full``), as a row here."""
    full = bench_lightfmp.run_full(cfg, data, seed)
    return {
        "budget": "all",
        "k": full["fields"],
        "method": "full",
        "auc": full["auc"],
        "logloss": full["logloss"],
        "fields": full["fields"],
        "selection_seconds": 0.0,
        "total_seconds": full["train_seconds"],
        "selection_cpu_seconds": 0.0,
        "total_cpu_seconds": full["train_cpu_seconds"],
        "kept": "",
    }


class _RecordedScores:
    """Stands in for a selection method in ``METHODS``: returns the method's scores (computing them on the first
    call of a seed) so the second budget prunes from the same scores without refitting the method's own model.
    Field scores do not depend on k (``SelectionContext`` has no budget)."""

    def __init__(self, method: Any) -> None:
        self.method, self.name = method, method.name
        self.cached: Any = None

    def scores(self, context: Any) -> pd.Series:
        if self.cached is None:
            self.cached = self.method.scores(context)
        return self.cached


def prune_and_finetune(
    cfg: dict[str, Any],
    dm: CTRDataModule,
    seed: int,
    tmp: Path,
    method: str,
    top_k: int | None,
    budget: str,
    first: dict[str, Any],
) -> dict[str, Any]:
    """Stage 2 with ``method`` at ``top_k`` (None: Light-FMP's threshold 0.5) from the shared stage-1 checkpoint,
    then stage 3; one result row."""
    out = tmp / f"{method}-{top_k}"
    shutil.copytree(tmp / "stage1", out)
    L.seed_everything(seed, verbose=False)
    start, cpu_start = time.perf_counter(), time.process_time()
    _, _, pruned = stages.prune(out, dm, top_k=top_k, selection=method, selection_epochs=cfg["pretrain_epochs"])
    prune_seconds, prune_cpu = time.perf_counter() - start, time.process_time() - cpu_start
    last = stages.finetune(trainer(cfg["finetune_epochs"]), dm, out)
    return {
        "budget": budget,
        "k": len(pruned["kept_fields"]),
        "method": method,
        "auc": last["auc"],
        "logloss": last["logloss"],
        "fields": last["fields"],
        "selection_seconds": pruned["selection_seconds"],
        "total_seconds": first["train_seconds"] + prune_seconds + last["train_seconds"],
        "stage2_seconds": prune_seconds,
        "selection_cpu_seconds": prune_cpu,
        "total_cpu_seconds": first["train_cpu_seconds"] + prune_cpu + last["train_cpu_seconds"],
        "kept": " ".join(pruned["kept_fields"]),
        "pretrain_seconds": first["train_seconds"],
        "finetune_seconds": last["train_seconds"],
        "pretrain_auc": first["auc"],
        "pruned_auc": pruned["auc"],
    }


def run_methods(
    cfg: dict[str, Any], data: dict[str, Any], seed: int, budget: int, methods: list[str], tmp: Path
) -> list[dict[str, Any]]:
    """Stage 1 once, then every method at ``budget`` and at Light-FMP's own k (the fields its gates keep with
    threshold 0.5, no top_k) for this seed.

    At the second budget a method prunes from the scores it computed at the first (its own fit is not repeated);
    its selection and total cost are then reported as those of the first budget's stage 2, which did the work.
    Where Light-FMP's k equals ``budget`` the fixed-k rows are reused for both budgets.
    """
    L.seed_everything(seed, verbose=False)
    dm = CTRDataModule(**data, subset="pretrain", seed=seed)
    first = stages.pretrain(trainer(cfg["pretrain_epochs"]), LightFMPModule(**cfg["model"]), dm, tmp / "stage1")
    # Light-FMP's own rule first: it fixes the second budget
    own = prune_and_finetune(cfg, dm, seed, tmp, "lightfmp", None, OWN, first)
    own_k = own["k"]
    print(f"seed {seed}: Light-FMP keeps {own_k} fields with threshold 0.5 ({own['kept']})", flush=True)
    recorded = {m: _RecordedScores(METHODS[m]) for m in methods if m != "lightfmp"}
    originals = {m: METHODS[m] for m in recorded}
    fixed_rows: dict[str, dict[str, Any]] = {}
    own_rows: dict[str, dict[str, Any]] = {"lightfmp": own} if "lightfmp" in methods else {}
    try:
        METHODS.update(recorded)
        for method in methods:
            fixed_rows[method] = prune_and_finetune(cfg, dm, seed, tmp, method, budget, FIXED, first)
            print(f"  {FIXED}: {method} auc={fixed_rows[method]['auc']:.4f}", flush=True)
        for method in methods:
            if method in own_rows:
                continue
            if own_k == budget:
                own_rows[method] = {**fixed_rows[method], "budget": OWN}
                continue
            row = prune_and_finetune(cfg, dm, seed, tmp, method, own_k, OWN, first)
            reused = fixed_rows[method]  # the scoring was done (and timed) there
            row["total_seconds"] += reused["stage2_seconds"] - row["stage2_seconds"]
            row["total_cpu_seconds"] += reused["selection_cpu_seconds"] - row["selection_cpu_seconds"]
            for key in ("selection_seconds", "selection_cpu_seconds", "stage2_seconds"):
                row[key] = reused[key]
            own_rows[method] = row
            print(f"  {OWN} ({own_k}): {method} auc={row['auc']:.4f}", flush=True)
    finally:
        METHODS.update(originals)
    return [fixed_rows[m] for m in methods] + [own_rows[m] for m in methods]


def summarise(rows: pd.DataFrame) -> pd.DataFrame:
    def ms(s: pd.Series, fmt: str) -> str:
        sd = statistics.stdev(s) if len(s) > 1 else 0.0
        return f"{s.mean():{fmt}} +- {sd:{fmt}}"

    full_auc = rows[rows.method == "full"].auc.mean()
    num_fields = rows[rows.method == "full"].fields.max()
    out = []
    for (budget, method), g in rows.groupby(["budget", "method"], sort=False):
        kept = g.kept.iloc[0] if (g.kept == g.kept.iloc[0]).all() else f"{g.kept.iloc[0]} (seed {g.seed.iloc[0]})"
        out.append(
            {
                "budget": budget,
                "method": method,
                "seeds": len(g),
                "fields": f"{g.fields.mean():.1f}".removesuffix(".0"),
                "test AUC": ms(g.auc, ".4f"),
                "dAUC vs full": f"{g.auc.mean() - full_auc:+.4f}",
                "test LogLoss": ms(g.logloss, ".4f"),
                "selection CPU s": f"{g.selection_cpu_seconds.mean():.1f}",
                "total CPU s": f"{g.total_cpu_seconds.mean():.1f}",
                "total wall s (median)": f"{g.total_seconds.median():.1f}",
                "kept fields": "all" if method == "full" or g.fields.min() == num_fields else shorten(kept, 60),
            }
        )
    return pd.DataFrame(out)


def shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def markdown(table: pd.DataFrame) -> str:
    """``table`` as a GitHub markdown table (no tabulate dependency)."""
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def plot(rows: pd.DataFrame, path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no PNG written ({path} skipped); the CSV has the same numbers")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    full = rows[rows.method == "full"]
    ax.axhline(
        full.auc.mean(), color="black", linestyle="--", linewidth=1, label=f"full ({full.fields.iloc[0]} fields)"
    )
    for method, g in rows[rows.method != "full"].groupby("method", sort=False):
        points = g.groupby("budget").agg(fields=("fields", "mean"), auc=("auc", "mean"), sd=("auc", "std"))
        points = points.sort_values("fields")
        ax.errorbar(
            points.fields, points.auc, yerr=points.sd.fillna(0), fmt="o-", capsize=3, markersize=4, label=method
        )
    ax.set_xlabel("fields kept (mean over seeds)")
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
    ap.add_argument(
        "--data-path",
        "--data.path",  # the spelling of lightfmp's CLI
        dest="data_path",
        default=None,
        help="data file or directory: required for criteo (a Criteo-format TSV); movielens defaults to "
        "../shared/data/movielens-100k next to the repository",
    )
    ap.add_argument("--movielens", default=None, help="deprecated alias of --data-path for --data movielens")
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
    if args.data in NEEDS_PATH:
        path = args.data_path or (args.movielens if args.data == "movielens" else None)
        if path is None and args.data == "movielens":
            path = str(ROOT / ".." / "shared" / "data" / "movielens-100k")
        if path is None:
            ap.error(f"--data {args.data} needs --data-path FILE ({NEEDS_PATH[args.data]})")
        exists = Path(path).is_dir() if args.data == "movielens" else Path(path).is_file()
        if not exists:
            ap.error(f"--data {args.data}: no {NEEDS_PATH[args.data]} at {path}; pass --data-path PATH")
        data["path"] = path
    elif args.data_path is not None:
        ap.error(f"--data {args.data} reads no file; --data-path is for {' and '.join(sorted(NEEDS_PATH))}")
    rows = []
    start = time.perf_counter()
    for seed in range(args.seeds):
        with tempfile.TemporaryDirectory() as tmp:
            for row in [run_full(cfg, data, seed), *run_methods(cfg, data, seed, args.budget, args.methods, Path(tmp))]:
                rows.append({"data": args.data, "seed": seed, **row})
                print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()}, flush=True)
    table = pd.DataFrame(rows)
    own = table[(table.budget == OWN) & (table.method != "full")].groupby("seed").k.first()
    own_k = " / ".join(str(k) for k in own) + " (per seed)" if own.nunique() > 1 else str(own.iloc[0])
    results = ROOT / "benchmarks" / "results"
    csv = Path(args.csv) if args.csv else results / f"selection_{args.data}.csv"
    png = Path(args.png) if args.png else results / f"selection_{args.data}.png"
    csv.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(csv, index=False)
    pd.set_option("display.width", 250)
    pd.set_option("display.max_colwidth", 80)
    print(
        f"\n{args.data}, budgets: {FIXED} = {args.budget}, {OWN} = {own_k}, seeds 0..{args.seeds - 1} "
        f"(benchmark wall time {time.perf_counter() - start:.0f} s)"
    )
    print(markdown(summarise(table)))
    print(f"\nrows written to {csv}")
    plot(table, png, f"{args.data}: test AUC at k={args.budget} and at Light-FMP's k={own_k}")


if __name__ == "__main__":
    main()
