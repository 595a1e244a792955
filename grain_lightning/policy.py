r"""The one GRAIN decision: from a group Gram and the plain-mean weights to the weights of the step.

Every entry point (the mixin, ``grain_ddp``, the functional API, the engines' block-wise mode) hands its
Gram to a :class:`StepPolicy`; nothing else calls the solver. Given ``G`` (``k x k``, or ``B x k x k`` for
``B`` independent blocks) and the mean weights ``pi`` (``n_j / n``)::

    w*  = argmin_{w in simplex} w^T G_b w          per block (grain_lightning.solver), warm-started from
                                                   the last step's w* when the group keys are the same
    d^2 = sum_b w*_b^T G_b w*_b,   m^2 = sum_b pi^T G_b pi
    collapsed  <=>  m^2 > 0  and  sqrt(d^2) <= collapse_eps * sqrt(m^2)       (Pareto-stationary point)

and the applied weights are ``w*``, or on collapse ``pi`` (``"mean"``), ``(1 - c) w* + c pi`` (``"mix"``,
``c = collapse_mix``) or none (``"skip"``). With ``step_norm="mean"`` the applied weights ``w`` of each block
are then scaled so that the step has the plain mean's length (the combination is linear, so
``combine(s_b w_b) = s_b d_b``)::

    s_b = sqrt(pi^T G_b pi / w_b^T G_b w_b)   if ||d_b|| > collapse_eps ||m_b||,   else 1

One block (the usual case): ``||d'|| = ||m||`` and ``d'`` has GRAIN's direction. Several blocks (``grain_ddp``
``mode="blockwise"``): each block's part of the step gets the length of the mean's part in that block, so
``||d'|| = ||m||`` unless a block is at a stationary point. A block with ``||d_b|| <= collapse_eps ||m_b||``
is not stretched (``s_b = 1``), so ``s_b <= 1 / collapse_eps`` and nothing is divided by zero: ``w^T G w = 0``
with ``m != 0`` is a collapse, handled first by ``on_collapse``, and the weights it leaves are scaled only if
their step is longer than that (``"mean"``: ``s = 1``; ``"mix"``: ``||d|| >= c ||m||``).

Non-finite losses or Grams either raise ``FloatingPointError`` or skip the step with a ``RuntimeWarning``
(``on_nonfinite``). The policy keeps the warm-start state and the step / skip / collapse counters (saved in
checkpoints) and computes the logged diagnostics.

Cost: the solve (``O(k^2)`` per iteration, ``k <= 2`` in closed form) and ``O(B k^2)`` for the rest.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from grain_lightning.config import PolicyOptions
from grain_lightning.diagnostics import blockwise_diagnostics, grain_diagnostics
from grain_lightning.solver import MinNormResult, solve_min_norm

__all__ = ["Decision", "StepPolicy"]


@dataclass
class Decision:
    """What :meth:`StepPolicy.decide` chose.

    Attributes:
        weights: ``(k,)`` (or ``(B, k)``) float64 weights to combine the groups with; ``None``: skip the step.
        solved: the solver's min-norm weights, same shape (before collapse handling).
        collapsed: whether ``||d|| <= collapse_eps * ||mean||``.
        kkt_gap: largest solver KKT gap over the blocks, in the units of ``G``.
        step_scale: with ``step_norm="mean"``, ``||d'|| / ||d||``, the factor the step was stretched by (the
            block factor ``s`` for one block); ``None`` otherwise or when the step is skipped.
    """

    weights: Optional[Tensor]
    solved: Tensor
    collapsed: bool
    kkt_gap: float
    step_scale: Optional[float] = None

    @property
    def skip(self) -> bool:
        return self.weights is None


class StepPolicy:
    """Solve, warm start, collapse, non-finite handling, counters and diagnostics of GRAIN steps.

    Args:
        options: the :class:`~grain_lightning.config.PolicyOptions`.
        owner: prefix of messages (``"GRAIN"``, ``"grain_ddp"``).
        nonfinite_hint: how to change ``on_nonfinite``, appended to the ``FloatingPointError``.
        warn: how warnings are issued (``warnings.warn``; ``rank_zero_warn`` for one message per job).

    Attributes ``steps``, ``skipped`` and ``collapsed`` count applied steps, skipped steps and collapses.
    """

    def __init__(
        self,
        options: Optional[PolicyOptions] = None,
        *,
        owner: str = "GRAIN",
        nonfinite_hint: str = "set on_nonfinite='skip' to skip such steps",
        warn: Callable[..., Any] = warnings.warn,
    ) -> None:
        self.options = options if options is not None else PolicyOptions()
        self.owner, self.nonfinite_hint, self.warn = owner, nonfinite_hint, warn
        self.prev_weights: Optional[Tensor] = None
        self.prev_keys: Optional[Tensor] = None
        self.steps = 0
        self.skipped = 0
        self.collapsed = 0

    # ------------------------------------------------------------------ the decision

    @classmethod
    def across_ranks(
        cls, strategy: str, name: str, values: dict[str, Any], warn: Callable[..., Any] = warnings.warn
    ) -> StepPolicy:
        """The policy of a multi-rank strategy: ``values`` validated as the options of class ``strategy`` (errors
        name it), diagnostics and messages under its registered ``name``, warnings through ``warn`` (rank 0's), and
        a non-finite error that says every rank raises and how to skip instead."""
        return cls(
            PolicyOptions.from_values(strategy, values),
            owner=name,
            warn=warn,
            nonfinite_hint=f"every rank raises; {strategy}(on_nonfinite='skip') skips such steps on every rank",
        )

    def solve(self, gram: Tensor, *, init: Optional[Tensor] = None) -> MinNormResult:
        """Min-norm weights of one ``(k, k)`` Gram; warns when the solver stops short of ``solver_tol``."""
        res = solve_min_norm(gram, init=init, tol=self.options.solver_tol)
        trace = float(torch.trace(gram.double()))
        if not res.converged and res.kkt_gap > 1e-9 * trace:
            self.warn(
                f"{self.owner}: min-norm solve stopped at KKT gap {res.kkt_gap:.3e} (trace {trace:.3e}); "
                "<d, g_k> >= 0 may fail by that much",
                category=RuntimeWarning,
                stacklevel=3,
            )
        return res

    def min_norm(self, gram: Tensor, *, init: Optional[Tensor] = None) -> Decision:
        """The plain min-norm weights of each block of ``gram`` (``(k, k)`` or ``(B, k, k)``): no collapse
        handling, no state. ``init`` warm-starts a single block."""
        blocks = gram.double().cpu().reshape(-1, gram.shape[-2], gram.shape[-1])
        results = [self.solve(0.5 * (g + g.T), init=init if blocks.shape[0] == 1 else None) for g in blocks]
        solved = torch.stack([r.weights for r in results]).reshape(gram.shape[:-1])
        return Decision(weights=solved, solved=solved, collapsed=False, kkt_gap=max(r.kkt_gap for r in results))

    def decide(self, gram: Tensor, mean_weights: Tensor, keys: Optional[Tensor] = None) -> Decision:
        """The weights of this step from ``gram`` (``(k, k)`` or ``(B, k, k)``) and the mean weights ``(k,)``.

        ``keys``: an identifier per group (``-1``: unknown); the solver starts from the last step's weights
        when ``warm_start`` is on and the keys equal the last step's.
        """
        opts = self.options
        blocks = gram.double().cpu().reshape(-1, gram.shape[-2], gram.shape[-1])
        pi = mean_weights.detach().double().cpu().reshape(-1)
        init = None
        if (
            opts.warm_start
            and keys is not None
            and self.prev_keys is not None
            and blocks.shape[0] == 1
            and bool((keys >= 0).all())
            and torch.equal(self.prev_keys, keys)
        ):
            init = self.prev_weights
        plain = self.min_norm(blocks, init=init)
        solved = plain.solved
        d2 = float(torch.einsum("bi,bij,bj->", solved, blocks, solved))
        m2 = float(torch.einsum("i,bij,j->", pi, blocks, pi))
        collapsed = m2 > 0 and math.sqrt(max(d2, 0.0)) <= opts.collapse_eps * math.sqrt(m2)
        weights: Optional[Tensor] = solved
        if collapsed:
            self.collapsed += 1
            target = pi.expand_as(solved)
            if opts.on_collapse == "skip":
                weights = None
            elif opts.on_collapse == "mean":
                weights = target.clone()
            else:
                weights = (1.0 - opts.collapse_mix) * solved + opts.collapse_mix * target
        if weights is not None and blocks.shape[0] == 1:
            self.prev_weights, self.prev_keys = solved[0], keys
        step_scale = None
        if weights is not None and opts.step_norm == "mean":
            weights, step_scale = self.mean_norm_scale(blocks, weights, pi)
        shape = gram.shape[:-1]
        return Decision(
            weights=None if weights is None else weights.reshape(shape),
            solved=solved.reshape(shape),
            collapsed=collapsed,
            kkt_gap=plain.kkt_gap,
            step_scale=step_scale,
        )

    def mean_norm_scale(self, blocks: Tensor, weights: Tensor, pi: Tensor) -> tuple[Tensor, float]:
        r"""``step_norm="mean"``: weights ``(B, k)`` scaled per block to the length of the plain mean.

        ``s_b = sqrt(pi^T G_b pi / w_b^T G_b w_b)`` when ``||d_b|| > collapse_eps ||m_b||`` (both norms from
        the ``(B, k, k)`` Grams ``blocks``), else ``1``: a zero or stationary block is not stretched, so ``s_b``
        is finite (at most ``1 / collapse_eps``; ``m_b = 0`` gives ``s_b = 1``). Returns the scaled weights and
        ``||d'|| / ||d||`` over all blocks (``1.0`` when ``d = 0``).
        """
        d2 = torch.einsum("bi,bij,bj->b", weights, blocks, weights).clamp(min=0.0)
        m2 = torch.einsum("i,bij,j->b", pi, blocks, pi).clamp(min=0.0)
        stretch = (d2 > 0) & (m2 > 0) & (d2.sqrt() > self.options.collapse_eps * m2.sqrt())
        scale = torch.where(stretch, (m2 / torch.where(stretch, d2, 1.0)).sqrt(), 1.0)
        total = float(d2.sum())
        ratio = math.sqrt(float((scale**2 * d2).sum()) / total) if total > 0 else 1.0
        return weights * scale[:, None], ratio

    def nonfinite(self, what: str, global_step: int) -> None:
        """Non-finite loss or gradient: raise ``FloatingPointError`` or warn (the caller then skips)."""
        msg = f"{self.owner}: {what} at global step {global_step}"
        if self.options.on_nonfinite == "raise":
            raise FloatingPointError(f"{msg} ({self.nonfinite_hint})")
        self.warn(msg + ": skipping this optimizer step", category=RuntimeWarning, stacklevel=3)

    # ------------------------------------------------------------------ counters and logging
    def record_step(self) -> None:
        self.steps += 1

    def record_skip(self) -> None:
        self.skipped += 1

    @property
    def log_now(self) -> bool:
        """Whether the current step's diagnostics are logged (every ``log_every_n_steps`` applied steps)."""
        every = self.options.log_every_n_steps
        return bool(every) and self.steps % every == 0

    @staticmethod
    def diagnostics(gram: Tensor, decision: Decision, mean_weights: Tensor) -> dict[str, float]:
        """``grain/*`` diagnostics of the solver's weights (see :mod:`grain_lightning.diagnostics`), plus
        ``grain/collapsed`` and, with ``step_norm="mean"``, ``grain/step_scale`` (``||d'|| / ||d||``)."""
        if gram.ndim == 3 and gram.shape[0] > 1:
            diag = blockwise_diagnostics(gram, decision.solved, mean_weights)
        else:
            g = gram.reshape(gram.shape[-2], gram.shape[-1])
            diag = grain_diagnostics(g, decision.solved.reshape(-1), mean_weights)
        diag["grain/collapsed"] = float(decision.collapsed)
        if decision.step_scale is not None:
            diag["grain/step_scale"] = decision.step_scale
        return diag

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {
            "prev_weights": self.prev_weights,
            "prev_keys": self.prev_keys,
            "steps": self.steps,
            "skipped": self.skipped,
            "collapsed": self.collapsed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prev_weights, self.prev_keys = state["prev_weights"], state["prev_keys"]
        self.steps, self.skipped, self.collapsed = state["steps"], state["skipped"], state["collapsed"]
