r"""The engine's self-check: its combined gradient and Gram against autograd, on random group weights.

With random weights ``u`` (``k``,) over the groups (uniform in ``[0.5, 1.5]``, from a fixed generator: the
global RNG is untouched), for every parameter ``p`` the engine handles with its rules:

    d_p  = sum_j u_j g_{j,p}                  (the engine's combined gradient)
    a_p  = grad_p sum_i u_{group(i)} l_i / n_{group(i)}      (autograd: one backward with weight gradients)
    ||d_p - a_p|| <= rtol (||a_p|| + floor ||a||)   and   |u^T G_p u - ||a_p||^2| <= 2 rtol (||a_p|| + floor ||a||)^2

where ``G_p`` is ``p``'s part of the group Gram and ``||a||`` the whole gradient's norm (``floor = 1e-3``: a
parameter whose gradient is a million times smaller than the whole is compared on the whole's scale).
``rtol``: ``1e-6`` for float64, ``1e-3`` for float32, ``5e-2`` for bf16/fp16 (the engine sums in float32,
autograd in the low precision). The wrong attributions this guards against (a broadcast input, a
reshaped batch, a module coupling samples) give relative errors of order one.

Cost on a checked step: one extra backward through the model with weight gradients (a plain step's
backward) and the graph kept until it has run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from grain_lightning.config import check_self_check

__all__ = ["SelfCheckError", "SelfCheckReport", "SelfCheckSchedule", "compare", "random_weights", "tolerance"]

FLOOR = 1e-3


class SelfCheckError(RuntimeError):
    """The one-backward engine's gradients differ from autograd's for some parameters."""


def tolerance(dtype: torch.dtype) -> float:
    """The self-check's relative tolerance for parameters of ``dtype``."""
    return {torch.float64: 1e-6, torch.float32: 1e-3}.get(dtype, 5e-2)


def random_weights(k: int, seed: int = 20261205) -> torch.Tensor:
    """``(k,)`` float64 weights uniform in ``[0.5, 1.5]`` from a private generator."""
    gen = torch.Generator().manual_seed(seed + k)
    return torch.rand(k, generator=gen, dtype=torch.float64) + 0.5


@dataclass
class SelfCheckReport:
    """What one self-check found: the worst relative error and the parameters that differ (name -> why)."""

    checked: int
    worst: float
    mismatched: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.mismatched


def compare(
    names: Sequence[str],
    autograd: Sequence[Optional[torch.Tensor]],
    engine: Sequence[Optional[torch.Tensor]],
    quadratic: Sequence[Optional[float]],
    dtypes: Sequence[torch.dtype],
) -> SelfCheckReport:
    """Compare per parameter: ``autograd`` gradients, the ``engine``'s combined gradients (``None``: not
    compared, e.g. when autograd formed them) and ``u^T G_p u`` (``None``: not compared)."""
    norms = [0.0 if a is None else float(a.double().norm()) for a in autograd]
    total = sum(x * x for x in norms) ** 0.5
    report = SelfCheckReport(checked=len(names), worst=0.0)
    for name, a, d, q, dtype, na in zip(names, autograd, engine, quadratic, dtypes, norms):
        rtol = tolerance(dtype)
        scale = max(na + FLOOR * total, 1e-30)
        if d is not None:
            a_dense = torch.zeros_like(d, dtype=torch.float64) if a is None else a.double()
            err = float((d.double() - a_dense).norm()) / scale
            report.worst = max(report.worst, err)
            if not err <= rtol:
                report.mismatched[name] = f"combined gradient relative error {err:.2e} > {rtol:.0e}"
                continue
        if q is not None:
            err = abs(q - na * na) / (scale * scale)
            report.worst = max(report.worst, err / 2)
            if not err <= 2 * rtol:
                report.mismatched[name] = f"Gram block u^T G u = {q:.4e}, autograd ||a||^2 = {na * na:.4e}"
    return report


class SelfCheckSchedule:
    """When to self-check: ``"first"`` (the first optimizer step of every new call signature, see
    :meth:`~grain_lightning.ghost.engine.GhostEngine.call_signature`: with fixed shapes, the first step only;
    with dynamic padding, once per sequence length), an int ``N`` (every ``N`` optimizer steps, the first
    included) or ``False``/``0``/``"off"`` (never)."""

    def __init__(self, when: Union[str, int, bool]) -> None:
        check_self_check("self_check", when)
        self.given = when  # as configured
        self.when: Union[str, int] = "first" if when is True else 0 if when is False or when == "off" else when
        self.passed = 0  # checked steps
        self.signatures: set = set()  # call signatures already checked

    def due(self, step: int, signature: Optional[tuple] = None) -> bool:
        """Whether optimizer step ``step`` (0-based count of steps taken) with ``signature`` is checked."""
        if self.when == "first":
            return self.passed == 0 or (signature is not None and signature not in self.signatures)
        return bool(self.when) and step % int(self.when) == 0

    def checked(self, signature: Optional[tuple] = None) -> None:
        """Record a checked step."""
        self.passed += 1
        if signature is not None:
            self.signatures.add(signature)
