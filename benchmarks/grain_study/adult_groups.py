"""GRAIN study on UCI Adult: pretrain on one group, fine-tune on a few rows of another.

    python benchmarks/grain_study/adult_groups.py --data ../shared/data/adult.csv.gz --output_dir out/adult \
        --sizes 64,256,1024 --seeds 10 --lrs 1e-4,1e-3,1e-2

Setting (issue 14, item 6). An MLP (one-hot categoricals and standardised numerics -> 128 -> 64 -> 1, ReLU) is
pretrained once (seed 0, Adam, 5 epochs) on every row of one group (``--group_column gender``, ``--pretrain_group
Male``) to predict ``income`` (``>50K``). Each run fine-tunes all of it on ``n`` rows of another group
(``--finetune_group Female``): batch 16, ``--epochs`` epochs, AdamW (weight decay 0.01), with the plain mean or
a GRAIN variant (the names of ``grain sweep``'s built-in methods, each mapped to the same ``GrainConfig``
options). The seed draws the ``n`` rows from the fine-tuning pool and their order; the validation (1,000) and
test (5,000) rows of the fine-tuning group are the same for every run (``--split_seed``). The encoding
(vocabularies, means, standard deviations) comes from the pretraining group only.

Each run writes ``result.json`` in ``grain sweep``'s layout (``<size>/<method>/lr=<lr>/seed=<seed>/``; monitor
``val_auc``, test metric ``test_auc``; log-loss and accuracy also recorded); finished runs are skipped, so the
script resumes. Each size gets ``grain sweep``'s report (``summary.md``, ``summary.csv``, ``runs.csv``,
``summary.png``): the learning rate of each method chosen on validation AUC, mean/std/worst/bootstrap CI of test
AUC and the paired-by-seed difference to the mean. One thread per run (``torch.set_num_threads(1)``).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import lightning as L
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchmetrics.functional.classification import binary_auroc
from typing_extensions import override

from grain_lightning.config import GrainConfig
from grain_lightning.mixin import GrainMixin
from grain_lightning.sweep.methods import Method, parse_methods
from grain_lightning.sweep.report import write_report
from grain_lightning.sweep.results import RESULT_FILE, atomic_write_text, read_result
from grain_lightning.sweep.runner import Run

NUMERIC = ("age", "fnlwgt", "educational-num", "capital-gain", "capital-loss", "hours-per-week")
LOG_NUMERIC = ("capital-gain", "capital-loss")  # heavy-tailed: log1p before standardising
LABEL, POSITIVE = "income", ">50K"
_OPTION = "--model.grain."


@dataclass
class Encoded:
    """Features ``x`` (N, D) float32 and labels ``y`` (N,) float32 (1 = ``>50K``)."""

    x: torch.Tensor
    y: torch.Tensor

    def rows(self, index: np.ndarray) -> Encoded:
        ix = torch.as_tensor(index, dtype=torch.long)
        return Encoded(self.x[ix], self.y[ix])


class Encoder:
    """One-hot categoricals (vocabulary of the fitting rows, plus an unknown slot) and standardised numerics."""

    def __init__(self, frame: pd.DataFrame, drop: str) -> None:
        self.categorical = [c for c in frame.columns if c not in NUMERIC and c not in (LABEL, drop)]
        self.vocab = {c: {v: i for i, v in enumerate(sorted(frame[c].astype(str).unique()))} for c in self.categorical}
        numeric = self._numeric(frame)
        self.mean, self.std = numeric.mean(0), numeric.std(0).clip(min=1e-6)

    @staticmethod
    def _numeric(frame: pd.DataFrame) -> np.ndarray:
        cols = [np.log1p(frame[c].to_numpy(float)) if c in LOG_NUMERIC else frame[c].to_numpy(float) for c in NUMERIC]
        return np.stack(cols, 1)

    @property
    def width(self) -> int:
        return len(NUMERIC) + sum(len(v) + 1 for v in self.vocab.values())

    def __call__(self, frame: pd.DataFrame) -> Encoded:
        parts = [(self._numeric(frame) - self.mean) / self.std]
        for c in self.categorical:
            vocab = self.vocab[c]
            codes = frame[c].astype(str).map(vocab).fillna(len(vocab)).to_numpy(int)  # unseen -> the last slot
            parts.append(np.eye(len(vocab) + 1)[codes])
        x = torch.as_tensor(np.concatenate(parts, 1), dtype=torch.float32)
        y = torch.as_tensor((frame[LABEL].astype(str).str.strip() == POSITIVE).to_numpy(), dtype=torch.float32)
        return Encoded(x, y)


def mlp(width: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(
        torch.nn.Linear(width, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1)
    )


def pretrain(data: Encoded, epochs: int = 5) -> torch.nn.Sequential:
    """The MLP trained on ``data`` (seed 0, Adam 1e-3, batch 256)."""
    torch.manual_seed(0)
    net = mlp(data.x.shape[1])
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for idx in torch.randperm(len(data.y), generator=g).split(256):
            opt.zero_grad()
            F.binary_cross_entropy_with_logits(net(data.x[idx]).squeeze(1), data.y[idx]).backward()
            opt.step()
    return net


def scores(net: torch.nn.Module, data: Encoded, prefix: str) -> dict[str, float]:
    """AUC, log-loss and accuracy (threshold 0.5) of ``net`` on ``data``."""
    with torch.no_grad():
        logits = net(data.x).squeeze(1)
    return {
        f"{prefix}_auc": float(binary_auroc(logits, data.y.long())),
        f"{prefix}_logloss": float(F.binary_cross_entropy_with_logits(logits, data.y)),
        f"{prefix}_acc": float(((logits > 0).float() == data.y).float().mean()),
    }


class Rows(Dataset[dict[str, torch.Tensor]]):
    def __init__(self, data: Encoded) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.data.x[i], "labels": self.data.y[i]}


class FineTuner(GrainMixin, L.LightningModule):
    """The whole pretrained MLP fine-tuned with GRAIN or the plain mean (per-sample BCE losses)."""

    def __init__(self, net: torch.nn.Module, grain: GrainConfig, lr: float) -> None:
        super().__init__(grain=grain)
        self.net = net
        self.lr = lr

    @override
    def grain_losses(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self.net(batch["x"]).squeeze(1)
        return F.binary_cross_entropy_with_logits(logits, batch["labels"], reduction="none")

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)


class Curve(L.Callback):
    """Validation scores every ``every`` epochs (the learning curve of ``result.json``)."""

    def __init__(self, val: Encoded, every: int) -> None:
        self.val, self.every, self.points = val, every, []  # type: ignore[var-annotated]

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every == 0:
            point = {"step": trainer.global_step, "epoch": trainer.current_epoch}
            self.points.append(point | scores(pl_module.net, self.val, "val"))


def grain_config(method: Method) -> GrainConfig:
    """The ``GrainConfig`` of a sweep method, from its ``--model.grain.*`` overrides."""
    args = list(method.overrides)
    options: dict[str, Any] = {}
    if len(args) % 2 or any(not a.startswith(_OPTION) for a in args[::2]):
        raise ValueError(f"method {method.name!r}: only '{_OPTION}<option> <value>' pairs are supported, got {args}")
    for key, value in zip(args[::2], args[1::2]):
        options[key[len(_OPTION) :]] = {"true": True, "false": False}.get(value.lower(), value)
    return GrainConfig(log_loss_as=None, log_every_n_steps=0, **options)


@dataclass
class Study:
    pretrained: torch.nn.Module
    pool: Encoded
    val: Encoded
    test: Encoded
    zero_shot: dict[str, float]


def build(args: argparse.Namespace) -> Study:
    frame = pd.read_csv(args.data, skipinitialspace=True)
    for column in (args.group_column, LABEL, *NUMERIC):
        if column not in frame.columns:
            raise ValueError(f"{args.data}: no column {column!r}; columns: {list(frame.columns)}")
    groups = frame[args.group_column].astype(str)
    for value in (args.pretrain_group, args.finetune_group):
        if not (groups == value).any():
            raise ValueError(f"{args.group_column} has no rows equal to {value!r}; values: {sorted(groups.unique())}")
    source, target = frame[groups == args.pretrain_group], frame[groups == args.finetune_group]
    encoder = Encoder(source, drop=args.group_column)
    encoded = encoder(target)
    order = np.random.default_rng(args.split_seed).permutation(len(target))
    n_test, n_val = args.test_size, args.val_size
    if len(order) < n_test + n_val + max(args.sizes):
        raise ValueError(f"{len(order)} rows of {args.finetune_group!r}: too few for test, validation and {args.sizes}")
    test, val, pool = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    net = pretrain(encoder(source), epochs=args.pretrain_epochs)
    test_rows = encoded.rows(test)
    return Study(net, encoded.rows(pool), encoded.rows(val), test_rows, scores(net, test_rows, "test"))


def fine_tune(
    study: Study, method: Method, lr: float, seed: int, size: int, args: argparse.Namespace
) -> dict[str, Any]:
    """One run: ``result.json``'s content."""
    picked = np.random.default_rng(1000 + seed).choice(len(study.pool.y), size=size, replace=False)
    loader = DataLoader(
        Rows(study.pool.rows(picked)),
        batch_size=args.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    net = mlp(study.pool.x.shape[1])
    net.load_state_dict(study.pretrained.state_dict())
    model = FineTuner(net, grain_config(method), lr)
    curve = Curve(study.val, every=max(1, args.epochs // 4))
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=[curve],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(model, loader)
    wall = time.perf_counter() - start
    return {
        "seed": seed,
        "lr": lr,
        "monitor": "val_auc",
        "mode": "max",
        "test_metric": "test_auc",
        "val": scores(net, study.val, "val"),
        "test": scores(net, study.test, "test"),
        "wall_s": wall,
        "steps": trainer.global_step,
        "curve": curve.points,
    }


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="UCI Adult CSV (e.g. ../shared/data/adult.csv.gz)")
    ap.add_argument("--output_dir", required=True, type=Path)
    ap.add_argument("--sizes", default="64,256", help="fine-tuning set sizes, comma separated")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--methods", default="mean,grain-sample,grain-chunks4,grain-label,grain-rescaled")
    ap.add_argument("--lrs", default="1e-4,1e-3,1e-2")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--group_column", default="gender")
    ap.add_argument("--pretrain_group", default="Male")
    ap.add_argument("--finetune_group", default="Female")
    ap.add_argument("--val_size", type=int, default=1000)
    ap.add_argument("--test_size", type=int, default=5000)
    ap.add_argument("--split_seed", type=int, default=0)
    ap.add_argument("--pretrain_epochs", type=int, default=5)
    args = ap.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",")]
    if any(s < 1 for s in args.sizes):
        raise ValueError(f"--sizes must be positive, got {args.sizes}")
    methods = parse_methods(args.methods)
    for m in methods:
        grain_config(m)  # refuse an unsupported override before any run
    lrs = [float(v) for v in args.lrs.split(",")]
    quiet, threads = logging.getLogger("lightning.pytorch"), torch.get_num_threads()
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module="lightning")
            run_study(args, methods, lrs)
    finally:  # the caller's logging and threads as they were (the tests call main in-process)
        quiet.setLevel(level)
        torch.set_num_threads(threads)
    print("command:", shlex.join(["python", "benchmarks/grain_study/adult_groups.py", *(argv or [])]))


def run_study(args: argparse.Namespace, methods: list[Method], lrs: list[float]) -> None:
    """Every size's runs (finished ones skipped) and report."""
    study = build(args)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.output_dir / "zero_shot.json", json.dumps(study.zero_shot, indent=2) + "\n")
    print(f"pretrained on {args.pretrain_group!r}, scored on {args.finetune_group!r} test rows: {study.zero_shot}")
    for size in args.sizes:
        out = args.output_dir / f"n{size}"
        runs = [Run(seed, m, lr) for m in methods for lr in lrs for seed in range(args.seeds)]
        for i, run in enumerate(runs, 1):
            path = run.directory(out) / RESULT_FILE
            if read_result(path, run.seed, run.lr) is not None:
                continue
            result = fine_tune(study, run.method, run.lr, run.seed, size, args)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(result, indent=1) + "\n")
            print(f"[n={size} {i}/{len(runs)}] {run.run_id} test_auc={result['test']['test_auc']:.4f}", flush=True)
        report = write_report(out, runs)
        print(f"\n## n = {size}\n\n{report.markdown}")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
