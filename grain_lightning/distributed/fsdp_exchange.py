r"""FSDP2's reduce-scatter replaced by an all-to-all that keeps every rank's gradient shard (``grain_fsdp``).

FSDP2 (``torch.distributed.fsdp.fully_shard``) reduces each parameter group's gradients after its backward:
it lays the group's unsharded local gradients out as one flat ``(R * S,)`` input (piece ``r`` holds rank
``r``'s shard of every parameter, dim 0 padded to a multiple of ``R``), reduce-scatters it into an ``(S,)``
output, and points each sharded parameter's ``.grad`` (a DTensor) at its slice of that output.
:class:`AllToAllComm` is a custom reduce-scatter (``FSDPModule.set_custom_reduce_scatter``) that instead
starts an all-to-all (:meth:`CrossRankMinNorm.send_shards`): rank ``s`` receives shard ``s`` of every rank's
gradient, ``(R, S)``, with a reduce-scatter's bytes. The output handed to FSDP is row 0 of that receive
buffer, so the ``.grad`` views FSDP makes point into it; after the backward, the strategy writes its shard of
``d = sum_r w_r g_r`` over row 0 (:meth:`Piece.write`), and no other memory holds a gradient.

Memory per rank: the ``R`` received rows of every group, ``R`` gradient shards (``P``/``R`` each), kept
until the Gram of the whole backward is known; FSDP keeps one shard (its reduced ``.grad``). Extra:
``(R - 1)`` gradient shards.

Checked on torch 2.13 (CPU, gloo): the group's input is the raw local gradient once the gradient divide
factor is 1, unused parameters are included as zeros with ``set_reduce_scatter_unused_params(True)``, and
FSDP calls ``allocate`` for the input, then for the output, then the comm. This module reads ``FSDPParam``
attributes (``sharded_param``, ``sharded_size``, ``contiguous_sharded_stride``, ``padded_sharded_param_size``,
``to_sharded_dtensor``) and refuses layouts it was not checked on (``Shard(dim > 0)``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter

from grain_lightning.distributed.cross_rank import CrossRankMinNorm

__all__ = ["AllToAllComm", "Piece", "install"]


@dataclass
class Piece:
    """One parameter group's exchange in one backward: ``rows`` ``(R, S)`` once ``work`` is done."""

    comm: AllToAllComm
    recv: Tensor  # (R * S,): rank r's shard at [r S, (r + 1) S); row 0 is FSDP's output (the .grad views)
    send: Tensor
    work: Any

    @property
    def rows(self) -> Tensor:
        return self.recv.view(self.comm.world, -1)

    def wait(self) -> Tensor:
        if self.work is not None:
            self.work.wait()
            self.work, self.send = None, self.recv[:0]
        return self.rows

    def write(self, weights: Tensor, segments: list[tuple[int, int, int]]) -> None:
        """Combine the rows into row 0 (``d``'s shard) and point every parameter's ``.grad`` at its slice."""
        rows = self.wait()
        CrossRankMinNorm.combine_shard(rows, weights, segments, rows[0])
        self.comm.assign_grads(rows[0])


@dataclass
class AllToAllComm(ReduceScatter):
    """Custom reduce-scatter of one FSDP parameter group (see module docstring).

    ``pieces`` is shared by every group of one strategy: the exchanges of the current backward, in order.
    """

    aggregator: CrossRankMinNorm
    fsdp_params: list[Any]
    pieces: list[Piece] = field(default_factory=list)  # shared by every group of one strategy
    _buffer: Optional[Tensor] = None
    _input_numel: int = 0

    @property
    def world(self) -> int:
        return self.aggregator.world

    def trainable(self) -> list[Any]:
        return [fp for fp in self.fsdp_params if fp.sharded_param.requires_grad]

    def shard_numels(self) -> list[int]:
        return [math.prod(fp.padded_sharded_param_size) for fp in self.trainable()]

    def segments(self, first_block: Optional[int]) -> list[tuple[int, int, int]]:
        """``(block, start, end)`` of ``[0, S)``: one block, or (``first_block`` set: ``mode="blockwise"``) one
        block per trainable parameter, numbered from ``first_block``."""
        numels = self.shard_numels()
        if first_block is None:
            return [(0, 0, sum(numels))]
        out, start = [], 0
        for j, n in enumerate(numels):
            out.append((first_block + j, start, start + n))
            start += n
        return out

    def allocate(self, size: Sequence[Any], *, dtype: torch.dtype, device: torch.device) -> Tensor:
        numel = int(math.prod(size))
        if self._input_numel and numel * self.world == self._input_numel:  # FSDP's output: row 0 of the receive
            self._buffer = torch.empty(self._input_numel, dtype=dtype, device=device)
            self._input_numel = 0
            return self._buffer[:numel]
        self._input_numel = numel
        return torch.empty(numel, dtype=dtype, device=device)

    def __call__(
        self, output_tensor: Tensor, input_tensor: Tensor, group: Any, op: Any, async_op: bool = False
    ) -> Optional[Any]:
        expected = self.world * sum(self.shard_numels())
        if input_tensor.numel() != expected:
            raise RuntimeError(
                f"grain_fsdp: FSDP reduced {input_tensor.numel()} gradient numbers for a group whose trainable "
                f"parameters pad to {expected}; this FSDP layout is not supported"
            )
        buf = self._buffer
        recv = buf if buf is not None and buf.data_ptr() == output_tensor.data_ptr() else None
        self._buffer = None
        for earlier in self.pieces:  # one exchange in flight, as FSDP keeps one reduce-scatter input alive
            earlier.wait()
        recv, work = self.aggregator.send_shards(input_tensor, recv)
        self.pieces.append(Piece(self, recv, input_tensor, work))
        return None

    def local_piece(self) -> Piece:
        """One rank (no exchange, FSDP copies the gradient into ``.grad``): a :class:`Piece` of one row holding the
        trainable parameters' ``.grad`` (zeros where ``None``), as an exchange over one rank would."""
        if self.world != 1:
            raise RuntimeError(f"local_piece is for one rank; this group spans {self.world}")
        trainable, numels = self.trainable(), self.shard_numels()
        like = (trainable or self.fsdp_params)[0].sharded_param
        flat = torch.zeros(sum(numels), dtype=like.dtype, device=like.device)
        offset = 0
        for fp, n in zip(trainable, numels):
            grad = fp.sharded_param.grad
            if grad is not None:
                flat[offset : offset + n].view(fp.sharded_size).copy_(grad.to_local())
            offset += n
        return Piece(self, flat, flat[:0], None)

    def assign_grads(self, flat: Tensor) -> None:
        """``.grad`` of each trainable parameter: a sharded DTensor viewing its slice of ``flat`` ``(S,)``."""
        offset = 0
        for fp, n in zip(self.trainable(), self.shard_numels()):
            local = torch.as_strided(
                flat, fp.sharded_size, fp.contiguous_sharded_stride, flat.storage_offset() + offset
            )
            fp.sharded_param.grad = fp.to_sharded_dtensor(local)
            offset += n


def install(root: torch.nn.Module, aggregator: CrossRankMinNorm, pieces: list[Piece]) -> list[AllToAllComm]:
    """Give every FSDP parameter group under ``root`` an :class:`AllToAllComm`; returns them in order."""
    comms: list[AllToAllComm] = []
    for module in root.modules():
        if not isinstance(module, FSDPModule):
            continue
        groups = module._get_fsdp_state()._fsdp_param_groups
        if not groups:
            continue
        if len(groups) != 1:
            raise ValueError(f"grain_fsdp supports one FSDP parameter group per module, got {len(groups)}")
        fsdp_params = groups[0].fsdp_params
        for fp in fsdp_params:
            dim = getattr(fp.fsdp_placement, "dim", 0)
            if dim != 0:
                raise ValueError(f"grain_fsdp supports FSDP's Shard(0) placement only, got Shard({dim})")
        comm = AllToAllComm(aggregator, fsdp_params, pieces)
        module.set_custom_reduce_scatter(comm)
        module.set_gradient_divide_factor(1.0)  # the comm must see the raw local gradient
        module.set_reduce_scatter_unused_params(True, recurse=False)  # every rank sends every trainable parameter
        comms.append(comm)
    return comms
