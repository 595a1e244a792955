"""Tiny random-config Hugging Face models (no download) and their per-sample losses, for the engine tests."""

from __future__ import annotations

from collections.abc import Callable

import peft
import torch
import torch.nn.functional as F
import transformers as T
from torch import nn

VOCAB, SEQ, LABELS = 97, 12, 3
KINDS = ["gpt2", "bert", "roberta", "distilbert", "llama", "vit"]
LORA_TARGETS = {
    "gpt2": ["c_attn", "c_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "llama": ["q_proj", "v_proj"],
    "vit": ["q_proj", "v_proj"],
}
_LAYERS = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
_NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def build(kind: str, seed: int = 0) -> nn.Module:
    """A 2-layer, width-32 model of ``kind`` in train mode with dropout 0."""
    torch.manual_seed(seed)
    if kind == "gpt2":  # language model: tied wte / lm_head, Conv1D projections, wpe called with (1, S) ids
        cfg = T.GPT2Config(
            vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )  # fmt: skip
        model = T.GPT2LMHeadModel(cfg)
        assert model.lm_head.weight is model.transformer.wte.weight
    elif kind == "bert":
        cfg = T.BertConfig(vocab_size=VOCAB, max_position_embeddings=64, num_labels=LABELS, **_LAYERS, **_NO_DROPOUT)
        model = T.BertForSequenceClassification(cfg)
    elif kind == "roberta":
        cfg = T.RobertaConfig(
            vocab_size=VOCAB, max_position_embeddings=80, num_labels=LABELS, pad_token_id=1, **_LAYERS, **_NO_DROPOUT
        )
        model = T.RobertaForSequenceClassification(cfg)
    elif kind == "distilbert":
        cfg = T.DistilBertConfig(
            vocab_size=VOCAB, max_position_embeddings=64, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
            dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0, num_labels=LABELS,
        )  # fmt: skip
        model = T.DistilBertForSequenceClassification(cfg)
    elif kind == "llama":  # grouped-query attention (2 kv heads for 4), RoPE, LlamaRMSNorm
        cfg = T.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, num_labels=LABELS,
        )  # fmt: skip
        model = T.LlamaForSequenceClassification(cfg)
    elif kind == "vit":  # ViTEmbeddings owns cls_token and position_embeddings
        cfg = T.ViTConfig(image_size=16, patch_size=4, num_channels=3, num_labels=LABELS, **_LAYERS, **_NO_DROPOUT)
        model = T.ViTForImageClassification(cfg)
    else:
        raise ValueError(kind)
    return model.train()


def lora(model: nn.Module, kind: str) -> nn.Module:
    """``peft`` LoRA (r=4) on the attention projections; the base model frozen."""
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS[kind], lora_dropout=0.0)
    out = peft.get_peft_model(model, cfg)
    for name, p in out.named_parameters():  # LoRA B starts at zero: perturb so every LoRA weight gets a gradient
        if "lora_B" in name:
            nn.init.normal_(p, std=0.02)
    return out


def batch(kind: str, n: int, seed: int = 1, dtype: torch.dtype = torch.float32) -> dict:
    """A batch of ``n`` samples; token models get right padding of different lengths."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "vit":
        return {"pixel_values": torch.randn(n, 3, 16, 16, generator=gen, dtype=dtype),
                "labels": torch.randint(0, LABELS, (n,), generator=gen)}  # fmt: skip
    ids = torch.randint(2, VOCAB, (n, SEQ), generator=gen)
    lengths = torch.randint(SEQ // 2, SEQ + 1, (n,), generator=gen)
    lengths[0] = SEQ
    mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
    pad = 1 if kind == "roberta" else 0
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad))
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, LABELS, (n,), generator=gen)}


def per_sample_losses(kind: str, model: nn.Module, b: dict) -> Callable[[], torch.Tensor]:
    """The ``(n,)`` per-sample losses of ``b`` (token-mean next-token loss for GPT-2, else classification)."""

    def forward() -> torch.Tensor:
        if kind == "vit":
            return F.cross_entropy(model(pixel_values=b["pixel_values"]).logits, b["labels"], reduction="none")
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        if kind != "gpt2":
            return F.cross_entropy(out.logits.float(), b["labels"], reduction="none")
        logits, target, mask = out.logits[:, :-1], b["input_ids"][:, 1:], b["attention_mask"][:, 1:]
        tok = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")
        return (tok * mask).sum(1) / mask.sum(1)

    return forward
