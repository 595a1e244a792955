r"""``nn.Conv1d`` / ``nn.Conv2d`` (``groups=1``, zero padding) as a Linear on unfolded patches: ``T`` = output
positions, ``d = C_in kh kw``. Cost: the unfold (``n T d`` numbers kept) plus a Linear's Gram terms.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from grain_lightning.ghost.registry import register_rule
from grain_lightning.ghost.rules.base import GhostRule, weight_bias_terms
from grain_lightning.ghost.tensors import as_autocast, autocast_dtype, work
from grain_lightning.ghost.terms import Term

__all__ = ["ConvRule"]


@register_rule(nn.Conv1d, nn.Conv2d)
class ConvRule(GhostRule):
    expects = frozenset({"weight", "bias"})

    @classmethod
    def why_unsupported(cls, module: nn.Module) -> Optional[str]:
        assert isinstance(module, (nn.Conv1d, nn.Conv2d))
        if module.groups != 1:
            return f"groups={module.groups} (only groups=1 is supported)"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} (only 'zeros' is supported)"
        return None

    def prepare(self, x: torch.Tensor) -> Any:
        m = self.module
        assert isinstance(m, (nn.Conv1d, nn.Conv2d))
        x = as_autocast(x.detach(), autocast_dtype(x.device.type))
        if x.ndim != m.weight.ndim:
            raise RuntimeError(
                f"module {self.name!r}: expected a batched {m.weight.ndim}-D input, got {tuple(x.shape)}"
            )
        if isinstance(m, nn.Conv1d):
            x = x.unsqueeze(2)
            pad = [*m._reversed_padding_repeated_twice, 0, 0]
            kernel, dil, stride = (1, *m.kernel_size), (1, *m.dilation), (1, *m.stride)
        else:
            pad, kernel, dil, stride = m._reversed_padding_repeated_twice, m.kernel_size, m.dilation, m.stride
        patches = F.unfold(F.pad(x, list(pad)), kernel, dilation=dil, stride=stride)  # (n, d, T)
        return patches.transpose(1, 2)

    def terms(self, n: int, k: int) -> list[Term]:
        a = self.concat([work(c.inputs) for c in self.calls])
        b = self.concat(
            [work(c.output_grad.reshape(n, c.output_grad.shape[1], -1).transpose(1, 2)) for c in self.calls]
        )
        return weight_bias_terms(self, self.module, a, b, k)
