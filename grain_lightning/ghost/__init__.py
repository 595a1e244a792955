r"""The one-backward engine: exact group Gram and combined gradient from one forward and one backward pass.

- :mod:`~grain_lightning.ghost.engine`: :class:`GhostEngine` (capture, backward, combination, block-wise mode);
- :mod:`~grain_lightning.ghost.rules`: one rule per layer family (linear, conv, embedding, norm, attention);
- :mod:`~grain_lightning.ghost.registry`: module type -> rule; :func:`register_rule` adds your own;
- :mod:`~grain_lightning.ghost.terms`: the Gram / combination / group-gradient forms rules emit;
- :mod:`~grain_lightning.ghost.tensors`: the output tap and precision helpers.

Importing this package registers the built-in rules.
"""

from grain_lightning.ghost import rules as _builtin_rules  # noqa: F401  (registers the built-in rules)
from grain_lightning.ghost.engine import BlockwiseResult, Capture, GhostEngine, GhostGradients
from grain_lightning.ghost.registry import register_rule, register_sample_coupling, rule_for, supported_types
from grain_lightning.ghost.rules.base import GhostRule, RecordedCall, UnsupportedModuleError
from grain_lightning.ghost.terms import EmbeddingTerm, MatrixTerm, Term, VectorTerm

__all__ = [
    "BlockwiseResult",
    "Capture",
    "EmbeddingTerm",
    "GhostEngine",
    "GhostGradients",
    "GhostRule",
    "MatrixTerm",
    "RecordedCall",
    "Term",
    "UnsupportedModuleError",
    "VectorTerm",
    "register_rule",
    "register_sample_coupling",
    "rule_for",
    "supported_types",
]
