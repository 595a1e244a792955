"""Deprecated module path: ``grain_ddp`` lives in :mod:`grain_lightning.distributed.strategy`."""

import warnings

from grain_lightning.distributed.strategy import GrainDDPStrategy
from grain_lightning.distributed.strategy import register_grain_ddp as _register

warnings.warn(
    "grain_lightning.ddp is deprecated: import GrainDDPStrategy from grain_lightning", DeprecationWarning, stacklevel=2
)

__all__ = ["GrainDDPStrategy", "_register"]
