r"""The report of a sweep: ``runs.csv``, ``summary.csv``, ``summary.md`` and ``summary.png``.

**Learning-rate choice, on validation only.** For each method, the lr with the best mean over seeds of the
``monitor`` metric (``mode`` "max": highest; "min": lowest); a non-finite value or a failed run (its worker
exited with an error, e.g. a diverged loss under ``on_nonfinite="raise"``) counts as the worst possible, so an lr
where a run failed is chosen only if every lr has a failure. Runs not started yet are left out. Ties go to the
smaller lr. The test metric is then reported at that lr: test never chooses.

**Per method**, at its chosen lr, over the seeds with a finite test value ``x_1..x_n``: mean, std (ddof=1),
median, worst (min for "max", max for "min"), the percentile-bootstrap 95% CI of the mean (10,000 resamples of
``n`` seeds with replacement, fixed generator seed), the mean wall time per run, and the paired difference to
the baseline: ``d_s = x_s - b_s`` on the seeds ``s`` both have (each method at its own chosen lr), its mean and
bootstrap CI, and wins / ties / losses (``d_s`` better / equal / worse in the metric's direction). With one
value, std and CIs are NaN (empty in CSV, "n/a" in Markdown).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import pandas as pd

from grain_lightning.sweep.results import (
    FAILED_FILE,
    LOG_FILE,
    RESULT_FILE,
    atomic_write,
    atomic_write_text,
    read_result,
)
from grain_lightning.sweep.runner import Run, format_lr

__all__ = [
    "PairedDifference",
    "Report",
    "Results",
    "bootstrap_ci",
    "choose_lrs",
    "load_results",
    "lr_table",
    "paired_difference",
    "plot_summary",
    "summarize",
    "summary_markdown",
    "write_report",
]

PathLike = Union[str, Path]
RESAMPLES = 10_000
LEVEL = 0.95
BOOTSTRAP_SEED = 0
TIE_TOL = 1e-12


def _column(part: str, key: str) -> str:
    """The ``runs.csv`` column of metric ``key`` of ``part`` ("val" / "test"): prefixed if it is not already."""
    return key if key.startswith(f"{part}_") else f"{part}_{key}"


def _float(value: Any) -> float:
    return math.nan if value is None else float(value)


@dataclass
class Results:
    """The results of a sweep's planned runs.

    Attributes:
        runs: the planned runs (their order gives the methods' and lrs' order).
        table: one row per run with a result: seed, method, lr, val_* and test_* metrics, wall_s, steps.
        curves: one row per curve point: method, lr, seed and the point's fields (step, epoch, metrics).
        monitor, mode, test_metric: from the results (``None`` when there is none); ``monitor`` and
            ``test_metric`` are the ``table`` columns.
        output_dir: where the runs live.
    """

    runs: list[Run]
    table: pd.DataFrame
    curves: pd.DataFrame
    monitor: Optional[str]
    mode: Optional[str]
    test_metric: Optional[str]
    curve_monitor: Optional[str]
    output_dir: Path

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(r.method.name for r in self.runs))

    @property
    def lrs(self) -> list[float]:
        return sorted(set(r.lr for r in self.runs))

    def seeds(self, method: str, lr: float) -> list[int]:
        """Seeds planned for ``method`` at ``lr``."""
        return [r.seed for r in self.runs if r.method.name == method and r.lr == lr]

    def values(self, method: str, lr: float, column: str) -> pd.Series:
        """``column`` of the runs of ``method`` at ``lr``, by seed (all values, non-finite included)."""
        t = self.table
        if t.empty or column not in t:
            return pd.Series(dtype=float)
        rows = t[(t["method"] == method) & (t["lr"] == lr)]
        return rows.set_index("seed")[column].astype(float).sort_index()

    @property
    def better(self) -> str:
        return "higher" if self.mode == "max" else "lower"


def load_results(output_dir: PathLike, runs: Sequence[Run]) -> Results:
    """Read the valid ``result.json`` of each planned run (runs without one are left out of ``table``).

    Raises ``ValueError`` if the results disagree on ``monitor``, ``mode`` or ``test_metric``.
    """
    out = Path(output_dir)
    rows, points, meta = [], [], {}
    for run in runs:
        result = read_result(run.directory(out) / RESULT_FILE, run.seed, run.lr)
        if result is None:
            continue
        meta[run.run_id] = (result["monitor"], result["mode"], result["test_metric"])
        row: dict[str, Any] = {"seed": run.seed, "method": run.method.name, "lr": run.lr}
        for part in ("val", "test"):
            row.update({_column(part, k): _float(v) for k, v in result[part].items()})
        row["wall_s"] = _float(result.get("wall_s"))
        row["steps"] = _float(result.get("steps"))
        rows.append(row)
        for point in result.get("curve") or []:
            if isinstance(point, dict):
                points.append({"method": run.method.name, "lr": run.lr, "seed": run.seed, **point})
    kinds = set(meta.values())
    if len(kinds) > 1:
        examples = {kind: next(rid for rid, k in meta.items() if k == kind) for kind in kinds}
        listed = "; ".join(f"{rid}: monitor/mode/test_metric = {kind}" for kind, rid in examples.items())
        raise ValueError(f"the runs disagree on what they measure: {listed}")
    monitor = mode = test_metric = None
    if kinds:
        monitor, mode, test_metric = kinds.pop()
    table = pd.DataFrame(rows, columns=None if rows else ["seed", "method", "lr", "wall_s", "steps"])
    if rows:
        metrics = sorted(c for c in table.columns if c.startswith("val_")) + sorted(
            c for c in table.columns if c.startswith("test_")
        )
        table = table[["seed", "method", "lr", *metrics, "wall_s", "steps"]]
        order = {name: i for i, name in enumerate(dict.fromkeys(r.method.name for r in runs))}
        table = table.sort_values(["method", "lr", "seed"], key=lambda c: c.map(order) if c.name == "method" else c)
        table = table.reset_index(drop=True)
    return Results(
        list(runs),
        table,
        pd.DataFrame(points),
        None if monitor is None else _column("val", monitor),
        mode,
        None if test_metric is None else _column("test", test_metric),
        monitor,
        out,
    )


def _failed_seeds(results: Results, method: str, lr: float) -> list[int]:
    """Seeds of ``method`` at ``lr`` whose run failed (``failed.txt``, no result)."""
    return [
        r.seed
        for r in results.runs
        if r.method.name == method and r.lr == lr and (r.directory(results.output_dir) / FAILED_FILE).is_file()
    ]


def _lr_scores(results: Results, method: str) -> pd.Series:
    """Per planned lr of ``method`` with a result or a failure: the mean monitor over seeds, a non-finite value
    or a failed run counted as worst."""
    worst = -math.inf if results.mode == "max" else math.inf
    scores = {}
    for lr in results.lrs:
        values = results.values(method, lr, results.monitor or "")
        failed = [s for s in _failed_seeds(results, method, lr) if s not in values.index]
        values = pd.concat([values, pd.Series(worst, index=failed, dtype=float)]) if failed else values
        if len(values):
            scores[lr] = float(values.where(np.isfinite(values), worst).mean())
    return pd.Series(scores, dtype=float)


def choose_lrs(results: Results) -> dict[str, float]:
    """Each method's lr: best mean validation ``monitor`` over seeds (see the module docstring). Methods with
    no result are left out."""
    chosen = {}
    for method in results.methods:
        scores = _lr_scores(results, method)  # index sorted: ties go to the smaller lr
        if len(scores):
            chosen[method] = float(scores.idxmax() if results.mode == "max" else scores.idxmin())
    return chosen


def bootstrap_ci(
    values: Union[Sequence[float], np.ndarray, pd.Series],
    *,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, float]:
    """Percentile-bootstrap CI of the mean of the finite ``values`` (NaN, NaN with fewer than two)."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if x.size < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    low, high = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


@dataclass(frozen=True)
class PairedDifference:
    """``d_s = method_s - baseline_s`` over the common seeds: count, mean, bootstrap CI, wins/ties/losses."""

    n: int
    mean: float
    ci_low: float
    ci_high: float
    wins: int
    ties: int
    losses: int


def paired_difference(method: pd.Series, baseline: pd.Series, mode: str) -> PairedDifference:
    """Pair ``method`` and ``baseline`` (values by seed) on the seeds where both are finite."""
    m, b = method[np.isfinite(method)], baseline[np.isfinite(baseline)]
    common = m.index.intersection(b.index).sort_values()
    d = (m.loc[common] - b.loc[common]).to_numpy(dtype=float)
    ties = np.abs(d) <= TIE_TOL
    wins = ~ties & ((d > 0) if mode == "max" else (d < 0))
    low, high = bootstrap_ci(d)
    mean = float(d.mean()) if d.size else math.nan
    return PairedDifference(int(d.size), mean, low, high, int(wins.sum()), int(ties.sum()), int((~ties & ~wins).sum()))


def _no_result_note(results: Results, method: str) -> str:
    runs = [r for r in results.runs if r.method.name == method]
    tried = any((r.directory(results.output_dir) / LOG_FILE).exists() for r in runs)
    return "all runs failed" if tried else "no results (not run)"


def summarize(
    results: Results, baseline: Optional[str] = None, chosen: Optional[dict[str, float]] = None
) -> pd.DataFrame:
    """One row per method (at its chosen lr): the statistics of the module docstring and a note."""
    chosen = choose_lrs(results) if chosen is None else chosen
    test = results.test_metric or ""
    lrs = results.lrs
    base = results.values(baseline, chosen[baseline], test) if baseline in chosen else None
    rows = []
    for method in results.methods:
        row: dict[str, Any] = {"method": method, "lr": chosen.get(method, math.nan)}
        notes = []
        if method not in chosen:
            row["n"] = 0
            notes.append(_no_result_note(results, method))
            values = pd.Series(dtype=float)
        else:
            lr = chosen[method]
            all_values = results.values(method, lr, test)
            values = all_values[np.isfinite(all_values)]
            row["n"] = len(values)
            missing = len(results.seeds(method, lr)) - len(all_values)
            if missing:
                notes.append(f"{missing} of {len(results.seeds(method, lr))} seeds failed at this lr")
            if len(all_values) > len(values):
                notes.append(f"{len(all_values) - len(values)} non-finite test values left out")
            if len(lrs) > 1 and lr in (lrs[0], lrs[-1]):
                notes.append("lr at the edge of the grid")
        x = values.to_numpy(dtype=float)
        row["mean"] = float(x.mean()) if x.size else math.nan
        row["std"] = float(x.std(ddof=1)) if x.size > 1 else math.nan
        row["median"] = float(np.median(x)) if x.size else math.nan
        row["worst"] = float(x.min() if results.mode == "max" else x.max()) if x.size else math.nan
        row["ci_low"], row["ci_high"] = bootstrap_ci(x)
        wall = results.values(method, chosen[method], "wall_s") if method in chosen else pd.Series(dtype=float)
        row["wall_s"] = float(wall.mean()) if wall.notna().any() else math.nan
        diff = None
        if method == baseline:
            notes.insert(0, "baseline")
        elif base is None:
            if baseline is not None:
                notes.append("baseline has no results")
        elif method in chosen:
            diff = paired_difference(values, base, results.mode or "max")
        row["diff_mean"] = diff.mean if diff else math.nan
        row["diff_ci_low"] = diff.ci_low if diff else math.nan
        row["diff_ci_high"] = diff.ci_high if diff else math.nan
        row["n_paired"], row["wins"], row["ties"], row["losses"] = (
            (diff.n, diff.wins, diff.ties, diff.losses) if diff else (pd.NA,) * 4
        )
        row["note"] = "; ".join(notes)
        rows.append(row)
    frame = pd.DataFrame(rows)
    for key in ("n_paired", "wins", "ties", "losses"):
        frame[key] = frame[key].astype("Int64")
    return frame


def lr_table(results: Results, chosen: Optional[dict[str, float]] = None) -> pd.DataFrame:
    """Every method x every lr: results, val monitor mean (as used for the choice), test mean and std."""
    chosen = choose_lrs(results) if chosen is None else chosen
    rows = []
    for method in results.methods:
        scores = _lr_scores(results, method)
        for lr in results.lrs:
            test = results.values(method, lr, results.test_metric or "")
            finite = test[np.isfinite(test)]
            rows.append(
                {
                    "method": method,
                    "lr": lr,
                    "chosen": chosen.get(method) == lr,
                    "planned": len(results.seeds(method, lr)),
                    "n": len(test),
                    "val_mean": scores.get(lr, math.nan),
                    "test_mean": float(finite.mean()) if len(finite) else math.nan,
                    "test_std": float(finite.std(ddof=1)) if len(finite) > 1 else math.nan,
                }
            )
    return pd.DataFrame(rows)


def _fmt(value: Any, sign: bool = False) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:+.4g}" if sign else f"{value:.4g}"
    return str(value)


def _ci(low: float, high: float) -> str:
    return "n/a" if math.isnan(low) or math.isnan(high) else f"[{low:.4g}, {high:.4g}]"


def summary_markdown(results: Results, summary: pd.DataFrame, lrs: pd.DataFrame, baseline: Optional[str]) -> str:
    """``summary.md``: the per-method table and the method x lr table."""
    if results.monitor is None:
        lines = ["# GRAIN sweep: no results", "", "No run produced a valid result.json.", ""]
        lines += [f"- {row.method}: {row.note}" for row in summary.itertuples()]
        return "\n".join(lines) + "\n"
    metric, monitor, better = results.test_metric, results.monitor, results.better
    lines = [
        f"# GRAIN sweep: {metric} ({better} is better)",
        "",
        f"Learning rate chosen per method on validation only: the best mean `{monitor}` over seeds ({better} is "
        f"better); `{metric}` is reported at that lr. 95% CI: percentile bootstrap of the mean ({RESAMPLES:,} "
        "resamples).",
    ]
    if baseline is not None:
        lines.append(
            f"Δ = method − {baseline} (baseline) on the seeds both have, each at its own chosen lr; "
            f"W/T/L = seeds where the method is better / equal / worse than {baseline}."
        )
    lines += [
        "",
        "| method | lr | n | mean | std | median | worst | 95% CI | wall s/run | Δ mean | Δ 95% CI | W/T/L | note |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- | --- | --- |",
    ]
    for r in summary.itertuples():
        lr = "n/a" if math.isnan(r.lr) else format_lr(r.lr)
        wtl = "n/a" if r.wins is pd.NA else f"{r.wins}/{r.ties}/{r.losses}"
        paired = "" if r.n_paired is pd.NA else f" (n={r.n_paired})"
        is_base = r.method == baseline
        cells = [
            r.method,
            lr,
            str(r.n),
            _fmt(r.mean),
            _fmt(r.std),
            _fmt(r.median),
            _fmt(r.worst),
            _ci(r.ci_low, r.ci_high),
            _fmt(r.wall_s),
            "—" if is_base else _fmt(r.diff_mean, sign=True),
            "—" if is_base else _ci(r.diff_ci_low, r.diff_ci_high),
            "—" if is_base else wtl + paired,
            r.note,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"## {metric} at every learning rate (** = chosen on `{monitor}`)",
        "",
        f"| method | lr | runs | {monitor} mean | {metric} mean ± std |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for r in lrs.itertuples():
        lr = f"**{format_lr(r.lr)}**" if r.chosen else format_lr(r.lr)
        test = "n/a" if math.isnan(r.test_mean) else f"{r.test_mean:.4g} ± {_fmt(r.test_std)}"
        lines.append(f"| {r.method} | {lr} | {r.n}/{r.planned} | {_fmt(r.val_mean)} | {test} |")
    return "\n".join(lines) + "\n"


def plot_summary(results: Results, chosen: dict[str, float], path: PathLike) -> None:
    """``summary.png``: the test metric at the chosen lr per method (box plot and one dot per seed), and the
    learning curves (mean over seeds of the monitored val metric vs step) at the chosen lrs."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 5), layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    methods = results.methods
    if results.monitor is None:
        for ax in (left, right):
            ax.text(0.5, 0.5, "no results", ha="center", va="center", transform=ax.transAxes)
    else:
        rng = np.random.default_rng(0)
        data = []
        for i, method in enumerate(methods):
            values = results.values(method, chosen[method], results.test_metric or "") if method in chosen else None
            x = np.array([]) if values is None else values[np.isfinite(values)].to_numpy(dtype=float)
            if x.size:
                data.append((i, x))
                left.scatter(i + rng.uniform(-0.12, 0.12, x.size), x, s=16, alpha=0.8, zorder=3, color=f"C{i % 10}")
        if data:
            left.boxplot(
                [x for _, x in data],
                positions=[i for i, _ in data],
                widths=0.5,
                showfliers=False,
                medianprops={"color": "black"},
            )
        labels = [f"{m}\nlr={format_lr(chosen[m])}" if m in chosen else f"{m}\n(no results)" for m in methods]
        left.set_xticks(range(len(methods)), labels, rotation=30, ha="right", fontsize=8)
        left.set_xlim(-0.6, len(methods) - 0.4)
        left.set_ylabel(f"{results.test_metric} ({results.better} is better)")
        left.set_title("test at the lr chosen on validation (one dot per seed)")
        left.grid(axis="y", alpha=0.3)

        curves, key = results.curves, results.curve_monitor
        drawn = False
        if not curves.empty and key in curves and "step" in curves:
            for i, method in enumerate(methods):
                rows = curves[(curves["method"] == method) & (curves["lr"] == chosen.get(method, math.nan))]
                rows = rows[["step", key]].apply(pd.to_numeric, errors="coerce").dropna()
                if not rows.empty:
                    mean = rows.groupby("step")[key].mean()
                    right.plot(
                        mean.index,
                        mean.to_numpy(),
                        marker="o" if len(mean) < 20 else None,
                        ms=3,
                        label=method,
                        color=f"C{i % 10}",
                    )
                    drawn = True
        if drawn:
            right.legend(fontsize=8)
            right.set_xlabel("step")
            right.set_ylabel(f"{key} (mean over seeds)")
            right.set_title("validation curves at the chosen lr")
            right.grid(alpha=0.3)
        else:
            right.text(0.5, 0.5, "no learning curves", ha="center", va="center", transform=right.transAxes)
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=120))


@dataclass(frozen=True)
class Report:
    """The written files and the Markdown summary."""

    runs_csv: Path
    summary_csv: Path
    summary_md: Path
    summary_png: Optional[Path]
    markdown: str
    summary: pd.DataFrame

    @property
    def paths(self) -> list[Path]:
        return [p for p in (self.runs_csv, self.summary_csv, self.summary_md, self.summary_png) if p is not None]


def write_report(output_dir: PathLike, runs: Sequence[Run], baseline: Optional[str] = "mean") -> Report:
    """Read the planned ``runs``' results in ``output_dir`` and write the four report files there. The figure is
    left out (``summary_png`` is ``None``) when matplotlib is not installed."""
    out = Path(output_dir)
    if baseline is not None and baseline not in {r.method.name for r in runs}:
        raise ValueError(f"baseline {baseline!r} is not among the methods of the sweep")
    results = load_results(out, runs)
    chosen = choose_lrs(results)
    summary = summarize(results, baseline, chosen)
    markdown = summary_markdown(results, summary, lr_table(results, chosen), baseline)
    paths = {name: out / name for name in ("runs.csv", "summary.csv", "summary.md", "summary.png")}
    atomic_write_text(paths["runs.csv"], results.table.to_csv(index=False))
    atomic_write_text(paths["summary.csv"], summary.to_csv(index=False))
    atomic_write_text(paths["summary.md"], markdown)
    png: Optional[Path] = paths["summary.png"]
    try:
        plot_summary(results, chosen, paths["summary.png"])
    except ImportError:
        png = None
    return Report(paths["runs.csv"], paths["summary.csv"], paths["summary.md"], png, markdown, summary)
