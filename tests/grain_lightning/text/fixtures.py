"""A tiny random BERT with a real tokenizer, saved like a pretrained model directory, and a tiny review CSV."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import transformers as T

WORDS = "great love perfect fits comfortable soft pretty bad poor cheap small tight returned itchy dress top".split()
GOOD, BAD = WORDS[:7], WORDS[7:14]


def tiny_bert_dir(root: Path) -> Path:
    """A 2-layer width-32 BERT encoder (no head) and a WordPiece tokenizer, as ``from_pretrained`` expects."""
    path = root / "tiny-bert"
    if (path / "config.json").is_file():
        return path
    path.mkdir(parents=True)
    vocab = path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "it", "is", *WORDS]) + "\n")
    T.BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(str(path))
    cfg = T.BertConfig(
        vocab_size=len(vocab.read_text().split()), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    T.BertModel(cfg).save_pretrained(str(path))
    return path


def reviews_csv(root: Path, n: int = 96, seed: int = 0, name: str = "reviews.csv") -> Path:
    """``n`` short texts: ``label`` 1 for positive words, ``rating`` from the same, a string ``size``, 2 blank texts."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        label = int(rng.random() < 0.5)
        pool = GOOD if label else BAD
        words = [str(w) for w in rng.choice(pool, size=rng.integers(3, 8))] + ["the", "dress"]
        rng.shuffle(words)
        rows.append(
            {
                "text": " ".join(words),
                "label": label,
                "rating": float(3 + 2 * label - rng.integers(0, 2)),
                "size": str(rng.choice(["small", "large"])),
            }
        )
    frame = pd.DataFrame(rows)
    frame.loc[[5, 17], "text"] = np.nan  # missing texts are dropped with a warning
    path = root / name
    frame.to_csv(path, index=False)
    return path


def tiny_gpt2_dir(root: Path, dropout: float = 0.0) -> Path:
    """A 2-layer width-32 random GPT-2 LM (tied ``wte`` / ``lm_head``) and a word-level tokenizer that puts
    ``<|endoftext|>`` before and after each text, as ``AutoModelForCausalLM.from_pretrained`` expects."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    path = root / f"tiny-gpt2-{dropout}"
    if (path / "config.json").is_file():
        return path
    path.mkdir(parents=True)
    vocab = {w: i for i, w in enumerate(["<pad>", "<|endoftext|>", "<unk>", "the", "it", "is", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A <|endoftext|>", special_tokens=[("<|endoftext|>", 1)]
    )
    T.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<pad>", unk_token="<unk>"
    ).save_pretrained(str(path))
    cfg = T.GPT2Config(
        vocab_size=len(vocab), n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=1,
        pad_token_id=0, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
    )  # fmt: skip
    T.GPT2LMHeadModel(cfg).save_pretrained(str(path))
    return path
