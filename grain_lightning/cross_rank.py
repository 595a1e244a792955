"""Deprecated module path: the cross-rank min-norm lives in :mod:`grain_lightning.distributed`."""

import warnings

from grain_lightning.diagnostics import blockwise_diagnostics
from grain_lightning.distributed.collectives import CommCounter
from grain_lightning.distributed.cross_rank import MODES, CrossRankMinNorm, CrossRankResult

warnings.warn(
    "grain_lightning.cross_rank is deprecated: import from grain_lightning.distributed",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["CommCounter", "CrossRankMinNorm", "CrossRankResult", "MODES", "blockwise_diagnostics"]
