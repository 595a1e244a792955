"""The README's Python examples run as written."""

from __future__ import annotations

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {"__name__": "__readme__"})


def _table_test_names() -> list[str]:
    """The test names in the last column of README's "What happens when..." tables (``...[case]`` shorthand and
    parameter ids dropped)."""
    names = []
    for line in README.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[2].startswith("`") and ("test_" in cells[2] or "..." in cells[2]):
            for name in re.findall(r"`(test_[A-Za-z0-9_]+)", cells[2]):
                names.append(name)
    return names


def test_what_happens_when_tables_name_tests_that_exist():
    """Every test the fault tables cite is a test function in tests/ (the table stays true when tests move)."""
    names = _table_test_names()
    assert len(names) >= 15
    sources = "\n".join(p.read_text() for p in README.parent.joinpath("tests").rglob("test_*.py"))
    missing = [n for n in names if not re.search(rf"^def {n}\(", sources, flags=re.M)]
    assert not missing, f"README cites tests that do not exist: {missing}"
