"""``grain sweep``: train every (seed, method, learning rate) as a ``grain fit`` subprocess, choose each
method's learning rate on validation only, and compare the methods' test metric with a baseline (mean, spread,
worst seed, bootstrap CIs, paired-by-seed differences).

Modules: ``methods`` (the named methods and their overrides), ``results`` (the ``result.json`` contract, atomic
writes), ``runner`` (plan and execute runs, resumable), ``settings`` (``sweep.json``), ``report`` (CSV,
Markdown, figure), ``cli`` (``main``). Imports point down in that order; nothing here imports the rest of
``grain_lightning`` (a run is a subprocess).
"""

from grain_lightning.sweep.cli import main
from grain_lightning.sweep.methods import BUILTIN_METHODS, Method, parse_methods
from grain_lightning.sweep.report import Report, bootstrap_ci, choose_lrs, load_results, write_report
from grain_lightning.sweep.runner import Outcome, Run, SweepFailed, command, execute, plan_runs
from grain_lightning.sweep.settings import SettingsMismatch, SweepSettings, record_settings

__all__ = [
    "BUILTIN_METHODS",
    "Method",
    "Outcome",
    "Report",
    "Run",
    "SettingsMismatch",
    "SweepFailed",
    "SweepSettings",
    "bootstrap_ci",
    "choose_lrs",
    "command",
    "execute",
    "load_results",
    "main",
    "parse_methods",
    "plan_runs",
    "record_settings",
    "write_report",
]
