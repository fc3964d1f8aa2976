"""Pipeline faults: a notebook that raises, hangs past its timeout, loses its kernel or its worker is recorded
as failed with its evidence kept; the other runs of the sweep complete; the exit status says it failed."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import nbformat
import pytest

from fer_lib.utils import REPO_ROOT

from .conftest import subprocess_env


def make_notebook(path: Path, parameters: str, body: str) -> Path:
    """A tiny notebook: a `parameters` cell, then `body`."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    params = nbformat.v4.new_code_cell(parameters)
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(textwrap.dedent(body))]
    nbformat.write(nb, path)
    return path

BODY = """
import json, os, pathlib, signal, time
print("started", mode, flush=True)
if mode == "raise":
    raise RuntimeError("deliberate failure in the notebook")
if mode == "hang":
    time.sleep(300)
if mode == "killkernel":
    os.kill(os.getpid(), signal.SIGKILL)
if mode == "killworker":
    os.kill(os.getppid(), signal.SIGKILL)   # the kernel's parent: the pipeline worker process
    time.sleep(30)
pathlib.Path(output_dir, "metrics.json").write_text(json.dumps({"mode": mode, "seed": seed}))
"""
MODES = ("ok", "raise", "hang", "killkernel", "killworker")


@pytest.mark.slow
def test_failing_hanging_and_dying_notebooks_are_recorded_and_the_sweep_goes_on(tmp_path):
    nb = make_notebook(tmp_path / "faulty.ipynb", "mode = 'ok'\nseed = 0\noutput_dir = '.'\n", BODY)
    exp = tmp_path / "exp.toml"
    exp.write_text(textwrap.dedent(f"""
        [experiment]
        name = "faults"
        [[stage]]
        name = "nb"
        notebook = "{nb}"
        timeout_s = 10
        grid = {{ mode = {json.dumps(list(MODES))} }}
        [[stage]]
        name = "after"
        notebook = "{nb}"
        parameters = {{ mode = "ok" }}
    """))
    proc = subprocess.run([sys.executable, "-m", "fer_lib.workflow.pipeline", str(exp), "--results", str(tmp_path / "res"),
                           "--jobs", "2", "--no-render"], capture_output=True, text=True, cwd=REPO_ROOT,
                          env=subprocess_env(), timeout=600)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    exp_dir = tmp_path / "res" / "faults"
    summary = json.loads((exp_dir / "summary.json").read_text())
    status = {r["run_id"].split("-")[0]: r for r in summary["runs"] if r["stage"] == "nb"}
    assert {k: v["status"] for k, v in status.items()} == {
        "mode=ok": "ok", "mode=raise": "failed", "mode=hang": "failed", "mode=killkernel": "failed",
        "mode=killworker": "failed"}
    assert summary["counts"] == {"ok": 2, "skipped": 0, "failed": 4, "blocked": 0}  # the later stage still ran
    markers = {k: json.loads((Path(v["run_dir"]) / "run.json").read_text()) for k, v in status.items()}
    assert markers["mode=raise"]["error"]["type"] == "RuntimeError"
    assert "Timeout" in markers["mode=hang"]["error"]["type"] + markers["mode=hang"]["error"]["message"]
    assert "Dead" in markers["mode=killkernel"]["error"]["type"] + markers["mode=killkernel"]["error"]["message"]
    assert "worker exited with code -9" in markers["mode=killworker"]["error"]["message"]
    # the executed notebooks are kept, up to the failure, with its traceback
    raised = nbformat.read(Path(status["mode=raise"]["run_dir"]) / "faulty.ipynb", as_version=4)
    errors = [o for c in raised.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert errors and errors[0]["ename"] == "RuntimeError" and any("deliberate failure" in t for t in errors[0]["traceback"])
    hung = nbformat.read(Path(status["mode=hang"]["run_dir"]) / "faulty.ipynb", as_version=4)
    assert "started hang" in json.dumps(hung.cells[-1].get("outputs", []))
    assert "run.log" in markers["mode=killworker"]["error"]["message"]  # where the worker's output is kept
    assert json.loads((Path(status["mode=ok"]["run_dir"]) / "metrics.json").read_text())["mode"] == "ok"
    for line in ("failed", "deliberate failure"):
        assert line in proc.stdout
