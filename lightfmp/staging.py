"""A stage's outputs appear all at once, or not at all.

A stage writes its files (:data:`~lightfmp.outputs.STAGE_FILES`; a stage checkpoint may be a directory, a
``torch.distributed.checkpoint`` that each rank writes its shards into) into a staging directory inside the output
directory, ``.staging-<stage>-<random suffix>/`` (``tempfile.mkdtemp``), after its fit; no stage file and not
``metrics.json`` is touched while the stage runs (only its logger writes, under ``logs/<stage>``), so a stage
that fails or is killed (even by SIGKILL) leaves the previous run's files and ``metrics.json`` as they were.
When the stage has succeeded, :meth:`StagedOutputs.commit` writes ``commit.json`` (the stage and its
``metrics.json`` entry) into the staging directory, atomically and last; from then on the stage counts as done
and :func:`apply_commit` makes it visible:

1. ``metrics.json`` without the stage and the later ones (their files are about to change),
2. the later stages' files removed (they were made from the outputs being replaced),
3. each staged file renamed into the output directory (an existing one that a rename cannot replace, a directory
   or a file where a directory goes, is first renamed into the staging directory),
4. ``metrics.json`` with the stage's entry,
5. the staging directory removed.

Every step can be repeated, so a run killed inside these steps is finished by the next run's
:func:`recover` (which also removes the staging directories of stages that never committed). At every
moment, ``metrics.json`` lists only stages whose files are all in place.

Under DDP, rank 0 prepares the staging directory, writes and commits; the other ranks get the same directory
and wait for the commit (:mod:`lightfmp.distributed`). A sharded checkpoint directory is written by every rank
into that staging directory, and counts as written once DCP's ``.metadata`` is there (written once every
rank has written its shards).

One run at a time per output directory: :func:`locked` holds an exclusive ``filelock`` on ``.lightfmp.lock``
while a stage writes and commits (released by the operating system if the process dies); a second run gets an
error naming the directory instead of racing the first one. Stages enter :func:`staged_outputs` after their
fit (under DDP the process group exists only from the first fit on).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import filelock

from lightfmp.distributed import broadcast, is_rank_zero, on_rank_zero
from lightfmp.outputs import STAGE_FILES, STAGES, atomic_write, output_directory, read_metrics, write_metrics
from lightfmp.torchrec_strategy import is_sharded_checkpoint

__all__ = ["LOCK_FILE", "StagedOutputs", "apply_commit", "locked", "recover", "staged_outputs", "staging_directories"]

LOCK_FILE = ".lightfmp.lock"
STAGING_PREFIX = ".staging-"
COMMIT_FILE = "commit.json"
#: name, inside a staging directory, of an output that a committed directory replaces
REPLACED_PREFIX = ".replaced-"


@contextmanager
def locked(output_dir: Path) -> Iterator[None]:
    """Hold the output directory's lock; raises ``RuntimeError`` naming the directory when another run holds it."""
    lock = filelock.FileLock(str(output_dir / LOCK_FILE), timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise RuntimeError(
            f"output_dir {str(output_dir)!r} is in use by another lightfmp run (it holds {LOCK_FILE}); wait for it "
            "to finish or use another --output_dir"
        ) from None
    try:
        yield
    finally:
        lock.release()


class StagedOutputs:
    """The staging directory of one stage: write the stage's files to :meth:`path`, then :meth:`commit`.

    Under DDP every rank gets one (the same directory); only rank 0 (``writer``) writes and commits.
    """

    def __init__(self, output_dir: Path, stage: str, directory: Path, writer: bool = True) -> None:
        self.output_dir, self.stage, self.directory, self.writer = output_dir, stage, directory, writer

    def path(self, name: str) -> Path:
        """Where to write the stage's file ``name`` (one of ``STAGE_FILES[stage]``)."""
        if name not in STAGE_FILES[self.stage]:
            raise ValueError(f"stage {self.stage!r} writes {list(STAGE_FILES[self.stage])}, not {name!r}")
        return self.directory / name

    def commit(self, entry: dict[str, Any]) -> None:
        """Record the stage as done with its ``metrics.json`` ``entry`` and make its files visible (rank 0; every
        rank returns once it is done, or raises if it failed)."""
        on_rank_zero(lambda: self._commit(entry), f"committing stage {self.stage!r}")

    def _commit(self, entry: dict[str, Any]) -> None:
        missing = [name for name in STAGE_FILES[self.stage] if not _written(self.directory / name)]
        if missing:
            raise RuntimeError(f"stage {self.stage!r} did not write {missing}; nothing was committed")
        text = json.dumps({"stage": self.stage, "entry": entry}, indent=2, allow_nan=False)
        atomic_write(self.directory / COMMIT_FILE, lambda p: p.write_text(text))
        apply_commit(self.output_dir, self.directory)


def apply_commit(output_dir: Path, staging: Path) -> None:
    """Steps 1-5 of the module docstring for the committed staging directory ``staging``; repeatable."""
    record = json.loads((staging / COMMIT_FILE).read_text())
    stage: str = record["stage"]
    replaced = STAGES[STAGES.index(stage) :]
    metrics = read_metrics(output_dir)
    if any(s in metrics for s in replaced):
        write_metrics(output_dir, {s: m for s, m in metrics.items() if s not in replaced})
    for later in replaced[1:]:
        for name in STAGE_FILES[later]:
            _remove(output_dir / name)
    for name in STAGE_FILES[stage]:
        if (staging / name).exists():  # absent when an earlier, interrupted apply moved it already
            target = output_dir / name
            if target.is_dir() or (staging / name).is_dir():  # os.replace would refuse: move the old one aside
                old = staging / f"{REPLACED_PREFIX}{name}"
                _remove(old)
                if target.exists():
                    target.replace(old)  # removed with the staging directory (step 5)
            (staging / name).replace(target)
    metrics = read_metrics(output_dir)
    metrics[stage] = record["entry"]
    write_metrics(output_dir, metrics)
    shutil.rmtree(staging)


def _written(path: Path) -> bool:
    """A staged file, or a complete checkpoint directory (:func:`~lightfmp.torchrec_strategy.is_sharded_checkpoint`)."""
    return path.is_file() or is_sharded_checkpoint(path)


def _remove(path: Path) -> None:
    """Remove a file or a directory tree, if there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def recover(output_dir: Path) -> list[str]:
    """Finish the commits a killed run left half-applied and remove the staging directories of stages that never
    committed; returns the stages finished. Call it holding :func:`locked`."""
    finished = []
    for staging in sorted(output_dir.glob(STAGING_PREFIX + "*")):
        if (staging / COMMIT_FILE).is_file():
            finished.append(json.loads((staging / COMMIT_FILE).read_text())["stage"])
            apply_commit(output_dir, staging)
        else:
            shutil.rmtree(staging, ignore_errors=True)
    return finished


@contextmanager
def staged_outputs(output_dir: Path, stage: str) -> Iterator[StagedOutputs]:
    """Lock ``output_dir`` (created if needed), :func:`recover` it and yield a fresh staging directory for
    ``stage``; on an exception the staging directory is removed and the output directory is as it was. Under DDP
    rank 0 does this and every rank gets the same directory (:mod:`lightfmp.distributed`)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {list(STAGES)}")
    out = Path(output_dir)
    with ExitStack() as stack:

        def prepare() -> str:
            output_directory(out)
            stack.enter_context(locked(out))
            recover(out)
            return tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{stage}-", dir=out)

        directory = Path(broadcast(on_rank_zero(prepare, f"preparing the output directory for stage {stage!r}")))
        writer = is_rank_zero()
        try:
            yield StagedOutputs(out, stage, directory, writer)
        finally:
            if writer and directory.exists() and not (directory / COMMIT_FILE).exists():
                shutil.rmtree(directory, ignore_errors=True)


def staging_directories(output_dir: Path) -> list[Path]:
    """The staging directories in ``output_dir`` (left by a run that was killed, until the next run recovers)."""
    return sorted(Path(output_dir).glob(STAGING_PREFIX + "*"))
