from __future__ import annotations

import pytest

from grain_lightning.sweep.methods import BUILTIN_METHODS, Method, parse_methods, split_list


def test_builtin_methods_and_their_overrides():
    methods = parse_methods("mean,grain-sample,grain-chunks4,grain-chunks8,grain-label,grain-rescaled,grain-blockwise")
    assert [m.name for m in methods] == list(BUILTIN_METHODS)
    by_name = {m.name: m.overrides for m in methods}
    assert by_name["mean"] == ("--model.grain.aggregation", "mean")
    assert by_name["grain-chunks4"] == ("--model.grain.grouping", "4")
    assert by_name["grain-label"] == ("--model.grain.grouping", "key:labels")
    assert by_name["grain-rescaled"] == ("--model.grain.grouping", "sample", "--model.grain.step_norm", "mean")
    assert by_name["grain-blockwise"] == ("--model.grain.grouping", "sample", "--model.grain.blockwise", "true")


def test_custom_methods_are_split_with_shlex():
    methods = parse_methods("mean,mine=--model.grain.grouping 4 --trainer.max_epochs 2,q=--a \"x, y\" --b 'z,w'")
    assert methods[1] == Method("mine", ("--model.grain.grouping", "4", "--trainer.max_epochs", "2"))
    assert methods[2] == Method("q", ("--a", "x, y", "--b", "z,w"))
    assert split_list(" a, ,b ") == ["a", "b"]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("mean,grain-samples", "unknown method 'grain-samples'; known methods: mean, grain-sample"),
        ("", "no methods given"),
        ("mean,mean", "more than once: mean"),
        ("grain-sample", "baseline 'mean' is not among"),
        ("mean,mean=--x 1", "name of a built-in"),
        ("mean,bad name=--x 1", "must be letters"),
        ("mean,x=value", "must start with an option"),
    ],
)
def test_invalid_methods_raise_clearly(spec, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        parse_methods(spec)


def test_baseline_is_configurable():
    assert [m.name for m in parse_methods("grain-sample,grain-chunks4", baseline="grain-sample")] == [
        "grain-sample",
        "grain-chunks4",
    ]
    assert len(parse_methods(["grain-sample"], baseline=None)) == 1
