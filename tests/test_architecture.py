"""Structure rules from ARCHITECTURE.md, checked on the source: imports point down, one place solves, no module
imports another module's private names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# grain_lightning's layers, lowest first: a module may import (at run time) only from lower layers or from its
# own subpackage. Deprecated shims sit at the top.
GRAIN_LAYERS = [
    {"solver", "groups", "diagnostics", "files"},
    {"config"},
    {"policy", "reference"},
    {"functional", "ghost"},
    {"protocol"},
    {"mixin", "distributed"},  # distributed/: strategy, cross_rank, collectives, layout, faults (see below)
    {"demo", "text", "sweep"},
    {"cli", "engine", "ddp", "cross_rank", "__init__"},
]


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def runtime_imports(path: Path) -> list[ast.ImportFrom | ast.Import]:
    """Import statements executed at import time (not those under ``if TYPE_CHECKING:``)."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in skip]


def top(path: Path, package: str) -> str:
    rel = path.relative_to(ROOT / package)
    return rel.parts[0].removesuffix(".py")


def layer(name: str) -> int:
    return next(i for i, names in enumerate(GRAIN_LAYERS) if name in names)


@pytest.mark.parametrize("path", modules("grain_lightning"), ids=lambda p: str(p.relative_to(ROOT)))
def test_grain_imports_point_down(path):
    mine = top(path, "grain_lightning")
    for node in runtime_imports(path):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
        for name in names:
            parts = name.split(".")
            if parts[0] != "grain_lightning" or len(parts) < 2:
                continue
            other = parts[1]
            if other == mine:
                continue
            assert layer(other) < layer(mine), f"{path.name} ({mine}) imports {name}, not a lower layer"


def test_distributed_faults_imports_no_other_grain_module():
    """``distributed/faults.py`` (layer 5, inside ``distributed/``) is strategy-independent: any strategy may use it."""
    path = ROOT / "grain_lightning" / "distributed" / "faults.py"
    imported = [
        name
        for node in runtime_imports(path)
        for name in ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""])
    ]
    assert not [name for name in imported if name.startswith("grain_lightning")], imported


@pytest.mark.parametrize("package", ["grain_lightning", "lightfmp"])
def test_no_module_imports_private_names_of_another(package):
    offenders = []
    for path in modules(package):
        for node in runtime_imports(path):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(package):
                offenders += [
                    f"{path.relative_to(ROOT)}: {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
    assert not offenders, offenders


def test_only_the_step_policy_calls_the_solver():
    callers = []
    for path in modules("grain_lightning"):
        if path.name == "solver.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
                if name in ("solve_min_norm", "min_norm_weights"):
                    callers.append(str(path.relative_to(ROOT)))
    assert callers == ["grain_lightning/policy.py"], callers
