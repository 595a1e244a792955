"""GRAIN: min-norm aggregation of group gradients for PyTorch Lightning.

The update is the min-norm point of the convex hull of the group gradients,
``d = sum_k w*_k g_k`` with ``w* = argmin_{w in simplex} ||sum_k w_k g_k||^2``, so that
``<d, g_k> >= ||d||^2 >= 0`` for every group.
"""

from grain_lightning.config import GrainConfig, PolicyOptions
from grain_lightning.diagnostics import blockwise_diagnostics, grain_diagnostics
from grain_lightning.distributed import (  # registers "grain_ddp" and "grain_fsdp"
    CommCounter,
    CrossRankMinNorm,
    GrainDDPStrategy,
    GrainFSDPStrategy,
)
from grain_lightning.functional import GrainBackwardResult, grain_backward
from grain_lightning.ghost import (
    BlockwiseResult,
    GhostEngine,
    GhostGradients,
    GhostRule,
    UnsupportedModuleError,
    register_rule,
)
from grain_lightning.groups import ByKey, Chunks, GroupAssignment, Grouping, PerSample, as_grouping
from grain_lightning.mixin import GrainMixin
from grain_lightning.policy import Decision, StepPolicy
from grain_lightning.protocol import GrainModule, GrainStrategy, MixinCycle
from grain_lightning.reference import GroupGradients, combine_gradients, group_gradients, trainable_parameters
from grain_lightning.solver import MinNormResult, min_norm_weights, solve_min_norm, validate_gram

__version__ = "0.1.0.dev0"

__all__ = [
    "BlockwiseResult",
    "Decision",
    "GhostRule",
    "GrainModule",
    "GrainStrategy",
    "MixinCycle",
    "PolicyOptions",
    "StepPolicy",
    "blockwise_diagnostics",
    "register_rule",
    "ByKey",
    "Chunks",
    "CommCounter",
    "CrossRankMinNorm",
    "GrainBackwardResult",
    "GrainConfig",
    "GrainDDPStrategy",
    "GrainFSDPStrategy",
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
