"""Two runs started at once on the same output folder: one refuses with a clear message, the other completes."""
from __future__ import annotations

import json
import multiprocessing as mp
import sys
import textwrap

import numpy as np
import pytest

from fer_lib import landmarks as L
from fer_lib.models import load_checkpoint

from .conftest import REPO, Child, train_cli
from .test_landmark_cache import CountingDetector


@pytest.mark.slow
def test_two_trainings_on_one_out_dir_one_refuses_the_other_completes(tmp_path, synthetic_root):
    out = tmp_path / "run"
    cmd = train_cli(out, synthetic_root, epochs=3)
    children = [Child(cmd), Child(cmd)]
    finished = [c.finish() for c in children]
    codes = sorted(rc for rc, _, _ in finished)
    assert codes == [0, 2], [f[2][-1500:] for f in finished]
    loser = next(f for f in finished if f[0] == 2)
    assert "in use by another run" in loser[2] and "choose another out_dir" in loser[2]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["best_epoch"] in (1, 2, 3) and len(json.loads((out / "history.json").read_text())) == 3
    for name in ("best.pt", "last.pt"):
        load_checkpoint(out / "checkpoints" / name)
    assert not (out / ".lock").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.pt", "last.pt"]


@pytest.mark.slow
def test_two_pipelines_on_one_results_folder_one_refuses_the_other_completes(tmp_path):
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell("x = 1\nseed = 0\noutput_dir = '.'\n")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(
        "import json, pathlib, time\ntime.sleep(3)\n"
        "pathlib.Path(output_dir, 'metrics.json').write_text(json.dumps({'x': x}))")]
    nbformat.write(nb, tmp_path / "nb.ipynb")
    exp = tmp_path / "exp.toml"
    exp.write_text(textwrap.dedent(f"""
        [experiment]
        name = "race"
        [[stage]]
        name = "s"
        notebook = "{tmp_path / 'nb.ipynb'}"
        grid = {{ x = [1, 2] }}
    """))
    cmd = [sys.executable, "-m", "fer_lib.workflow.pipeline", str(exp), "--results", str(tmp_path / "res"), "--no-render"]
    children = [Child(cmd), Child(cmd)]
    finished = [c.finish() for c in children]
    assert sorted(rc for rc, _, _ in finished) == [0, 3], [f[1][-1500:] + f[2][-1500:] for f in finished]
    loser = next(f for f in finished if f[0] == 3)
    assert "in use by another pipeline" in loser[2] and "--results" in loser[2]
    runs = sorted((tmp_path / "res" / "race" / "s").glob("*/run.json"))
    assert [json.loads(p.read_text())["status"] for p in runs] == ["ok", "ok"]
    assert sorted(json.loads((p.parent / "metrics.json").read_text())["x"] for p in runs) == [1, 2]
    assert json.loads((tmp_path / "res" / "race" / "summary.json").read_text())["counts"]["ok"] == 2


def _detect_into(cache_dir: str, seed: int) -> dict:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (24, 24, 3), dtype=np.uint8) for _ in range(40)]
    order = np.random.default_rng(seed).permutation(len(images))
    batch = L.detect_landmarks([images[i] for i in order], CountingDetector(), cache_dir, progress=False)
    return batch.stats


def test_two_processes_filling_one_landmark_cache_leave_only_valid_entries(tmp_path):
    ctx = mp.get_context("spawn")
    with ctx.Pool(2) as pool:
        stats = pool.starmap(_detect_into, [(str(tmp_path), 1), (str(tmp_path), 2)])
    assert all(s["total"] == 40 and s["corrupt_cache_entries_rebuilt"] == 0 for s in stats)
    cache = L.LandmarkCache(tmp_path)
    entries = [p for p in tmp_path.rglob("*.npz")]
    assert len(entries) == 40 and not list(tmp_path.rglob("*.tmp"))
    assert all(cache.get(p.stem) is not None for p in entries) and cache.corrupt_entries == 0


HOLD_PIPELINE_LOCK = textwrap.dedent("""
    import sys, time
    from fer_lib.workflow.pipeline import experiment_lock
    with experiment_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(300)
""")


def test_a_killed_pipeline_does_not_leave_its_results_folder_locked(tmp_path):
    from fer_lib.workflow import pipeline

    holder = Child([sys.executable, "-c", HOLD_PIPELINE_LOCK, str(tmp_path)])
    assert holder.wait_for(lambda: b"locked" in holder.out, timeout=120)
    with pytest.raises(pipeline.PipelineBusy, match="in use by another pipeline"):
        with pipeline.experiment_lock(tmp_path):
            pass
    holder.proc.kill()
    holder.finish()
    with pipeline.experiment_lock(tmp_path):  # the kernel released the dead holder's lock
        pass
