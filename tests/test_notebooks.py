"""Execute the code cells of every notebook in ``notebooks/`` (no Jupyter needed), in a fresh namespace."""

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GRAIN_NOTEBOOK_SMOKE", "1")  # notebooks with a tiny setting use it
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    assert cells, f"{path} has no code cells"
    namespace: dict = {"__name__": "__main__"}
    for i, cell in enumerate(cells):
        exec(compile("".join(cell["source"]), f"{path.name}[cell {i}]", "exec"), namespace)


def test_there_is_a_lightfmp_notebook():
    assert any("lightfmp" in p.stem for p in NOTEBOOKS)


def test_there_is_a_grain_notebook():
    assert any("grain" in p.stem for p in NOTEBOOKS)
