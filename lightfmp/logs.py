"""Where a fitting stage logs: one logger version per stage, named by the stage.

``lightfmp`` builds each fitting stage's loggers with :func:`stage_loggers`: the default (``--trainer.logger``
left at ``true``) is a ``CSVLogger`` under ``<output_dir>/logs``; a logger the user configured is kept. Every
``CSVLogger`` / ``TensorBoardLogger`` without an explicit version gets the stage's name as its version
(``logs/pretrain``, ``logs/finetune``; ``pretrain-1``, ``pretrain-2``, ... when a rerun finds it taken, so a
rerun never overwrites the logs of an earlier one) instead of Lightning's ``version_0``, ``version_1``, ...
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Union

from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger

__all__ = ["LOGS_DIR", "free_version", "stage_loggers"]

LOGS_DIR = "logs"


def free_version(root: Path, stage: str) -> str:
    """``stage`` if ``root/stage`` does not exist, else the first free ``stage-1``, ``stage-2``, ..."""
    if not (root / stage).exists():
        return stage
    n = 1
    while (root / f"{stage}-{n}").exists():
        n += 1
    return f"{stage}-{n}"


def stage_loggers(logger: Any, stage: str, output_dir: Union[str, Path]) -> Union[bool, list[Logger]]:
    """The loggers of stage ``stage`` from the Trainer's ``logger`` argument (see the module docstring).

    ``False`` stays ``False`` (no logging); ``True`` or None is a ``CSVLogger(output_dir, name="logs")``; a logger
    or an iterable of loggers is kept, with its version set to the stage's when it has none.
    """
    if logger is False:
        return False
    if logger is None or logger is True:
        loggers: list[Logger] = [CSVLogger(save_dir=str(output_dir), name=LOGS_DIR)]
    elif isinstance(logger, Logger):
        loggers = [logger]
    elif isinstance(logger, Iterable) and not isinstance(logger, (str, bytes)):
        loggers = list(logger)
    else:
        raise TypeError(f"--trainer.logger must be a bool, a Logger or a list of them, got {type(logger).__name__}")
    for each in loggers:
        if not isinstance(each, Logger):
            raise TypeError(f"--trainer.logger must be a bool, a Logger or a list of them, got a {type(each).__name__}")
        # Lightning resolves a version left as None to the next version_N when the logger is first used; both
        # loggers keep the constructor's ``version`` in ``_version``
        if isinstance(each, (CSVLogger, TensorBoardLogger)) and each._version is None:
            each._version = free_version(Path(each.root_dir), stage)
    return loggers
