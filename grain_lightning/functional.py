r"""Functional GRAIN without Lightning: ``grain_backward`` is ``loss.backward()`` with the min-norm combination.

For ``k`` group losses: the reference engine's group gradients ``J`` (``k x P``), ``G = J J^T``, the
min-norm weights ``w*`` from the step policy's solver (:meth:`~grain_lightning.policy.StepPolicy.solve`; no
collapse handling: a functional call has no step history) and ``d = J^T w*`` accumulated into ``p.grad``.
Cost: ``k`` backward passes, ``k x P`` stored gradient entries.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Optional

import torch

from grain_lightning.config import PolicyOptions
from grain_lightning.diagnostics import grain_diagnostics
from grain_lightning.policy import StepPolicy
from grain_lightning.reference import combine_gradients, group_gradients, trainable_parameters
from grain_lightning.solver import MinNormResult

__all__ = ["GrainBackwardResult", "grain_backward"]


@dataclass
class GrainBackwardResult:
    """What :func:`grain_backward` did: the solve, the Gram, and the diagnostics."""

    solve: MinNormResult
    gram: torch.Tensor
    diagnostics: dict[str, float]

    @property
    def weights(self) -> torch.Tensor:
        return self.solve.weights


def grain_backward(
    group_losses: torch.Tensor,
    params: Iterable[torch.Tensor],
    *,
    mean_weights: Optional[torch.Tensor] = None,
    init: Optional[torch.Tensor] = None,
    tol: float = 1e-12,
    batched: bool = False,
) -> GrainBackwardResult:
    """Like ``group_losses.mean().backward()``, but accumulate the min-norm combination instead.

    Computes every group's gradient, the Gram, the min-norm weights ``w*``, and adds
    ``d = sum_j w*_j grad L_j`` to ``p.grad`` of every trainable parameter (autograd's accumulation rule).

    Args:
        group_losses: ``(k,)`` losses, one per group (e.g. :meth:`GroupAssignment.group_means`).
        params: parameters to update (e.g. ``model.parameters()``); frozen ones are ignored.
        mean_weights: ``(k,)`` weights of the plain mean, for the diagnostics (default uniform).
        init: warm start for the solver.
        tol: solver KKT tolerance relative to ``trace(G)``.
        batched: see :func:`group_gradients`.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> per_sample = ((model(x) - y) ** 2).squeeze(1)
        >>> res = grain_backward(per_sample.view(4, 2).mean(1), model.parameters())
        >>> res.weights.shape
        torch.Size([4])
    """
    params = trainable_parameters(params)
    grads = group_gradients(group_losses, params, batched=batched)
    gram = grads.gram()
    solve = StepPolicy(PolicyOptions(solver_tol=tol)).solve(gram, init=init)
    for p, d in zip(params, combine_gradients(grads, solve.weights)):
        if d is not None:
            p.grad = d if p.grad is None else p.grad + d
    k = grads.num_groups
    mean_w = torch.full((k,), 1.0 / k, dtype=torch.float64) if mean_weights is None else mean_weights
    return GrainBackwardResult(solve=solve, gram=gram, diagnostics=grain_diagnostics(gram, solve.weights, mean_w))
