r"""Exact min-norm combination of gradients held by different ranks, at all-reduce communication cost.

Rank ``r`` of ``R`` holds ``k_r`` flat gradient rows (one per rank for plain data parallelism, or one per
group), all of length ``P`` (padded to ``R * S``). With ``K = sum_r k_r`` rows ``g_1..g_K`` in all::

    G   = [<g_i, g_j>]                       (K x K, float64)
    w*  = argmin_{w in simplex} w^T G w      (grain_lightning.solver)
    d   = sum_i w*_i g_i                     (every rank ends with the same d, bit for bit)

Modes (``mode=``):

``"sharded"`` (default): ``all_to_all`` of gradient shards, so that rank ``r`` holds shard ``r`` (``S``
numbers) of every row (per bucket, when buckets are set: piece ``r`` of every bucket, each bucket sent
as soon as it is complete, see :meth:`CrossRankMinNorm.start`); a partial ``K x K`` Gram on that shard;
``all_reduce`` of the partial Grams; every rank solves the same problem from the same reduced Gram; each
combines its shard with the weights; ``all_gather`` of the combined shards. Bytes sent per rank for ``k_r = 1``:
``(R-1)/R P`` (all_to_all) ``+ (R-1)/R P`` (all_gather) ``= 2 (R-1)/R P`` elements, the volume of a ring
all-reduce, plus ``R^2`` float64 for the Gram. Parameters are identical on every rank *by construction*:
each shard of ``d`` is computed by exactly one rank and then copied everywhere.

``"allgather"`` (reference): ``all_gather`` of every row; every rank computes the full Gram and ``d``.
Sends ``(R-1) k P`` elements and holds ``K P``; ranks agree because identical inputs go through the
same deterministic kernels.

``"blockwise"``: as ``"sharded"``, but one ``K x K`` problem per block of the flat gradient (a
parameter, or a bucket of consecutive parameters): ``d_b = sum_i w*_{b,i} g_{i,b}``. Since
``<d_b, g_{i,b}> >= ||d_b||^2`` for every block, summing gives ``<d, g_i> >= ||d||^2 >= 0`` as well.

Output left sharded (``grain_fsdp``, :meth:`CrossRankMinNorm.send_shards` / :meth:`~CrossRankMinNorm.solve_shards` /
:meth:`~CrossRankMinNorm.combine_shard`): as ``"sharded"`` without the final all_gather: each rank keeps only
its shard of ``d``. Bytes per rank: ``(R-1)/R P`` (a reduce-scatter's volume) plus the ``R^2`` Gram.

The all-gathers run as ``all_gather_into_tensor`` on NCCL and as direct sends and receives on other
backends (the same bytes; gloo's all-gather is several times slower than its sends). Bytes are counted by
:class:`~grain_lightning.distributed.collectives.CommCounter`. The weights come from the step policy
(``decide``); this module only moves and multiplies numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from grain_lightning.config import PolicyOptions
from grain_lightning.distributed.collectives import CommCounter, Exchange
from grain_lightning.policy import Decision, StepPolicy

__all__ = ["CrossRankMinNorm", "CrossRankResult", "Decide", "MODES"]

#: ``decide(gram, extras_sum)``: the step policy's :class:`~grain_lightning.policy.Decision` for the reduced
#: ``(B, K, K)`` Gram, or ``None`` to skip without solving (e.g. a rank voted to skip).
Decide = Callable[[torch.Tensor, torch.Tensor], Optional[Decision]]

MODES = ("sharded", "allgather", "blockwise")
_CHUNK = 1 << 16  # columns per Gram product summed in float64


@dataclass
class CrossRankResult:
    """Outcome of :meth:`CrossRankMinNorm.combine`.

    Attributes:
        gram: ``(B, K, K)`` float64 Grams (``B`` blocks; ``B = 1`` unless blockwise), identical on every rank.
        weights: ``(B, K)`` float64 min-norm weights (``None`` when the Gram is not finite).
        extras: the ``extras`` vectors of all ranks, summed (float64).
        bad_ranks: ranks whose rows made the Gram non-finite (NaN/Inf gradients), empty if none.
        decision: the step policy's decision (``None`` when the Gram is not finite or ``decide`` skipped
            without solving).

    ``weights is None`` with ``bad_ranks`` empty means that the decision is to skip: ``out`` is untouched.
    """

    gram: torch.Tensor
    weights: Optional[torch.Tensor]
    extras: torch.Tensor
    bad_ranks: list[int]
    decision: Optional[Decision] = None

    @property
    def solved(self) -> Optional[torch.Tensor]:
        """``(B, K)`` weights from the solver, before collapse handling (``None`` when not solved)."""
        return None if self.decision is None else self.decision.solved

    @property
    def kkt_gap(self) -> float:
        """Largest solver KKT gap over the blocks, in the units of ``G`` (0 when not solved)."""
        return 0.0 if self.decision is None else self.decision.kkt_gap


class CrossRankMinNorm:
    """Min-norm combination of rows spread over the ranks of a process group (see module docstring).

    Args:
        mode: ``"sharded"``, ``"allgather"`` or ``"blockwise"``.
        blocks: for ``"blockwise"``, ``[(start, end), ...]`` covering ``[0, P)`` of the flat gradient.
        tol: solver KKT tolerance relative to ``trace(G)``, for calls without ``decide`` (plain min-norm
            weights, no collapse handling).
        group: process group (default: the world).
    """

    def __init__(
        self,
        mode: str = "sharded",
        blocks: Optional[Sequence[tuple[int, int]]] = None,
        tol: float = 1e-12,
        group: Optional[Any] = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode, self.group = mode, group
        self.policy = StepPolicy(PolicyOptions(solver_tol=tol, warm_start=False), owner="cross_rank")
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self._nccl = dist.get_backend(group) == "nccl"  # NCCL: collectives on CUDA tensors only
        self.counter = CommCounter()
        self.blocks: Optional[list[tuple[int, int]]] = None
        self.buckets: Optional[list[tuple[int, int]]] = None
        self._recv: dict[int, torch.Tensor] = {}
        self.set_blocks(blocks)

    def set_blocks(self, blocks: Optional[Sequence[tuple[int, int]]]) -> None:
        """Set the block boundaries (flat coordinates) used by ``mode="blockwise"``."""
        self.blocks = None if blocks is None else [(int(a), int(b)) for a, b in blocks]

    def set_buckets(self, buckets: Optional[Sequence[tuple[int, int]]]) -> None:
        """Communication buckets ``[(start, end), ...]`` (ascending, disjoint, lengths divisible by ``R``).

        Rank ``r`` owns the ``r``-th of the ``R`` equal pieces of every bucket. Buckets are exchanged in
        descending order (the order in which a backward pass finishes them), the same on every rank.
        ``None``: one bucket, the whole row.
        """
        if buckets is not None:
            buckets = [(int(a), int(b)) for a, b in buckets]
            for a, b in buckets:
                if b <= a or (b - a) % self.world:
                    raise ValueError(f"bucket ({a}, {b}) must be non-empty with a length divisible by {self.world}")
        self.buckets, self._recv = buckets, {}

    def padded_length(self, numel: int) -> int:
        """``R * S`` with ``S = ceil(numel / R)``: the row length :meth:`combine` expects."""
        return self.world * max(1, math.ceil(numel / self.world))

    # ------------------------------------------------------------------ helpers
    def _block_list(self, length: int) -> list[tuple[int, int]]:
        if self.mode != "blockwise":
            return [(0, length)]
        if not self.blocks:
            raise ValueError("mode='blockwise' needs block boundaries (set_blocks)")
        return self.blocks

    def _segments(self, blocks: list[tuple[int, int]], lo: int, hi: int) -> list[tuple[int, int, int]]:
        """``(block, start, end)`` pieces of ``[lo, hi)``, in local coordinates (minus ``lo``)."""
        out = []
        for b, (a, e) in enumerate(blocks):
            s, t = max(a, lo), min(e, hi)
            if s < t:
                out.append((b, s - lo, t - lo))
        return out

    @staticmethod
    def _partial_gram(rows: torch.Tensor, segments, num_blocks: int) -> torch.Tensor:
        """``(B, K, K)`` float64 Gram of the ``(K, n)`` ``rows`` restricted to each block's segments.

        Products of ``_CHUNK`` columns run in the rows' dtype (float32 at least) and are summed in
        float64: the rounding error of a chunk is that of a float32 dot product of ``_CHUNK`` terms
        (relative ``~1e-7 * sqrt(_CHUNK)`` at worst, far less in practice), without converting the shard.
        """
        k = rows.shape[0]
        gram = torch.zeros(num_blocks, k, k, dtype=torch.float64, device=rows.device)
        low = rows.dtype in (torch.float16, torch.bfloat16)
        for b, s, e in segments:
            for c in range(s, e, _CHUNK):
                x = rows[:, c : min(e, c + _CHUNK)]
                x = x.float() if low else x
                gram[b] += (x @ x.T).double()
        return gram

    @staticmethod
    def _combine_rows(rows: torch.Tensor, weights: torch.Tensor, segments, out: torch.Tensor) -> None:
        """``out[s:e] = sum_i w_{b,i} rows[i, s:e]`` per segment, in the rows' dtype (float32 at least)."""
        w = weights.tolist()
        for b, s, e in segments:
            if rows.dtype in (torch.float16, torch.bfloat16):
                acc = rows[:, s:e].float().T @ torch.tensor(w[b], device=rows.device)
                out[s:e] = acc.to(out.dtype)
                continue
            target = out[s:e]
            torch.mul(rows[0, s:e], w[b][0], out=target)
            for i in range(1, rows.shape[0]):
                target.add_(rows[i, s:e], alpha=w[b][i])

    @staticmethod
    def _bad_rows(gram: torch.Tensor) -> list[int]:
        diag = torch.diagonal(gram, dim1=1, dim2=2)
        return sorted(set(torch.nonzero(~torch.isfinite(diag).all(0)).reshape(-1).tolist()))

    # ------------------------------------------------------------------ public API
    def exchange_counts(self, values: Sequence[int]) -> torch.Tensor:
        """``(R, m)`` int64 table of every rank's ``values`` (row counts, flags), via one all_gather."""
        device = torch.device("cuda", torch.cuda.current_device()) if self._nccl else torch.device("cpu")
        mine = torch.tensor(list(values), dtype=torch.int64, device=device)
        out = torch.empty(self.world * mine.numel(), dtype=torch.int64, device=device)
        self.counter.all_gather(out, mine, self.world, self.group)
        return out.view(self.world, -1).cpu()

    def start(self, rows: torch.Tensor, counts: Optional[Sequence[int]] = None) -> Exchange:
        """Begin a sharded combination of ``rows``; buckets are sent as :meth:`ready` marks them complete.

        ``rows`` may still be filled in after this call, bucket by bucket, before each is marked ready.
        """
        if self.mode == "allgather":
            raise ValueError("start/ready/finish are for the sharded modes; use combine() with mode='allgather'")
        k_r, length = rows.shape
        counts = self._check_rows(rows, counts)
        buckets = self.buckets if self.buckets is not None else [(0, length)]
        if buckets[-1][1] > length:
            raise ValueError(f"buckets end at {buckets[-1][1]} beyond the row length {length}")
        return Exchange(rows, counts, buckets)

    def ready(self, ex: Exchange, bucket: int) -> None:
        """Mark ``bucket`` complete in ``rows``; send every complete bucket whose turn has come."""
        ex.complete[bucket] = True
        while ex.next < len(ex.buckets) and ex.complete[len(ex.buckets) - 1 - ex.next]:
            self._send_bucket(ex, len(ex.buckets) - 1 - ex.next)
            ex.next += 1

    def _send_bucket(self, ex: Exchange, b: int) -> None:
        world = self.world
        a, e = ex.buckets[b]
        shard = (e - a) // world
        k_r = ex.rows.shape[0]
        piece = ex.rows[:, a:e]
        send = piece.reshape(-1) if k_r == 1 else piece.reshape(k_r, world, shard).transpose(0, 1).contiguous()
        recv = self._receive_buffer(b, sum(ex.counts) * shard, ex.rows)
        self.counter.add("all_to_all", (world - 1) * k_r * shard * ex.rows.element_size())
        work = dist.all_to_all_single(
            recv,
            send.reshape(-1),
            [c * shard for c in ex.counts],
            [k_r * shard] * world,
            group=self.group,
            async_op=True,
        )
        ex.sent.append((b, recv, send, work))

    def _receive_buffer(self, bucket: int, numel: int, like: torch.Tensor) -> torch.Tensor:
        """Receive buffer of ``bucket``, kept from step to step (as DDP keeps its buckets)."""
        buf = self._recv.get(bucket)
        if buf is None or buf.numel() != numel or buf.dtype != like.dtype or buf.device != like.device:
            buf = self._recv[bucket] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buf

    def finish(
        self, ex: Exchange, out: torch.Tensor, extras: Optional[torch.Tensor] = None, decide: Optional[Decide] = None
    ) -> CrossRankResult:
        """Send the remaining buckets, then Gram, solve and combine as :meth:`combine` does."""
        for b in range(len(ex.buckets)):
            if not ex.complete[b]:
                self.ready(ex, b)
        world, rank = self.world, self.rank
        k = sum(ex.counts)
        length = ex.rows.shape[1]
        blocks = self._block_list(length)
        gram = torch.zeros(len(blocks), k, k, dtype=torch.float64, device=ex.rows.device)
        pieces, order = [], list(ex.sent)
        for b, recv, _send, work in ex.sent:
            work.wait()
            a, e = ex.buckets[b]
            shard = (e - a) // world
            lo = a + rank * shard
            segments = self._segments(blocks, lo, lo + shard)
            shard_rows = recv.view(k, shard)
            gram += self._partial_gram(shard_rows, segments, len(blocks))
            pieces.append((lo, shard, shard_rows, segments))
        ex.sent.clear()
        extras = self._extras(extras)
        packed = torch.cat([gram.reshape(-1), extras.to(gram.device)])
        self.counter.all_reduce(packed, world, self.group)
        n = gram.numel()
        gram, extras_sum = packed[:n].view_as(gram).cpu(), packed[n:].cpu()
        result = self._decide(gram, extras_sum, ex.counts, decide)
        if result.weights is None:
            return result
        works = []
        for (lo, shard, shard_rows, segments), (b, *_rest) in zip(pieces, order):
            # this rank's pieces of rows were sent already; each bucket leaves as soon as it is combined
            self._combine_rows(shard_rows, result.weights, segments, out[lo : lo + shard])
            works += self._exchange_pieces(out, [ex.buckets[b]], wait=False)
        for work in works:
            work.wait()
        return result

    # ------------------------------------------------------------------ output left sharded (grain_fsdp)
    def send_shards(self, piece: torch.Tensor, recv: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Any]:
        """Start the all-to-all of this rank's ``(R * S,)`` ``piece`` (one gradient row, ``R`` pieces of ``S``).

        Rank ``s`` receives piece ``s`` of every rank's row: ``recv.view(R, S)[r]`` is rank ``r``'s. This is a
        reduce-scatter's volume (``(R-1) S`` elements sent). Returns ``(recv, work)``; wait on ``work``.
        """
        world = self.world
        if piece.dim() != 1 or piece.numel() % world:
            raise ValueError(f"piece must be flat with a length divisible by {world}, got shape {tuple(piece.shape)}")
        recv = torch.empty_like(piece) if recv is None else recv
        self.counter.add("all_to_all", (world - 1) * piece.numel() // world * piece.element_size())
        return recv, dist.all_to_all_single(recv, piece, group=self.group, async_op=True)

    def solve_shards(
        self,
        shards: Sequence[tuple[torch.Tensor, list[tuple[int, int, int]]]],
        num_blocks: int,
        extras: Optional[torch.Tensor] = None,
        decide: Optional[Decide] = None,
        counts: Optional[Sequence[int]] = None,
    ) -> CrossRankResult:
        """Gram and decision from shards received by :meth:`send_shards`, without gathering anything.

        ``shards``: ``(rows, segments)`` per piece, ``rows`` the ``(K, S)`` received rows (``K = R``: the
        ``(R, S)`` view of one exchange; ``counts``: ``k_r`` rows of each rank, rank 0's first, e.g. one per
        group) and ``segments`` ``[(block, start, end), ...]`` of ``[0, S)``. Each rank adds its partial
        ``(B, K, K)`` Gram; one all-reduce of ``B K^2`` numbers (plus ``extras``) gives every rank the same Gram
        and decision.
        """
        counts = [1] * self.world if counts is None else [int(c) for c in counts]
        k = sum(counts)
        gram = torch.zeros(num_blocks, k, k, dtype=torch.float64)
        for rows, segments in shards:
            gram += self._partial_gram(rows, segments, num_blocks).to(gram.device)
        extras = self._extras(extras)
        packed = torch.cat([gram.reshape(-1), extras])
        device = torch.device("cuda", torch.cuda.current_device()) if self._nccl else torch.device("cpu")
        packed = packed.to(device)
        self.counter.all_reduce(packed, self.world, self.group)
        packed = packed.cpu()
        n = gram.numel()
        return self._decide(packed[:n].view_as(gram), packed[n:], counts, decide)

    @classmethod
    def combine_shard(
        cls, rows: torch.Tensor, weights: torch.Tensor, segments: list[tuple[int, int, int]], out: torch.Tensor
    ) -> None:
        """``out[s:e] = sum_i w_{b,i} rows[i, s:e]`` per segment; ``out`` may be ``rows[0]`` (read first)."""
        cls._combine_rows(rows, weights, segments, out)

    def all_reduce(self, values: torch.Tensor) -> torch.Tensor:
        """Sum of a small float64 vector over the ranks (counted), on the CPU."""
        device = torch.device("cuda", torch.cuda.current_device()) if self._nccl else torch.device("cpu")
        packed = values.detach().double().reshape(-1).to(device)
        self.counter.all_reduce(packed, self.world, self.group)
        return packed.cpu()

    def combine(
        self,
        rows: torch.Tensor,
        out: torch.Tensor,
        counts: Optional[Sequence[int]] = None,
        extras: Optional[torch.Tensor] = None,
        decide: Optional[Decide] = None,
    ) -> CrossRankResult:
        """Combine the rows of every rank with min-norm weights; write ``d`` into ``out`` on every rank.

        Args:
            rows: ``(k_r, L)`` rows of this rank, ``L = padded_length(P)`` (pad with zeros).
            out: ``(L,)`` tensor receiving ``d`` (may share memory with ``rows`` when ``k_r = 1``; it is
                written only after ``rows`` has been sent). Left unspecified when the Gram is not finite.
            counts: ``k_r`` of every rank (default: ``k_r`` is the same on every rank).
            extras: small float vector summed over the ranks alongside the Gram (flags, masks).
            decide: ``decide(gram, extras_sum)`` returns the step policy's decision (its ``(B, K)`` weights, or
                none to skip), or ``None`` to skip without solving; it sees the same inputs on every rank, so
                every rank decides alike. Default: plain min-norm weights with uniform mean weights.

        Rows are numbered rank by rank: rank 0's rows first.
        """
        if self.mode != "allgather":
            return self.finish(self.start(rows, counts), out, extras, decide)
        counts = self._check_rows(rows, counts)
        length = rows.shape[1]
        blocks = self._block_list(length)
        gram, extras_sum, gathered = self._gram_allgather(rows, counts, blocks, self._extras(extras))
        result = self._decide(gram, extras_sum, counts, decide)
        if result.weights is not None:
            self._combine_rows(gathered, result.weights, self._segments(blocks, 0, length), out)
        return result

    def _check_rows(self, rows: torch.Tensor, counts: Optional[Sequence[int]]) -> list[int]:
        world, rank = self.world, self.rank
        k_r, length = rows.shape
        if length % world:
            raise ValueError(f"rows must have a length divisible by the world size {world}, got {length}")
        counts = [k_r] * world if counts is None else [int(c) for c in counts]
        if len(counts) != world or counts[rank] != k_r:
            raise ValueError(f"counts {counts} do not match {k_r} rows on rank {rank} of {world}")
        return counts

    @staticmethod
    def _extras(extras: Optional[torch.Tensor]) -> torch.Tensor:
        return torch.zeros(0, dtype=torch.float64) if extras is None else extras.detach().double().reshape(-1).cpu()

    def _decide(
        self, gram: torch.Tensor, extras_sum: torch.Tensor, counts: list[int], decide: Optional[Decide]
    ) -> CrossRankResult:
        bad_rows = self._bad_rows(gram)
        if bad_rows:
            starts = torch.cumsum(torch.tensor([0] + counts), 0).tolist()
            bad_ranks = sorted({next(r for r in range(self.world) if starts[r] <= i < starts[r + 1]) for i in bad_rows})
            return CrossRankResult(gram, None, extras_sum, bad_ranks)
        if decide is None:
            decision: Optional[Decision] = self.policy.min_norm(gram)
        else:
            decision = decide(gram, extras_sum)
        weights = None if decision is None else decision.weights
        return CrossRankResult(gram, weights, extras_sum, [], decision)

    def _exchange_pieces(self, out: torch.Tensor, buckets: list[tuple[int, int]], wait: bool = True) -> list:
        """All-gather in place: every rank's piece of every bucket of ``out`` to every rank.

        With ``wait=False`` the operations are left running and their works are returned.

        NCCL: ``all_gather_into_tensor`` per bucket. Other backends: direct sends and receives of the
        pieces (the same ``(R-1)`` pieces per rank; gloo's all-gather runs several times slower here).
        """
        world, rank = self.world, self.rank
        ops, works = [], []
        for a, e in buckets:
            shard = (e - a) // world
            mine = out[a + rank * shard : a + (rank + 1) * shard]
            self.counter.add("all_gather", (world - 1) * mine.numel() * mine.element_size())
            if self._nccl:
                works.append(dist.all_gather_into_tensor(out[a:e], mine, group=self.group, async_op=True))
                continue
            for peer in range(world):
                if peer != rank:
                    dst = dist.get_global_rank(self.group, peer) if self.group else peer
                    ops.append(dist.P2POp(dist.isend, mine, dst, self.group))
                    ops.append(dist.P2POp(dist.irecv, out[a + peer * shard : a + (peer + 1) * shard], dst, self.group))
        if ops:
            works += dist.batch_isend_irecv(ops)
        if wait:
            for work in works:
                work.wait()
            return []
        return works

    def _gram_allgather(self, rows, counts, blocks, extras):
        world = self.world
        k_r, length = rows.shape
        k_max = max(counts)
        if k_r < k_max:
            rows = torch.cat([rows, rows.new_zeros(k_max - k_r, length)])
        slot = k_max * length
        out = torch.empty(world * slot, dtype=rows.dtype, device=rows.device)
        out[self.rank * slot : (self.rank + 1) * slot] = rows.reshape(-1)
        self._exchange_pieces(out, [(0, world * slot)])
        out = out.view(world, k_max, length)
        gathered = (
            out.reshape(world * k_max, length)
            if min(counts) == k_max
            else torch.cat([out[r, :c] for r, c in enumerate(counts)])
        )
        gram = self._partial_gram(gathered, self._segments(blocks, 0, length), len(blocks)).cpu()
        if extras.numel():
            extras = extras.to(rows.device)
            self.counter.all_reduce(extras, world, self.group)
        return gram, extras.cpu(), gathered
