"""A callback that kills its own process with SIGKILL in the middle of a fit (for the fault-injection tests)."""

from __future__ import annotations

import os
import signal
from typing import Any

import lightning as L
from typing_extensions import override


class SigkillAtBatch(L.Callback):
    """``os.kill(getpid(), SIGKILL)`` when training batch ``batch`` starts: no Python clean-up runs."""

    def __init__(self, batch: int = 1) -> None:
        self.batch = batch

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)


class RaiseAtBatch(L.Callback):
    """Raise ``RuntimeError("injected failure")`` when training batch ``batch`` starts."""

    def __init__(self, batch: int = 1) -> None:
        self.batch = batch

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx == self.batch:
            raise RuntimeError("injected failure")
