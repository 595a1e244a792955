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
