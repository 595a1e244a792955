"""The rule registry: built-in rules found by type (and subtype), and a user's own rule for their module."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from grain_lightning import Chunks, GhostRule, PerSample, register_rule
from grain_lightning.ghost import GhostEngine, VectorTerm, rule_for, supported_types
from grain_lightning.ghost.registry import _RULES, qualified_name
from grain_lightning.ghost.rules import FunctionalRule, LinearRule, NormRule, weight_bias_terms
from tests.grain_lightning.ghost.reference_check import compare


class Scale(nn.Module):
    """``y = x * weight`` over the last dim: a layer type the engine does not know."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


class RegisteredScale(Scale):
    """The same layer, with a rule registered below (the README example)."""


@register_rule(RegisteredScale)
class ScaleRule(GhostRule):
    """Per-sample gradient of ``weight``: ``sum_t x_i(t) * B_i(t)`` (``n x d``), a vector term."""

    def terms(self, n: int, k: int) -> list:
        x = self.concat([self.samples(c.inputs, self.batch_dim, n) for c in self.calls])  # (n, T, d)
        b = self.concat([self.samples(c.grad, self.batch_dim, n) for c in self.calls])  # (n, T, d)
        return [VectorTerm(self.module.weight, None, (x * b).sum(1))] if self.counted(self.module.weight) else []


def model_with(layer: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), layer, nn.Tanh(), nn.Linear(4, 3)).double()


def ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


@pytest.mark.parametrize("grouping", [PerSample(), Chunks(3)])
def test_unknown_module_type_gets_the_exact_generic_rule(grouping):
    model = model_with(Scale(4))
    engine = GhostEngine(model, unsupported="raise")
    assert [type(r) for r in engine.rules if r.module is model[1]] == [FunctionalRule]
    x = torch.randn(12, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (12,), generator=torch.Generator().manual_seed(2))
    compare(model, lambda: ce(model(x), y), grouping.assign(12), 1e-6, engine=engine)


def test_rule_registered_by_qualified_name_is_found_without_importing_the_type():
    class Renamed(Scale):
        pass

    name = qualified_name(Renamed)
    assert rule_for(Renamed(3)) is None

    @register_rule(name)
    class NamedRule(ScaleRule):
        pass

    try:
        assert rule_for(Renamed(3)) is NamedRule
        assert name in supported_types()
    finally:
        _RULES.pop(name)


@pytest.mark.parametrize("grouping", [PerSample(), Chunks(3)])
def test_user_rule_is_exact_against_the_reference(grouping):
    model = model_with(RegisteredScale(4))
    engine = GhostEngine(model, unsupported="raise")
    assert engine.fully_supported and any(isinstance(r, ScaleRule) for r in engine.rules)
    x = torch.randn(12, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (12,), generator=torch.Generator().manual_seed(2))
    compare(model, lambda: ce(model(x), y), grouping.assign(12), 1e-6, engine=engine)


def test_user_rule_is_used_twice_in_one_forward():
    """A module called twice: its calls are concatenated along T, still exact."""
    torch.manual_seed(0)
    scale = RegisteredScale(4)
    lin = nn.Linear(5, 4)
    head = nn.Linear(4, 3)
    model = nn.ModuleList([lin, scale, head]).double()
    x = torch.randn(12, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (12,), generator=torch.Generator().manual_seed(2))
    compare(
        model,
        lambda: ce(head(scale(torch.tanh(scale(lin(x))))), y),
        PerSample().assign(12),
        1e-6,
        engine=GhostEngine(model, unsupported="raise"),
    )


def test_lookup_follows_the_type_hierarchy():
    class MyLinear(nn.Linear):
        pass

    assert rule_for(MyLinear(2, 2)) is LinearRule
    assert rule_for(nn.RMSNorm(3)) is NormRule
    assert rule_for(Scale(2)) is None and rule_for(RegisteredScale(2)) is ScaleRule
    assert {
        "Linear",
        "Conv1d",
        "Conv2d",
        "Embedding",
        "LayerNorm",
        "RMSNorm",
        "MultiheadAttention",
        "RegisteredScale",
    } <= set(supported_types())


def test_register_rule_rejects_non_module_types():
    with pytest.raises(TypeError, match="nn.Module subclasses"):
        register_rule(int)


class Block(nn.Module):
    """``y = inner(x)`` with ``inner = Sequential(Linear)``: a rule for Block accounts for the nested Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


@register_rule(Block)
class BlockRule(GhostRule):
    @classmethod
    def own_parameters(cls, module: nn.Module) -> list:
        return list(module.parameters())

    @classmethod
    def claimed_children(cls, module: nn.Module) -> list:
        return list(module.children())

    def terms(self, n: int, k: int) -> list:
        a = self.concat([self.samples(c.inputs, self.batch_dim, n) for c in self.calls])
        b = self.concat([self.samples(c.output_grad, self.batch_dim, n) for c in self.calls])
        return weight_bias_terms(self, self.module.inner[0], a, b, k)


def test_a_rule_claiming_a_child_claims_its_descendants_too():
    """Without claiming grandchildren, the nested Linear would get a rule of its own and count twice."""
    model = model_with(Block())
    engine = GhostEngine(model, unsupported="raise")
    assert [type(r).__name__ for r in engine.rules] == ["LinearRule", "BlockRule", "LinearRule"]
    x = torch.randn(12, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (12,), generator=torch.Generator().manual_seed(2))
    compare(model, lambda: ce(model(x), y), Chunks(4).assign(12), 1e-6, engine=engine)
