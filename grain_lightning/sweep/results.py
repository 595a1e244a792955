"""The files of one run and the ``result.json`` contract between a worker (``grain fit --result_json``) and
the sweep; atomic writes.

A worker writes, at the end of its run::

    {"seed": 3, "lr": 1e-05, "monitor": "val_acc", "mode": "max", "test_metric": "test_acc",
     "val": {"val_acc": 0.81, "val_loss": 0.45}, "test": {"test_acc": 0.79, "test_loss": 0.47},
     "wall_s": 12.3, "steps": 40,
     "curve": [{"step": 10, "epoch": 0, "val_acc": 0.7, "val_loss": 0.6}, ...]}

``mode`` is ``"max"`` (accuracy-like) or ``"min"`` (RMSE/loss-like); ``monitor`` must be a key of ``val`` and
``test_metric`` a key of ``test``. A metric may be ``NaN`` or ``null`` (a diverged run). ``wall_s``,
``steps`` and ``curve`` are read when present. A run is *done* when its ``result.json`` parses and satisfies
this contract (with the run's seed and lr): a partial or stale file is not a result. A run whose worker exited
with an error has ``failed.txt`` (the reason) instead: the report counts it as the worst possible value when it
chooses a learning rate (a diverged run raises under GRAIN's default ``on_nonfinite="raise"``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

from grain_lightning.files import atomic_write, atomic_write_text

__all__ = [
    "FAILED_FILE",
    "LOG_FILE",
    "MODES",
    "RESULT_FILE",
    "atomic_write",
    "atomic_write_text",
    "check_result",
    "read_result",
    "tail",
]

RESULT_FILE = "result.json"
LOG_FILE = "log.txt"
#: written by the runner when a worker exits with an error (not when the sweep is interrupted)
FAILED_FILE = "failed.txt"
MODES = ("max", "min")


def _number(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def check_result(result: Any) -> Optional[str]:
    """Why ``result`` breaks the contract, or ``None`` when it holds."""
    if not isinstance(result, dict):
        return "not a JSON object"
    for key in ("seed", "lr", "monitor", "mode", "test_metric", "val", "test"):
        if key not in result:
            return f"no {key!r}"
    if result["mode"] not in MODES:
        return f"mode {result['mode']!r} is not one of {MODES}"
    for part, key in (("val", "monitor"), ("test", "test_metric")):
        metrics = result[part]
        if not isinstance(metrics, dict) or not all(_number(v) for v in metrics.values()):
            return f"{part!r} is not an object of numbers"
        if result[key] not in metrics:
            return f"{key} {result[key]!r} is not in {part!r}"
    if not isinstance(result.get("curve", []), list):
        return "'curve' is not a list"
    return None


def read_result(path: Path, seed: Optional[int] = None, lr: Optional[float] = None) -> Optional[dict[str, Any]]:
    """The result at ``path`` if it exists, parses and keeps the contract (for this ``seed`` and ``lr`` when
    given), else ``None``."""
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if check_result(result) is not None:
        return None
    if seed is not None and result["seed"] != seed:
        return None
    if lr is not None and not (_number(result["lr"]) and math.isclose(float(result["lr"] or 0.0), lr, rel_tol=1e-9)):
        return None
    return result


def tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a text file ('' if it cannot be read)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
