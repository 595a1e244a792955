"""The model's input contract: what Light-FMP's data pipeline serves and its models consume.

A model consumes ``n_dense`` numeric inputs and a set of categorical (sparse) fields, each with its own
embedding table. :class:`ModelInputs` names them in order; :class:`CTRBatch` carries one batch:

* ``dense``: float32 tensor ``(B, n_dense)``, columns in ``ModelInputs.dense`` order;
* ``sparse``: TorchRec ``KeyedJaggedTensor`` whose keys are ``ModelInputs.sparse_names`` in that order
  (one id per row for single-valued fields, a jagged list for multi-valued ones; ids index the field's table,
  0 is the out-of-vocabulary / missing id);
* ``labels``: float32 tensor ``(B,)`` with values in {0, 1}.

Pruning a field removes it from the spec (``ModelInputs.select``); the batch then simply lacks that column
or key.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

Pooling = Literal["sum", "mean"]

__all__ = ["CTRBatch", "ModelInputs", "Pooling", "SparseFeature", "make_sparse"]


@dataclass(frozen=True)
class SparseFeature:
    """One categorical field: its embedding table has ``num_embeddings`` rows (id 0 = OOV/missing)."""

    name: str
    num_embeddings: int
    multi_valued: bool = False
    pooling: Pooling = "sum"

    def __post_init__(self) -> None:
        if self.num_embeddings < 1:
            raise ValueError(f"SparseFeature {self.name!r}: num_embeddings must be >= 1, got {self.num_embeddings}")
        if self.pooling not in ("sum", "mean"):
            raise ValueError(f"SparseFeature {self.name!r}: pooling must be 'sum' or 'mean', got {self.pooling!r}")


@dataclass(frozen=True)
class ModelInputs:
    """Ordered dense and sparse inputs of a model."""

    dense: tuple[str, ...] = ()
    sparse: tuple[SparseFeature, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dense", tuple(self.dense))
        object.__setattr__(self, "sparse", tuple(self.sparse))
        names = self.names
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"ModelInputs: field names must be unique, duplicated: {dupes}")

    @property
    def sparse_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.sparse)

    @property
    def names(self) -> tuple[str, ...]:
        """All field names: dense first, then sparse (the order of gates in a field mask)."""
        return self.dense + self.sparse_names

    @property
    def num_fields(self) -> int:
        return len(self.dense) + len(self.sparse)

    def select(self, keep: Iterable[str]) -> ModelInputs:
        """The spec restricted to ``keep`` (original order kept). Unknown names raise ``KeyError``."""
        keep = list(keep)
        unknown = [n for n in keep if n not in self.names]
        if unknown:
            raise KeyError(f"unknown field(s) {unknown}; this spec has {list(self.names)}")
        kept = set(keep)
        return ModelInputs(
            dense=tuple(n for n in self.dense if n in kept),
            sparse=tuple(f for f in self.sparse if f.name in kept),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "dense": list(self.dense),
            "sparse": [
                {
                    "name": f.name,
                    "num_embeddings": f.num_embeddings,
                    "multi_valued": f.multi_valued,
                    "pooling": f.pooling,
                }
                for f in self.sparse
            ],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelInputs:
        return cls(dense=tuple(d["dense"]), sparse=tuple(SparseFeature(**s) for s in d["sparse"]))


@dataclass
class CTRBatch:
    """One batch: ``dense`` (B, n_dense) float32, ``sparse`` KeyedJaggedTensor, ``labels`` (B,) float32."""

    dense: torch.Tensor
    sparse: KeyedJaggedTensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> CTRBatch:
        return CTRBatch(
            dense=self.dense.to(device, non_blocking=non_blocking),
            sparse=self.sparse.to(torch.device(device), non_blocking=non_blocking),
            labels=self.labels.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> CTRBatch:
        return CTRBatch(self.dense.pin_memory(), self.sparse.pin_memory(), self.labels.pin_memory())


def make_sparse(
    names: Iterable[str],
    ids: Optional[torch.Tensor] = None,
    *,
    lengths: Optional[torch.Tensor] = None,
    values: Optional[torch.Tensor] = None,
) -> KeyedJaggedTensor:
    """A KeyedJaggedTensor from single-valued ``ids`` (B, F) or key-major ``lengths`` (F*B,) / ``values``.

    ``ids[:, f]`` is the id of field ``f`` for each row; TorchRec's layout is key-major, so the values are
    ``ids.T.reshape(-1)`` with every length 1.
    """
    names = list(names)
    if ids is not None:
        if ids.dim() != 2 or ids.shape[1] != len(names):
            raise ValueError(f"ids must have shape (B, {len(names)}), got {tuple(ids.shape)}")
        values = ids.t().reshape(-1).long()
        lengths = torch.ones(values.numel(), dtype=torch.int32)
    if values is None or lengths is None:
        raise ValueError("give either ids or both lengths and values")
    return KeyedJaggedTensor.from_lengths_sync(keys=names, values=values.long(), lengths=lengths.int())
