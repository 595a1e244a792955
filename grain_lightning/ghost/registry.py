r"""Which rule handles which module type: the one place the one-backward engine looks modules up.

A rule (:class:`~grain_lightning.ghost.rules.base.GhostRule` subclass) is registered for one or more module
types with :func:`register_rule`; the engine finds a module's rule by walking its type's MRO, so a
registered type covers its subclasses unless a subclass has a rule of its own. Importing
:mod:`grain_lightning.ghost` registers the built-in rules. To support your own layer::

    from grain_lightning.ghost import GhostRule, VectorTerm, register_rule

    @register_rule(Scale)                       # y = x * weight, weight of shape (d,)
    class ScaleRule(GhostRule):
        def terms(self, n, k):
            x = self.concat([self.samples(c.inputs, 0, n) for c in self.calls])   # (n, T, d)
            b = self.concat([self.samples(c.grad, 0, n) for c in self.calls])     # (n, T, d)
            return [VectorTerm(self.module.weight, None, (x * b).sum(1))]         # per-sample (n, d)

Modules that couple the samples of a batch (BatchNorm in training mode) are registered with
:func:`register_sample_coupling`: the engine then sends every parameter to the reference engine.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Optional

from torch import nn

if TYPE_CHECKING:
    from grain_lightning.ghost.rules.base import GhostRule

__all__ = ["couples_samples", "register_rule", "register_sample_coupling", "rule_for", "supported_types"]

_RULES: dict[type, type[GhostRule]] = {}
_COUPLING: dict[type, Callable[[nn.Module], bool]] = {}


def register_rule(*module_types: type) -> Callable[[type[GhostRule]], type[GhostRule]]:
    """Class decorator: ``rule_cls`` handles modules of ``module_types`` (replacing an earlier rule)."""
    if not module_types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in module_types):
        raise TypeError(f"register_rule expects nn.Module subclasses, got {module_types!r}")

    def decorate(rule_cls: type[GhostRule]) -> type[GhostRule]:
        for t in module_types:
            _RULES[t] = rule_cls
        return rule_cls

    return decorate


def rule_for(module: nn.Module) -> Optional[type[GhostRule]]:
    """The rule registered for ``type(module)`` or its nearest registered base class, else ``None``."""
    for t in type(module).__mro__:
        rule = _RULES.get(t)
        if rule is not None:
            return rule
    return None


def supported_types() -> list[str]:
    """Names of the module types with a registered rule, in registration order."""
    return [t.__name__ for t in _RULES]


def register_sample_coupling(module_type: type, active: Callable[[nn.Module], bool]) -> None:
    """Declare that ``module_type`` couples samples whenever ``active(module)`` (e.g. BatchNorm in training)."""
    _COUPLING[module_type] = active


def couples_samples(module: nn.Module) -> Optional[bool]:
    """``None`` if ``module`` never couples samples; else whether it does now (its ``active`` predicate)."""
    for t in type(module).__mro__:
        active = _COUPLING.get(t)
        if active is not None:
            return bool(active(module))
    return None
