"""Lightning callbacks of Light-FMP: :class:`TrainingThroughput`, the training time and samples of a fit.

Why not Lightning's ``ThroughputMonitor``: it logs a windowed rate (``samples_per_sec`` over the last
``window_size`` batches) to the loggers and keeps no total of the fit's wall and CPU seconds; ``metrics.json``
records one number per stage for the whole fit (and ``lightfmp`` may run with no logger). Add
``ThroughputMonitor`` with ``--trainer.callbacks+=ThroughputMonitor`` for a logged rate curve.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override


class TrainingThroughput(Callback):
    """Seconds of ``fit``'s training loop (wall clock, and CPU time of this process, which is less sensitive to
    other jobs on a shared machine) and the number of training samples it consumed (on every rank together)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.cpu_seconds = 0.0
        self.samples = 0
        self._start: Optional[float] = None
        self._cpu_start = 0.0

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()
        self._cpu_start = time.process_time()
        self.samples = 0

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.samples += len(batch)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size > 1:  # every rank's samples: the throughput of the whole data-parallel fit
            total = trainer.strategy.reduce(torch.tensor(float(self.samples)), reduce_op="sum")
            self.samples = int(total.item())
        if self._start is not None:
            self.seconds = time.perf_counter() - self._start
            self.cpu_seconds = time.process_time() - self._cpu_start

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else float("nan")
