"""Light-FMP stages and the ``lightfmp`` CLI end to end on small synthetic data."""

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from lightfmp import outputs
from lightfmp.cli import run_cli as main
from lightfmp.data.datamodule import CTRDataModule
from lightfmp.data.synthetic import SyntheticCTR
from lightfmp.lightning_module import LightFMPModule, evaluate
from tests.lightfmp.batches import planted_stage1

TINY = [
    "--data.format",
    "synthetic",
    "--data.synthetic_rows",
    "3000",
    "--data.synthetic_dense",
    "4",
    "--data.synthetic_sparse",
    "6",
    "--data.synthetic_num_informative",
    "3",
    "--data.batch_size",
    "256",
    "--data.pretrain_fraction",
    "0.5",
    "--model.backbone",
    "dlrm",
    "--model.embedding_dim",
    "4",
    "--model.hidden",
    "[16]",
    "--trainer.max_epochs",
    "2",
    "--trainer.enable_progress_bar",
    "false",
]


def cli(*args):
    return main(list(args))


def test_planted_fields_are_recovered():
    """Precision and recall of the kept fields >= 0.9 on a task whose label uses 5 of 20 fields."""
    module, dm = planted_stage1(rows=20000, dense=8, sparse=12, informative=5, hidden=(64,))
    report = module.gate.report()
    kept = set(report.field[report.kept])
    truth = set(dm.synthetic.informative_fields)
    hits = len(kept & truth)
    assert hits / max(len(kept), 1) >= 0.9 and hits / len(truth) >= 0.9, (sorted(kept), sorted(truth))


def test_stage_subcommands_write_consistent_outputs(tmp_path):
    out = tmp_path / "run"
    cli("pretrain", *TINY, "--output_dir", str(out))
    visible = {p.name for p in out.iterdir() if not p.name.startswith(".")}
    assert visible == {"pretrain.ckpt", "preprocessor.json", "metrics.json", "summary.csv", "summary.md", "logs"}
    # the default logger: a CSV version named by the stage, with one keep-probability curve per field
    logged = pd.read_csv(out / "logs" / "pretrain" / "metrics.csv")
    curves = [c for c in logged.columns if c.startswith("keep_probability/")]
    assert len(curves) == 10 and logged[curves].notna().all(axis=1).sum() >= 2  # step 0 and each epoch's end
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [".lightfmp.lock"]  # no staging left
    cli("prune", *TINY, "--output_dir", str(out), "--top_k", "3")
    assert (out / "keep_probabilities.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = pd.read_csv(out / "feature_report.csv")
    assert {"field", "keep_probability", "kept"} <= set(report.columns) and report.kept.sum() == 3
    cli("finetune", *TINY, "--output_dir", str(out))
    assert sorted(p.name for p in (out / "logs").iterdir()) == ["finetune", "pretrain"]
    assert "val_auc" in pd.read_csv(out / "logs" / "finetune" / "metrics.csv").columns
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == ["pretrain", "prune", "finetune"]
    for stage in ("pretrain", "finetune"):
        m = metrics[stage]
        assert {"auc", "logloss", "fields", "parameters", "train_seconds", "samples_per_second"} <= set(m)
        assert 0 <= m["auc"] <= 1 and m["logloss"] > 0 and m["train_seconds"] > 0
    assert metrics["pretrain"]["fields"] == 10 and metrics["finetune"]["fields"] == 3
    assert metrics["finetune"]["parameters"] == metrics["prune"]["parameters"] < metrics["pretrain"]["parameters"]
    # stage 1 used the pretrain half of the 2400 training rows, stage 3 the other half (2 epochs each)
    assert metrics["pretrain"]["train_samples"] == 2 * 1200 and metrics["finetune"]["train_samples"] == 2 * 1200
    kept = list(report.field[report.kept])
    assert sorted(metrics["prune"]["kept_fields"]) == sorted(kept)

    # the pruned checkpoint equals the stage-1 model with its gates fixed to 0/1, on real batches
    masked = LightFMPModule.load_from_checkpoint(out / "pretrain.ckpt").eval()
    pruned = LightFMPModule.load_from_checkpoint(out / "pruned.ckpt").eval()
    assert pruned.gate is None and list(pruned.feature_spec.names) == [
        n for n in masked.feature_spec.names if n in kept
    ]
    dm = CTRDataModule(
        format="synthetic",
        synthetic_rows=3000,
        synthetic_dense=4,
        synthetic_sparse=6,
        synthetic_num_informative=3,
        batch_size=256,
    )
    dm.setup()
    small = dm.for_subset("finetune", fields=kept, preprocessor=str(out / "preprocessor.json"))
    small.setup()
    gates = torch.tensor([float(n in kept) for n in masked.feature_spec.names])
    with torch.no_grad():
        for full_batch, kept_batch in zip(dm.test_dataloader(), small.test_dataloader()):
            expected = masked(full_batch, gates.expand(len(full_batch), -1))
            torch.testing.assert_close(pruned(kept_batch), expected, rtol=1e-5, atol=1e-5)
    assert evaluate(pruned, small.test_dataloader())["auc"] == pytest.approx(metrics["prune"]["auc"], abs=1e-6)


def test_pipeline_on_a_criteo_file_with_defaults(tmp_path, capsys):
    """The least a user types: format, path and output directory."""
    data = SyntheticCTR(num_rows=1500, seed=3).write_criteo_tsv(tmp_path / "train.txt")
    out = tmp_path / "out"
    cli(
        "pipeline",
        "--data.format",
        "criteo",
        "--data.path",
        str(data),
        "--output_dir",
        str(out),
        "--trainer.max_epochs",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--model.hidden",
        "[16]",
    )
    printed = capsys.readouterr().out
    assert "kept" in printed and "finetune" in printed
    assert "The prune row scores the stage-1 model with its gates fixed to 0/1" in printed  # why it may differ
    assert outputs.PRUNE_ROW_NOTE in (out / "summary.md").read_text()
    metrics = outputs.read_metrics(out)
    assert set(metrics) == {"pretrain", "prune", "finetune"} and metrics["pretrain"]["fields"] == 39
    assert (out / "finetune.ckpt").exists()


def test_bad_inputs_fail_clearly_and_leave_no_complete_looking_output(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="pretrain.ckpt"):
        cli("prune", *TINY, "--output_dir", str(out))
    with pytest.raises(KeyError, match="nope"):
        cli("pretrain", *TINY, "--output_dir", str(out), "--data.fields", "[nope]")
    cli("pretrain", *TINY, "--output_dir", str(out))
    with pytest.raises(ValueError, match="remove every field"):
        cli("prune", *TINY, "--output_dir", str(out), "--threshold", "0.9999")
    assert not (out / "pruned.ckpt").exists() and not (out / "feature_report.csv").exists()
    assert set(outputs.read_metrics(out)) == {"pretrain"}
    with pytest.raises(ValueError, match="not a pruned checkpoint"):
        cli("finetune", *TINY, "--output_dir", str(out), "--checkpoint", str(out / "pretrain.ckpt"))
    assert not (out / "finetune.ckpt").exists()
    # a stage-1 checkpoint made from another schema is rejected when fitting on this data
    other = ["--data.synthetic_sparse" if a == "--data.synthetic_sparse" else a for a in TINY]
    other[other.index("--data.synthetic_sparse") + 1] = "5"
    with pytest.raises(ValueError, match="disagree on the fields|differ"):
        cli("pretrain", *other, "--output_dir", str(tmp_path / "o2"), "--ckpt_path", str(out / "pretrain.ckpt"))


@pytest.mark.parametrize("name", ["adult", "movielens", "criteo", "avazu", "synthetic"])
def test_shipped_configs_parse(name, capsys):
    from pathlib import Path

    config = Path(__file__).resolve().parents[2] / "configs" / f"{name}.yaml"
    with pytest.raises(SystemExit) as exit_info:
        cli("pipeline", "--config", str(config), "--print_config")
    assert exit_info.value.code in (0, None)
    assert f"format: {name}" in capsys.readouterr().out


def test_unknown_config_key_is_rejected(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  format: adult\n  batchsize: 12\n")
    with pytest.raises(SystemExit) as exit_info:
        cli("pipeline", "--config", str(bad))
    assert exit_info.value.code != 0
    assert "batchsize" in capsys.readouterr().err


def test_stage_loggers_name_versions_by_stage_and_never_reuse_one(tmp_path):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from lightfmp.logs import stage_loggers

    assert stage_loggers(False, "pretrain", tmp_path) is False
    (default,) = stage_loggers(True, "pretrain", tmp_path)
    assert isinstance(default, CSVLogger) and Path(default.log_dir) == tmp_path / "logs" / "pretrain"
    (tmp_path / "logs" / "pretrain").mkdir(parents=True)
    (tmp_path / "logs" / "pretrain-1").mkdir()
    (again,) = stage_loggers(None, "pretrain", tmp_path)
    assert Path(again.log_dir) == tmp_path / "logs" / "pretrain-2"  # an earlier run's logs are kept
    board, pinned = TensorBoardLogger(tmp_path / "tb"), CSVLogger(tmp_path, version="mine")
    assert stage_loggers([board, pinned], "finetune", tmp_path) == [board, pinned]
    assert Path(board.log_dir) == tmp_path / "tb" / "lightning_logs" / "finetune" and pinned.version == "mine"
    with pytest.raises(TypeError, match="--trainer.logger must be .* got str"):
        stage_loggers("csv", "pretrain", tmp_path)
