"""Deprecated: ``LightFMPModule`` and ``evaluate`` moved to :mod:`lightfmp.lightning_module`."""

import warnings

from lightfmp.lightning_module import *  # noqa: F401,F403
from lightfmp.lightning_module import __all__  # noqa: F401

warnings.warn("lightfmp.module is deprecated; import from lightfmp.lightning_module", DeprecationWarning, stacklevel=2)
