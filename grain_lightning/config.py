r"""Options of GRAIN: the step-policy options shared by every entry point, and :class:`GrainConfig`.

:class:`PolicyOptions` holds what :class:`~grain_lightning.policy.StepPolicy` decides with (solver
tolerance, warm start, collapse and non-finite handling, step length, logging frequency). ``GrainConfig`` (the mixin)
and ``GrainDDPStrategy`` accept these options under the same names, with the same allowed values, and
validate them with :func:`check_policy_options`, so a bad value gets the same message from both.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional, Union

from grain_lightning.groups import Grouping, as_grouping

__all__ = [
    "GrainConfig",
    "POLICY_CHOICES",
    "POLICY_FIELDS",
    "PolicyOptions",
    "check_choices",
    "check_policy_options",
    "as_self_check",
    "check_self_check",
]

#: allowed values of the step-policy options with a fixed set of choices
POLICY_CHOICES: dict[str, tuple[str, ...]] = {
    "on_collapse": ("mean", "skip", "mix"),
    "on_nonfinite": ("raise", "skip"),
    "step_norm": ("grain", "mean"),
}

#: allowed values of the mixin's own options
_MIXIN_CHOICES: dict[str, tuple[str, ...]] = {
    "aggregation": ("grain", "mean"),
    "accumulation_groups": ("all", "micro_batch"),
    "gradient_clip_algorithm": ("norm", "value"),
    "engine": ("auto", "ghost", "reference"),
    "unsupported": ("fallback", "raise"),
    "ghost_combine": ("bookkeeping", "backward"),
}


def check_choices(owner: str, values: dict[str, Any], choices: dict[str, tuple[str, ...]]) -> None:
    """Raise ``ValueError("<owner>: <name> must be one of (...), got <value>")`` for the first bad value."""
    for name, allowed in choices.items():
        if name in values and values[name] not in allowed:
            raise ValueError(f"{owner}: {name} must be one of {allowed}, got {values[name]!r}")


def as_self_check(when: Any) -> Any:
    """``self_check`` as given on a command line or in YAML: ``"3"`` -> ``3``, ``"true"`` / ``"false"`` -> bool
    (jsonargparse hands ``Union[str, int, bool]`` values over as strings); anything else unchanged."""
    if isinstance(when, str):
        text = when.strip().lower()
        if text.isdigit():
            return int(text)
        if text in ("true", "false"):
            return text == "true"
    return when


def check_self_check(owner: str, when: Any) -> None:
    """``self_check`` must be ``"first"``, ``"off"``, a bool or an int ``N >= 0``."""
    if when in ("first", "off") and isinstance(when, str):
        return
    if isinstance(when, bool) or (isinstance(when, int) and when >= 0):
        return
    raise ValueError(
        f"{owner}: self_check must be 'first', an int N >= 0 (every N optimizer steps) or False, got {when!r}"
    )


def check_policy_options(owner: str, values: dict[str, Any]) -> None:
    """Validate the step-policy options in ``values`` (a subset is fine); messages name ``owner``."""
    check_choices(owner, values, POLICY_CHOICES)
    if "collapse_eps" in values and not values["collapse_eps"] >= 0:
        raise ValueError(f"{owner}: collapse_eps must be >= 0, got {values['collapse_eps']!r}")
    if "collapse_mix" in values and not 0.0 <= values["collapse_mix"] <= 1.0:
        raise ValueError(f"{owner}: collapse_mix must be in [0, 1], got {values['collapse_mix']!r}")
    if "solver_tol" in values and not 0.0 < values["solver_tol"] < 1.0:
        raise ValueError(f"{owner}: solver_tol must be in (0, 1), got {values['solver_tol']!r}")
    every = values.get("log_every_n_steps", 0)
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise ValueError(f"{owner}: log_every_n_steps must be an int >= 0, got {every!r}")


@dataclass(frozen=True)
class PolicyOptions:
    """The options of the one GRAIN decision (:class:`~grain_lightning.policy.StepPolicy`).

    Args:
        solver_tol: KKT tolerance of the min-norm solver, relative to ``trace(G)``.
        warm_start: start the solver from the previous step's weights when the groups are the same.
        collapse_eps: the direction collapses when ``||d|| <= collapse_eps * ||mean||`` (a Pareto-stationary
            point: no direction decreases every group's loss).
        on_collapse: then ``"mean"`` (use the plain mean), ``"skip"`` (no optimizer step) or ``"mix"``
            (weights ``(1 - collapse_mix) w* + collapse_mix * pi``, still a convex combination).
        collapse_mix: mixing coefficient for ``on_collapse="mix"``, in ``[0, 1]``.
        on_nonfinite: non-finite losses or gradients: ``"raise"`` (``FloatingPointError``) or ``"skip"``
            the step with a ``RuntimeWarning``; they never reach the weights.
        step_norm: the length of the step: ``"grain"`` (``d = sum_k w_k g_k`` as solved) or ``"mean"`` (``d``
            rescaled to the norm of the plain mean gradient, ``d' = d ||m|| / ||d||``; the direction is GRAIN's,
            the length plain training's), to tell the effect of the direction from that of a shorter step.
            Computed from the Gram; see :meth:`~grain_lightning.policy.StepPolicy.decide`.
        log_every_n_steps: log the diagnostics every this many applied steps (0: never), whatever the
            Trainer's ``log_every_n_steps``.
    """

    solver_tol: float = 1e-12
    warm_start: bool = True
    collapse_eps: float = 1e-3
    on_collapse: str = "mean"
    collapse_mix: float = 0.5
    on_nonfinite: str = "raise"
    step_norm: str = "grain"
    log_every_n_steps: int = 1

    def __post_init__(self) -> None:
        check_policy_options(type(self).__name__, {f.name: getattr(self, f.name) for f in fields(self)})

    @classmethod
    def from_values(cls, owner: str, values: dict[str, Any]) -> PolicyOptions:
        """The options named in ``values`` (other keys ignored), validated with messages naming ``owner``."""
        names = {f.name for f in fields(cls)}
        mine = {k: v for k, v in values.items() if k in names}
        check_policy_options(owner, mine)
        return cls(**mine)


#: names of the step-policy options (attributes of both ``PolicyOptions`` and ``GrainConfig``)
POLICY_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(PolicyOptions))


@dataclass
class GrainConfig:
    """Options of :class:`~grain_lightning.GrainMixin`.

    Args:
        grouping: how a batch splits into groups: ``"sample"`` (one per sample), an int ``k`` or a string of
            digits (``"4"``, as the command line gives it: ``k`` contiguous chunks), ``"key:NAME"`` or a
            :class:`~grain_lightning.groups.Grouping` such as ``ByKey("label")``.
        aggregation: ``"grain"`` (min-norm combination) or ``"mean"`` (plain training, for comparison).
        accumulate_grad_batches: micro-batches per optimizer step (``N``). Use this, not the Trainer's
            argument (the mixin refuses ``Trainer(accumulate_grad_batches=N)``, naming this option).
        accumulation_groups: with ``N > 1``: ``"all"``, every group of every micro-batch is a group (exact;
            stores ``sum_i k_i`` gradients), or ``"micro_batch"``, each micro-batch's mean gradient is one
            group (stores ``N`` gradients).
        gradient_clip_val: clip the combined gradient (``None``: no clipping). Use this (and
            ``gradient_clip_algorithm``), not the Trainer's arguments, which the mixin refuses.
        gradient_clip_algorithm: ``"norm"`` or ``"value"``.
        collapse_eps, on_collapse, collapse_mix, on_nonfinite, step_norm, log_every_n_steps, solver_tol,
            warm_start: the step-policy options, see :class:`PolicyOptions`. Under ``grain_ddp`` with several
            ranks, the strategy's ``on_nonfinite`` applies instead, so that every rank takes the same action.
            ``step_norm="mean"`` needs ``blockwise=False`` (the one-backward engine's block-wise mode writes
            each module's min-norm direction as the backward reaches it, without the step policy's decision).
        log_loss_as: name under which the batch's mean loss is logged (``None``: not logged).
        plateau_monitor: the logged metric a ``ReduceLROnPlateau`` scheduler steps on (Lightning ignores the
            scheduler dict's ``monitor`` under manual optimization).
        batched_backward: compute the group gradients with one vmapped backward instead of ``k``
            (reference engine).
        engine: which engine computes the group Gram: ``"auto"`` (the one-backward
            :class:`~grain_lightning.ghost.GhostEngine` when it handles every trainable parameter exactly,
            else the reference engine), ``"ghost"`` (one-backward engine, with ``unsupported`` deciding about
            the rest) or ``"reference"`` (one backward per group).
        unsupported: with ``engine="ghost"``: ``"fallback"`` (reference engine for parameters of unsupported
            modules) or ``"raise"``.
        blockwise: a separate min-norm solve per module (block) instead of one global solve (one-backward
            engine only, ``accumulate_grad_batches=1``); see :meth:`GhostEngine.blockwise_backward`.
        ghost_combine: how the one-backward engine forms the combined gradient: ``"bookkeeping"`` (from
            stored activations, no second backward) or ``"backward"`` (one weighted second backward, no
            storage: the peak memory of a plain step).
        self_check: when the one-backward engine is compared with autograd on random group weights
            (:mod:`~grain_lightning.ghost.self_check`; one extra backward on a checked step): ``"first"``
            (the first step, and the first step of every new set of layer input shapes), an int ``N``
            (every ``N`` optimizer steps, the first included) or ``False`` (never). A mismatch raises naming
            the parameters (``unsupported="raise"``) or sends them to the reference engine for good.
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
    step_norm: str = "grain"
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
    self_check: Union[str, int, bool] = "first"

    def __post_init__(self) -> None:
        owner = "GrainConfig"
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        check_choices(owner, values, _MIXIN_CHOICES)
        self.self_check = as_self_check(self.self_check)
        check_self_check(owner, self.self_check)
        PolicyOptions.from_values(owner, values)
        self.grouping = as_grouping(self.grouping)
        n_acc = self.accumulate_grad_batches
        if isinstance(n_acc, bool) or not isinstance(n_acc, int) or n_acc < 1:
            raise ValueError(f"{owner}: accumulate_grad_batches must be an int >= 1, got {n_acc!r}")
        if self.gradient_clip_val is not None and not self.gradient_clip_val > 0:
            raise ValueError(f"{owner}: gradient_clip_val must be > 0 or None, got {self.gradient_clip_val!r}")
        if self.blockwise and (self.engine == "reference" or n_acc > 1):
            raise ValueError(
                f"{owner}: blockwise needs engine='auto' or 'ghost' and accumulate_grad_batches=1, got "
                f"engine={self.engine!r}, accumulate_grad_batches={n_acc}"
            )
        if self.blockwise and self.step_norm != "grain":
            raise ValueError(
                f"{owner}: step_norm={self.step_norm!r} needs blockwise=False: block-wise mode writes each "
                "module's min-norm direction during the backward, without the step policy's rescaling"
            )

    @property
    def policy_options(self) -> PolicyOptions:
        """The step-policy options of this config (validated)."""
        return PolicyOptions.from_values("GrainConfig", {name: getattr(self, name) for name in POLICY_FIELDS})
