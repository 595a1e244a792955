"""The pinned environment: TorchRec imports and runs on the CPU build (the Light-FMP foundation)."""

from __future__ import annotations

import torch


def test_torchrec_embedding_bag_collection_on_cpu():
    import torchrec
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

    ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(name=f"t_{f}", embedding_dim=4, num_embeddings=10, feature_names=[f])
            for f in ("user", "item")
        ],
        device=torch.device("cpu"),
    )
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["user", "item"],
        values=torch.tensor([1, 2, 3, 4, 5]),
        lengths=torch.tensor([1, 1, 2, 1, 0, 0]),
    )
    out = ebc(kjt)
    assert isinstance(out, torchrec.KeyedTensor)
    assert out.values().shape == (3, 8)
    # lengths are key-major: user = [1], [2], [3, 4]; item = [5], [], []; pooling is a sum
    user, item = ebc.embedding_bags["t_user"].weight, ebc.embedding_bags["t_item"].weight
    assert torch.allclose(out["user"][2], user[3] + user[4])
    assert torch.allclose(out["item"][0], item[5])
    assert torch.equal(out["item"][1], torch.zeros(4))
