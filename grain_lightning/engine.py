r"""Reference engine: exact group gradients with torch.autograd, their Gram, and the combined gradient.

For ``k`` group losses ``L_1..L_k`` and trainable parameters ``theta`` (``P`` numbers in all)::

    J    = [grad L_1; ...; grad L_k]              (k x P, stored per parameter as (k, *p.shape))
    G    = J J^T                                  (k x k, accumulated in float64)
    w*   = argmin_{w in simplex} w^T G w          (grain_lightning.solver)
    d    = J^T w*                                 (written into p.grad)

Cost: ``k`` backward passes through the graph (or one vmapped backward with ``batched=True``) and
``k x P`` stored gradient entries. It works for any module; faster engines are tested against it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from grain_lightning.diagnostics import grain_diagnostics
from grain_lightning.solver import MinNormResult, solve_min_norm

__all__ = [
    "GroupGradients",
    "GrainBackwardResult",
    "combine_gradients",
    "grain_backward",
    "group_gradients",
    "trainable_parameters",
]


@dataclass
class GroupGradients:
    """Per-group gradients of a list of parameters.

    Attributes:
        grads: one ``(k, *p.shape)`` tensor per parameter (zeros where a group does not reach ``p``).
        reached: per parameter, whether any group's loss depends on it (autograd leaves ``.grad`` of the
            others as ``None``, and so do we, so that optimizers skip them as in plain training).
    """

    grads: list[torch.Tensor]
    reached: list[bool]

    @property
    def num_groups(self) -> int:
        return int(self.grads[0].shape[0]) if self.grads else 0

    def gram(self) -> torch.Tensor:
        """``(k, k)`` float64 Gram matrix ``G_ij = <g_i, g_j>``, accumulated parameter by parameter."""
        k = self.num_groups
        gram = torch.zeros(k, k, dtype=torch.float64)
        for g in self.grads:
            flat = g.reshape(k, -1).double()
            gram += (flat @ flat.T).cpu()
        return gram

    def combine(self, weights: torch.Tensor) -> list[Optional[torch.Tensor]]:
        """``sum_j w_j g_j`` per parameter; see :func:`combine_gradients`."""
        return combine_gradients(self, weights)

    def cat(self, other: "GroupGradients") -> "GroupGradients":
        """Stack the groups of ``other`` after this one's (same parameters)."""
        if len(other.grads) != len(self.grads):
            raise ValueError(f"cannot stack gradients of {len(other.grads)} parameters onto {len(self.grads)}")
        return GroupGradients(
            [torch.cat([a, b], 0) for a, b in zip(self.grads, other.grads)],
            [a or b for a, b in zip(self.reached, other.reached)],
        )


def trainable_parameters(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Unique parameters with ``requires_grad``, in first-seen order."""
    seen: set[int] = set()
    out = []
    for p in params:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def group_gradients(
    group_losses: torch.Tensor,
    params: Sequence[torch.Tensor],
    *,
    retain_graph: bool = False,
    batched: bool = False,
) -> GroupGradients:
    """Exact gradient of each of the ``(k,)`` ``group_losses`` with respect to ``params``.

    Args:
        group_losses: ``(k,)`` scalar losses sharing one graph.
        params: parameters to differentiate (all must require grad).
        retain_graph: keep the graph after the last backward.
        batched: one vmapped backward (``is_grads_batched``) instead of ``k`` backward passes; not every
            operator supports it.
    """
    if group_losses.ndim != 1 or group_losses.numel() == 0:
        raise ValueError(f"group_losses must be a non-empty (k,) tensor, got shape {tuple(group_losses.shape)}")
    params = list(params)
    if not params:
        raise ValueError("no trainable parameters to differentiate")
    k = group_losses.shape[0]
    if batched:
        eye = torch.eye(k, dtype=group_losses.dtype, device=group_losses.device)
        gs = torch.autograd.grad(
            group_losses, params, grad_outputs=eye, is_grads_batched=True, allow_unused=True, retain_graph=retain_graph
        )
        return GroupGradients(
            [torch.zeros((k, *p.shape), dtype=p.dtype, device=p.device) if g is None else g for g, p in zip(gs, params)],
            [g is not None for g in gs],
        )
    out = [torch.zeros((k, *p.shape), dtype=p.dtype, device=p.device) for p in params]
    reached = [False] * len(params)
    for j in range(k):
        gs = torch.autograd.grad(group_losses[j], params, allow_unused=True, retain_graph=retain_graph or j < k - 1)
        for i, g in enumerate(gs):
            if g is not None:
                out[i][j] = g
                reached[i] = True
    return GroupGradients(out, reached)


def combine_gradients(grads: GroupGradients, weights: torch.Tensor) -> list[Optional[torch.Tensor]]:
    """``sum_j w_j g_j`` per parameter in its dtype (summed in float64), ``None`` for unreached ones."""
    k = grads.num_groups
    if weights.shape != (k,):
        raise ValueError(f"expected ({k},) weights, got shape {tuple(weights.shape)}")
    out: list[Optional[torch.Tensor]] = []
    for g, reached in zip(grads.grads, grads.reached):
        w = weights.to(device=g.device, dtype=torch.float64)
        out.append(torch.tensordot(w, g.double(), dims=1).to(g.dtype) if reached else None)
    return out


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
    solve = solve_min_norm(gram, init=init, tol=tol)
    for p, d in zip(params, combine_gradients(grads, solve.weights)):
        if d is not None:
            p.grad = d if p.grad is None else p.grad + d
    k = grads.num_groups
    mean_w = torch.full((k,), 1.0 / k, dtype=torch.float64) if mean_weights is None else mean_weights
    return GrainBackwardResult(solve=solve, gram=gram, diagnostics=grain_diagnostics(gram, solve.weights, mean_w))
