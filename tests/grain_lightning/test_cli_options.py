"""GRAIN's options from the outside: the grouping from a command line or YAML, the Trainer options GRAIN
replaces, and the ``grain/*`` diagnostics reaching a logger on GRAIN's own schedule."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger

from grain_lightning import ByKey, Chunks, GrainConfig, GrainMixin, PerSample, as_grouping
from tests.grain_lightning.helpers import GrainModule, loader, make_data, make_net, trainer


# ---------------------------------------------------------------------- grouping from strings
@pytest.mark.parametrize("text, chunks", [("4", 4), ("1", 1), ("12", 12), (" 3 ", 3)])
def test_a_string_of_digits_is_that_many_chunks(text, chunks):
    grouping = as_grouping(text)
    assert isinstance(grouping, Chunks) and grouping.num_chunks == chunks


@pytest.mark.parametrize("bad", ["0", "-2", "chunks", "4.5", "", "key:", "+3", "٣"])
def test_a_bad_grouping_string_names_the_value_and_the_accepted_forms(bad):
    with pytest.raises(ValueError) as err:
        as_grouping(bad)
    message = str(err.value)
    assert repr(bad) in message
    for form in ("'sample'", "'key:NAME'", "string of digits", "Grouping"):
        assert form in message, (form, message)


class CliModule(GrainMixin, L.LightningModule):
    """A module whose ``__init__`` takes a ``GrainConfig``, as LightningCLI builds it."""

    def __init__(self, grain: GrainConfig, hidden: int = 4) -> None:
        super().__init__(grain=grain)
        self.net = torch.nn.Linear(3, hidden)

    def grain_losses(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y, reduction="none")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def cli(args: list[str]) -> LightningCLI:
    return LightningCLI(
        CliModule,
        run=False,
        save_config_callback=None,
        args=[*args, "--trainer.logger", "false", "--trainer.accelerator", "cpu"],
    )


@pytest.mark.parametrize(
    "value, kind, attr, expected",
    [("4", Chunks, "num_chunks", 4), ("sample", PerSample, None, None), ("key:label", ByKey, "key", "label")],
)
def test_lightning_cli_parses_the_grouping(value, kind, attr, expected):
    module = cli(["--model.grain.grouping", value]).model
    grouping = module.grain_config.grouping
    assert isinstance(grouping, kind)
    if attr is not None:
        assert getattr(grouping, attr) == expected


def test_lightning_cli_reads_the_grouping_from_a_yaml_config(tmp_path):
    for text, kind, attr, expected in [("4", Chunks, "num_chunks", 4), ("'4'", Chunks, "num_chunks", 4)] + [
        ("key:label", ByKey, "key", "label"),
        ("sample", PerSample, None, None),
    ]:
        path = tmp_path / "config.yaml"
        path.write_text(f"model:\n  grain:\n    grouping: {text}\n    accumulate_grad_batches: 2\n")
        module = cli(["--config", str(path)]).model
        grouping = module.grain_config.grouping
        assert isinstance(grouping, kind), (text, grouping)
        if attr is not None:
            assert getattr(grouping, attr) == expected
        assert module.grain_config.accumulate_grad_batches == 2


@pytest.mark.parametrize("value, expected", [("1", 1), ("0", 0), ("first", "first"), ("false", False), ("off", "off")])
def test_lightning_cli_parses_self_check(value, expected):
    assert cli(["--model.grain.self_check", value]).model.grain_config.self_check == expected


def test_lightning_cli_reports_a_bad_self_check():
    with pytest.raises((SystemExit, ValueError), match="self_check|-1"):
        cli(["--model.grain.self_check", "-1"])


def test_lightning_cli_reports_a_bad_grouping():
    with pytest.raises((SystemExit, ValueError)):
        cli(["--model.grain.grouping", "4.5"])


# ---------------------------------------------------------------------- Trainer options GRAIN replaces
def test_trainer_accumulate_grad_batches_is_refused_naming_the_grain_option():
    module = GrainModule(make_net(), grain=GrainConfig(grouping=4))
    with pytest.raises(MisconfigurationException) as err:
        trainer(accumulate_grad_batches=3).fit(module, loader(make_data()))
    message = str(err.value)
    assert "Trainer(accumulate_grad_batches=3)" in message
    assert "GrainConfig(accumulate_grad_batches=3)" in message
    assert module.grain_policy.steps == 0


@pytest.mark.parametrize(
    "trainer_args, grain_args, given, use",
    [
        (
            dict(gradient_clip_val=0.5),
            {},
            "gradient_clip_val=0.5",
            "gradient_clip_val=0.5, gradient_clip_algorithm='norm'",
        ),
        (
            dict(gradient_clip_val=0.5, gradient_clip_algorithm="value"),
            {},
            "gradient_clip_val=0.5, gradient_clip_algorithm='value'",
            "gradient_clip_val=0.5, gradient_clip_algorithm='value'",
        ),
        # Trainer(gradient_clip_val=0) alone is harmless, but with GrainConfig's clipping Lightning's
        # clip_gradients would fail at the first step
        (
            dict(gradient_clip_val=0),
            dict(gradient_clip_val=1.0),
            "gradient_clip_val=0",
            "gradient_clip_val=1.0, gradient_clip_algorithm='norm'",
        ),
    ],
)
def test_trainer_gradient_clipping_is_refused_naming_the_grain_options(trainer_args, grain_args, given, use):
    module = GrainModule(make_net(), grain=GrainConfig(grouping=4, **grain_args))
    with pytest.raises(MisconfigurationException) as err:
        trainer(**trainer_args).fit(module, loader(make_data()))
    message = str(err.value)
    assert f"Trainer({given})" in message and f"GrainConfig({use})" in message, message
    assert module.grain_policy.steps == 0


def test_trainer_options_grain_does_not_replace_still_work():
    module = GrainModule(make_net(), grain=GrainConfig(grouping=4, accumulate_grad_batches=2))
    t = trainer(gradient_clip_val=0, max_steps=2)  # 0: no clipping, which Lightning accepts too
    t.fit(module, loader(make_data()))
    assert module.grain_policy.steps == 2
    trainer(accumulate_grad_batches=2).validate(module, loader(make_data()), verbose=False)  # fits only


# ---------------------------------------------------------------------- diagnostics on GRAIN's schedule
def grain_rows(log_dir: Path) -> Counter:
    """``(step, key)`` -> how many times a ``grain/*`` value was written at that step in ``metrics.csv``."""
    seen: Counter = Counter()
    with open(log_dir / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key.startswith("grain/") and value != "":
                    seen[(int(row["step"]), key)] += 1
    return seen


@pytest.mark.parametrize("trainer_every", [50, 1])
def test_diagnostics_reach_the_logger_on_grain_schedule(tmp_path, trainer_every):
    """Six batches; batch 3 has a NaN loss and is skipped. GRAIN logs every 2 applied steps: batches 0, 2
    (applied steps 0, 2) and 5 (applied step 4), whatever the Trainer's ``log_every_n_steps``."""
    logger = CSVLogger(tmp_path, name="run")
    cfg = GrainConfig(grouping=ByKey(1), log_every_n_steps=2, on_nonfinite="skip", engine="ghost")
    module = GrainModule(make_net(), "sgd", 0.1, grain=cfg, nan_at_step=3)
    t = trainer(logger=logger, log_every_n_steps=trainer_every, max_steps=6)
    with pytest.warns(RuntimeWarning, match="skipping this optimizer step"):
        t.fit(module, loader(make_data(n=96)))
    rows = grain_rows(Path(logger.log_dir))
    assert all(count == 1 for count in rows.values()), rows  # nothing written twice at a step
    steps = {key: sorted(step for step, k in rows if k == key) for key in {k for _, k in rows}}
    for key in ("grain/num_groups", "grain/norm_ratio", "grain/worst_alignment", "grain/collapsed"):
        assert steps[key] == [0, 2, 5], (key, steps)
    assert steps["grain/skipped_steps"] == [3]
    assert steps["grain/self_check_error"] == [0]  # self_check="first"
    assert "grain/num_groups" in t.callback_metrics and "grain/num_groups" in t.logged_metrics
    assert module.grain_policy.steps == 5 and module.grain_policy.skipped == 1


def test_the_logged_loss_stays_on_lightning_schedule(tmp_path):
    logger = CSVLogger(tmp_path, name="run")
    module = GrainModule(make_net(), "sgd", 0.1, grain=GrainConfig(grouping=4, log_every_n_steps=1))
    trainer(logger=logger, log_every_n_steps=2, max_steps=4).fit(module, loader(make_data()))
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    loss_steps = sorted(int(r["step"]) for r in rows if r.get("train_loss_step"))
    assert loss_steps == [1, 3]  # Lightning's own schedule: every 2 batches
    assert sorted(step for step, key in grain_rows(Path(logger.log_dir)) if key == "grain/num_groups") == [0, 1, 2, 3]
