"""Built-in rules of the one-backward engine, one module per layer family; importing this registers them."""

from grain_lightning.ghost.rules.attention import AttentionRule
from grain_lightning.ghost.rules.base import GhostRule, RecordedCall, UnsupportedModuleError, weight_bias_terms
from grain_lightning.ghost.rules.conv import ConvRule
from grain_lightning.ghost.rules.embedding import EmbeddingRule
from grain_lightning.ghost.rules.functional import FunctionalRule
from grain_lightning.ghost.rules.linear import LinearRule
from grain_lightning.ghost.rules.norm import NormRule
from grain_lightning.ghost.rules.transposed_linear import TransposedLinearRule

__all__ = [
    "AttentionRule",
    "ConvRule",
    "EmbeddingRule",
    "FunctionalRule",
    "GhostRule",
    "LinearRule",
    "NormRule",
    "RecordedCall",
    "TransposedLinearRule",
    "UnsupportedModuleError",
    "weight_bias_terms",
]
