"""Step time and peak memory of a GRAIN step: plain mean vs one-backward engine vs reference engine.

    .venv/bin/python benchmarks/bench_engines.py [--repeats 5] [--models transformer,mlp]

Models: a transformer encoder (token embedding, 4 x TransformerEncoderLayer of width 256 with 4 heads and
MLP 1024, sequence 64, batch 32, mean pool, linear head; dropout 0) and an MLP (128 -> 4 x [Linear 256,
LayerNorm, GELU] -> 10, batch 32). Groupings: one group per sample (k = 32) and k = 8 chunks.

A step is forward, backward, Gram, min-norm solve and the combined gradient written into ``.grad`` (no
optimizer step); for the plain step, forward and ``loss.mean().backward()``.

(a) plain mean step; (b) one-backward engine (``GhostEngine``, book-keeping combine: no second backward);
(b2) the same engine with ``combine="backward"`` (stores nothing, one weighted second backward);
(bw) block-wise mode (``blockwise_backward``: one min-norm per module); (c) reference engine (one backward
per group).

Time: the fastest of ``--repeats`` runs (10x as many for the MLP) after one warm-up, the methods
interleaved in one process (the minimum, because the 2 shared cores of this machine are loaded by others:
it estimates the uncontended cost); the slow reference step is timed ``--reference-repeats`` times
without its own warm-up.
Peak memory: each (model, method, grouping) runs in a fresh subprocess with glibc's mmap threshold fixed at
64 KiB (``MALLOC_MMAP_THRESHOLD_``) so that freed tensors return to the OS; after a warm-up step, a thread
samples the resident set size every 0.5 ms during one more step; the figure is the peak minus the RSS
before the step (model, data and optimizer-free state included in neither).
"""

from __future__ import annotations

import argparse
import time

import torch
from peak_rss import in_fresh_process, peak_growth
from torch import nn

from grain_lightning import Chunks, PerSample, group_gradients, solve_min_norm
from grain_lightning.ghost import GhostEngine


class Transformer(nn.Module):
    def __init__(self, vocab=1000, width=256, depth=4, heads=4, classes=10):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(width, classes)

    def forward(self, ids):
        return self.head(self.encoder(self.emb(ids)).mean(1))


def mlp(width=256, depth=4, din=128, classes=10) -> nn.Module:
    layers, d = [], din
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.LayerNorm(width), nn.GELU()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, classes))


def setup(model_name: str, batch: int, seq: int):
    torch.manual_seed(0)
    if model_name == "transformer":
        model = Transformer()
        x = torch.randint(0, 1000, (batch, seq))
    else:
        model = mlp()
        x = torch.randn(batch, 128)
    y = torch.randint(0, 10, (batch,))
    return model, x, y


def steps(model, x, y):
    """The three step functions (a, b, c) for one model."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    engine = GhostEngine(model)
    engine2 = GhostEngine(model, combine="backward")

    def plain(assignment):
        for p in params:
            p.grad = None
        loss_fn(model(x), y).mean().backward()

    def ghost(assignment):
        with engine.capture():
            losses = loss_fn(model(x), y)
        gram = engine.backward(losses, assignment).gram()
        engine.write_gradients(solve_min_norm(gram).weights)

    def ghost_second_backward(assignment):
        with engine2.capture():
            losses = loss_fn(model(x), y)
        gram = engine2.backward(losses, assignment).gram()
        engine2.write_gradients(solve_min_norm(gram).weights)

    def blockwise(assignment):
        with engine.capture():
            losses = loss_fn(model(x), y)
        engine.blockwise_backward(losses, assignment)

    def reference(assignment):
        losses = loss_fn(model(x), y)
        gg = group_gradients(assignment.group_means(losses), params)
        w = solve_min_norm(gg.gram()).weights
        for p, d in zip(params, gg.combine(w)):
            p.grad = d

    return {"a": plain, "b": ghost, "b2": ghost_second_backward, "bw": blockwise, "c": reference}


GROUPINGS = {"per-sample": PerSample(), "k=8": Chunks(8)}


def measure_memory(model_name: str, method: str, grouping: str, batch: int, seq: int) -> int:
    model, x, y = setup(model_name, batch, seq)
    fn = steps(model, x, y)[method]
    assignment = GROUPINGS[grouping].assign(batch)
    fn(assignment)  # warm-up: one-time allocations (thread pools, kernels)
    for p in model.parameters():
        p.grad = None
    return peak_growth(lambda: fn(assignment))


def memory_in_subprocess(model_name, method, grouping, batch, seq, threads) -> float:
    cmd = ["--memory", model_name, method, grouping, "--batch", str(batch), "--seq", str(seq)]
    return in_fresh_process(__file__, cmd + (["--threads", str(threads)] if threads else []))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--reference-repeats", type=int, default=2, help="timed runs of the slow reference step")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--models", default="transformer,mlp")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--memory", nargs=3, metavar=("MODEL", "METHOD", "GROUPING"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory:
        print(measure_memory(*args.memory, args.batch, args.seq))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, seq {args.seq}")
    methods = ["a", "b", "b2", "bw", "c"]
    print(
        "a: plain mean step, b: one-backward (book-keeping), b2: one-backward + weighted 2nd backward, "
        "bw: block-wise, c: reference"
    )
    for model_name in args.models.split(","):
        model, x, y = setup(model_name, args.batch, args.seq)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"\n{model_name} ({n_params / 1e6:.2f} M parameters)")
        print(
            f"{'groups':<12}{'':<6}"
            + "".join(f"{m:>10}" for m in methods)
            + "".join(f"{m + '/a':>8}" for m in methods[1:])
        )
        fns = steps(model, x, y)
        for gname, grouping in GROUPINGS.items():
            assignment = grouping.assign(args.batch)
            times = {m: [] for m in methods}
            for m in methods[:-1]:
                fns[m](assignment)  # warm-up (the reference step shares its kernels with the plain one)
            repeats = args.repeats * (10 if model_name == "mlp" else 1)  # MLP steps take milliseconds
            for r in range(repeats):
                for m in methods:
                    if m == "c" and r >= args.reference_repeats:
                        continue
                    t = time.perf_counter()
                    fns[m](assignment)
                    times[m].append(time.perf_counter() - t)
            ms = {m: min(times[m]) * 1e3 for m in methods}
            print(
                f"{gname:<12}{'ms':<6}"
                + "".join(f"{ms[m]:>10.1f}" for m in methods)
                + "".join(f"{ms[m] / ms['a']:>8.2f}" for m in methods[1:]),
                flush=True,
            )
            if not args.no_memory:
                mib = {
                    m: memory_in_subprocess(model_name, m, gname, args.batch, args.seq, args.threads) for m in methods
                }
                print(
                    f"{'':<12}{'MiB':<6}"
                    + "".join(f"{mib[m]:>10.1f}" for m in methods)
                    + "".join(f"{mib[m] / mib['a']:>8.2f}" for m in methods[1:]),
                    flush=True,
                )


if __name__ == "__main__":
    main()
