import pytest
import torch

from lightfmp.backbones import BACKBONES, build_backbone
from lightfmp.inputs import ModelInputs
from tests.lightfmp.batches import SPEC, random_batch, restrict

KEEPS = {
    "mixed": ["d0", "d2", "s1", "genres"],
    "dense_only": ["d1"],
    "sparse_only": ["s0", "s3"],
    "single_multi": ["genres"],
    "all": list(SPEC.names),
}


@pytest.mark.parametrize("name", sorted(BACKBONES))
@pytest.mark.parametrize("keep", sorted(KEEPS))
def test_pruned_model_equals_masked_model(name, keep):
    torch.manual_seed(0)
    model = build_backbone(name, SPEC, embedding_dim=4)
    with torch.no_grad():  # non-zero biases everywhere, so a wrongly kept column would show
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    batch = random_batch(batch_size=9)
    kept = KEEPS[keep]
    gates = torch.tensor([[1.0 if n in kept else 0.0 for n in SPEC.names]] * 9)
    masked = model(batch.dense, batch.sparse, gates)
    pruned = model.prune(kept)
    assert pruned.spec == SPEC.select(kept)
    small = restrict(batch, SPEC, pruned.spec)
    out = pruned(small.dense, small.sparse)
    # float32 embeddings; sums over fewer zero terms may round differently
    torch.testing.assert_close(out, masked, rtol=1e-5, atol=1e-6)
    n_old = sum(p.numel() for p in model.parameters())
    n_new = sum(p.numel() for p in pruned.parameters())
    assert (n_new < n_old) == (keep != "all")
    # the source model is left intact
    torch.testing.assert_close(model(batch.dense, batch.sparse, gates), masked)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_pruned_tables_are_dropped_and_weights_copied(name):
    model = build_backbone(name, SPEC, embedding_dim=4)
    pruned = model.prune(["s1", "d0"])
    tables = pruned.embeddings.ebc.embedding_bags
    assert list(tables.keys()) == ["t_s1"]
    torch.testing.assert_close(tables["t_s1"].weight, model.embeddings.ebc.embedding_bags["t_s1"].weight)
    assert tables["t_s1"].weight.data_ptr() != model.embeddings.ebc.embedding_bags["t_s1"].weight.data_ptr()


def test_gates_change_output_and_bad_inputs_are_named():
    model = build_backbone("mlp", SPEC, embedding_dim=4)
    batch = random_batch()
    ones = torch.ones(6, SPEC.num_fields)
    torch.testing.assert_close(model(batch.dense, batch.sparse, ones), model(batch.dense, batch.sparse))
    with pytest.raises(ValueError, match="every field"):
        model.prune([])
    with pytest.raises(KeyError, match="nope"):
        model.prune(["nope"])
    with pytest.raises(ValueError, match=r"dense must have shape \(B, 3\)"):
        model(batch.dense[:, :2], batch.sparse)
    with pytest.raises(ValueError, match="gates must have shape"):
        model(batch.dense, batch.sparse, ones[:, :3])
    with pytest.raises(ValueError, match="unknown backbone 'xgb'"):
        build_backbone("xgb", SPEC)
    with pytest.raises(ValueError, match="empty"):
        build_backbone("mlp", ModelInputs())


def test_deepfm_returns_logits_not_probabilities():
    torch.manual_seed(0)
    model = build_backbone("deepfm", SPEC, embedding_dim=4)
    with torch.no_grad():
        model.bias.fill_(5.0)
    out = model(*[random_batch().dense, random_batch().sparse])
    assert (out > 1).any()
