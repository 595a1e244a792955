"""``grain sweep``: plan -> execute -> report, or ``--report_only`` to rebuild the report from existing results.

    grain sweep --config CFG.yaml --seeds 10 --methods mean,grain-sample,grain-chunks4 --lrs 1e-5,3e-5 \\
        --jobs 2 --output_dir OUT [--baseline mean] [--quiet] [--force] [-- extra args for every run]
    grain sweep --report_only --output_dir OUT [--baseline mean]

Exit status: 0 when every run has a result, 1 when some failed (the report is still written from the others),
2 for invalid arguments or a sweep recorded with different settings in ``OUTPUT_DIR``, 130 when interrupted
(SIGTERM and Ctrl-C stop the running workers and start no more; the same command resumes).
"""

from __future__ import annotations

import argparse
import math
import shlex
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

from grain_lightning.sweep.methods import BASELINE, BUILTIN_METHODS, parse_methods
from grain_lightning.sweep.report import Report, write_report
from grain_lightning.sweep.runner import DEFAULT_WORKER, default_jobs, discard_results, execute, plan_runs, seed_list
from grain_lightning.sweep.settings import SweepSettings, load_settings, record_settings

__all__ = ["build_parser", "main", "parse_lrs", "parse_seeds"]


def parse_seeds(text: str) -> Union[int, list[int]]:
    """``"10"`` -> 10 (seeds 0..9); ``"0,1,2"`` or ``"7,"`` -> that list."""
    text = text.strip()
    try:
        if "," not in text:
            return int(text)
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds takes a count (10) or a list (0,1,2), got {text!r}") from None


def parse_lrs(text: str) -> list[float]:
    """``"1e-5,3e-5"`` -> ``[1e-05, 3e-05]`` (each positive and finite)."""
    try:
        lrs = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--lrs takes comma-separated numbers (1e-5,3e-5), got {text!r}") from None
    if not lrs:
        raise ValueError("--lrs is empty")
    bad = [lr for lr in lrs if not (math.isfinite(lr) and lr > 0)]
    if bad:
        raise ValueError(f"learning rates must be positive and finite, got {', '.join(map(str, bad))}")
    return lrs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="grain sweep",
        description="Train every (seed, method, learning rate) with `grain fit`, choose each method's learning rate "
        "on validation, and compare the methods' test metric with the baseline. Arguments after `--` are passed "
        "to every run.",
        epilog="methods: " + ", ".join(BUILTIN_METHODS) + ", or a custom 'name=--opt value ...'",
    )
    p.add_argument("--config", type=Path, help="the `grain fit` config file (YAML)")
    p.add_argument("--seeds", default="3", help="a number of seeds (10: seeds 0..9) or a list (0,1,2); default 3")
    p.add_argument("--methods", help="comma-separated methods, e.g. mean,grain-sample,grain-chunks4")
    p.add_argument("--lrs", help="comma-separated learning rates, e.g. 1e-5,3e-5")
    p.add_argument("--jobs", type=int, default=None, help=f"runs at once (default: cores // 2 = {default_jobs()})")
    p.add_argument("--output_dir", type=Path, required=True, help="where runs and the report go")
    p.add_argument("--baseline", default=None, help=f"the method the others are compared with (default {BASELINE})")
    p.add_argument("--quiet", action="store_true", help="no progress output (failures are still reported)")
    p.add_argument(
        "--force",
        action="store_true",
        help="run in OUTPUT_DIR even if its sweep.json records other settings: they are replaced and the "
        "runs already there are discarded (changing only --seeds or --baseline never needs it)",
    )
    p.add_argument("--report_only", action="store_true", help="only rebuild the report from OUTPUT_DIR's results")
    p.add_argument(
        "--worker_cmd",
        default=None,
        help="the command that trains one run (default: python -m grain_lightning.cli fit)",
    )
    return p


def _print_report(report: Report) -> None:
    print(report.markdown)
    print("report files:")
    for path in report.paths:
        print(f"  {path}")


def _report_only(args: argparse.Namespace) -> int:
    given = [f"--{k}" for k in ("config", "methods", "lrs", "jobs", "worker_cmd") if getattr(args, k) is not None]
    if given:
        raise ValueError(f"--report_only rebuilds the report from OUTPUT_DIR's sweep.json; drop {', '.join(given)}")
    settings = load_settings(args.output_dir)
    runs = plan_runs(list(settings.seeds), settings.methods, settings.lrs)
    _print_report(write_report(args.output_dir, runs, args.baseline or settings.baseline))
    return 0


def _run(args: argparse.Namespace, extra: list[str], worker_cmd: Optional[Sequence[str]]) -> int:
    if args.config is None:
        raise ValueError("--config is required (or --report_only)")
    if not args.config.is_file():
        raise ValueError(f"config file {args.config} not found")
    if not args.methods:
        raise ValueError("--methods is required, e.g. --methods mean,grain-sample")
    if not args.lrs:
        raise ValueError("--lrs is required, e.g. --lrs 1e-5,3e-5")
    if args.jobs is not None and args.jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {args.jobs}")
    baseline = args.baseline or BASELINE
    methods = parse_methods(args.methods, baseline=baseline)
    seeds = seed_list(parse_seeds(args.seeds))
    lrs = parse_lrs(args.lrs)
    runs = plan_runs(seeds, methods, lrs)
    if worker_cmd is None:
        worker_cmd = shlex.split(args.worker_cmd) if args.worker_cmd else DEFAULT_WORKER
    if not worker_cmd:
        raise ValueError("--worker_cmd is empty")
    changed = record_settings(
        args.output_dir, SweepSettings.create(args.config, methods, lrs, seeds, extra, baseline), args.force
    )
    if changed:  # --force with other settings: results of the old settings must not be reported as new ones
        gone = discard_results(args.output_dir)
        print(f"grain sweep: --force: settings changed ({'; '.join(changed)}); {gone} earlier run(s) discarded",
              file=sys.stderr)  # fmt: skip
    if not args.quiet:
        print(
            f"grain sweep: {len(runs)} runs ({len(seeds)} seeds x {len(methods)} methods x {len(lrs)} lrs) "
            f"in {args.output_dir}",
            file=sys.stderr,
        )
    outcome = execute(
        runs,
        args.output_dir,
        config_path=args.config,
        jobs=args.jobs,
        worker_cmd=worker_cmd,
        extra_args=extra,
        quiet=args.quiet,
        check=False,
    )
    _print_report(write_report(args.output_dir, runs, baseline))
    if outcome.failed:
        print(f"\ngrain sweep: {len(outcome.failed)} of {len(runs)} run(s) failed:", file=sys.stderr)
        for failure in outcome.failed:
            print("  " + failure.describe().splitlines()[0], file=sys.stderr)
        print("Run the same command again to retry them (runs with a result are skipped).", file=sys.stderr)
        return 1
    return 0


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Optional[Sequence[str]] = None, *, worker_cmd: Optional[Sequence[str]] = None) -> int:
    """``grain sweep`` (``argv`` without the program name; arguments after ``--`` go to every run).
    ``worker_cmd`` overrides the training command (as ``--worker_cmd`` does). Returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.output_dir.exists() and not args.output_dir.is_dir():
        parser.error(f"--output_dir {args.output_dir} is a file")
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM)
    if on_main_thread:  # SIGTERM unwinds like Ctrl-C: running workers are stopped, none is started
        signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        return _report_only(args) if args.report_only else _run(args, extra, worker_cmd)
    except (ValueError, FileNotFoundError, NotADirectoryError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{parser.prog}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
