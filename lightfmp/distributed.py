"""Light-FMP's stages under data parallelism: work done once on rank 0, its outcome shared with every rank.

Each rank of a DDP run executes the whole ``lightfmp`` command (Lightning's launcher re-runs it per process):
the fits run on every rank, while file writes and the prune decision happen once, on rank 0. The helpers here
use the default process group that the first DDP fit initialised and do nothing special without one (one
process, or a stage that runs before any fit).

* :func:`on_rank_zero` runs a function on rank 0 and broadcasts whether it succeeded: the other ranks wait for
  it and, when it failed, raise an error quoting rank 0's (instead of hanging in their next collective until
  the process-group timeout);
* :func:`broadcast` sends one picklable object from rank 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional, TypeVar

import torch.distributed as dist

__all__ = ["RankZeroFailed", "broadcast", "is_rank_zero", "on_rank_zero", "rank", "world_size"]

T = TypeVar("T")


class RankZeroFailed(RuntimeError):
    """Raised on ranks > 0 when the work rank 0 did for every rank failed."""


def _initialised() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Ranks in the default process group (1 without one)."""
    return dist.get_world_size() if _initialised() else 1


def rank() -> int:
    """This process's rank in the default process group (0 without one)."""
    return dist.get_rank() if _initialised() else 0


def is_rank_zero() -> bool:
    return rank() == 0


def broadcast(obj: Any) -> Any:
    """``obj`` of rank 0 on every rank (one ``broadcast_object_list``); ``obj`` itself without a process group."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_rank_zero(fn: Callable[[], T], what: str) -> Optional[T]:
    """``fn()`` on rank 0 only; every rank returns once it has finished (``fn``'s result on rank 0, None on the
    others). When ``fn`` raises, rank 0 re-raises it and the others raise :class:`RankZeroFailed` naming ``what``
    and quoting the error. Without a process group it is just ``fn()``."""
    if world_size() == 1:
        return fn()
    result: Optional[T] = None
    failure: Optional[BaseException] = None
    if dist.get_rank() == 0:
        try:
            result = fn()
        except BaseException as e:  # shared with the other ranks first, then re-raised
            failure = e
    message = broadcast(None if failure is None else f"{type(failure).__name__}: {failure}")
    if failure is not None:
        raise failure
    if message is not None:
        raise RankZeroFailed(f"rank 0 failed in {what}: {message}")
    return result
