"""Click-through backbones on TorchRec's EmbeddingBagCollection, with per-field gates and exact field pruning.

Every backbone maps a batch to logits ``(B,)``::

    model(dense (B, n_dense), sparse KeyedJaggedTensor, gates (B, F) or None) -> logits (B,)

``F = n_dense + n_sparse`` gates in ``ModelInputs.names`` order (dense first). A gate multiplies the field's
input: the dense column, or the pooled embedding of the sparse field. ``model.prune(keep)`` returns a new,
smaller model without the other fields: their embedding tables are dropped and the first layer that consumed
them is resized, retained weights copied exactly. For every backbone the pruned model equals the original one
with gates fixed to 1 on kept fields and 0 on dropped ones, because a zero input contributes nothing to the
removed weights (DLRM: dot products with a zero vector; DCN-v2: ``x_{l+1} = x_0 (W x_l + b) + x_l`` stays 0
on coordinates where ``x_0`` is 0; MLP and DeepFM: columns multiplying zeros).

Backbones (``BACKBONES``): ``"mlp"`` (embedding + MLP), ``"dlrm"`` (torchrec.models.dlrm's Dense/Interaction/
Over arches), ``"dcnv2"`` (TorchRec's CrossNet stacked with an MLP), ``"deepfm"`` (first order + FM + MLP,
returning logits, unlike TorchRec's SimpleDeepFMNN which ends in a sigmoid).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Optional

import torch
from torch import nn
from torchrec.models.dlrm import DenseArch, InteractionArch, OverArch
from torchrec.modules.crossnet import CrossNet
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightfmp.inputs import ModelInputs

_POOLING = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}

__all__ = ["BACKBONES", "CTRBackbone", "DCNv2", "DLRM", "DeepFM", "EmbeddingMLP", "FieldEmbeddings", "build_backbone"]


def _mlp(in_features: int, hidden: Sequence[int], dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_features, width), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        in_features = width
    layers.append(nn.Linear(in_features, 1))
    return nn.Sequential(*layers)


def _first_linear(module: nn.Module) -> nn.Linear:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            return m
    raise TypeError(f"{type(module).__name__} has no nn.Linear")


def _keep_input_columns(linear: nn.Linear, columns: torch.Tensor) -> None:
    """Resize ``linear`` in place to the input ``columns`` (exact copies of the kept weights)."""
    linear.weight = nn.Parameter(linear.weight.detach()[:, columns].clone())
    linear.in_features = int(columns.numel())


class FieldEmbeddings(nn.Module):
    """One EmbeddingBagCollection table per sparse field; returns pooled embeddings ``(B, n_sparse, D)``."""

    def __init__(self, spec: ModelInputs, embedding_dim: int) -> None:
        super().__init__()
        self.names = list(spec.sparse_names)
        self.embedding_dim = embedding_dim
        self.rows = [f.num_embeddings for f in spec.sparse]
        tables = [
            EmbeddingBagConfig(
                name=f"t_{f.name}",
                embedding_dim=embedding_dim,
                num_embeddings=f.num_embeddings,
                feature_names=[f.name],
                pooling=_POOLING[f.pooling],
            )
            for f in spec.sparse
        ]
        self.ebc: Optional[EmbeddingBagCollection] = (
            EmbeddingBagCollection(tables=tables, device=torch.device("cpu")) if tables else None
        )

    def forward(self, sparse: Optional[KeyedJaggedTensor], batch_size: int) -> torch.Tensor:
        if self.ebc is None:
            return torch.zeros(batch_size, 0, self.embedding_dim, device=self._device())
        if sparse is None:
            raise ValueError(f"this model needs sparse fields {self.names}, got no KeyedJaggedTensor")
        present = set(sparse.keys())
        missing = [n for n in self.names if n not in present]
        if missing:
            raise KeyError(f"sparse fields {missing} missing from the batch (it has {sparse.keys()})")
        pooled = self.ebc(sparse)
        if pooled.keys() != self.names:  # a sharded collection (TorchRec DMP) may return the fields in plan order
            by_name = pooled.to_dict()
            return torch.stack([by_name[n] for n in self.names], dim=1)
        return pooled.values().view(batch_size, len(self.names), self.embedding_dim)

    def num_parameters(self) -> int:
        """Entries of the whole tables (also when a TorchRec strategy has sharded them across ranks)."""
        return sum(self.rows) * self.embedding_dim

    def _device(self) -> torch.device:
        return next(iter(self.parameters()), torch.zeros(())).device

    def prune(self, spec: ModelInputs) -> FieldEmbeddings:
        """New collection with only ``spec``'s sparse fields; their tables copied exactly."""
        new = FieldEmbeddings(spec, self.embedding_dim).to(self._device())
        if new.ebc is not None:
            assert self.ebc is not None
            old = self.ebc.embedding_bags
            with torch.no_grad():
                for name in new.names:
                    new.ebc.embedding_bags[f"t_{name}"].weight.copy_(old[f"t_{name}"].weight)
        return new


class CTRBackbone(nn.Module):
    """Common part: the feature spec, the field embeddings and gating. Subclasses define ``_logits``."""

    def __init__(self, spec: ModelInputs, embedding_dim: int) -> None:
        super().__init__()
        if spec.num_fields == 0:
            raise ValueError("a model needs at least one field, the ModelInputs is empty")
        if embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {embedding_dim}")
        self.spec = spec
        self.embedding_dim = embedding_dim
        self.embeddings = FieldEmbeddings(spec, embedding_dim)

    @property
    def n_dense(self) -> int:
        return len(self.spec.dense)

    def forward(
        self, dense: torch.Tensor, sparse: Optional[KeyedJaggedTensor], gates: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        if dense.dim() != 2 or dense.shape[1] != self.n_dense:
            raise ValueError(
                f"dense must have shape (B, {self.n_dense}) for fields {list(self.spec.dense)}, "
                f"got {tuple(dense.shape)}"
            )
        batch_size = dense.shape[0]
        emb = self.embeddings(sparse, batch_size)
        if gates is not None:
            if gates.shape != (batch_size, self.spec.num_fields):
                raise ValueError(
                    f"gates must have shape ({batch_size}, {self.spec.num_fields}), got {tuple(gates.shape)}"
                )
            gates = gates.to(dense.dtype)
            dense = dense * gates[:, : self.n_dense]
            emb = emb * gates[:, self.n_dense :, None]
        return self._logits(dense, emb)

    def _logits(self, dense: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # (B, Dd), (B, Fs, D) -> (B,)
        raise TypeError(f"{type(self).__name__} must define _logits")

    def prune(self, keep: Iterable[str]) -> CTRBackbone:
        """A smaller copy that only consumes ``keep`` (see the module docstring for exactness)."""
        new_spec = self.spec.select(keep)
        if new_spec.num_fields == 0:
            raise ValueError("pruning would remove every field; keep at least one")
        dense_idx = torch.tensor([self.spec.dense.index(n) for n in new_spec.dense], dtype=torch.long)
        sparse_idx = torch.tensor([self.spec.sparse_names.index(n) for n in new_spec.sparse_names], dtype=torch.long)
        embeddings = self.embeddings.prune(new_spec)
        # do not deep-copy the old tables: the copy gets the pruned embeddings in their place
        new = copy.deepcopy(self, memo={id(self.embeddings): embeddings})
        new.spec = new_spec
        new._prune_layers(self.spec, dense_idx, sparse_idx)
        return new

    def _prune_layers(self, old: ModelInputs, dense_idx: torch.Tensor, sparse_idx: torch.Tensor) -> None:
        raise TypeError(f"{type(self).__name__} must define _prune_layers")

    def _flat_columns(self, old: ModelInputs, dense_idx: torch.Tensor, sparse_idx: torch.Tensor) -> torch.Tensor:
        """Kept columns of ``cat(dense, emb.flatten(1))`` (dense first, then D columns per sparse field)."""
        d = self.embedding_dim
        sparse_cols = (len(old.dense) + sparse_idx[:, None] * d + torch.arange(d)[None, :]).reshape(-1)
        return torch.cat([dense_idx, sparse_cols])


class EmbeddingMLP(CTRBackbone):
    """``MLP(cat(dense, e_1, ..., e_F))``: the plain embedding + MLP model."""

    def __init__(
        self, spec: ModelInputs, embedding_dim: int = 16, hidden: Sequence[int] = (256, 128), dropout: float = 0.0
    ) -> None:
        super().__init__(spec, embedding_dim)
        self.mlp = _mlp(self.n_dense + len(spec.sparse) * embedding_dim, hidden, dropout)

    def _logits(self, dense: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([dense, emb.flatten(1)], dim=1)).squeeze(-1)

    def _prune_layers(self, old: ModelInputs, dense_idx: torch.Tensor, sparse_idx: torch.Tensor) -> None:
        _keep_input_columns(_first_linear(self.mlp), self._flat_columns(old, dense_idx, sparse_idx))


class DLRM(CTRBackbone):
    """DLRM from ``torchrec.models.dlrm``: dense arch to D, pairwise dot products with the field embeddings,
    over arch on ``cat(dense_out, triu(dots))``. Dense-arch layers end in ``embedding_dim``."""

    def __init__(
        self,
        spec: ModelInputs,
        embedding_dim: int = 16,
        dense_hidden: Sequence[int] = (64,),
        over_hidden: Sequence[int] = (256, 128),
    ) -> None:
        super().__init__(spec, embedding_dim)
        self.dense_arch = DenseArch(self.n_dense, list(dense_hidden) + [embedding_dim], device=torch.device("cpu"))
        self.inter_arch = InteractionArch(len(spec.sparse))
        n_sparse = len(spec.sparse)
        self.over_arch = OverArch(
            embedding_dim + n_sparse + n_sparse * (n_sparse - 1) // 2,
            list(over_hidden) + [1],
            device=torch.device("cpu"),
        )

    def _logits(self, dense: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.over_arch(self.inter_arch(self.dense_arch(dense), emb)).squeeze(-1)

    def _prune_layers(self, old: ModelInputs, dense_idx: torch.Tensor, sparse_idx: torch.Tensor) -> None:
        _keep_input_columns(_first_linear(self.dense_arch), dense_idx)
        n_old = len(old.sparse)
        # vectors 0 (dense) and 1..F (sparse); interaction columns follow triu(F + 1, offset=1) order
        pairs = torch.triu_indices(n_old + 1, n_old + 1, offset=1).t().tolist()
        col = {tuple(p): i for i, p in enumerate(pairs)}
        kept = [0] + (sparse_idx + 1).tolist()
        new_pairs = [(kept[a], kept[b]) for a, b in torch.triu_indices(len(kept), len(kept), offset=1).t().tolist()]
        columns = torch.tensor(
            list(range(self.embedding_dim)) + [self.embedding_dim + col[p] for p in new_pairs], dtype=torch.long
        )
        self.inter_arch = InteractionArch(len(sparse_idx))
        _keep_input_columns(_first_linear(self.over_arch), columns)


class DCNv2(CTRBackbone):
    """DCN-v2 (stacked): TorchRec's full-rank ``CrossNet`` on ``x_0 = cat(dense, e_1..e_F)``, then an MLP."""

    def __init__(
        self,
        spec: ModelInputs,
        embedding_dim: int = 16,
        cross_layers: int = 3,
        hidden: Sequence[int] = (256, 128),
        dropout: float = 0.0,
    ) -> None:
        super().__init__(spec, embedding_dim)
        width = self.n_dense + len(spec.sparse) * embedding_dim
        self.cross = CrossNet(width, cross_layers)
        self.mlp = _mlp(width, hidden, dropout)

    def _logits(self, dense: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.cross(torch.cat([dense, emb.flatten(1)], dim=1))).squeeze(-1)

    def _prune_layers(self, old: ModelInputs, dense_idx: torch.Tensor, sparse_idx: torch.Tensor) -> None:
        cols = self._flat_columns(old, dense_idx, sparse_idx)
        for i, w in enumerate(self.cross.kernels):
            self.cross.kernels[i] = nn.Parameter(w.detach()[cols][:, cols].clone())
        for i, b in enumerate(self.cross.bias):
            self.cross.bias[i] = nn.Parameter(b.detach()[cols].clone())
        _keep_input_columns(_first_linear(self.mlp), cols)


class DeepFM(CTRBackbone):
    """DeepFM returning logits: ``b + sum_f w_f + FM(v_1..v_F) + MLP(cat(v_1..v_F))``.

    Sparse field f: an EBC table of width D + 1, pooled to ``(v_f, w_f)``. Dense field f with value x:
    ``v_f = x V_f``, ``w_f = x u_f``. ``FM = 1/2 sum_d ((sum_f v_fd)^2 - sum_f v_fd^2)``.
    """

    def __init__(
        self, spec: ModelInputs, embedding_dim: int = 16, hidden: Sequence[int] = (256, 128), dropout: float = 0.0
    ) -> None:
        super().__init__(spec, embedding_dim + 1)
        self.factor_dim = embedding_dim
        self.dense_vectors = nn.Parameter(torch.randn(self.n_dense, embedding_dim) * 0.01)
        self.dense_linear = nn.Parameter(torch.zeros(self.n_dense))
        self.bias = nn.Parameter(torch.zeros(()))
        self.mlp = _mlp(spec.num_fields * embedding_dim, hidden, dropout)

    def _logits(self, dense: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        v = torch.cat([dense[:, :, None] * self.dense_vectors[None], emb[:, :, : self.factor_dim]], dim=1)  # (B, F, D)
        first = dense @ self.dense_linear + emb[:, :, self.factor_dim].sum(1)
        fm = 0.5 * (v.sum(1).pow(2) - v.pow(2).sum(1)).sum(1)
        return self.bias + first + fm + self.mlp(v.flatten(1)).squeeze(-1)

    def _prune_layers(self, old: ModelInputs, dense_idx: torch.Tensor, sparse_idx: torch.Tensor) -> None:
        self.dense_vectors = nn.Parameter(self.dense_vectors.detach()[dense_idx].clone())
        self.dense_linear = nn.Parameter(self.dense_linear.detach()[dense_idx].clone())
        fields = torch.cat([dense_idx, len(old.dense) + sparse_idx])
        d = self.factor_dim
        _keep_input_columns(_first_linear(self.mlp), (fields[:, None] * d + torch.arange(d)[None, :]).reshape(-1))


BACKBONES: dict[str, type[CTRBackbone]] = {"mlp": EmbeddingMLP, "dlrm": DLRM, "dcnv2": DCNv2, "deepfm": DeepFM}


def build_backbone(name: str, spec: ModelInputs, **kwargs) -> CTRBackbone:
    """``BACKBONES[name](spec, **kwargs)`` with a clear error for an unknown name."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; expected one of {sorted(BACKBONES)}")
    return BACKBONES[name](spec, **kwargs)
