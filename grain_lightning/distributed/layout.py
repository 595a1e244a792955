r"""Flat layout of the trainable parameters for the cross-rank combination, and its communication buckets.

Parameter ``i`` occupies ``[offset_i, offset_i + numel_i)`` of one flat buffer (``P`` numbers). Consecutive
parameters form buckets of about ``bucket_cap_mb``, each padded with zeros to a multiple of the world size
``R`` (the *gaps*), so that rank ``r`` owns the ``r``-th of ``R`` equal pieces of every bucket. Blocks
(block-wise mode) are one parameter each, or runs of consecutive parameters of about ``block_size_mb``.
After the combination every ``.grad`` is a view of its slice of the buffer (no copy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

__all__ = ["Layout", "Overlap"]


@dataclass
class Layout:
    """Where each trainable parameter's gradient lives in the flat buffer, and the bucket boundaries."""

    params: list[Tensor]
    offsets: list[int]
    numels: list[int]
    length: int
    buckets: list[tuple[int, int]]
    param_bucket: list[int]
    gaps: list[tuple[int, int]]
    blocks: list[tuple[int, int]]
    buffer: Tensor  # (length,): local gradient in, combined gradient out; .grad are views of it
    hooks: list[Any] = field(default_factory=list)

    @classmethod
    def build(cls, params: list[Tensor], world: int, bucket_cap_mb: float, block_size_mb: Optional[float]) -> Layout:
        """Lay out ``params`` (one dtype) in buckets of about ``bucket_cap_mb`` MiB padded to ``world``."""
        if not params:
            raise ValueError("grain_ddp found no trainable parameters (requires_grad=True) to combine")
        dtypes = {p.dtype for p in params}
        if len(dtypes) != 1:
            raise ValueError(f"grain_ddp needs one dtype for all trainable parameters, got {sorted(map(str, dtypes))}")
        element = params[0].element_size()
        cap = bucket_cap_mb * 2**20 / element
        offsets: list[int] = []
        param_bucket: list[int] = []
        buckets: list[tuple[int, int]] = []
        gaps: list[tuple[int, int]] = []
        start = position = 0
        for i, p in enumerate(params):
            offsets.append(position)
            param_bucket.append(len(buckets))
            position += p.numel()
            if position - start >= cap or i == len(params) - 1:
                end = start + world * math.ceil((position - start) / world)
                if end > position:
                    gaps.append((position, end))
                buckets.append((start, end))
                start = position = end
        numels = [p.numel() for p in params]
        blocks = _blocks(offsets, numels, element, block_size_mb)
        buffer = torch.zeros(position, dtype=params[0].dtype, device=params[0].device)
        return cls(params, offsets, numels, position, buckets, param_bucket, gaps, blocks, buffer)

    def matches(self, params: list[Tensor]) -> bool:
        """Whether this layout is for exactly these parameters, in this order."""
        return len(self.params) == len(params) and all(a is b for a, b in zip(self.params, params))

    def zero_gaps(self) -> None:
        for a, b in self.gaps:
            self.buffer[a:b].zero_()

    def copy_in(self, i: int) -> None:
        """Copy parameter ``i``'s gradient into its slot (zeros when it has none)."""
        p, o, n = self.params[i], self.offsets[i], self.numels[i]
        g, slot = p.grad, self.buffer[o : o + n]
        if g is None:
            slot.zero_()
        elif g.is_sparse:
            raise ValueError(f"grain_ddp does not support sparse gradients (parameter of shape {tuple(p.shape)})")
        elif g.data_ptr() != slot.data_ptr():
            slot.copy_(g.reshape(-1))

    def unpack(self, reached: Tensor) -> None:
        """Point ``.grad`` of each parameter reached on some rank at its slice of the buffer (else ``None``)."""
        for p, o, n, r in zip(self.params, self.offsets, self.numels, reached.tolist()):
            p.grad = self.buffer[o : o + n].view_as(p) if r > 0 else None

    def remove_hooks(self) -> None:
        for handle in self.hooks:
            handle.remove()
        self.hooks = []


@dataclass
class Overlap:
    """One backward pass whose buckets are sent as soon as their gradients are complete."""

    exchange: Any
    index: dict[int, int]  # id(param) -> position in the layout
    pending: list[int]  # parameters still to come, per bucket
    done: list[bool]

    @classmethod
    def begin(cls, layout: Layout, exchange: Any) -> Overlap:
        layout.zero_gaps()
        pending = [0] * len(layout.buckets)
        for b in layout.param_bucket:
            pending[b] += 1
        return cls(exchange, {id(p): i for i, p in enumerate(layout.params)}, pending, [False] * len(layout.params))


def _blocks(
    offsets: list[int], numels: list[int], element_size: int, block_size_mb: Optional[float]
) -> list[tuple[int, int]]:
    spans = [(o, o + n) for o, n in zip(offsets, numels)]
    if block_size_mb is None:
        return spans
    cap = block_size_mb * 2**20 / element_size
    blocks: list[tuple[int, int]] = []
    for a, b in spans:
        if blocks and blocks[-1][1] - blocks[-1][0] < cap:
            blocks[-1] = (blocks[-1][0], b)
        else:
            blocks.append((a, b))
    return blocks
