"""Reproducible train/validation/test splits and the pretrain / finetune subsets of the training split.

* random: a permutation drawn from ``numpy.random.default_rng(seed)``; its first ``round(test_fraction N)``
  rows are the test split, the next ``round(val_fraction N)`` the validation split, the rest training.
* chronological: rows sorted by the time column (stable, so ties keep file order); the earliest rows
  train, then validation, then the latest rows test; every training time <= every validation time <=
  every test time.
* sequential: file order (first rows train, last rows test), the protocol of ERASE-style benchmarks on
  Criteo, whose rows are in time order without a time column.

:func:`train_subsets` splits the training rows into a ``pretrain_fraction`` subset (Light-FMP stage 1,
mask pretraining) and the rest (stage 3, fine-tuning), disjoint and together covering the training rows.
All index arrays are sorted int64.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal, Optional

import numpy as np

SplitKind = Literal["random", "chronological", "sequential"]


@dataclass(frozen=True)
class Split:
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def split_indices(
    n: int,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    kind: SplitKind = "random",
    time: Optional[np.ndarray] = None,
) -> Split:
    """Row indices of the three splits of ``n`` rows (see the module docstring)."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"need 0 <= val_fraction, test_fraction and val_fraction + test_fraction < 1, got "
            f"{val_fraction} and {test_fraction}"
        )
    n_test, n_val = int(round(test_fraction * n)), int(round(val_fraction * n))
    if n - n_test - n_val < 1:
        raise ValueError(
            f"{n} rows leave no training rows with val_fraction={val_fraction}, test_fraction={test_fraction}"
        )
    if kind == "random":
        order = np.random.default_rng(seed).permutation(n)
        test, val, train = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    elif kind in ("chronological", "sequential"):
        if kind == "sequential":
            time = np.arange(n)
        if time is None:
            raise ValueError("a chronological split needs a time column (set time_column in the schema)")
        time = np.asarray(time)
        if time.shape != (n,):
            raise ValueError(f"time must have shape ({n},), got {time.shape}")
        if time.dtype.kind == "f" and np.isnan(time).any():
            raise ValueError(
                f"the time column has missing values at rows {np.flatnonzero(np.isnan(time))[:5].tolist()}"
            )
        order = np.argsort(time, kind="stable")
        train, val, test = order[: n - n_val - n_test], order[n - n_val - n_test : n - n_test], order[n - n_test :]
    else:
        raise ValueError(f"split must be 'random', 'chronological' or 'sequential', got {kind!r}")
    return Split(*(np.sort(a).astype(np.int64) for a in (train, val, test)))


def train_subsets(
    train: np.ndarray, pretrain_fraction: float, seed: int = 0, pretrain_rows: Optional[int] = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(pretrain, finetune)``: a seeded random ``pretrain_fraction`` subset of ``train`` (at least one row; or
    ``pretrain_rows`` rows, at most all of them) and the rest."""
    if not 0 < pretrain_fraction <= 1:
        raise ValueError(f"pretrain_fraction must be in (0, 1], got {pretrain_fraction}")
    if pretrain_rows is not None and pretrain_rows < 1:
        raise ValueError(f"pretrain_rows must be >= 1, got {pretrain_rows}")
    train = np.asarray(train, dtype=np.int64)
    k = max(1, int(round(pretrain_fraction * len(train))))
    if pretrain_rows is not None:
        k = min(pretrain_rows, len(train))
    perm = np.random.default_rng([seed, 7]).permutation(len(train))
    return np.sort(train[perm[:k]]), np.sort(train[perm[k:]])


def __getattr__(name: str) -> Any:
    if name == "stage_subsets":
        warnings.warn(
            "lightfmp.data.splits.stage_subsets is deprecated; use train_subsets", DeprecationWarning, stacklevel=2
        )
        return train_subsets
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
