from __future__ import annotations

import pytest

from grain_lightning.sweep.methods import Method, parse_methods
from grain_lightning.sweep.settings import SettingsMismatch, SweepSettings, load_settings, record_settings


def settings(config, methods="mean,grain-sample", lrs=(1e-3,), seeds=(0, 1), extra=()):
    return SweepSettings.create(config, parse_methods(methods), lrs, seeds, extra)


def test_sweep_json_roundtrip_and_allowed_changes(tmp_path, config):
    out = tmp_path / "out"
    s = settings(config)
    record_settings(out, s)
    assert load_settings(out) == s
    record_settings(out, settings(config, seeds=(0, 1, 2, 3), lrs=(1e-3,)))  # more seeds: fine
    assert load_settings(out).seeds == (0, 1, 2, 3)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(methods="mean,grain-sample,grain-label"), r"methods \(added grain-label\)"),
        (dict(lrs=(1e-3, 1e-2)), r"learning rates \(\[0.001\] -> \[0.001, 0.01\]\)"),
        (dict(extra=("--trainer.max_epochs", "2")), r"extra args \(\[\] -> \['--trainer.max_epochs', '2'\]\)"),
        ("config", "config file contents"),
    ],
)
def test_sweep_json_mismatch_raises_naming_what_changed(tmp_path, config, change, message):
    out = tmp_path / "out"
    record_settings(out, settings(config))
    if change == "config":
        config.write_text("model:\n  lr: 0.1\n")
        new = settings(config)
    else:
        new = settings(config, **change)
    with pytest.raises(SettingsMismatch, match=message):
        record_settings(out, new)
    record_settings(out, new, force=True)
    assert load_settings(out) == new


def test_changed_overrides_of_a_custom_method_are_named(tmp_path, config):
    out = tmp_path / "out"
    base = parse_methods("mean")
    record_settings(out, SweepSettings.create(config, [*base, Method("x", ("--a", "1"))], [1e-3], [0]))
    with pytest.raises(SettingsMismatch, match=r"overrides of x: \['--a', '1'\] -> \['--a', '2'\]"):
        record_settings(out, SweepSettings.create(config, [*base, Method("x", ("--a", "2"))], [1e-3], [0]))


def test_output_dir_that_is_a_file(tmp_path, config):
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError):
        record_settings(tmp_path / "file", settings(config))
