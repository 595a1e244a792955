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
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch

from grain_lightning.diagnostics import grain_diagnostics
from grain_lightning.engine import GroupGradients, group_gradients, trainable_parameters
from grain_lightning.ghost import GhostEngine
from grain_lightning.groups import GroupAssignment, Grouping, as_grouping
from grain_lightning.solver import solve_min_norm

__all__ = ["GrainConfig", "GrainMixin"]

_CHOICES = {
    "aggregation": ("grain", "mean"),
    "accumulation_groups": ("all", "micro_batch"),
    "gradient_clip_algorithm": ("norm", "value"),
    "on_collapse": ("mean", "skip", "mix"),
    "on_nonfinite": ("raise", "skip"),
    "engine": ("auto", "ghost", "reference"),
    "unsupported": ("fallback", "raise"),
    "ghost_combine": ("bookkeeping", "backward"),
}


@dataclass
class GrainConfig:
    """Options of :class:`GrainMixin`.

    Args:
        grouping: how a batch splits into groups: ``"sample"`` (one per sample), an int ``k`` (``k``
            contiguous chunks), ``"key:NAME"`` or a :class:`~grain_lightning.groups.Grouping` such as
            ``ByKey("label")``.
        aggregation: ``"grain"`` (min-norm combination) or ``"mean"`` (plain training, for comparison).
        accumulate_grad_batches: micro-batches per optimizer step (``N``). Use this, not the Trainer's
            argument (Lightning rejects it under manual optimization).
        accumulation_groups: with ``N > 1``: ``"all"``, every group of every micro-batch is a group (exact;
            stores ``sum_i k_i`` gradients), or ``"micro_batch"``, each micro-batch's mean gradient is one
            group (stores ``N`` gradients).
        gradient_clip_val: clip the combined gradient (``None``: no clipping).
        gradient_clip_algorithm: ``"norm"`` or ``"value"``.
        collapse_eps: the direction collapses when ``||d|| <= collapse_eps * ||mean||`` (a Pareto-stationary
            point: no direction decreases every group's loss).
        on_collapse: then ``"mean"`` (use the plain mean), ``"skip"`` (no optimizer step) or ``"mix"``
            (weights ``(1 - collapse_mix) w* + collapse_mix * pi``, still a convex combination).
        collapse_mix: mixing coefficient for ``on_collapse="mix"``, in ``[0, 1]``.
        on_nonfinite: non-finite losses or gradients: ``"raise"`` (``FloatingPointError``) or ``"skip"``
            the step with a warning; they never reach the weights. Under ``grain_ddp`` with several ranks,
            the strategy's ``on_nonfinite`` applies instead, so that every rank takes the same action.
        log_every_n_steps: log the diagnostics every this many optimizer steps (0: never).
        log_loss_as: name under which the batch's mean loss is logged (``None``: not logged).
        plateau_monitor: the logged metric a ``ReduceLROnPlateau`` scheduler steps on (Lightning ignores the
            scheduler dict's ``monitor`` under manual optimization).
        solver_tol: KKT tolerance of the min-norm solver, relative to ``trace(G)``.
        warm_start: start the solver from the previous step's weights when the groups are the same.
        batched_backward: compute the group gradients with one vmapped backward instead of ``k``
            (reference engine).
        engine: ``"auto"`` (the one-backward :class:`~grain_lightning.ghost.GhostEngine` when it handles every
            trainable parameter exactly, else the reference engine), ``"ghost"`` (one-backward engine, with
            ``unsupported`` deciding about the rest) or ``"reference"`` (one backward per group).
        unsupported: with ``engine="ghost"``: ``"fallback"`` (reference engine for parameters of unsupported
            modules) or ``"raise"``.
        blockwise: a separate min-norm solve per module (block) instead of one global solve (one-backward
            engine only, ``accumulate_grad_batches=1``); see :meth:`GhostEngine.blockwise_backward`.
        ghost_combine: how the one-backward engine forms the combined gradient: ``"bookkeeping"`` (from
            stored activations, no second backward) or ``"backward"`` (one weighted second backward, no
            storage: the peak memory of a plain step).
    """

    grouping: Union[Grouping, str, int] = "sample"
    aggregation: str = "grain"
    accumulate_grad_batches: int = 1
    accumulation_groups: str = "all"
    gradient_clip_val: Optional[float] = None
    gradient_clip_algorithm: str = "norm"
    collapse_eps: float = 1e-3
    on_collapse: str = "mean"
    collapse_mix: float = 0.5
    on_nonfinite: str = "raise"
    log_every_n_steps: int = 1
    log_loss_as: Optional[str] = "train_loss"
    plateau_monitor: Optional[str] = None
    solver_tol: float = 1e-12
    warm_start: bool = True
    batched_backward: bool = False
    engine: str = "auto"
    unsupported: str = "fallback"
    blockwise: bool = False
    ghost_combine: str = "bookkeeping"

    def __post_init__(self) -> None:
        for name, allowed in _CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"GrainConfig.{name} must be one of {allowed}, got {value!r}")
        self.grouping = as_grouping(self.grouping)
        if not isinstance(self.accumulate_grad_batches, int) or self.accumulate_grad_batches < 1:
            raise ValueError(f"GrainConfig.accumulate_grad_batches must be an int >= 1, got {self.accumulate_grad_batches!r}")
        if self.gradient_clip_val is not None and not self.gradient_clip_val > 0:
            raise ValueError(f"GrainConfig.gradient_clip_val must be > 0 or None, got {self.gradient_clip_val!r}")
        if not self.collapse_eps >= 0:
            raise ValueError(f"GrainConfig.collapse_eps must be >= 0, got {self.collapse_eps!r}")
        if not 0.0 <= self.collapse_mix <= 1.0:
            raise ValueError(f"GrainConfig.collapse_mix must be in [0, 1], got {self.collapse_mix!r}")
        if not isinstance(self.log_every_n_steps, int) or self.log_every_n_steps < 0:
            raise ValueError(f"GrainConfig.log_every_n_steps must be an int >= 0, got {self.log_every_n_steps!r}")
        if self.blockwise and (self.engine == "reference" or self.accumulate_grad_batches > 1):
            raise ValueError(
                "GrainConfig.blockwise needs engine='auto' or 'ghost' and accumulate_grad_batches=1, got "
                f"engine={self.engine!r}, accumulate_grad_batches={self.accumulate_grad_batches}"
            )


@dataclass
class _GrainState:
    micro: int = 0  # micro-batches seen in the current accumulation cycle
    buffer: Optional[Any] = None  # GroupGradients, GhostGradients or a BlockwiseResult
    fractions: list[torch.Tensor] = field(default_factory=list)  # mean weights of buffered groups
    keys: list[torch.Tensor] = field(default_factory=list)  # (k_i, 2) [micro-batch, group key]
    skip_cycle: bool = False  # a non-finite micro-batch was skipped: drop the whole cycle
    prev_weights: Optional[torch.Tensor] = None
    prev_keys: Optional[torch.Tensor] = None
    steps: int = 0
    skipped: int = 0
    collapsed: int = 0


class GrainMixin:
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
    ``on_save_checkpoint`` or ``on_load_checkpoint``, call ``super()`` (epoch-interval LR schedulers
    and the solver's warm start live there).
    """

    def __init__(self, *args: Any, grain: Optional[GrainConfig] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if grain is not None and not isinstance(grain, GrainConfig):
            raise TypeError(f"grain must be a GrainConfig, got {type(grain).__name__}")
        self.grain_config = grain if grain is not None else GrainConfig()
        self.automatic_optimization = False
        self._grain = _GrainState()

    # ------------------------------------------------------------------ user-facing API
    def grain_losses(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Return the ``(n,)`` per-sample losses of ``batch`` (``reduction="none"``). Implement this."""
        raise TypeError(
            f"{type(self).__name__} uses GrainMixin: implement grain_losses(batch, batch_idx) returning (n,) "
            "per-sample losses, or override training_step and call self.grain_step(losses, batch)"
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        with self.grain_capture():
            losses = self.grain_losses(batch, batch_idx)
        return self.grain_step(losses, batch)

    def grain_capture(self) -> contextlib.AbstractContextManager:
        """Context for the forward that computes the losses, so the one-backward engine can record it.

        ``training_step`` uses it around :meth:`grain_losses`; wrap your forward in it when you override
        ``training_step``. Without it, the step falls back to the reference engine (``engine="auto"``) or
        raises (``engine="ghost"``).
        """
        engine = self._grain_ghost_engine() if self.grain_config.aggregation == "grain" else None
        return engine.capture() if engine is not None else contextlib.nullcontext()

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
        cfg, st = self.grain_config, self._grain
        if not isinstance(losses, torch.Tensor) or losses.ndim != 1 or losses.numel() == 0:
            shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise ValueError(
                f"grain_step expects (n,) per-sample losses (use reduction='none' and reduce any other dims), got {shape}"
            )
        self._grain_check_setup()
        mean_loss = losses.detach().float().mean()
        if cfg.log_loss_as:
            self.log(cfg.log_loss_as, mean_loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=losses.shape[0])
        n_acc = cfg.accumulate_grad_batches
        last = st.micro + 1 >= n_acc or bool(self.trainer.is_last_batch)
        opts = self._grain_optimizers()
        if st.micro == 0:
            for opt in opts:
                opt.zero_grad()
        if not torch.isfinite(losses.detach()).all():
            bad = int(torch.nonzero(~torch.isfinite(losses.detach()))[0, 0])
            self._grain_nonfinite(f"per-sample loss {bad} is {float(losses[bad])}")
            st.skip_cycle = True
        elif cfg.aggregation == "mean":
            self.manual_backward(losses.mean() / n_acc)
        else:
            self._grain_accumulate(losses, batch, groups)
        st.micro += 1
        if last:
            if self._grain_distributed():  # grain_ddp: every rank joins the cross-rank step, even a skipping one
                self.trainer.strategy.grain_mixin_step(self, opts)
            elif st.skip_cycle:
                self._grain_skip()
            elif cfg.aggregation == "mean":
                self._grain_apply(opts)
            else:
                self._grain_solve_and_apply(opts)
        return mean_loss

    # ------------------------------------------------------------------ internals
    def _grain_check_setup(self) -> None:
        trainer = self.trainer
        if trainer.world_size > 1 and not getattr(trainer.strategy, "supports_grain_mixin", False):
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

    def _grain_distributed(self) -> bool:
        """Whether a distributed GRAIN strategy (``grain_ddp``) combines this module's ranks."""
        return self.trainer.world_size > 1 and getattr(self.trainer.strategy, "supports_grain_mixin", False)

    def _grain_optimizers(self) -> list:
        opts = self.optimizers()
        return list(opts) if isinstance(opts, (list, tuple)) else [opts]

    def _grain_params(self, opts: list) -> list[torch.Tensor]:
        return trainable_parameters(p for opt in opts for group in opt.param_groups for p in group["params"])

    def _grain_ghost_engine(self) -> Optional[GhostEngine]:
        """The one-backward engine for the current parameters, or ``None`` when the reference engine is used."""
        cfg = self.grain_config
        if cfg.engine == "reference":
            return None
        params = self._grain_params(self._grain_optimizers())
        engine = getattr(self, "_grain_engine", None)
        if engine is None or [id(p) for p in engine.params] != [id(p) for p in params]:
            unsupported = "fallback" if cfg.engine == "auto" else cfg.unsupported
            engine = GhostEngine(self, params=params, unsupported=unsupported, combine=cfg.ghost_combine)
            self._grain_engine = engine
        if cfg.engine == "auto" and not engine.fully_supported:
            if cfg.blockwise:
                raise RuntimeError(
                    f"GrainConfig(blockwise=True): modules {list(engine.fallback_reasons) or engine._coupled()} are "
                    "not supported by the one-backward engine; use engine='ghost' (their parameters form one "
                    "block solved by the reference engine)"
                )
            return None
        return engine

    def _grain_group_gradients(self, losses: torch.Tensor, assignment: GroupAssignment) -> Any:
        """Group gradients (reference), a GhostGradients (one backward) or a BlockwiseResult."""
        cfg = self.grain_config
        engine = self._grain_ghost_engine()
        if engine is not None and not engine.captured:
            if cfg.engine == "ghost" or cfg.blockwise:
                raise RuntimeError(
                    "GrainConfig(engine='ghost'/blockwise) needs the forward recorded: compute the losses inside "
                    "`with self.grain_capture():` when you override training_step"
                )
            engine = None
        if engine is None:
            return group_gradients(assignment.group_means(losses), self._grain_params(self._grain_optimizers()),
                                   batched=cfg.batched_backward)
        if cfg.blockwise:
            return engine.blockwise_backward(losses, assignment, tol=cfg.solver_tol)
        if cfg.accumulate_grad_batches > 1 or self._grain_strategy_needs_group_gradients():
            # groups of other micro-batches (or of other ranks) need these gradients
            return engine.group_gradients(losses, assignment)
        return engine.backward(losses, assignment)

    def _grain_strategy_needs_group_gradients(self) -> bool:
        """``grain_ddp`` with ``mixin_groups="global"`` solves over every group of every rank."""
        strategy = self.trainer.strategy if self._trainer is not None else None
        return bool(getattr(strategy, "needs_group_gradients", False))

    def _grain_accumulate(self, losses: torch.Tensor, batch: Any, groups: Optional[torch.Tensor]) -> None:
        cfg, st = self.grain_config, self._grain
        n = losses.shape[0]
        if cfg.accumulate_grad_batches > 1 and cfg.accumulation_groups == "micro_batch":
            assignment = GroupAssignment.from_index(torch.zeros(n, dtype=torch.long))
        elif groups is not None:
            assignment = GroupAssignment.from_index(groups.detach().cpu())
            if assignment.index.shape != (n,):
                raise ValueError(f"groups must have shape ({n},), got {tuple(groups.shape)}")
        else:
            assignment = cfg.grouping.assign(n, batch)
        grads = self._grain_group_gradients(losses, assignment)
        st.buffer = grads if st.buffer is None else st.buffer.cat(grads)
        st.fractions.append(assignment.fractions / cfg.accumulate_grad_batches)
        key = assignment.keys.reshape(-1).long() if cfg.grouping.stable_keys or groups is not None else None
        if key is None:
            key = torch.full((assignment.num_groups,), -1, dtype=torch.long)
        st.keys.append(torch.stack([torch.full_like(key, st.micro), key], 1))

    def _grain_solve_and_apply(self, opts: list) -> None:
        if self._grain_set_direction(opts):
            self._grain_apply(opts)
        else:
            self._grain_skip()

    def _grain_set_direction(self, opts: list) -> bool:
        """Solve over the buffered groups and write ``d`` into ``.grad``; ``False``: skip this step."""
        cfg, st = self.grain_config, self._grain
        grads = st.buffer
        pi = torch.cat(st.fractions)
        pi = pi / pi.sum()  # a last, partial cycle has fewer than N micro-batches
        keys = torch.cat(st.keys)
        gram = grads.gram()
        if not torch.isfinite(gram).all():
            self._grain_nonfinite(self._grain_nonfinite_where(grads))
            st.skip_cycle = True
            return False
        if cfg.blockwise:  # gradients already written, block by block
            if cfg.log_every_n_steps and st.steps % cfg.log_every_n_steps == 0:
                self.log_dict({"grain/num_groups": float(gram.shape[0]), "grain/blocks": float(len(grads.solves))},
                              on_step=True, on_epoch=False)
            return True
        init = None
        if cfg.warm_start and st.prev_keys is not None and (keys >= 0).all() and torch.equal(st.prev_keys, keys):
            init = st.prev_weights
        res = solve_min_norm(gram, init=init, tol=cfg.solver_tol)
        if not res.converged and res.kkt_gap > 1e-9 * float(torch.trace(gram)):
            warnings.warn(
                f"GRAIN: min-norm solve stopped at KKT gap {res.kkt_gap:.3e} "
                f"(trace {float(torch.trace(gram)):.3e}); <d, g_k> >= 0 may fail by that much",
                RuntimeWarning,
                stacklevel=2,
            )
        weights = res.weights
        mean_norm2 = float(pi @ gram @ pi)
        collapsed = mean_norm2 > 0 and math.sqrt(max(res.objective, 0.0)) <= cfg.collapse_eps * math.sqrt(mean_norm2)
        if collapsed:
            st.collapsed += 1
            if cfg.on_collapse == "skip":
                self._grain_log(gram, weights, pi, collapsed=True)
                return False
            weights = pi if cfg.on_collapse == "mean" else (1.0 - cfg.collapse_mix) * weights + cfg.collapse_mix * pi
        params = self._grain_params(opts)
        for p, d in zip(params, grads.combine(weights)):
            p.grad = d
        st.prev_weights, st.prev_keys = res.weights, keys
        self._grain_log(gram, res.weights, pi, collapsed=collapsed, kkt_gap=res.kkt_gap)
        return True

    def _grain_apply(self, opts: list) -> None:
        """Clip, step every optimizer and step-interval scheduler, zero grads, reset the cycle."""
        cfg, st = self.grain_config, self._grain
        for opt in opts:
            if cfg.gradient_clip_val is not None:
                self.clip_gradients(opt, gradient_clip_val=cfg.gradient_clip_val,
                                    gradient_clip_algorithm=cfg.gradient_clip_algorithm)
            opt.step()
        for opt in opts:
            opt.zero_grad()
        st.steps += 1
        self._grain_reset_cycle()
        for sched in self.trainer.lr_scheduler_configs:
            if sched.interval == "step" and st.steps % sched.frequency == 0:
                self._grain_step_scheduler(sched)

    def _grain_skip(self) -> None:
        st = self._grain
        for opt in self._grain_optimizers():
            opt.zero_grad()
        st.skipped += 1
        self._grain_reset_cycle()
        if self.grain_config.log_every_n_steps:
            self.log("grain/skipped_steps", float(st.skipped), on_step=True, on_epoch=False)

    def _grain_reset_cycle(self) -> None:
        st = self._grain
        if hasattr(st.buffer, "release"):  # the one-backward engine's stored activations or graph
            st.buffer.release()
        st.micro, st.buffer, st.fractions, st.keys, st.skip_cycle = 0, None, [], [], False

    def _grain_nonfinite(self, what: str) -> None:
        if self._grain_distributed():  # the strategy decides for every rank at the end of the cycle
            return
        msg = f"GRAIN: {what} at global step {self.trainer.global_step}"
        if self.grain_config.on_nonfinite == "raise":
            self._grain_reset_cycle()
            raise FloatingPointError(msg + " (set GrainConfig(on_nonfinite='skip') to skip such steps)")
        warnings.warn(msg + ": skipping this optimizer step", RuntimeWarning, stacklevel=3)

    def _grain_nonfinite_where(self, grads: GroupGradients) -> str:
        if not isinstance(grads, GroupGradients):
            return "non-finite Gram matrix (non-finite gradients or overflow)"
        names = {id(p): n for n, p in self.named_parameters()}
        params = self._grain_params(self._grain_optimizers())
        for p, g in zip(params, grads.grads):
            bad = ~torch.isfinite(g.reshape(g.shape[0], -1)).all(1)
            if bad.any():
                return f"non-finite gradient of parameter {names.get(id(p), '?')!r} for group {int(bad.nonzero()[0, 0])}"
        return "non-finite Gram matrix (overflow of finite gradients)"

    def _grain_log(self, gram, weights, pi, *, collapsed: bool, kkt_gap: float = 0.0) -> None:
        every = self.grain_config.log_every_n_steps
        if not every or self._grain.steps % every:
            return
        diag = grain_diagnostics(gram, weights, pi)
        diag["grain/collapsed"] = float(collapsed)
        self.log_dict(diag, on_step=True, on_epoch=False)

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

    # ------------------------------------------------------------------ Lightning hooks
    def on_train_epoch_end(self) -> None:
        parent = getattr(super(), "on_train_epoch_end", None)
        if parent is not None:
            parent()
        for sched in self.trainer.lr_scheduler_configs:
            if sched.interval == "epoch" and (self.current_epoch + 1) % sched.frequency == 0:
                self._grain_step_scheduler(sched)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        parent = getattr(super(), "on_save_checkpoint", None)
        if parent is not None:
            parent(checkpoint)
        st = self._grain
        if st.micro:
            warnings.warn(
                f"checkpoint saved after {st.micro} of {self.grain_config.accumulate_grad_batches} micro-batches: "
                "their stored group gradients are not saved; a resumed run starts a new accumulation cycle",
                RuntimeWarning,
                stacklevel=2,
            )
        checkpoint["grain_state"] = {
            "prev_weights": st.prev_weights,
            "prev_keys": st.prev_keys,
            "steps": st.steps,
            "skipped": st.skipped,
            "collapsed": st.collapsed,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        parent = getattr(super(), "on_load_checkpoint", None)
        if parent is not None:
            parent(checkpoint)
        saved = checkpoint.get("grain_state")
        if saved is not None:
            st = self._grain
            st.prev_weights, st.prev_keys = saved["prev_weights"], saved["prev_keys"]
            st.steps, st.skipped, st.collapsed = saved["steps"], saved["skipped"], saved["collapsed"]
            self._grain_reset_cycle()
