r"""``nn.LayerNorm`` / ``nn.RMSNorm``: per-sample ``sum_pos B * xhat`` (weight) and ``sum_pos B`` (bias), with
``xhat`` the normalised input recomputed from the recorded input; materialised vectors (``n x m``). Cost: one
normalisation of the input and ``O(n T m)``. BatchNorm in training mode couples samples: it is registered as
sample-coupling here (every parameter then goes to the reference engine).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from grain_lightning.ghost.registry import register_rule, register_sample_coupling
from grain_lightning.ghost.rules.base import GhostRule
from grain_lightning.ghost.tensors import work
from grain_lightning.ghost.terms import Term, VectorTerm

__all__ = ["NormRule"]


@register_rule(nn.LayerNorm, nn.RMSNorm)
class NormRule(GhostRule):
    expects = frozenset({"weight", "bias"})

    def terms(self, n: int, k: int) -> list[Term]:
        m = self.module
        assert isinstance(m, (nn.LayerNorm, nn.RMSNorm))
        shape = tuple(m.normalized_shape)
        flat: Callable[[torch.Tensor], torch.Tensor] = lambda t: self.samples(
            t.reshape(*t.shape[: t.ndim - len(shape)], -1), self.batch_dim, n
        ).sum(1)
        wv, bv = [], []
        for c in self.calls:
            x = work(c.inputs)
            if isinstance(m, nn.LayerNorm):
                xhat = F.layer_norm(x, shape, eps=m.eps)
            else:
                xhat = F.rms_norm(x, shape, eps=m.eps if m.eps is not None else torch.finfo(c.inputs.dtype).eps)
            g = work(c.output_grad).to(xhat.dtype)
            wv.append(flat(g * xhat))
            bv.append(flat(g))
        out: list[Term] = []
        if self.counted(m.weight):
            out.append(VectorTerm(m.weight, None, torch.stack(wv).sum(0)))
        bias = getattr(m, "bias", None)
        if bias is not None and self.counted(bias):
            out.append(VectorTerm(bias, None, torch.stack(bv).sum(0)))
        return out


register_sample_coupling(nn.modules.batchnorm._BatchNorm, lambda m: m.training or not m.track_running_stats)
