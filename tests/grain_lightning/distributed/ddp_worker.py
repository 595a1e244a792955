"""Two-process CPU (gloo) fits under ``grain_ddp``, for tests/grain_lightning/distributed/test_strategy.py.

Usage: ``python tests/grain_lightning/distributed/ddp_worker.py OUTDIR SCENARIO [SCENARIO ...]`` with
``MASTER_PORT`` set to a free port (and ``GRAIN_TEST_DEVICES=3`` for three ranks). Lightning's ``ddp``
launcher (popen) re-runs this command as the other ranks; every rank runs every scenario in order (rank
``r`` of ``R`` trains on samples ``r, r + R, ...``), catching the expected errors so that one launch
covers them all, and writes ``OUTDIR/<scenario>_rank<r>.pt``: the flat parameters before training and
after every batch, the strategy's counters, the logged ``grain_ddp/*`` metrics, and the error message, if any.
"""

from __future__ import annotations

import os
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler, TensorDataset

from grain_lightning import Chunks, GrainConfig, GrainDDPStrategy, GrainMixin

N, D, CLASSES, BATCH, LR = 48, 6, 3, 8, 0.5  # 24 samples per rank: 3 batches of 8 per epoch


def make_data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = torch.randn(D, CLASSES, generator=g, dtype=torch.float64)
    y = (x @ w + 0.7 * torch.randn(N, CLASSES, generator=g, dtype=torch.float64)).argmax(1)
    return TensorDataset(x, y)


class RankSamples(Sampler[int]):
    """Samples ``r, r + R, r + 2R, ...`` for rank ``r`` of ``R``, read when iterated (after the launch)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def _rank_world(self) -> tuple[int, int]:
        return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)

    def __iter__(self):
        rank, world = self._rank_world()
        return iter(range(rank, self.n, world))

    def __len__(self) -> int:
        rank, world = self._rank_world()
        return len(range(rank, self.n, world))


def make_loader(batch_size: int = BATCH) -> DataLoader:
    ds = make_data()
    return DataLoader(ds, batch_size=batch_size, sampler=RankSamples(len(ds)))


def make_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(D, 8), torch.nn.Tanh(), torch.nn.Linear(8, CLASSES)).double()


def flat_params(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in module.parameters()])


class Plain(L.LightningModule):
    """An ordinary automatic-optimization module: nothing changed for grain_ddp."""

    def __init__(
        self,
        momentum: float = 0.0,
        nan_at: tuple[int, int] | None = None,
        extra_on_rank1: bool = False,
        batch_norm: bool = False,
    ):
        super().__init__()
        self.net, self.momentum, self.nan_at, self.extra_on_rank1 = make_net(), momentum, nan_at, extra_on_rank1
        if batch_norm:
            self.net.insert(1, torch.nn.BatchNorm1d(8).double())
        self.buffers_seen: list[torch.Tensor] = []  # running statistics at the start of each training step

    def configure_model(self) -> None:
        if self.extra_on_rank1 and self.global_rank == 1 and not hasattr(self, "extra"):
            self.extra = torch.nn.Linear(2, 2).double()

    def training_step(self, batch, batch_idx):
        x, y = batch
        if len(self.net) == 4:
            self.buffers_seen.append(torch.cat([self.net[1].running_mean, self.net[1].running_var]).clone())
        loss = F.cross_entropy(self.net(x), y)
        if self.nan_at == (self.global_rank, batch_idx):
            loss = loss * float("nan")
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=self.momentum)


class WithMixin(GrainMixin, L.LightningModule):
    """GrainMixin module: two chunks of each rank's batch are its groups."""

    def __init__(
        self,
        accumulate: int = 1,
        nan_at: tuple[int, int] | None = None,
        aggregation: str = "grain",
        step_norm: str = "grain",
    ):
        super().__init__(
            grain=GrainConfig(
                grouping=Chunks(2),
                log_loss_as=None,
                accumulate_grad_batches=accumulate,
                aggregation=aggregation,
                step_norm=step_norm,
            )
        )
        self.net, self.nan_at = make_net(), nan_at

    def grain_losses(self, batch, batch_idx):
        x, y = batch
        losses = F.cross_entropy(self.net(x), y, reduction="none")
        return losses * float("nan") if self.nan_at == (self.global_rank, batch_idx) else losses

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


class Recorder(L.Callback):
    def __init__(self) -> None:
        self.params: list[torch.Tensor] = []

    def on_train_start(self, trainer, pl_module) -> None:
        if not self.params:
            self.params.append(flat_params(pl_module))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.params.append(flat_params(pl_module))


def make_trainer(strategy: GrainDDPStrategy, callbacks: list, **kw) -> L.Trainer:
    devices = int(os.environ.get("GRAIN_TEST_DEVICES", "2"))
    base = dict(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        use_distributed_sampler=False,
    )
    base.update(kw)
    return L.Trainer(**base)


def strategy(**kw) -> GrainDDPStrategy:
    return GrainDDPStrategy(timeout=timedelta(seconds=60), **kw)


SCENARIOS = {
    "sharded": dict(strategy=dict(mode="sharded")),
    "allgather": dict(strategy=dict(mode="allgather")),
    "blockwise": dict(strategy=dict(mode="blockwise")),
    # buckets of 26 float64 numbers: the net's 4 parameters (48, 8, 24, 3) make 3 buckets, 2 of them padded
    "sharded_buckets": dict(strategy=dict(mode="sharded", bucket_cap_mb=2e-4)),
    "blockwise_buckets": dict(strategy=dict(mode="blockwise", bucket_cap_mb=2e-4)),
    "mixin_global_buckets": dict(strategy=dict(mixin_groups="global", bucket_cap_mb=2e-4), mixin=True),
    "accum_clip": dict(
        strategy=dict(mode="sharded"),
        batch_size=BATCH // 2,
        trainer=dict(accumulate_grad_batches=2, gradient_clip_val=0.05),
    ),
    "sharded_step_norm": dict(strategy=dict(mode="sharded", step_norm="mean")),
    "blockwise_step_norm": dict(strategy=dict(mode="blockwise", step_norm="mean")),
    "mixin_global_step_norm": dict(strategy=dict(mixin_groups="global"), mixin=True, module=dict(step_norm="mean")),
    "mixin_hierarchical": dict(strategy=dict(mixin_groups="hierarchical"), mixin=True),
    "mixin_global": dict(strategy=dict(mixin_groups="global"), mixin=True),
    "mixin_global_allgather": dict(strategy=dict(mixin_groups="global", mode="allgather"), mixin=True),
    "mixin_global_accumulate": dict(
        strategy=dict(mixin_groups="global"), mixin=True, batch_size=BATCH // 2, module=dict(accumulate=2)
    ),
    "mixin_mean": dict(strategy=dict(), mixin=True, module=dict(aggregation="mean")),
    "mixin_nonfinite_skip": dict(strategy=dict(on_nonfinite="skip"), mixin=True, module=dict(nan_at=(1, 1))),
    "batch_norm": dict(strategy=dict(), module=dict(batch_norm=True)),
    "nonfinite_skip": dict(strategy=dict(on_nonfinite="skip"), module=dict(nan_at=(1, 1))),
    "nonfinite_raise": dict(strategy=dict(), module=dict(nan_at=(1, 1))),
    "mismatch": dict(strategy=dict(), module=dict(extra_on_rank1=True)),
}


def run_scenario(name: str, out: Path, data: DataLoader) -> None:
    spec = SCENARIOS.get(name)
    if name == "resume":
        return run_resume(out, data)
    if spec is None:
        raise SystemExit(f"unknown scenario {name!r}; known: {sorted(SCENARIOS) + ['resume']}")
    module = (WithMixin if spec.get("mixin") else Plain)(**spec.get("module", {}))
    strat, rec = strategy(**spec["strategy"]), Recorder()
    trainer = make_trainer(strat, [rec], **spec.get("trainer", {}))
    if "batch_size" in spec:
        data = make_loader(spec["batch_size"])
    error = None
    try:
        trainer.fit(module, data)
    except (FloatingPointError, ValueError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    save(out, name, trainer, strat, rec.params, error, buffers=getattr(module, "buffers_seen", []))


def run_resume(out: Path, data: DataLoader) -> None:
    """Two epochs straight vs one epoch, checkpoint, and a resumed second epoch (SGD with momentum)."""
    straight, strat = Recorder(), strategy()
    make_trainer(strat, [straight], max_epochs=2).fit(Plain(momentum=0.9), data)
    ckpt_dir = out / "ckpt"
    first = make_trainer(
        strategy(),
        [L.pytorch.callbacks.ModelCheckpoint(dirpath=ckpt_dir, save_last=True)],
        max_epochs=1,
        enable_checkpointing=True,
    )
    first.fit(Plain(momentum=0.9), data)
    resumed_rec, resumed_strat = Recorder(), strategy()
    resumed = make_trainer(resumed_strat, [resumed_rec], max_epochs=2)
    resumed.fit(Plain(momentum=0.9), data, ckpt_path=str(ckpt_dir / "last.ckpt"))
    save(out, "resume", resumed, resumed_strat, resumed_rec.params, None, straight=straight.params)


def save(out: Path, name: str, trainer: L.Trainer, strat: GrainDDPStrategy, params, error, **extra) -> None:
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("grain")}
    record = dict(
        params=params,
        bytes_sent=strat.bytes_sent,
        calls=dict(strat.comm.calls),
        num_combines=strat.num_combines,
        skipped_steps=strat.skipped_steps,
        metrics=metrics,
        error=error,
        rank=trainer.global_rank,
        **extra,
    )
    torch.save(record, out / f"{name}_rank{trainer.global_rank}.pt")


def main(argv: list[str]) -> None:
    out = Path(argv[0])
    data = make_loader()
    for name in argv[1:]:
        try:
            run_scenario(name, out, data)
        except Exception:  # record and go on: the other rank does the same, or the process group times out
            (out / f"{name}_rank{os.environ.get('LOCAL_RANK', '0')}.err").write_text(traceback.format_exc())
            raise


if __name__ == "__main__":
    main(sys.argv[1:])
