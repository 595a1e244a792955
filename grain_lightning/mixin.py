r"""``GrainMixin``: GRAIN for a LightningModule, with manual optimization.

The user returns per-sample (unreduced) losses from :meth:`GrainMixin.grain_losses`; the mixin groups
them (:mod:`grain_lightning.groups`), computes each group's gradient ``g_j``, the Gram ``G = J J^T``, the
min-norm weights ``w*`` and writes ``d = sum_j w*_j g_j`` into ``.grad``; then it clips, steps every
optimizer and the LR schedulers, and logs diagnostics. Gradient accumulation over ``N`` micro-batches
makes the groups of all micro-batches (or the micro-batches themselves) the groups of one step.
``GrainConfig(aggregation="mean")`` switches back to the plain mean (ordinary training) with one flag.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.utilities.data import extract_batch_size
from typing_extensions import override

from grain_lightning.config import POLICY_FIELDS, GrainConfig
from grain_lightning.diagnostics import log_diagnostics
from grain_lightning.ghost import BlockwiseResult, GhostEngine
from grain_lightning.ghost.engine import check_losses
from grain_lightning.ghost.rules.base import UnsupportedModuleError
from grain_lightning.ghost.self_check import SelfCheckSchedule
from grain_lightning.groups import GroupAssignment, as_grouping
from grain_lightning.policy import StepPolicy
from grain_lightning.protocol import GrainStrategy, MixinCycle, raised_on_every_rank
from grain_lightning.reference import GroupGradients, group_gradients, trainable_parameters

__all__ = ["GrainConfig", "GrainMixin"]

if TYPE_CHECKING:  # the mixin is used with a LightningModule; type-check it as one
    from lightning.pytorch import LightningModule as _MixinBase
else:
    _MixinBase = object


@dataclass
class _Cycle:
    """One accumulation cycle of micro-batches (reset after every optimizer step or skip)."""

    micro: int = 0  # micro-batches seen
    buffer: Any = None  # GroupGradients, GhostGradients or a BlockwiseResult
    fractions: list[torch.Tensor] = field(default_factory=list)  # mean weights of buffered groups
    keys: list[torch.Tensor] = field(default_factory=list)  # (k_i, 2) [micro-batch, group key]
    invalid: bool = False  # a non-finite micro-batch was seen: the whole cycle is skipped
    loss: Optional[torch.Tensor] = None  # combines_in_backward, aggregation="mean": the loss to backward

    def release(self) -> None:
        if hasattr(self.buffer, "release"):  # the one-backward engine's stored activations or graph
            self.buffer.release()


@dataclass
class _ExchangedGroups:
    """A ``combines_in_backward`` strategy holds this cycle's group gradients (``exchange_group_losses``)."""

    num_groups: int

    def cat(self, other: _ExchangedGroups) -> _ExchangedGroups:
        return _ExchangedGroups(self.num_groups + other.num_groups)


class GrainMixin(_MixinBase):
    """Mixin for ``LightningModule``: train with the min-norm combination of group gradients.

    Put it first in the bases and pass a :class:`GrainConfig` to ``super().__init__``::

        class Model(GrainMixin, L.LightningModule):
            def __init__(self):
                super().__init__(grain=GrainConfig(grouping=ByKey(1)))
                self.net = torch.nn.Linear(10, 3)

            def grain_losses(self, batch, batch_idx):      # (n,) per-sample losses
                x, y = batch
                return F.cross_entropy(self.net(x), y, reduction="none")

            def configure_optimizers(self):
                return torch.optim.AdamW(self.parameters(), lr=1e-3)

    The mixin sets ``automatic_optimization = False`` and implements ``training_step``; validation and
    test loops are untouched. To do more in the training step, override it and call
    :meth:`grain_step` with the per-sample losses. If you override ``on_train_epoch_end``,
    ``on_save_checkpoint``, ``on_load_checkpoint`` or ``configure_callbacks``, call ``super()``
    (epoch-interval LR schedulers, the solver's warm start and the check of the Trainer's options live there).

    GRAIN replaces two Trainer options: ``Trainer(accumulate_grad_batches=N)`` and
    ``Trainer(gradient_clip_val=x)`` are refused when the fit starts, naming ``GrainConfig``'s options.
    The ``grain/*`` diagnostics reach the loggers every ``GrainConfig.log_every_n_steps`` applied steps,
    whatever the Trainer's ``log_every_n_steps``
    (:func:`~grain_lightning.diagnostics.log_diagnostics`).

    Every decision of a step (solve, warm start, collapse, non-finite values, diagnostics) is made by
    :attr:`grain_policy` (:class:`~grain_lightning.policy.StepPolicy`), which also counts the steps.
    """

    def __init__(self, *args: Any, grain: Optional[GrainConfig] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if grain is not None and not isinstance(grain, GrainConfig):
            raise TypeError(f"grain must be a GrainConfig, got {type(grain).__name__}")
        self.grain_config = grain if grain is not None else GrainConfig()
        self.automatic_optimization = False
        self.grain_policy = StepPolicy(
            self.grain_config.policy_options,
            owner="GRAIN",
            nonfinite_hint="set GrainConfig(on_nonfinite='skip') to skip such steps",
        )
        self._grain_cycle = _Cycle()
        self._grain_engine: Optional[GhostEngine] = None
        self._grain_self_check = SelfCheckSchedule(self.grain_config.self_check)

    # ------------------------------------------------------------------ user-facing API
    def grain_losses(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Return the ``(n,)`` per-sample losses of ``batch`` (``reduction="none"``). Implement this."""
        raise TypeError(
            f"{type(self).__name__} uses GrainMixin: implement grain_losses(batch, batch_idx) returning (n,) "
            "per-sample losses, or override training_step and call self.grain_step(losses, batch)"
        )

    @override
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        with self.grain_capture(self.grain_batch_size(batch)):
            losses = self.grain_losses(batch, batch_idx)
        return self.grain_step(losses, batch)

    def grain_batch_size(self, batch: Any) -> Optional[int]:
        """The number of samples in ``batch`` (the losses must have this length), or ``None`` if unknown.

        Default: Lightning's ``extract_batch_size`` (dim 0 of the first tensor found in the batch).
        Override it when the samples of your batch are not in dim 0 of its first tensor.
        """
        try:
            return int(extract_batch_size(batch))
        except (MisconfigurationException, RecursionError, TypeError, ValueError):
            return None

    def grain_capture(self, batch_size: Optional[int] = None) -> contextlib.AbstractContextManager:
        """Context for the forward that computes the losses, so the one-backward engine can record it.

        ``training_step`` uses it around :meth:`grain_losses`, with :meth:`grain_batch_size` of the batch;
        wrap your forward in it when you override ``training_step``. Without it, the step falls back to the
        reference engine (``engine="auto"``) or raises (``engine="ghost"``).
        """
        engine = self.grain_engine if self.grain_config.aggregation == "grain" else None
        return engine.capture(batch_size) if engine is not None else contextlib.nullcontext()

    @property
    def grain_engine(self) -> Optional[GhostEngine]:
        """The one-backward engine for the current parameters, or ``None`` when the reference engine is used.

        ``engine="auto"`` uses it only when it handles every trainable parameter exactly.
        """
        cfg = self.grain_config
        if cfg.engine == "reference":
            return None
        params = self._grain_params()
        engine = self._grain_engine
        in_backward = self._grain_backward_strategy()
        if in_backward is not None:
            if self._grain_by_groups(in_backward) and SelfCheckSchedule(cfg.self_check).when == 0:
                return None  # every step exchanges its groups one backward each: nothing to record
            return self._grain_engine_in_backward(params)
        if (
            engine is None
            or engine.combine != cfg.ghost_combine
            or [id(p) for p in engine.params] != [id(p) for p in params]
        ):
            unsupported = "fallback" if cfg.engine == "auto" else cfg.unsupported
            engine = GhostEngine(self, params=params, unsupported=unsupported, combine=cfg.ghost_combine)
            self._grain_engine = engine
        if cfg.engine == "auto" and not engine.fully_supported:
            if cfg.blockwise:
                raise RuntimeError(
                    f"GrainConfig(blockwise=True): modules {engine.unsupported_modules} are not supported by the "
                    "one-backward engine; use engine='ghost' (their parameters form one block solved by the "
                    "reference engine)"
                )
            return None
        return engine

    def grain_step(
        self, losses: torch.Tensor, batch: Any = None, groups: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """One micro-batch: group ``losses``, compute group gradients, and step when the cycle is complete.

        Args:
            losses: ``(n,)`` per-sample losses (differentiable).
            batch: the batch, for groupings that read a key from it.
            groups: optional ``(n,)`` integer group ids, overriding the configured grouping.

        Returns:
            The detached mean loss of the micro-batch.
        """
        cfg, cycle = self.grain_config, self._grain_cycle
        try:
            check_losses(losses, self.grain_batch_size(batch) if batch is not None else None)
        except ValueError as err:
            raise ValueError(
                f"grain_step: {err}; reduce any other dims, or override grain_batch_size(batch) if the batch's "
                "samples are not in dim 0 of its first tensor"
            ) from None
        self.grain_check_setup()
        mean_loss = losses.detach().float().mean()
        if cfg.log_loss_as:
            self.log(cfg.log_loss_as, mean_loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=losses.shape[0])
        n_acc = cfg.accumulate_grad_batches
        last = cycle.micro + 1 >= n_acc or bool(self.trainer.is_last_batch)
        opts = self._grain_optimizers()
        if cycle.micro == 0:
            for opt in opts:
                opt.zero_grad()
        in_backward = self._grain_backward_strategy() is not None
        finite = bool(torch.isfinite(losses.detach()).all())
        if not finite:
            bad = int(torch.nonzero(~torch.isfinite(losses.detach()))[0, 0])
            self._grain_nonfinite(f"per-sample loss {bad} is {float(losses.detach()[bad])}")
            cycle.invalid = True
            if in_backward:  # every rank runs the same backward passes (FSDP's collectives): finite stand-ins
                losses = torch.nan_to_num(losses, nan=0.0, posinf=0.0, neginf=0.0)
        if not finite and not in_backward:
            pass  # nothing to compute: the cycle is skipped (or combined as invalid by the strategy)
        elif cfg.aggregation == "mean" and in_backward and last:
            cycle.loss = losses.mean() / n_acc  # the strategy runs its backward, reducing what was accumulated
        elif cfg.aggregation == "mean" and in_backward:
            with self._grain_sync_blocked():  # FSDP accumulates the unsharded gradients until the last micro-batch
                self.manual_backward(losses.mean() / n_acc)
        elif cfg.aggregation == "mean":
            self.manual_backward(losses.mean() / n_acc)  # a GRAIN strategy does not synchronise a GrainModule
        else:
            self._grain_accumulate(losses, batch, groups)
        cycle.micro += 1
        if last:
            if self._grain_cycle_step(opts):
                self._grain_apply(opts)
            else:
                self._grain_skip()
        return mean_loss

    @property
    def grain_self_check_passed(self) -> int:
        """How many steps the one-backward engine's self-check has run on (a mismatch raises or falls back)."""
        return self._grain_self_check.passed

    def grain_check_setup(self) -> None:
        """Refuse set-ups the mixin cannot run (multi-process without a GRAIN strategy, fp16 scaling); pick up
        step-policy options changed in ``grain_config`` since the last step (validated again)."""
        trainer = self.trainer
        if trainer.world_size > 1 and not isinstance(trainer.strategy, GrainStrategy):
            raise RuntimeError(
                f"GrainMixin computes group gradients itself; under {type(trainer.strategy).__name__} with "
                f"world_size={trainer.world_size} the ranks would not be synchronised. Use strategy='grain_ddp' "
                "(grain_lightning.GrainDDPStrategy) or devices=1."
            )
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            raise RuntimeError(
                "GrainMixin writes gradients itself and does not support fp16 loss scaling "
                "(precision='16-mixed' on GPU): use precision='bf16-mixed' or '32-true'"
            )
        self._grain_check_blockwise()
        cfg, options = self.grain_config, self.grain_policy.options
        if any(getattr(cfg, name) != getattr(options, name) for name in POLICY_FIELDS):  # changed since last step
            self.grain_policy.options = cfg.policy_options

    # ------------------------------------------------------------------ internals
    def _grain_strategy(self) -> Optional[GrainStrategy]:
        """The distributed GRAIN strategy combining this module's ranks (``grain_ddp``), if any."""
        trainer = self._trainer
        if trainer is None or trainer.world_size <= 1 or not isinstance(trainer.strategy, GrainStrategy):
            return None
        return trainer.strategy

    def _grain_backward_strategy(self) -> Optional[GrainStrategy]:
        """A strategy that combines the ranks inside the backward of the cycle's loss (``grain_fsdp``), at any
        world size: the mixin then never writes ``.grad`` itself (:mod:`grain_lightning.protocol`)."""
        trainer = self._trainer
        strategy = trainer.strategy if trainer is not None else None
        if isinstance(strategy, GrainStrategy) and strategy.combines_in_backward:
            return strategy
        return None

    def _grain_check_blockwise(self) -> None:
        """``GrainConfig(blockwise=True)`` with ``mixin_groups="global"`` under a strategy that combines after the
        mixin wrote ``.grad`` (``grain_ddp``): its per-module solves write the rank's own direction, not the group
        gradients that global groups need; refused naming the alternatives."""
        cfg, strategy = self.grain_config, self._grain_strategy()
        if (
            cfg.blockwise
            and cfg.aggregation == "grain"
            and strategy is not None
            and not strategy.combines_in_backward
            and strategy.needs_group_gradients
        ):
            raise raised_on_every_rank(  # the same settings on every rank
                ValueError(
                    f"GrainMixin under {type(strategy).__name__}(mixin_groups='global'): GrainConfig(blockwise=True) "
                    "solves each rank's groups module by module and writes that rank's direction, not its group "
                    "gradients; use mixin_groups='hierarchical', blockwise=False, or strategy='grain_fsdp' (global "
                    "groups solved module by module from gradient shards)"
                )
            )

    def _grain_by_groups(self, strategy: GrainStrategy) -> bool:
        """Under a ``combines_in_backward`` strategy: whether every micro-batch's groups are exchanged one backward
        each (global groups, the reference engine, accumulation, block-wise), rather than one weighted backward per
        step."""
        cfg = self.grain_config
        return (
            strategy.needs_group_gradients
            or cfg.engine == "reference"
            or cfg.accumulate_grad_batches > 1
            or (cfg.blockwise and cfg.aggregation == "grain")  # one weight vector per module: no one weighted loss
        )

    def _grain_sync_blocked(self) -> contextlib.AbstractContextManager:
        strategy = self.trainer.strategy
        return strategy.block_backward_sync() if isinstance(strategy, ParallelStrategy) else contextlib.nullcontext()

    def _grain_engine_in_backward(self, params: list[torch.Tensor]) -> GhostEngine:
        """The one-backward engine under a ``combines_in_backward`` strategy: every parameter handled by a rule
        (the reference engine's per-group backward would bypass FSDP's reduction), and the combined gradient from
        one weighted backward (``combine="backward"``) that FSDP reduces to shards."""
        engine = self._grain_engine
        if (
            engine is not None
            and engine.combine == "backward"
            and [id(p) for p in engine.params] == [id(p) for p in params]
        ):
            return engine
        name = type(self.trainer.strategy).__name__
        try:
            engine = GhostEngine(self, params=params, unsupported="raise", combine="backward")
        except UnsupportedModuleError as err:
            raise raised_on_every_rank(  # the same model on every rank
                UnsupportedModuleError(
                    f"GrainMixin under {name} needs the one-backward engine for every parameter: {err}"
                )
            ) from None
        self._grain_engine = engine
        return engine

    def _grain_blocks(self) -> list[list[torch.Tensor]]:
        """``GrainConfig(blockwise=True)`` under a ``combines_in_backward`` strategy: the parameters of each block
        (a module with a one-backward rule, as :meth:`GhostEngine.blockwise_backward` solves them), in the order of
        the module's modules; the strategy solves the blocks itself."""
        params = self._grain_params()
        engine = self._grain_engine_in_backward(params)
        try:
            blocks = engine.blocks()
        except UnsupportedModuleError as err:
            raise raised_on_every_rank(  # the same model on every rank
                UnsupportedModuleError(f"GrainMixin under {type(self.trainer.strategy).__name__}: {err}")
            ) from None
        by_key = {id(p): p for p in params}
        return [[by_key[k] for k in keys] for _, keys in blocks]

    def _grain_optimizers(self) -> list:
        opts = self.optimizers()
        return list(opts) if isinstance(opts, (list, tuple)) else [opts]

    def _grain_params(self) -> list[torch.Tensor]:
        opts = self._grain_optimizers()
        return trainable_parameters(p for opt in opts for group in opt.param_groups for p in group["params"])

    def _grain_group_gradients(self, losses: torch.Tensor, assignment: GroupAssignment) -> Any:
        """Group gradients (reference), a GhostGradients (one backward) or a BlockwiseResult."""
        cfg = self.grain_config
        engine = self.grain_engine
        in_backward = self._grain_backward_strategy()
        if in_backward is not None:
            return self._grain_groups_in_backward(losses, assignment, in_backward, engine)
        if engine is not None and not engine.captured:
            if cfg.engine == "ghost" or cfg.blockwise:
                raise RuntimeError(
                    "GrainConfig(engine='ghost'/blockwise) needs the forward recorded: compute the losses inside "
                    "`with self.grain_capture():` when you override training_step"
                )
            engine = None
        if engine is None:
            return group_gradients(assignment.group_means(losses), self._grain_params(), batched=cfg.batched_backward)
        if cfg.blockwise:
            return engine.blockwise_backward(losses, assignment, policy=self.grain_policy)
        if self._grain_self_check.given != cfg.self_check:
            self._grain_self_check = SelfCheckSchedule(cfg.self_check)
        schedule = self._grain_self_check
        signature = engine.call_signature() if schedule.when == "first" else None  # only "first" reads it
        check = schedule.due(self.grain_policy.steps, signature)
        strategy = self._grain_strategy()
        if cfg.accumulate_grad_batches > 1 or (strategy is not None and strategy.needs_group_gradients):
            # groups of other micro-batches (or of other ranks) need these gradients
            grads: Any = engine.group_gradients(losses, assignment, self_check=check)
        else:
            grads = engine.backward(losses, assignment, self_check=check)
        if check and engine.last_self_check is not None:
            self._grain_self_check.checked(signature)  # a mismatch raised, or moved parameters to the reference
            if cfg.log_every_n_steps:
                log_diagnostics(self, {"grain/self_check_error": float(engine.last_self_check.worst)})
        return grads

    def _grain_groups_in_backward(
        self, losses: torch.Tensor, assignment: GroupAssignment, strategy: GrainStrategy, engine: Optional[GhostEngine]
    ) -> Any:
        """Under a ``combines_in_backward`` strategy (``grain_fsdp``): the one-backward engine's Gram (FSDP's sync
        off; the step is then one weighted backward), or this micro-batch's group losses handed to the strategy,
        which exchanges every group's gradient one backward each (:meth:`_grain_by_groups`, or a self-checked step:
        the engine's Gram is then compared with that reference's by the strategy)."""
        name = type(strategy).__name__
        if engine is not None and not engine.captured:
            raise RuntimeError(
                f"GrainMixin under {name} needs the forward recorded: compute the losses inside "
                "`with self.grain_capture():` when you override training_step"
            )
        cfg = self.grain_config
        if self._grain_self_check.given != cfg.self_check:
            self._grain_self_check = SelfCheckSchedule(cfg.self_check)
        schedule, check, signature = self._grain_self_check, False, None
        if engine is not None and schedule.when != 0:
            signature = engine.call_signature() if schedule.when == "first" else None
            check = schedule.due(self.grain_policy.steps, signature)
            if schedule.when == "first" and self.trainer.world_size > 1:  # call signatures may differ by rank
                check = bool(self.trainer.strategy.reduce_boolean_decision(check, all=False))
        by_groups = check or self._grain_by_groups(strategy)
        gram: Optional[torch.Tensor] = None
        if engine is not None and (check or not by_groups):
            try:
                with self._grain_sync_blocked():  # the engine's own backward: nothing exchanged
                    ghost = engine.backward(losses, assignment)
            except UnsupportedModuleError as err:
                raise UnsupportedModuleError(
                    f"GrainMixin under {name} needs the one-backward engine for every parameter: {err}"
                ) from None
            if not by_groups:
                return ghost
            gram = ghost.gram()
        elif engine is not None:
            engine.discard()  # recorded for a self-check that is not due
        exchange = getattr(strategy, "exchange_group_losses", None)
        if exchange is None:
            raise TypeError(f"{name} combines in its backward but has no exchange_group_losses (see protocol.py)")
        try:
            error = exchange(assignment.group_means(losses), check_gram=gram)
        finally:
            if engine is not None:
                engine.release()
        if check:
            schedule.checked(signature)
            if cfg.log_every_n_steps and error is not None:
                log_diagnostics(self, {"grain/self_check_error": float(error)})
        return _ExchangedGroups(assignment.num_groups)

    def _grain_accumulate(self, losses: torch.Tensor, batch: Any, groups: Optional[torch.Tensor]) -> None:
        cfg, cycle = self.grain_config, self._grain_cycle
        grouping = as_grouping(cfg.grouping)
        n = losses.shape[0]
        if cfg.accumulate_grad_batches > 1 and cfg.accumulation_groups == "micro_batch":
            assignment = GroupAssignment.from_index(torch.zeros(n, dtype=torch.long))
        elif groups is not None:
            assignment = GroupAssignment.from_index(groups.detach().cpu())
            if assignment.index.shape != (n,):
                raise ValueError(f"groups must have shape ({n},), got {tuple(groups.shape)}")
        else:
            assignment = grouping.assign(n, batch)
        grads = self._grain_group_gradients(losses, assignment)
        cycle.buffer = grads if cycle.buffer is None else cycle.buffer.cat(grads)
        cycle.fractions.append(assignment.fractions / cfg.accumulate_grad_batches)
        key = assignment.keys.reshape(-1).long() if grouping.stable_keys or groups is not None else None
        if key is None:
            key = torch.full((assignment.num_groups,), -1, dtype=torch.long)
        cycle.keys.append(torch.stack([torch.full_like(key, cycle.micro), key], 1))

    def _grain_cycle_step(self, opts: list) -> bool:
        """End of a cycle: ``.grad`` set to the step's gradient (``True``) or the step is skipped (``False``)."""
        cfg, cycle = self.grain_config, self._grain_cycle
        in_backward = self._grain_backward_strategy()
        if in_backward is not None and isinstance(cycle.buffer, _ExchangedGroups):  # grain_fsdp, group by group
            return in_backward.combine_mixin_cycle(
                MixinCycle(
                    self._grain_params(),
                    invalid=cycle.invalid,
                    mean_weights=torch.cat(cycle.fractions),
                    policy=self.grain_policy,
                    groups_exchanged=True,
                    keys=torch.cat(cycle.keys),
                    blocks=self._grain_blocks() if cfg.blockwise and cfg.aggregation == "grain" else None,
                )
            )
        if in_backward is not None:  # grain_fsdp: every rank hands over the loss of its direction
            loss, vote_skip = self._grain_cycle_loss()
            return in_backward.combine_mixin_cycle(
                MixinCycle(self._grain_params(), invalid=cycle.invalid, vote_skip=vote_skip, loss=loss)
            )
        strategy = self._grain_strategy()
        if strategy is None:
            return not cycle.invalid and (cfg.aggregation == "mean" or self._grain_set_direction())
        # grain_ddp: every rank joins the cross-rank combination, even a skipping one
        if strategy.needs_group_gradients and cfg.aggregation == "grain":
            pi = torch.cat(cycle.fractions) if cycle.fractions else None
            return strategy.combine_mixin_cycle(
                MixinCycle(
                    self._grain_params(),
                    invalid=cycle.invalid,
                    group_gradients=cycle.buffer,
                    mean_weights=pi,
                    policy=self.grain_policy,
                )
            )
        vote_skip = False
        if not cycle.invalid and cfg.aggregation == "grain":
            vote_skip = not self._grain_set_direction() and not cycle.invalid
        return strategy.combine_mixin_cycle(
            MixinCycle(self._grain_params(), invalid=cycle.invalid, vote_skip=vote_skip)
        )

    def _grain_cycle_loss(self) -> tuple[Optional[torch.Tensor], bool]:
        """``combines_in_backward``: (the loss whose backward gives this rank's direction, whether this rank's
        policy votes to skip). An invalid or skipping rank still gets a loss (its mean weights), so that every
        rank runs the same backward; the strategy then skips on every rank."""
        cfg, cycle, policy = self.grain_config, self._grain_cycle, self.grain_policy
        if cfg.aggregation == "mean":
            return cycle.loss, False
        grads = cycle.buffer
        if grads is None:
            return None, False
        pi = torch.cat(cycle.fractions)
        pi = pi / pi.sum()
        weights: Optional[torch.Tensor] = None
        if not cycle.invalid:
            gram = grads.gram()
            if not torch.isfinite(gram).all():
                self._grain_nonfinite(self._grain_nonfinite_where(grads))
                cycle.invalid = True
            else:
                decision = policy.decide(gram, pi, keys=torch.cat(cycle.keys))
                if policy.log_now:
                    log_diagnostics(self, policy.diagnostics(gram, decision, pi))
                weights = decision.weights
                if weights is None:
                    return grads.weighted_loss(pi), True
        return grads.weighted_loss(weights if weights is not None else pi), False

    def _grain_set_direction(self) -> bool:
        """Decide over the buffered groups and write ``d`` into ``.grad``; ``False``: skip this step."""
        cycle, policy = self._grain_cycle, self.grain_policy
        grads = cycle.buffer
        pi = torch.cat(cycle.fractions)
        pi = pi / pi.sum()  # a last, partial cycle has fewer than N micro-batches
        keys = torch.cat(cycle.keys)
        gram = grads.gram()
        if not torch.isfinite(gram).all():
            self._grain_nonfinite(self._grain_nonfinite_where(grads))
            cycle.invalid = True
            return False
        if isinstance(grads, BlockwiseResult):  # gradients already written, block by block
            if policy.log_now:
                log_diagnostics(
                    self, {"grain/num_groups": float(gram.shape[0]), "grain/blocks": float(len(grads.solves))}
                )
            return True
        decision = policy.decide(gram, pi, keys=keys)
        if policy.log_now:
            log_diagnostics(self, policy.diagnostics(gram, decision, pi))
        if decision.weights is None:
            return False
        for p, d in zip(self._grain_params(), grads.combine(decision.weights)):
            p.grad = d
        return True

    def _grain_apply(self, opts: list) -> None:
        """Clip, step every optimizer and step-interval scheduler, zero grads, reset the cycle."""
        cfg = self.grain_config
        for opt in opts:
            if cfg.gradient_clip_val is not None:
                self.clip_gradients(
                    opt, gradient_clip_val=cfg.gradient_clip_val, gradient_clip_algorithm=cfg.gradient_clip_algorithm
                )
            opt.step()
        for opt in opts:
            opt.zero_grad()
        self.grain_policy.record_step()
        self._grain_reset_cycle()
        for sched in self.trainer.lr_scheduler_configs:
            if sched.interval == "step" and self.grain_policy.steps % sched.frequency == 0:
                self._grain_step_scheduler(sched)

    def _grain_skip(self) -> None:
        for opt in self._grain_optimizers():
            opt.zero_grad()
        self.grain_policy.record_skip()
        self._grain_reset_cycle()
        if self.grain_config.log_every_n_steps:
            log_diagnostics(self, {"grain/skipped_steps": float(self.grain_policy.skipped)})

    def _grain_reset_cycle(self) -> None:
        self._grain_cycle.release()
        self._grain_cycle = _Cycle()

    def _grain_nonfinite(self, what: str) -> None:
        if self._grain_strategy() is not None:  # the strategy decides for every rank at the end of the cycle
            return
        try:
            self.grain_policy.nonfinite(what, self.trainer.global_step)
        except FloatingPointError:
            self._grain_reset_cycle()
            raise

    def _grain_nonfinite_where(self, grads: Any) -> str:
        if not isinstance(grads, GroupGradients):
            return "non-finite Gram matrix (non-finite gradients or overflow)"
        names = {id(p): n for n, p in self.named_parameters()}
        for p, g in zip(self._grain_params(), grads.grads):
            bad = ~torch.isfinite(g.reshape(g.shape[0], -1)).all(1)
            if bad.any():
                return (
                    f"non-finite gradient of parameter {names.get(id(p), '?')!r} for group {int(bad.nonzero()[0, 0])}"
                )
        return "non-finite Gram matrix (overflow of finite gradients)"

    def _grain_step_scheduler(self, sched: Any) -> None:
        if isinstance(sched.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            # Lightning drops the "monitor" key of scheduler dicts under manual optimization.
            monitor = self.grain_config.plateau_monitor
            if monitor is None:
                raise RuntimeError(
                    "ReduceLROnPlateau under GrainMixin needs GrainConfig(plateau_monitor=...): Lightning ignores "
                    "the scheduler dict's 'monitor' key under manual optimization"
                )
            metric = self.trainer.callback_metrics.get(monitor)
            if metric is None:
                raise RuntimeError(
                    f"ReduceLROnPlateau monitors {monitor!r}, which is not among the logged metrics "
                    f"{sorted(self.trainer.callback_metrics)}"
                )
            sched.scheduler.step(metric)
        else:
            sched.scheduler.step()

    def grain_check_trainer(self) -> None:
        """Refuse the Trainer options that GRAIN replaces, naming the :class:`GrainConfig` option to use.

        Under manual optimization Lightning rejects them too, with a generic message; this runs first (from
        :meth:`configure_callbacks`, the one module hook Lightning calls before its own check).
        """
        trainer = self._trainer
        if trainer is None or trainer.state.fn != "fit":
            return
        n_acc = trainer.accumulate_grad_batches
        if n_acc != 1:
            raise MisconfigurationException(
                f"GrainMixin: Trainer(accumulate_grad_batches={n_acc}) is not supported: GRAIN accumulates the "
                f"group gradients itself. Use GrainConfig(accumulate_grad_batches={n_acc}) and leave the "
                "Trainer's at 1"
            )
        clip = trainer.gradient_clip_val
        algorithm = getattr(trainer.gradient_clip_algorithm, "value", trainer.gradient_clip_algorithm)
        cfg = self.grain_config
        # Lightning's clip_gradients also refuses a Trainer value that differs from GrainConfig's, mid-fit
        if (clip is not None and clip > 0) or (cfg.gradient_clip_val is not None and (clip, algorithm) != (None, None)):
            given = ", ".join(
                f"{name}={value!r}"
                for name, value in (("gradient_clip_val", clip), ("gradient_clip_algorithm", algorithm))
                if value is not None
            )
            use_val = clip if clip is not None and clip > 0 else cfg.gradient_clip_val
            use_algorithm = algorithm if algorithm is not None else cfg.gradient_clip_algorithm
            raise MisconfigurationException(
                f"GrainMixin: Trainer({given}) is not supported: GRAIN clips the combined gradient itself. Use "
                f"GrainConfig(gradient_clip_val={use_val!r}, gradient_clip_algorithm={use_algorithm!r}) and leave "
                "the Trainer's clipping arguments unset"
            )

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def configure_callbacks(self) -> Union[Sequence[Callback], Callback]:
        self.grain_check_trainer()
        parent = getattr(super(), "configure_callbacks", None)
        return parent() if parent is not None else []

    @override
    def on_train_epoch_end(self) -> None:
        parent = getattr(super(), "on_train_epoch_end", None)
        if parent is not None:
            parent()
        for sched in self.trainer.lr_scheduler_configs:
            if sched.interval == "epoch" and (self.current_epoch + 1) % sched.frequency == 0:
                self._grain_step_scheduler(sched)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        parent = getattr(super(), "on_save_checkpoint", None)
        if parent is not None:
            parent(checkpoint)
        micro = self._grain_cycle.micro
        if micro:
            warnings.warn(
                f"checkpoint saved after {micro} of {self.grain_config.accumulate_grad_batches} micro-batches: "
                "their stored group gradients are not saved; a resumed run starts a new accumulation cycle",
                RuntimeWarning,
                stacklevel=2,
            )
        checkpoint["grain_state"] = self.grain_policy.state_dict()

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        parent = getattr(super(), "on_load_checkpoint", None)
        if parent is not None:
            parent(checkpoint)
        saved = checkpoint.get("grain_state")
        if saved is not None:
            self.grain_policy.load_state_dict(saved)
            self._grain_reset_cycle()
