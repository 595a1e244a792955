r"""Collectives of the cross-rank combination, with the bytes each rank sends counted.

Bytes are counted per collective from the sizes passed and the standard algorithms: ring all-reduce
``2 (R-1)/R n``, ring all-gather ``(R-1) n_in``, all-to-all the parts sent to other ranks, broadcast
``(R-1) n`` from the source.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist

__all__ = ["CommCounter", "Exchange"]


class CommCounter:
    """Bytes this rank sends, by collective, under the algorithms named in the module docstring."""

    def __init__(self) -> None:
        self.bytes_sent = 0
        self.calls: dict[str, int] = {}

    def add(self, op: str, nbytes: float) -> None:
        self.bytes_sent += int(round(nbytes))
        self.calls[op] = self.calls.get(op, 0) + 1

    def all_reduce(self, t: torch.Tensor, world: int, group: Optional[Any] = None) -> None:
        self.add("all_reduce", 2 * (world - 1) / world * t.numel() * t.element_size())
        dist.all_reduce(t, group=group)

    def all_gather(self, out: torch.Tensor, t: torch.Tensor, world: int, group: Optional[Any] = None) -> None:
        self.add("all_gather", (world - 1) * t.numel() * t.element_size())
        dist.all_gather_single(out, t, group=group)

    def broadcast(self, t: torch.Tensor, world: int, rank: int, src: int = 0, group: Optional[Any] = None) -> None:
        self.add("broadcast", (world - 1) * t.numel() * t.element_size() if rank == src else 0)
        dist.broadcast(t, src=src, group=group)


@dataclass
class Exchange:
    """State of one sharded combination: buckets complete, sent, and their received pieces."""

    rows: torch.Tensor
    counts: list[int]
    buckets: list[tuple[int, int]]
    complete: list[bool] = field(default_factory=list)
    sent: list[Any] = field(default_factory=list)
    next: int = 0  # buckets sent so far, in descending order

    def __post_init__(self) -> None:
        self.complete = [False] * len(self.buckets)
