"""Deprecated: the backbones moved to :mod:`lightfmp.backbones`."""

import warnings

from lightfmp.backbones import *  # noqa: F401,F403
from lightfmp.backbones import __all__  # noqa: F401

warnings.warn("lightfmp.models is deprecated; import from lightfmp.backbones", DeprecationWarning, stacklevel=2)
