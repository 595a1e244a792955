"""One run's result, as ``grain sweep`` reads it: final validation and test metrics, curve, time, steps.

``result.json`` (written atomically, so a killed run never leaves a file that looks finished; a non-finite
metric is ``null``)::

    {"seed": 3, "lr": 1e-05, "monitor": "val_acc", "mode": "max", "test_metric": "test_acc",
     "val": {"val_acc": 0.81, "val_loss": 0.45}, "test": {"test_acc": 0.79, "test_loss": 0.47},
     "wall_s": 12.3, "steps": 40, "curve": [{"step": 10, "epoch": 0, "val_acc": 0.7, "val_loss": 0.6}]}

Validation and test use the weights at the end of training (no checkpoint selection), so the validation
metric that chooses a learning rate and the test metric describe the same model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import lightning as L
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from grain_lightning.files import atomic_write_json

__all__ = ["ValidationCurve", "run_result", "write_json"]


class ValidationCurve(Callback):
    """Records the ``val_*`` metrics after every validation run of a fit (sanity check excluded)."""

    def __init__(self) -> None:
        self.points: list[dict[str, float]] = []

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")}
        if metrics:
            self.points.append({"step": trainer.global_step, "epoch": trainer.current_epoch, **metrics})


def _metrics(results: Sequence[Mapping[str, Any]], prefix: str) -> dict[str, float]:
    return {k: float(v) for d in results for k, v in d.items() if k.startswith(prefix)}


def run_result(
    trainer: L.Trainer,
    model: L.LightningModule,
    datamodule: L.LightningDataModule,
    *,
    monitor: str,
    mode: str,
    wall_s: float,
    curve: list[dict[str, float]],
    seed: Optional[int],
    lr: float,
) -> dict[str, Any]:
    """Validate (unless the fit's last validation already saw the final weights) and test them; ``result.json``."""
    if curve and curve[-1]["step"] == trainer.global_step:  # validated after the last step: same weights, same data
        val = {k: v for k, v in curve[-1].items() if k.startswith("val_")}
    else:
        val = _metrics(trainer.validate(model, datamodule=datamodule, verbose=False), "val_")
    test = _metrics(trainer.test(model, datamodule=datamodule, verbose=False), "test_")
    return {
        "seed": seed,
        "lr": lr,
        "monitor": monitor,
        "mode": mode,
        "test_metric": "test_" + monitor.removeprefix("val_"),
        "val": val,
        "test": test,
        "wall_s": round(wall_s, 3),
        "steps": int(trainer.global_step),
        "curve": curve,
    }


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` atomically (:func:`grain_lightning.files.atomic_write_json`); a non-finite metric
    is written as ``null``."""
    atomic_write_json(path, _finite(data))


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
