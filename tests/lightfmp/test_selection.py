"""Field-selection methods (lightfmp.selection): planted fields recovered, every method through prune and
finetune, clear errors on bad input. Synthetic data only (nothing read from ../shared)."""

import copy
import json
import shutil

import lightning as L
import pandas as pd
import pytest

from lightfmp import stages
from lightfmp.cli import run_cli
from lightfmp.data.datamodule import CTRDataModule
from lightfmp.lightning_module import LightFMPModule
from lightfmp.selection import METHODS, SelectionContext, check_selection, get_method, rank_fields
from tests.lightfmp.batches import planted_stage1
from tests.lightfmp.test_stages import TINY

BASELINES = sorted(set(METHODS) - {"random"})


@pytest.fixture(scope="module")
def planted():
    """Stage 1 on 10k rows whose label uses 4 of 12 fields (2 XOR-like pairs with main effects)."""
    module, dm = planted_stage1(rows=10000, dense=4, sparse=8, informative=4, hidden=(32,))
    return SelectionContext.from_datamodule(module, dm, epochs=5), set(dm.synthetic.informative_fields)


@pytest.mark.parametrize("name", BASELINES)
def test_method_ranks_the_planted_fields_first(planted, name):
    context, truth = planted
    scores = get_method(name).scores(context)
    assert list(scores.index) == context.fields and scores.notna().all()
    report = rank_fields(context.fields, scores, top_k=len(truth))
    assert set(report.field[report.kept]) == truth, report.to_string()


def test_random_is_seeded_and_keeps_k_fields(planted):
    context, _ = planted
    method = get_method("random")
    first, again = method.scores(context), method.scores(context)
    pd.testing.assert_series_equal(first, again)
    assert sorted(first) == list(range(1, len(context.fields) + 1))
    assert rank_fields(context.fields, first, 3).kept.sum() == 3


def test_rank_fields_breaks_ties_by_position_and_checks_k():
    report = rank_fields(["a", "b", "c"], pd.Series({"a": 1.0, "b": 2.0, "c": 2.0}), top_k=2)
    assert list(report.field) == ["b", "c", "a"] and list(report.kept) == [True, True, False]
    with pytest.raises(ValueError, match="top_k must be in \\[1, 3\\], got 4"):
        rank_fields(["a", "b", "c"], pd.Series({"a": 1.0, "b": 2.0, "c": 2.0}), top_k=4)


def test_every_method_runs_through_prune_and_finetune(tmp_path):
    base = tmp_path / "stage1"
    run_cli(["pretrain", *TINY, "--output_dir", str(base)])
    for name in sorted(METHODS):
        out = tmp_path / name
        shutil.copytree(base, out)
        run_cli(["prune", *TINY, "--output_dir", str(out), "--top_k", "3", "--selection", name])
        run_cli(["finetune", *TINY, "--output_dir", str(out)])
        report = pd.read_csv(out / "feature_report.csv")
        assert {"field", "score", "kept", "keep_probability", "selection", "constant"} <= set(report.columns)
        assert not report.constant.any()
        assert report.kept.sum() == 3 and set(report.selection) == {name}
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["prune"]["selection"] == name and metrics["prune"]["selection_seconds"] >= 0
        assert sorted(metrics["prune"]["kept_fields"]) == sorted(report.field[report.kept])
        assert metrics["finetune"]["fields"] == 3 and 0 <= metrics["finetune"]["auc"] <= 1


def test_pipeline_with_a_baseline(tmp_path, capsys):
    out = tmp_path / "run"
    run_cli(["pipeline", *TINY, "--output_dir", str(out), "--selection", "univariate", "--top_k", "2"])
    assert "selection: univariate" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["prune"]["selection"] == "univariate" and metrics["finetune"]["fields"] == 2


def test_default_selection_is_lightfmp_with_its_threshold(tmp_path):
    dm = CTRDataModule(
        format="synthetic",
        synthetic_rows=1500,
        synthetic_dense=2,
        synthetic_sparse=3,
        synthetic_num_informative=2,
        batch_size=256,
    )
    module = LightFMPModule(backbone="mlp", embedding_dim=4, hidden=(8,))
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    stages.pretrain(trainer, module, dm, tmp_path)
    _, report, entry = stages.prune(tmp_path, dm, threshold=0.0)
    assert entry["selection"] == "lightfmp" and report.kept.all()
    assert (report.score == report.keep_probability).all()


def test_bad_selection_inputs_fail_clearly_before_training(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="unknown selection method 'nope'.*autofield.*univariate"):
        run_cli(["pipeline", *TINY, "--output_dir", str(out), "--selection", "nope", "--top_k", "3"])
    with pytest.raises(ValueError, match="'permutation' ranks the fields.*top_k"):
        run_cli(["pipeline", *TINY, "--output_dir", str(out), "--selection", "permutation"])
    assert not out.exists() or not any(out.iterdir())  # failed before stage 1
    with pytest.raises(ValueError, match="'lasso'.*top_k"):
        check_selection("lasso", None)
    with pytest.raises(ValueError, match="unknown selection method 'Lasso'"):
        stages.prune(out, CTRDataModule(format="synthetic"), top_k=3, selection="Lasso")
    check_selection("lightfmp", None)  # the default keeps by threshold


def _complete_run(tmp_path):
    out = tmp_path / "run"
    run_cli(["pipeline", *TINY, "--output_dir", str(out), "--selection", "univariate", "--top_k", "2"])
    return out


def test_bad_top_k_fails_before_touching_the_previous_outputs(tmp_path):
    """A prune that fails (top_k 0, or more fields than the model has) leaves the previous run complete."""
    with pytest.raises(ValueError, match=r"top_k must be a positive number of fields, got 0"):
        check_selection("lasso", 0)
    out = _complete_run(tmp_path)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(ValueError, match=r"top_k=99 is more than the stage-1 model's 10 fields"):
        run_cli(["prune", *TINY, "--output_dir", str(out), "--top_k", "99", "--selection", "univariate"])
    with pytest.raises(ValueError, match=r"top_k must be a positive number of fields, got -1"):
        run_cli(["prune", *TINY, "--output_dir", str(out), "--top_k", "-1"])
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_selection_epochs_must_be_positive(tmp_path):
    out = _complete_run(tmp_path)
    with pytest.raises(ValueError, match=r"train for `epochs` epochs.*got 0"):
        run_cli(["prune", *TINY, "--output_dir", str(out), "--top_k", "2", "--selection", "lasso",
                 "--trainer.max_epochs", "0"])  # fmt: skip


def test_one_config_file_serves_every_subcommand(tmp_path):
    """configs/*.yaml set the pipeline's finetune_epochs: the single-stage subcommands accept it."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("finetune_epochs: 1\n")
    out = tmp_path / "run"
    for stage in ("pretrain", "prune", "finetune"):
        run_cli([stage, "--config", str(cfg), *TINY, "--output_dir", str(out)])
    assert json.loads((out / "metrics.json").read_text())["finetune"]["fields"] >= 1


def test_prune_refuses_data_split_differently_from_stage_1(tmp_path):
    out = tmp_path / "run"
    run_cli(["pretrain", *TINY, "--output_dir", str(out)])
    with pytest.raises(ValueError, match=r"differs from the data the stage-1 checkpoint .*seed=1 \(stage 1: 0\)"):
        run_cli(["prune", *TINY, "--data.seed", "1", "--output_dir", str(out), "--top_k", "2", "--selection", "random"])
    run_cli(["prune", *TINY, "--output_dir", str(out), "--top_k", "2", "--selection", "random"])  # same split: fine


def test_constant_fields_are_marked_and_a_kept_one_warns(planted):
    """A field with one value carries no information; prune marks it and warns when a method keeps it."""
    from lightfmp.selection import constant_fields

    context = copy.deepcopy(planted[0])  # the fixture is shared: change a copy
    assert constant_fields(context) == []
    dense, sparse = context.spec.dense[0], context.spec.sparse[0].name
    context.data.dense[:, 0] = 1.0
    context.data.sparse[:, 0] = 3
    assert constant_fields(context) == [dense, sparse]
    report = rank_fields(context.fields, get_method("lasso").scores(context), top_k=len(context.fields))
    assert set(report.field[report.kept]) >= {dense, sparse}  # what prune then flags in its report and warning
