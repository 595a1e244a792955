"""Step time, peak memory and flops of the one-backward GRAIN step vs a plain step on Hugging Face transformers.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_hf.py [--repeats 3] [--models gpt2,bert] [--variants full,lora]
        [--no-memory] [--threads 2] [--vocab 8192]

Models (random weights from a config, no download; ``.train()`` mode, dropout 0; sequence 128, batch 16):

* ``gpt2``: ``GPT2LMHeadModel(GPT2Config(vocab_size=8192, n_positions=128, n_embd=256, n_layer=4, n_head=4,
  bos_token_id=0, eos_token_id=0))`` (GPT-2's default token id 50256 is outside this vocabulary); tied
  ``wte``/``lm_head``, ``Conv1D`` projections; per-sample loss: the mean next-token cross-entropy over the
  sequence (no padding);
* ``bert``: ``BertForSequenceClassification(BertConfig(vocab_size=8192, hidden_size=256, num_hidden_layers=4,
  num_attention_heads=4, intermediate_size=1024, max_position_embeddings=128, num_labels=4))``; per-sample
  loss: the cross-entropy of the label (attention mask all ones).

Variants: ``full`` fine-tuning (every parameter trainable) and ``lora`` (``peft.get_peft_model`` with
``LoraConfig(r=8, lora_alpha=16, lora_dropout=0)`` on ``c_attn, c_proj`` for GPT-2, ``query, value`` for
BERT; the base model frozen; ``lora_B`` drawn from N(0, 0.02) instead of zeros, as after some training).
Groupings: one group per sample (``PerSample()``, k = 16) and ``Chunks(8)`` (k = 8).

(plain) forward, ``losses.mean().backward()``; (GRAIN) the one-backward engine
``GhostEngine(model, unsupported="raise")``, built once per model: forward inside ``engine.capture()``,
``engine.backward(losses, assignment)``, ``solve_min_norm(grads.gram())`` and ``engine.write_gradients(w)``
(book-keeping combine: no second backward); after every GRAIN step the benchmark asserts that the engine
did not fall back (``engine.fully_supported`` and ``engine.refused_last_step == []``). Gradients are set to
``None`` before every step; no optimizer step.

Time: the fastest of ``--repeats`` runs after one warm-up of each method, the two methods interleaved in one
process (the minimum, because the 2 shared cores of this machine are loaded by others: it estimates the
uncontended cost).
Peak memory: each (model, variant, method, grouping) runs in a fresh subprocess with glibc's mmap threshold
fixed at 64 KiB (``MALLOC_MMAP_THRESHOLD_``) so that freed tensors return to the OS; after a warm-up step,
a thread samples the resident set size every 0.5 ms during one more step; the figure (MiB, 2^20 bytes) is the
peak minus the RSS before the step (model, data and the engine's fixed state included in neither).
Flops: one step of each method under ``torch.utils.flop_counter.FlopCounterMode`` (``get_total_flops()``:
matrix products, attention, convolutions; element-wise work not counted), in GFLOP; ``n/a`` with the reason
if the counter fails inside the engine's hooks.

``--self-check``: every GRAIN step runs the engine's self-check (``engine.backward(..., self_check=True)``:
one more backward with weight gradients), i.e. the cost of a step ``GrainConfig(self_check=...)`` checks.

Goals (the issue): a per-sample GRAIN step at most 1.3x a plain step's time and 1.5x its peak memory (aim
1.1x); rows that miss them are marked. ``--profile`` prints the 10 most expensive operators (self CPU time,
``torch.profiler``) of one GRAIN step of the first model and variant with per-sample groups, and exits.

The default run (2 models x 2 variants x 2 groupings, 3 repeats, memory subprocesses) takes about
3 minutes on the 2-core CPU below (vocabulary 8192 kept: no smaller one needed).

Measured on 2026-12-06 (2-core CPU, torch 2.13; no other job running; with the engine as of the review fixes):

    PYTHONPATH=. .venv/bin/python benchmarks/bench_hf.py

    torch 2.13.0+cpu, transformers 5.25.0, peft 0.21.2; 2 threads, load average 1.37 at the start
    batch 16, seq 128, vocab 8192; ms: fastest of 3; MiB: peak RSS of a step; GF: GFLOP of a step; x: GRAIN/plain
    model variant groups      plain ms GRAIN ms     x plain MiB GRAIN MiB     x plain GF GRAIN GF     x  goals
    gpt2  full    per-sample       629      945  1.50     435.4     435.3  1.00     64.4     89.9  1.40  MISS time
    gpt2  full    k=8              681      772  1.13     435.3     434.8  1.00     64.4     65.3  1.01
    gpt2  lora    per-sample       568      586  1.03     423.8     424.0  1.00     43.2     43.3  1.00  ok
    gpt2  lora    k=8              581      589  1.01     423.7     423.8  1.00     43.2     43.3  1.00
    bert  full    per-sample       259      380  1.47     139.6     179.3  1.28     38.7     49.2  1.27  MISS time
    bert  full    k=8              264      303  1.15     139.5     148.2  1.06     38.7     39.2  1.01
    bert  lora    per-sample       193      201  1.04     103.6     104.1  1.00     25.4     25.4  1.00  ok
    bert  lora    k=8              194      200  1.03     103.8     104.3  1.01     25.4     25.4  1.00
    goals (per-sample rows): GRAIN time <= 1.3x and peak memory <= 1.5x plain (aim 1.1x for both)
    MISS: over a goal; 'ok, over aim': within the goals, over 1.1x; k=8 rows are not graded
    load average 1.39 at the end

Checked steps (``--self-check --no-memory --variants full``, same day): GPT-2 per-sample 2.54x a plain step,
k=8 1.83x; BERT per-sample 2.38x, k=8 1.88x (one more backward with weight gradients; by default only the
first optimizer step is checked).

Reading: both per-sample full fine-tuning rows miss the 1.3x time goal (across other quiet runs of the same day:
GPT-2 1.42-1.61x, BERT 1.47-1.50x); every row meets the memory goal. The flop column shows why: with
k = n the Gram materialises the per-sample gradients (``n T p d`` per layer: one more weight-gradient
pass), and a layer that keeps ``A, B`` rather than ``G`` (``k p d > n T (d + p)``: the MLP, GPT-2's
``c_attn`` and ``lm_head``) repeats its weight-gradient GEMM for the combined gradient. With k = 8 the
layers keep ``G`` and the flops are a plain step's. GPT-2's peak is the vocabulary-sized logits at the loss,
reached by both methods before the backward (1.00x); BERT's per-sample GRAIN peak is the kept ``A, B`` at
the end of the backward. LoRA: the adapters are small and their Gram forms cost almost nothing.
"""

from __future__ import annotations

import argparse
import os
import textwrap
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from peak_rss import in_fresh_process, peak_growth
from torch import nn

from grain_lightning import Chunks, PerSample, solve_min_norm
from grain_lightning.ghost import GhostEngine

LORA_TARGETS = {"gpt2": ["c_attn", "c_proj"], "bert": ["query", "value"]}
GROUPINGS = {"per-sample": PerSample(), "k=8": Chunks(8)}
METHODS = ["plain", "grain"]
LABELS = 4
GOAL_TIME, GOAL_MEMORY, AIM = 1.3, 1.5, 1.1


def setup(model_name: str, variant: str, batch: int, seq: int, vocab: int):
    """The model (train mode) and a closure returning the ``(batch,)`` per-sample losses of a fixed batch."""
    import transformers as T

    torch.manual_seed(0)
    if model_name == "gpt2":
        cfg = T.GPT2Config(
            vocab_size=vocab, n_positions=seq, n_embd=256, n_layer=4, n_head=4, bos_token_id=0, eos_token_id=0,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )  # fmt: skip
        model = T.GPT2LMHeadModel(cfg)
        assert model.lm_head.weight is model.transformer.wte.weight
    elif model_name == "bert":
        cfg = T.BertConfig(
            vocab_size=vocab, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
            max_position_embeddings=seq, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=LABELS,
        )  # fmt: skip
        model = T.BertForSequenceClassification(cfg)
    else:
        raise ValueError(f"unknown model {model_name!r} (gpt2, bert)")
    if variant == "lora":
        import peft

        lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS[model_name], lora_dropout=0.0)
        with warnings.catch_warnings():  # peft's own notices (fan_in_fan_out set for Conv1D; a deprecated property)
            warnings.simplefilter("ignore")
            model = peft.get_peft_model(model, lora)
        for name, p in model.named_parameters():  # lora_B starts at zero: as after some training instead
            if "lora_B" in name:
                nn.init.normal_(p, std=0.02)
    elif variant != "full":
        raise ValueError(f"unknown variant {variant!r} (full, lora)")
    model.train()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels = torch.randint(0, LABELS, (batch,), generator=gen)
    mask = torch.ones_like(ids)

    def losses() -> torch.Tensor:
        if model_name == "gpt2":
            logits = model(input_ids=ids).logits[:, :-1]
            return F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(1)
        return F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, labels, reduction="none")

    return model, losses


def steps(model: nn.Module, losses: Callable[[], torch.Tensor], self_check: bool = False) -> dict[str, Callable]:
    """The plain and the GRAIN step (each takes a ``GroupAssignment``); ``self_check``: every GRAIN step is one
    the engine checks against autograd (what ``GrainConfig(self_check=...)`` costs on a checked step)."""
    params = [p for p in model.parameters() if p.requires_grad]
    engine = GhostEngine(model, unsupported="raise")

    def zero() -> None:
        for p in params:
            p.grad = None

    def plain(assignment) -> None:
        zero()
        losses().mean().backward()

    def grain(assignment) -> None:
        zero()
        with engine.capture():
            per_sample = losses()
        grads = engine.backward(per_sample, assignment, self_check=self_check)
        w = solve_min_norm(grads.gram()).weights
        engine.write_gradients(w)
        if not engine.fully_supported or engine.refused_last_step != []:
            raise RuntimeError(
                f"the engine fell back: unsupported {engine.unsupported_modules}, "
                f"refused this step {engine.refused_last_step}"
            )

    return {"plain": plain, "grain": grain}


def count_flops(fn: Callable, assignment) -> tuple[float | None, str]:
    """GFLOP of one step under ``FlopCounterMode`` (``None`` and the reason if the counter fails)."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        counter = FlopCounterMode(display=False)
        with counter:
            fn(assignment)
        return counter.get_total_flops() / 1e9, ""
    except Exception as e:  # reported in the notes, not hidden
        return None, f"{type(e).__name__}: {e}"


def measure_memory(model_name: str, variant: str, method: str, grouping: str, args) -> int:
    model, losses = setup(model_name, variant, args.batch, args.seq, args.vocab)
    fn = steps(model, losses)[method]
    assignment = GROUPINGS[grouping].assign(args.batch)
    fn(assignment)  # warm-up: one-time allocations (thread pools, kernels)
    for p in model.parameters():
        p.grad = None
    return peak_growth(lambda: fn(assignment))


def memory_in_subprocess(model_name: str, variant: str, method: str, grouping: str, args) -> float:
    cmd = ["--memory", model_name, variant, method, grouping, "--batch", str(args.batch), "--seq", str(args.seq)]
    return in_fresh_process(__file__, cmd + ["--vocab", str(args.vocab), "--threads", str(args.threads)])


def profile(model_name: str, variant: str, args) -> None:
    """Top 10 operators (self CPU time) of one GRAIN step with per-sample groups, and of a plain step."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    model, losses = setup(model_name, variant, args.batch, args.seq, args.vocab)
    fns = steps(model, losses)
    assignment = GROUPINGS["per-sample"].assign(args.batch)
    for method in METHODS:
        fns[method](assignment)  # warm-up
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            fns[method](assignment)
        print(f"\n{model_name} {variant} per-sample, {method} step: top 10 by self CPU time")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=40))


def fmt(x: float | None, width: int, digits: int = 1) -> str:
    return f"{'n/a':>{width}}" if x is None else f"{x:>{width}.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=8192, help="vocabulary size of both configs")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--models", default="gpt2,bert")
    ap.add_argument("--variants", default="full,lora")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--profile", action="store_true", help="profile one GRAIN step and exit")
    ap.add_argument(
        "--self-check", action="store_true", help="time GRAIN steps that run the engine's self-check (checked steps)"
    )
    ap.add_argument("--memory", nargs=4, metavar=("MODEL", "VARIANT", "METHOD", "GROUPING"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory:
        print(measure_memory(*args.memory, args))
        return
    models, variants = args.models.split(","), args.variants.split(",")
    if args.profile:
        profile(models[0], variants[0], args)
        return
    import peft
    import transformers

    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}; "
        f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f} at the start"
    )
    print(
        f"batch {args.batch}, seq {args.seq}, vocab {args.vocab}; ms: fastest of {args.repeats}; MiB: peak RSS of "
        "a step; GF: GFLOP of a step; x: GRAIN/plain"
    )
    head = (
        f"{'model':<6}{'variant':<8}{'groups':<11}"
        f"{'plain ms':>9}{'GRAIN ms':>9}{'x':>6}"
        f"{'plain MiB':>10}{'GRAIN MiB':>10}{'x':>6}"
        f"{'plain GF':>9}{'GRAIN GF':>9}{'x':>6}  goals"
    )
    print(head)
    notes: list[str] = []
    for model_name in models:
        for variant in variants:
            model, losses = setup(model_name, variant, args.batch, args.seq, args.vocab)
            fns = steps(model, losses, args.self_check)
            for gname, grouping in GROUPINGS.items():
                assignment = grouping.assign(args.batch)
                for m in METHODS:
                    fns[m](assignment)  # warm-up
                times: dict[str, list[float]] = {m: [] for m in METHODS}
                for _ in range(args.repeats):
                    for m in METHODS:
                        t = time.perf_counter()
                        fns[m](assignment)
                        times[m].append(time.perf_counter() - t)
                ms = {m: min(times[m]) * 1e3 for m in METHODS}
                gflop: dict[str, float | None] = {}
                for m in METHODS:
                    gflop[m], why = count_flops(fns[m], assignment)
                    if why:
                        notes.append(f"flops {model_name}/{variant}/{gname}/{m}: n/a ({why})")
                mib: dict[str, float | None] = {m: None for m in METHODS}
                if not args.no_memory:
                    mib = {m: memory_in_subprocess(model_name, variant, m, gname, args) for m in METHODS}
                t_ratio = ms["grain"] / ms["plain"]
                m_ratio = mib["grain"] / mib["plain"] if mib["grain"] is not None and mib["plain"] else None
                f_ratio = gflop["grain"] / gflop["plain"] if gflop["grain"] is not None and gflop["plain"] else None
                mark = ""
                if gname == "per-sample":
                    misses = (["time"] if t_ratio > GOAL_TIME else []) + (
                        ["memory"] if m_ratio is not None and m_ratio > GOAL_MEMORY else []
                    )
                    over_aim = t_ratio > AIM or (m_ratio is not None and m_ratio > AIM)
                    mark = "MISS " + "+".join(misses) if misses else ("ok, over aim" if over_aim else "ok")
                print(
                    f"{model_name:<6}{variant:<8}{gname:<11}"
                    f"{ms['plain']:>9.0f}{ms['grain']:>9.0f}{t_ratio:>6.2f}"
                    f"{fmt(mib['plain'], 10)}{fmt(mib['grain'], 10)}{fmt(m_ratio, 6, 2)}"
                    f"{fmt(gflop['plain'], 9)}{fmt(gflop['grain'], 9)}{fmt(f_ratio, 6, 2)}  {mark}".rstrip(),
                    flush=True,
                )
            del model, losses, fns
    print(
        f"goals (per-sample rows): GRAIN time <= {GOAL_TIME}x and peak memory <= {GOAL_MEMORY}x plain "
        f"(aim {AIM}x for both)\nMISS: over a goal; 'ok, over aim': within the goals, over {AIM}x; "
        "k=8 rows are not graded"
    )
    for note in notes:
        print(textwrap.fill(note, 116, subsequent_indent="    "))
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
