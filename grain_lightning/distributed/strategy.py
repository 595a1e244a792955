r"""``GrainDDPStrategy`` (``Trainer(strategy="grain_ddp")``): min-norm aggregation across data-parallel ranks.

DDP replaces the ranks' gradients ``g_1..g_R`` by their mean. This strategy replaces them by the min-norm
point of their convex hull, ``d = sum_r w*_r g_r`` with ``w* = argmin_{w in simplex} ||sum_r w_r g_r||^2``,
so that ``<d, g_r> >= ||d||^2 >= 0`` for every rank: no rank's batch loss goes up to first order. The
collectives are in :mod:`grain_lightning.distributed.cross_rank` (``mode="sharded"`` costs the bytes of a
ring all-reduce), the flat buffer in :mod:`~grain_lightning.distributed.layout`, and every decision (solve,
collapse, non-finite, diagnostics) is the step policy's (:mod:`grain_lightning.policy`).

Design: the module is *not* wrapped in ``DistributedDataParallel``; its reducer would average the
gradients during backward. Every rank runs a plain local backward; when the backward is not inside
``block_backward_sync`` (Lightning's gradient accumulation, or the user's), post-accumulate-grad hooks
copy each finished gradient into one flat buffer and send each complete bucket's shards at once (as DDP
overlaps its all-reduce with the backward); after the backward the strategy finishes the combination
and points every ``.grad`` at its slice of ``d``: before ``on_after_backward``, clipping and the
optimizer step, as DDP's synchronised gradients would be. This is plain collectives, with no comm-hook
path, so it runs the same on gloo and NCCL.

With :class:`~grain_lightning.GrainMixin` (manual optimization), the mixin hands each accumulation cycle to
:meth:`GrainDDPStrategy.combine_mixin_cycle` (the interface in :mod:`grain_lightning.protocol`) and steps
itself:

- ``mixin_groups="hierarchical"``: each rank's vector is its own GRAIN direction ``d_r`` (min-norm over its
  groups); then ``d`` = min-norm over ``{d_r}``. Guarantee: ``<d, d_r> >= ||d||^2`` for every rank;
  nothing for a single group on another rank. Memory and bytes as plain ``grain_ddp``.
- ``mixin_groups="global"``: one min-norm problem over every group of every rank (exact: the update of
  single-process GRAIN over the union of the groups, ``<d, g_k> >= ||d||^2`` for every group ``k``).
  Each rank holds its ``k_r x P`` group gradients and sends ``k_r`` times the bytes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Literal, Optional

import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.strategies import _StrategyRegistry
from lightning.pytorch.overrides.distributed import _sync_module_states
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from grain_lightning.config import check_choices
from grain_lightning.diagnostics import log_diagnostics
from grain_lightning.distributed.collectives import CommCounter
from grain_lightning.distributed.cross_rank import MODES, CrossRankMinNorm, CrossRankResult
from grain_lightning.distributed.fault_hooks import FaultHooks
from grain_lightning.distributed.faults import (
    DEFAULT_FAULT_TIMEOUT,
    FaultMonitor,
    check_end_of_data,
    check_fault_timeout,
    end_of_data_slots,
    on_every_rank,
    raised_on_every_rank,
)
from grain_lightning.distributed.layout import Layout, Overlap
from grain_lightning.policy import Decision, StepPolicy
from grain_lightning.protocol import GrainModule, MixinCycle

__all__ = ["GrainDDPStrategy"]

_CHOICES = {"mode": MODES, "mixin_groups": ("hierarchical", "global")}


class GrainDDPStrategy(FaultHooks, DDPStrategy):
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
        collapse_eps, on_collapse, collapse_mix, solver_tol, warm_start, step_norm, log_every_n_steps: the
            step-policy options (:class:`~grain_lightning.config.PolicyOptions`: same names, values and checks
            as ``GrainConfig``) for the combination of the ranks; ``on_collapse="mean"`` is DDP's update and
            ``step_norm="mean"`` gives the min-norm direction the length of DDP's (per block with
            ``mode="blockwise"``). With ``mixin_groups="global"`` the module's ``GrainConfig`` solver, collapse
            and step-norm options apply instead (its policy decides over all groups). The warm start reuses the
            last step's rank weights. The ``grain_ddp/*`` diagnostics reach the loggers every
            ``log_every_n_steps`` combinations, whatever the Trainer's ``log_every_n_steps``.
        broadcast_buffers: broadcast the module's buffers from rank 0 before every training step (as DDP).
        fault_timeout: seconds a rank waits in a collective for the other ranks (the process-group timeout;
            default 300, Lightning's is 1800). An exception on one rank is posted to the other ranks, which stop
            with :class:`~grain_lightning.distributed.faults.RankFailedError` quoting it as soon as the failing
            process exits, and after this long if it stays alive; a hung or killed rank stops the others after
            this long too. Raise it if rank 0 alone can take longer (e.g. writing a large checkpoint).
        timeout: Lightning's name for the same, as a ``timedelta`` (give one of the two).
        start_method: ``"popen"`` (``grain_ddp``), ``"spawn"`` (``grain_ddp_spawn``), ``"fork"``.

    The other arguments are DDPStrategy's. Attributes ``comm`` (a
    :class:`~grain_lightning.distributed.collectives.CommCounter`: bytes this rank sent), ``num_combines``
    and ``skipped_steps`` count what happened.
    """

    supports_grain_mixin = True
    #: the ranks are combined after the mixin wrote each rank's direction into ``.grad`` (see protocol.py)
    combines_in_backward = False

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
        collapse_mix: float = 0.5,
        solver_tol: float = 1e-12,
        warm_start: bool = True,
        step_norm: str = "grain",
        log_every_n_steps: int = 1,
        broadcast_buffers: bool = True,
        accelerator: Optional[Any] = None,
        parallel_devices: Optional[list[torch.device]] = None,
        cluster_environment: Optional[ClusterEnvironment] = None,
        checkpoint_io: Optional[CheckpointIO] = None,
        precision_plugin: Optional[Precision] = None,
        process_group_backend: Optional[str] = None,
        fault_timeout: Optional[float] = None,
        timeout: Optional[timedelta] = None,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
    ) -> None:
        owner = "GrainDDPStrategy"
        if fault_timeout is not None and timeout is not None:
            raise ValueError(f"{owner}: give fault_timeout (seconds) or timeout (a timedelta), not both")
        given = timeout if timeout is not None else fault_timeout
        seconds = check_fault_timeout(owner, DEFAULT_FAULT_TIMEOUT if given is None else given)
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timedelta(seconds=seconds),
            start_method=start_method,
        )
        check_choices(owner, {"mode": mode, "mixin_groups": mixin_groups}, _CHOICES)
        if not bucket_cap_mb > 0:
            raise ValueError(f"{owner}: bucket_cap_mb must be > 0, got {bucket_cap_mb!r}")
        if block_size_mb is not None and not block_size_mb > 0:
            raise ValueError(f"{owner}: block_size_mb must be > 0 or None, got {block_size_mb!r}")
        self.policy = StepPolicy.across_ranks(
            owner,
            "grain_ddp",
            dict(
                on_nonfinite=on_nonfinite,
                collapse_eps=collapse_eps,
                on_collapse=on_collapse,
                collapse_mix=collapse_mix,
                solver_tol=solver_tol,
                warm_start=warm_start,
                step_norm=step_norm,
                log_every_n_steps=log_every_n_steps,
            ),
            rank_zero_warn,
        )
        self.mode, self.block_size_mb, self.mixin_groups = mode, block_size_mb, mixin_groups
        self.bucket_cap_mb, self.broadcast_buffers = bucket_cap_mb, broadcast_buffers
        self.comm = CommCounter()
        self.faults = FaultMonitor(seconds, owner="grain_ddp")  # grain_lightning.distributed.faults
        self._counts_checked_epoch = -1
        self.num_combines = 0
        self._sync_blocked = False
        self._aggregator: Optional[CrossRankMinNorm] = None
        self._layout: Optional[Layout] = None
        self._overlap: Optional[Overlap] = None

    # ------------------------------------------------------------------ options, counters
    @property
    def needs_group_gradients(self) -> bool:
        """``mixin_groups="global"`` with several ranks: :meth:`combine_mixin_cycle` needs the group gradients."""
        return self.mixin_groups == "global" and self.world_size > 1

    @property
    def skipped_steps(self) -> int:
        """Steps skipped on every rank (non-finite values, or a collapse with ``on_collapse="skip"``)."""
        return self.policy.skipped

    @property
    def on_nonfinite(self) -> str:
        return self.policy.options.on_nonfinite

    @property
    def collapse_eps(self) -> float:
        return self.policy.options.collapse_eps

    @property
    def on_collapse(self) -> str:
        return self.policy.options.on_collapse

    @property
    def solver_tol(self) -> float:
        return self.policy.options.solver_tol

    @property
    def step_norm(self) -> str:
        return self.policy.options.step_norm

    @property
    def log_every_n_steps(self) -> int:
        return self.policy.options.log_every_n_steps

    @property
    def fault_timeout(self) -> float:
        """Seconds a rank waits in a collective for the others (the process-group timeout)."""
        return self.faults.timeout_s

    @property
    def bytes_sent(self) -> int:
        """Bytes this rank has sent in gradient combinations and buffer broadcasts."""
        return self.comm.bytes_sent

    # ------------------------------------------------------------------ registry
    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        """Register ``grain_ddp`` and its spawn/fork/notebook variants (names already taken are left alone)."""
        for name, start_method in (
            ("grain_ddp", "popen"),
            ("grain_ddp_spawn", "spawn"),
            ("grain_ddp_fork", "fork"),
            ("grain_ddp_notebook", "fork"),
        ):
            if name not in strategy_registry:
                strategy_registry.register(
                    name,
                    cls,
                    description=f"GRAIN min-norm across DDP ranks, `start_method` '{start_method}'",
                    start_method=start_method,
                )

    # ------------------------------------------------------------------ set-up, faults (distributed/faults.py)
    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        self.faults.start()  # a watchdog that reads the errors other ranks post

    def _end_of_data(self) -> tuple[bool, int]:
        """(this rank's training data end with the current batch, batches so far this epoch)."""
        module = self.lightning_module
        if module is None or module._trainer is None or not module.trainer.training:
            return False, 0
        trainer = module.trainer
        progress = trainer.fit_loop.epoch_loop.batch_progress
        batches, total = progress.current.ready, trainer.num_training_batches
        return bool(progress.is_last_batch) or batches >= total, batches

    @override
    def configure_ddp(self) -> None:
        """Check that every rank has the same parameters, broadcast rank 0's state; no DDP wrapper."""
        if getattr(self.precision_plugin, "scaler", None) is not None:
            raise RuntimeError(
                "grain_ddp does not support fp16 loss scaling (precision='16-mixed' on GPU): a skipped step would "
                "never lower the scale. Use precision='bf16-mixed' or '32-true'"
            )
        if self.world_size > 1:
            with self.faults.collective():
                self._check_same_parameters()
            assert self.model is not None
            _sync_module_states(self.model)
            self._aggregator = CrossRankMinNorm(self.mode, tol=self.policy.options.solver_tol)
            self._aggregator.counter = self.comm
        self._layout = None

    def _check_same_parameters(self) -> None:
        mine = [(n, tuple(p.shape), str(p.dtype), p.requires_grad) for n, p in self._module().named_parameters()]
        every: list[Any] = [None] * self.world_size
        dist.all_gather_object(every, mine)
        for rank, theirs in enumerate(every):
            if theirs == every[0]:
                continue
            diff = next(
                (
                    f"#{i}: rank 0 has {a}, rank {rank} has {b}"
                    for i, (a, b) in enumerate(zip(every[0], theirs))
                    if a != b
                ),
                f"rank 0 has {len(every[0])} parameters, rank {rank} has {len(theirs)}",
            )
            raise on_every_rank(  # every rank sees the same table and raises here: nothing to post
                ValueError(
                    f"grain_ddp needs the same parameters on every rank (name, shape, dtype, requires_grad); first "
                    f"difference: {diff}"
                )
            )

    @contextmanager
    @override
    def block_backward_sync(self) -> Iterator[None]:
        """Within this context, backward passes only accumulate local gradients (no communication)."""
        previous, self._sync_blocked = self._sync_blocked, True
        try:
            yield None
        finally:
            self._sync_blocked = previous

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        if self.broadcast_buffers and self.world_size > 1:
            with self.faults.collective():
                self._broadcast_buffers()
        return super().training_step(*args, **kwargs)

    def _broadcast_buffers(self) -> None:
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for b in self._module().buffers():
            by_dtype.setdefault(b.dtype, []).append(b)
        for tensors in by_dtype.values():
            flat = torch.cat([t.reshape(-1) for t in tensors])
            self.comm.broadcast(flat, self.world_size, self.global_rank)
            offset = 0
            for t in tensors:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()

    @override
    def backward(self, closure_loss: Tensor, optimizer: Optional[Any], *args: Any, **kwargs: Any) -> Tensor:
        """Local backward, then (unless sync is blocked) the combination of the ranks' gradients."""
        module = self._module()
        # a GrainModule combines its ranks once per cycle (combine_mixin_cycle), never in its backward passes
        sync = not self._sync_blocked and self.world_size > 1 and not isinstance(module, GrainModule)
        self.pre_backward(closure_loss)
        closure_loss = self.precision_plugin.pre_backward(closure_loss, module)
        if sync and self.mode != "allgather":
            self._begin_overlap(self._layout_for(self._trainable()))
        try:
            with self.faults.collective():
                self.precision_plugin.backward(closure_loss, module, optimizer, *args, **kwargs)
                if sync:
                    self.combine_gradients()
        finally:
            self._overlap = None
        closure_loss = self.precision_plugin.post_backward(closure_loss, module)
        self.post_backward(closure_loss)
        return closure_loss

    @override
    def teardown(self) -> None:
        self.faults.stop()
        self._drop_layout()
        self._aggregator = None
        super().teardown()

    # ------------------------------------------------------------------ the flat buffer
    def _module(self) -> Any:
        module = self.lightning_module
        if module is None:
            raise RuntimeError("grain_ddp has no LightningModule attached (call it from within a fit)")
        return module

    def _trainable(self) -> list[Tensor]:
        return [p for p in self._module().parameters() if p.requires_grad]

    def _layout_for(self, params: list[Tensor]) -> Layout:
        if self._layout is not None and self._layout.matches(params):
            return self._layout
        self._check_same_parameters()  # the trainable set changed (e.g. unfreezing): check it again
        self._drop_layout()
        layout = Layout.build(params, self.world_size, self.bucket_cap_mb, self.block_size_mb)
        assert self._aggregator is not None
        self._aggregator.set_blocks(layout.blocks)
        self._aggregator.set_buckets(layout.buckets)
        layout.hooks = [p.register_post_accumulate_grad_hook(self._gradient_ready) for p in params]
        self._layout = layout
        return layout

    def _drop_layout(self) -> None:
        if self._layout is not None:
            self._layout.remove_hooks()
        self._layout, self._overlap = None, None

    def _begin_overlap(self, layout: Layout) -> None:
        assert self._aggregator is not None
        self._overlap = Overlap.begin(layout, self._aggregator.start(layout.buffer.view(1, -1)))

    def _gradient_ready(self, param: Tensor) -> None:
        """Post-accumulate-grad hook: copy the finished gradient into its bucket; send complete buckets."""
        ov, layout = self._overlap, self._layout
        if ov is None or layout is None:
            return
        i = ov.index.get(id(param))
        if i is None or ov.done[i]:
            return
        layout.copy_in(i)
        ov.done[i] = True
        b = layout.param_bucket[i]
        ov.pending[b] -= 1
        if ov.pending[b] == 0:
            assert self._aggregator is not None
            self._aggregator.ready(ov.exchange, b)

    def _pack(self, layout: Layout) -> list[bool]:
        """Copy the gradients not copied yet (all, without overlap) into the buffer; which ones exist."""
        done = self._overlap.done if self._overlap is not None else [False] * len(layout.params)
        for i, finished in enumerate(done):
            if not finished:
                layout.copy_in(i)
        if self._overlap is None:  # with overlap, Overlap.begin zeroed them (some buckets are in flight now)
            layout.zero_gaps()
        return [p.grad is not None for p in layout.params]

    # ------------------------------------------------------------------ the combination
    def combine_gradients(
        self, *, params: Optional[list[Tensor]] = None, invalid: bool = False, skip: bool = False
    ) -> bool:
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
        # + [data end here | batches so far], one-hot by rank: unequal batch counts found at no extra round trip
        ends = end_of_data_slots(world, self.global_rank, *self._end_of_data())
        extras = torch.cat([flags, ends, torch.tensor(has, dtype=torch.float64)])
        pi = torch.full((world,), 1.0 / world, dtype=torch.float64)
        ranks = torch.arange(world)

        def decide(gram: Tensor, ext: Tensor) -> Optional[Decision]:
            if (ext[: world + 1] > 0).any():
                return None
            return self.policy.decide(gram, pi, keys=ranks)

        assert self._aggregator is not None
        if self._overlap is not None:
            exchange, self._overlap = self._overlap.exchange, None
            res = self._aggregator.finish(exchange, layout.buffer, extras=extras, decide=decide)
        else:
            res = self._aggregator.combine(layout.buffer.view(1, -1), layout.buffer, extras=extras, decide=decide)
        check_end_of_data(res.extras[world + 1 : 3 * world + 1], world)
        invalid_ranks = torch.nonzero(res.extras[:world]).reshape(-1).tolist()
        return self._finish(res, layout, res.extras[3 * world + 1 :], pi, [1] * world, invalid_ranks, self.policy)

    def _finish(
        self,
        res: CrossRankResult,
        layout: Layout,
        reached: Tensor,
        pi: Tensor,
        counts: list[int],
        invalid: list[int],
        policy: StepPolicy,
    ) -> bool:
        """Apply the outcome on this rank; every rank sees the same ``res`` and takes the same branch."""
        self.num_combines += 1
        if res.bad_ranks or invalid:
            what = (
                f"non-finite gradient on rank(s) {res.bad_ranks}"
                if res.bad_ranks
                else f"non-finite loss on rank(s) {invalid}"
            )
            with raised_on_every_rank():
                self.policy.nonfinite(what, self._global_step())
            self._skip(layout)
            return False
        if res.weights is None:
            self._skip(layout)
            return False
        layout.unpack(reached)
        if res.decision is not None:
            self._log(res, res.decision, pi, counts, policy)
        self.policy.record_step()
        return True

    def _global_step(self) -> int:
        module = self.lightning_module
        return module.trainer.global_step if module is not None and module._trainer is not None else -1

    def _skip(self, layout: Layout) -> None:
        for p in layout.params:
            p.grad = None
        self.policy.record_skip()

    def _log(self, res: CrossRankResult, decision: Decision, pi: Tensor, counts: list[int], policy: StepPolicy) -> None:
        module = self.lightning_module
        if not self.policy.log_now or module is None or module._trainer is None:
            return
        diag = policy.diagnostics(res.gram, decision, pi)
        traces = torch.diagonal(res.gram, dim1=1, dim2=2).sum(1)
        w = decision.solved.reshape(res.gram.shape[0], -1)
        avg = (traces[:, None] * w).sum(0) / traces.sum() if float(traces.sum()) > 0 else w.mean(0)
        out = {k.replace("grain/", "grain_ddp/"): v for k, v in diag.items()}
        start = 0
        for rank, c in enumerate(counts):
            out[f"grain_ddp/weight_rank{rank}"] = float(avg[start : start + c].sum())
            start += c
        out["grain_ddp/skipped_steps"] = float(self.skipped_steps)
        log_diagnostics(module, out)

    # ------------------------------------------------------------------ GrainMixin (grain_lightning.protocol)
    def combine_mixin_cycle(self, cycle: MixinCycle) -> bool:
        """End of a GrainMixin accumulation cycle: combine the ranks into ``.grad``; ``False``: every rank skips.

        Hierarchical (``cycle.policy is None``): ``.grad`` holds this rank's own direction; the ranks' directions
        are combined as plain ``grain_ddp`` combines gradients. Global (``cycle.policy`` set, on every rank, even
        one whose cycle is invalid): one min-norm problem over every group of every rank, decided by the
        module's step policy (its solver tolerance and collapse options).
        """
        if self.world_size == 1:
            return not (cycle.invalid or cycle.vote_skip)
        with self.faults.collective():
            if cycle.policy is None:
                return self.combine_gradients(params=cycle.params, invalid=cycle.invalid, skip=cycle.vote_skip)
            return self._combine_groups(cycle)

    def _combine_groups(self, cycle: MixinCycle) -> bool:
        """``mixin_groups="global"``: one min-norm problem over every group of every rank."""
        layout = self._layout_for(cycle.params)
        assert self._aggregator is not None and cycle.policy is not None
        grads = cycle.group_gradients
        invalid = cycle.invalid or grads is None or cycle.mean_weights is None
        k_r = grads.num_groups if grads is not None and not invalid else 0
        last, batches = self._end_of_data()
        table = self._aggregator.exchange_counts([k_r, int(invalid), int(last), batches])
        check_end_of_data(torch.cat([table[:, 2], table[:, 3]]).double(), self.world_size)
        bad = torch.nonzero(table[:, 1]).reshape(-1).tolist()
        if bad:
            self.num_combines += 1
            with raised_on_every_rank():
                self.policy.nonfinite(f"non-finite loss on rank(s) {bad}", self._global_step())
            self._skip(layout)
            return False
        assert grads is not None and cycle.mean_weights is not None
        counts = table[:, 0].tolist()
        rows = torch.zeros(k_r, layout.length, dtype=layout.buffer.dtype, device=layout.buffer.device)
        for g, o, n in zip(grads.grads, layout.offsets, layout.numels):
            rows[:, o : o + n] = g.reshape(k_r, n)
        start = sum(counts[: self.global_rank])
        pi_local = cycle.mean_weights.double().cpu()
        pi_slot = torch.zeros(sum(counts), dtype=torch.float64)
        pi_slot[start : start + k_r] = pi_local / pi_local.sum() / self.world_size
        reached = torch.tensor([float(r) for r in grads.reached], dtype=torch.float64)
        extras = torch.cat([reached, pi_slot])
        n_params = len(layout.params)
        policy = cycle.policy

        def decide(gram: Tensor, ext: Tensor) -> Optional[Decision]:
            return policy.decide(gram, ext[n_params:])

        res = self._aggregator.combine(rows, layout.buffer, counts=counts, extras=extras, decide=decide)
        del rows
        return self._finish(res, layout, res.extras[:n_params], res.extras[n_params:], counts, [], policy)


def register_grain_ddp(registry: _StrategyRegistry = StrategyRegistry) -> None:
    """Register the ``grain_ddp`` names in ``registry`` (done on import; names already taken are left alone)."""
    GrainDDPStrategy.register_strategies(registry)


register_grain_ddp()
