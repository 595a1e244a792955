"""Module paths from before the restructuring still import, with a DeprecationWarning naming the new place."""

from __future__ import annotations

import importlib
import sys

import pytest


@pytest.mark.parametrize(
    "old, name, new",
    [
        ("grain_lightning.engine", "grain_backward", "grain_lightning.functional"),
        ("grain_lightning.engine", "group_gradients", "grain_lightning.reference"),
        ("grain_lightning.ddp", "GrainDDPStrategy", "grain_lightning.distributed.strategy"),
        ("grain_lightning.cross_rank", "CrossRankMinNorm", "grain_lightning.distributed.cross_rank"),
    ],
)
def test_old_module_paths_warn_and_give_the_same_objects(old, name, new, monkeypatch):
    monkeypatch.delitem(sys.modules, old, raising=False)
    with pytest.warns(DeprecationWarning, match=old.replace(".", r"\.")):
        module = importlib.import_module(old)
    assert getattr(module, name) is getattr(importlib.import_module(new), name)


def test_ghost_and_mixin_names_keep_their_paths():
    from grain_lightning.ghost import BlockwiseResult, GhostEngine, GhostGradients, UnsupportedModuleError  # noqa: F401
    from grain_lightning.mixin import GrainConfig, GrainMixin  # noqa: F401
