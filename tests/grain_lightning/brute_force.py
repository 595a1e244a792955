"""Slow, independent reference solvers for the min-norm problem (tests only)."""

from __future__ import annotations

import itertools

import numpy as np
from scipy.optimize import nnls


def brute_force_min_norm(gram: np.ndarray) -> tuple[np.ndarray, float]:
    """Exact optimum by enumerating every support (k <= 10).

    For each support S, the affine minimiser of ``v^T G_SS v`` s.t. ``sum(v) = 1`` is found with an
    SVD-based least-squares solve of the KKT system; supports whose minimiser is feasible (v >= 0) are
    candidates, and vertices are always candidates. Returns (weights, objective).
    """
    g = np.asarray(gram, dtype=np.float64)
    tr = float(np.trace(g))
    g = g / tr if tr > 0 else g  # the KKT solve below mixes G with ones: make them comparable
    k = g.shape[0]
    best_w, best_f = None, np.inf
    for size in range(1, k + 1):
        for s in itertools.combinations(range(k), size):
            s = list(s)
            m = np.zeros((size + 1, size + 1))
            m[:size, :size] = g[np.ix_(s, s)]
            m[:size, size] = 1.0
            m[size, :size] = 1.0
            rhs = np.zeros(size + 1)
            rhs[size] = 1.0
            sol = np.linalg.lstsq(m, rhs, rcond=1e-13)[0][:size]
            if not np.isfinite(sol).all() or (sol < -1e-12).any():
                continue
            sol = np.clip(sol, 0, None)
            if sol.sum() <= 0:
                continue
            sol /= sol.sum()
            w = np.zeros(k)
            w[s] = sol
            f = float(w @ g @ w)
            if f < best_f:
                best_w, best_f = w, f
    return best_w, best_f * (tr if tr > 0 else 1.0)


def nnls_min_norm(points: np.ndarray) -> tuple[np.ndarray, float]:
    """Min-norm point of conv(rows of ``points``) through non-negative least squares.

    ``min_{u >= 0} ||[P^T; 1^T] u - [0; 1]||^2`` has KKT conditions that, with ``w = u / sum(u)``, are
    exactly those of ``min_{w in simplex} ||P^T w||^2`` (Lawson-Hanson least-distance programming).
    """
    p = np.asarray(points, dtype=np.float64)
    k, dim = p.shape
    scale = np.sqrt((p * p).sum() / k) or 1.0
    e = np.vstack([p.T / scale, np.ones((1, k))])
    f = np.zeros(dim + 1)
    f[-1] = 1.0
    u, _ = nnls(e, f, maxiter=50 * k)
    w = u / u.sum()
    d = p.T @ w
    return w, float(d @ d)
