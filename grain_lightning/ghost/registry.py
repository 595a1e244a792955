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

A type can also be named by its qualified name (``"transformers.pytorch_utils.Conv1D"``), so that a rule for
an optional library's layer is registered without importing that library. A module type with trainable
parameters and no registered rule gets the generic rule
(:class:`~grain_lightning.ghost.rules.functional.FunctionalRule`: exact, ``torch.func``, costlier).

Modules that couple the samples of a batch (BatchNorm in training mode) are registered with
:func:`register_sample_coupling`: the engine then sends every parameter to the reference engine.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Optional, Union

from torch import nn

if TYPE_CHECKING:
    from grain_lightning.ghost.rules.base import GhostRule

__all__ = [
    "couples_samples",
    "qualified_name",
    "register_rule",
    "register_sample_coupling",
    "rule_for",
    "supported_types",
]

_RULES: dict[Union[type, str], type[GhostRule]] = {}
_COUPLING: dict[type, Callable[[nn.Module], bool]] = {}


def qualified_name(t: type) -> str:
    """``module.QualName`` of a type, as :func:`register_rule` accepts it."""
    return f"{t.__module__}.{t.__qualname__}"


def register_rule(*module_types: Union[type, str]) -> Callable[[type[GhostRule]], type[GhostRule]]:
    """Class decorator: ``rule_cls`` handles modules of ``module_types`` (``nn.Module`` subclasses or their
    qualified names), replacing an earlier rule."""
    ok = all(isinstance(t, str) or (isinstance(t, type) and issubclass(t, nn.Module)) for t in module_types)
    if not module_types or not ok:
        raise TypeError(f"register_rule expects nn.Module subclasses or qualified type names, got {module_types!r}")

    def decorate(rule_cls: type[GhostRule]) -> type[GhostRule]:
        for t in module_types:
            _RULES[t] = rule_cls
        return rule_cls

    return decorate


def rule_for(module: nn.Module) -> Optional[type[GhostRule]]:
    """The rule registered for ``type(module)`` or its nearest registered base class (by type or by qualified
    name), else ``None``. A subclass that overrides the registered class's ``forward`` computes something
    else (a scaled embedding, a wrapper): no rule (the engine then uses the generic rule)."""
    for t in type(module).__mro__:
        rule = _RULES.get(t) or _RULES.get(qualified_name(t))
        if rule is not None:
            return rule if type(module).forward is getattr(t, "forward", None) else None
    return None


def supported_types() -> list[str]:
    """Names of the module types with a registered rule, in registration order."""
    return [t if isinstance(t, str) else t.__name__ for t in _RULES]


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
