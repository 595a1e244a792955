"""GRAIN: min-norm aggregation of group gradients for PyTorch Lightning.

The update is the min-norm point of the convex hull of the group gradients,
``d = sum_k w*_k g_k`` with ``w* = argmin_{w in simplex} ||sum_k w_k g_k||^2``, so that
``<d, g_k> >= ||d||^2 >= 0`` for every group.
"""

from grain_lightning.solver import MinNormResult, min_norm_weights, solve_min_norm, validate_gram

__version__ = "0.1.0.dev0"

__all__ = ["MinNormResult", "min_norm_weights", "solve_min_norm", "validate_gram"]
