"""The one-backward engine on real Hugging Face architectures (tiny random configs), full fine-tuning and LoRA.

Gram, combined gradient and group gradients against the reference engine (one backward per group), with
``unsupported="raise"``: no case may fall back. Models in ``train()`` mode with dropout 0, right padding
of different lengths, and a last batch smaller than the others (5, where the sequence is 12).
"""

from __future__ import annotations

import pytest
import torch

from grain_lightning import Chunks, PerSample
from grain_lightning.ghost import GhostEngine
from tests.grain_lightning.ghost.reference_check import compare
from tests.grain_lightning.hf.tiny_models import KINDS, batch, build, lora, per_sample_losses

CASES = [
    # (dtype, n, grouping, rtol)
    pytest.param(torch.float64, 6, PerSample(), 1e-6, id="f64-sample"),
    pytest.param(torch.float64, 6, Chunks(4), 1e-6, id="f64-chunks4"),
    pytest.param(torch.float64, 5, PerSample(), 1e-6, id="f64-last-batch-5"),
    pytest.param(torch.float32, 6, PerSample(), 1e-4, id="f32-sample"),
]


@pytest.mark.parametrize("variant", ["full", "lora"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype,n,grouping,rtol", CASES)
def test_engine_matches_reference_without_fallback(kind, variant, dtype, n, grouping, rtol):
    model = build(kind).to(dtype)
    if variant == "lora":
        model = lora(model, kind)
    b = batch(kind, n, dtype=dtype)
    engine = GhostEngine(model, unsupported="raise")
    assert engine.fully_supported and engine.unsupported_modules == []
    compare(model, per_sample_losses(kind, model, b), grouping.assign(n), rtol, engine=engine)
    assert engine.refused_last_step == []


@pytest.mark.parametrize("kind", ["gpt2", "bert", "distilbert"])
def test_batch_that_does_not_divide_the_sequence_runs_and_is_exact(kind):
    """The issue's crash: batch 16, sequence 12 (position ids (1, 12) used to be reshaped to (16, -1))."""
    model = build(kind)
    b = batch(kind, 16)
    engine = GhostEngine(model, unsupported="raise")
    compare(model, per_sample_losses(kind, model, b), Chunks(8).assign(16), 1e-4, engine=engine)


def test_self_check_passes_on_every_architecture_and_reports_its_error():
    for kind in KINDS:
        model = build(kind)
        b = batch(kind, 6)
        engine = GhostEngine(model, unsupported="raise")
        with engine.capture():
            losses = per_sample_losses(kind, model, b)()
        engine.backward(losses, PerSample().assign(6), self_check=True)
        report = engine.last_self_check
        assert report is not None and report.ok, (kind, report)
        assert report.checked == len([p for p in model.parameters() if p.requires_grad])
        assert 0.0 <= report.worst <= 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_self_check_passes_under_bf16_autocast(kind):
    """The engine multiplies bf16 activations in float32, autograd in bf16: within the bf16 tolerance."""
    model = build(kind)
    b = batch(kind, 6)
    engine = GhostEngine(model, unsupported="raise")
    with torch.autocast("cpu", dtype=torch.bfloat16), engine.capture():
        losses = per_sample_losses(kind, model, b)()
    engine.backward(losses, Chunks(3).assign(6), self_check=True)
    assert engine.last_self_check.ok and engine.refused_last_step == []


@pytest.mark.parametrize(
    "path",
    [
        "transformers.models.t5.modeling_t5.T5LayerNorm",
        "transformers.models.llama.modeling_llama.LlamaRMSNorm",
        "transformers.models.mistral.modeling_mistral.MistralRMSNorm",
        "transformers.models.qwen2.modeling_qwen2.Qwen2RMSNorm",
    ],
)
def test_rmsnorm_like_modules_get_the_exact_generic_rule(path):
    import importlib

    from torch import nn

    from grain_lightning.ghost.rules import FunctionalRule

    module, name = path.rsplit(".", 1)
    torch.manual_seed(0)
    norm = getattr(importlib.import_module(module), name)(8)
    nn.init.uniform_(norm.weight, 0.5, 1.5)
    model = nn.Sequential(nn.Linear(5, 8), norm, nn.Linear(8, 3)).double()
    x, y = torch.randn(6, 4, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    engine = GhostEngine(model, unsupported="raise")
    assert any(isinstance(r, FunctionalRule) and r.module is norm for r in engine.rules)
    loss = lambda: torch.nn.functional.cross_entropy(model(x).mean(1), y, reduction="none")  # noqa: E731
    compare(model, loss, Chunks(3).assign(6), 1e-6, engine=engine)
