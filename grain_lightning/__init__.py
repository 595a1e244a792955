"""GRAIN: min-norm aggregation of group gradients for PyTorch Lightning.

The update is the min-norm point of the convex hull of the group gradients,
``d = sum_k w*_k g_k`` with ``w* = argmin_{w in simplex} ||sum_k w_k g_k||^2``, so that
``<d, g_k> >= ||d||^2 >= 0`` for every group.
"""

from grain_lightning.cross_rank import CommCounter, CrossRankMinNorm
from grain_lightning.ddp import GrainDDPStrategy  # registers the "grain_ddp" strategy names
from grain_lightning.diagnostics import grain_diagnostics
from grain_lightning.engine import (
    GrainBackwardResult,
    GroupGradients,
    combine_gradients,
    grain_backward,
    group_gradients,
    trainable_parameters,
)
from grain_lightning.ghost import BlockwiseResult, GhostEngine, GhostGradients, UnsupportedModuleError
from grain_lightning.groups import ByKey, Chunks, GroupAssignment, Grouping, PerSample, as_grouping
from grain_lightning.mixin import GrainConfig, GrainMixin
from grain_lightning.solver import MinNormResult, min_norm_weights, solve_min_norm, validate_gram

__version__ = "0.1.0.dev0"

__all__ = [
    "BlockwiseResult",
    "ByKey",
    "Chunks",
    "CommCounter",
    "CrossRankMinNorm",
    "GrainBackwardResult",
    "GrainConfig",
    "GrainDDPStrategy",
    "GhostEngine",
    "GhostGradients",
    "GrainMixin",
    "GroupAssignment",
    "GroupGradients",
    "Grouping",
    "MinNormResult",
    "PerSample",
    "UnsupportedModuleError",
    "as_grouping",
    "combine_gradients",
    "grain_backward",
    "grain_diagnostics",
    "group_gradients",
    "min_norm_weights",
    "solve_min_norm",
    "trainable_parameters",
    "validate_gram",
]
