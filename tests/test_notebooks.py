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


def _errors(nb) -> list:
    return [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]


@pytest.mark.slow
def test_notebook04_smoke_trains_a_tiny_pair_and_compares(tmp_path):
    out_dir = tmp_path / "out"
    nb = run_notebook("04_cam_interpretability.ipynb", tmp_path, epochs=1, n_per_class=8, n_samples=24,
                      faithfulness_samples=4, cam_methods="cam,gradcam,eigencam", output_dir=str(out_dir))
    assert not _errors(nb)
    metrics = json.loads((out_dir / "metrics.json").read_text())
    for model in ("baseline", "guided"):
        assert set(metrics[model]["cam_cos_by_method"]) == {"cam", "gradcam", "eigencam"}
        assert 0 <= metrics[model]["att_cos_mean"] <= 1


@pytest.mark.slow
def test_notebook06_smoke_lnlattennet_vs_plain(tmp_path):
    out_dir = tmp_path / "out"
    nb = run_notebook("06_local_nonlocal.ipynb", tmp_path, image_size=64, n_per_class=10, epochs=1,
                      output_dir=str(out_dir))
    assert not _errors(nb)
    assert json.loads((out_dir / "metrics.json").read_text())["run"]["git_revision"]


@pytest.mark.slow
def test_notebook09_smoke_explanations(tmp_path):
    out_dir = tmp_path / "out"
    nb = run_notebook("09_au_explanations.ipynb", tmp_path, n_samples=6, fer2013_root="none",
                      output_dir=str(out_dir))
    assert not _errors(nb)
    assert json.loads((out_dir / "metrics.json").read_text())["run"]["git_revision"]
