"""The import paths of before the restructuring still work, with a DeprecationWarning."""

import importlib
import sys

import pytest

from lightfmp.backbones import build_backbone
from lightfmp.data.formats import read_frame
from lightfmp.inputs import ModelInputs
from lightfmp.lightning_module import LightFMPModule
from lightfmp.stages import pretrain


@pytest.mark.parametrize(
    "old, name, new",
    [
        ("lightfmp.pipeline", "pretrain", pretrain),
        ("lightfmp.models", "build_backbone", build_backbone),
        ("lightfmp.module", "LightFMPModule", LightFMPModule),
        ("lightfmp.data.readers", "read_frame", read_frame),
        ("lightfmp.features", "FeatureSpec", ModelInputs),
    ],
)
def test_old_paths_import_and_warn(old, name, new, monkeypatch):
    monkeypatch.delitem(sys.modules, old, raising=False)  # import afresh: the warning comes once per import
    with pytest.warns(DeprecationWarning, match="deprecated"):
        module = importlib.import_module(old)
        assert getattr(module, name) is new
