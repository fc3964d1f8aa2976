"""Run parameterised notebooks as reproducible experiments: papermill sweeps, resumable and parallel.

An experiment file (TOML, in experiments/) lists ordered stages; each stage runs one notebook
over a set of configurations and writes, per configuration, into
`results/<experiment>/<stage>/<run-id>/`: the executed notebook, the notebook's own
`metrics.json` (and figures), `run.log` (kernel output) and `run.json` (the completion marker:
status, parameters, code version). Usage:

    python -m fer_lib.workflow.pipeline experiments/main.toml --jobs 2
    python -m fer_lib.workflow.pipeline --preset paper --set data_root=/data/rafdb --set dataset=rafdb

Experiment file format::

    [experiment]
    name = "main"                 # results/<name>/ (default: the file's stem)
    description = "..."
    seed = 0                      # passed to every notebook as `seed` (a stage may override it)
    jobs = 2                      # default for --jobs

    [variables]                   # knobs, overridable with --set NAME=VALUE; use as "{var:NAME}"
    epochs = 2

    [defaults]                    # parameters for every notebook that declares them
    device = "cpu"

    [[stage]]
    name = "train"                # folder name; referenced by later stages
    notebook = "notebooks/02_train.ipynb"      # relative to the repository root
    parameters = { backbone = "resnet18", epochs = "{var:epochs}" }
    configs = [ { run_name = "baseline", au_weight = 0 }, { run_name = "guided", au_weight = 9 } ]
    grid = { layers = [["last"], ["layer3"]] }  # cartesian product, crossed with `configs`
    timeout_s = 600               # optional per-cell timeout
    require_metrics = true        # a run that writes no metrics.json counts as failed
    warm_up = true                # run the first config alone first (it builds shared data caches)

    [headline]                    # optional: the runs compared in the printed/HTML headline table
    baseline = "{run:train/baseline}"
    guided = "{run:train/guided}"
    interpret = "{run:interpret}"  # optional, the run whose metrics hold CAM-COS
    # or: comparison = "{run:real_faces}"   a notebook-08 run: one headline row per evaluated checkpoint

Parameters merge as defaults (only for notebooks that declare them) < stage parameters <
config < grid point; a parameter that the notebook's `parameters` cell does not declare is an
error (a typo). `run_name` in a config names the run (it is not passed to the notebook); other
runs are named by the parameters that vary within the stage, plus a short config hash.
Placeholders in string values: `{repo}` (repository root), `{results}` (this experiment's
results folder), `{var:NAME}`, `{stage:NAME}` (an earlier stage's folder, e.g. a sweep to
aggregate), `{run:STAGE/NAME}` (one run folder of an earlier stage, by run_name or run-id
prefix; `{run:STAGE}` when that stage has a single run). A string that is exactly
`{var:NAME}` keeps the variable's type. Every notebook also receives `output_dir` (its run
folder) and `seed`. Paths given to notebooks are absolute: placeholders resolve to absolute
paths, and relative values of parameters named checkpoint/weights or ending in
_dir/_root/_path/_file/_checkpoint are taken relative to the repository root (relative paths
given with --set: relative to the current directory). Notebooks run with their own folder
(notebooks/) as working directory, as in JupyterLab, so they must not rely on it.

A run is skipped when its run.json says "ok" for the same parameters and the same code
fingerprint (a content hash of fer_lib/ and of the notebook; git_revision() is recorded for
provenance); --reuse-stale ignores the code fingerprint, --force reruns everything. A failed
or interrupted run restarts in its folder (training resumes from its checkpoints); a finished
run that is redone starts from an empty folder. A failing notebook is kept, executed up to its
traceback, and the other runs go on; runs that need a failed run's folder are "blocked".
Each run executes in its own worker process with a thread budget of max(1, cores // jobs)
(OMP/MKL/OpenBLAS threads; GPUs round-robin through CUDA_VISIBLE_DEVICES). Stages run in
order, the runs of a stage in parallel. One pipeline per experiment folder at a time (a file
lock; a second one exits with status 3 and says who holds it). At the end: summary.csv/json
per experiment, an HTML rendering beside every executed notebook, results/index.html and
results/README.md; exit status 0 if nothing failed, 1 if a run failed or was blocked, 2 for
an invalid experiment or option.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import fcntl
import functools
import hashlib
import html
import itertools
import json
import math
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from fer_lib.utils import (
    REPO_ROOT,
    ConfigError,
    atomic_write_json,
    atomic_write_text,
    config_hash,
    git_revision,
)

EXPERIMENTS_DIR = REPO_ROOT / "experiments"
DEFAULT_RESULTS = REPO_ROOT / "results"
CODE_DIRS: tuple[Path, ...] = (REPO_ROOT / "fer_lib",)   # what the code fingerprint covers
MARKER = "run.json"
LOCK_NAME = ".pipeline.lock"
RESERVED_KEYS = ("run_name",)
PATH_SUFFIXES = ("_dir", "_root", "_path", "_file", "_checkpoint")
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
               "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "FER_NUM_THREADS")
STAGE_KEYS = {"name", "notebook", "parameters", "configs", "grid", "output", "timeout_s",
              "require_metrics", "warm_up", "description"}
EXPERIMENT_KEYS = {"name", "description", "seed", "jobs"}
TOP_KEYS = {"experiment", "variables", "defaults", "stage", "headline"}
HEADLINE_KEYS = ("baseline", "guided", "interpret", "comparison")
FAILED = ("failed", "blocked")
_PLACEHOLDER = re.compile(r"\{(repo|results)\}|\{(var|stage|run):([^{}]+)\}")


class PipelineBusy(RuntimeError):
    """Another pipeline holds this experiment's results folder."""


# --------------------------------------------------------------------------- experiment files


@dataclass(frozen=True)
class Stage:
    """One notebook run over a list of configurations."""

    name: str
    notebook: Path
    parameters: dict[str, Any]
    configs: list[dict[str, Any]]
    grid: dict[str, list[Any]]
    output: str
    timeout_s: float | None = None
    require_metrics: bool = True
    warm_up: bool = False
    description: str = ""


@dataclass
class Experiment:
    """A parsed experiment file: ordered stages plus variables and defaults."""

    name: str
    source: Path | None
    stages: list[Stage]
    description: str = ""
    seed: int = 0
    jobs: int = 1
    variables: dict[str, Any] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)
    headline: dict[str, str] = field(default_factory=dict)

    def stage(self, name: str) -> Stage:
        """The stage called `name` (ConfigError listing the stages otherwise)."""
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise ConfigError(f"unknown stage {name!r} in experiment {self.name!r}; "
                          f"valid choices: {', '.join(s.name for s in self.stages)}")


def available_presets() -> list[str]:
    """Names of the experiment files shipped in experiments/."""
    return sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.toml"))


def resolve_experiment_path(name_or_path: str | os.PathLike) -> Path:
    """Map a preset name (main, paper) or a file path to an existing experiment file."""
    path = Path(name_or_path)
    if not path.exists() and not path.is_absolute() and (REPO_ROOT / path).exists():
        path = REPO_ROOT / path          # experiments/x.toml works from any working directory
    if path.suffix == ".toml" or path.exists():
        if path.is_file():
            return path.resolve()
        raise ConfigError(f"experiment file {str(path)!r} does not exist")
    candidate = EXPERIMENTS_DIR / f"{name_or_path}.toml"
    if candidate.is_file():
        return candidate
    raise ConfigError(f"unknown preset {str(name_or_path)!r}; valid choices: "
                      f"{', '.join(available_presets()) or '(none in experiments/)'} or a .toml path")


def parse_value(text: str) -> Any:
    """Parse a --set value as a TOML value (2, 0.5, true, [1, 2], "x"); bare words stay strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _check_keys(where: str, mapping: Mapping[str, Any], allowed: Iterable[str]) -> None:
    allowed = set(allowed)
    unknown = sorted(set(mapping) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(allowed))}")


def experiment_from_dict(data: Mapping[str, Any], source: Path | None = None,
                         overrides: Mapping[str, Any] | None = None) -> Experiment:
    """Validate a parsed experiment mapping (the TOML document) into an Experiment."""
    where = str(source) if source else "experiment"
    _check_keys(where, data, TOP_KEYS)
    head = dict(data.get("experiment", {}))
    _check_keys(f"{where} [experiment]", head, EXPERIMENT_KEYS)
    name = str(head.get("name") or (source.stem if source else "experiment"))
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ConfigError(f"{where}: experiment name {name!r} must be letters, digits, '.', '_' or '-'")
    variables = dict(data.get("variables", {}))
    for key, value in (overrides or {}).items():
        if key not in variables:
            raise ConfigError(f"--set {key}: unknown variable; valid choices: "
                              f"{', '.join(sorted(variables)) or '(this experiment defines none)'}")
        variables[key] = value
    stages_raw = data.get("stage", [])
    if not isinstance(stages_raw, list) or not stages_raw:
        raise ConfigError(f"{where}: no [[stage]] tables; an experiment needs at least one stage")
    stages: list[Stage] = []
    for index, raw in enumerate(stages_raw):
        swhere = f"{where} stage #{index + 1}"
        _check_keys(swhere, raw, STAGE_KEYS)
        if "name" not in raw or "notebook" not in raw:
            raise ConfigError(f"{swhere}: 'name' and 'notebook' are required")
        sname = str(raw["name"])
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", sname):
            raise ConfigError(f"{swhere}: stage name {sname!r} must be letters, digits, '.', '_' or '-'")
        if any(s.name == sname for s in stages):
            raise ConfigError(f"{swhere}: duplicate stage name {sname!r}")
        notebook = Path(raw["notebook"])
        notebook = notebook if notebook.is_absolute() else REPO_ROOT / notebook
        grid = dict(raw.get("grid", {}))
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{swhere}: grid.{key} must be a non-empty list of values, got {values!r}")
        configs = raw.get("configs", [{}])
        if not isinstance(configs, list) or not configs or not all(isinstance(c, dict) for c in configs):
            raise ConfigError(f"{swhere}: configs must be a non-empty list of tables")
        timeout = raw.get("timeout_s")
        stages.append(Stage(
            name=sname, notebook=notebook, parameters=dict(raw.get("parameters", {})),
            configs=[dict(c) for c in configs], grid=grid, output=str(raw.get("output", sname)),
            timeout_s=float(timeout) if timeout is not None else None,
            require_metrics=bool(raw.get("require_metrics", True)), warm_up=bool(raw.get("warm_up", False)),
            description=str(raw.get("description", "")),
        ))
    headline = dict(data.get("headline", {}))
    _check_keys(f"{where} [headline]", headline, HEADLINE_KEYS)
    jobs = int(head.get("jobs", 1))
    if jobs < 1:
        raise ConfigError(f"{where}: jobs must be >= 1, got {jobs}")
    return Experiment(name=name, source=source, stages=stages, description=str(head.get("description", "")),
                      seed=int(head.get("seed", 0)), jobs=jobs, variables=variables,
                      defaults=dict(data.get("defaults", {})), headline={k: str(v) for k, v in headline.items()})


def load_experiment(name_or_path: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> Experiment:
    """Read an experiment file (a preset name or a .toml path), applying --set variable overrides."""
    path = resolve_experiment_path(name_or_path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return experiment_from_dict(data, source=path, overrides=overrides)


# --------------------------------------------------------------------------- planning


@dataclass
class Run:
    """One configuration of one stage: where it runs and with which (resolved) parameters."""

    stage: str
    run_id: str
    run_name: str | None
    notebook: Path
    run_dir: Path
    parameters: dict[str, Any]           # resolved, absolute paths, incl. output_dir and seed
    portable: dict[str, Any]             # parameters with the repo root written as {repo} (hashed)
    config_hash: str
    needs_runs: list[tuple[str, str]] = field(default_factory=list)   # (stage, run_id)
    needs_stages: list[str] = field(default_factory=list)
    timeout_s: float | None = None
    require_metrics: bool = True

    @property
    def executed_notebook(self) -> Path:
        """Path of the executed copy of the notebook inside the run folder."""
        return self.run_dir / self.notebook.name

    @property
    def label(self) -> str:
        return f"{self.stage}/{self.run_id}"


def _is_path_key(key: str) -> bool:
    """Parameters whose relative values are paths (made absolute before reaching a notebook)."""
    return key in ("checkpoint", "weights") or key.endswith(PATH_SUFFIXES)


def _portable(value: Any) -> Any:
    """Replace the repository root in strings by {repo}, so hashes survive moving the checkout."""
    root = str(REPO_ROOT)
    if isinstance(value, str):
        return value.replace(root, "{repo}")
    if isinstance(value, list):
        return [_portable(v) for v in value]
    if isinstance(value, dict):
        return {k: _portable(v) for k, v in value.items()}
    return value


def _slug(value: Any) -> str:
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, (list, tuple)):
        text = "+".join(_slug(v) for v in value)
    elif isinstance(value, dict):
        text = "+".join(f"{k}-{_slug(v)}" for k, v in value.items())
    else:
        text = str(value)
        if "/" in text:
            text = text.rstrip("/").rsplit("/", 1)[-1]
    return re.sub(r"[^A-Za-z0-9.+=-]+", "-", text).strip("-")


def _expand(stage: Stage) -> list[tuple[str | None, dict[str, Any]]]:
    """The stage's configurations: configs x grid, as (run_name, parameter overrides)."""
    keys = list(stage.grid)
    points = [dict(zip(keys, combo)) for combo in itertools.product(*(stage.grid[k] for k in keys))] or [{}]
    out = []
    for config in stage.configs:
        for point in points:
            merged = {**config, **point}
            name = merged.pop("run_name", None)
            out.append((str(name) if name is not None else None, merged))
    return out


class _Resolver:
    """Resolves placeholders against variables and the runs planned so far."""

    def __init__(self, experiment: Experiment, exp_dir: Path, plan: dict[str, list[Run]]):
        self.experiment = experiment
        self.exp_dir = exp_dir
        self.plan = plan
        self.needs_runs: list[tuple[str, str]] = []
        self.needs_stages: list[str] = []

    def find_run(self, ref: str) -> Run:
        stage_name, _, run_ref = ref.partition("/")
        if stage_name not in self.plan:
            raise ConfigError(f"placeholder {{run:{ref}}}: no earlier stage {stage_name!r}; earlier stages: "
                              f"{', '.join(self.plan) or '(none)'}")
        runs = self.plan[stage_name]
        if not run_ref:
            if len(runs) != 1:
                raise ConfigError(f"placeholder {{run:{ref}}}: stage {stage_name!r} has {len(runs)} runs; "
                                  f"name one: {', '.join(r.run_name or r.run_id for r in runs)}")
            return runs[0]
        exact = [r for r in runs if r.run_name == run_ref or r.run_id == run_ref]
        matches = exact or [r for r in runs if r.run_id.startswith(run_ref)]
        if len(matches) != 1:
            raise ConfigError(f"placeholder {{run:{ref}}}: {'no' if not matches else 'several'} runs match "
                              f"{run_ref!r} in stage {stage_name!r}; valid choices: "
                              f"{', '.join(r.run_name or r.run_id for r in runs)}")
        return matches[0]

    def replace(self, match: re.Match) -> str:
        simple, kind, arg = match.group(1), match.group(2), match.group(3)
        if simple == "repo":
            return str(REPO_ROOT)
        if simple == "results":
            return str(self.exp_dir)
        if kind == "var":
            if arg not in self.experiment.variables:
                raise ConfigError(f"placeholder {{var:{arg}}}: unknown variable; valid choices: "
                                  f"{', '.join(sorted(self.experiment.variables)) or '(none defined)'}")
            return str(self.resolve(self.experiment.variables[arg]))
        if kind == "stage":
            if arg not in self.plan:
                raise ConfigError(f"placeholder {{stage:{arg}}}: no earlier stage {arg!r}; earlier stages: "
                                  f"{', '.join(self.plan) or '(none)'}")
            if arg not in self.needs_stages:
                self.needs_stages.append(arg)
            return str(self.exp_dir / self.experiment.stage(arg).output)
        run = self.find_run(arg)
        if (run.stage, run.run_id) not in self.needs_runs:
            self.needs_runs.append((run.stage, run.run_id))
        return str(run.run_dir)

    def resolve(self, value: Any) -> Any:
        if isinstance(value, str):
            whole = re.fullmatch(r"\{var:([^{}]+)\}", value)
            if whole and whole.group(1) in self.experiment.variables:
                return self.resolve(self.experiment.variables[whole.group(1)])
            return _PLACEHOLDER.sub(self.replace, value)
        if isinstance(value, list):
            return [self.resolve(v) for v in value]
        if isinstance(value, dict):
            return {k: self.resolve(v) for k, v in value.items()}
        return value


@functools.lru_cache(maxsize=64)
def _declared_parameters(notebook: Path, mtime: float) -> frozenset[str] | None:
    """Names assigned in the notebook's cell tagged `parameters` (None if it cannot be read)."""
    import ast

    import nbformat

    try:
        nb = nbformat.read(notebook, as_version=4)
        cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
        tree = ast.parse(cell.source)
    except Exception:  # noqa: BLE001 - missing/odd notebook: pass every default, the run will say why
        return None
    names = set()
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
            if isinstance(node, ast.AnnAssign) else []
        for target in targets:
            for sub in ast.walk(target):
                if isinstance(sub, ast.Name):
                    names.add(sub.id)
    return frozenset(names)


def notebook_parameters(notebook: str | os.PathLike) -> frozenset[str] | None:
    """The parameters a notebook declares in its cell tagged `parameters` (None if unreadable)."""
    path = Path(notebook)
    try:
        return _declared_parameters(path, path.stat().st_mtime)
    except OSError:
        return None


def _absolutise(params: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in params.items():
        shipped_name = key.endswith("_checkpoint") and isinstance(value, str) and "/" not in value \
            and not (REPO_ROOT / value).exists()  # a shipped checkpoint's name, not a path
        if _is_path_key(key) and isinstance(value, str) and value and not os.path.isabs(value) \
                and "://" not in value and not shipped_name:
            value = str((REPO_ROOT / value).resolve())
        out[key] = value
    return out


def plan_experiment(experiment: Experiment, results_root: str | os.PathLike = DEFAULT_RESULTS) -> dict[str, list[Run]]:
    """Expand every stage into runs with resolved parameters, run ids and dependencies."""
    exp_dir = Path(results_root).resolve() / experiment.name
    plan: dict[str, list[Run]] = {}
    for stage in experiment.stages:
        expanded = _expand(stage)
        varying = [k for k in dict.fromkeys(k for _, o in expanded for k in o)
                   if len({json.dumps(o.get(k), sort_keys=True) for _, o in expanded}) > 1]
        runs: list[Run] = []
        for run_name, overrides in expanded:
            resolver = _Resolver(experiment, exp_dir, plan)
            declared = notebook_parameters(stage.notebook)
            defaults = {k: v for k, v in experiment.defaults.items() if declared is None or k in declared}
            params = {"seed": experiment.seed, **defaults, **stage.parameters, **overrides}
            unknown = sorted(set(params) - {"seed", "output_dir"} - (declared if declared is not None else set(params)))
            if unknown:
                raise ConfigError(f"stage {stage.name!r}: parameter(s) {', '.join(unknown)} not declared in the "
                                  f"parameters cell of {stage.notebook.name}; valid choices: "
                                  f"{', '.join(sorted(declared))}")
            params = _absolutise(resolver.resolve(params))
            portable = _portable(params)
            chash = config_hash({"notebook": stage.notebook.name, "parameters": portable}, length=8)
            readable = _slug(run_name) if run_name else "_".join(f"{k}={_slug(overrides.get(k))}" for k in varying)
            readable = readable[:80].strip("_-") or "run"
            run_id = f"{readable}-{chash[:6]}"
            if any(r.config_hash == chash for r in runs):
                raise ConfigError(f"stage {stage.name!r}: two configurations have identical parameters "
                                  f"({run_id}); remove the duplicate")
            run_dir = exp_dir / stage.output / run_id
            params["output_dir"] = str(run_dir)
            runs.append(Run(stage=stage.name, run_id=run_id, run_name=run_name, notebook=stage.notebook,
                            run_dir=run_dir, parameters=params, portable=portable, config_hash=chash,
                            needs_runs=resolver.needs_runs, needs_stages=resolver.needs_stages,
                            timeout_s=stage.timeout_s, require_metrics=stage.require_metrics))
        names = [r.run_name for r in runs if r.run_name]
        if len(names) != len(set(names)):
            raise ConfigError(f"stage {stage.name!r}: run_name values repeat ({', '.join(names)}); "
                              "with a grid, give each config a distinct name or omit run_name")
        plan[stage.name] = runs
    return plan


# --------------------------------------------------------------------------- code version, markers, lock


def code_fingerprint(notebook: str | os.PathLike) -> str:
    """Content hash of fer_lib/*.py and the notebook: what a run's results depend on."""
    digest = hashlib.sha256()
    for folder in CODE_DIRS:
        for path in sorted(Path(folder).rglob("*.py")):
            digest.update(str(path.relative_to(folder)).encode())
            digest.update(path.read_bytes())
    digest.update(Path(notebook).read_bytes())
    return digest.hexdigest()[:16]


def read_marker(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The run.json of a run folder, or None when absent or unreadable."""
    try:
        return json.loads((Path(run_dir) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_complete(run: Run, fingerprint: str | None) -> bool:
    """True when the run folder holds an "ok" marker for the same parameters and code (None: any code)."""
    marker = read_marker(run.run_dir)
    return bool(marker and marker.get("status") == "ok" and marker.get("config_hash") == run.config_hash
                and marker.get("portable_parameters") == run.portable
                and (fingerprint is None or marker.get("code_fingerprint") == fingerprint)
                and run.executed_notebook.exists())


@contextlib.contextmanager
def experiment_lock(exp_dir: str | os.PathLike):
    """Hold an exclusive lock on an experiment's results folder; PipelineBusy if another pipeline has it."""
    exp_dir = Path(exp_dir)
    exp_dir.mkdir(parents=True, exist_ok=True)
    path = exp_dir / LOCK_NAME
    fh = open(path, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown process"
            raise PipelineBusy(
                f"results folder {exp_dir} is in use by another pipeline ({holder}). "
                "Wait for it to finish, or run with --results OTHER_DIR.") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                 f"{_dt.datetime.now().isoformat(timespec='seconds')}: {' '.join(sys.argv)}")
        fh.flush()
        yield path
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        fh.close()


# --------------------------------------------------------------------------- workers


def cpu_count() -> int:
    """CPU cores this process may use (affinity-aware)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def gpu_ids() -> list[str]:
    """Visible GPU ids (CUDA_VISIBLE_DEVICES if set, else counted with torch when nvidia-smi exists)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [v.strip() for v in visible.split(",") if v.strip() and v.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # pragma: no cover - broken CUDA install: run on CPU
        return []


def worker_env(slot: int, jobs: int, threads: int | None = None, gpus: Sequence[str] = ()) -> dict[str, str]:
    """Environment of worker `slot`: its thread budget and (if any) its GPU, round-robin."""
    env = dict(os.environ)
    budget = threads if threads else max(1, cpu_count() // max(1, jobs))
    for var in THREAD_VARS:
        env[var] = str(budget)
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = str(gpus[slot % len(gpus)])
    env["PYTHONUNBUFFERED"] = "1"
    env["FER_PIPELINE_SLOT"] = str(slot)
    return env


def _error_summary(exc: BaseException) -> dict[str, Any]:
    from papermill.exceptions import PapermillExecutionError

    if isinstance(exc, PapermillExecutionError):
        return {"type": exc.ename, "message": str(exc.evalue), "cell_index": exc.cell_index,
                "execution_count": exc.exec_count}
    return {"type": type(exc).__name__, "message": str(exc)}


def execute_run(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Execute one run in this process (the worker side): papermill, then the marker, written last."""
    import nbformat
    import papermill

    run_dir = Path(spec["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    notebook = Path(spec["notebook"])
    final = run_dir / notebook.name
    partial = run_dir / f".{notebook.stem}.partial.ipynb"
    marker: dict[str, Any] = {k: spec[k] for k in ("experiment", "stage", "run_id", "run_name", "config_hash",
                                                    "code_fingerprint", "git_revision")}
    try:
        rel_notebook = str(notebook.relative_to(REPO_ROOT))
    except ValueError:
        rel_notebook = str(notebook)
    marker.update(status="running", notebook=rel_notebook, parameters=spec["parameters"],
                  portable_parameters=spec["portable"], host=socket.gethostname(), pid=os.getpid(),
                  threads=os.environ.get("OMP_NUM_THREADS"), cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
                  started=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    atomic_write_json(run_dir / MARKER, marker)
    start = time.perf_counter()
    error: dict[str, Any] | None = None
    try:
        kwargs = {"execution_timeout": spec["timeout_s"]} if spec.get("timeout_s") else {}
        papermill.execute_notebook(str(notebook), str(partial), parameters=spec["parameters"],
                                   kernel_name="python3", language="python", cwd=str(notebook.parent),
                                   progress_bar=False, log_output=True, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any failure of the notebook is recorded, not raised
        error = _error_summary(exc)
    if partial.exists():
        nb = nbformat.read(partial, as_version=4)
        nb.metadata.setdefault("papermill", {})["output_path"] = str(final)
        nb.metadata["papermill"]["input_path"] = rel_notebook
        atomic_write_text(final, nbformat.writes(nb))
        partial.unlink()
    elif error is None:
        error = {"type": "MissingOutput", "message": "papermill produced no executed notebook"}
    if error is None and spec.get("require_metrics", True) and not (run_dir / "metrics.json").exists():
        error = {"type": "MissingMetrics",
                 "message": f"the notebook finished but wrote no metrics.json into output_dir ({run_dir})"}
    marker.update(status="failed" if error else "ok", error=error,
                  finished=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                  duration_s=round(time.perf_counter() - start, 2))
    atomic_write_json(run_dir / MARKER, marker)
    return marker


def _worker_main() -> int:
    spec = json.loads(sys.stdin.read())
    marker = execute_run(spec)
    return 0 if marker["status"] == "ok" else 1


# --------------------------------------------------------------------------- running an experiment


@dataclass
class RunResult:
    """Outcome of one run in one pipeline invocation."""

    stage: str
    run_id: str
    status: str                    # ok | skipped | failed | blocked
    duration_s: float = 0.0
    error: str = ""
    run_dir: str = ""

    def as_row(self) -> dict[str, Any]:
        return {"stage": self.stage, "run_id": self.run_id, "status": self.status,
                "duration_s": round(self.duration_s, 1), "error": self.error, "run_dir": self.run_dir}


def _launch(run: Run, spec: dict[str, Any], slots: "queue.Queue[int]", jobs: int, threads: int | None,
            gpus: Sequence[str], procs: set, fresh: bool = False) -> RunResult:
    """Execute one run in a worker process (main side) and turn its marker into a RunResult.

    A failed or interrupted run restarts in its folder (training resumes from its checkpoints);
    a completed one that is redone (changed code, or `fresh`) starts from an empty folder.
    """
    slot = slots.get()
    start = time.perf_counter()
    superseded = run.run_dir.parent / f".superseded-{run.run_id}"
    try:
        previous = read_marker(run.run_dir) or {}
        if run.run_dir.exists() and (fresh or previous.get("status") == "ok"):
            # A finished run is redone (new code, or --force): start from an empty folder (training would
            # otherwise return its old metrics.json) and keep the old one aside until the new one succeeds.
            shutil.rmtree(superseded, ignore_errors=True)
            os.replace(run.run_dir, superseded)
        run.run_dir.mkdir(parents=True, exist_ok=True)
        with open(run.run_dir / "run.log", "w", encoding="utf-8") as log:
            proc = subprocess.Popen([sys.executable, "-m", "fer_lib.workflow.pipeline", "--worker"], stdin=subprocess.PIPE,
                                    stdout=log, stderr=subprocess.STDOUT, env=worker_env(slot, jobs, threads, gpus),
                                    cwd=str(REPO_ROOT), text=True)
            procs.add(proc)
            try:
                proc.communicate(json.dumps(spec))
            finally:
                procs.discard(proc)
        marker = read_marker(run.run_dir) or {}
        status = marker.get("status") if marker.get("config_hash") == run.config_hash else None
        if proc.returncode == 0 and status == "ok":
            shutil.rmtree(superseded, ignore_errors=True)
            return RunResult(run.stage, run.run_id, "ok", time.perf_counter() - start, "", str(run.run_dir))
        err = marker.get("error") or {}
        message = f"{err.get('type', 'WorkerError')}: {err.get('message', '')}".strip() if err else \
            f"worker exited with code {proc.returncode} (see {run.run_dir / 'run.log'})"
        if status != "failed":
            marker.update(status="failed", error={"type": "WorkerError", "message": message})
            atomic_write_json(run.run_dir / MARKER, marker)
        short = message.splitlines()[0][:300] if message else ""
        if superseded.exists():
            short += f" (the previous results are kept in {superseded})"
        return RunResult(run.stage, run.run_id, "failed", time.perf_counter() - start, short, str(run.run_dir))
    finally:
        slots.put(slot)


def run_experiment(experiment: Experiment, *, results_root: str | os.PathLike = DEFAULT_RESULTS,
                   jobs: int | None = None, only: Sequence[str] | None = None, force: bool = False,
                   threads: int | None = None, render: bool = True, verbose: bool = True,
                   reuse_stale: bool = False) -> list[RunResult]:
    """Run the experiment's stages in order (runs of a stage in parallel) and write the summaries.

    `force` reruns completed runs; `reuse_stale` skips runs completed with the same parameters even
    when the code fingerprint changed since (for edits known not to affect results).
    """
    from tqdm.auto import tqdm

    jobs = int(jobs or experiment.jobs)
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    selected = list(only) if only else [s.name for s in experiment.stages]
    for name in selected:
        notebook = experiment.stage(name).notebook
        if not notebook.is_file():
            raise ConfigError(f"stage {name!r}: notebook {notebook} does not exist")
    plan = plan_experiment(experiment, results_root)
    results_root = Path(results_root).resolve()
    exp_dir = results_root / experiment.name
    log = (lambda msg: tqdm.write(msg)) if verbose else (lambda msg: None)
    results: list[RunResult] = []
    status_of: dict[tuple[str, str], str] = {}
    gpus = gpu_ids()
    revision = git_revision()
    with experiment_lock(exp_dir):
        _write_experiment_info(experiment, exp_dir, plan)
        started = time.perf_counter()
        for stage in experiment.stages:
            if stage.name not in selected:
                continue
            fingerprint = code_fingerprint(stage.notebook)
            runs = plan[stage.name]
            todo: list[Run] = []
            for run in runs:
                blocker = _blocker(run, plan, status_of, exp_dir=exp_dir, experiment=experiment,
                                   fingerprint_of=lambda r: None if reuse_stale else code_fingerprint(r.notebook))
                if blocker:
                    results.append(RunResult(run.stage, run.run_id, "blocked", 0.0, blocker, str(run.run_dir)))
                elif not force and is_complete(run, None if reuse_stale else fingerprint):
                    results.append(RunResult(run.stage, run.run_id, "skipped", 0.0, "", str(run.run_dir)))
                else:
                    todo.append(run)
                    continue
                status_of[(run.stage, run.run_id)] = results[-1].status
                log(f"[{stage.name}] {results[-1].status:8s} {run.run_id} {results[-1].error}")
            if not todo:
                continue
            log(f"[{stage.name}] running {len(todo)} of {len(runs)} run(s) with {min(jobs, len(todo))} worker(s)")
            slots: queue.Queue[int] = queue.Queue()
            for slot in range(jobs):
                slots.put(slot)
            procs: set = set()
            specs = {r.run_id: {"experiment": experiment.name, "stage": r.stage, "run_id": r.run_id,
                                "run_name": r.run_name, "config_hash": r.config_hash, "notebook": str(r.notebook),
                                "run_dir": str(r.run_dir), "parameters": r.parameters, "portable": r.portable,
                                "code_fingerprint": fingerprint, "git_revision": revision,
                                "timeout_s": r.timeout_s, "require_metrics": r.require_metrics} for r in todo}
            bar = tqdm(total=len(todo), desc=stage.name, unit="run", disable=not verbose or not sys.stderr.isatty())
            pool = ThreadPoolExecutor(max_workers=jobs)
            # warm_up: the first run alone builds the shared caches (data, landmarks) before the others start
            batches = [todo[:1], todo[1:]] if stage.warm_up and jobs > 1 and len(todo) > 1 else [todo]
            try:
                for batch in batches:
                    futures = [pool.submit(_launch, r, specs[r.run_id], slots, jobs, threads, gpus, procs, force)
                               for r in batch]
                    for future in futures:
                        result = future.result()
                        results.append(result)
                        status_of[(result.stage, result.run_id)] = result.status
                        bar.update(1)
                        log(f"[{stage.name}] {result.status:8s} {result.run_id} ({result.duration_s:.0f} s) "
                            f"{result.error}")
            except KeyboardInterrupt:
                for proc in list(procs):
                    with contextlib.suppress(OSError):
                        proc.terminate()
                pool.shutdown(wait=False, cancel_futures=True)
                raise
            finally:
                pool.shutdown(wait=True)
                bar.close()
        _write_summary(exp_dir, results, time.perf_counter() - started)
    if render:
        render_notebooks(exp_dir, verbose=verbose)
        write_index(results_root)
    return results


def _blocker(run: Run, plan: dict[str, list[Run]], status_of: dict[tuple[str, str], str], *, fingerprint_of,
             exp_dir: Path, experiment: Experiment) -> str:
    """Why `run` cannot start (an upstream run failed or never completed), or ''."""
    for stage_name, run_id in run.needs_runs:
        status = status_of.get((stage_name, run_id))
        if status in FAILED:
            return f"needs {stage_name}/{run_id}, which {status}"
        if status is None:
            upstream = next(r for r in plan[stage_name] if r.run_id == run_id)
            if not is_complete(upstream, fingerprint_of(upstream)):
                return (f"needs {stage_name}/{run_id}, which has not completed with the current code; "
                        f"run stage {stage_name!r} first")
    for stage_name in run.needs_stages:
        folder = exp_dir / experiment.stage(stage_name).output
        if not any((read_marker(p.parent) or {}).get("status") == "ok" for p in folder.glob(f"*/{MARKER}")
                   if not p.parent.name.startswith(".")):
            return f"needs results of stage {stage_name!r} in {folder}, which has no completed run"
    return ""


def _write_experiment_info(experiment: Experiment, exp_dir: Path, plan: dict[str, list[Run]]) -> None:
    """experiment.json: stage order and headline runs, read later by the index builder."""
    headline: dict[str, str] = {}
    resolver = _Resolver(experiment, exp_dir, plan)
    for key, ref in experiment.headline.items():
        headline[key] = os.path.relpath(resolver.resolve(ref), exp_dir)
    try:
        source = str(experiment.source.relative_to(REPO_ROOT)) if experiment.source else None
    except ValueError:
        source = str(experiment.source)
    atomic_write_json(exp_dir / "experiment.json", {
        "name": experiment.name, "description": experiment.description, "source": source,
        "seed": experiment.seed, "variables": _portable(experiment.variables),
        "stages": [{"name": s.name, "output": s.output, "notebook": s.notebook.name,
                    "description": s.description} for s in experiment.stages],
        "headline": headline,
    })


def _write_summary(exp_dir: Path, results: list[RunResult], elapsed: float) -> None:
    import pandas as pd

    frame = pd.DataFrame([r.as_row() for r in results], columns=list(RunResult("", "", "").as_row()))
    counts = {s: int((frame["status"] == s).sum()) for s in ("ok", "skipped", "failed", "blocked")}
    atomic_write_text(exp_dir / "summary.csv", frame.to_csv(index=False))
    atomic_write_json(exp_dir / "summary.json", {
        "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_revision": git_revision(), "wall_time_s": round(elapsed, 1), "counts": counts,
        "runs": [r.as_row() for r in results]})


# --------------------------------------------------------------------------- metrics collection


def _hidden(path: Path, root: Path) -> bool:
    """True for paths inside hidden folders (.superseded-*, .ipynb_checkpoints) below root."""
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _run_markers(exp_dir: Path) -> list[Path]:
    """The run.json files of an experiment folder (<stage>/<run-id>/run.json), hidden folders excluded."""
    return sorted(p for p in exp_dir.glob(f"*/*/{MARKER}") if not _hidden(p, exp_dir))


def _load_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _mean_or_value(value: Any) -> float | None:
    """A number, or the mean of a {name: number} dict (e.g. per-layer ATT-COS)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):
        nums = [v for v in (_mean_or_value(x) for x in value.values()) if v is not None]
        return sum(nums) / len(nums) if nums else None
    return None


CAM_PREFERENCE = ("cam", "gradcam")   # the paper reports the model's own CAM; else Grad-CAM; else the mean


def _cam_value(value: Any) -> float | None:
    """CAM-COS from a number or a {method: score} dict, preferring the methods in CAM_PREFERENCE."""
    if isinstance(value, Mapping):
        for method in CAM_PREFERENCE:
            picked = _mean_or_value(value.get(method))
            if picked is not None:
                return picked
    return _mean_or_value(value)


def _first(mapping: Mapping[str, Any] | None, *names: str) -> float | None:
    for name in names:
        node: Any = mapping
        for part in name.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        value = _mean_or_value(node)
        if value is not None:
            return value
    return None


def training_summary(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Flatten a training metrics.json (contract 4) into one row of headline numbers."""
    config = metrics.get("config") or {}
    layers = config.get("layers")
    test = metrics.get("test") or {}
    return {
        "backbone": config.get("backbone"),
        "au_weight": config.get("au_weight"),
        "layers": "+".join(map(str, layers)) if isinstance(layers, (list, tuple)) else layers,
        "tapped": "+".join(test["att_cos"]) if isinstance(test.get("att_cos"), Mapping) else None,
        "seed": config.get("seed"),
        "accuracy": _first(test, "accuracy"),
        "macro_f1": _first(test, "macro_f1"),
        "att_cos": _first(test, "att_cos_mean", "att_cos"),
        "cam_cos": _cam_value(test.get("cam_cos")) if test.get("cam_cos") is not None else _first(test, "cam_cos_mean"),
        "train_time_s": _first(metrics, "train_time_s"),
        "n_test": test.get("n"),
    }


def collect_training_runs(root: str | os.PathLike) -> "pd.DataFrame":
    """One row per training run (a metrics.json with `config` and `test`) found under `root`.

    A run folder counts once: metrics.json files nested inside an accepted run folder (notebook 02
    keeps the trainer's own copy in <run>/run/) are ignored, and so are runs whose run.json says
    they did not finish and hidden folders (.superseded-*).
    """
    import pandas as pd

    root = Path(root)
    rows = []
    accepted: list[Path] = []
    paths = sorted(root.rglob("metrics.json"), key=lambda p: (len(p.parts), str(p))) if root.exists() else []
    for path in paths:
        if _hidden(path, root) or any(parent in accepted for parent in path.parents):
            continue
        metrics = _load_json(path)
        if not metrics or "config" not in metrics or "test" not in metrics:
            continue
        marker = read_marker(path.parent) or {}
        if marker and marker.get("status") not in (None, "ok"):
            continue
        accepted.append(path.parent)
        rows.append({"run": str(path.parent.relative_to(root)) or ".", **training_summary(metrics)})
    columns = ["run", "backbone", "au_weight", "layers", "tapped", "seed", "accuracy", "macro_f1", "att_cos",
               "cam_cos", "train_time_s", "n_test"]
    return pd.DataFrame(rows, columns=columns).sort_values("run").reset_index(drop=True)


def ablation_summary(runs: "pd.DataFrame") -> "pd.DataFrame":
    """Mean and std over seeds of each metric, per backbone, tapped layers and lambda."""
    if runs.empty:
        raise ConfigError("no training runs to summarise (no metrics.json with config and test)")
    metrics = [m for m in ("accuracy", "macro_f1", "att_cos", "cam_cos", "train_time_s") if runs[m].notna().any()]
    grouped = runs.groupby(["backbone", "layers", "au_weight"], dropna=False)[metrics]
    table = grouped.mean()
    std = grouped.std(ddof=0).add_suffix("_std")
    table = table.join(std)
    table["n_runs"] = grouped.size()
    return table.reset_index().sort_values(["backbone", "layers", "au_weight"]).reset_index(drop=True)


def headline_table(baseline: Mapping[str, Any] | None, guided: Mapping[str, Any] | None,
                   interpret: Mapping[str, Any] | None = None) -> "pd.DataFrame":
    """Baseline vs AU-guided: accuracy, macro-F1, ATT-COS, CAM-COS (CAM-COS from `interpret` if given)."""
    import pandas as pd

    rows = []
    for role, label, metrics in (("baseline", "baseline", baseline), ("guided", "AU-guided", guided)):
        if not metrics:
            continue
        row = training_summary(metrics)
        if interpret:
            cam = None
            for path in (f"{role}.cam_cos", f"models.{role}.cam_cos", f"{role}.cam_cos_mean"):
                node: Any = interpret
                for part in path.split("."):
                    node = node.get(part) if isinstance(node, Mapping) else None
                cam = _cam_value(node)
                if cam is not None:
                    break
            row["cam_cos"] = cam if cam is not None else row["cam_cos"]
            att = _first(interpret, f"{role}.att_cos_mean", f"models.{role}.att_cos_mean")
            row["att_cos"] = row["att_cos"] if row["att_cos"] is not None else att
        rows.append({"model": label, "backbone": row["backbone"], "lambda": row["au_weight"],
                     "layers": row["layers"], "accuracy": row["accuracy"], "macro_f1": row["macro_f1"],
                     "ATT-COS": row["att_cos"], "CAM-COS": row["cam_cos"],
                     "train_time_s": None if row["train_time_s"] is None else round(row["train_time_s"], 1)})
    return pd.DataFrame(rows, columns=["model", "backbone", "lambda", "layers", "accuracy", "macro_f1",
                                       "ATT-COS", "CAM-COS", "train_time_s"])


def comparison_headline(metrics: Mapping[str, Any]) -> "pd.DataFrame":
    """The headline rows of a comparison notebook's metrics.json (notebook 08: `comparison` records, one
    per evaluated checkpoint, peer included), in the columns of `headline_table`."""
    import pandas as pd

    rows = []
    for rec in metrics.get("comparison") or []:
        cams = [v for k, v in rec.items() if k.startswith("cam_cos_") and v is not None]
        rows.append({"model": rec.get("model"), "backbone": rec.get("backbone"), "lambda": rec.get("au_weight"),
                     "layers": None, "accuracy": rec.get("accuracy"), "macro_f1": rec.get("macro_f1"),
                     "ATT-COS": rec.get("att_cos"), "CAM-COS": cams[0] if cams else None,
                     "train_time_s": None if rec.get("train_time_s") is None else round(rec["train_time_s"], 1)})
    return pd.DataFrame(rows, columns=["model", "backbone", "lambda", "layers", "accuracy", "macro_f1",
                                       "ATT-COS", "CAM-COS", "train_time_s"])


def headline_split(exp_dir: str | os.PathLike) -> str:
    """Which split the headline numbers are measured on ("test set", or the comparison's own split)."""
    info = _load_json(Path(exp_dir) / "experiment.json") or {}
    ref = (info.get("headline") or {}).get("comparison")
    if not ref:
        return "test set"
    metrics = _load_json(Path(exp_dir) / ref / "metrics.json") or {}
    return str(metrics.get("split_label") or f"{metrics.get('dataset', '')} {metrics.get('split', '')}".strip())


def experiment_headline(exp_dir: str | os.PathLike) -> "pd.DataFrame | None":
    """The headline table of a finished experiment folder (None if it declares no headline)."""
    exp_dir = Path(exp_dir)
    info = _load_json(exp_dir / "experiment.json") or {}
    refs = info.get("headline") or {}
    if refs.get("comparison"):
        table = comparison_headline(_load_json(exp_dir / refs["comparison"] / "metrics.json") or {})
        return None if table.empty else table
    if not refs.get("baseline") and not refs.get("guided"):
        return None
    loaded = {k: _load_json(exp_dir / v / "metrics.json") for k, v in refs.items()}
    table = headline_table(loaded.get("baseline"), loaded.get("guided"), loaded.get("interpret"))
    return None if table.empty else table


# --------------------------------------------------------------------------- rendering


def render_notebooks(exp_dir: str | os.PathLike, verbose: bool = True) -> list[Path]:
    """Render every executed notebook under exp_dir to HTML beside it (figures embedded); returns new files."""
    import nbformat
    from nbconvert import HTMLExporter

    exp_dir = Path(exp_dir)
    exporter = HTMLExporter(template_name="lab", embed_images=True)
    written = []
    for marker_path in _run_markers(exp_dir):
        marker = read_marker(marker_path.parent) or {}
        notebook = marker_path.parent / Path(marker.get("notebook", "")).name
        if not notebook.name.endswith(".ipynb") or not notebook.exists():
            continue
        target = notebook.with_suffix(".html")
        if target.exists() and target.stat().st_mtime >= notebook.stat().st_mtime:
            continue
        try:
            body, _ = exporter.from_notebook_node(nbformat.read(notebook, as_version=4))
        except Exception as exc:  # noqa: BLE001 - a broken notebook must not stop the index
            if verbose:
                print(f"could not render {notebook}: {exc}", file=sys.stderr)
            continue
        atomic_write_text(target, body)
        written.append(target)
    return written


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e6:
            return str(int(value))
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def markdown_table(frame: "pd.DataFrame") -> str:
    """A GitHub markdown table of a DataFrame (no extra dependency)."""
    cols = list(frame.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(_fmt(row[c]).replace("|", "\\|") for c in cols) + " |")
    return "\n".join(lines)


def _html_table(frame: "pd.DataFrame") -> str:
    """A plain HTML table of a DataFrame."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = []
    for _, row in frame.iterrows():
        cells = []
        for col in frame.columns:
            cells.append(f"<td>{html.escape(_fmt(row[col]))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _experiment_runs(exp_dir: Path) -> "pd.DataFrame":
    import pandas as pd

    info = _load_json(exp_dir / "experiment.json") or {}
    order = {s["output"]: i for i, s in enumerate(info.get("stages", []))}
    rows = []
    for marker_path in _run_markers(exp_dir):
        marker = read_marker(marker_path.parent) or {}
        run_dir = marker_path.parent
        rel = run_dir.relative_to(exp_dir.parent)
        notebook = Path(marker.get("notebook", "")).name
        metrics = _load_json(run_dir / "metrics.json") or {}
        summary = training_summary(metrics) if "test" in metrics else {}
        err = marker.get("error") or {}
        rows.append({
            "stage": run_dir.parent.name, "run": run_dir.name, "status": marker.get("status", "?"),
            "accuracy": summary.get("accuracy"), "ATT-COS": summary.get("att_cos"),
            "duration_s": marker.get("duration_s"), "git": marker.get("git_revision"),
            "finished": (marker.get("finished") or "")[:16].replace("T", " "),
            "error": f"{err.get('type', '')}: {err.get('message', '')}"[:160] if err else "",
            "_html": f"{rel}/{Path(notebook).stem}.html" if (run_dir / f"{Path(notebook).stem}.html").exists() else "",
            "_ipynb": f"{rel}/{notebook}" if notebook and (run_dir / notebook).exists() else "",
            "_metrics": f"{rel}/metrics.json" if (run_dir / "metrics.json").exists() else "",
            "_order": order.get(run_dir.parent.name, len(order)),
        })
    frame = pd.DataFrame(rows, columns=["stage", "run", "status", "accuracy", "ATT-COS", "duration_s", "git",
                                        "finished", "error", "_html", "_ipynb", "_metrics", "_order"])
    return frame.sort_values(["_order", "stage", "run"]).reset_index(drop=True)


def _runs_html(runs: "pd.DataFrame") -> str:
    """The per-run table of the index page, with links to the rendered notebook and metrics."""
    head = "".join(f"<th>{c}</th>" for c in ("stage", "run", "status", "accuracy", "ATT-COS", "time (s)", "git",
                                              "finished", "files"))
    rows = []
    for _, row in runs.iterrows():
        target = row["_html"] or row["_ipynb"]
        run = html.escape(row["run"])
        run_cell = f'<a href="{html.escape(target)}">{run}</a>' if target else run
        files = [f'<a href="{html.escape(row[k])}">{label}</a>' for k, label in
                 (("_html", "html"), ("_ipynb", "ipynb"), ("_metrics", "metrics.json")) if row[k]]
        status = html.escape(row["status"])
        if row["error"]:
            status = f"<span class='failed' title='{html.escape(row['error'])}'>{status}</span>"
        cells = [html.escape(row["stage"]), run_cell, status, _fmt(row["accuracy"]), _fmt(row["ATT-COS"]),
                 _fmt(row["duration_s"]), html.escape(str(row["git"] or "")), html.escape(row["finished"]),
                 " ".join(files)]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;
margin:2em auto;padding:0 1em;color:#222;line-height:1.45}table{border-collapse:collapse;margin:.6em 0 1.4em;
font-size:.92em}th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left}th{background:#f2f2f2}
tr:nth-child(even) td{background:#fafafa}code{background:#f4f4f4;padding:0 .25em}h2{margin-top:2em;
border-bottom:1px solid #ddd}.failed{color:#b00020}.muted{color:#666;font-size:.9em}"""


def write_index(results_root: str | os.PathLike = DEFAULT_RESULTS) -> tuple[Path, Path]:
    """Regenerate results/index.html and results/README.md from every experiment folder present."""
    results_root = Path(results_root)
    experiments = sorted(p for p in results_root.iterdir() if p.is_dir() and (p / "experiment.json").exists()) \
        if results_root.exists() else []
    html_parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>fer_lib results</title>"
                  f"<style>{_CSS}</style></head><body><h1>fer_lib results</h1>"
                  "<p>Executed notebooks of the pipeline (<code>python -m fer_lib.workflow.pipeline</code>), rendered to HTML "
                  "with their figures. Each run folder also holds the executed <code>.ipynb</code>, its "
                  "<code>metrics.json</code> (stamped with seed, config and git revision) and <code>run.json</code>."
                  "</p>"]
    md = ["# Results", "",
          "Generated by `python -m fer_lib.workflow.pipeline` (do not edit by hand: the pipeline rewrites this file).",
          "Open [index.html](index.html) in a browser for the rendered notebooks with their figures.",
          "Each run folder `<experiment>/<stage>/<run-id>/` holds the executed notebook (`.ipynb` and `.html`),",
          "its `metrics.json` (stamped with seed, configuration and git revision), `run.json` (parameters,",
          "code version, status, duration) and `run.log` (the kernel's output).", ""]
    for exp_dir in experiments:
        info = _load_json(exp_dir / "experiment.json") or {}
        summary = _load_json(exp_dir / "summary.json") or {}
        name = html.escape(exp_dir.name)
        html_parts.append(f"<h2>{name}</h2><p>{html.escape(info.get('description', ''))}</p>")
        md += [f"## {exp_dir.name}", "", info.get("description", ""), ""]
        meta = (f"experiment file <code>{html.escape(str(info.get('source')))}</code>, seed {info.get('seed')}, "
                f"last pipeline run {html.escape(str(summary.get('finished', '?')))} at git revision "
                f"<code>{html.escape(str(summary.get('git_revision', '?')))}</code>, wall time "
                f"{summary.get('wall_time_s', 0):.0f} s")
        html_parts.append(f"<p class='muted'>{meta}</p>")
        md += [re.sub(r"</?code>", "`", meta) + ".", ""]
        headline = experiment_headline(exp_dir)
        if headline is not None:
            where = html.escape(headline_split(exp_dir))
            html_parts.append(f"<h3>Headline: baseline vs AU-guided ({where})</h3>" + _html_table(headline))
            md += [f"### Headline: baseline vs AU-guided ({where})", "", markdown_table(headline), ""]
        runs = _experiment_runs(exp_dir)
        if runs.empty:
            continue
        html_parts.append("<h3>Runs</h3>" + _runs_html(runs))
        md += ["### Runs", "", "| stage | run | status | accuracy | ATT-COS | notebook | metrics |", "|---|---|---|---|---|---|---|"]
        for _, row in runs.iterrows():
            nb_link = f"[{'html' if row['_html'] else 'ipynb'}]({row['_html'] or row['_ipynb']})" \
                if (row["_html"] or row["_ipynb"]) else "-"
            if row["_html"] and row["_ipynb"]:
                nb_link += f" [ipynb]({row['_ipynb']})"
            met = f"[json]({row['_metrics']})" if row["_metrics"] else "-"
            status = row["status"] + (f" ({row['error']})" if row["error"] else "")
            md.append(f"| {row['stage']} | {row['run']} | {status.replace('|', '/')} | {_fmt(row['accuracy'])} | "
                      f"{_fmt(row['ATT-COS'])} | {nb_link} | {met} |")
        md.append("")
    if not experiments:
        html_parts.append("<p>No results yet: run <code>python -m fer_lib.workflow.pipeline</code>.</p>")
        md.append("No results yet: run `python -m fer_lib.workflow.pipeline`.")
    html_parts.append("</body></html>")
    index = atomic_write_text(results_root / "index.html", "\n".join(html_parts))
    readme = atomic_write_text(results_root / "README.md", "\n".join(md).rstrip() + "\n")
    return index, readme


# --------------------------------------------------------------------------- command line


def format_summary(results: Sequence[RunResult]) -> str:
    """A plain-text table of the runs of this invocation and the status counts."""
    import pandas as pd

    if not results:
        return "no runs selected"
    frame = pd.DataFrame([r.as_row() for r in results])[["stage", "run_id", "status", "duration_s", "error"]]
    frame["error"] = frame["error"].str.slice(0, 90)
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "skipped", "failed", "blocked")}
    return frame.to_string(index=False) + "\n" + ", ".join(f"{v} {k}" for k, v in counts.items())


def format_headline(table: "pd.DataFrame") -> str:
    """The headline table as aligned plain text (lambda as given, scores with 3 decimals, '-' if absent)."""
    shown = table.drop(columns=["train_time_s"]).copy()
    shown["lambda"] = shown["lambda"].map(lambda v: f"{v:g}" if isinstance(v, (int, float)) else _fmt(v))
    for col in ("accuracy", "macro_f1", "ATT-COS", "CAM-COS"):
        shown[col] = shown[col].map(_fmt)
    return shown.to_string(index=False)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of `python -m fer_lib.workflow.pipeline`."""
    parser = argparse.ArgumentParser(
        prog="python -m fer_lib.workflow.pipeline",
        description="Run an experiment (stages of papermill notebooks) into results/<experiment>/.")
    parser.add_argument("experiment", nargs="?", help="experiment .toml file or preset name (default: main)")
    parser.add_argument("--preset", help=f"preset name or file path (presets: {', '.join(available_presets())})")
    parser.add_argument("--jobs", "-j", type=int, help="parallel worker processes per stage (default: the file's jobs)")
    parser.add_argument("--threads", type=int, help="threads per worker (default: max(1, cores // jobs))")
    parser.add_argument("--only", action="append", metavar="STAGE",
                        help="run only this stage (repeatable or comma-separated); others are used as they are")
    parser.add_argument("--force", action="store_true", help="rerun runs even when already complete")
    parser.add_argument("--reuse-stale", action="store_true",
                        help="skip runs completed with the same parameters even if the code changed since")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="override a [variables] entry (value parsed as TOML, else a string)")
    parser.add_argument("--results", default=str(DEFAULT_RESULTS), help="results root folder (default: results/)")
    parser.add_argument("--list", action="store_true", help="print the planned runs and their status, run nothing")
    parser.add_argument("--no-render", action="store_true", help="skip the HTML rendering and index")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: exit 0 if every run succeeded or was skipped, 1 if any failed, 2 on bad input, 3 if busy.

    Bad input and OS errors (a full disk, an unwritable --results) print one line naming the
    file and what to do (fer_lib.utils.run_cli); --debug adds the traceback.
    """
    from fer_lib.utils import run_cli

    parser = build_parser()
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    if args.worker:
        return _worker_main()
    return run_cli(lambda: _main(args), args.debug)


def _main(args: argparse.Namespace) -> int:
    """The body of `main` (errors a user can fix propagate to run_cli)."""
    try:
        if args.experiment and args.preset:
            raise ConfigError("give the experiment either as an argument or with --preset, not both")
        overrides = {}
        for item in args.set:
            if "=" not in item:
                raise ConfigError(f"--set {item!r}: expected NAME=VALUE")
            key, value = item.split("=", 1)
            parsed = parse_value(value)
            if _is_path_key(key) and isinstance(parsed, str) and parsed and not os.path.isabs(parsed):
                parsed = str(Path(parsed).resolve())   # CLI paths are relative to where you run the command
            overrides[key.strip()] = parsed
        experiment = load_experiment(args.experiment or args.preset or "main", overrides)
        only = [s.strip() for item in (args.only or []) for s in item.split(",") if s.strip()]
        if args.list:
            plan = plan_experiment(experiment, args.results)
            for stage in experiment.stages:
                fingerprint = code_fingerprint(stage.notebook) if stage.notebook.is_file() else ""
                for run in plan[stage.name]:
                    done = "complete" if fingerprint and is_complete(run, fingerprint) else "to run"
                    print(f"{stage.name:18s} {run.run_id:50s} {done}")
            return 0
        wall = time.perf_counter()
        results = run_experiment(experiment, results_root=args.results, jobs=args.jobs, only=only,
                                 force=args.force, threads=args.threads, render=not args.no_render,
                                 reuse_stale=args.reuse_stale)
    except PipelineBusy as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    exp_dir = Path(args.results).resolve() / experiment.name
    print("\n" + format_summary(results))
    headline = experiment_headline(exp_dir)
    if headline is not None:
        print(f"\nHeadline ({headline_split(exp_dir)}):\n" + format_headline(headline))
    print(f"\nResults: {exp_dir}  (summary.csv, per-run folders)")
    if not args.no_render:
        print(f"Open {Path(args.results).resolve() / 'index.html'} for the rendered notebooks; "
              f"index: {Path(args.results).resolve() / 'README.md'}")
    print(f"Wall time: {time.perf_counter() - wall:.0f} s")
    return 1 if any(r.status in FAILED for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
