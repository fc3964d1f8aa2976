"""Experiment files and planning: parse an experiment (TOML), resolve its placeholders, expand
every stage into runs with stable run ids, and decide which runs are already complete.

This is the first of the pipeline's three steps (`plan` -> `run` -> `report`); the format of an
experiment file is documented in `fer_lib.workflow.pipeline`. Named experiments are the files in
experiments/ (`available_experiments`); they are a different namespace from the training recipes of
`fer_lib.training.presets`. `--set` values are read by the project's one parser,
`fer_lib.training.presets.parse_value` (TOML, else JSON, else a string).

A run's identity: `config_hash` of the notebook name and its portable parameters (the repository
root written as {repo}); its folder `<results>/<experiment>/<stage>/<run-id>/`; its completion
marker `run.json` (`read_marker`, `is_complete`) and the code fingerprint it was made with.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import itertools
import json
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import nbformat

from fer_lib.training.presets import parse_assignments, parse_value
from fer_lib.utils import REPO_ROOT, ConfigError, config_hash, repo_relative

EXPERIMENTS_DIR = REPO_ROOT / "experiments"
DEFAULT_RESULTS = REPO_ROOT / "results"
CODE_DIRS: tuple[Path, ...] = (REPO_ROOT / "fer_lib",)   # what the code fingerprint covers
MARKER = "run.json"
RESERVED_KEYS = ("run_name",)
PATH_SUFFIXES = ("_dir", "_root", "_path", "_file", "_checkpoint")
STAGE_KEYS = {"name", "notebook", "parameters", "configs", "grid", "output", "timeout_s",
              "require_metrics", "warm_up", "description"}
EXPERIMENT_KEYS = {"name", "description", "seed", "jobs"}
TOP_KEYS = {"experiment", "variables", "defaults", "stage", "headline"}
HEADLINE_KEYS = ("baseline", "guided", "interpret", "shortcut", "comparison", "figures")
_PLACEHOLDER = re.compile(r"\{(repo|results)\}|\{(var|stage|run):([^{}]+)\}")
_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"

__all__ = [
    "CODE_DIRS", "DEFAULT_RESULTS", "EXPERIMENTS_DIR", "MARKER", "Experiment", "Run", "Stage",
    "available_experiments", "available_presets", "code_fingerprint", "experiment_from_dict", "is_complete",
    "load_experiment", "notebook_parameters", "parse_assignments", "parse_value", "plan_experiment",
    "read_marker", "resolve_experiment_path",
]


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
    headline: dict[str, str | list[str]] = field(default_factory=dict)  # figures: a list of paths

    def stage(self, name: str) -> Stage:
        """The stage called `name` (ConfigError listing the stages otherwise)."""
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise ConfigError(f"unknown stage {name!r} in experiment {self.name!r}; "
                          f"valid choices: {', '.join(s.name for s in self.stages)}")


def available_experiments() -> list[str]:
    """Names of the experiment files shipped in experiments/ (what `python -m fer_lib pipeline NAME` runs)."""
    return sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.toml"))


available_presets = available_experiments   # the former name ("--preset NAME")


def describe_experiments() -> dict[str, str]:
    """Experiment name -> the description in its [experiment] table (first line)."""
    out = {}
    for name in available_experiments():
        try:
            head = tomllib.loads((EXPERIMENTS_DIR / f"{name}.toml").read_text(encoding="utf-8")).get("experiment", {})
        except (OSError, tomllib.TOMLDecodeError):
            head = {}
        out[name] = str(head.get("description", "")).strip().split("\n")[0][:110]
    return out


def resolve_experiment_path(name_or_path: str | os.PathLike) -> Path:
    """Map an experiment name (main, paper; formerly "preset") or a file path to an existing experiment file."""
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
    raise ConfigError(f"unknown preset {str(name_or_path)!r} (an experiment name); valid choices: "
                      f"{', '.join(available_experiments()) or '(none in experiments/)'} or a .toml path")




def _check_keys(where: str, mapping: Mapping[str, Any], allowed: Iterable[str]) -> None:
    allowed = set(allowed)
    unknown = sorted(set(mapping) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(allowed))}")




def _parse_stage(raw: Mapping[str, Any], where: str, earlier: list[Stage]) -> Stage:
    """One validated [[stage]] table."""
    _check_keys(where, raw, STAGE_KEYS)
    if "name" not in raw or "notebook" not in raw:
        raise ConfigError(f"{where}: 'name' and 'notebook' are required")
    sname = str(raw["name"])
    if not re.fullmatch(_NAME, sname):
        raise ConfigError(f"{where}: stage name {sname!r} must be letters, digits, '.', '_' or '-'")
    if any(s.name == sname for s in earlier):
        raise ConfigError(f"{where}: duplicate stage name {sname!r}")
    notebook = Path(raw["notebook"])
    notebook = notebook if notebook.is_absolute() else REPO_ROOT / notebook
    grid = dict(raw.get("grid", {}))
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: grid.{key} must be a non-empty list of values, got {values!r}")
    configs = raw.get("configs", [{}])
    if not isinstance(configs, list) or not configs or not all(isinstance(c, dict) for c in configs):
        raise ConfigError(f"{where}: configs must be a non-empty list of tables")
    timeout = raw.get("timeout_s")
    return Stage(
        name=sname, notebook=notebook, parameters=dict(raw.get("parameters", {})),
        configs=[dict(c) for c in configs], grid=grid, output=str(raw.get("output", sname)),
        timeout_s=float(timeout) if timeout is not None else None,
        require_metrics=bool(raw.get("require_metrics", True)), warm_up=bool(raw.get("warm_up", False)),
        description=str(raw.get("description", "")),
    )


def experiment_from_dict(data: Mapping[str, Any], source: Path | None = None,
                         overrides: Mapping[str, Any] | None = None) -> Experiment:
    """Validate a parsed experiment mapping (the TOML document) into an Experiment."""
    where = str(source) if source else "experiment"
    _check_keys(where, data, TOP_KEYS)
    head = dict(data.get("experiment", {}))
    _check_keys(f"{where} [experiment]", head, EXPERIMENT_KEYS)
    name = str(head.get("name") or (source.stem if source else "experiment"))
    if not re.fullmatch(_NAME, name):
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
        stages.append(_parse_stage(raw, f"{where} stage #{index + 1}", stages))
    headline = dict(data.get("headline", {}))
    _check_keys(f"{where} [headline]", headline, HEADLINE_KEYS)
    if not isinstance(headline.get("figures", []), list):
        raise ConfigError(f"{where} [headline]: figures must be a list of paths (\"{{run:stage}}/figure.png\"), "
                          f"got {headline['figures']!r}")
    jobs = int(head.get("jobs", 1))
    if jobs < 1:
        raise ConfigError(f"{where}: jobs must be >= 1, got {jobs}")
    return Experiment(name=name, source=source, stages=stages, description=str(head.get("description", "")),
                      seed=int(head.get("seed", 0)), jobs=jobs, variables=variables,
                      defaults=dict(data.get("defaults", {})), headline={k: [str(f) for f in v] if isinstance(v, list) else str(v)
                                                          for k, v in headline.items()})


def load_experiment(name_or_path: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> Experiment:
    """Read an experiment file (an experiment name or a .toml path), applying --set variable overrides."""
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
    parameters: dict[str, Any]           # as injected, incl. output_dir and seed; paths in the repo relative to
                                         # its root (the kernel runs there), others absolute
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


def is_path_key(key: str) -> bool:
    """Parameters whose relative values are paths, taken from the repository root (not the current folder)."""
    return key in ("checkpoint", "weights") or key.endswith(PATH_SUFFIXES)


def portable_value(value: Any) -> Any:
    """Replace the repository root in strings by {repo}, so hashes survive moving the checkout."""
    root = str(REPO_ROOT)
    if isinstance(value, str):
        return value.replace(root, "{repo}")
    if isinstance(value, list):
        return [portable_value(v) for v in value]
    if isinstance(value, dict):
        return {k: portable_value(v) for k, v in value.items()}
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


class Resolver:
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
        if is_path_key(key) and isinstance(value, str) and value and not os.path.isabs(value) \
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
            resolver = Resolver(experiment, exp_dir, plan)
            declared = notebook_parameters(stage.notebook)
            defaults = {k: v for k, v in experiment.defaults.items() if declared is None or k in declared}
            params = {"seed": experiment.seed, **defaults, **stage.parameters, **overrides}
            unknown = sorted(set(params) - {"seed", "output_dir"} - (declared if declared is not None else set(params)))
            if unknown:
                raise ConfigError(f"stage {stage.name!r}: parameter(s) {', '.join(unknown)} not declared in the "
                                  f"parameters cell of {stage.notebook.name}; valid choices: "
                                  f"{', '.join(sorted(declared))}")
            params = _absolutise(resolver.resolve(params))
            portable = portable_value(params)
            chash = config_hash({"notebook": stage.notebook.name, "parameters": portable}, length=8)
            readable = _slug(run_name) if run_name else "_".join(f"{k}={_slug(overrides.get(k))}" for k in varying)
            readable = readable[:80].strip("_-") or "run"
            run_id = f"{readable}-{chash[:6]}"
            if any(r.config_hash == chash for r in runs):
                raise ConfigError(f"stage {stage.name!r}: two configurations have identical parameters "
                                  f"({run_id}); remove the duplicate")
            run_dir = exp_dir / stage.output / run_id
            params = repo_relative({**params, "output_dir": str(run_dir)})   # what the notebook and run.json see
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


# --------------------------------------------------------------------------- code version, completion markers


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
