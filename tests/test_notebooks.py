"""Notebooks are stored clean (no outputs, a `parameters` cell) and run under papermill."""
from __future__ import annotations

import json

import nbformat
import pytest

from conftest import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_clean_with_parameters(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert not any(c.get("outputs") for c in code), "store notebooks without outputs"
    assert not any(c.get("execution_count") for c in code)
    assert any("parameters" in c.metadata.get("tags", []) for c in code), "needs a cell tagged parameters"
    assert nb.metadata["kernelspec"]["language"] == "python"
    assert nb.metadata["language_info"]["name"] == "python"


def run_notebook(name: str, tmp_path, **params):
    """Execute notebooks/<name> with papermill (cwd notebooks/) and return the executed copy."""
    import papermill as pm

    out = tmp_path / name
    pm.execute_notebook(
        str(REPO / "notebooks" / name), str(out), parameters=params, kernel_name="python3",
        language="python", cwd=str(REPO / "notebooks"), progress_bar=False,
    )
    return nbformat.read(out, as_version=4)


@pytest.mark.slow
def test_notebook01_smoke(tmp_path):
    out_dir = tmp_path / "out"
    nb = run_notebook("01_au_heatmaps.ipynb", tmp_path, expression="happiness", size=64,
                      output_dir=str(out_dir))
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["n_landmarks"] == 478
    assert metrics["expressions"]["happiness"]["aus"] == [6, 12, 25]
    assert metrics["run"]["config"]["size"] == 64
    for figure in ("landmarks.png", "au_maps_happiness.png", "expression_heatmaps.png"):
        assert (out_dir / figure).stat().st_size > 1000
