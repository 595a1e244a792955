import math

import lightning as L
import pytest
import torch
from torchmetrics.classification import BinaryAUROC

from lightfmp.lightning_module import LightFMPModule, evaluate
from lightfmp.metrics import BinaryLogLoss
from tests.lightfmp.batches import SPEC, random_batch, restrict


def test_logloss_matches_formula_over_uneven_batches():
    torch.manual_seed(0)
    logits, target = torch.randn(101), torch.randint(0, 2, (101,)).float()
    metric = BinaryLogLoss()
    for chunk in (slice(0, 7), slice(7, 60), slice(60, 101)):
        metric.update(logits[chunk], target[chunk])
    p = torch.sigmoid(logits.double())
    expected = -(target * p.log() + (1 - target) * (1 - p).log()).mean()
    assert float(metric.compute()) == pytest.approx(float(expected), rel=1e-12)
    with pytest.raises(ValueError, match="must be 0 or 1"):
        metric.update(logits[:2], torch.tensor([0.0, 2.0]))
    with pytest.raises(ValueError, match="before any update"), pytest.warns(UserWarning, match="before the ``update``"):
        BinaryLogLoss().compute()


def test_evaluate_is_whole_set_auc_not_batch_average():
    torch.manual_seed(0)
    module = LightFMPModule(backbone="mlp", embedding_dim=4, hidden=(8,), feature_spec=SPEC.to_dict())
    batches = [random_batch(batch_size=5, seed=s) for s in range(4)]
    scores = evaluate(module, batches)
    module.eval()
    with torch.no_grad():
        logits = torch.cat([module(b) for b in batches])
    labels = torch.cat([b.labels for b in batches]).long()
    assert scores["auc"] == pytest.approx(float(BinaryAUROC()(logits, labels)), abs=1e-7)
    assert scores["samples"] == 20


def test_checkpoint_round_trip_and_pruned_module(tmp_path):
    torch.manual_seed(0)
    module = LightFMPModule(backbone="dlrm", embedding_dim=4, hidden=(8,), feature_spec=SPEC.to_dict(), target_fields=3)
    with torch.no_grad():
        module.gate.log_alpha.copy_(torch.linspace(-3, 3, SPEC.num_fields))
    path = tmp_path / "m.ckpt"
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "pytorch-lightning_version": L.__version__,
        },
        path,
    )
    loaded = LightFMPModule.load_from_checkpoint(path)
    assert loaded.feature_spec == SPEC and loaded.gate.target == 3.0
    batch = random_batch(batch_size=8)
    module.eval(), loaded.eval()
    torch.testing.assert_close(loaded(batch), module(batch))
    kept = [n for n, k in zip(SPEC.names, module.gate.kept_mask()) if k]
    small = module.pruned(kept)
    assert small.gate is None and small.hparams.field_mask is False and small.num_parameters() < module.num_parameters()
    gates = module.gate.kept_mask().float()[None].expand(8, -1)
    torch.testing.assert_close(
        small(restrict(batch, SPEC, small.feature_spec)), module(batch, gates), rtol=1e-5, atol=1e-6
    )


def test_checkpoint_from_other_schema_is_rejected(tmp_path):
    module = LightFMPModule(backbone="mlp", embedding_dim=4, feature_spec=SPEC.to_dict())
    other = LightFMPModule(backbone="mlp", embedding_dim=4, feature_spec=SPEC.select(["d0", "s1"]).to_dict())
    ckpt = {"state_dict": other.state_dict(), "hyper_parameters": dict(other.hparams)}
    with pytest.raises(ValueError, match="differ"):
        module.on_load_checkpoint(ckpt)
    with pytest.raises(ValueError, match="no feature_spec"):
        module.on_load_checkpoint({"hyper_parameters": {}})


def test_optimizer_groups_gates_without_weight_decay():
    module = LightFMPModule(backbone="mlp", feature_spec=SPEC.to_dict(), weight_decay=0.1, target_fields=0.5)
    opt = module.configure_optimizers()
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert opt.param_groups[1]["params"] == [module.gate.log_alpha]
    assert math.isclose(opt.param_groups[1]["lr"], module.hparams.gate_lr)
    backbone = {id(p) for p in opt.param_groups[0]["params"]}
    assert backbone == {id(p) for p in module.net.parameters()}
