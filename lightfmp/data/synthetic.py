"""Synthetic click-through data with the Criteo layout and a known set of informative fields.

:class:`SyntheticCTR` draws ``num_rows`` rows with columns ``label, I1..I{num_dense}, C1..C{num_sparse}``
(Criteo order). Dense fields are count-like integers ``max(floor(exp(N(mu_j, 1))) - 1, 0)`` (about 5 %
missing); categorical fields are Zipf-distributed ids in ``0 .. cardinality - 1`` (which ids are frequent is
a fixed random permutation; about 2 % missing), stored as nullable integers. The label is Bernoulli(sigmoid(logit)) with

    logit = b + sum_{dense j in S} w_j z_j + sum_{sparse f in S} E_f[c_f]
            + interaction_strength * ( sum_{pairs (f, g) of sparse fields in S} s_f[c_f] s_g[c_g]
                                       + sum_{pairs (j, k) of dense fields in S} z_j z_k )

where ``S`` is the informative set, ``z_j`` the standardised ``log(1 + I_j)`` (0 when missing), ``E_f`` a
per-category effect table ``N(0, main_strength^2)`` (0 for missing), ``s_f`` random signs per category
(pairs taken consecutively in ``S``: an XOR-like effect with no main effect of its own), ``w_j`` of size
``main_strength`` with random sign, and ``b`` set so that the base rate is near ``base_rate``. Every other
field is independent noise: :meth:`SyntheticCTR.logit` reads only the informative columns, which is the
ground truth for tests and benchmarks. Generation is vectorised (millions of rows take seconds).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Optional, Union

import numpy as np
import pandas as pd

from lightfmp.data.formats.criteo import criteo_schema
from lightfmp.data.schema import Schema


@dataclass(frozen=True)
class SyntheticCTR:
    """A seeded synthetic CTR task (see the module docstring for the generating model).

    Args:
        num_rows: rows to draw.
        num_dense, num_sparse: numbers of ``I`` and ``C`` fields.
        cardinality: categories per sparse field (one int, or one per field).
        informative: names of the informative fields; None picks ``num_informative`` of them by seed.
        num_informative: size of the informative set when ``informative`` is None.
        main_strength: scale of the main effects (logit units).
        interaction_strength: scale of the pairwise interactions (0 disables them).
        zipf_exponent: category popularity ``p_k ~ (k + 1) ** -zipf_exponent``.
        base_rate: target click rate (sets the bias from a pilot draw).
        seed: seed of everything (effects, informative set, rows).
    """

    num_rows: int = 100_000
    num_dense: int = 13
    num_sparse: int = 26
    cardinality: Union[int, Sequence[int]] = 100
    informative: Optional[Sequence[str]] = None
    num_informative: int = 6
    main_strength: float = 1.0
    interaction_strength: float = 1.0
    zipf_exponent: float = 1.1
    base_rate: float = 0.25
    missing_dense: float = 0.05
    missing_sparse: float = 0.02
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_rows < 1:
            raise ValueError(f"num_rows must be >= 1, got {self.num_rows}")
        if self.num_dense < 0 or self.num_sparse < 0 or self.num_dense + self.num_sparse == 0:
            raise ValueError(
                f"need num_dense >= 0, num_sparse >= 0 and at least one field, got {self.num_dense}, {self.num_sparse}"
            )
        cards = self.cardinalities
        if any(c < 1 for c in cards):
            raise ValueError(f"cardinalities must be >= 1, got {list(cards)}")
        if not 0 < self.base_rate < 1:
            raise ValueError(f"base_rate must be in (0, 1), got {self.base_rate}")
        if self.informative is not None:
            names = self.field_names
            unknown = [n for n in self.informative if n not in names]
            if unknown:
                raise KeyError(f"unknown informative field(s) {unknown}; the fields are {list(names)}")
        elif not 0 <= self.num_informative <= self.num_dense + self.num_sparse:
            raise ValueError(
                f"num_informative must be in 0..{self.num_dense + self.num_sparse}, got {self.num_informative}"
            )

    @property
    def cardinalities(self) -> tuple[int, ...]:
        if isinstance(self.cardinality, int):
            return (self.cardinality,) * self.num_sparse
        cards = tuple(int(c) for c in self.cardinality)
        if len(cards) != self.num_sparse:
            raise ValueError(f"cardinality lists {len(cards)} values for {self.num_sparse} sparse fields")
        return cards

    @property
    def dense_names(self) -> tuple[str, ...]:
        return tuple(f"I{i}" for i in range(1, self.num_dense + 1))

    @property
    def sparse_names(self) -> tuple[str, ...]:
        return tuple(f"C{i}" for i in range(1, self.num_sparse + 1))

    @property
    def field_names(self) -> tuple[str, ...]:
        return self.dense_names + self.sparse_names

    @property
    def schema(self) -> Schema:
        return criteo_schema(self.num_dense, self.num_sparse)

    @property
    def informative_fields(self) -> tuple[str, ...]:
        """The informative fields, in field order."""
        if self.informative is not None:
            chosen = set(self.informative)
        else:
            rng = np.random.default_rng([self.seed, 1])
            chosen = set(rng.choice(np.asarray(self.field_names), size=self.num_informative, replace=False).tolist())
        return tuple(n for n in self.field_names if n in chosen)

    # -- the generating model
    def _params(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, 2])
        params: dict[str, np.ndarray] = {}
        for name in self.dense_names:
            params[f"mu_{name}"] = rng.uniform(0.0, 3.0, size=1)
            params[f"w_{name}"] = self.main_strength * rng.choice([-1.0, 1.0], size=1)
        for name, card in zip(self.sparse_names, self.cardinalities):
            params[f"E_{name}"] = self.main_strength * rng.standard_normal(card)
            params[f"s_{name}"] = rng.choice([-1.0, 1.0], size=card)
            params[f"popular_{name}"] = rng.permutation(card)  # which ids are frequent: no signal in id order
        return params

    def _dense_z(self, frame: pd.DataFrame, name: str, mu: float) -> np.ndarray:
        x = frame[name].to_numpy(dtype=np.float64, na_value=np.nan)
        # exact moments of log1p(floor(exp(N(mu, 1)))) are messy; log(1 + x) ~ N(mu, 1) is close enough
        z = (np.log1p(x) - mu) / 1.0
        return np.where(np.isnan(z), 0.0, z)

    def _sparse_ids(self, frame: pd.DataFrame, name: str) -> tuple[np.ndarray, np.ndarray]:
        col = frame[name]
        present = col.notna().to_numpy()
        ids = col.to_numpy(dtype=np.float64, na_value=-1).astype(np.int64)
        return np.where(present, ids, 0), present

    def logit(self, frame: pd.DataFrame, include_bias: bool = True) -> np.ndarray:
        """The generating logit of each row of ``frame``; reads only the informative columns."""
        params = self._params()
        informative = self.informative_fields
        out = np.zeros(len(frame), dtype=np.float64)
        dense_z, signs = [], []
        for name in informative:
            if name.startswith("I"):
                z = self._dense_z(frame, name, float(params[f"mu_{name}"][0]))
                out += params[f"w_{name}"][0] * z
                dense_z.append(z)
            else:
                ids, present = self._sparse_ids(frame, name)
                out += np.where(present, params[f"E_{name}"][ids], 0.0)
                signs.append(np.where(present, params[f"s_{name}"][ids], 0.0))
        for group in (signs, dense_z):
            for a, b in zip(group[0::2], group[1::2]):
                out += self.interaction_strength * a * b
        if include_bias:
            out += self.bias
        return out

    @cached_property
    def bias(self) -> float:
        """The bias that brings the mean click probability of a 20k-row pilot draw to ``base_rate``."""
        pilot = self._draw_features(20_000, np.random.default_rng([self.seed, 3]), self._params())
        raw = self.logit(pilot, include_bias=False)
        lo, hi = -20.0, 20.0
        for _ in range(60):  # bisection on the monotone mean sigmoid
            mid = 0.5 * (lo + hi)
            if np.mean(1 / (1 + np.exp(-(raw + mid)))) < self.base_rate:
                lo = mid
            else:
                hi = mid
        return 0.5 * (lo + hi)

    def _draw_features(self, n: int, rng: np.random.Generator, params: dict[str, np.ndarray]) -> pd.DataFrame:
        cols: dict[str, object] = {}
        for name in self.dense_names:
            x = np.floor(np.exp(rng.normal(float(params[f"mu_{name}"][0]), 1.0, size=n))) - 1.0
            x = np.maximum(x, 0.0)
            x[rng.random(n) < self.missing_dense] = np.nan
            cols[name] = x
        for name, card in zip(self.sparse_names, self.cardinalities):
            p = (np.arange(card) + 1.0) ** -self.zipf_exponent
            cdf = np.cumsum(p / p.sum())
            ids = np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), card - 1)
            ids = params[f"popular_{name}"][ids]
            col = pd.array(ids, dtype="Int64")
            col[rng.random(n) < self.missing_sparse] = pd.NA
            cols[name] = col
        return pd.DataFrame(cols)

    def generate(self) -> pd.DataFrame:
        """The table: ``label`` (int8) then I1.. (float64, NaN missing) then C1.. (nullable Int64)."""
        params = self._params()
        rng = np.random.default_rng([self.seed, 4])
        features = self._draw_features(self.num_rows, rng, params)
        p = 1 / (1 + np.exp(-self.logit(features)))
        label = (rng.random(self.num_rows) < p).astype(np.int8)
        features.insert(0, "label", label)
        return features

    def write_criteo_tsv(self, path: Union[str, Path], frame: Optional[pd.DataFrame] = None) -> Path:
        """Write ``frame`` (default: :meth:`generate`) as a Criteo TSV: no header, empty = missing."""
        frame = self.generate() if frame is None else frame
        return write_criteo_tsv(frame, path)


def write_criteo_tsv(frame: pd.DataFrame, path: Union[str, Path]) -> Path:
    """Write a frame with Criteo columns (label, I.., C..) as a headerless TSV; integers stay integers."""
    path = Path(path)
    out = frame.copy()
    for name in out.columns:
        if name.startswith("I") and pd.api.types.is_float_dtype(out[name].dtype):
            out[name] = pd.array(out[name].round().astype("Int64"), dtype="Int64")
    tmp = path.with_name(path.name + ".tmp")
    out.to_csv(tmp, sep="\t", header=False, index=False, na_rep="")
    tmp.replace(path)
    return path
