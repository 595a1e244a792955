"""Evaluation metrics over a whole evaluation set (torchmetrics ``Metric`` API)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.classification import BinaryAUROC
from torchmetrics.utilities import dim_zero_cat
from typing_extensions import override


class BinaryAUC(BinaryAUROC):
    """``BinaryAUROC`` that is NaN, not 0, when the targets hold a single class (where AUC is undefined)."""

    @override
    def compute(self) -> torch.Tensor:  # type: ignore[override]  # as BinaryAUROC.compute: a tensor, not a curve
        if self.thresholds is None:
            target = dim_zero_cat(self.target)
            positives, total = int(target.sum()), target.numel()
        else:  # binned state: confmat (thresholds, 2, 2), rows by target
            positives, total = int(self.confmat[0, 1].sum()), int(self.confmat[0].sum())
        if total > 0 and positives in (0, total):
            return torch.tensor(float("nan"))
        return super().compute()


class BinaryLogLoss(Metric):
    """Mean binary cross-entropy ``-1/N sum_i [y_i log p_i + (1 - y_i) log(1 - p_i)]`` over every update.

    ``update(logits (N,), target (N,) in {0, 1})`` takes logits (numerically stable ``logsigmoid``), not
    probabilities. Accumulated as a float64 sum and a count, so the result does not depend on batch sizes.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    total: torch.Tensor  # states registered by add_state
    count: torch.Tensor

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    @override
    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        if logits.shape != target.shape:
            raise ValueError(
                f"logits and target must have the same shape, got {tuple(logits.shape)} and {tuple(target.shape)}"
            )
        bad = (target != 0) & (target != 1)
        if bool(bad.any()):
            raise ValueError(f"target must be 0 or 1, got {target[bad][:5].tolist()}")
        loss = F.binary_cross_entropy_with_logits(logits.double(), target.double(), reduction="sum")
        self.total += loss
        self.count += target.numel()

    @override
    def compute(self) -> torch.Tensor:
        if int(self.count) == 0:
            raise ValueError("BinaryLogLoss.compute() called before any update")
        return self.total / self.count
