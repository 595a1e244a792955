"""Hard-concrete field gates with an L0 penalty (Louizos, Welling and Kingma, 2018).

One gate per feature field. With ``u ~ U(eps, 1 - eps)``::

    s = sigmoid((log u - log(1 - u) + log_alpha) / beta)
    z = clamp(s * (zeta - gamma) + gamma, 0, 1)                       # training sample, z in [0, 1]
    P(z != 0) = sigmoid(log_alpha - beta * log(-gamma / zeta))          # keep probability
    z_test = clamp(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1)  # deterministic gate

with the standard ``beta = 2/3, gamma = -0.1, zeta = 1.1``. The expected number of open gates,
``E[L0] = sum_f P(z_f != 0)``, is differentiable in ``log_alpha``.

Penalty, either
* ``l0_weight = lam``: ``lam * E[L0]`` (a fixed price per open field, in loss units); or
* a target ``target_fields`` (a count, or a fraction of F when < 1): the Lagrangian
  ``lam1 * gap + lam2 * gap^2`` with ``gap = (E[L0] - T) / F``, as in CoFi pruning. The multipliers are
  maximised by plain dual ascent after every optimizer step (``dual_step``: ``lam1 += lr * gap``,
  ``lam2 += lr * gap^2``), not by an adaptive optimizer: Adam's normalised steps on the multipliers overshoot
  and close every gate on small data.

Keep rule used when pruning (``kept_mask``): ``P(z != 0) > threshold`` (default 0.5) or the top ``k`` fields
by keep probability.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import pandas as pd
import torch
from torch import nn

BETA = 2.0 / 3.0
GAMMA = -0.1
ZETA = 1.1
LOG_ALPHA_LIMIT = 10.0
_EPS = 1e-6


class HardConcreteGate(nn.Module):
    """``F`` hard-concrete gates, one per named field.

    Args:
        names: field names, in the order of the gate vector.
        init_keep_probability: initial ``P(z != 0)`` of every gate (sets ``log_alpha``).
        l0_weight: price of one open gate, in loss units; ignored when ``target_fields`` is given.
        target_fields: target number of open gates (``>= 1``) or fraction of F (``0 < t < 1``) for the Lagrangian.
        beta, gamma, zeta: hard-concrete temperature and stretch interval.

    ``forward(batch_size)`` returns gates of shape ``(batch_size, F)``: one sample per row in training mode,
    the deterministic ``z_test`` broadcast in eval mode.
    """

    multipliers: torch.Tensor  # buffer (2,): the Lagrange multipliers lam1, lam2

    def __init__(
        self,
        names: Sequence[str],
        init_keep_probability: float = 0.9,
        l0_weight: float = 0.0,
        target_fields: Optional[float] = None,
        beta: float = BETA,
        gamma: float = GAMMA,
        zeta: float = ZETA,
    ) -> None:
        super().__init__()
        names = list(names)
        if not names:
            raise ValueError("HardConcreteGate needs at least one field name")
        if not 0.0 < init_keep_probability < 1.0:
            raise ValueError(f"init_keep_probability must be in (0, 1), got {init_keep_probability}")
        if l0_weight < 0:
            raise ValueError(f"l0_weight must be >= 0, got {l0_weight}")
        if not (gamma < 0.0 and zeta > 1.0 and beta > 0.0):
            raise ValueError(f"need gamma < 0 < 1 < zeta and beta > 0, got beta={beta}, gamma={gamma}, zeta={zeta}")
        self.names = names
        self.beta, self.gamma, self.zeta = float(beta), float(gamma), float(zeta)
        self.l0_weight = float(l0_weight)
        self.target = self._resolve_target(target_fields, len(names))
        shift = self.beta * math.log(-self.gamma / self.zeta)
        init = math.log(init_keep_probability / (1 - init_keep_probability)) + shift
        self.log_alpha = nn.Parameter(torch.full((len(names),), init))
        self.initial_l0 = float(init_keep_probability * len(names))
        self.register_buffer("multipliers", torch.zeros(2))

    @staticmethod
    def _resolve_target(target: Optional[float], num: int) -> Optional[float]:
        if target is None:
            return None
        if target <= 0 or target > num:
            raise ValueError(f"target_fields must be a fraction in (0, 1) or a count in [1, {num}], got {target}")
        return float(target * num) if target < 1 else float(target)

    @property
    def num_gates(self) -> int:
        return len(self.names)

    def clamped_log_alpha(self) -> torch.Tensor:
        return self.log_alpha.clamp(-LOG_ALPHA_LIMIT, LOG_ALPHA_LIMIT)

    def keep_probability(self) -> torch.Tensor:
        """``P(z_f != 0)`` for every gate, shape ``(F,)``."""
        shift = self.beta * math.log(-self.gamma / self.zeta)
        return torch.sigmoid(self.clamped_log_alpha() - shift)

    def expected_l0(self) -> torch.Tensor:
        return self.keep_probability().sum()

    def test_gate(self) -> torch.Tensor:
        """Deterministic gate ``clamp(sigmoid(log_alpha) (zeta - gamma) + gamma, 0, 1)``, shape ``(F,)``."""
        s = torch.sigmoid(self.clamped_log_alpha())
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def sample(self, batch_size: int, replicas: tuple[int, int] = (1, 0)) -> torch.Tensor:
        """Reparameterised training sample, shape ``(batch_size, F)``.

        ``replicas = (W, r)``: this is rank ``r``'s share of a global batch of ``W * batch_size`` rows dealt out
        round-robin (as ``DistributedSampler`` deals them): the noise ``u`` is drawn for the global batch and rows
        ``r, r + W, ...`` are kept, so ``W`` ranks sample the gates one process would at the global batch (every
        rank draws the same ``u``: same seed, same calls).
        """
        la = self.clamped_log_alpha()
        world, rank = replicas
        u = torch.rand(batch_size * world, self.num_gates, device=la.device, dtype=la.dtype)[rank::world]
        u = u.clamp(_EPS, 1 - _EPS)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + la) / self.beta)
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def forward(self, batch_size: int, replicas: tuple[int, int] = (1, 0)) -> torch.Tensor:
        """Gates ``(batch_size, F)``: :meth:`sample` in training (``replicas`` as there), else :meth:`test_gate`."""
        if self.training:
            return self.sample(batch_size, replicas)
        return self.test_gate().unsqueeze(0).expand(batch_size, -1)

    def penalty(self, progress: float = 1.0) -> torch.Tensor:
        """The L0 term to add to the loss (see the module docstring).

        ``progress`` in [0, 1] ramps it in (a warm-up that lets the model learn before gates close): the
        weight becomes ``progress * lam``; the target moves linearly from the initial expected L0 to ``T``.
        """
        if not 0.0 <= progress <= 1.0:
            raise ValueError(f"progress must be in [0, 1], got {progress}")
        l0 = self.expected_l0()
        if self.target is None:
            return progress * self.l0_weight * l0
        gap = (l0 - self._current_target(progress)) / self.num_gates
        return self.multipliers[0] * gap + self.multipliers[1] * gap * gap

    def _current_target(self, progress: float) -> float:
        assert self.target is not None
        return self.initial_l0 + progress * (self.target - self.initial_l0)

    @torch.no_grad()
    def dual_step(self, lr: float, progress: float = 1.0) -> None:
        """Gradient ascent on the multipliers: ``lam1 += lr * gap``, ``lam2 += lr * gap^2`` (target mode only)."""
        if self.target is None:
            return
        gap = (float(self.expected_l0()) - self._current_target(progress)) / self.num_gates
        self.multipliers[0] += lr * gap
        self.multipliers[1] += lr * gap * gap

    def gate_parameters(self) -> list[nn.Parameter]:
        return [self.log_alpha]

    def kept_mask(self, threshold: float = 0.5, top_k: Optional[int] = None) -> torch.Tensor:
        """Boolean ``(F,)``: ``P(z != 0) > threshold``, or the ``top_k`` most probable fields."""
        p = self.keep_probability().detach()
        if top_k is not None:
            if not 1 <= top_k <= self.num_gates:
                raise ValueError(f"top_k must be in [1, {self.num_gates}], got {top_k}")
            mask = torch.zeros(self.num_gates, dtype=torch.bool, device=p.device)
            # stable order: ties broken by field position
            order = sorted(range(self.num_gates), key=lambda i: (-float(p[i]), i))
            mask[order[:top_k]] = True
            return mask
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {threshold}")
        return p > threshold

    def report(self, threshold: float = 0.5, top_k: Optional[int] = None) -> pd.DataFrame:
        """Per-field table: ``field, keep_probability, test_gate, log_alpha, kept``, sorted by keep probability."""
        kept = self.kept_mask(threshold, top_k)
        df = pd.DataFrame(
            {
                "field": self.names,
                "keep_probability": self.keep_probability().detach().cpu().double().numpy(),
                "test_gate": self.test_gate().detach().cpu().double().numpy(),
                "log_alpha": self.log_alpha.detach().cpu().double().numpy(),
                "kept": kept.cpu().numpy(),
            }
        )
        return df.sort_values(["keep_probability", "field"], ascending=[False, True], kind="stable").reset_index(
            drop=True
        )
