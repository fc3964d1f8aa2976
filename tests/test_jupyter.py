"""The project kernel "fer-au (.venv)": registered inside the venv, named by every notebook, runs the venv."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from fer_lib.workflow import jupyter

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def test_install_into_a_prefix_is_current_and_refreshed_when_stale(tmp_path):
    dest = jupyter.install_kernel(prefix=tmp_path)
    assert dest == jupyter.kernel_dir(tmp_path) == tmp_path / "share" / "jupyter" / "kernels" / "fer-au"
    spec = json.loads((dest / "kernel.json").read_text())
    assert spec["argv"][0] == sys.executable and "ipykernel_launcher" in spec["argv"]
    assert spec["display_name"] == "fer-au (.venv)" and spec["language"] == "python"
    assert jupyter.kernel_is_current(tmp_path)
    stamp = (dest / "kernel.json").stat().st_mtime_ns
    assert jupyter.ensure_kernel(tmp_path) == dest and (dest / "kernel.json").stat().st_mtime_ns == stamp
    spec["argv"][0] = "/moved/venv/bin/python"           # e.g. the repository was moved
    (dest / "kernel.json").write_text(json.dumps(spec))
    assert not jupyter.kernel_is_current(tmp_path)
    jupyter.ensure_kernel(tmp_path)
    assert json.loads((dest / "kernel.json").read_text())["argv"][0] == sys.executable
    assert not jupyter.kernel_is_current(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="not both"):
        jupyter.install_kernel(prefix=tmp_path, user=True)


@pytest.mark.slow
def test_kernel_is_registered_in_the_venv_and_runs_it():
    """What `make setup` / `python -m fer_lib.workflow.jupyter lab` do; then Jupyter finds it in the venv and it starts there."""
    from jupyter_client.manager import start_new_kernel

    jupyter.ensure_kernel()
    assert jupyter.kernel_is_current()
    listed = subprocess.run([sys.executable, "-m", "jupyter", "kernelspec", "list", "--json"], capture_output=True,
                            text=True, check=True, timeout=60)
    specs = json.loads(listed.stdout)["kernelspecs"]
    assert "fer-au" in specs and "python3" in specs, "papermill's python3 must stay available"
    assert specs["fer-au"]["resource_dir"] == str(jupyter.kernel_dir())
    assert specs["fer-au"]["resource_dir"].startswith(sys.prefix), "registered inside the venv, not globally"
    assert specs["fer-au"]["spec"]["display_name"] == "fer-au (.venv)"
    km, kc = start_new_kernel(kernel_name="fer-au", startup_timeout=120)
    try:
        lines = []
        kc.execute_interactive("import sys, fer_lib; print(sys.prefix); print(fer_lib.__file__)", timeout=60,
                               output_hook=lambda m: lines.extend(m["content"].get("text", "").split()))
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    assert lines[0] == sys.prefix and lines[1].startswith(str(REPO / "fer_lib"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_carry_the_project_kernelspec(path):
    spec = jupyter.notebook_kernelspec(path)
    assert spec == jupyter.NOTEBOOK_KERNELSPEC, (
        f"{path.name} names kernel {spec.get('name')!r}; run `python -m fer_lib.workflow.jupyter notebooks`")


def test_setting_the_kernelspec_changes_only_that_field(tmp_path):
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1  # é", metadata={"tags": ["parameters"]})])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    path = tmp_path / "a.ipynb"
    nbformat.write(nb, path)
    before = path.read_text()
    assert jupyter.notebooks_without_kernelspec([path]) == [path]
    assert jupyter.main(["notebooks", "--check", str(path)]) == 1
    assert jupyter.set_notebook_kernelspec([path]) == [path]
    after = path.read_text()
    assert jupyter.notebook_kernelspec(path) == jupyter.NOTEBOOK_KERNELSPEC
    reread = nbformat.read(path, as_version=4)
    reread.metadata["kernelspec"] = nb.metadata["kernelspec"]
    assert nbformat.writes(reread) + "\n" == before, "nothing but metadata.kernelspec changed"
    assert jupyter.set_notebook_kernelspec([path]) == [] and path.read_text() == after
    assert jupyter.main(["notebooks", "--check", str(path)]) == 0
    (tmp_path / "b.ipynb").write_text("{}")
    with pytest.raises(ValueError, match="not a notebook"):
        jupyter.set_notebook_kernelspec([tmp_path / "b.ipynb"])


def test_lab_command_opens_the_repo_on_loopback_with_the_project_kernel():
    cmd = jupyter.lab_command(port=8899, open_browser=False, extra=["--foo=1"])
    assert cmd[:3] == [sys.executable, "-m", "jupyterlab"]
    assert f"--ServerApp.root_dir={REPO}" in cmd and "--ServerApp.ip=127.0.0.1" in cmd
    assert "--MultiKernelManager.default_kernel_name=fer-au" in cmd and "--ServerApp.port=8899" in cmd
    assert "--ServerApp.open_browser=False" in cmd and cmd[-1] == "--foo=1"
    assert ("--allow-root" in cmd) == (os.geteuid() == 0)
    with pytest.raises(SystemExit):
        jupyter.main(["kernel", "--bogus"])


def test_current_parameters_are_the_notebooks_plain_values():
    namespace = {"epochs": 3, "layers": "last", "data_root": None, "grid": [1, 2], "opts": {"a": 1}, "ok": True,
                 "In": [""], "Out": {}, "_": 1, "_i1": "x", "__name__": "__main__", "get_ipython": print,
                 "Path": os.PathLike, "json": json, "exit": object()}
    assert jupyter.current_parameters(namespace) == {"epochs": 3, "layers": "last", "data_root": None,
                                                     "grid": [1, 2], "opts": {"a": 1}, "ok": True}
