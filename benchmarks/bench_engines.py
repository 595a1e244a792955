"""Step time of a GRAIN step: plain mean vs one-backward engine vs reference engine.

    .venv/bin/python benchmarks/bench_engines.py [--width 256 --depth 4 --batch 32 --repeats 10]

MLP only for now (the one-backward engine covers Linear, Embedding and LayerNorm). A step is forward,
backward, Gram, min-norm solve and the combined gradient written into .grad (no optimizer step). Peak
memory is not measured yet. Prints b/a and c/a time ratios (a = plain mean, b = one-backward, c = reference).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from grain_lightning import Chunks, PerSample, combine_gradients, group_gradients, solve_min_norm
from grain_lightning.ghost import GhostEngine


def make(width: int, depth: int, din: int = 128, classes: int = 10) -> nn.Module:
    layers, d = [], din
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.LayerNorm(width), nn.GELU()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, classes))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = make(args.width, args.depth)
    params = list(model.parameters())
    x, y = torch.randn(args.batch, 128), torch.randint(0, 10, (args.batch,))
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    engine = GhostEngine(model)

    def plain():
        for p in params:
            p.grad = None
        loss_fn(model(x), y).mean().backward()

    def ghost(assignment):
        with engine.capture():
            losses = loss_fn(model(x), y)
        gram = engine.backward(losses, assignment)
        engine.write_gradients(solve_min_norm(gram).weights)

    def reference(assignment):
        losses = loss_fn(model(x), y)
        gg = group_gradients(assignment.group_means(losses), params)
        w = solve_min_norm(gg.gram()).weights
        for p, d in zip(params, combine_gradients(gg, w)):
            p.grad = d

    def timeit(fn):
        fn()
        ts = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    n_params = sum(p.numel() for p in params)
    print(f"MLP width {args.width} depth {args.depth} batch {args.batch}: {n_params / 1e6:.2f} M parameters")
    print(f"{'groups':<12}{'plain ms':>10}{'1-bwd ms':>10}{'ref ms':>10}{'1-bwd/plain':>13}{'ref/plain':>11}")
    for name, grouping in [("per-sample", PerSample()), ("k=8 chunks", Chunks(8))]:
        a = grouping.assign(args.batch)
        tp, tg, tr = timeit(plain), timeit(lambda: ghost(a)), timeit(lambda: reference(a))
        print(f"{name:<12}{tp * 1e3:>10.2f}{tg * 1e3:>10.2f}{tr * 1e3:>10.2f}{tg / tp:>13.2f}{tr / tp:>11.2f}")


if __name__ == "__main__":
    main()
