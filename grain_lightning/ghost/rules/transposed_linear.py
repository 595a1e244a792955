r"""``transformers.pytorch_utils.Conv1D`` (GPT-2's projections): ``y = x @ W + b`` with ``W`` of shape
``(in, out)``, the transpose of ``nn.Linear``'s. Per-sample gradient ``g_i = A_i^T B_i`` from input ``A_i``
(``T x in``) and output gradient ``B_i`` (``T x out``); the Gram and cost are a Linear's
(:class:`~grain_lightning.ghost.terms.MatrixTerm` with ``transposed=True``). Registered by qualified name:
``transformers`` is not imported.
"""

from __future__ import annotations

from typing import Any

import torch

from grain_lightning.ghost.registry import register_rule
from grain_lightning.ghost.rules.base import GhostRule
from grain_lightning.ghost.tensors import as_autocast, autocast_dtype
from grain_lightning.ghost.terms import MatrixTerm, Term, VectorTerm

__all__ = ["TransposedLinearRule"]


@register_rule("transformers.pytorch_utils.Conv1D")
class TransposedLinearRule(GhostRule):
    expects = frozenset({"weight", "bias"})

    def prepare(self, x: torch.Tensor) -> Any:
        return as_autocast(x.detach(), autocast_dtype(x.device.type))

    def terms(self, n: int, k: int) -> list[Term]:
        weight, bias = self.module.weight, getattr(self.module, "bias", None)
        assert isinstance(weight, torch.Tensor) and (bias is None or isinstance(bias, torch.Tensor))
        a = self.concat([self.samples(c.inputs, self.batch_dim, n) for c in self.calls])
        b = self.concat([self.samples(c.output_grad, self.batch_dim, n) for c in self.calls])
        out: list[Term] = []
        if self.counted(weight):
            out.append(MatrixTerm(weight, None, a.to(b.dtype), b, self.engine.linear_gram, k, transposed=True))  # type: ignore[arg-type]
        if bias is not None and self.counted(bias):
            out.append(VectorTerm(bias, None, b.sum(1)))  # type: ignore[arg-type]
        return out
