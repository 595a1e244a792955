"""GrainMixin inside real Lightning fits: equivalence to plain training, the applied direction, resume."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from grain_lightning import ByKey, Chunks, GrainConfig
from tests.grain_lightning.brute_force import brute_force_min_norm
from tests.grain_lightning.helpers import GrainModule, ParamRecorder, PlainModule, loader, make_data, make_net, trainer


def fit_and_record(module, data, ckpt_path=None, **kw):
    rec = ParamRecorder()
    t = trainer(callbacks=[rec, *kw.pop("callbacks", [])], **kw)
    t.fit(module, data, ckpt_path=ckpt_path)
    return rec.params, t


@pytest.mark.parametrize("optim", ["momentum", "adamw"])
def test_one_group_reproduces_plain_training_step_for_step(optim):
    net, data = make_net(), loader(make_data())
    plain, _ = fit_and_record(PlainModule(net, optim, 0.05, scheduler=True), data, max_epochs=2)
    grain, _ = fit_and_record(
        GrainModule(net, optim, 0.05, scheduler=True, grain=GrainConfig(grouping=Chunks(1))), data, max_epochs=2
    )
    assert len(plain) == len(grain) == 8
    for a, b in zip(plain, grain):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), (a - b).abs().max()


def test_mean_mode_with_accumulation_reproduces_lightning_accumulation():
    net, data = make_net(), loader(make_data(n=80))  # 5 batches: the last cycle is partial
    plain, _ = fit_and_record(PlainModule(net, "momentum", 0.05), data, accumulate_grad_batches=2)
    mean, _ = fit_and_record(
        GrainModule(net, "momentum", 0.05, grain=GrainConfig(aggregation="mean", accumulate_grad_batches=2)), data
    )
    for a, b in zip(plain, mean):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)


def _group_grads(net, x, y, index, k):
    """Independent reference: each group's gradient with its own backward, flattened."""
    rows = []
    for j in range(k):
        net.zero_grad()
        F.cross_entropy(net(x[index == j]), y[index == j]).backward()
        rows.append(torch.cat([p.grad.reshape(-1).clone() for p in net.parameters()]))
    return torch.stack(rows).double()


@pytest.mark.parametrize("accumulate", [1, 2])
def test_applied_update_is_min_norm_combination_and_no_group_is_pushed_up(accumulate):
    """SGD with lr = 1: theta_before - theta_after = d = sum_k w_k g_k, w from a brute-force reference."""
    torch.manual_seed(0)
    data = make_data(n=32, seed=3)
    net = make_net(seed=4)
    module = GrainModule(net, "sgd", 1.0, grain=GrainConfig(grouping=ByKey(1), accumulate_grad_batches=accumulate))
    before = torch.cat([p.detach().reshape(-1).clone() for p in module.parameters()])
    after, _ = fit_and_record(module, loader(data), max_steps=1)
    d = (before - after[accumulate - 1]).double()
    x, y = data.tensors
    blocks = []
    for m in range(accumulate):  # micro-batch m holds samples 16m .. 16m+15
        xs, ys = x[16 * m : 16 * (m + 1)], y[16 * m : 16 * (m + 1)]
        keys = torch.unique(ys)
        index = torch.searchsorted(keys, ys)
        blocks.append(_group_grads(make_net(seed=4), xs, ys, index, len(keys)))
    g = torch.cat(blocks)
    w_ref, _ = brute_force_min_norm((g @ g.T).numpy())
    d_ref = torch.from_numpy(w_ref) @ g
    assert torch.allclose(d, d_ref, atol=1e-5), (d - d_ref).abs().max()
    tr = float(torch.trace(g @ g.T))
    assert (g @ d >= -1e-6 * tr).all()  # no group's loss increases to first order


def test_clipping_scheduler_and_accumulation_with_adamw():
    net, data = make_net(), loader(make_data(n=96))  # 6 batches, N = 3 -> 2 steps per epoch
    cfg = GrainConfig(grouping="sample", accumulate_grad_batches=3, gradient_clip_val=1e-3)
    module = GrainModule(net, "adamw", 0.01, scheduler=True, grain=cfg)
    _, t = fit_and_record(module, data, max_epochs=2)
    assert t.global_step == 4
    assert module.grain_policy.steps == 4
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.01 * 0.5**2)  # StepLR(2, 0.5) at step 4
    assert t.callback_metrics["grain/num_groups"] == 48.0  # 3 micro-batches x 16 samples


def test_value_clipping_bounds_each_coordinate():
    net, data = make_net(), loader(make_data(n=16))
    module = GrainModule(
        net, "sgd", 1.0, grain=GrainConfig(grouping=4, gradient_clip_val=1e-3, gradient_clip_algorithm="value")
    )
    before = torch.cat([p.detach().reshape(-1).clone() for p in module.parameters()])
    after, _ = fit_and_record(module, data, max_steps=1)
    assert (before - after[0]).abs().max() <= 1e-3 + 1e-6  # float32 rounding of the update
    unclipped, _ = fit_and_record(GrainModule(net, "sgd", 1.0, grain=GrainConfig(grouping=4)), data, max_steps=1)
    assert (before - unclipped[0]).abs().max() > 1e-2  # so the clip did act


def test_resume_from_checkpoint_gives_the_same_next_steps(tmp_path):
    """Epoch-end checkpoint (Lightning cannot resume a plain DataLoader mid-epoch exactly)."""
    net, data = make_net(), loader(make_data(n=96))
    cfg = dict(grouping=ByKey(1), warm_start=True)
    full, _ = fit_and_record(
        GrainModule(net, "adamw", 0.02, scheduler=True, grain=GrainConfig(**cfg)), data, max_epochs=2
    )
    first = GrainModule(net, "adamw", 0.02, scheduler=True, grain=GrainConfig(**cfg))
    _, t = fit_and_record(first, data, max_epochs=1)
    path = tmp_path / "epoch1.ckpt"
    t.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)
    assert saved["grain_state"]["steps"] == 6 and saved["grain_state"]["prev_weights"] is not None
    resumed = GrainModule(make_net(seed=99), "adamw", 0.02, scheduler=True, grain=GrainConfig(**cfg))
    rest, _ = fit_and_record(resumed, data, max_epochs=2, ckpt_path=str(path))
    assert resumed.grain_policy.steps == 12 and len(rest) == 6
    for a, b in zip(full[6:], rest):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), (a - b).abs().max()


def test_validation_loop_unchanged_and_diagnostics_logged():
    net, data = make_net(), loader(make_data())
    module = GrainModule(net, "sgd", 0.1, grain=GrainConfig(grouping=ByKey(1)))
    t = trainer(limit_val_batches=2, log_every_n_steps=1)
    t.fit(module, data, data)
    assert module.val_seen == 32
    for key in (
        "grain/num_groups",
        "grain/max_weight",
        "grain/weight_entropy",
        "grain/norm_ratio",
        "grain/worst_alignment",
        "grain/conflict_fraction",
        "val_loss",
        "train_loss_epoch",
    ):
        assert key in t.callback_metrics, key
    assert t.callback_metrics["grain/worst_alignment"] >= 0


def test_bf16_mixed_precision():
    net, data = make_net(), loader(make_data())
    module = GrainModule(net, "adamw", 0.01, grain=GrainConfig(grouping=ByKey(1)))
    before = torch.cat([p.detach().reshape(-1).clone() for p in module.parameters()])
    t = trainer(precision="bf16-mixed")
    t.fit(module, data)
    after = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
    assert torch.isfinite(after).all() and not torch.equal(before, after)
    assert t.callback_metrics["grain/worst_alignment"] >= -1e-6


def test_nonfinite_loss_raises_or_skips():
    net, data = make_net(), loader(make_data())
    with pytest.raises(FloatingPointError, match="per-sample loss 0 is nan"):
        trainer().fit(GrainModule(net, grain=GrainConfig(grouping=4), nan_at_step=1), data)
    module = GrainModule(net, "sgd", 0.1, grain=GrainConfig(grouping=4, on_nonfinite="skip"), nan_at_step=1)
    with pytest.warns(RuntimeWarning, match="skipping this optimizer step"):
        params, t = fit_and_record(module, data)
    assert torch.equal(params[0], params[1])  # the NaN step did not touch the weights
    assert all(torch.isfinite(p).all() for p in params)
    assert module.grain_policy.skipped == 1 and t.global_step == 3


class _Opposed(GrainModule):
    """Groups {0} and {1, 2, 3} with losses s and -s (s = sum of the first weight matrix): g_0 = -g_1, so the
    min-norm direction is 0, while the sample mean (weights 1/4, 3/4) is -0.5 grad s."""

    def grain_losses(self, batch, batch_idx):
        s = self.net[0].weight.sum()
        return torch.stack([s, -s, -s, -s])

    def grain_batch_size(self, batch):
        return None  # four synthetic "samples", not the batch's


@pytest.mark.parametrize("mode,shift", [("skip", 0.0), ("mean", 0.05), ("mix", 0.025)])
def test_collapse_behaviour(mode, shift):
    net, data = make_net(), loader(make_data(n=16))
    grouping = ByKey(lambda batch: torch.tensor([0, 1, 1, 1]))
    module = _Opposed(net, "sgd", 0.1, grain=GrainConfig(grouping=grouping, on_collapse=mode, collapse_mix=0.5))
    w0 = module.net[0].weight.detach().clone()
    fit_and_record(module, data, max_steps=1)
    # SGD, lr 0.1: "mean" applies -0.5 grad s (+0.05 per entry); "mix" 0.5 (w* + pi) gives -0.25 grad s
    assert torch.allclose(module.net[0].weight.detach() - w0, torch.full_like(w0, shift), atol=1e-7)
    assert module.grain_policy.collapsed >= 1
    assert (module.grain_policy.skipped >= 1) == (mode == "skip")


def test_config_validation_and_missing_losses():
    with pytest.raises(ValueError, match="aggregation must be one of"):
        GrainConfig(aggregation="median")
    with pytest.raises(ValueError, match="accumulate_grad_batches"):
        GrainConfig(accumulate_grad_batches=0)
    with pytest.raises(ValueError, match="collapse_mix"):
        GrainConfig(collapse_mix=2.0)

    class NoLosses(GrainModule):
        grain_losses = GrainModule.__mro__[1].grain_losses  # the mixin's default

    with pytest.raises(TypeError, match="implement grain_losses"):
        trainer().fit(NoLosses(make_net()), loader(make_data()))


def test_rejects_per_batch_loss():
    class Reduced(GrainModule):
        def grain_losses(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)  # forgot reduction="none"

    with pytest.raises(ValueError, match=r"grain_step: expected \(16,\) per-sample losses.*got shape \(\)"):
        trainer().fit(Reduced(make_net()), loader(make_data()))


class _EpochSchedulers(GrainModule):
    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        step = torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": step, "interval": "epoch"}}


class _Plateau(GrainModule):
    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.5, patience=0)
        return {"optimizer": opt, "lr_scheduler": plateau}


def test_epoch_and_plateau_schedulers_step_once_per_epoch():
    net, data = make_net(), loader(make_data())
    m = _EpochSchedulers(net, grain=GrainConfig(grouping=4))
    trainer(max_epochs=3).fit(m, data)
    assert m.optimizers().param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    # mode="max" on a decreasing val_loss: no improvement after the first epoch -> halves at epochs 2, 3
    p = _Plateau(net, grain=GrainConfig(grouping=4, plateau_monitor="val_loss"))
    trainer(max_epochs=3, limit_val_batches=1).fit(p, data, data)
    assert p.optimizers().param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**2)
    no_val = _Plateau(net, grain=GrainConfig(grouping=4, plateau_monitor="val_loss"))
    with pytest.raises(RuntimeError, match="monitors 'val_loss'"):
        trainer(max_epochs=1).fit(no_val, data)
    with pytest.raises(RuntimeError, match="plateau_monitor"):
        trainer(max_epochs=1).fit(_Plateau(net, grain=GrainConfig(grouping=4)), data, data)


def test_setup_check_rejects_unsynchronised_ranks_and_fp16_scaling():
    from types import SimpleNamespace

    module = GrainModule(make_net())
    module._trainer = SimpleNamespace(world_size=2, strategy=object(), precision_plugin=SimpleNamespace(scaler=None))
    with pytest.raises(RuntimeError, match="world_size=2"):
        module.grain_check_setup()
    module._trainer = SimpleNamespace(
        world_size=1, strategy=object(), precision_plugin=SimpleNamespace(scaler=object())
    )
    with pytest.raises(RuntimeError, match="bf16-mixed"):
        module.grain_check_setup()


def test_policy_options_changed_in_the_config_are_picked_up_and_checked():
    from types import SimpleNamespace

    module = GrainModule(make_net())
    module._trainer = SimpleNamespace(world_size=1, strategy=object(), precision_plugin=SimpleNamespace(scaler=None))
    assert module.grain_policy.options.on_collapse == "mean"
    module.grain_config.on_collapse = "skip"
    module.grain_check_setup()
    assert module.grain_policy.options.on_collapse == "skip"
    module.grain_config.collapse_mix = 2.0
    with pytest.raises(ValueError, match=r"GrainConfig: collapse_mix must be in \[0, 1\], got 2.0"):
        module.grain_check_setup()


class _Transformer(GrainModule):
    """Sequence classifier: embedding, one TransformerEncoderLayer, mean pool, head (inputs: token ids)."""

    def grain_losses(self, batch, batch_idx):
        x, y = batch
        ids = (x.abs() * 3).long().clamp(max=9)  # (n, 6) tokens from the features
        return F.cross_entropy(self.net(ids), y, reduction="none")


def _seq_net():
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    return torch.nn.Sequential(torch.nn.Embedding(10, 8), layer, _MeanPool(), torch.nn.Linear(8, 3))


class _MeanPool(torch.nn.Module):
    def forward(self, h):
        return h.mean(1)


@pytest.mark.parametrize(
    "accumulate,grouping,combine",
    [(1, "sample", "bookkeeping"), (2, ByKey(1), "bookkeeping"), (1, Chunks(4), "backward")],
)
def test_one_backward_engine_trains_like_the_reference_engine(accumulate, grouping, combine):
    net, data = _seq_net(), loader(make_data(n=64))
    runs = {}
    for engine in ("ghost", "reference"):
        cfg = GrainConfig(grouping=grouping, engine=engine, accumulate_grad_batches=accumulate, ghost_combine=combine)
        # momentum SGD: Adam would amplify roundoff in gradients that are exactly 0 in exact arithmetic
        # (the key bias of attention), so the comparison would measure float noise, not the engine
        runs[engine], _ = fit_and_record(_Transformer(net, "momentum", 0.05, grain=cfg), data)
    assert len(runs["ghost"]) == 4
    for a, b in zip(runs["ghost"], runs["reference"]):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), (a - b).abs().max()


def test_auto_engine_choice_and_capture_requirement():
    module = GrainModule(make_net(), grain=GrainConfig())
    fit_and_record(module, loader(make_data(n=32)))
    assert module.grain_engine is not None and module.grain_engine.fully_supported  # "auto": one-backward engine
    bn = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
    auto = GrainModule(bn, grain=GrainConfig())
    fit_and_record(auto, loader(make_data(n=32)))
    assert auto.grain_engine is None  # BatchNorm in training couples samples: reference engine

    class OwnStep(GrainModule):
        def training_step(self, batch, batch_idx):  # forward outside grain_capture()
            return self.grain_step(self.grain_losses(batch, batch_idx), batch)

    with pytest.raises(RuntimeError, match="grain_capture"):
        fit_and_record(OwnStep(make_net(), grain=GrainConfig(engine="ghost")), loader(make_data(n=32)))
    with pytest.raises(ValueError, match="blockwise"):
        GrainConfig(blockwise=True, engine="reference")


def test_blockwise_step_does_not_push_any_group_up():
    """SGD with lr = 1: the applied step d satisfies <d, g_j> >= ||d||^2 for every group j."""
    data = make_data(n=16, seed=3)
    net = make_net(seed=4)
    module = GrainModule(net, "sgd", 1.0, grain=GrainConfig(grouping="sample", blockwise=True))
    before = torch.cat([p.detach().reshape(-1).clone() for p in module.parameters()])
    after, t = fit_and_record(module, loader(data), max_steps=1)
    d = (before - after[0]).double()
    x, y = data.tensors
    g = _group_grads(make_net(seed=4), x, y, torch.arange(16), 16)
    assert (g @ d >= (d @ d) * (1 - 1e-4)).all()
    assert t.callback_metrics["grain/blocks"] == 2.0


@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.parametrize("engine", ["reference", "ghost"])
def test_step_norm_mean_keeps_grain_direction_with_the_mean_gradient_length(engine, accumulate):
    """float64, SGD with lr = 1: the applied step d' has the norm of the batch's mean gradient and the direction
    of the GRAIN step without the option."""
    x, y = make_data(n=32, seed=3).tensors
    data = loader(torch.utils.data.TensorDataset(x.double(), y))
    net = make_net(seed=4).double()

    def step(step_norm: str) -> tuple[torch.Tensor, GrainModule]:
        cfg = GrainConfig(grouping=ByKey(1), engine=engine, step_norm=step_norm, accumulate_grad_batches=accumulate)
        module = GrainModule(net, "sgd", 1.0, grain=cfg)
        before = torch.cat([p.detach().reshape(-1).clone() for p in module.parameters()])
        after, t = fit_and_record(module, data, max_steps=1)
        return before - after[accumulate - 1], module

    d_grain, _ = step("grain")
    d_scaled, module = step("mean")
    ref = make_net(seed=4).double()
    F.cross_entropy(ref(x[: 16 * accumulate].double()), y[: 16 * accumulate]).backward()
    mean = torch.cat([p.grad.reshape(-1) for p in ref.parameters()])
    assert float(d_grain.norm()) < 0.95 * float(mean.norm())  # the option changes the length here
    assert float(d_scaled.norm()) == pytest.approx(float(mean.norm()), rel=1e-9)
    assert float(F.cosine_similarity(d_scaled, d_grain, dim=0)) == pytest.approx(1.0, abs=1e-12)
    logged = module.trainer.callback_metrics["grain/step_scale"]  # Lightning keeps logged values in float32
    assert float(logged) == pytest.approx(float(mean.norm() / d_grain.norm()), rel=1e-6)
