"""Two-process CPU (gloo) ``grain_ddp`` fits with an injected fault, for test_faults.py (a scenario prefixed
``fsdp_`` runs under ``grain_fsdp`` instead).

Usage: ``python tests/grain_lightning/distributed/fault_worker.py OUTDIR SCENARIO TIMEOUT_S`` with
``MASTER_PORT`` set to a free port. Lightning's popen ``ddp`` launcher re-runs this command as rank 1. Each
rank writes ``OUTDIR/rank<r>.err`` (the time, ``time.time()``, on the first line, then the traceback) when its
fit raises, and re-raises (the process exits non-zero), or ``OUTDIR/rank<r>.ok`` when its fit returns. In
``raise_rank1_linger`` rank 1 stays alive after its error (as a process that catches it and goes on would)
until rank 0 has stopped. One scenario per launch: after a fault the process
group is not usable again. ``TIMEOUT_S`` is the process-group timeout given to the strategy (``timeout=``, a
``timedelta``, the name that existed before ``fault_timeout``), so a hang shows as a run that lasts that long.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, Sampler

from grain_lightning import GrainDDPStrategy, GrainFSDPStrategy
from tests.grain_lightning.distributed import ddp_worker as W


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("LOCAL_RANK", "0"))


class ShortRank1(Sampler[int]):
    """Rank 0: samples 0, 2, ..., 46 (3 batches of 8); rank 1: samples 1, 3, ..., 31 (2 batches)."""

    def _indices(self) -> range:
        r = rank()
        return range(r, W.N if r == 0 else W.N - 16, 2)

    def __iter__(self):
        return iter(self._indices())

    def __len__(self) -> int:
        return len(self._indices())


class ShortRank1Stream(IterableDataset):
    """An iterable dataset without a length: 3 batches on rank 0, 2 on rank 1."""

    def __iter__(self):
        x, y = W.make_data().tensors
        r = rank()
        for i in range(r, W.N if r == 0 else W.N - 16, 2):
            yield x[i], y[i]


class FailsOnOneRank(W.Plain):
    """Raises ``ValueError`` in ``training_step`` of batch 1 on rank ``bad_rank`` only."""

    def __init__(self, bad_rank: int) -> None:
        super().__init__()
        self.bad_rank = bad_rank

    def training_step(self, batch, batch_idx):
        if self.global_rank == self.bad_rank and batch_idx == 1:
            raise ValueError(f"injected failure on rank {self.bad_rank} at batch 1")
        return super().training_step(batch, batch_idx)


def run(scenario: str, timeout_s: float) -> None:
    fsdp = scenario.startswith("fsdp_")  # the same scenario under grain_fsdp
    scenario = scenario.removeprefix("fsdp_")
    module: L.LightningModule = W.Plain()
    data = W.make_loader()
    if scenario == "unequal_map":
        data = DataLoader(W.make_data(), batch_size=W.BATCH, sampler=ShortRank1())
    elif scenario in ("unequal_iterable", "unequal_iterable_mixin"):
        data = DataLoader(ShortRank1Stream(), batch_size=W.BATCH)
    elif scenario.startswith("raise_rank"):
        module = FailsOnOneRank(int(scenario[len("raise_rank")]))
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")
    options = {}
    if scenario.endswith("_mixin"):  # GrainMixin, every group of every rank: the counts travel in its all_gather
        module, options = W.WithMixin(), dict(mixin_groups="global")
    cls = GrainFSDPStrategy if fsdp else GrainDDPStrategy
    strategy = cls(timeout=timedelta(seconds=timeout_s), **options)
    W.make_trainer(strategy, [], max_epochs=2).fit(module, data)


def main(argv: list[str]) -> None:
    out, scenario, timeout_s = Path(argv[0]), argv[1], float(argv[2])
    try:
        run(scenario, timeout_s)
    except BaseException:
        (out / f"rank{rank()}.err").write_text(f"{time.time()}\n{traceback.format_exc()}")
        if scenario.endswith("_linger") and rank() == 1:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not any((out / f"rank0.{end}").exists() for end in ("err", "ok")):
                time.sleep(0.2)
        raise
    (out / f"rank{rank()}.ok").write_text("")


if __name__ == "__main__":
    main(sys.argv[1:])
