"""Deprecated: the readers moved to :mod:`lightfmp.data.formats` (one module per format)."""

import warnings

from lightfmp.data.formats import *  # noqa: F401,F403
from lightfmp.data.formats import __all__  # noqa: F401

warnings.warn(
    "lightfmp.data.readers is deprecated; import from lightfmp.data.formats", DeprecationWarning, stacklevel=2
)
