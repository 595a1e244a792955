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
