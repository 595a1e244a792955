"""What the engine checks at every step (batch layout, in-place changes, losses) and its self-check."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from grain_lightning import Chunks, GrainConfig, PerSample, group_gradients
from grain_lightning.ghost import GhostEngine, GhostRule, UnsupportedModuleError, VectorTerm, register_rule
from grain_lightning.ghost.registry import _RULES
from grain_lightning.ghost.rules import FunctionalRule
from grain_lightning.ghost.self_check import SelfCheckError, SelfCheckSchedule
from tests.grain_lightning.ghost.reference_check import compare
from tests.grain_lightning.helpers import GrainModule, loader, make_data, make_net, trainer

N, S, D = 4, 6, 5


def ce(logits, y):
    return F.cross_entropy(logits, y, reduction="none")


def labels(n=N):
    return torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(2))


class PositionsFirst(nn.Module):
    """Calls a position embedding with (1, S) ids before any module has seen the batch."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Embedding(S, D)
        self.tok = nn.Embedding(11, D)
        self.head = nn.Linear(D, 3)

    def forward(self, ids):
        p = self.pos(torch.arange(ids.shape[1])[None])  # (1, S, D)
        return self.head((self.tok(ids) + p).mean(1))


def ids(n=N):
    return torch.randint(0, 11, (n, S), generator=torch.Generator().manual_seed(1))


def test_broadcast_call_before_the_batch_is_known_is_refused_naming_the_module():
    model = PositionsFirst()
    engine = GhostEngine(model, unsupported="raise")
    with engine.capture():
        losses = ce(model(ids()), labels())
    with pytest.raises(UnsupportedModuleError, match=r"'pos' \(Embedding\).*size 1/1, not the 4 samples"):
        engine.backward(losses, PerSample().assign(N))


def test_broadcast_call_with_the_batch_size_given_is_exact():
    model = PositionsFirst().double()
    engine = GhostEngine(model, unsupported="raise")
    x, y = ids(), labels()
    compare(model, lambda: ce(model(x), y), Chunks(2).assign(N), 1e-6, engine=engine, batch_size=N)
    assert engine.refused_last_step == []


def test_broadcast_call_falls_back_with_a_warning_when_allowed():
    model = PositionsFirst().double()
    engine = GhostEngine(model, unsupported="fallback")
    x, y = ids(), labels()
    with pytest.warns(RuntimeWarning, match="'pos'.*reference engine"):
        compare(model, lambda: ce(model(x), y), PerSample().assign(N), 1e-6, engine=engine)
    assert engine.refused_last_step == ["pos.weight"]


class Flattened(nn.Module):
    """A Linear applied to the (n*S, D) flattened batch."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(11, D)
        self.proj = nn.Linear(D, D)
        self.head = nn.Linear(D, 3)

    def forward(self, ids):
        h = self.tok(ids)
        h = self.proj(h.reshape(-1, D)).reshape(h.shape)
        return self.head(h.mean(1))


def test_flattened_batch_is_refused_naming_the_module():
    model = Flattened()
    engine = GhostEngine(model, unsupported="raise")
    with engine.capture():
        losses = ce(model(ids()), labels())
    with pytest.raises(UnsupportedModuleError, match=r"'proj' \(Linear\).*size 24/24, not the 4 samples"):
        engine.backward(losses, PerSample().assign(N))


class InPlace(nn.Module):
    """Modifies a recorded layer input in place after the layer ran."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(D, D)
        self.b = nn.Linear(D, 3)

    def forward(self, x):
        h = torch.tanh(x)
        out = self.a(h)
        h.mul_(2.0)
        return self.b(out + h)


def test_input_modified_in_place_after_the_call_is_refused():
    model = InPlace()
    engine = GhostEngine(model, unsupported="raise")
    with engine.capture():
        losses = ce(model(torch.randn(N, D)), labels())
    with pytest.raises(UnsupportedModuleError, match=r"'a' \(Linear\).*modified in place"):
        engine.backward(losses, PerSample().assign(N))


class SwappedBatch(nn.Module):
    """A Linear on a tensor whose dim 0 has the batch's size but holds positions: no shape can tell."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(D, D)
        self.b = nn.Linear(D, 3)

    def forward(self, x):  # x: (n, n, D) with n == S
        return self.b(self.a(x.transpose(0, 1)).transpose(0, 1).mean(1))


@pytest.mark.parametrize("unsupported", ["raise", "fallback"])
def test_self_check_catches_a_batch_moved_to_another_dim_of_the_same_size(unsupported):
    model = SwappedBatch().double()
    x, y = torch.randn(N, N, D, dtype=torch.float64), labels()
    engine = GhostEngine(model, unsupported=unsupported)
    with engine.capture():
        losses = ce(model(x), y)
    if unsupported == "raise":
        with pytest.raises(SelfCheckError, match=r"a\.weight: combined gradient relative error"):
            engine.backward(losses, PerSample().assign(N), self_check=True)
        return
    with pytest.warns(RuntimeWarning, match="self-check: parameter 'a.weight'"):
        grads = engine.backward(losses, PerSample().assign(N), self_check=True)
    assert not engine.last_self_check.ok and "self-check" in engine.fallback_reasons["parameter 'a.weight'"]
    ref = group_gradients(PerSample().assign(N).group_means(ce(model(x), y)), list(model.parameters()))
    assert torch.allclose(grads.gram(), ref.gram(), rtol=1e-9)
    assert not engine.fully_supported and "a.weight" in engine.refused_last_step
    # later steps use the reference engine for it from the start, and are exact
    compare(model, lambda: ce(model(x), y), PerSample().assign(N), 1e-6, engine=engine)


class Doubler(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, D))

    def forward(self, x):
        return x * self.weight


class WrongRule(GhostRule):
    """A buggy user rule: twice the true per-sample gradient."""

    def terms(self, n, k):
        x = self.concat([self.samples(c.inputs, 0, n) for c in self.calls])
        b = self.concat([self.samples(c.output_grad, 0, n) for c in self.calls])
        return [VectorTerm(self.module.weight, None, 2 * (x * b).sum(1))]


def test_self_check_names_the_parameters_of_a_wrong_rule():
    register_rule(Doubler)(WrongRule)
    try:
        model = nn.Sequential(nn.Linear(D, D), Doubler(), nn.Linear(D, 3))
        engine = GhostEngine(model, unsupported="raise")
        with engine.capture():
            losses = ce(model(torch.randn(N, D)), labels())
        with pytest.raises(SelfCheckError, match=r"parameters 1\.weight: ") as err:
            engine.backward(losses, Chunks(2).assign(N), self_check=True)
        assert "0.weight" not in str(err.value) and "2.weight" not in str(err.value)
    finally:
        _RULES.pop(Doubler)


def test_self_check_schedule():
    first = SelfCheckSchedule("first")
    assert first.due(0, ("a",)) and first.due(5, ("a",))
    first.checked(("a",))
    assert not first.due(6, ("a",)) and not first.due(6)
    assert first.due(7, ("b",))  # a new call signature (e.g. a sequence length equal to the batch size)
    every = SelfCheckSchedule(3)
    assert [every.due(s) for s in range(7)] == [True, False, False, True, False, False, True]
    assert not any(SelfCheckSchedule(False).due(s) for s in range(4))
    assert not SelfCheckSchedule("off").due(0)
    for bad in ("always", -1, 1.5, None):
        with pytest.raises(ValueError, match=r"GrainConfig: self_check must be 'first', an int N >= 0"):
            GrainConfig(self_check=bad)


# ---------------------------------------------------------------------- bad losses, in every engine
def _captured(n_losses=None, detach=False):
    model = nn.Sequential(nn.Linear(D, D), nn.Tanh(), nn.Linear(D, 3))
    engine = GhostEngine(model, unsupported="raise")
    x = torch.randn(N, D)
    with engine.capture():
        losses = ce(model(x), labels())
    if n_losses is not None:
        losses = losses.repeat(2)[:n_losses]
    return engine, losses.detach() if detach else losses


@pytest.mark.parametrize("method", ["backward", "group_gradients", "blockwise_backward"])
def test_wrong_number_of_losses_raises_in_every_ghost_path(method):
    engine, losses = _captured(n_losses=N + 2)
    with pytest.raises(ValueError, match=r"batches of \[4\] samples, got losses of shape \(6,\)"):
        getattr(engine, method)(losses, PerSample().assign(N + 2))


@pytest.mark.parametrize("method", ["backward", "group_gradients", "blockwise_backward"])
def test_losses_without_graph_raise_in_every_ghost_path(method):
    engine, losses = _captured(detach=True)
    with pytest.raises(ValueError, match=r"losses of shape \(4,\) have no autograd graph"):
        getattr(engine, method)(losses, PerSample().assign(N))


def test_losses_of_the_wrong_shape_raise_naming_the_expected_one():
    engine, losses = _captured()
    with pytest.raises(ValueError, match=r"expected \(n,\) per-sample losses.*got shape \(2, 2\)"):
        engine.backward(losses.view(2, 2), PerSample().assign(N))
    model = nn.Linear(D, 3)
    engine = GhostEngine(model)
    with engine.capture(batch_size=N):
        losses = ce(model(torch.randn(N, D)), labels())
    with pytest.raises(ValueError, match=r"expected \(4,\) per-sample losses.*got shape \(3,\)"):
        engine.backward(losses[:3], PerSample().assign(3))


def test_reference_engine_refuses_losses_without_graph():
    with pytest.raises(ValueError, match=r"group losses of shape \(3,\) have no autograd graph"):
        group_gradients(torch.ones(3), [nn.Parameter(torch.ones(2))])


class WrongLengthModule(GrainModule):
    def grain_losses(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y, reduction="none").repeat(2)


@pytest.mark.parametrize("engine", ["reference", "auto", "ghost"])
def test_mixin_refuses_losses_of_the_wrong_length_in_every_engine(engine):
    module = WrongLengthModule(make_net(), grain=GrainConfig(engine=engine))
    with pytest.raises(ValueError, match=r"grain_step: expected \(16,\) per-sample losses.*got shape \(32,\)"):
        trainer(max_steps=1).fit(module, loader(make_data()))


class DetachedModule(GrainModule):
    def grain_losses(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y, reduction="none").detach()


@pytest.mark.parametrize("aggregation", ["grain", "mean"])
def test_mixin_refuses_losses_without_graph(aggregation):
    module = DetachedModule(make_net(), grain=GrainConfig(aggregation=aggregation))
    with pytest.raises(ValueError, match=r"grain_step: the losses of shape \(16,\) have no autograd graph"):
        trainer(max_steps=1).fit(module, loader(make_data()))


def test_embedding_with_max_norm_is_refused_or_sent_to_the_reference_engine():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(11, D, max_norm=1.0), nn.Flatten(), nn.Linear(S * D, 3)).double()
    x, y = ids(), labels()
    with pytest.raises(UnsupportedModuleError, match=r"'0' \(Embedding\): torch.func cannot run it per sample"):
        compare(
            model, lambda: ce(model(x), y), PerSample().assign(N), 1e-6, engine=GhostEngine(model, unsupported="raise")
        )
    engine = GhostEngine(model, unsupported="fallback")
    with pytest.warns(RuntimeWarning, match=r"'0' \(Embedding\)"):
        compare(model, lambda: ce(model(x), y), PerSample().assign(N), 1e-6, engine=engine)
    assert engine.refused_last_step == ["0.weight"]


def test_sparse_gradients_are_refused_with_a_clear_error():
    model = nn.Sequential(nn.Embedding(11, D, sparse=True), nn.Flatten(), nn.Linear(S * D, 3))
    losses = ce(model(ids()), labels())
    with pytest.raises(ValueError, match=r"shape \(11, 5\) got a torch.sparse_coo gradient.*sparse=False"):
        group_gradients(PerSample().assign(N).group_means(losses), list(model.parameters()))


# ---------------------------------------------------------------------- cases found by an adversarial review
class BatchOfOne(nn.Module):
    """A Linear run on one sample whose output is then indexed, reduced or broadcast."""

    def __init__(self, use: str):
        super().__init__()
        self.a, self.b, self.use = nn.Linear(D, D), nn.Linear(D, 3), use

    def forward(self, x):
        h = self.b(torch.tanh(self.a(x))[:1])  # (1, 3)
        if self.use == "index":
            return x[:, :3] + h[0]
        if self.use == "sum":
            return x[:, :3] + h.sum(0)
        return x[:, :3] + h  # broadcast


@pytest.mark.parametrize("use", ["index", "sum", "broadcast"])
def test_batch_of_one_call_of_a_linear_is_refused(use):
    """Only embedding ids are expanded; any other batch-of-one call may be indexed or reduced: refused."""
    model = BatchOfOne(use)
    engine = GhostEngine(model, unsupported="raise")
    with engine.capture():
        losses = ce(model(torch.randn(N, D)), labels())
    with pytest.raises(UnsupportedModuleError, match=r"'b' \(Linear\).*size 1/1, not the 4 samples"):
        engine.backward(losses, PerSample().assign(N))


class ScaledEmbedding(nn.Embedding):
    """Like Hugging Face's scaled word embeddings: overrides forward."""

    def forward(self, ids):
        return super().forward(ids) * 3.0


def _subclass_and_hooks():
    torch.manual_seed(0)
    pruned = nn.Linear(S * D, 3)
    torch.nn.utils.prune.random_unstructured(pruned, "weight", amount=0.3)
    return {
        "scaled_embedding": nn.Sequential(ScaledEmbedding(11, D), nn.Flatten(), nn.Linear(S * D, 3)),
        "pruned_linear": nn.Sequential(nn.Embedding(11, D), nn.Flatten(), pruned),
        "weight_norm": nn.Sequential(
            nn.Embedding(11, D), nn.Flatten(), torch.nn.utils.weight_norm(nn.Linear(S * D, 3))
        ),
    }


@pytest.mark.parametrize("name", ["scaled_embedding", "pruned_linear", "weight_norm"])
def test_overridden_forward_and_weight_hooks_get_the_exact_generic_rule(name):
    model = _subclass_and_hooks()[name].double()
    x, y = ids(), labels()
    engine = GhostEngine(model, unsupported="raise")
    assert any(isinstance(r, FunctionalRule) for r in engine.rules)
    compare(model, lambda: ce(model(x), y), Chunks(2).assign(N), 1e-6, engine=engine)


def test_embedding_with_frequency_scaled_gradients_couples_samples():
    model = nn.Sequential(nn.Embedding(11, D, scale_grad_by_freq=True), nn.Flatten(), nn.Linear(S * D, 3))
    with pytest.raises(UnsupportedModuleError, match=r"'0' \(Embedding\) couples the samples"):
        GhostEngine(model, unsupported="raise")


class OwnInput(nn.Module):
    """The head's weight also computes the head's own input: a use outside its recorded call."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(D, 11)

    def forward(self, ids):
        h = F.embedding(ids, self.head.weight).mean(1)  # (n, D) from the (11, D) weight
        return self.head(h)[:, :3]


def test_parameter_used_to_compute_its_own_module_input_is_refused():
    model = OwnInput()
    engine = GhostEngine(model, unsupported="raise")
    with engine.capture():
        losses = ce(model(ids()), labels())
    with pytest.raises(UnsupportedModuleError, match=r"head.weight.*outside their module's recorded forward"):
        engine.backward(losses, PerSample().assign(N))


def test_reentrant_checkpointing_is_refused():
    from torch.utils.checkpoint import checkpoint

    block = nn.Sequential(nn.Linear(D, D), nn.Tanh())
    head = nn.Linear(D, 3)
    model = nn.ModuleDict({"block": block, "head": head})
    engine = GhostEngine(model, unsupported="raise")
    x = torch.randn(N, D, requires_grad=True)
    with engine.capture():
        losses = ce(head(checkpoint(block, x, use_reentrant=True)), labels())
    with pytest.raises(UnsupportedModuleError, match="use_reentrant=False"):
        engine.backward(losses, PerSample().assign(N))


class TrainCoupled(nn.Module):
    """Independent per sample in eval mode, centred over the batch in train mode."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, D))

    def forward(self, x):
        return (x - x.mean(0, keepdim=True) if self.training else x) * self.scale


def test_generic_rule_probes_again_when_the_module_switches_to_train_mode():
    model = nn.Sequential(nn.Linear(D, D), TrainCoupled(), nn.Linear(D, 3)).eval()
    engine = GhostEngine(model, unsupported="raise")
    x, y = torch.randn(N, D), labels()
    with engine.capture():
        losses = ce(model(x), y)
    engine.backward(losses, PerSample().assign(N))  # eval: independent, probe passes
    model.train()
    with engine.capture():
        losses = ce(model(x), y)
    with pytest.raises(UnsupportedModuleError, match="couples samples"):
        engine.backward(losses, PerSample().assign(N))


class MutatesKwarg(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, D))

    def forward(self, x, *, gain):
        return x * gain * self.scale


class UsesKwarg(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.m, self.b = nn.Linear(D, D), MutatesKwarg(), nn.Linear(D, 3)

    def forward(self, x):
        gain = torch.tanh(x) + 2.0
        out = self.m(self.a(x), gain=gain)
        gain.mul_(3.0)  # after the call: the recorded kwarg no longer holds what the module used
        return self.b(out)


def test_generic_rule_detects_a_keyword_input_changed_in_place():
    model = UsesKwarg()
    engine = GhostEngine(model, unsupported="raise")
    with engine.capture():
        losses = ce(model(torch.randn(N, D)), labels())
    with pytest.raises(UnsupportedModuleError, match=r"'m' \(MutatesKwarg\).*modified in place"):
        engine.backward(losses, PerSample().assign(N))


def test_failed_forward_inside_capture_lets_go_of_the_records():
    model = nn.Sequential(nn.Linear(D, D), nn.Tanh(), nn.Linear(D, 3))
    engine = GhostEngine(model)
    with pytest.raises(RuntimeError, match="boom"), engine.capture():
        model(torch.randn(N, D))
        raise RuntimeError("boom")
    assert not engine.captured and all(not r.calls for r in engine.rules)


def test_batch_of_one_call_of_a_generic_rule_module_is_refused():
    """The generic rule, too, refuses a batch-of-one call (only embedding ids are expanded)."""
    model = nn.Sequential(nn.Linear(D, D), Doubler(), nn.Linear(D, 3))

    def forward(x):
        h = model[0](x)
        return model[2](h + model[1](h[:1]))  # the generic module sees one sample, its output is broadcast

    engine = GhostEngine(model, unsupported="raise")
    assert isinstance(engine.rules[1], FunctionalRule)
    with engine.capture():
        losses = ce(forward(torch.randn(N, D)), labels())
    with pytest.raises(UnsupportedModuleError, match=r"'1' \(Doubler\).*size 1/1, not the 4 samples"):
        engine.backward(losses, PerSample().assign(N))
