"""Main demo: fine-tune a pretrained network on a small, noisy target set with the plain mean vs GRAIN.

    bash scripts/demo.sh                 # defaults: 5 seeds, built-in synthetic data
    bash scripts/demo.sh --seeds 10 --train-size 128

Built-in data (no download): a teacher network labels 20-dimensional inputs into 6 classes. A student
MLP is pretrained once on 6,000 samples of the source teacher; each run fine-tunes a copy on
``--train-size`` samples of a shifted target teacher with ``--label-noise`` of the labels flipped, and is
scored on 4,000 clean target samples. Every seed changes the fine-tuning subset, the noise, the data order
and the new head's initialisation; methods share them seed by seed. The table reports the mean and the
run-to-run standard deviation of test accuracy and worst-class accuracy.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from dataclasses import dataclass

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

from grain_lightning.config import GrainConfig
from grain_lightning.groups import ByKey
from grain_lightning.mixin import GrainMixin

DIM, CLASSES = 20, 6


def _teacher(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(DIM, 32), torch.nn.Tanh(), torch.nn.Linear(32, CLASSES))


def _label(teacher: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return teacher(x).argmax(1)


@dataclass
class DemoData:
    backbone: torch.nn.Sequential
    target_teacher: torch.nn.Module
    x_test: torch.Tensor
    y_test: torch.Tensor


def build_data(shift: float = 0.6) -> DemoData:
    """Pretrain a student on the source teacher; build the shifted target teacher and the test set."""
    g = torch.Generator().manual_seed(0)
    source = _teacher(1)
    target = copy.deepcopy(source)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(shift * p.std() * torch.randn(p.shape, generator=g))
    x_src = torch.randn(6000, DIM, generator=g)
    y_src = _label(source, x_src)
    torch.manual_seed(2)
    student = torch.nn.Sequential(
        torch.nn.Linear(DIM, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, CLASSES),
    )
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    for _ in range(15):
        perm = torch.randperm(6000, generator=g)
        for i in range(0, 6000, 128):
            idx = perm[i : i + 128]
            opt.zero_grad()
            F.cross_entropy(student(x_src[idx]), y_src[idx]).backward()
            opt.step()
    x_test = torch.randn(4000, DIM, generator=g)
    return DemoData(student, target, x_test, _label(target, x_test))


class FineTuner(GrainMixin, L.LightningModule):
    """The pretrained backbone with a fresh head, fine-tuned with GRAIN or the plain mean."""

    def __init__(self, backbone: torch.nn.Sequential, grain: GrainConfig, lr: float, head_seed: int) -> None:
        super().__init__(grain=grain)
        self.net: torch.nn.Sequential = copy.deepcopy(backbone)
        torch.manual_seed(head_seed)
        self.net[-1] = torch.nn.Linear(64, CLASSES)
        self.lr = lr

    @override
    def grain_losses(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y, reduction="none")

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)


def run(data: DemoData, method: str, seed: int, args: argparse.Namespace) -> dict[str, float]:
    g = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn(args.train_size, DIM, generator=g)
    y = _label(data.target_teacher, x)
    flip = torch.rand(args.train_size, generator=g) < args.label_noise
    y = torch.where(flip, torch.randint(0, CLASSES, (args.train_size,), generator=g), y)
    loader = DataLoader(
        TensorDataset(x, y), batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    configs = {
        "mean": GrainConfig(aggregation="mean", log_loss_as=None),
        "grain-label": GrainConfig(grouping=ByKey(1), log_loss_as=None, log_every_n_steps=0),
        "grain-sample": GrainConfig(grouping="sample", log_loss_as=None, log_every_n_steps=0),
    }
    model = FineTuner(data.backbone, configs[method], args.lr, head_seed=seed)
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    t0 = time.perf_counter()
    trainer.fit(model, loader)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        pred = model.net(data.x_test).argmax(1)
    correct = (pred == data.y_test).float()
    per_class = [float(correct[data.y_test == c].mean()) for c in range(CLASSES) if (data.y_test == c).any()]
    return {"acc": float(correct.mean()), "worst": min(per_class), "seconds": seconds}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--train-size", type=int, default=256)
    ap.add_argument("--label-noise", type=float, default=0.2)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument(
        "--methods",
        nargs="+",
        default=["mean", "grain-label", "grain-sample"],
        choices=["mean", "grain-label", "grain-sample"],
    )
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = build_data()
    print(
        f"GRAIN demo: fine-tune a pretrained MLP on {args.train_size} target samples "
        f"({args.label_noise:.0%} label noise), {args.epochs} epochs, {args.seeds} seeds"
    )
    results: dict[str, list[dict[str, float]]] = {m: [] for m in args.methods}
    for seed in range(args.seeds):
        for method in args.methods:
            results[method].append(run(data, method, seed, args))
        print(f"  seed {seed}: " + "  ".join(f"{m}={results[m][-1]['acc']:.4f}" for m in args.methods), flush=True)
    print()
    print(f"{'method':<14}{'test acc mean':>14}{'std':>9}{'worst-class mean':>18}{'std':>9}{'s/run':>8}")
    for method, rs in results.items():
        acc = [r["acc"] for r in rs]
        worst = [r["worst"] for r in rs]
        sd = statistics.stdev if len(rs) > 1 else (lambda v: 0.0)
        print(
            f"{method:<14}{statistics.mean(acc):>14.4f}{sd(acc):>9.4f}{statistics.mean(worst):>18.4f}"
            f"{sd(worst):>9.4f}{statistics.mean(r['seconds'] for r in rs):>8.1f}"
        )


if __name__ == "__main__":
    main()
