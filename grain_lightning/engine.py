"""Deprecated module path: the reference engine is :mod:`grain_lightning.reference`, the functional API
:mod:`grain_lightning.functional`. Importing from here still works, with a ``DeprecationWarning``."""

import warnings

from grain_lightning.functional import GrainBackwardResult, grain_backward
from grain_lightning.reference import GroupGradients, combine_gradients, group_gradients, trainable_parameters

warnings.warn(
    "grain_lightning.engine is deprecated: import from grain_lightning (or grain_lightning.reference / "
    "grain_lightning.functional)",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = [
    "GrainBackwardResult",
    "GroupGradients",
    "combine_gradients",
    "grain_backward",
    "group_gradients",
    "trainable_parameters",
]
