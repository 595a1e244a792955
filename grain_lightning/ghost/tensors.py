r"""Tensor helpers of the one-backward engine: the output tap, precision handling, per-group sums.

The tap is an identity on a layer's output whose backward hands ``dL/d output`` to a sink: the engine's
one backward is taken with respect to the taps only, so autograd's own weight-gradient GEMMs are skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch

__all__ = ["Tap", "as_autocast", "autocast_dtype", "cat_calls", "gram64", "group_sum", "work"]


def work(t: torch.Tensor) -> torch.Tensor:
    """Half precision upcast to float32; float32/float64 unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype on ``device_type`` if autocast is on, else ``None``."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def as_autocast(x: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """The input as an autocast linear/conv sees it (rounded to ``dtype``), for exact per-sample gradients."""
    return x.to(dtype) if dtype is not None and x.is_floating_point() and x.dtype != torch.float64 else x


def cat_calls(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate the calls of a layer along ``T`` (no copy for a single call)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


def gram64(flat: torch.Tensor, out: Optional[torch.Tensor] = None, columns: int = 1 << 16) -> torch.Tensor:
    """``flat @ flat.T`` (``flat``: ``(k, m)``), summed in float64 over column slices of ``columns``.

    One float32 product over a long inner dimension (``m`` of millions for an LM head) accumulates rounding
    over all of ``m``; products over slices of 65536 columns, added up in float64, bound it by the slice
    length at no extra cost (no float64 copy of ``flat``). Added into ``out`` (float64) when given.
    """
    k = flat.shape[0]
    acc = out if out is not None else torch.zeros(k, k, dtype=torch.float64, device=flat.device)
    if flat.dtype == torch.float64:
        return acc.addmm_(flat, flat.T)
    for start in range(0, flat.shape[1], columns):
        part = flat[:, start : start + columns]
        acc += part @ part.T
    return acc


def group_sum(onehot: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``(k, m)`` group sums of per-sample rows ``v`` (``(n, m)``), in ``v``'s dtype."""
    return onehot.T.to(v.dtype) @ v


class Tap(torch.autograd.Function):
    """Identity on a layer output; its backward hands ``dL/d output`` to ``sink`` (no weight gradients).

    ``rule`` is stored on the graph node (``ghost_rule``) so that the engine's graph walk can tell which
    rule's output a path goes through.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        anchor: torch.Tensor,
        rule: Any,
        sink: Callable[[torch.Tensor], None],
    ) -> torch.Tensor:
        ctx.sink, ctx.ghost_rule = sink, rule
        return x.detach()  # shares storage, not an autograd view: in-place ops after the layer stay legal

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        ctx.sink(grad)
        return grad, None, None, None
