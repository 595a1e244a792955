r"""Exact min-norm point of the convex hull of group gradients, computed from their Gram matrix.

Problem (``k`` groups, gradients ``g_1..g_k`` as rows of ``J``, Gram ``G = J J^T``, ``k x k`` PSD)::

    w* = argmin_{w in simplex} w^T G w,      simplex = {w >= 0, sum(w) = 1}
    d  = J^T w*                              (the min-norm point of conv{g_1, ..., g_k})

Optimality (KKT) is ``(G w*)_j >= w*^T G w*`` for every ``j``, with equality where ``w*_j > 0``, i.e.
``<d, g_j> >= ||d||^2 >= 0``: no group's loss increases to first order along ``-d``. The KKT gap
``w^T G w - min_j (G w)_j`` is half the Frank-Wolfe gap and bounds ``f(w) - f(w*) <= 2 * gap``.

Algorithm (float64, ``G`` divided by its trace so that every tolerance is relative to ``trace(G)``):

1. ``k = 1`` and ``k = 2`` in closed form (no 0.999/0.001 clamping).
2. Accelerated projected gradient (FISTA with adaptive restart) from the warm start or the uniform
   weights, to guess the support of ``w*`` cheaply.
3. Wolfe's min-norm-point algorithm from that guess (an exact active-set method): the affine
   minimiser on the support ``S`` solves ``(G_SS + 1 1^T) v = 1`` (positive definite when the
   points of ``S`` are affinely independent; least squares otherwise), minor cycles drop indices
   that turn negative, major cycles add the most violated index until
   ``min_j (G w)_j >= w^T G w - tol * trace(G)``.

Guarantee at the default ``tol = 1e-12``: objective within ``2e-12 * trace(G)`` of the optimum and
``<d, g_j> >= ||d||^2 - 1e-12 * trace(G)`` for every ``j`` (checked by :attr:`MinNormResult.kkt_gap`);
tests hold it to the looser public contract ``1e-9 * trace(G)`` against a slow reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from scipy.linalg import cho_factor, cho_solve

__all__ = ["MinNormResult", "min_norm_weights", "solve_min_norm", "validate_gram"]

_SYMMETRY_TOL = 1e-6  # relative to max |G|: float32 Grams built in different orders differ ~1e-7


@dataclass(frozen=True)
class MinNormResult:
    """Output of :func:`solve_min_norm`.

    Attributes:
        weights: ``(k,)`` float64 weights on the simplex.
        objective: ``w^T G w = ||d||^2`` in the units of ``G``.
        kkt_gap: ``w^T G w - min_j (G w)_j`` in the units of ``G`` (0 at the exact optimum).
        iterations: projected-gradient plus active-set iterations used.
        converged: whether ``kkt_gap <= tol * trace(G)``.
    """

    weights: torch.Tensor
    objective: float
    kkt_gap: float
    iterations: int
    converged: bool


def validate_gram(gram: torch.Tensor, *, symmetry_tol: float = _SYMMETRY_TOL) -> np.ndarray:
    """Check that ``gram`` is a finite, symmetric, PSD-looking ``k x k`` matrix; return it as float64.

    Raises:
        ValueError: naming the problem (shape, NaN/Inf, asymmetry, negative diagonal, or an entry with
            ``|G_ij| > sqrt(G_ii G_jj)``, which no Gram matrix has).
    """
    if not isinstance(gram, torch.Tensor):
        raise ValueError(f"gram must be a torch.Tensor, got {type(gram).__name__}")
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] == 0:
        raise ValueError(f"gram must be a non-empty square k x k matrix, got shape {tuple(gram.shape)}")
    if gram.is_complex():
        raise ValueError(f"gram must be real, got dtype {gram.dtype}")
    g = gram.detach().to(device="cpu", dtype=torch.float64).numpy()
    finite = np.isfinite(g)
    if not finite.all():
        i, j = np.argwhere(~finite)[0]
        raise ValueError(f"gram contains a non-finite value: G[{i},{j}] = {g[i, j]}")
    scale = float(np.abs(g).max())
    asym = float(np.abs(g - g.T).max())
    if asym > symmetry_tol * scale:
        raise ValueError(
            f"gram is not symmetric: max |G - G^T| = {asym:.3e} exceeds {symmetry_tol:g} * max|G| = "
            f"{symmetry_tol * scale:.3e}"
        )
    g = 0.5 * (g + g.T)
    diag = np.diag(g)
    if (diag < -symmetry_tol * scale).any():
        i = int(np.argmin(diag))
        raise ValueError(f"gram has a negative diagonal entry G[{i},{i}] = {diag[i]:.3e}; expected ||g_i||^2 >= 0")
    root = np.sqrt(np.clip(diag, 0.0, None))
    excess = np.abs(g) - np.outer(root, root)
    bad = excess > symmetry_tol * max(scale, 1e-300) + 1e-12 * np.abs(g)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise ValueError(
            f"gram is not positive semidefinite: |G[{i},{j}]| = {abs(g[i, j]):.3e} > "
            f"sqrt(G[{i},{i}] G[{j},{j}]) = {root[i] * root[j]:.3e}"
        )
    np.fill_diagonal(g, np.clip(diag, 0.0, None))
    return g


def min_norm_weights(
    gram: torch.Tensor,
    *,
    init: Optional[torch.Tensor] = None,
    tol: float = 1e-12,
    max_iter: Optional[int] = None,
) -> torch.Tensor:
    """Weights ``w*`` on the simplex minimising ``w^T G w`` for a ``k x k`` Gram matrix.

    Args:
        gram: ``(k, k)`` Gram matrix of the group gradients, ``G_ij = <g_i, g_j>``, any float dtype.
        init: optional ``(k,)`` non-negative warm start (e.g. the previous step's weights); it is
            renormalised to sum to one.
        tol: KKT tolerance relative to ``trace(G)``.
        max_iter: cap on active-set iterations (default ``10 k + 100``).

    Returns:
        ``(k,)`` float64 tensor on the simplex, on the CPU.

    Example:
        >>> g = torch.tensor([[1.0, 0.0], [-1.0, 0.5]])
        >>> w = min_norm_weights(g @ g.T)
        >>> d = w.float() @ g
        >>> bool(((g @ d) >= (d @ d) - 1e-6).all())
        True
    """
    return solve_min_norm(gram, init=init, tol=tol, max_iter=max_iter).weights


def solve_min_norm(
    gram: torch.Tensor,
    *,
    init: Optional[torch.Tensor] = None,
    tol: float = 1e-12,
    max_iter: Optional[int] = None,
) -> MinNormResult:
    """Like :func:`min_norm_weights`, returning the objective, KKT gap and iteration count too."""
    if not (0.0 < tol < 1.0):
        raise ValueError(f"tol must be in (0, 1), got {tol}")
    g = validate_gram(gram)
    k = g.shape[0]
    w0 = _check_init(init, k)
    trace = float(np.trace(g))
    if trace <= 0.0:  # every gradient is zero: every w is optimal, d = 0
        w = w0 if w0 is not None else np.full(k, 1.0 / k)
        return _result(w, g, trace, 0, True, tol)
    gn = g / trace
    if k == 1:
        return _result(np.ones(1), g, trace, 0, True, tol)
    if k == 2:
        return _result(_two_point(gn), g, trace, 0, True, tol)
    max_iter = 10 * k + 100 if max_iter is None else int(max_iter)
    w, it_pg = _projected_gradient(gn, w0 if w0 is not None else np.full(k, 1.0 / k), tol)
    support = np.nonzero(w > 0)[0]
    if support.size > 1 and _cholesky_or_none(gn[np.ix_(support, support)] + 1.0) is None:
        # The support found is affinely dependent (low-rank G, duplicates, 0 in the hull): the optimal
        # face is large and the polish would shed it one index at a time. Wolfe from the vertex of least
        # norm keeps an affinely independent support of size <= rank + 1 instead.
        w = np.zeros(k)
        w[int(np.argmin(np.diag(gn)))] = 1.0
    w, it_as, ok = _wolfe(gn, w, tol, max_iter)
    return _result(w, g, trace, it_pg + it_as, ok, tol)


def _result(w: np.ndarray, g: np.ndarray, trace: float, iters: int, ok: bool, tol: float) -> MinNormResult:
    gw = g @ w
    f = float(w @ gw)
    gap = max(f - float(gw.min()), 0.0)
    return MinNormResult(
        weights=torch.from_numpy(w.copy()),
        objective=f,
        kkt_gap=gap,
        iterations=iters,
        converged=bool(ok and gap <= tol * max(trace, 0.0) * (1 + 1e-6) + 1e-300),
    )


def _check_init(init: Optional[torch.Tensor], k: int) -> Optional[np.ndarray]:
    if init is None:
        return None
    w = torch.as_tensor(init).detach().to("cpu", torch.float64).reshape(-1).numpy().copy()
    if w.shape[0] != k:
        raise ValueError(f"init must have k = {k} entries, got {w.shape[0]}")
    if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"init must be finite, non-negative and not all zero, got {w.tolist()[:8]}")
    return w / w.sum()


def _two_point(g: np.ndarray) -> np.ndarray:
    """Closed form for k = 2: ``t = (G22 - G12) / ||g1 - g2||^2`` clipped to [0, 1]."""
    a, b, c = g[0, 0], g[0, 1], g[1, 1]
    denom = a - 2.0 * b + c  # = ||g1 - g2||^2 >= 0
    t = 0.5 if denom <= 1e-15 * (a + c) else min(max((c - b) / denom, 0.0), 1.0)
    return np.array([t, 1.0 - t])


def _project_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection onto the simplex (sort-based, Held et al. / Duchi et al. 2008)."""
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - 1.0
    idx = np.arange(1, v.shape[0] + 1)
    rho = np.nonzero(u - css / idx > 0)[0][-1]
    return np.maximum(v - css[rho] / (rho + 1.0), 0.0)


def _lipschitz(g: np.ndarray) -> float:
    """Upper estimate of 2 * lambda_max(G) (power iteration with a margin, capped by trace = 1)."""
    v = np.full(g.shape[0], 1.0) + np.linspace(0.0, 1.0, g.shape[0])  # deterministic start
    lam = 0.0
    for _ in range(12):
        gv = g @ v
        n = float(np.linalg.norm(gv))
        if n == 0.0:
            break
        lam = float(v @ gv) / float(v @ v)
        v = gv / n
    return 2.0 * min(max(1.1 * lam, 1e-12), 1.0)


def _projected_gradient(g: np.ndarray, w: np.ndarray, tol: float, max_iter: int = 400) -> tuple[np.ndarray, int]:
    """FISTA on the simplex with function-value restart (one mat-vec per iteration, since ``G y`` is
    affine in the iterates); stops at ``tol`` or once the support has been stable for 25 iterations."""
    step = 2.0 / _lipschitz(g)  # 1 / L for the gradient 2 G w, folded: w - step * G y
    gw = g @ w
    f = float(w @ gw)
    y, gy, t = w, gw, 1.0
    support, stable = w > 0, 0
    for it in range(1, max_iter + 1):
        w_new = _project_simplex(y - step * gy)
        gw_new = g @ w_new
        f_new = float(w_new @ gw_new)
        if f_new - float(gw_new.min()) <= tol:
            return w_new, it
        if f_new > f * (1.0 + 1e-13) + 1e-300:  # momentum overshot: restart from the last iterate
            y, gy, t = w, gw, 1.0
            stable += 1
        else:
            t_new = 0.5 * (1.0 + np.sqrt(1.0 + 4.0 * t * t))
            beta = (t - 1.0) / t_new
            y = w_new + beta * (w_new - w)
            gy = gw_new + beta * (gw_new - gw)
            s = w_new > 0
            stable = stable + 1 if np.array_equal(s, support) else 0
            support = s
            w, gw, f, t = w_new, gw_new, f_new, t_new
        if stable >= 25:
            break
    return w, it


def _cholesky_or_none(b: np.ndarray) -> Optional[tuple]:
    """Cholesky factor of ``b`` or ``None`` when ``b`` is (numerically) singular."""
    try:
        c = cho_factor(b, lower=True, check_finite=False)
    except np.linalg.LinAlgError:
        return None
    d = np.abs(np.diag(c[0]))
    if d.min() ** 2 <= 1e-11 * d.max() ** 2:
        return None
    return c


def _affine_min(g_ss: np.ndarray) -> np.ndarray:
    """``argmin v^T A v`` s.t. ``sum(v) = 1``: ``v ∝ (A + 1 1^T)^{-1} 1`` (least squares if singular).

    ``A + 1 1^T`` is the Gram of the points lifted to ``[g_i; 1]``: positive definite exactly when the
    points are affinely independent.
    """
    b = g_ss + 1.0
    ones = np.ones(b.shape[0])
    c = _cholesky_or_none(b)
    x = cho_solve(c, ones, check_finite=False) if c is not None else np.linalg.lstsq(b, ones, rcond=None)[0]
    return x / x.sum()


def _wolfe(g: np.ndarray, w: np.ndarray, tol: float, max_iter: int) -> tuple[np.ndarray, int, bool]:
    """Wolfe's min-norm-point algorithm in Gram form, started from a feasible ``w``."""
    x = np.maximum(w, 0.0)
    x /= x.sum()
    x, in_s, _ = _minor_cycle(g, x, x > 0, None)  # settle the affine minimiser of the initial support
    for it in range(1, max_iter + 1):
        gx = g @ x
        f = float(x @ gx)
        cand = np.where(in_s, np.inf, gx)
        j = int(np.argmin(cand))
        if not np.isfinite(cand[j]) or cand[j] >= f - tol:
            return x, it, f - float(gx.min()) <= tol
        in_s[j] = True
        x, in_s, rejected = _minor_cycle(g, x, in_s, j)
        if rejected:  # only through rounding: the most violated index cannot enter the support
            gx = g @ x
            return x, it, float(x @ gx) - float(gx.min()) <= tol
    gx = g @ x
    return x, max_iter, float(x @ gx) - float(gx.min()) <= tol


def _minor_cycle(
    g: np.ndarray, x: np.ndarray, in_s: np.ndarray, added: Optional[int]
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Move to the affine minimiser of the support, dropping indices whose weight would turn negative.

    Returns the new point, its support, and whether the freshly ``added`` index was rejected at once.
    """
    while True:
        idx = np.nonzero(in_s)[0]
        v = _affine_min(g[np.ix_(idx, idx)])
        if (v > 0).all():
            x = np.zeros_like(x)
            x[idx] = v
            return x, in_s, False
        xs = x[idx]
        neg = v <= 0
        denom = xs[neg] - v[neg]
        ratios = np.where(denom > 0, xs[neg] / np.where(denom > 0, denom, 1.0), 0.0)
        theta = min(max(float(ratios.min()), 0.0), 1.0)
        xs = xs + theta * (v - xs)
        drop = xs <= 1e-16
        if not drop.any():  # rounding: drop the coordinate closest to zero among the negative ones
            drop[np.argmin(np.where(neg, xs, np.inf))] = True
        if added is not None and theta == 0.0 and drop.sum() == 1 and drop[idx == added].all():
            in_s = in_s.copy()
            in_s[added] = False
            return x, in_s, True
        xs[drop] = 0.0
        x = np.zeros_like(x)
        x[idx] = xs
        x /= x.sum()
        in_s = x > 0
