"""min_norm_weights against slow references, KKT invariants, closed forms, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from grain_lightning import min_norm_weights, solve_min_norm
from tests.grain_lightning.brute_force import brute_force_min_norm, nnls_min_norm

CONTRACT = 1e-9  # public accuracy contract, relative to trace(G)


def assert_optimal(gram: torch.Tensor, w: torch.Tensor, f_ref: float | None = None) -> None:
    g = gram.double()
    tr = float(torch.trace(g))
    assert w.dtype == torch.float64 and w.shape == (g.shape[0],)
    assert (w >= 0).all(), w
    assert abs(float(w.sum()) - 1.0) <= 1e-12
    gw = g @ w
    f = float(w @ gw)
    # KKT: <d, g_j> >= ||d||^2 - 1e-9 trace(G) for every j (this is what makes <d, g_j> >= 0).
    assert float(gw.min()) >= f - CONTRACT * tr, (float(gw.min()), f)
    if f_ref is not None:
        assert f <= f_ref + CONTRACT * tr, (f, f_ref)


def points_low_rank(rng, k, rank, dim=50):
    return rng.standard_normal((k, rank)) @ rng.standard_normal((rank, dim))


def cases(seed: int):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(3, 9))
    yield "random", rng.standard_normal((k, 20)) + rng.standard_normal(20)
    yield "rank_deficient", points_low_rank(rng, k, 2)
    yield "zero_in_hull", rng.standard_normal((k, 2))  # k points in a plane around 0
    p = rng.standard_normal((k, 5))
    yield "antipodal", np.vstack([p[: k // 2], -p[: k // 2], p[k // 2 :]])[:k]
    dup = rng.standard_normal((3, 10))
    yield "duplicates", dup[rng.integers(0, 3, size=k)]
    z = rng.standard_normal((k, 10))
    z[rng.integers(0, k)] = 0.0
    yield "zero_gradient", z
    yield "tiny_scale", 1e-8 * rng.standard_normal((k, 10))
    yield "huge_scale", 1e8 * rng.standard_normal((k, 10))
    yield "mixed_scales", rng.standard_normal((k, 10)) * 10.0 ** rng.uniform(-4, 4, size=(k, 1))
    yield "collinear_same_side", np.outer(rng.uniform(0.5, 2.0, size=k), rng.standard_normal(10))


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force(seed):
    for name, p in cases(seed):
        gram = torch.from_numpy(p @ p.T)
        w_ref, f_ref = brute_force_min_norm(gram.numpy())
        w = min_norm_weights(gram)
        assert_optimal(gram, w, f_ref)
        # the min-norm point itself is unique even where w is not
        d, d_ref = p.T @ w.numpy(), p.T @ w_ref
        tr = float(np.trace(p @ p.T))
        assert np.linalg.norm(d - d_ref) ** 2 <= 4 * CONTRACT * tr, name


@pytest.mark.parametrize("k,dim", [(16, 200), (64, 1000), (64, 8), (200, 12), (300, 2000)])
def test_matches_nnls_reference_large(k, dim):
    rng = np.random.default_rng(k + dim)
    p = rng.standard_normal((k, dim)) + 0.5 * rng.standard_normal(dim)
    gram = torch.from_numpy(p @ p.T)
    _, f_ref = nnls_min_norm(p)
    res = solve_min_norm(gram)
    assert res.converged
    assert_optimal(gram, res.weights, f_ref)


def test_adversarial_low_rank_zero_in_hull_many_groups():
    """Many groups, rank 3, conflicting: loose Frank-Wolfe returns negative inner products here."""
    rng = np.random.default_rng(7)
    p = points_low_rank(rng, 512, 3, dim=40)
    gram = torch.from_numpy(p @ p.T)
    w = min_norm_weights(gram)
    assert_optimal(gram, w, 0.0)
    d = p.T @ w.numpy()
    assert (p @ d >= -CONTRACT * np.trace(p @ p.T)).all()


def test_scale_invariance():
    rng = np.random.default_rng(3)
    p = rng.standard_normal((12, 30)) + rng.standard_normal(30)
    gram = torch.from_numpy(p @ p.T)
    w = min_norm_weights(gram)
    for c in (1e-8, 1e-3, 1e3, 1e8):
        assert torch.allclose(min_norm_weights(gram * c * c), w, atol=1e-9)


def test_closed_forms_k1_k2():
    assert min_norm_weights(torch.tensor([[4.0]])).tolist() == [1.0]
    assert min_norm_weights(torch.zeros(1, 1)).tolist() == [1.0]
    # two conflicting gradients g1 = (1, 0), g2 = (-1, 1): t = (G22 - G12)/||g1 - g2||^2 = 3/5
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    w = min_norm_weights(g @ g.T)
    assert torch.allclose(w, torch.tensor([0.6, 0.4], dtype=torch.float64), atol=1e-15)
    # one gradient dominates exactly: weight 1, no 0.999/0.001 clamping
    g = torch.tensor([[1.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    assert min_norm_weights(g @ g.T).tolist() == [1.0, 0.0]
    # identical gradients: any w is optimal; we return the midpoint
    g = torch.tensor([[1.0, 2.0], [1.0, 2.0]], dtype=torch.float64)
    assert min_norm_weights(g @ g.T).tolist() == [0.5, 0.5]


def test_all_zero_gram_and_warm_start():
    w = min_norm_weights(torch.zeros(4, 4))
    assert torch.allclose(w, torch.full((4,), 0.25, dtype=torch.float64))
    rng = np.random.default_rng(0)
    p = rng.standard_normal((40, 100)) + rng.standard_normal(100)
    gram = torch.from_numpy(p @ p.T)
    cold = solve_min_norm(gram)
    warm = solve_min_norm(gram, init=cold.weights)
    assert warm.converged and warm.iterations <= cold.iterations
    assert abs(warm.objective - cold.objective) <= CONTRACT * float(torch.trace(gram))


def test_float32_input_and_result_fields():
    rng = np.random.default_rng(1)
    p = torch.from_numpy(rng.standard_normal((10, 64))).float()
    res = solve_min_norm(p @ p.T)
    assert res.weights.dtype == torch.float64 and res.converged
    assert res.kkt_gap >= 0 and res.objective >= 0


@pytest.mark.parametrize(
    "bad,match",
    [
        (torch.ones(2, 3), "square"),
        (torch.ones(3), "square"),
        (torch.empty(0, 0), "square"),
        (torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]), "non-finite"),
        (torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), "non-finite"),
        (torch.tensor([[1.0, 0.5], [0.2, 1.0]]), "not symmetric"),
        (torch.tensor([[-1.0, 0.0], [0.0, 1.0]]), "negative diagonal"),
        (torch.tensor([[1.0, 2.0], [2.0, 1.0]]), "positive semidefinite"),
    ],
)
def test_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        min_norm_weights(bad)


def test_bad_init_and_tol():
    g = torch.eye(3)
    with pytest.raises(ValueError, match="k = 3"):
        min_norm_weights(g, init=torch.ones(2))
    with pytest.raises(ValueError, match="non-negative"):
        min_norm_weights(g, init=torch.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match="tol"):
        min_norm_weights(g, tol=0.0)


def _frank_wolfe(gram: np.ndarray, iters: int = 100, eps: float = 1e-3) -> np.ndarray:
    """The loose solver common in MGDA code (uniform start, 100 iterations, stop at eps)."""
    k = gram.shape[0]
    w = np.full(k, 1.0 / k)
    for _ in range(iters):
        j = int(np.argmin(gram @ w))
        v = np.zeros(k)
        v[j] = 1.0
        dv = v - w
        denom = dv @ gram @ dv
        step = 1.0 if denom <= 0 else float(np.clip(-(w @ gram @ dv) / denom, 0.0, 1.0))
        if step * np.linalg.norm(dv) < eps:
            break
        w = w + step * dv
    return w


def test_kkt_check_rejects_loose_frank_wolfe():
    """The invariant used above can fail: loose Frank-Wolfe violates it on a low-rank conflict."""
    rng = np.random.default_rng(7)
    p = points_low_rank(rng, 256, 3, dim=40)
    gram = torch.from_numpy(p @ p.T)
    with pytest.raises(AssertionError):
        assert_optimal(gram, torch.from_numpy(_frank_wolfe(gram.numpy())))
    assert_optimal(gram, min_norm_weights(gram))


@pytest.mark.parametrize("seed", range(25))
def test_kkt_random_adversarial(seed):
    rng = np.random.default_rng(100 + seed)
    k = int(rng.integers(3, 97))
    rank = int(rng.integers(1, k + 3))
    p = points_low_rank(rng, k, rank, dim=int(rng.integers(rank, 3 * rank + 5)))
    p += rng.uniform(0, 2) * rng.standard_normal(p.shape[1])  # shared component, sometimes dominant
    if seed % 3 == 0:
        p = np.vstack([p, p[: k // 3]])  # duplicates
    if seed % 4 == 0:
        p[0] = 0.0
    p *= 10.0 ** rng.uniform(-8, 8)
    gram = torch.from_numpy(p @ p.T)
    res = solve_min_norm(gram)
    assert res.converged, res
    assert_optimal(gram, res.weights)
