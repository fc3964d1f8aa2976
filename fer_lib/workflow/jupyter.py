"""The project's Jupyter kernel and JupyterLab launcher.

The kernel "fer-au" (shown as "fer-au (.venv)") runs this virtual environment's Python; it
is registered inside the environment (`<venv>/share/jupyter/kernels/fer-au`), so nothing is
written to the user's home and deleting .venv removes it. Notebooks name it in their
metadata, so JupyterLab opens them in the right environment without asking; papermill runs
them with `-k python3` (the environment's own default kernel), which needs no registration.

    python -m fer_lib.workflow.jupyter lab            # register the kernel if needed, open JupyterLab on the repo
    python -m fer_lib.workflow.jupyter kernel         # register (or refresh) the kernel only
    python -m fer_lib.workflow.jupyter notebooks      # write the kernelspec into notebooks/*.ipynb metadata
    python -m fer_lib.workflow.jupyter notebooks --check   # exit 1 listing notebooks that lack it

Inside a notebook, `current_parameters(globals())` returns its papermill parameters as one mapping
(e.g. for `TrainConfig.from_params`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from fer_lib.utils import REPO_ROOT, atomic_write_text

#: the kernel's name (what notebook metadata and `jupyter kernelspec list` show)
KERNEL_NAME = "fer-au"
#: what JupyterLab shows in its kernel picker and status bar
KERNEL_DISPLAY_NAME = "fer-au (.venv)"
#: the `kernelspec` block every project notebook carries in its metadata
NOTEBOOK_KERNELSPEC: dict[str, str] = {"name": KERNEL_NAME, "display_name": KERNEL_DISPLAY_NAME,
                                       "language": "python"}
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
#: names IPython itself puts into a notebook's namespace
IPYTHON_NAMES = frozenset({"In", "Out", "get_ipython", "exit", "quit", "open", "display"})
#: the types a papermill parameter can have (what the parameters cell and TOML give)
PARAMETER_TYPES = (str, int, float, bool, type(None), list, dict, tuple)


def current_parameters(namespace: Mapping[str, Any]) -> dict[str, Any]:
    """A running notebook's parameters, from `globals()`: its plain values (str, numbers, bool, None,
    lists, dicts) whose names do not start with "_", IPython's own names left out. Call it in the cell
    after the parameters cell, before that cell defines any plain value of its own (imports are fine)."""
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and k not in IPYTHON_NAMES and isinstance(v, PARAMETER_TYPES)}


def kernel_dir(prefix: str | os.PathLike | None = None) -> Path:
    """Where the kernel lives under an environment prefix (default: this interpreter's sys.prefix)."""
    return Path(prefix or sys.prefix) / "share" / "jupyter" / "kernels" / KERNEL_NAME


def read_kernel_spec(prefix: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """The registered kernel.json under `prefix`, or None if absent or unreadable."""
    try:
        return json.loads((kernel_dir(prefix) / "kernel.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def kernel_is_current(prefix: str | os.PathLike | None = None) -> bool:
    """True if the kernel is registered under `prefix` and launches this interpreter."""
    spec = read_kernel_spec(prefix)
    return bool(spec and spec.get("argv") and spec["argv"][0] == sys.executable
                and spec.get("display_name") == KERNEL_DISPLAY_NAME and spec.get("language") == "python")


def install_kernel(prefix: str | os.PathLike | None = None, user: bool = False) -> Path:
    """Register the kernel (this interpreter) under `prefix` (default sys.prefix) or, with user=True, for the user."""
    from ipykernel.kernelspec import install

    if user and prefix is not None:
        raise ValueError("give either prefix or user=True, not both")
    dest = install(kernel_name=KERNEL_NAME, display_name=KERNEL_DISPLAY_NAME, user=user,
                   prefix=None if user else str(prefix or sys.prefix))
    return Path(dest)


def ensure_kernel(prefix: str | os.PathLike | None = None, verbose: bool = False) -> Path:
    """Register the kernel under `prefix` unless an up-to-date registration is already there."""
    if kernel_is_current(prefix):
        return kernel_dir(prefix)
    dest = install_kernel(prefix)
    if verbose:
        print(f"registered Jupyter kernel {KERNEL_NAME!r} ({KERNEL_DISPLAY_NAME}) in {dest}")
    return dest


def notebook_kernelspec(path: str | os.PathLike) -> dict[str, Any]:
    """The kernelspec block of a notebook's metadata ({} if it has none)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return dict(data.get("metadata", {}).get("kernelspec") or {})


def set_notebook_kernelspec(paths: Iterable[str | os.PathLike] | None = None,
                            spec: dict[str, str] | None = None) -> list[Path]:
    """Write `spec` (default NOTEBOOK_KERNELSPEC) into each notebook's metadata.kernelspec only.

    Everything else in the file is kept as it is (nbformat's layout: one-space indent, sorted
    keys); returns the notebooks that changed. Default: notebooks/*.ipynb.
    """
    spec = dict(spec or NOTEBOOK_KERNELSPEC)
    changed = []
    for path in sorted(Path(p) for p in (paths if paths is not None else NOTEBOOKS_DIR.glob("*.ipynb"))):
        text = path.read_text(encoding="utf-8")
        data = json.loads(text)
        if not isinstance(data, dict) or "cells" not in data:
            raise ValueError(f"{path} is not a notebook (no 'cells')")
        if data.setdefault("metadata", {}).get("kernelspec") == spec:
            continue
        data["metadata"]["kernelspec"] = spec
        atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
        changed.append(path)
    return changed


def notebooks_without_kernelspec(paths: Iterable[str | os.PathLike] | None = None) -> list[Path]:
    """Notebooks whose metadata does not name the project kernel."""
    paths = sorted(Path(p) for p in (paths if paths is not None else NOTEBOOKS_DIR.glob("*.ipynb")))
    return [p for p in paths if notebook_kernelspec(p).get("name") != KERNEL_NAME]


def lab_command(notebook_dir: str | os.PathLike = REPO_ROOT, ip: str = "127.0.0.1", port: int | None = None,
                open_browser: bool = True, extra: Sequence[str] = ()) -> list[str]:
    """The `jupyter lab` command line: this interpreter, the repo as root, the project kernel as default."""
    cmd = [sys.executable, "-m", "jupyterlab", f"--ServerApp.root_dir={Path(notebook_dir).resolve()}",
           f"--ServerApp.ip={ip}", f"--MultiKernelManager.default_kernel_name={KERNEL_NAME}"]
    if port is not None:
        cmd.append(f"--ServerApp.port={int(port)}")
    if not open_browser:
        cmd.append("--ServerApp.open_browser=False")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")   # containers often run as root; Jupyter refuses it otherwise
    return cmd + list(extra)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: `kernel`, `lab` and `notebooks` (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m fer_lib.workflow.jupyter", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    k = sub.add_parser("kernel", help=f"register the {KERNEL_DISPLAY_NAME!r} kernel in this environment")
    k.add_argument("--user", action="store_true", help="also register it for the current user (~/.local), "
                                                       "so a JupyterLab outside this environment sees it")
    k.add_argument("--force", action="store_true", help="re-register even if up to date")
    lab = sub.add_parser("lab", help="register the kernel if needed and open JupyterLab on the repository")
    lab.add_argument("--port", type=int, help="port (default: JupyterLab's, 8888 or the next free one)")
    lab.add_argument("--ip", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    lab.add_argument("--no-browser", action="store_true", help="do not open a web browser")
    lab.add_argument("--notebook-dir", default=str(REPO_ROOT), help="root folder (default: the repository)")
    nbs = sub.add_parser("notebooks", help="write the kernelspec into notebooks' metadata (only that field)")
    nbs.add_argument("paths", nargs="*", help="notebooks (default: notebooks/*.ipynb)")
    nbs.add_argument("--check", action="store_true", help="change nothing; exit 1 if a notebook lacks it")
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "lab":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")

    if args.command == "kernel":
        dest = install_kernel() if args.force else ensure_kernel()
        print(f"kernel {KERNEL_NAME!r} ({KERNEL_DISPLAY_NAME}) -> {dest}")
        if args.user:
            print(f"kernel {KERNEL_NAME!r} for the user -> {install_kernel(user=True)}")
        return 0
    if args.command == "notebooks":
        paths = args.paths or None
        if args.check:
            missing = notebooks_without_kernelspec(paths)
            for p in missing:
                print(f"{p}: kernelspec is {notebook_kernelspec(p).get('name')!r}, expected {KERNEL_NAME!r}")
            return 1 if missing else 0
        for p in set_notebook_kernelspec(paths):
            print(f"set kernelspec {KERNEL_NAME!r} in {p}")
        return 0
    ensure_kernel(verbose=True)
    cmd = lab_command(args.notebook_dir, ip=args.ip, port=args.port, open_browser=not args.no_browser,
                      extra=[e for e in extra if e != "--"])
    print(" ".join(cmd), flush=True)
    os.execv(cmd[0], cmd)
    return 0  # pragma: no cover - execv does not return


if __name__ == "__main__":
    sys.exit(main())
