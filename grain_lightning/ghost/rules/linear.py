r"""``nn.Linear`` (any leading dims): ``g_i = B_i^T A_i`` from input ``A_i`` (``T x d``) and output gradient
``B_i`` (``T x p``); bias ``sum_t B_i(t)``. Cost: the cheaper of ``(nT)^2 (d + p)`` (ghost) and
``n T p d + k^2 p d`` (materialised) flops for the Gram; see :class:`~grain_lightning.ghost.terms.MatrixTerm`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from grain_lightning.ghost.registry import register_rule
from grain_lightning.ghost.rules.base import GhostRule, weight_bias_terms
from grain_lightning.ghost.tensors import as_autocast, autocast_dtype
from grain_lightning.ghost.terms import Term

__all__ = ["LinearRule"]


@register_rule(nn.Linear)
class LinearRule(GhostRule):
    expects = frozenset({"weight", "bias"})

    def prepare(self, x: torch.Tensor) -> Any:
        return as_autocast(x.detach(), autocast_dtype(x.device.type))

    def terms(self, n: int, k: int) -> list[Term]:
        a = self.concat([self.samples(c.inputs, self.batch_dim, n) for c in self.calls])
        b = self.concat([self.samples(c.output_grad, self.batch_dim, n) for c in self.calls])
        return weight_bias_terms(self, self.module, a, b, k)
