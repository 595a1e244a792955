"""A sweep's settings, recorded in ``OUTPUT_DIR/sweep.json``, so that resuming into the same directory cannot
mix results of different sweeps.

What makes results comparable is compared on resume: the config file's contents (SHA-256), the methods (names
and overrides), the learning rates (as a set) and the extra arguments. A difference raises
:class:`SettingsMismatch` naming it, unless ``force`` (then the new settings are recorded and the results
already there are reused). Seeds and the baseline may change freely (more seeds extend a sweep); the record
keeps the latest.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from grain_lightning.sweep.methods import Method
from grain_lightning.sweep.results import atomic_write_text

__all__ = [
    "SETTINGS_FILE",
    "SettingsMismatch",
    "SweepSettings",
    "config_digest",
    "differences",
    "load_settings",
    "record_settings",
]

PathLike = Union[str, Path]
SETTINGS_FILE = "sweep.json"


def config_digest(path: PathLike) -> str:
    """SHA-256 of the file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass(frozen=True)
class SweepSettings:
    """What a sweep ran: config (path and contents hash), methods, learning rates, seeds, extra args, baseline."""

    config: str
    config_sha256: str
    methods: tuple[Method, ...]
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]
    extra_args: tuple[str, ...] = ()
    baseline: str = "mean"

    @classmethod
    def create(
        cls,
        config: PathLike,
        methods: Sequence[Method],
        lrs: Sequence[float],
        seeds: Sequence[int],
        extra_args: Sequence[str] = (),
        baseline: str = "mean",
    ) -> SweepSettings:
        path = Path(config).resolve()
        return cls(
            str(path),
            config_digest(path),
            tuple(methods),
            tuple(float(lr) for lr in lrs),
            tuple(int(s) for s in seeds),
            tuple(extra_args),
            baseline,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "config_sha256": self.config_sha256,
            "methods": [{"name": m.name, "overrides": list(m.overrides)} for m in self.methods],
            "lrs": list(self.lrs),
            "seeds": list(self.seeds),
            "extra_args": list(self.extra_args),
            "baseline": self.baseline,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SweepSettings:
        return cls(
            str(data["config"]),
            str(data["config_sha256"]),
            tuple(Method(m["name"], tuple(m["overrides"])) for m in data["methods"]),
            tuple(float(lr) for lr in data["lrs"]),
            tuple(int(s) for s in data["seeds"]),
            tuple(data.get("extra_args", ())),
            str(data.get("baseline", "mean")),
        )


class SettingsMismatch(ValueError):
    """Resuming into an output directory recorded with different settings."""


def differences(old: SweepSettings, new: SweepSettings) -> list[str]:
    """What differs between two sweeps in a way that changes results (empty if nothing)."""
    out = []
    if old.config_sha256 != new.config_sha256:
        out.append(
            f"config file contents ({old.config} sha256 {old.config_sha256[:12]} -> "
            f"{new.config} sha256 {new.config_sha256[:12]})"
        )
    before = {m.name: m.overrides for m in old.methods}
    after = {m.name: m.overrides for m in new.methods}
    added, removed = sorted(after.keys() - before.keys()), sorted(before.keys() - after.keys())
    changed = sorted(n for n in before.keys() & after.keys() if before[n] != after[n])
    parts = [f"added {', '.join(added)}"] if added else []
    parts += [f"removed {', '.join(removed)}"] if removed else []
    parts += [f"overrides of {n}: {list(before[n])} -> {list(after[n])}" for n in changed]
    if parts:
        out.append("methods (" + "; ".join(parts) + ")")
    if set(old.lrs) != set(new.lrs):
        out.append(f"learning rates ({sorted(old.lrs)} -> {sorted(new.lrs)})")
    if old.extra_args != new.extra_args:
        out.append(f"extra args ({list(old.extra_args)} -> {list(new.extra_args)})")
    return out


def load_settings(output_dir: PathLike) -> SweepSettings:
    """The settings recorded in ``output_dir`` (``FileNotFoundError`` / ``ValueError`` if none or unreadable)."""
    path = Path(output_dir) / SETTINGS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {output_dir} the output directory of a sweep?")
    try:
        return SweepSettings.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} cannot be read: {err}") from None


def record_settings(output_dir: PathLike, settings: SweepSettings, force: bool = False) -> list[str]:
    """Write ``settings`` to ``output_dir/sweep.json``; if one is there with settings that differ (see
    :func:`differences`), raise :class:`SettingsMismatch` unless ``force``. Returns the differences (empty when
    none or no earlier sweep): with ``force`` the caller discards the earlier results."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output directory {out} is a file")
    out.mkdir(parents=True, exist_ok=True)
    path = out / SETTINGS_FILE
    diff = differences(load_settings(out), settings) if path.exists() else []
    if diff and not force:
        raise SettingsMismatch(
            f"{path} records a different sweep: " + "; ".join(diff) + ". Use another --output_dir, or --force "
            "to record the new settings and discard the results already there."
        )
    atomic_write_text(path, json.dumps(settings.to_json(), indent=2) + "\n")
    return diff
