"""The Lightning strategy hooks that put :mod:`grain_lightning.distributed.faults` to work, shared by ``grain_ddp``
and ``grain_fsdp``.

:class:`FaultHooks` goes first in a strategy's bases (``class S(FaultHooks, DDPStrategy)``) and expects
``self.faults`` (a :class:`~grain_lightning.distributed.faults.FaultMonitor`, started by the strategy once its
process group exists). It posts this rank's exception for the others (``on_exception``), lets a barrier quote
another rank's error, and compares every rank's number of training batches at the start of training and, when
the loaders are reloaded, of each epoch (one all-reduce of ``world`` numbers).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import ParallelStrategy
from typing_extensions import override

from grain_lightning.distributed.faults import FaultMonitor, check_batch_counts

__all__ = ["FaultHooks"]


class FaultHooks(ParallelStrategy):
    """Strategy hooks for faults across ranks (see the module docstring); a base class placed before Lightning's
    strategy (``class S(FaultHooks, DDPStrategy)``: ``super()`` then reaches ``DDPStrategy``)."""

    faults: FaultMonitor
    _counts_checked_epoch: int = -1

    @override
    def on_exception(self, exception: BaseException) -> None:
        """Post this rank's error for the other ranks (or name the other rank's error that caused this one)."""
        super().on_exception(exception)
        self.faults.on_exception(exception)

    @override
    def barrier(self, *args: Any, **kwargs: Any) -> None:
        with self.faults.collective():
            super().barrier(*args, **kwargs)  # type: ignore[safe-super]  # the concrete strategy after this class has one

    @override
    def on_train_start(self) -> None:
        super().on_train_start()
        self._check_batch_counts()

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        trainer = self._trainer_or_none()
        if (
            trainer is not None
            and trainer.reload_dataloaders_every_n_epochs > 0
            and trainer.current_epoch != self._counts_checked_epoch
        ):
            self._check_batch_counts()  # the loaders may have changed with the epoch

    def _trainer_or_none(self) -> Any:
        module = self.lightning_module
        return module.trainer if module is not None and module._trainer is not None else None

    def _check_batch_counts(self) -> None:
        """Every rank must run the same number of batches per epoch (every step combines every rank)."""
        trainer = self._trainer_or_none()
        if trainer is None:
            return
        self._counts_checked_epoch = trainer.current_epoch
        if self.world_size > 1:
            with self.faults.collective():
                check_batch_counts(
                    trainer.num_training_batches,
                    self.global_rank,
                    self.world_size,
                    owner=self.faults.owner,
                    device=self.root_device,
                )
