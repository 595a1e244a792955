"""Pretrain a small GPT-2 on clothing reviews of some divisions, for the GRAIN generation study.

    PYTHONPATH=. .venv/bin/python benchmarks/grain_study/pretrain_gpt2.py \\
        [--data ../shared/data/womens_clothing_reviews.csv.gz] [--divisions "General,General Petite"] \\
        [--output_dir DIR] [--steps 300] [--threads 1] [--max_minutes 8]

No pretrained generative model installs offline, so this trains one, once, on CPU: a 4-layer, width-256 GPT-2
(4 heads, 128 positions, tied ``wte``/``lm_head``, dropout 0.1; 4.24M parameters, 1.05M of them the embedding)
on the ``Review Text`` of the ``General`` and ``General Petite`` divisions (21,202 reviews with text). The
``Initmates`` division (sic, the data's spelling: 1,426 reviews) is never read: ``clothing_gpt2.yaml`` fine-tunes
on it.

Tokenizer: a byte-level BPE with 4,096 tokens trained here on the pretraining texts (``tokenizers``), with
``<|endoftext|>`` before and after each text (GPT-2's convention for a document boundary; it makes the first
word predictable too) and ``<pad>``. Not MiniLM's tokenizer: its 30,522-token uncased WordPiece vocabulary would
make the tied embedding / LM head 7.8M of the model's parameters and the 30,522-way softmax most of each step's
CPU time; a byte-level BPE has no unknown tokens and keeps case and punctuation.

Training: texts truncated to ``--max_length`` tokens (64, as the fine-tuning), batches of 32 texts of similar
length (shuffled buckets), AdamW (lr 1e-3, weight decay 0.01 on matrices) with 5 % linear warm-up and linear decay
to 0 over ``--steps``, the mean next-token loss over the batch's tokens; ``--threads`` torch threads (the machine
is shared). ``--max_minutes`` stops early if the wall time runs out (recorded as ``stopped_early``). 500 held-out
reviews of the same divisions give the perplexity at the end (``exp`` of the token-mean loss).

Output: ``--output_dir`` (default ``$GRAIN_CACHE/gpt2-clothing``, i.e. ``~/.cache/grain_lightning/gpt2-clothing``;
not committed), a Hugging Face directory (``config.json``, ``model.safetensors``, ``tokenizer.json``) that
``AutoModelForCausalLM.from_pretrained`` and ``grain fit --data.task causal_lm --model.pretrained DIR`` read, and
``pretrain.json`` (settings, steps, tokens, wall time, loss curve, held-out perplexity). Written to a temporary
directory first and renamed into place.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from grain_lightning.text import cache_dir
from grain_lightning.text.perplexity import IGNORE_INDEX, token_nll

BOUNDARY, PAD = "<|endoftext|>", "<pad>"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="../shared/data/womens_clothing_reviews.csv.gz")
    p.add_argument("--text_column", default="Review Text")
    p.add_argument("--division_column", default="Division Name")
    p.add_argument("--divisions", default="General,General Petite", help="comma-separated divisions to pretrain on")
    p.add_argument("--output_dir", type=Path, default=None, help="default: $GRAIN_CACHE/gpt2-clothing")
    p.add_argument("--vocab_size", type=int, default=4096)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--max_length", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--holdout", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max_minutes", type=float, default=8.0, help="stop training early after this wall time")
    p.add_argument("--force", action="store_true", help="overwrite an existing output directory")
    return p.parse_args(argv)


def read_texts(args: argparse.Namespace) -> list[str]:
    frame = pd.read_csv(args.data)
    wanted = [d.strip() for d in args.divisions.split(",") if d.strip()]
    present = sorted(frame[args.division_column].dropna().astype(str).unique())
    unknown = [d for d in wanted if d not in present]
    if unknown:
        raise SystemExit(f"--divisions {unknown} not in {args.data}; its divisions are {present}")
    frame = frame[frame[args.division_column].isin(wanted)]
    texts = frame[args.text_column].dropna().astype(str).str.strip()
    return [t for t in texts if t]


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """A byte-level BPE (``vocab_size`` tokens incl. ``<pad>`` and ``<|endoftext|>``) as a transformers fast tokenizer
    that adds ``<|endoftext|>`` before and after each text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, BOUNDARY], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(texts, trainer=trainer)
    boundary = tok.token_to_id(BOUNDARY)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOUNDARY} $A {BOUNDARY}", special_tokens=[(BOUNDARY, boundary)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOUNDARY, eos_token=BOUNDARY, pad_token=PAD)


def encode(tokenizer: Any, texts: list[str], max_length: int) -> list[list[int]]:
    return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]


def batch_of(seqs: list[list[int]], pad: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (the ids, ``-100`` at padding)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.int64)
    mask = torch.zeros((len(seqs), width), dtype=torch.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, IGNORE_INDEX)}


def bucketed_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch: shuffle, sort by length within windows of 50 batches, cut into batches, shuffle the batches."""
    order = rng.permutation(len(lengths))
    window = 50 * batch_size
    batches: list[np.ndarray] = []
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


@torch.no_grad()
def perplexity(model: torch.nn.Module, seqs: list[list[int]], pad: int, batch_size: int = 64) -> float:
    """``exp`` of the token-mean next-token loss over every predicted token of ``seqs``."""
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(seqs), batch_size):
        b = batch_of(seqs[start : start + batch_size], pad)
        nll, mask = token_nll(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
        total += float((nll.double() * mask).sum())
        tokens += int(mask.sum())
    model.train()
    return math.exp(total / tokens)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from transformers import GPT2Config, GPT2LMHeadModel, get_linear_schedule_with_warmup

    torch.set_num_threads(args.threads)
    output = args.output_dir or cache_dir() / "gpt2-clothing"
    if (output / "config.json").is_file() and not args.force:
        raise SystemExit(f"{output} already holds a model; give --force to train it again")
    started = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)

    texts = read_texts(args)
    order = rng.permutation(len(texts))
    held_out = [texts[i] for i in order[: args.holdout]]
    train = [texts[i] for i in order[args.holdout :]]
    tokenizer = train_tokenizer(train, args.vocab_size)
    pad, boundary = tokenizer.pad_token_id, tokenizer.bos_token_id
    train_ids, held_ids = encode(tokenizer, train, args.max_length), encode(tokenizer, held_out, args.max_length)
    lengths = np.asarray([len(s) for s in train_ids])
    print(f"{len(train)} training and {len(held_out)} held-out reviews of {args.divisions!r}; vocabulary "
          f"{len(tokenizer)}; {int(lengths.sum())} tokens per epoch (max_length {args.max_length}); "
          f"tokenizer {time.perf_counter() - started:.0f} s", flush=True)  # fmt: skip

    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=128, n_embd=args.width, n_layer=args.layers, n_head=args.heads,
        bos_token_id=boundary, eos_token_id=boundary, pad_token_id=pad,
    )  # fmt: skip
    model = GPT2LMHeadModel(config).train()
    params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}], lr=args.lr,
        betas=(0.9, 0.98),
    )  # fmt: skip
    scheduler = get_linear_schedule_with_warmup(optimizer, int(0.05 * args.steps), args.steps)
    print(f"GPT-2 {args.layers} layers, width {args.width}: {params / 1e6:.2f}M parameters; held-out perplexity at "
          f"init {perplexity(model, held_ids, pad):.1f}", flush=True)  # fmt: skip

    train_start = time.perf_counter()
    deadline = started + 60 * args.max_minutes
    curve: list[dict[str, float]] = []
    step, tokens_seen, epoch, window_loss, window_n = 0, 0, 0, 0.0, 0
    stopped_early = False
    while step < args.steps and not stopped_early:
        for rows in bucketed_batches(lengths, args.batch_size, rng):
            if step >= args.steps:
                break
            if time.perf_counter() > deadline:
                stopped_early = True
                break
            b = batch_of([train_ids[i] for i in rows], pad)
            loss = model(**b).loss  # the token-mean next-token loss of the batch
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            tokens_seen += int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
            window_loss, window_n = window_loss + loss.item(), window_n + 1
            if step % 100 == 0 or step == args.steps:
                elapsed = time.perf_counter() - train_start
                curve.append(
                    {"step": step, "epoch": epoch, "train_loss": window_loss / window_n, "s": round(elapsed, 1)}
                )
                print(
                    f"step {step}/{args.steps} epoch {epoch} loss {window_loss / window_n:.3f} ({elapsed:.0f} s)",
                    flush=True,
                )
                window_loss, window_n = 0.0, 0
        epoch += 1
    train_s = time.perf_counter() - train_start
    held_ppl = perplexity(model, held_ids, pad)
    print(f"held-out perplexity {held_ppl:.2f} after {step} steps ({tokens_seen} tokens, {train_s:.0f} s)"
          + (" - stopped early by --max_minutes" if stopped_early else ""), flush=True)  # fmt: skip

    output.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".gpt2-", dir=output.parent))
    try:
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        record = {
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "parameters": params, "vocab_size": len(tokenizer), "train_reviews": len(train),
            "held_out_reviews": len(held_out), "steps": step, "tokens_seen": tokens_seen,
            "train_s": round(train_s, 1), "wall_s": round(time.perf_counter() - started, 1),
            "stopped_early": stopped_early, "held_out_perplexity": held_ppl, "curve": curve,
            "torch_threads": torch.get_num_threads(),
        }  # fmt: skip
        (scratch / "pretrain.json").write_text(json.dumps(record, indent=1) + "\n")
        if output.exists():
            shutil.rmtree(output)
        os.replace(scratch, output)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"saved {output}")


if __name__ == "__main__":
    main()
