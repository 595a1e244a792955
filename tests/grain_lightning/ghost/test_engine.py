"""One-backward engine: exact against the reference engine (Gram, combined gradient, group gradients).

Each check runs the reference engine and the one-backward engine on the *same* captured forward (so that
dropout masks agree), with tolerance 1e-6 (float64) / 1e-4 (float32) relative to the largest entry.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from grain_lightning import ByKey, Chunks, PerSample, group_gradients, min_norm_weights
from grain_lightning.ghost import GhostEngine, UnsupportedModuleError
from tests.grain_lightning.ghost.reference_check import RTOL, compare, rel_err


class SeqModel(nn.Module):
    """Embedding (padding_idx) -> LayerNorm -> Linear on sequences -> mean pool -> Linear head."""

    def __init__(self, vocab=11, dim=6, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, 5)
        self.head = nn.Linear(5, classes)

    def forward(self, ids):
        h = torch.tanh(self.proj(self.norm(self.emb(ids))))  # (n, T, 5)
        return self.head(h.mean(1))


class TinyTransformer(nn.Module):
    """Token embedding -> 2 TransformerEncoderLayers (attention + LayerNorm + MLP) -> mean pool -> head."""

    def __init__(self, batch_first=True, dropout=0.1, norm_first=False, vocab=13, dim=8, classes=3):
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        layer = nn.TransformerEncoderLayer(dim, 2, 16, dropout=dropout, batch_first=batch_first, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids):
        h = self.emb(ids)
        h = self.encoder(h if self.batch_first else h.transpose(0, 1))
        return self.head(h.mean(1 if self.batch_first else 0))


class TinyDecoder(nn.Module):
    """TransformerDecoderLayer (self- and cross-attention), sequence-first, memory derived from the input."""

    def __init__(self, vocab=13, dim=8, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.decoder = nn.TransformerDecoderLayer(dim, 2, 16, dropout=0.1)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids):
        h = self.emb(ids).transpose(0, 1)  # (T, n, dim)
        return self.head(self.decoder(h, torch.tanh(h[:3])).mean(0))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 3, 3, padding="same", dilation=2)
        self.c2 = nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 2), bias=False)
        self.head = nn.Linear(4, 3)

    def forward(self, x):  # x: (n, 2, 10)
        h = torch.tanh(self.c1(x))  # (n, 3, 10)
        h = h.unsqueeze(2).expand(-1, -1, 4, -1)  # (n, 3, 4, 10)
        return self.head(torch.relu(self.c2(h)).mean((2, 3)))


class NormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 6)
        self.rms = nn.RMSNorm(6)
        self.rms2 = nn.RMSNorm([3, 2], eps=1e-3)
        self.head = nn.Linear(6, 3)

    def forward(self, x):  # (n, 4, 5)
        h = self.rms(self.lin(x))
        h = self.rms2(h.view(*h.shape[:-1], 3, 2)).flatten(-2)
        return self.head(torch.tanh(h).mean(1))


class CrossAttention(nn.Module):
    """Attention with key is value != query (split in-projection) and with separate kdim/vdim weights."""

    def __init__(self):
        super().__init__()
        self.packed = nn.MultiheadAttention(6, 2)
        self.separate = nn.MultiheadAttention(6, 3, kdim=4, vdim=5, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x):  # (n, T, 6)
        kv = torch.tanh(x)
        a, _ = self.packed(x.transpose(0, 1), kv.transpose(0, 1), kv.transpose(0, 1))
        b, _ = self.separate(a.transpose(0, 1), x[..., :4], x[..., 1:])
        return self.head(b.mean(1))


class LoRALinear(nn.Module):
    """Frozen base Linear plus a trainable low-rank update ``B A x``."""

    def __init__(self, d_in, d_out, rank=2):
        super().__init__()
        self.base = nn.Linear(d_in, d_out).requires_grad_(False)
        self.a = nn.Linear(d_in, rank, bias=False)
        self.b = nn.Linear(rank, d_out, bias=False)

    def forward(self, x):
        return self.base(x) + self.b(self.a(x))


def mlp():
    return nn.Sequential(nn.Linear(7, 9), nn.Tanh(), nn.Linear(9, 9), nn.ReLU(inplace=True), nn.Linear(9, 3))


def labels(n=12, seed=0):
    return torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(seed))


def tokens(n=12, t=5, vocab=11):
    x = torch.randint(1, vocab, (n, t), generator=torch.Generator().manual_seed(1))
    x[:, -1] = 0  # padding
    x[0, :] = 0  # a sample made only of padding
    return x


def ce(out, y):
    return nn.functional.cross_entropy(out, y, reduction="none")


def case(kind, dtype):
    """(model, input) of each supported layer type."""
    torch.manual_seed(1)
    g = torch.Generator().manual_seed(2)
    if kind == "mlp":
        return mlp(), torch.randn(12, 7, generator=g)
    if kind == "seq":
        return SeqModel(), tokens()
    if kind == "transformer":
        return TinyTransformer(), tokens(vocab=13)
    if kind == "transformer_seq_first":
        return TinyTransformer(batch_first=False, norm_first=True), tokens(vocab=13)
    if kind == "decoder":
        return TinyDecoder(), tokens(vocab=13)
    if kind == "conv":
        return ConvNet(), torch.randn(12, 2, 10, generator=g)
    if kind == "rmsnorm":
        return NormNet(), torch.randn(12, 4, 5, generator=g)
    if kind == "attention":
        return CrossAttention(), torch.randn(12, 4, 6, generator=g)
    if kind == "lora":
        return nn.Sequential(LoRALinear(7, 6), nn.Tanh(), nn.Linear(6, 3)), torch.randn(12, 7, generator=g)
    raise ValueError(kind)


def cast(model, x, dtype):
    return model.to(dtype), (x.to(dtype) if x.is_floating_point() else x)


def assign(grouping, y):
    return ByKey(0).assign(len(y), (y,)) if grouping == "label" else grouping.assign(len(y))


KINDS = ["mlp", "seq", "transformer", "transformer_seq_first", "decoder", "conv", "rmsnorm", "attention", "lora"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("grouping", [PerSample(), Chunks(5), "label"], ids=["sample", "chunks", "key"])
def test_matches_reference(kind, dtype, grouping):
    model, x = cast(*case(kind, dtype), dtype)
    y = labels()
    compare(model, lambda: ce(model(x), y), assign(grouping, y), RTOL[dtype])


@pytest.mark.parametrize("path", ["ghost", "materialize"])
@pytest.mark.parametrize("kind", ["seq", "transformer", "conv", "attention"])
def test_both_gram_forms_match_reference(kind, path):
    model, x = cast(*case(kind, torch.float64), torch.float64)
    y = labels()
    compare(model, lambda: ce(model(x), y), Chunks(4).assign(12), 1e-6, engine=GhostEngine(model, linear_gram=path))


@pytest.mark.parametrize(
    "kind,unsupported", [("transformer", "raise"), ("attention", "raise"), ("lora", "raise"), ("custom", "fallback")]
)
def test_second_backward_combine_matches_reference(kind, unsupported):
    if kind == "custom":
        model, x = nn.Sequential(nn.Linear(7, 9), Custom(), nn.Tanh(), nn.Linear(9, 3)), torch.randn(12, 7)
    else:
        model, x = case(kind, torch.float64)
    model, x = cast(model, x, torch.float64)
    y = labels()
    engine = GhostEngine(model, combine="backward", unsupported=unsupported)
    compare(model, lambda: ce(model(x), y), PerSample().assign(12), 1e-6, engine=engine)


def test_module_called_twice_is_exact():
    torch.manual_seed(0)
    lin, head = nn.Linear(4, 4).double(), nn.Linear(4, 2).double()
    model = nn.ModuleList([lin, head])
    x, y = torch.randn(10, 4, dtype=torch.float64), labels(10) % 2
    compare(model, lambda: ce(head(torch.tanh(lin(torch.tanh(lin(x))))), y), PerSample().assign(10), 1e-6)


def test_frozen_and_excluded_parameters_are_ignored():
    model, x = cast(*case("mlp", torch.float64), torch.float64)
    model[0].weight.requires_grad_(False)
    y = labels()
    params = [p for p in model.parameters() if p.requires_grad and p is not model[2].bias]
    engine = GhostEngine(model, params=params)
    assert len(engine.params) == len(params) == 4
    compare(model, lambda: ce(model(x), y), Chunks(4).assign(12), 1e-6, engine=engine, params=params)
    assert model[0].weight.grad is None and model[2].bias.grad is None


class Custom(nn.Module):
    """A module type the engine does not know, owning a parameter."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(9))

    def forward(self, x):
        return x * self.scale


class CouplingScale(nn.Module):
    """Couples samples (centres over the batch) without declaring it: the generic rule's probe must refuse it."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(9))

    def forward(self, x):
        return (x - x.mean(0, keepdim=True)) * self.scale


class NoisyScale(nn.Module):
    """Draws random numbers in its forward: no exact per-sample re-run exists."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(9))

    def forward(self, x):
        return F.dropout(x, 0.5, training=True) * self.scale


def exact_cases():
    """Modules that used to fall back and are now handled exactly in the one backward."""
    torch.manual_seed(0)
    bn_eval = nn.Sequential(nn.Linear(7, 9), nn.BatchNorm1d(9), nn.Tanh(), nn.Linear(9, 3))
    bn_eval[1].eval()
    tied = nn.Sequential(nn.Linear(7, 7), nn.Tanh(), nn.Linear(7, 7), nn.Tanh(), nn.Linear(7, 3))
    tied[2].weight = tied[0].weight
    return {
        "batchnorm_eval": bn_eval,
        "custom": nn.Sequential(nn.Linear(7, 9), Custom(), nn.Tanh(), nn.Linear(9, 3)),
        "tied": tied,
        "grouped_conv": nn.Sequential(
            nn.Unflatten(1, (7, 1)), nn.Conv1d(7, 7, 1, groups=7), nn.Flatten(), nn.Linear(7, 3)
        ),
        "circular_conv": nn.Sequential(
            nn.Unflatten(1, (7, 1)),
            nn.Conv1d(7, 5, 3, padding=1, padding_mode="circular"),
            nn.Flatten(),
            nn.Linear(5, 3),
        ),
    }


@pytest.mark.parametrize("name", list(exact_cases()))
def test_formerly_unsupported_modules_are_exact_in_one_backward(name):
    model = exact_cases()[name].double()
    x, y = torch.randn(12, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(3)), labels()
    engine = GhostEngine(model, unsupported="raise")
    assert engine.fully_supported
    for assignment in (PerSample().assign(12), Chunks(3).assign(12)):
        compare(model, lambda: ce(model(x), y), assignment, 1e-6, engine=engine)
    assert engine.refused_last_step == []


def refused_cases():
    torch.manual_seed(0)
    return {
        "batchnorm_train": (nn.Sequential(nn.Linear(7, 9), nn.BatchNorm1d(9), nn.Tanh(), nn.Linear(9, 3)), "couples"),
        "coupling_custom": (nn.Sequential(nn.Linear(7, 9), CouplingScale(), nn.Linear(9, 3)), "couples samples"),
        "random_custom": (nn.Sequential(nn.Linear(7, 9), NoisyScale(), nn.Linear(9, 3)), "torch.func cannot run it"),
    }


@pytest.mark.parametrize("name", list(refused_cases()))
def test_modules_that_couple_samples_raise_naming_the_module(name):
    model, needle = refused_cases()[name]
    x, y = torch.randn(12, 7, generator=torch.Generator().manual_seed(3)), labels()
    with pytest.raises(UnsupportedModuleError, match=needle):
        engine = GhostEngine(model, unsupported="raise")
        with engine.capture():
            losses = ce(model(x), y)
        engine.backward(losses, PerSample().assign(12))


@pytest.mark.parametrize("name", ["batchnorm_train", "coupling_custom"])
def test_modules_that_couple_samples_fall_back_exactly(name):
    model, _ = refused_cases()[name]
    model = model.double()
    x, y = torch.randn(12, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(3)), labels()
    engine = GhostEngine(model, unsupported="fallback")
    with pytest.warns(RuntimeWarning, match="reference") if name != "batchnorm_train" else contextlib.nullcontext():
        compare(model, lambda: ce(model(x), y), Chunks(3).assign(12), 1e-6, engine=engine)
    assert engine.refused_last_step


def test_batchnorm_switched_to_training_after_construction_is_caught():
    model = nn.Sequential(nn.Linear(7, 9), nn.BatchNorm1d(9), nn.Linear(9, 3)).eval()
    model[1].requires_grad_(False)
    engine = GhostEngine(model, unsupported="raise")
    model.train()
    with engine.capture():
        losses = ce(model(torch.randn(6, 7)), labels(6))
    with pytest.raises(UnsupportedModuleError, match="couples the samples"):
        engine.backward(losses, PerSample().assign(6))


def test_gram_under_bf16_autocast_matches_reference_on_the_same_forward():
    """Tolerance 2e-2 of the largest entry: the reference's weight gradients are bf16 GEMM outputs
    (8-bit mantissa) while the engine multiplies the same bf16 activations in float32."""
    model, x = case("transformer", torch.float32)
    model.eval()  # no dropout, so that the two forwards below agree
    y = labels()
    a = Chunks(4).assign(12)
    params = list(model.parameters())
    engine = GhostEngine(model)
    with torch.autocast("cpu", dtype=torch.bfloat16), engine.capture():
        losses = ce(model(x), y)
    assert losses.dtype == torch.float32
    ref = group_gradients(a.group_means(losses), params, retain_graph=True)
    gram = engine.backward(losses, a).gram()
    assert gram.dtype == torch.float64
    assert rel_err(gram, ref.gram()) <= 2e-2, rel_err(gram, ref.gram())
    w = min_norm_weights(ref.gram())
    engine.write_gradients(w)
    for p, e in zip(params, ref.combine(w)):
        assert rel_err(p.grad, e) <= 5e-2, (tuple(p.shape), rel_err(p.grad, e))


def test_blockwise_gives_nonnegative_inner_products_and_a_shorter_step():
    model, x = cast(*case("transformer", torch.float64), torch.float64)
    model.eval()
    y = labels()
    a = PerSample().assign(12)
    params = list(model.parameters())
    engine = GhostEngine(model)
    with engine.capture():
        losses = ce(model(x), y)
    ref = group_gradients(a.group_means(losses), params, retain_graph=True)
    res = engine.blockwise_backward(losses, a)
    assert len(res.solves) == len(engine.rules)
    d = torch.cat([p.grad.reshape(-1) for p in params])
    g = torch.cat([t.reshape(12, -1) for t in ref.grads], 1)
    assert rel_err(res.gram(), ref.gram()) <= 1e-6
    inner = g @ d
    assert (inner >= (d @ d) * (1 - 1e-6)).all(), inner.min()  # <d, g_j> >= ||d||^2 >= 0
    w = min_norm_weights(ref.gram())
    d_global = w @ g
    assert d @ d <= d_global @ d_global * (1 + 1e-9)
    for name, solve in res.solves.items():  # each block's step is the min-norm point of its own hull
        assert solve.kkt_gap <= 1e-9 * float(torch.trace(res.grams[name])) + 1e-300


def test_errors_name_the_problem():
    model = mlp()
    engine = GhostEngine(model)
    with pytest.raises(RuntimeError, match="capture"):
        engine.backward(torch.zeros(3, requires_grad=True), PerSample().assign(3))
    with pytest.raises(ValueError, match="linear_gram"):
        GhostEngine(model, linear_gram="fast")
    with pytest.raises(ValueError, match="unsupported"):
        GhostEngine(model, unsupported="ignore")
    with pytest.raises(ValueError, match="combine"):
        GhostEngine(model, combine="later")
    with engine.capture():
        losses = ce(model(torch.randn(6, 7)), labels(6))
    with pytest.raises(ValueError, match="assignment of 4 samples"):
        engine.backward(losses, PerSample().assign(4))


class FunctionalUse(nn.Module):
    """A Linear whose weight also enters the loss outside the Linear's forward."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(7, 3)
        self.other = nn.Linear(7, 3)

    def forward(self, x):
        return self.lin(x) + x[:, :3] @ self.other.weight[:, :3].T  # `other` is never called as a module


def test_parameters_used_outside_their_module_are_detected():
    model = FunctionalUse().double()
    x, y = torch.randn(12, 7, dtype=torch.float64), labels()
    engine = GhostEngine(model, unsupported="raise")
    with engine.capture():
        losses = ce(model(x), y)
    with pytest.raises(UnsupportedModuleError, match=r"\['other.weight'\]"):
        engine.backward(losses, PerSample().assign(12))
    params = [p for p in model.parameters()]
    compare(
        model,
        lambda: ce(model(x), y),
        Chunks(4).assign(12),
        1e-6,
        engine=GhostEngine(model, unsupported="fallback"),
        params=params,
    )
    assert model.other.bias.grad is None  # never reached, as with autograd
