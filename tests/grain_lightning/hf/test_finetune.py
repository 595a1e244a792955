"""GRAIN fine-tuning of a Hugging Face model through the Lightning mixin: one-backward engine, self-check."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from grain_lightning import GrainConfig, GrainMixin
from tests.grain_lightning.helpers import trainer
from tests.grain_lightning.hf.tiny_models import batch, build, lora


class TokenData(Dataset):
    def __init__(self, kind: str, n: int) -> None:
        self.b = batch(kind, n)

    def __len__(self) -> int:
        return len(self.b["labels"])

    def __getitem__(self, i: int) -> dict:
        return {k: v[i] for k, v in self.b.items()}


class SequenceClassifier(GrainMixin, L.LightningModule):
    def __init__(self, kind: str, use_lora: bool, grain: GrainConfig) -> None:
        super().__init__(grain=grain)
        model = build(kind)
        self.model = lora(model, kind) if use_lora else model

    def grain_losses(self, batch, batch_idx):
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return F.cross_entropy(out.logits, batch["labels"], reduction="none")

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)


@pytest.mark.parametrize("use_lora", [False, True])
def test_bert_fit_uses_the_one_backward_engine_and_passes_the_self_check(use_lora):
    """10 samples in batches of 4: the last batch has 2 samples; self-check every 2 steps."""
    module = SequenceClassifier("bert", use_lora, GrainConfig(engine="ghost", unsupported="raise", self_check=2))
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    t = trainer(max_epochs=2)
    t.fit(module, DataLoader(TokenData("bert", 10), batch_size=4))
    assert t.global_step == 6
    engine = module.grain_engine
    assert engine is not None and engine.fully_supported and engine.refused_last_step == []
    assert engine.last_self_check is not None and engine.last_self_check.ok
    assert module.grain_self_check_passed == 3  # steps 0, 2, 4
    changed = [n for n, p in module.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed and len(changed) == len(before)


def test_auto_engine_picks_the_one_backward_engine_for_bert():
    module = SequenceClassifier("bert", False, GrainConfig())
    t = trainer(max_steps=1)
    t.fit(module, DataLoader(TokenData("bert", 8), batch_size=8))
    assert module.grain_engine is not None and module.grain_engine.last_self_check.ok
