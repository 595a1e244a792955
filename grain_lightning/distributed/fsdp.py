r"""``GrainFSDPStrategy`` (``Trainer(strategy="grain_fsdp")``): min-norm across fully sharded (FSDP2) ranks.

FSDP reduce-scatters the ranks' gradients ``g_1..g_R`` so that each rank holds its shard of their mean.
This strategy gives each rank its shard of their min-norm combination ``d = sum_r w*_r g_r``,
``w* = argmin_{w in simplex} ||sum_r w_r g_r||^2``, so that ``<d, g_r> >= ||d||^2 >= 0`` for every rank,
and no full gradient is gathered anywhere:

1. the module is sharded with ``fully_shard`` (FSDP2): every module of a ``wrap`` class (default: each
   element of an ``nn.ModuleList``, i.e. transformer blocks), then every top-level child (the root);
2. where FSDP would reduce-scatter a parameter group's gradients, an all-to-all gives rank ``s`` shard ``s``
   of every rank's gradient (``(R, S)``; a reduce-scatter's bytes, :mod:`~grain_lightning.distributed.fsdp_exchange`);
3. after the backward each rank adds its partial ``R x R`` Gram over its shards; one all-reduce of ``R^2``
   numbers (``B R^2`` blockwise); every rank's step policy (:mod:`grain_lightning.policy`) decides alike;
4. each rank writes its shard of ``d`` into the sharded parameters' ``.grad`` (DTensors).

With :class:`~grain_lightning.GrainMixin` (hierarchical): the mixin's one-backward engine computes its
within-rank Gram with FSDP's gradient sync off (layer inputs and output gradients only), decides its weights
``w*`` and hands over ``sum_j w*_j L_j`` (:meth:`combine_mixin_cycle`); that loss's backward is reduced by FSDP,
unit by unit, into step 2 above, so each rank's direction ``d_r`` enters as a plain gradient would. Where that
is not the step (``mixin_groups="global"``, ``engine="reference"``, accumulation over micro-batches, a
self-checked step, ``GrainConfig(blockwise=True)``), :meth:`exchange_group_losses` runs one backward per group
instead: each group's gradient goes through step 2, rank ``s`` keeps shard ``s`` of every (rank, group) gradient,
the ``K x K`` Gram over all ``K`` groups comes from the shards (one all-reduce; per parameter tensor, ``F K^2``
numbers, block-wise) and the module's policy decides over all groups (global) or each rank's over its own, then
this strategy's over the ranks' directions (hierarchical), per module with ``blockwise=True``; ``k`` times a
reduce-scatter's bytes and about ``k`` gradients of memory per rank for ``k`` groups per rank. Faults as
``grain_ddp``'s (:mod:`grain_lightning.distributed.faults`).

Cost per step over FSDP: ``R^2`` float64 all-reduced; ``(R - 1)`` gradient shards of memory until the end of
the backward; the Gram (``R^2 P / R`` multiply-adds per rank). Clipping (``gradient_clip_val``) of the
DTensor ``.grad`` computes ``||d||`` from the shards (an all-reduce of the squared shard norms).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
import torch.distributed as dist
from lightning.fabric.strategies import _StrategyRegistry
from lightning.fabric.utilities.init import _materialize_distributed_module
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.overrides.distributed import _sync_module_states
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from typing_extensions import override

from grain_lightning.config import check_choices
from grain_lightning.diagnostics import log_diagnostics
from grain_lightning.distributed.collectives import CommCounter
from grain_lightning.distributed.cross_rank import CrossRankMinNorm
from grain_lightning.distributed.fault_hooks import FaultHooks
from grain_lightning.distributed.faults import (
    DEFAULT_FAULT_TIMEOUT,
    FaultMonitor,
    check_fault_timeout,
    on_every_rank,
    raised_on_every_rank,
)
from grain_lightning.distributed.fsdp_exchange import AllToAllComm, Piece, install
from grain_lightning.policy import Decision, StepPolicy
from grain_lightning.protocol import MixinCycle

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["GrainFSDPStrategy"]

FSDP_MODES = ("sharded", "blockwise")
Wrap = Union[None, str, type, Sequence[Union[str, type]]]


class GrainFSDPStrategy(FaultHooks, ModelParallelStrategy):
    """FSDP2 with each rank's shard of the min-norm combination of the ranks' gradients (module docstring).

    Args:
        mode: ``"sharded"`` (one min-norm problem over the whole gradient) or ``"blockwise"`` (one per
            parameter tensor: ``<d_b, g_{r,b}> >= ||d_b||^2`` per block). ``"allgather"`` (grain_ddp's reference
            mode) gathers full gradients and is refused.
        wrap: module classes (types or class names) each given its own FSDP unit; ``None`` (default): the
            classes of the elements of every ``nn.ModuleList`` (transformer blocks). Every top-level child of
            the LightningModule is then sharded as a root. Modules already sharded in ``configure_model``
            (``fully_shard``) are kept as they are; nothing is wrapped twice.
        reshard_after_forward: FSDP2's option (free the unsharded parameters after the forward).
        on_nonfinite: a NaN/Inf gradient on any rank: every rank ``"raise"`` s ``FloatingPointError`` (default)
            or ``"skip"`` s the step (``.grad`` set to ``None``).
        collapse_eps, on_collapse, collapse_mix, solver_tol, warm_start, step_norm, log_every_n_steps: the
            step-policy options (:class:`~grain_lightning.config.PolicyOptions`), as for ``grain_ddp``;
            ``on_collapse="mean"`` is FSDP's update. ``grain_fsdp/*`` diagnostics are logged every
            ``log_every_n_steps`` combinations.
        save_distributed_checkpoint: ``True`` (default): a sharded ``torch.distributed.checkpoint`` folder,
            loadable at another world size; ``False``: one full file written by rank 0 (ModelParallelStrategy's).
        fault_timeout: seconds a rank waits in a collective for the other ranks (the process-group timeout;
            default 300). As for ``grain_ddp`` (:mod:`~grain_lightning.distributed.faults`): an exception on one
            rank is posted to the others, which stop with ``RankFailedError`` quoting it; unequal batch counts
            raise ``UnequalBatchesError`` on every rank when training starts.
        timeout: Lightning's name for the same, as a ``timedelta`` (give one of the two).
        process_group_backend: as for Lightning's ``ModelParallelStrategy``.

        mixin_groups: with :class:`~grain_lightning.GrainMixin`: ``"hierarchical"`` (default): each rank's
            vector is its own GRAIN direction ``d_r = sum_j w*_j g_j`` (within-rank groups, the module's step policy),
            formed by one weighted backward that FSDP reduces to shards; then the min-norm over the ``d_r`` as for
            plain gradients. ``"global"`` (as grain_ddp's): one min-norm problem over every group of every rank,
            decided by the module's step policy; every group's gradient is exchanged as shards
            (:meth:`exchange_group_losses`: ``k`` backwards and ``k`` times a reduce-scatter's bytes for ``k``
            groups per rank).

    :class:`~grain_lightning.GrainMixin` with ``GrainConfig(blockwise=True)`` (one min-norm problem per module):
    every group goes through :meth:`exchange_group_losses` and :meth:`_combine_groups` solves each module from the
    ``(F, K, K)`` per-parameter Gram of the shards (hierarchical: grain_ddp's update; global: single-process
    block-wise GRAIN over every group of every rank).
    Attributes ``comm`` (bytes this rank sent in combinations), ``num_combines`` and ``skipped_steps`` count
    what happened.
    """

    supports_grain_mixin = True
    #: the mixin hands over the loss of each rank's direction; its backward reduces to shards (see protocol.py)
    combines_in_backward = True

    def __init__(
        self,
        mode: str = "sharded",
        *,
        wrap: Wrap = None,
        reshard_after_forward: bool = True,
        on_nonfinite: str = "raise",
        collapse_eps: float = 1e-3,
        on_collapse: str = "mean",
        collapse_mix: float = 0.5,
        solver_tol: float = 1e-12,
        warm_start: bool = True,
        step_norm: str = "grain",
        log_every_n_steps: int = 1,
        mixin_groups: str = "hierarchical",
        save_distributed_checkpoint: bool = True,
        process_group_backend: Optional[str] = None,
        fault_timeout: Optional[float] = None,
        timeout: Optional[timedelta] = None,
    ) -> None:
        owner = "GrainFSDPStrategy"
        if fault_timeout is not None and timeout is not None:
            raise ValueError(f"{owner}: give fault_timeout (seconds) or timeout (a timedelta), not both")
        given = timeout if timeout is not None else fault_timeout
        seconds = check_fault_timeout(owner, DEFAULT_FAULT_TIMEOUT if given is None else given)
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timedelta(seconds=seconds),
        )
        if mode == "allgather":
            raise ValueError(
                f"{owner}: mode='allgather' gathers every rank's full gradient, which FSDP exists to avoid; use "
                "mode='sharded' or 'blockwise' (or grain_ddp's mode='allgather' as a reference)"
            )
        check_choices(owner, {"mode": mode}, {"mode": FSDP_MODES})
        check_choices(owner, {"mixin_groups": mixin_groups}, {"mixin_groups": ("hierarchical", "global")})
        self.mixin_groups = mixin_groups
        self.policy = StepPolicy.across_ranks(
            owner,
            "grain_fsdp",
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
        self.mode, self.wrap, self.reshard_after_forward = mode, _wrap_names(wrap), reshard_after_forward
        self.comm = CommCounter()
        self.faults = FaultMonitor(seconds, owner="grain_fsdp")  # grain_lightning.distributed.faults
        self._counts_checked_epoch = -1
        self.num_combines = 0
        self._sync_blocked = False
        self._aggregator: Optional[CrossRankMinNorm] = None
        self._comms: list[AllToAllComm] = []
        self._pieces: list[Piece] = []
        self._cycle_flags: Optional[tuple[bool, bool]] = None  # (invalid, vote_skip) of this rank's mixin cycle
        self._groups: list[_GroupBackward] = []  # GrainMixin groups exchanged one backward each, this cycle
        self._combined = True

    # ------------------------------------------------------------------ counters
    @property
    def skipped_steps(self) -> int:
        """Steps skipped on every rank (non-finite gradients, or a collapse with ``on_collapse="skip"``)."""
        return self.policy.skipped

    @property
    def needs_group_gradients(self) -> bool:
        """``mixin_groups="global"`` with several ranks: every group's gradient is exchanged
        (:meth:`exchange_group_losses`)."""
        return self.mixin_groups == "global" and self.world_size > 1

    @property
    def fault_timeout(self) -> float:
        """Seconds a rank waits in a collective for the others (the process-group timeout)."""
        return self.faults.timeout_s

    @property
    def bytes_sent(self) -> int:
        """Bytes this rank has sent in gradient combinations (all-to-alls and Gram all-reduces)."""
        return self.comm.bytes_sent

    # ------------------------------------------------------------------ registry
    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        """Register ``grain_fsdp`` (left alone when the name is taken)."""
        if "grain_fsdp" not in strategy_registry:
            strategy_registry.register(
                "grain_fsdp", cls, description="GRAIN min-norm across FSDP2 (fully sharded) data-parallel ranks"
            )

    # ------------------------------------------------------------------ set-up
    @override
    def setup_environment(self) -> None:
        """Process group, then a one-dimensional ``data_parallel`` device mesh over all ranks."""
        from torch.distributed.device_mesh import init_device_mesh

        self._setup_distributed()
        self._device_mesh = init_device_mesh(
            self.root_device.type, (self.world_size,), mesh_dim_names=("data_parallel",)
        )
        assert self.lightning_module is not None
        self.lightning_module._device_mesh = self._device_mesh
        self.faults.start()  # a watchdog that reads the errors other ranks post

    # ------------------------------------------------------------------ faults (distributed/faults.py)
    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        """The step: FSDP's forward all-gathers (and GrainMixin's backward passes) quote another rank's error."""
        with self.faults.collective():
            return super().training_step(*args, **kwargs)

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        """Shard the module (FSDP2), install the all-to-all exchange, then the optimizers (on the shards)."""
        assert self.model is not None and self.accelerator is not None
        self.accelerator.setup(trainer)
        module = self.lightning_module
        assert module is not None
        if getattr(self.precision_plugin, "scaler", None) is not None:
            raise RuntimeError(
                "grain_fsdp does not support fp16 loss scaling (precision='16-mixed' on GPU): a skipped step would "
                "never lower the scale. Use precision='bf16-mixed' or '32-true'"
            )
        _materialize_distributed_module(self.model, self.root_device)
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        self._shard(module)
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)

    def _shard(self, module: nn.Module) -> None:
        own = [name for name, _ in module.named_parameters(recurse=False)]
        if own:
            raise ValueError(
                f"grain_fsdp shards submodules; move the LightningModule's own parameters {own} into a submodule"
            )
        if not any(isinstance(m, FSDPModule) for m in module.modules()):
            with self.faults.collective():
                self._check_same_parameters(module)
                if self.world_size > 1:
                    _sync_module_states(module)  # every rank starts from rank 0's weights, as under DDP
        mesh, classes = self.device_mesh, self._wrap_classes(module)
        for m in reversed(list(module.modules())):  # descendants before their ancestors
            if m is not module and type(m).__name__ in classes and not isinstance(m, FSDPModule):
                fully_shard(m, mesh=mesh, reshard_after_forward=self.reshard_after_forward)
        for child in module.children():
            if not isinstance(child, FSDPModule) and any(True for _ in child.parameters()):
                fully_shard(child, mesh=mesh, reshard_after_forward=self.reshard_after_forward)
        self._aggregator = CrossRankMinNorm("sharded", tol=self.policy.options.solver_tol)
        self._aggregator.counter = self.comm
        self._pieces = []
        self._comms = install(module, self._aggregator, self._pieces)

    def _wrap_classes(self, module: nn.Module) -> set[str]:
        if self.wrap is not None:
            return set(self.wrap)
        return {type(m).__name__ for lst in module.modules() if isinstance(lst, nn.ModuleList) for m in lst}

    def _check_same_parameters(self, module: nn.Module) -> None:
        mine = [(n, tuple(p.shape), str(p.dtype), p.requires_grad) for n, p in module.named_parameters()]
        every: list[Any] = [None] * self.world_size
        dist.all_gather_object(every, mine)
        for rank, theirs in enumerate(every):
            if theirs != every[0]:
                diff = next(
                    (
                        f"#{i}: rank 0 has {a}, rank {rank} has {b}"
                        for i, (a, b) in enumerate(zip(every[0], theirs))
                        if a != b
                    ),
                    f"rank 0 has {len(every[0])} parameters, rank {rank} has {len(theirs)}",
                )
                raise on_every_rank(  # every rank sees the same table and raises here: nothing to post
                    ValueError(f"grain_fsdp needs the same parameters on every rank; first difference: {diff}")
                )

    # ------------------------------------------------------------------ checkpoint
    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Optional[Any] = None) -> None:
        """ModelParallelStrategy's (sharded ``torch.distributed.checkpoint`` by default), plus the step policy's
        state (warm start, counters) under ``"grain_fsdp"``."""
        super().save_checkpoint({**checkpoint, "grain_fsdp": self.policy.state_dict()}, filepath, storage_options)

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        state = checkpoint.pop("grain_fsdp", None)
        if state is not None:
            self.policy.load_state_dict(state)
        return checkpoint

    @override
    def teardown(self) -> None:
        self.faults.stop()
        self._aggregator, self._comms, self._pieces, self._groups = None, [], [], []
        super().teardown()

    # ------------------------------------------------------------------ backward
    def _set_gradient_sync(self, sync: bool) -> None:
        module = self.lightning_module
        for m in [] if module is None else module.modules():
            if isinstance(m, FSDPModule):
                m.set_requires_gradient_sync(sync, recurse=False)

    @contextmanager
    @override
    def block_backward_sync(self) -> Iterator[None]:
        """Within this context FSDP keeps accumulating unsharded local gradients (no exchange, no combination)."""
        previous, self._sync_blocked = self._sync_blocked, True
        self._set_gradient_sync(False)
        try:
            yield None
        finally:
            self._sync_blocked = previous
            self._set_gradient_sync(not previous)

    @override
    def backward(self, closure_loss: Tensor, optimizer: Optional[Any], *args: Any, **kwargs: Any) -> Tensor:
        """Local backward (FSDP sends each group's shards as it finishes), then the combination."""
        module = self.lightning_module
        assert module is not None
        sync = not self._sync_blocked and self.world_size > 1
        if sync:
            stale = [n for n, p in module.named_parameters() if p.grad is not None]
            if stale:
                raise RuntimeError(
                    f"grain_fsdp combines each step's gradients and found .grad already set on {stale[:3]}...; "
                    "zero them with set_to_none=True before the backward"
                )
        self._pieces.clear()
        self.pre_backward(closure_loss)
        closure_loss = self.precision_plugin.pre_backward(closure_loss, module)
        try:
            with self.faults.collective():  # FSDP's all-gathers and the exchange: another rank's error, quoted
                self.precision_plugin.backward(closure_loss, module, optimizer, *args, **kwargs)
                if sync:
                    self._combined = self.combine_gradients(cycle=self._cycle_flags)
        finally:
            self._pieces.clear()
        closure_loss = self.precision_plugin.post_backward(closure_loss, module)
        self.post_backward(closure_loss)
        return closure_loss

    # ------------------------------------------------------------------ the combination
    def combine_gradients(self, *, cycle: Optional[tuple[bool, bool]] = None) -> bool:
        """Replace each rank's sharded ``.grad`` by its shard of ``d`` (after a syncing backward).

        ``cycle``: a GrainMixin cycle's ``(invalid, vote_skip)`` on this rank, given on every rank alike (they
        travel in the Gram all-reduce): an invalid rank (non-finite loss) makes every rank take ``on_nonfinite``,
        a skip vote (the rank's own policy skipped) makes every rank skip.

        Returns ``True`` when ``.grad`` holds ``d``; ``False`` when every rank skips the step (``.grad`` set to
        ``None``). Raises ``FloatingPointError`` on every rank for non-finite gradients with
        ``on_nonfinite="raise"``.
        """
        pieces = list(self._pieces)
        if not pieces:
            return True
        assert self._aggregator is not None
        firsts, total = {}, 0
        for comm in self._comms:
            firsts[id(comm)] = total
            total += len(comm.trainable())
        blockwise = self.mode == "blockwise"
        shards = [(p.wait(), p.comm.segments(firsts[id(p.comm)] if blockwise else None)) for p in pieces]
        world = self.world_size
        pi = torch.full((world,), 1.0 / world, dtype=torch.float64)
        ranks = torch.arange(world)

        flags = None
        if cycle is not None:
            flags = torch.zeros(world + 1, dtype=torch.float64)  # [invalid, one-hot by rank | skip votes]
            flags[self.global_rank], flags[world] = float(cycle[0]), float(cycle[1])

        def decide(gram: Tensor, ext: Tensor) -> Optional[Decision]:
            if (ext > 0).any():
                return None
            return self.policy.decide(gram, pi, keys=ranks)

        res = self._aggregator.solve_shards(shards, total if blockwise else 1, flags, decide)
        self.num_combines += 1
        invalid_ranks = torch.nonzero(res.extras[:world]).reshape(-1).tolist() if cycle is not None else []
        with raised_on_every_rank():  # every rank raises here alike: nothing to post
            if invalid_ranks:
                self.policy.nonfinite(f"non-finite loss on rank(s) {invalid_ranks}", self._global_step())
            elif res.bad_ranks:
                self.policy.nonfinite(f"non-finite gradient on rank(s) {res.bad_ranks}", self._global_step())
        if invalid_ranks or res.bad_ranks or res.weights is None:
            for p in self._trainable():
                p.grad = None
            self.policy.record_skip()
            return False
        for piece, (_rows, segments) in zip(pieces, shards):
            piece.write(res.weights, segments)
        if res.decision is not None:
            self._log(res.gram, res.decision, pi, [1] * world, self.policy)
        self.policy.record_step()
        return True

    # ------------------------------------------------------------------ GrainMixin (grain_lightning.protocol)
    def combine_mixin_cycle(self, cycle: MixinCycle) -> bool:
        """End of a GrainMixin cycle into the sharded ``.grad``; ``False``: every rank skips the step (``.grad`` set
        to ``None``).

        ``cycle.groups_exchanged``: the groups' gradients were exchanged by :meth:`exchange_group_losses`; the
        combination of :meth:`_combine_groups` (global or hierarchical). Otherwise the backward of ``cycle.loss``
        (this rank's direction ``d_r``, reduced by FSDP into the all-to-all), then the min-norm over the ranks'
        ``d_r``.
        """
        if cycle.groups_exchanged:
            with self.faults.collective():
                return self._combine_groups(cycle)
        if self._groups:
            raise RuntimeError("grain_fsdp: groups were exchanged this cycle but the cycle does not combine them")
        if cycle.loss is None:
            raise RuntimeError("grain_fsdp needs the loss of this rank's direction (MixinCycle.loss) from the mixin")
        if self.world_size == 1:
            if cycle.invalid or cycle.vote_skip:
                return False
            self.backward(cycle.loss, None)
            return True
        self._cycle_flags, self._combined = (cycle.invalid, cycle.vote_skip), False
        try:
            self.backward(cycle.loss, None)
        finally:
            self._cycle_flags = None
        return self._combined

    # ------------------------------------------------------------------ GrainMixin, one backward per group
    def exchange_group_losses(self, losses: Tensor, check_gram: Optional[Tensor] = None) -> Optional[float]:
        r"""One backward per group loss ``L_j`` (``(k,)`` ``losses``, one graph) with FSDP's gradient sync on, so
        that each group's gradient goes through the all-to-all and rank ``s`` keeps shard ``s`` of every (rank, group)
        gradient until :meth:`combine_mixin_cycle` (``cycle.groups_exchanged``). Used by GrainMixin for
        ``mixin_groups="global"``, ``engine="reference"``, accumulation over micro-batches, self-checked steps and
        ``GrainConfig(blockwise=True)``.

        Every rank runs ``max_r k_r`` backwards (one all-gather of the ``k_r`` first): a rank with fewer groups
        backwards ``0 * sum_j L_j``, a row that is dropped. Cost per micro-batch: ``max_r k_r`` backwards and as
        many times a reduce-scatter's bytes; memory until the step: the received shards, ``R`` per backward
        (``(R-1)/R P`` numbers each beyond the one FSDP keeps), i.e. about ``k`` gradients per rank (grain_ddp's
        global groups hold ``k P`` too). No full gradient is gathered.

        ``check_gram``: this rank's ``(k, k)`` one-backward Gram of the same losses (self-check; given on every
        rank alike). This micro-batch's reference Gram (from the shards, one all-reduce of it and of every rank's
        ``check_gram``) is compared block by block with every rank's; a relative difference (to the block's
        largest diagonal entry) above twice the self-check tolerance raises ``SelfCheckError`` on every rank.
        Returns the largest relative difference over the ranks (``None`` without a check, or when the Gram is not
        finite: the combination then takes ``on_nonfinite``).
        """
        module = self.lightning_module
        assert module is not None and self._aggregator is not None
        losses = losses.reshape(-1)
        k, world = losses.numel(), self.world_size
        params = self._trainable()
        with self.faults.collective():
            counts = self._aggregator.exchange_counts([k])[:, 0].tolist() if world > 1 else [k]
            rounds = max(counts)
            first = len(self._groups)
            for j in range(rounds):
                for p in params:
                    p.grad = None
                self._pieces.clear()
                loss = losses[j] if j < k else losses.sum() * 0.0
                self.precision_plugin.backward(loss, module, None, retain_graph=j < rounds - 1)
                pieces = list(self._pieces) if world > 1 else [comm.local_piece() for comm in self._comms]
                by_comm = {id(piece.comm): piece for piece in pieces}
                if len(by_comm) != len(pieces) or set(by_comm) != {id(comm) for comm in self._comms}:
                    raise RuntimeError(
                        f"grain_fsdp: the backward of group {j} exchanged {len(pieces)} FSDP parameter groups, "
                        f"expected each of the {len(self._comms)} once (a unit the loss does not reach?)"
                    )
                self._groups.append(_GroupBackward(counts, j, by_comm))
            self._pieces.clear()
            for p in params:
                p.grad = None
            if check_gram is None:
                return None
            return self._check_groups(self._groups[first:], check_gram, losses.dtype)

    def _group_counts(self, entries: Sequence[_GroupBackward]) -> list[int]:
        """Groups of each rank among the exchanged backwards."""
        return [sum(1 for e in entries if e.index < e.counts[r]) for r in range(self.world_size)]

    def _group_rows(self, entries: Sequence[_GroupBackward], comm: AllToAllComm) -> Tensor:
        """``(K, S)``: this rank's shard of every (rank, group) gradient of ``comm``'s parameters, rank 0's first,
        each rank's in the order of its groups."""
        rows = [e.pieces[id(comm)].wait()[r] for r in range(self.world_size) for e in entries if e.index < e.counts[r]]
        return torch.stack(rows)

    def _check_groups(
        self, entries: Sequence[_GroupBackward], check_gram: Tensor, dtype: torch.dtype
    ) -> Optional[float]:
        from grain_lightning.ghost.self_check import SelfCheckError, tolerance

        assert self._aggregator is not None
        counts = self._group_counts(entries)
        starts = [sum(counts[:r]) for r in range(self.world_size + 1)]
        slots = [sum(c * c for c in counts[:r]) for r in range(self.world_size + 1)]
        packed = torch.zeros(slots[-1], dtype=torch.float64)
        mine = check_gram.detach().double().cpu()
        if mine.shape != (counts[self.global_rank],) * 2:
            raise ValueError(f"check_gram of shape {tuple(mine.shape)} for {counts[self.global_rank]} groups")
        packed[slots[self.global_rank] : slots[self.global_rank + 1]] = mine.reshape(-1)
        shards = [(self._group_rows(entries, comm), comm.segments(None)) for comm in self._comms]
        res = self._aggregator.solve_shards(shards, 1, packed, lambda gram, ext: None, counts=counts)
        if res.bad_ranks:
            return None
        errors = []
        for r, c in enumerate(counts):
            ref = res.gram[0, starts[r] : starts[r + 1], starts[r] : starts[r + 1]]
            engine = res.extras[slots[r] : slots[r + 1]].view(c, c)
            scale = max(float(torch.diagonal(ref).max()), 1e-300)
            errors.append(float((engine - ref).abs().max()) / scale)
        limit = 2 * tolerance(dtype)
        bad = [r for r, e in enumerate(errors) if not e <= limit]
        if bad:
            raise on_every_rank(  # every rank compares the same numbers
                SelfCheckError(
                    f"grain_fsdp self-check: the one-backward engine's group Gram differs from the reference "
                    f"(one backward per group) on rank(s) {bad}: relative differences {[f'{e:.2e}' for e in errors]} "
                    f"> {limit:.0e}; use GrainConfig(engine='reference')"
                )
            )
        return max(errors)

    def _combine_groups(self, cycle: MixinCycle) -> bool:
        """The exchanged groups of this cycle: their ``(B, K, K)`` Gram from the shards (one all-reduce), then

        - ``mixin_groups="global"``: the module's step policy (``cycle.policy``) over all ``K`` groups of all ranks
          (weights ``w``, ``d = sum_i w_i g_i``), as grain_ddp's global groups and single-process GRAIN over them;
        - ``"hierarchical"``: each rank's policy on its own ``k_r x k_r`` block gives ``d_r = sum_j w_{rj} g_{rj}``
          (its GRAIN direction), the weights go round in one all-reduce of ``K`` numbers, and this strategy's
          policy solves over ``M G M^T`` (``M``: ``R x K``, row ``r`` holding ``w_r``), the ``R x R`` Gram of
          the ``d_r``: ``d = sum_r v_r d_r``, as grain_ddp's hierarchical groups.

        ``GrainConfig(blockwise=True)`` (``cycle.blocks``: the parameters of each module block ``m``): the Gram is
        summed per parameter tensor ``f`` (``(F, K, K)``, one all-reduce of ``F K^2`` numbers) and per module
        (``G_m = sum_{f in m} G_f``); the policy's plain min-norm solve per module (as the single-process
        block-wise engine: no collapse handling) gives ``w_m`` over all ``K`` groups (global) or ``w_{r,m}`` over
        rank ``r``'s own (hierarchical: ``d_{r,m} = sum_j w_{r,m,j} g_{rj,m}``, grain_ddp's rank directions with a
        block-wise mixin; the ranks' Gram is then ``sum_f M_{m(f)} G_f M_{m(f)}^T``, per parameter with
        ``mode="blockwise"``). Each rank writes its shard of ``d`` into the sharded ``.grad``.
        """
        assert self._aggregator is not None and cycle.policy is not None
        entries, self._groups = self._groups, []
        world, rank = self.world_size, self.global_rank
        if world == 1 and (cycle.invalid or cycle.vote_skip):
            return False
        counts = self._group_counts(entries)
        starts = [sum(counts[:r]) for r in range(world + 1)]
        total = starts[-1]
        firsts, blocks = {}, 0
        for comm in self._comms:
            firsts[id(comm)] = blocks
            blocks += len(comm.trainable())
        member = None if cycle.blocks is None else self._module_blocks(cycle.blocks)  # (M, F) 0/1
        fine = self.mode == "blockwise" or member is not None  # one Gram block per parameter tensor
        shards = [
            (self._group_rows(entries, comm), comm.segments(firsts[id(comm)] if fine else None)) for comm in self._comms
        ]
        targets = [entries[0].pieces[id(comm)].rows[0] for comm in self._comms]  # the .grad storage FSDP made
        del entries  # the other received buffers
        is_global = self.mixin_groups == "global"
        policy = cycle.policy
        mine = slice(starts[rank], starts[rank + 1])
        pi_local = cycle.mean_weights.detach().double().cpu().reshape(-1) if cycle.mean_weights is not None else None
        if pi_local is None or pi_local.numel() != counts[rank]:
            raise ValueError(f"grain_fsdp: {counts[rank]} exchanged groups on rank {rank} but mean weights {pi_local}")
        pi_local = pi_local / pi_local.sum()
        extras = torch.zeros(world + total, dtype=torch.float64)  # [invalid, one-hot by rank | mean weights / R]
        extras[rank] = float(cycle.invalid)
        extras[world + starts[rank] : world + starts[rank + 1]] = pi_local / world

        def decide(gram: Tensor, ext: Tensor) -> Optional[Decision]:
            if (ext[:world] > 0).any() or not is_global or member is not None:
                return None
            return policy.decide(gram, ext[world:])

        res = self._aggregator.solve_shards(shards, blocks if fine else 1, extras, decide, counts=counts)
        self.num_combines += 1
        invalid_ranks = torch.nonzero(res.extras[:world]).reshape(-1).tolist()
        with raised_on_every_rank():  # every rank raises here alike: nothing to post
            if invalid_ranks:
                self.policy.nonfinite(f"non-finite loss on rank(s) {invalid_ranks}", self._global_step())
            elif res.bad_ranks:
                self.policy.nonfinite(f"non-finite gradient on rank(s) {res.bad_ranks}", self._global_step())
        if invalid_ranks or res.bad_ranks:
            return self._skip_groups()
        gram = res.gram
        module_gram = None if member is None else torch.einsum("mf,fij->mij", member, gram)  # (M, K, K)
        if is_global and member is not None and module_gram is not None:
            decision = policy.min_norm(module_gram)  # one plain solve per module, as the block-wise engine
            assert decision.weights is not None  # a plain solve always gives weights
            weights = member.T @ decision.weights.reshape(-1, total)  # (F, K)
            log_gram, log_pi, log_counts, log_policy = module_gram, res.extras[world:], counts, policy
        elif is_global:
            if res.weights is None or res.decision is None:
                return self._skip_groups()
            weights = res.weights.reshape(gram.shape[0], total)
            decision, log_gram, log_pi, log_counts, log_policy = res.decision, gram, res.extras[world:], counts, policy
        else:
            module = self.lightning_module
            if module_gram is None:
                local_gram = gram.sum(0)[mine, mine]
                local = policy.decide(local_gram, pi_local, keys=cycle.keys)
                if policy.log_now and module is not None:
                    log_diagnostics(module, policy.diagnostics(local_gram, local, pi_local))
            else:
                local = policy.min_norm(module_gram[:, mine, mine])  # (M, k_r): this rank's block-wise GRAIN
                if policy.log_now and module is not None:
                    log_diagnostics(
                        module, {"grain/num_groups": float(counts[rank]), "grain/blocks": float(module_gram.shape[0])}
                    )
            num_local = 1 if module_gram is None else module_gram.shape[0]
            vote = torch.zeros(num_local * total + 1, dtype=torch.float64)  # [local weights by block | skip votes]
            if local.weights is None:
                vote[-1] = 1.0
            else:
                vote[:-1].view(num_local, total)[:, mine] = local.weights.double().reshape(num_local, -1)
            vote = self._aggregator.all_reduce(vote)
            if vote[-1] > 0:
                return self._skip_groups()
            local_weights = vote[:-1].view(num_local, total)  # (M or 1, K): each group's weight in its rank's d_r
            if member is not None:  # the module block of each parameter tensor
                local_weights = local_weights[member.argmax(0)]  # (F, K)
            owner = torch.repeat_interleave(torch.arange(world), torch.tensor(counts))
            m = torch.zeros(local_weights.shape[0], world, total, dtype=torch.float64)
            m[:, owner, torch.arange(total)] = local_weights
            ranks_gram = m @ gram @ m.transpose(1, 2)  # (B, R, R): the Gram of the ranks' directions d_r
            if member is not None and self.mode != "blockwise":
                ranks_gram = ranks_gram.sum(0, keepdim=True)
            pi = torch.full((world,), 1.0 / world, dtype=torch.float64)
            decision = self.policy.decide(ranks_gram, pi, keys=torch.arange(world))
            if decision.weights is None:
                return self._skip_groups()
            weights = decision.weights.reshape(ranks_gram.shape[0], world)[:, owner] * local_weights
            log_gram, log_pi, log_counts, log_policy = ranks_gram, pi, [1] * world, self.policy
        for (rows, segments), comm, out in zip(shards, self._comms, targets):
            CrossRankMinNorm.combine_shard(rows, weights, segments, out)
            comm.assign_grads(out)
        self._log(log_gram, decision, log_pi, log_counts, log_policy)
        self.policy.record_step()
        return True

    def _module_blocks(self, blocks: list[list[Tensor]]) -> Tensor:
        """``(M, F)`` 0/1: which of the ``M`` module blocks (``GrainConfig(blockwise=True)``, the mixin's) holds
        each of the ``F`` trainable FSDP parameters (in the exchanges' order); each must be in exactly one."""
        index = {id(p): m for m, params in enumerate(blocks) for p in params}
        sharded = [fp.sharded_param for comm in self._comms for fp in comm.trainable()]
        member = torch.zeros(len(blocks), len(sharded), dtype=torch.float64)
        names = {id(p): n for n, p in self.lightning_module.named_parameters()} if self.lightning_module else {}
        missing = []
        for f, p in enumerate(sharded):
            m = index.get(id(p))
            if m is None:
                missing.append(names.get(id(p), "?"))
            else:
                member[m, f] = 1.0
        if missing or sum(len(params) for params in blocks) != len(sharded):
            raise RuntimeError(
                f"grain_fsdp: GrainConfig(blockwise=True) blocks cover {sum(len(b) for b in blocks)} parameters, "
                f"the FSDP exchanges {len(sharded)}; not in any block: {missing}"
            )
        return member

    def _skip_groups(self) -> bool:
        for p in self._trainable():
            p.grad = None
        self.policy.record_skip()
        return False

    def _trainable(self) -> list[Tensor]:
        module = self.lightning_module
        return [] if module is None else [p for p in module.parameters() if p.requires_grad]

    def _global_step(self) -> int:
        module = self.lightning_module
        return module.trainer.global_step if module is not None and module._trainer is not None else -1

    def _log(self, gram: Tensor, decision: Decision, pi: Tensor, counts: list[int], policy: StepPolicy) -> None:
        """``grain_fsdp/*`` diagnostics of a ``(B, K, K)`` Gram whose rows are ``counts[r]`` per rank."""
        module = self.lightning_module
        if not self.policy.log_now or module is None or module._trainer is None:
            return
        diag = policy.diagnostics(gram, decision, pi)
        traces = torch.diagonal(gram, dim1=1, dim2=2).sum(1)
        w = decision.solved.reshape(gram.shape[0], -1)
        avg = (traces[:, None] * w).sum(0) / traces.sum() if float(traces.sum()) > 0 else w.mean(0)
        out = {k.replace("grain/", "grain_fsdp/"): v for k, v in diag.items()}
        start = 0
        for r, c in enumerate(counts):
            out[f"grain_fsdp/weight_rank{r}"] = float(avg[start : start + c].sum())
            start += c
        out["grain_fsdp/skipped_steps"] = float(self.skipped_steps)
        log_diagnostics(module, out)


@dataclass
class _GroupBackward:
    """One backward of :meth:`GrainFSDPStrategy.exchange_group_losses`: group ``index`` of every rank that has
    ``counts[r] > index`` groups in its micro-batch; ``pieces``: the exchange of each FSDP parameter group."""

    counts: list[int]
    index: int
    pieces: dict[int, Piece]


def _wrap_names(wrap: Wrap) -> Optional[tuple[str, ...]]:
    if wrap is None:
        return None
    items = [wrap] if isinstance(wrap, (str, type)) else list(wrap)
    names = []
    for item in items:
        if isinstance(item, type):
            names.append(item.__name__)
        elif isinstance(item, str) and item:
            names.append(item.rsplit(".", 1)[-1])
        else:
            raise ValueError(f"GrainFSDPStrategy: wrap must name module classes (types or names), got {item!r}")
    return tuple(names)


def register_grain_fsdp(registry: _StrategyRegistry = StrategyRegistry) -> None:
    """Register ``grain_fsdp`` in ``registry`` (done on import; a name already taken is left alone)."""
    GrainFSDPStrategy.register_strategies(registry)


register_grain_fsdp()
