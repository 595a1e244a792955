r"""``GrainDDPStrategy`` (``Trainer(strategy="grain_ddp")``): min-norm aggregation across data-parallel ranks.

DDP replaces the ranks' gradients ``g_1..g_R`` by their mean. This strategy replaces them by the min-norm
point of their convex hull, ``d = sum_r w*_r g_r`` with ``w* = argmin_{w in simplex} ||sum_r w_r g_r||^2``,
so that ``<d, g_r> >= ||d||^2 >= 0`` for every rank: no rank's batch loss goes up to first order. The
collectives are in :mod:`grain_lightning.cross_rank` (``mode="sharded"`` costs the bytes of a ring
all-reduce).

Design: the module is *not* wrapped in ``DistributedDataParallel``; its reducer would average the
gradients during backward. Every rank runs a plain local backward; when the backward is not inside
``block_backward_sync`` (Lightning's gradient accumulation, or the user's), post-accumulate-grad hooks
copy each finished gradient into one flat buffer and send each complete bucket's shards at once (as DDP
overlaps its all-reduce with the backward); after the backward the strategy finishes the combination
and points every ``.grad`` at its slice of ``d``: before ``on_after_backward``, clipping and the
optimizer step, as DDP's synchronised gradients would be. This is plain collectives, with no comm-hook
path, so it runs the same on gloo and NCCL.

With :class:`~grain_lightning.GrainMixin` (manual optimization), the mixin drives the step at the end of
each accumulation cycle (:meth:`GrainDDPStrategy.grain_mixin_step`):

- ``mixin_groups="hierarchical"``: each rank's vector is its own GRAIN direction ``d_r`` (min-norm over its
  groups); then ``d`` = min-norm over ``{d_r}``. Guarantee: ``<d, d_r> >= ||d||^2`` for every rank;
  nothing for a single group on another rank. Memory and bytes as plain ``grain_ddp``.
- ``mixin_groups="global"``: one min-norm problem over every group of every rank (exact: the update of
  single-process GRAIN over the union of the groups, ``<d, g_k> >= ||d||^2`` for every group ``k``).
  Each rank holds its ``k_r x P`` group gradients and sends ``k_r`` times the bytes.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies import _StrategyRegistry
from lightning.pytorch.overrides.distributed import _sync_module_states
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from grain_lightning.cross_rank import MODES, CommCounter, CrossRankMinNorm, CrossRankResult, blockwise_diagnostics
from grain_lightning.diagnostics import grain_diagnostics
from grain_lightning.mixin import GrainMixin

__all__ = ["GrainDDPStrategy"]

_CHOICES = {
    "mode": MODES,
    "mixin_groups": ("hierarchical", "global"),
    "on_nonfinite": ("raise", "skip"),
    "on_collapse": ("mean", "skip"),
}


@dataclass
class _Layout:
    """Flat layout of the trainable parameters: ``p`` occupies ``[offset, offset + numel)``.

    Consecutive parameters form communication buckets of about ``bucket_cap_mb``, each padded with zeros
    to a multiple of the world size (``gaps``).
    """

    params: list[Tensor]
    offsets: list[int]
    numels: list[int]
    length: int
    buckets: list[tuple[int, int]]
    param_bucket: list[int]
    gaps: list[tuple[int, int]]
    blocks: list[tuple[int, int]]
    buffer: Tensor  # (length,): local gradient in, combined gradient out; .grad are views of it
    hooks: list = field(default_factory=list)


@dataclass
class _Overlap:
    """One backward pass whose buckets are sent as soon as their gradients are complete."""

    exchange: Any
    index: dict[int, int]  # id(param) -> position in the layout
    pending: list[int]  # parameters still to come, per bucket
    done: list[bool]


class GrainDDPStrategy(DDPStrategy):
    """DDP with the min-norm combination of the ranks' gradients instead of their mean.

    Args:
        mode: ``"sharded"`` (default; all_to_all + small Gram all_reduce + all_gather: ring all-reduce
            bytes, about one extra gradient of memory), ``"allgather"`` (reference: all_gather every
            gradient, ``R`` gradients of memory) or ``"blockwise"`` (sharded, one min-norm problem per
            block).
        block_size_mb: ``"blockwise"`` only: ``None`` for one block per parameter tensor, else blocks of
            consecutive parameters of about this many MiB.
        bucket_cap_mb: communication buckets (``"sharded"``, ``"blockwise"``): consecutive parameters of
            about this many MiB, sent during the backward pass as soon as their gradients are complete
            (last bucket first), as DDP overlaps its all-reduce with the backward.
        mixin_groups: with :class:`~grain_lightning.GrainMixin`: ``"hierarchical"`` (one vector per rank:
            its own GRAIN direction) or ``"global"`` (every group of every rank; exact; ``k x P`` memory).
        on_nonfinite: a NaN/Inf gradient (or, with the mixin, loss) on any rank: every rank
            ``"raise"`` s ``FloatingPointError`` at the same step (default), or every rank ``"skip"`` s
            the step (all gradients set to ``None``, as when ``training_step`` returns ``None``).
        collapse_eps: the ranks' combination collapses when ``||d|| <= collapse_eps * ||mean||`` (0 is in
            the hull: no direction decreases every rank's loss).
        on_collapse: then use the plain mean (``"mean"``, DDP's update) or ``"skip"`` the step everywhere.
            With ``mixin_groups="global"`` the module's ``GrainConfig`` collapse options apply instead.
        solver_tol: min-norm solver KKT tolerance, relative to ``trace(G)``.
        log_every_n_steps: log ``grain_ddp/*`` diagnostics every this many combinations (0: never).
        broadcast_buffers: broadcast the module's buffers from rank 0 before every training step (as DDP).
        timeout: process-group timeout (shorten it in tests).
        start_method: ``"popen"`` (``grain_ddp``), ``"spawn"`` (``grain_ddp_spawn``), ``"fork"``.

    The other arguments are DDPStrategy's. Attributes ``comm`` (a :class:`~grain_lightning.cross_rank.
    CommCounter`: bytes this rank sent) and ``num_combines`` / ``skipped_steps`` count what happened.
    """

    supports_grain_mixin = True

    @property
    def needs_group_gradients(self) -> bool:
        """Read by GrainMixin: ``mixin_groups="global"`` needs every group's gradient, not only the Gram."""
        return self.mixin_groups == "global" and self.world_size > 1

    def __init__(
        self,
        mode: str = "sharded",
        *,
        block_size_mb: Optional[float] = None,
        bucket_cap_mb: float = 25.0,
        mixin_groups: str = "hierarchical",
        on_nonfinite: str = "raise",
        collapse_eps: float = 1e-3,
        on_collapse: str = "mean",
        solver_tol: float = 1e-12,
        log_every_n_steps: int = 1,
        broadcast_buffers: bool = True,
        accelerator: Optional[Any] = None,
        parallel_devices: Optional[list[torch.device]] = None,
        cluster_environment: Optional[ClusterEnvironment] = None,
        checkpoint_io: Optional[CheckpointIO] = None,
        precision_plugin: Optional[Precision] = None,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = default_pg_timeout,
        start_method: str = "popen",
    ) -> None:
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
        )
        for name, allowed in _CHOICES.items():
            value = locals()[name]
            if value not in allowed:
                raise ValueError(f"GrainDDPStrategy {name} must be one of {allowed}, got {value!r}")
        if not bucket_cap_mb > 0:
            raise ValueError(f"GrainDDPStrategy bucket_cap_mb must be > 0, got {bucket_cap_mb!r}")
        if block_size_mb is not None and not block_size_mb > 0:
            raise ValueError(f"GrainDDPStrategy block_size_mb must be > 0 or None, got {block_size_mb!r}")
        if not collapse_eps >= 0:
            raise ValueError(f"GrainDDPStrategy collapse_eps must be >= 0, got {collapse_eps!r}")
        if not isinstance(log_every_n_steps, int) or log_every_n_steps < 0:
            raise ValueError(f"GrainDDPStrategy log_every_n_steps must be an int >= 0, got {log_every_n_steps!r}")
        self.mode, self.block_size_mb, self.mixin_groups = mode, block_size_mb, mixin_groups
        self.bucket_cap_mb = bucket_cap_mb
        self.on_nonfinite, self.collapse_eps, self.on_collapse = on_nonfinite, collapse_eps, on_collapse
        self.solver_tol, self.log_every_n_steps, self.broadcast_buffers = solver_tol, log_every_n_steps, broadcast_buffers
        self.comm = CommCounter()
        self.num_combines = 0
        self.skipped_steps = 0
        self._sync_blocked = False
        self._collapsed = False
        self._aggregator: Optional[CrossRankMinNorm] = None
        self._layout: Optional[_Layout] = None
        self._overlap: Optional[_Overlap] = None

    # ------------------------------------------------------------------ registry
    @classmethod
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        """Register ``grain_ddp`` and its spawn/fork/notebook variants (names already taken are left alone)."""
        for name, start_method in (("grain_ddp", "popen"), ("grain_ddp_spawn", "spawn"),
                                   ("grain_ddp_fork", "fork"), ("grain_ddp_notebook", "fork")):
            if name not in strategy_registry:
                strategy_registry.register(
                    name, cls, description=f"GRAIN min-norm across DDP ranks, `start_method` '{start_method}'",
                    start_method=start_method,
                )

    # ------------------------------------------------------------------ set-up
    def configure_ddp(self) -> None:
        """Check that every rank has the same parameters, broadcast rank 0's state; no DDP wrapper."""
        if getattr(self.precision_plugin, "scaler", None) is not None:
            raise RuntimeError(
                "grain_ddp does not support fp16 loss scaling (precision='16-mixed' on GPU): a skipped step would "
                "never lower the scale. Use precision='bf16-mixed' or '32-true'"
            )
        if self.world_size > 1:
            self._check_same_parameters()
            _sync_module_states(self.model)
            self._aggregator = CrossRankMinNorm(self.mode, tol=self.solver_tol)
            self._aggregator.counter = self.comm
        self._layout = None

    def _check_same_parameters(self) -> None:
        mine = [(n, tuple(p.shape), str(p.dtype), p.requires_grad) for n, p in self.lightning_module.named_parameters()]
        every: list[Any] = [None] * self.world_size
        dist.all_gather_object(every, mine)
        for rank, theirs in enumerate(every):
            if theirs == every[0]:
                continue
            diff = next((f"#{i}: rank 0 has {a}, rank {rank} has {b}" for i, (a, b) in enumerate(zip(every[0], theirs))
                         if a != b), f"rank 0 has {len(every[0])} parameters, rank {rank} has {len(theirs)}")
            raise ValueError(
                f"grain_ddp needs the same parameters on every rank (name, shape, dtype, requires_grad); first "
                f"difference: {diff}"
            )

    @contextmanager
    def block_backward_sync(self) -> Iterator[None]:
        """Within this context, backward passes only accumulate local gradients (no communication)."""
        previous, self._sync_blocked = self._sync_blocked, True
        try:
            yield None
        finally:
            self._sync_blocked = previous

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        if self.broadcast_buffers and self.world_size > 1:
            self._broadcast_buffers()
        return super().training_step(*args, **kwargs)

    def _broadcast_buffers(self) -> None:
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for b in self.lightning_module.buffers():
            by_dtype.setdefault(b.dtype, []).append(b)
        for tensors in by_dtype.values():
            flat = torch.cat([t.reshape(-1) for t in tensors])
            self.comm.broadcast(flat, self.world_size, self.global_rank)
            offset = 0
            for t in tensors:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()

    def backward(self, closure_loss: Tensor, optimizer: Optional[Any], *args: Any, **kwargs: Any) -> Tensor:
        """Local backward, then (unless sync is blocked or the module uses GrainMixin) the combination."""
        module = self.lightning_module
        sync = not self._sync_blocked and self.world_size > 1 and not isinstance(module, GrainMixin)
        self.pre_backward(closure_loss)
        closure_loss = self.precision_plugin.pre_backward(closure_loss, module)
        if sync and self.mode != "allgather":
            self._begin_overlap(self._layout_for(self._trainable()))
        try:
            self.precision_plugin.backward(closure_loss, module, optimizer, *args, **kwargs)
            if sync:
                self.combine_gradients()
        finally:
            self._overlap = None
        closure_loss = self.precision_plugin.post_backward(closure_loss, module)
        self.post_backward(closure_loss)
        return closure_loss

    def teardown(self) -> None:
        self._drop_layout()
        self._aggregator = None
        super().teardown()

    # ------------------------------------------------------------------ the combination
    @property
    def bytes_sent(self) -> int:
        """Bytes this rank has sent in gradient combinations and buffer broadcasts (see ``cross_rank``)."""
        return self.comm.bytes_sent

    def _trainable(self) -> list[Tensor]:
        return [p for p in self.lightning_module.parameters() if p.requires_grad]

    def _layout_for(self, params: list[Tensor]) -> _Layout:
        layout = self._layout
        if layout is not None and len(layout.params) == len(params) and all(a is b for a, b in zip(layout.params, params)):
            return layout
        self._check_same_parameters()  # the trainable set changed (e.g. unfreezing): check it again
        if not params:
            raise ValueError("grain_ddp found no trainable parameters (requires_grad=True) to combine")
        dtypes = {p.dtype for p in params}
        if len(dtypes) != 1:
            raise ValueError(f"grain_ddp needs one dtype for all trainable parameters, got {sorted(map(str, dtypes))}")
        self._drop_layout()
        world, element = self.world_size, params[0].element_size()
        cap = self.bucket_cap_mb * 2 ** 20 / element
        offsets, param_bucket, buckets, gaps = [], [], [], []
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
        blocks = self._blocks(offsets, numels, element)
        assert self._aggregator is not None
        self._aggregator.set_blocks(blocks)
        self._aggregator.set_buckets(buckets)
        buffer = torch.zeros(position, dtype=params[0].dtype, device=params[0].device)
        layout = _Layout(params, offsets, numels, position, buckets, param_bucket, gaps, blocks, buffer)
        layout.hooks = [p.register_post_accumulate_grad_hook(self._gradient_ready) for p in params]
        self._layout = layout
        return layout

    def _drop_layout(self) -> None:
        if self._layout is not None:
            for handle in self._layout.hooks:
                handle.remove()
        self._layout, self._overlap = None, None

    def _begin_overlap(self, layout: _Layout) -> None:
        assert self._aggregator is not None
        for a, b in layout.gaps:
            layout.buffer[a:b].zero_()
        pending = [0] * len(layout.buckets)
        for b in layout.param_bucket:
            pending[b] += 1
        self._overlap = _Overlap(self._aggregator.start(layout.buffer.view(1, -1)),
                                 {id(p): i for i, p in enumerate(layout.params)}, pending, [False] * len(layout.params))

    def _gradient_ready(self, param: Tensor) -> None:
        """Post-accumulate-grad hook: copy the finished gradient into its bucket; send complete buckets."""
        ov, layout = self._overlap, self._layout
        if ov is None or layout is None:
            return
        i = ov.index.get(id(param))
        if i is None or ov.done[i]:
            return
        self._copy_in(layout, i)
        ov.done[i] = True
        b = layout.param_bucket[i]
        ov.pending[b] -= 1
        if ov.pending[b] == 0:
            assert self._aggregator is not None
            self._aggregator.ready(ov.exchange, b)

    def _blocks(self, offsets: list[int], numels: list[int], element_size: int) -> list[tuple[int, int]]:
        spans = [(o, o + n) for o, n in zip(offsets, numels)]
        if self.block_size_mb is None:
            return spans
        cap = self.block_size_mb * 2 ** 20 / element_size
        blocks: list[tuple[int, int]] = []
        for a, b in spans:
            if blocks and blocks[-1][1] - blocks[-1][0] < cap:
                blocks[-1] = (blocks[-1][0], b)
            else:
                blocks.append((a, b))
        return blocks

    def _copy_in(self, layout: _Layout, i: int) -> None:
        p, o, n = layout.params[i], layout.offsets[i], layout.numels[i]
        g, slot = p.grad, layout.buffer[o:o + n]
        if g is None:
            slot.zero_()
        elif g.is_sparse:
            raise ValueError(f"grain_ddp does not support sparse gradients (parameter of shape {tuple(p.shape)})")
        elif g.data_ptr() != slot.data_ptr():
            slot.copy_(g.reshape(-1))

    def _pack(self, layout: _Layout) -> list[bool]:
        """Copy the gradients not copied yet (all, without overlap) into the buffer; which ones exist."""
        done = self._overlap.done if self._overlap is not None else [False] * len(layout.params)
        for i, finished in enumerate(done):
            if not finished:
                self._copy_in(layout, i)
        if self._overlap is None:  # with overlap, _begin_overlap zeroed them (some buckets are in flight now)
            for a, b in layout.gaps:
                layout.buffer[a:b].zero_()
        return [p.grad is not None for p in layout.params]

    def _unpack(self, layout: _Layout, reached: Tensor) -> None:
        for p, o, n, r in zip(layout.params, layout.offsets, layout.numels, reached.tolist()):
            p.grad = layout.buffer[o:o + n].view_as(p) if r > 0 else None

    def combine_gradients(self, *, params: Optional[list[Tensor]] = None, invalid: bool = False,
                          skip: bool = False) -> bool:
        """Replace every rank's ``.grad`` by ``d``, the min-norm combination of the ranks' gradients.

        Args:
            params: parameters to combine (default: the module's trainable parameters), same on every rank.
            invalid: this rank has no valid gradient (e.g. a NaN loss): every rank takes ``on_nonfinite``.
            skip: this rank votes to skip the step: every rank skips.

        Returns:
            ``True`` when ``.grad`` holds ``d``; ``False`` when the step is skipped on every rank (``.grad``
            set to ``None``). Raises ``FloatingPointError`` on every rank for non-finite gradients with
            ``on_nonfinite="raise"``.
        """
        if self.world_size == 1:
            return not (invalid or skip)
        layout = self._layout_for(self._trainable() if params is None else params)
        has = self._pack(layout)
        world = self.world_size
        flags = torch.zeros(world + 1, dtype=torch.float64)  # [invalid, one-hot by rank | skip votes]
        flags[self.global_rank], flags[world] = float(invalid), float(skip)
        extras = torch.cat([flags, torch.tensor(has, dtype=torch.float64)])
        pi = torch.full((world,), 1.0 / world, dtype=torch.float64)

        def decide(gram: Tensor, weights: Tensor, ext: Tensor) -> Optional[Tensor]:
            if (ext[:world + 1] > 0).any():
                return None
            return self._collapse(gram, weights, pi, self.collapse_eps, self.on_collapse, 0.0)

        assert self._aggregator is not None
        if self._overlap is not None:
            exchange, self._overlap = self._overlap.exchange, None
            res = self._aggregator.finish(exchange, layout.buffer, extras=extras, decide=decide)
        else:
            res = self._aggregator.combine(layout.buffer.view(1, -1), layout.buffer, extras=extras, decide=decide)
        invalid_ranks = torch.nonzero(res.extras[:world]).reshape(-1).tolist()
        return self._finish(res, layout, res.extras[world + 1:], pi, [1] * world, invalid_ranks)

    def _collapse(self, gram: Tensor, weights: Tensor, pi: Tensor, eps: float, action: str, mix: float
                  ) -> Optional[Tensor]:
        d2 = float(torch.einsum("bi,bij,bj->", weights, gram, weights))
        m2 = float(torch.einsum("i,bij,j->", pi, gram, pi))
        self._collapsed = m2 > 0 and math.sqrt(max(d2, 0.0)) <= eps * math.sqrt(m2)
        if not self._collapsed:
            return weights
        if action == "skip":
            return None
        target = pi.expand_as(weights)
        return target.clone() if action == "mean" else (1.0 - mix) * weights + mix * target

    def _finish(self, res: CrossRankResult, layout: _Layout, reached: Tensor, pi: Tensor, counts: list[int],
                invalid: list[int]) -> bool:
        """Apply the outcome on this rank; every rank sees the same ``res`` and takes the same branch."""
        self.num_combines += 1
        if res.bad_ranks or invalid:
            what = (f"non-finite gradient on rank(s) {res.bad_ranks}" if res.bad_ranks
                    else f"non-finite loss on rank(s) {invalid}")
            self._nonfinite(what, layout)
            return False
        if res.weights is None:
            self._skip(layout)
            return False
        self._unpack(layout, reached)
        self._log(res, pi, counts)
        return True

    def _nonfinite(self, what: str, layout: _Layout) -> None:
        step = self.lightning_module.trainer.global_step if self.lightning_module._trainer is not None else -1
        msg = f"grain_ddp: {what} at global step {step}"
        if self.on_nonfinite == "raise":
            raise FloatingPointError(msg + "; every rank raises (GrainDDPStrategy(on_nonfinite='skip') skips such "
                                           "steps on every rank)")
        rank_zero_warn(msg + ": every rank skips this optimizer step", category=RuntimeWarning)
        self._skip(layout)

    def _skip(self, layout: _Layout) -> None:
        for p in layout.params:
            p.grad = None
        self.skipped_steps += 1

    def _log(self, res: CrossRankResult, pi: Tensor, counts: list[int]) -> None:
        every = self.log_every_n_steps
        module = self.lightning_module
        if not every or self.num_combines % every or module._trainer is None:
            return
        assert res.weights is not None
        if res.gram.shape[0] == 1:
            diag = grain_diagnostics(res.gram[0], res.weights[0], pi)
            diag["grain/kkt_gap"] = res.kkt_gap / max(float(torch.trace(res.gram[0])), 1e-300)
        else:
            diag = blockwise_diagnostics(res.gram, res.weights, pi)
        traces = torch.diagonal(res.gram, dim1=1, dim2=2).sum(1)
        avg = (traces[:, None] * res.weights).sum(0) / traces.sum() if float(traces.sum()) > 0 else res.weights.mean(0)
        out = {k.replace("grain/", "grain_ddp/"): v for k, v in diag.items()}
        start = 0
        for rank, c in enumerate(counts):
            out[f"grain_ddp/weight_rank{rank}"] = float(avg[start:start + c].sum())
            start += c
        out["grain_ddp/collapsed"] = float(getattr(self, "_collapsed", False))
        out["grain_ddp/skipped_steps"] = float(self.skipped_steps)
        module.log_dict(out, on_step=True, on_epoch=False, batch_size=1)

    # ------------------------------------------------------------------ GrainMixin
    def grain_mixin_step(self, module: GrainMixin, opts: list) -> None:
        """End of a GrainMixin accumulation cycle under ``world_size > 1``: combine across ranks and step."""
        st, cfg = module._grain, module.grain_config
        params = module._grain_params(opts)
        if self.mixin_groups == "global" and cfg.aggregation == "grain":
            ok = self._combine_groups(module, params)
        else:
            vote_skip = False
            if not st.skip_cycle and cfg.aggregation == "grain":
                vote_skip = not module._grain_set_direction(opts) and not st.skip_cycle
            ok = self.combine_gradients(params=params, invalid=st.skip_cycle, skip=vote_skip)
        if ok:
            module._grain_apply(opts)
        else:
            module._grain_skip()

    def _combine_groups(self, module: GrainMixin, params: list[Tensor]) -> bool:
        """``mixin_groups="global"``: one min-norm problem over every group of every rank."""
        st, cfg = module._grain, module.grain_config
        layout = self._layout_for(params)
        assert self._aggregator is not None
        invalid = st.skip_cycle or st.buffer is None
        k_r = 0 if invalid else st.buffer.num_groups
        table = self._aggregator.exchange_counts([k_r, int(invalid)])
        bad = torch.nonzero(table[:, 1]).reshape(-1).tolist()
        if bad:
            self.num_combines += 1
            self._nonfinite(f"non-finite loss on rank(s) {bad}", layout)
            return False
        counts = table[:, 0].tolist()
        rows = torch.zeros(k_r, layout.length, dtype=layout.buffer.dtype, device=layout.buffer.device)
        for g, o, n in zip(st.buffer.grads, layout.offsets, layout.numels):
            rows[:, o:o + n] = g.reshape(k_r, n)
        start = sum(counts[:self.global_rank])
        pi_local = torch.cat(st.fractions).double().cpu()
        pi_slot = torch.zeros(sum(counts), dtype=torch.float64)
        pi_slot[start:start + k_r] = pi_local / pi_local.sum() / self.world_size
        reached = torch.tensor([float(r) for r in st.buffer.reached], dtype=torch.float64)
        extras = torch.cat([reached, pi_slot])
        n_params = len(layout.params)

        def decide(gram: Tensor, weights: Tensor, ext: Tensor) -> Optional[Tensor]:
            return self._collapse(gram, weights, ext[n_params:], cfg.collapse_eps, cfg.on_collapse, cfg.collapse_mix)

        res = self._aggregator.combine(rows, layout.buffer, counts=counts, extras=extras, decide=decide)
        del rows
        return self._finish(res, layout, res.extras[:n_params], res.extras[n_params:], counts, [])


def _register(registry: _StrategyRegistry = StrategyRegistry) -> None:
    GrainDDPStrategy.register_strategies(registry)


_register()
