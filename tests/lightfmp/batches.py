"""Small hand-made batches for model tests (the data pipeline has its own tests), and a planted stage 1."""

from __future__ import annotations

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightfmp.inputs import CTRBatch, ModelInputs, SparseFeature

SPEC = ModelInputs(
    dense=("d0", "d1", "d2"),
    sparse=(
        SparseFeature("s0", 7),
        SparseFeature("s1", 5),
        SparseFeature("genres", 4, multi_valued=True, pooling="mean"),
        SparseFeature("s3", 9),
    ),
)


def random_batch(spec: ModelInputs = SPEC, batch_size: int = 6, seed: int = 0) -> CTRBatch:
    """Random dense values, ids (multi-valued fields get 0-3 ids per row, empty rows included) and labels."""
    g = torch.Generator().manual_seed(seed)
    lengths, values = [], []
    for f in spec.sparse:
        n = (
            torch.randint(0, 4, (batch_size,), generator=g)
            if f.multi_valued
            else torch.ones(batch_size, dtype=torch.long)
        )
        lengths.append(n)
        values.append(torch.randint(0, f.num_embeddings, (int(n.sum()),), generator=g))
    sparse = KeyedJaggedTensor.from_lengths_sync(
        keys=list(spec.sparse_names),
        values=torch.cat(values) if values else torch.zeros(0, dtype=torch.long),
        lengths=torch.cat(lengths).int() if lengths else torch.zeros(0, dtype=torch.int32),
    )
    dense = torch.randn(batch_size, len(spec.dense), generator=g)
    labels = torch.randint(0, 2, (batch_size,), generator=g).float()
    return CTRBatch(dense, sparse, labels)


def restrict(batch: CTRBatch, full: ModelInputs, keep: ModelInputs) -> CTRBatch:
    """The same rows with only ``keep``'s fields (what the data pipeline serves after pruning)."""
    cols = [full.dense.index(n) for n in keep.dense]
    jts = batch.sparse.to_dict()
    sparse = KeyedJaggedTensor.from_jt_dict({n: jts[n] for n in keep.sparse_names}) if keep.sparse else None
    return CTRBatch(batch.dense[:, cols], sparse, batch.labels)


def planted_stage1(rows: int, dense: int, sparse: int, informative: int, hidden: tuple[int, ...], epochs: int = 5):
    """Stage 1 (gated MLP, seed 0) fitted on the pretrain half of a synthetic task whose label uses ``informative``
    of its ``dense + sparse`` fields; returns ``(module, datamodule)``."""
    import lightning as L

    from lightfmp.data.datamodule import CTRDataModule
    from lightfmp.lightning_module import LightFMPModule

    L.seed_everything(0, verbose=False)
    dm = CTRDataModule(
        format="synthetic", synthetic_rows=rows, synthetic_dense=dense, synthetic_sparse=sparse,
        synthetic_num_informative=informative, batch_size=256, pretrain_fraction=0.5, subset="pretrain", seed=0,
    )  # fmt: skip
    module = LightFMPModule(backbone="mlp", embedding_dim=8, hidden=hidden, l0_weight=0.02, lr=0.01)
    L.Trainer(
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(module, dm)
    return module, dm
