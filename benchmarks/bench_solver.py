"""Min-norm solver speed and accuracy for k = 8 .. 1024 groups.

    .venv/bin/python benchmarks/bench_solver.py [--repeats 20]

For each k and Gram family, prints the median wall time of ``solve_min_norm`` (cold start and warm
start from a nearby solution), its KKT gap relative to trace(G), and side by side the loose
Frank-Wolfe solver common in MGDA code (100 iterations, eps 1e-3) with its time ratio and its worst
``<d, g_j> / trace(G)``: negative values are groups whose loss that direction increases.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from grain_lightning import solve_min_norm


def frank_wolfe(gram: np.ndarray, iters: int = 100, eps: float = 1e-3) -> np.ndarray:
    k = gram.shape[0]
    w = np.full(k, 1.0 / k)
    for _ in range(iters):
        gw = gram @ w
        j = int(np.argmin(gw))
        dv = -w.copy()
        dv[j] += 1.0
        denom = dv @ gram @ dv
        step = 1.0 if denom <= 0 else float(np.clip(-(gw @ dv) / denom, 0.0, 1.0))
        if step * np.linalg.norm(dv) < eps:
            break
        w = w + step * dv
    return w


def grams(k: int, rng: np.random.Generator):
    # per-sample gradients of a large model: high dimension, a shared component plus noise
    p = rng.standard_normal((k, 4 * k + 256)) + 0.5 * rng.standard_normal(4 * k + 256)
    yield "high-dim", p @ p.T
    # adversarial: rank 5, zero inside the hull (conflicting groups)
    p = rng.standard_normal((k, 5)) @ rng.standard_normal((5, 64))
    yield "rank-5", p @ p.T


def timeit(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--ks", type=int, nargs="+", default=[8, 64, 256, 1024])
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rng = np.random.default_rng(0)
    print(
        f"{'k':>5} {'gram':>9} {'cold ms':>9} {'warm ms':>9} {'kkt gap/tr':>11} "
        f"{'FW ms':>8} {'FW/ours':>8} {'FW min<d,g>/tr':>15} {'ours min<d,g>/tr':>17}"
    )
    for k in args.ks:
        for name, g in grams(k, rng):
            gram = torch.from_numpy(g)
            tr = float(np.trace(g))
            repeats = max(3, args.repeats if k <= 256 else args.repeats // 4)
            res = solve_min_norm(gram)
            cold = timeit(lambda gram=gram: solve_min_norm(gram), repeats)
            jitter = res.weights + 0.05 * torch.rand(k, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
            warm = timeit(lambda gram=gram, jitter=jitter: solve_min_norm(gram, init=jitter), repeats)
            fw_t = timeit(lambda g=g: frank_wolfe(g), repeats)
            w_fw = frank_wolfe(g)
            gw_fw, gw = g @ w_fw, g @ res.weights.numpy()
            print(
                f"{k:>5} {name:>9} {cold * 1e3:>9.2f} {warm * 1e3:>9.2f} {res.kkt_gap / tr:>11.1e} "
                f"{fw_t * 1e3:>8.2f} {fw_t / cold:>8.2f} {gw_fw.min() / tr:>15.2e} {gw.min() / tr:>17.2e}"
            )


if __name__ == "__main__":
    main()
