"""Deprecated: the model's input contract moved to :mod:`lightfmp.inputs`; ``FeatureSpec`` is now
:class:`~lightfmp.inputs.ModelInputs`."""

import warnings
from typing import Any

from lightfmp.inputs import *  # noqa: F401,F403
from lightfmp.inputs import ModelInputs
from lightfmp.inputs import __all__ as _inputs_all

__all__ = list(_inputs_all)  # and FeatureSpec, through __getattr__

warnings.warn("lightfmp.features is deprecated; import from lightfmp.inputs", DeprecationWarning, stacklevel=2)


def __getattr__(name: str) -> Any:
    if name == "FeatureSpec":
        warnings.warn("FeatureSpec is deprecated; use lightfmp.inputs.ModelInputs", DeprecationWarning, stacklevel=2)
        return ModelInputs
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
