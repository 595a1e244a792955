"""Plan and execute a sweep's runs: one worker subprocess (``grain fit``) per (seed, method, lr), ``jobs`` at once.

A run lives in ``OUTPUT_DIR/<method>/lr=<lr>/seed=<seed>/`` (:attr:`Run.run_id`): the worker's Lightning
files, its ``result.json`` and ``log.txt`` (its stdout and stderr). Execution is resumable: a run whose
``result.json`` satisfies the contract (:func:`~grain_lightning.sweep.results.read_result`) is skipped; the
directory of any other run is emptied before it starts again (no partial logs left next to the new ones). A
failed run (nonzero exit, or no valid result) gets ``failed.txt``, is reported with the tail of its log and does
not stop the others; a run stopped by an interrupt is not marked failed. Each run gets ``cores // jobs`` threads
(``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``).
"""

from __future__ import annotations

import math
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from tqdm.auto import tqdm

from grain_lightning.files import atomic_write_text
from grain_lightning.sweep.methods import Method
from grain_lightning.sweep.results import FAILED_FILE, LOG_FILE, RESULT_FILE, read_result, tail

__all__ = [
    "DEFAULT_WORKER",
    "Failure",
    "Outcome",
    "Run",
    "SweepFailed",
    "available_cores",
    "command",
    "default_jobs",
    "discard_results",
    "execute",
    "format_lr",
    "is_done",
    "plan_runs",
    "run_env",
    "threads_per_run",
]

PathLike = Union[str, Path]
DEFAULT_WORKER: tuple[str, ...] = (sys.executable, "-m", "grain_lightning.cli", "fit")
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def format_lr(lr: float) -> str:
    """The shortest text that reads back as ``lr`` (``1e-05``, ``0.001``): used in run ids and on the CLI."""
    return repr(float(lr))


@dataclass(frozen=True)
class Run:
    """One training run of the sweep."""

    seed: int
    method: Method
    lr: float

    @property
    def run_id(self) -> str:
        """``<method>/lr=<lr>/seed=<seed>``: the run's directory under the output directory."""
        return f"{self.method.name}/lr={format_lr(self.lr)}/seed={self.seed}"

    def directory(self, output_dir: PathLike) -> Path:
        return Path(output_dir) / self.run_id


def _check_lrs(lrs: Sequence[float]) -> list[float]:
    lrs = [float(lr) for lr in lrs]
    if not lrs:
        raise ValueError("no learning rates given")
    bad = [lr for lr in lrs if not (math.isfinite(lr) and lr > 0)]
    if bad:
        raise ValueError(f"learning rates must be positive and finite, got {bad}")
    if len(set(lrs)) < len(lrs):
        raise ValueError(f"learning rate given more than once: {lrs}")
    return lrs


def seed_list(seeds: Union[int, Sequence[int]]) -> list[int]:
    """``range(seeds)`` for an int (at least 1), else the given seeds (non-negative, distinct)."""
    if isinstance(seeds, int):
        if seeds < 1:
            raise ValueError(f"the number of seeds must be at least 1, got {seeds}")
        return list(range(seeds))
    out = [int(s) for s in seeds]
    if not out:
        raise ValueError("no seeds given")
    if any(s < 0 for s in out) or len(set(out)) < len(out):
        raise ValueError(f"seeds must be distinct and non-negative, got {out}")
    return out


def plan_runs(seeds: Union[int, Sequence[int]], methods: Sequence[Method], lrs: Sequence[float]) -> list[Run]:
    """Every (seed, method, lr): ``len(seeds) * len(methods) * len(lrs)`` runs, seed-major (an interrupted
    sweep has every method on its first seeds)."""
    if not methods:
        raise ValueError("no methods given")
    names = [m.name for m in methods]
    if len(set(names)) < len(names):
        raise ValueError(f"method names must be distinct, got {names}")
    lr_values = _check_lrs(lrs)
    return [Run(seed, method, lr) for seed in seed_list(seeds) for method in methods for lr in lr_values]


def available_cores() -> int:
    """CPU cores this process may use (its affinity where the OS tells, else ``os.cpu_count()``)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def default_jobs() -> int:
    """``max(1, cores // 2)`` runs at once."""
    return max(1, available_cores() // 2)


def threads_per_run(jobs: int, cores: Optional[int] = None) -> int:
    """``max(1, cores // jobs)``."""
    return max(1, (available_cores() if cores is None else cores) // max(1, jobs))


def run_env(threads: int, base: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """``base`` (default ``os.environ``) with the thread variables set to ``threads`` and unbuffered Python."""
    env = dict(os.environ if base is None else base)
    env.update({name: str(threads) for name in THREAD_VARIABLES})
    env["PYTHONUNBUFFERED"] = "1"
    return env


def command(
    run: Run,
    config_path: PathLike,
    run_dir: PathLike,
    *,
    worker_cmd: Sequence[str] = DEFAULT_WORKER,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The worker's command line; ``extra_args`` come last, so they override the method's overrides."""
    run_dir = Path(run_dir)
    return [
        *worker_cmd,
        "--config",
        str(config_path),
        "--seed_everything",
        str(run.seed),
        "--model.lr",
        format_lr(run.lr),
        *run.method.overrides,
        "--trainer.default_root_dir",
        str(run_dir),
        "--result_json",
        str(run_dir / RESULT_FILE),
        *extra_args,
    ]


def is_done(run: Run, output_dir: PathLike) -> bool:
    """Whether ``run`` has a valid ``result.json`` (for its seed and lr)."""
    return read_result(run.directory(output_dir) / RESULT_FILE, run.seed, run.lr) is not None


def discard_results(output_dir: PathLike) -> int:
    """Delete every run directory (``<method>/lr=<lr>/seed=<seed>/``) under ``output_dir``; how many there were.

    ``--force`` uses it when the recorded settings change, so that results of another configuration are never
    reported as results of this one.
    """
    runs = [p for p in Path(output_dir).glob("*/lr=*/seed=*") if p.is_dir()]
    for run_dir in runs:
        shutil.rmtree(run_dir)
    return len(runs)


@dataclass(frozen=True)
class Failure:
    """A run that failed: why, where its log is, and the log's last lines."""

    run: Run
    reason: str
    log: Path
    log_tail: str = ""

    def describe(self) -> str:
        text = f"{self.run.run_id}: {self.reason} (log: {self.log})"
        if self.log_tail:
            text += "\n" + "\n".join("    | " + line for line in self.log_tail.splitlines())
        return text


class SweepFailed(RuntimeError):
    """Some runs failed; ``outcome`` has them all."""

    def __init__(self, outcome: Outcome):
        self.outcome = outcome
        runs = "\n".join("  " + f.describe().splitlines()[0] for f in outcome.failed)
        super().__init__(f"{len(outcome.failed)} of {outcome.total} run(s) failed:\n{runs}")


@dataclass
class Outcome:
    """What :func:`execute` did with each run."""

    done: list[Run] = field(default_factory=list)
    skipped: list[Run] = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.done) + len(self.skipped) + len(self.failed)

    def counts(self) -> str:
        return f"{len(self.done)} done, {len(self.skipped)} skipped, {len(self.failed)} failed"

    def check(self) -> None:
        """Raise :class:`SweepFailed` listing the failed runs, if any."""
        if self.failed:
            raise SweepFailed(self)


class _Processes:
    """Live worker processes, so that an interrupt stops them and starts no more."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.live: set[subprocess.Popen[bytes]] = set()
        self.stopping = False

    def run(self, cmd: list[str], log: Path, env: dict[str, str]) -> Optional[int]:
        with log.open("w", encoding="utf-8") as out:
            out.write("$ " + shlex.join(cmd) + "\n")
            out.flush()
            with self.lock:
                if self.stopping:
                    return None
                proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
                self.live.add(proc)
            try:
                return proc.wait()
            finally:
                with self.lock:
                    self.live.discard(proc)

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            live = list(self.live)
        for proc in live:
            proc.terminate()
        for proc in live:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def _execute_one(
    run: Run, output_dir: Path, cmd: list[str], env: dict[str, str], procs: _Processes
) -> tuple[Optional[Failure], float, Optional[dict]]:
    run_dir = run.directory(output_dir)
    result_path, log = run_dir / RESULT_FILE, run_dir / LOG_FILE
    start = time.monotonic()
    try:
        if run_dir.exists():  # a stale result, a failure mark or a partial run's logs: start afresh
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        rc = procs.run(cmd, log, env)
    except OSError as err:  # the run directory or the worker could not be made
        return Failure(run, f"could not start: {err}", log), time.monotonic() - start, None
    seconds = time.monotonic() - start
    if rc is None or (rc != 0 and procs.stopping):
        return Failure(run, "interrupted", log), seconds, None
    result = read_result(result_path, run.seed, run.lr) if rc == 0 else None
    if result is None:
        reason = f"exit status {rc}" if rc != 0 else f"exit status 0 but no valid {RESULT_FILE}"
        atomic_write_text(run_dir / FAILED_FILE, reason + "\n")
        return Failure(run, reason, log, tail(log)), seconds, None
    return None, seconds, result


def execute(
    runs: Sequence[Run],
    output_dir: PathLike,
    *,
    config_path: PathLike,
    jobs: Optional[int] = None,
    worker_cmd: Sequence[str] = DEFAULT_WORKER,
    extra_args: Sequence[str] = (),
    quiet: bool = False,
    check: bool = True,
) -> Outcome:
    """Run every run without a valid result, ``jobs`` (default :func:`default_jobs`) at once.

    A progress bar on a terminal (one line per finished run otherwise; nothing with ``quiet``, except
    failures). With ``check``, raise :class:`SweepFailed` at the end if a run failed; else see
    ``Outcome.failed``.
    """
    jobs = default_jobs() if jobs is None else jobs
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    ids = [run.run_id for run in runs]
    if len(set(ids)) < len(ids):
        raise ValueError("the same run is planned more than once")
    output_dir = Path(output_dir).resolve()  # workers see absolute paths, whatever their working directory
    output_dir.mkdir(parents=True, exist_ok=True)
    config_path = Path(config_path).resolve()
    env = run_env(threads_per_run(jobs))
    outcome = Outcome()
    todo: list[Run] = []
    for run in runs:
        (outcome.skipped if is_done(run, output_dir) else todo).append(run)

    bar = tqdm(
        total=len(runs),
        initial=len(outcome.skipped),
        unit="run",
        desc="sweep",
        file=sys.stderr,
        disable=quiet or not sys.stderr.isatty(),
        dynamic_ncols=True,
    )
    lines = not quiet and bool(bar.disable)

    def say(message: str, kind: str = "run") -> None:
        """``kind``: "run" (a finished run: only without a bar), "info" (unless quiet), "error" (always)."""
        if (kind == "run" and not lines) or (kind == "info" and quiet):
            return
        if bar.disable:
            print(message, file=sys.stderr, flush=True)
        else:
            bar.write(message, file=sys.stderr)

    if outcome.skipped:
        say(f"skipping {len(outcome.skipped)} run(s) that already have a {RESULT_FILE} in {output_dir}", "info")
    bar.set_postfix_str(outcome.counts())

    procs = _Processes()
    pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="sweep")
    futures: dict[Future, Run] = {}
    try:
        for run in todo:
            cmd = command(run, config_path, run.directory(output_dir), worker_cmd=worker_cmd, extra_args=extra_args)
            futures[pool.submit(_execute_one, run, output_dir, cmd, env, procs)] = run
        order = {future: i for i, future in enumerate(futures)}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in sorted(finished, key=order.__getitem__):
                run = futures[future]
                failure, seconds, result = future.result()
                k = outcome.total + 1
                if failure is None:
                    outcome.done.append(run)
                    score = ""
                    if result is not None:
                        value = result["val"][result["monitor"]]
                        score = f" {result['monitor']}={float('nan') if value is None else value:.4g}"
                    say(f"[{k}/{len(runs)}] done {run.run_id} in {seconds:.1f}s{score}")
                else:
                    outcome.failed.append(failure)
                    say(f"[{k}/{len(runs)}] FAILED {failure.describe()}", "error")
                bar.update(1)
                bar.set_postfix_str(outcome.counts())
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        procs.stop()
        raise
    finally:
        pool.shutdown(wait=True)
        bar.close()
    index = {run: i for i, run in enumerate(runs)}  # report in plan order, not completion order
    outcome.done.sort(key=index.__getitem__)
    outcome.failed.sort(key=lambda f: index[f.run])
    if not quiet:
        print(f"sweep: {outcome.counts()} ({len(runs)} runs, {jobs} at once)", file=sys.stderr, flush=True)
    if check:
        outcome.check()
    return outcome
