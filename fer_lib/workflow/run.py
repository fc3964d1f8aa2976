"""Running an experiment: one lock per results folder, worker processes, resumability, the CLI.

The second of the pipeline's steps (`plan` -> `run` -> `report`): `run_experiment` takes the plan,
skips complete runs, executes the others stage by stage in worker processes (papermill, a thread
budget each, GPUs round-robin), records each outcome in the run's `run.json`, and hands the
outcomes to `fer_lib.workflow.report`. `main` is the command line (`python -m fer_lib pipeline`).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from tqdm import tqdm   # tqdm.write: log lines that do not break the bar

from fer_lib.training.presets import parse_assignments
from fer_lib.utils import REPO_ROOT, ConfigError, LockHeld, UserError, atomic_write_json, atomic_write_text, \
    PROGRESS_ENV, check_choice, file_lock, git_revision, portable_path, progress_bar, repo_relative, run_cli
from fer_lib.workflow.plan import (DEFAULT_RESULTS, MARKER, Experiment, Run, Stage, is_path_key, portable_value,
    Resolver, available_experiments, code_fingerprint, describe_experiments, is_complete, load_experiment,
    plan_experiment, read_marker)
from fer_lib.workflow.report import (experiment_headline, format_headline, format_summary, headline_split,
    render_notebooks, write_headline, write_index, write_summary)

LOCK_NAME = ".pipeline.lock"
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
               "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "FER_NUM_THREADS")
FAILED = ("failed", "blocked")
BUSY_EXIT = 3   # exit status when another pipeline holds the results folder


class PipelineBusy(LockHeld):
    """Another pipeline holds this experiment's results folder (the lock of `experiment_lock`)."""

    def __init__(self, exp_dir: Path, holder: str = ""):
        self.path, self.holder = Path(exp_dir) / LOCK_NAME, holder
        UserError.__init__(self, f"results folder {exp_dir} is in use by another pipeline ({holder or 'unknown process'}). "
                                 "Wait for it to finish, or run with --results OTHER_DIR.")


# --------------------------------------------------------------------------- lock


@contextlib.contextmanager
def experiment_lock(exp_dir: str | os.PathLike):
    """Hold an exclusive lock on an experiment's results folder; PipelineBusy if another pipeline has it.

    fer_lib.utils.file_lock in its refusing mode; the holder line names this process and command.
    """
    exp_dir = Path(exp_dir)
    exp_dir.mkdir(parents=True, exist_ok=True)
    path = exp_dir / LOCK_NAME
    holder = (f"pid {os.getpid()} on {socket.gethostname()} since "
              f"{_dt.datetime.now().isoformat(timespec='seconds')}: {' '.join(sys.argv)}")
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(file_lock(path, blocking=False, holder=holder))
        except LockHeld as exc:
            raise PipelineBusy(exp_dir, exc.holder) from None
        yield path


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
    """Execute one run in this process (the worker side), never twice at once: a second process that
    finds the run executing (its lock held, on any machine sharing the folder) gives up at once."""
    run_dir = Path(spec["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir.parent / f".{run_dir.name}.lock"
    try:
        with file_lock(lock, blocking=False, holder=f"pid {os.getpid()} on {socket.gethostname()}"):
            return _execute_notebook(spec, run_dir)
    except LockHeld as exc:
        return {"status": "busy", "error": {"type": "RunBusy", "message": str(exc)}}
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()


def _execute_notebook(spec: Mapping[str, Any], run_dir: Path) -> dict[str, Any]:
    """papermill, then the marker, written last."""
    import nbformat
    import papermill   # heavy: imported in the worker process only

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
    atomic_write_json(run_dir / MARKER, repo_relative(marker))
    start = time.perf_counter()
    error: dict[str, Any] | None = None
    try:
        kwargs = {"execution_timeout": spec["timeout_s"]} if spec.get("timeout_s") else {}
        with _kernel_environment({PROGRESS_ENV: "0"}):   # no progress-bar text in the saved notebook
            papermill.execute_notebook(str(notebook), str(partial), parameters=spec["parameters"],
                                       kernel_name="python3", language="python", cwd=str(REPO_ROOT),
                                       progress_bar=False, log_output=True, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any failure of the notebook is recorded, not raised
        error = _error_summary(exc)
    if partial.exists():
        nb = nbformat.read(partial, as_version=4)
        nb.metadata.setdefault("papermill", {})["output_path"] = portable_path(final)
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
    atomic_write_json(run_dir / MARKER, repo_relative(marker))
    return marker


@contextlib.contextmanager
def _kernel_environment(variables: Mapping[str, str]):
    """Set environment variables while a notebook's kernel starts (it inherits this process's environment)."""
    saved = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


BUSY_RUN_EXIT = 75  # the worker found the run executing elsewhere (its lock held) and did nothing


def _worker_main() -> int:
    spec = json.loads(sys.stdin.read())
    marker = execute_run(spec)
    return {"ok": 0, "busy": BUSY_RUN_EXIT}.get(marker["status"], 1)



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
        """The summary.csv/json row (folders inside the repository relative to its root)."""
        return {"stage": self.stage, "run_id": self.run_id, "status": self.status,
                "duration_s": round(self.duration_s, 1), "error": repo_relative(self.error),
                "run_dir": repo_relative(self.run_dir)}



def _fresh_folder(run: Run, fresh: bool) -> Path:
    """Prepare the run's folder: a failed or interrupted run restarts in it (training resumes from its
    checkpoints); a completed one that is redone (changed code, or `fresh`) starts from an empty folder,
    the old one kept aside (returned path) until the new one succeeds."""
    superseded = run.run_dir.parent / f".superseded-{run.run_id}"
    previous = read_marker(run.run_dir) or {}
    if run.run_dir.exists() and (fresh or previous.get("status") == "ok"):
        shutil.rmtree(superseded, ignore_errors=True)
        os.replace(run.run_dir, superseded)
    run.run_dir.mkdir(parents=True, exist_ok=True)
    return superseded


def run_worker_process(run_dir: str | os.PathLike, spec: Mapping[str, Any], env: Mapping[str, str],
                       procs: set | None = None) -> int:
    """Execute one run in a fresh worker process (`python -m fer_lib.workflow.run --worker`, papermill
    inside, output in run.log); returns its exit code. Local workers and Dask tasks both call this."""
    with open(Path(run_dir) / "run.log", "w", encoding="utf-8") as log:
        proc = subprocess.Popen([sys.executable, "-m", "fer_lib.workflow.run", "--worker"], stdin=subprocess.PIPE,
                                stdout=log, stderr=subprocess.STDOUT, env=dict(env), cwd=str(REPO_ROOT), text=True)
        if procs is not None:
            procs.add(proc)
        try:
            proc.communicate(json.dumps(dict(spec)))
        finally:
            if procs is not None:
                procs.discard(proc)
    return proc.returncode


def _launch(run: Run, spec: dict[str, Any], execute: Callable[[Run, dict[str, Any]], int],
            fresh: bool = False) -> RunResult:
    """Execute one run (`execute` returns the worker's exit code) and turn its marker into a RunResult."""
    start = time.perf_counter()
    superseded = _fresh_folder(run, fresh)
    returncode = execute(run, spec)
    if returncode == BUSY_RUN_EXIT:  # another process executes this run right now: leave its files alone
        return RunResult(run.stage, run.run_id, "failed", time.perf_counter() - start,
                         "RunBusy: the run is executing in another process; not started twice", str(run.run_dir))
    marker = read_marker(run.run_dir) or {}
    status = marker.get("status") if marker.get("config_hash") == run.config_hash else None
    if returncode == 0 and status == "ok":
        shutil.rmtree(superseded, ignore_errors=True)
        return RunResult(run.stage, run.run_id, "ok", time.perf_counter() - start, "", str(run.run_dir))
    err = marker.get("error") or {}
    message = f"{err.get('type', 'WorkerError')}: {err.get('message', '')}".strip() if err else \
        f"worker exited with code {returncode} (see {portable_path(run.run_dir / 'run.log')})"
    if status != "failed":
        marker.update(status="failed", error={"type": "WorkerError", "message": message})
        atomic_write_json(run.run_dir / MARKER, repo_relative(marker))
    short = message.splitlines()[0][:300] if message else ""
    if superseded.exists():
        short += f" (the previous results are kept in {superseded})"
    return RunResult(run.stage, run.run_id, "failed", time.perf_counter() - start, short, str(run.run_dir))


class LocalExecutor:
    """Runs on this machine: `jobs` worker processes at a time, each with its thread budget and GPU."""

    def __init__(self, jobs: int, threads: int | None, gpus: Sequence[str]):
        self.jobs, self.threads, self.gpus = jobs, threads, list(gpus)
        self.slots: queue.Queue[int] = queue.Queue()
        for slot in range(jobs):
            self.slots.put(slot)
        self.procs: set = set()

    @property
    def width(self) -> int:
        return self.jobs

    def __call__(self, run: Run, spec: dict[str, Any]) -> int:
        slot = self.slots.get()
        try:
            return run_worker_process(run.run_dir, spec, worker_env(slot, self.jobs, self.threads, self.gpus),
                                      self.procs)
        finally:
            self.slots.put(slot)

    def cancel(self) -> None:
        for proc in list(self.procs):
            with contextlib.suppress(OSError):
                proc.terminate()

    def close(self) -> None:
        pass


def _dask_task(run_dir: str, spec: dict[str, Any], overrides: dict[str, str]) -> int:
    """A Dask task: one run in a worker process on the Dask worker's machine (its environment + overrides)."""
    return run_worker_process(run_dir, spec, {**os.environ, **overrides})


class DaskExecutor:
    """Runs on a Dask cluster (dask.distributed): every run of a stage is submitted at once as one task with
    a unique key and no retries; the cluster's workers decide how many run together. The results folder must
    be on a file system that the workers share (the usual /home or /scratch of a cluster).

    scheduler: a scheduler address (tcp://host:8786), "local" (a LocalCluster of `jobs` single-threaded
    worker processes here), or a distributed.Client. On SLURM: `dask_jobqueue.SLURMCluster(...)`, then
    `cluster.scale(jobs=N)` and its `cluster.scheduler_address` (README, "Sweeps")."""

    def __init__(self, scheduler: Any, jobs: int, threads: int | None):
        from distributed import Client, LocalCluster

        self._own = not isinstance(scheduler, Client)
        self._cluster = None
        if scheduler == "local":
            self._cluster = LocalCluster(n_workers=jobs, threads_per_worker=1, processes=True, dashboard_address=None)
            scheduler = self._cluster
        self.client = scheduler if not self._own else Client(scheduler)
        self.overrides = {var: str(threads) for var in THREAD_VARS} if threads else {}
        self.overrides["PYTHONUNBUFFERED"] = "1"
        self.futures: set = set()

    @property
    def width(self) -> int:
        return 1 << 16  # submit everything; the cluster queues

    def __call__(self, run: Run, spec: dict[str, Any]) -> int:
        key = f"fer-{spec['experiment']}-{run.stage}-{run.run_id}-{run.config_hash}-{time.time_ns()}"
        future = self.client.submit(_dask_task, str(run.run_dir), spec, self.overrides, key=key, pure=False,
                                    retries=0)
        self.futures.add(future)
        try:
            return int(future.result())
        except Exception as exc:  # noqa: BLE001 - a lost worker or a task error: the run failed, reported
            atomic_write_json(run.run_dir / "dask_error.json", {"type": type(exc).__name__, "message": str(exc)})
            return 1
        finally:
            self.futures.discard(future)

    def cancel(self) -> None:
        self.client.cancel(list(self.futures))

    def close(self) -> None:
        if self._own:
            self.client.close()
        if self._cluster is not None:
            self._cluster.close()


EXECUTORS = ("local", "dask")


@dataclass
class RunOptions:
    """How `run_experiment` runs: where results go, parallelism, which stages, what to redo."""

    results_root: str | os.PathLike = DEFAULT_RESULTS
    jobs: int | None = None          # worker processes per stage (default: the experiment's `jobs`)
    only: Sequence[str] | None = None  # stage names to run (others are used as they are)
    force: bool = False              # rerun completed runs
    threads: int | None = None       # threads per worker (default: max(1, cores // jobs))
    render: bool = True              # HTML renderings and the results index afterwards
    verbose: bool = True
    reuse_stale: bool = False        # skip runs completed with the same parameters even if the code changed
    executor: str = "local"          # local worker processes, or "dask" (a dask.distributed cluster)
    scheduler: Any = None            # for dask: an address, "local" (a LocalCluster here) or a Client


def run_experiment(experiment: Experiment, options: RunOptions | None = None, **overrides: Any) -> list[RunResult]:
    """Run the experiment's stages as a graph: a stage starts once every stage whose runs it uses has run
    (`stage_waves`), stages that are ready run side by side in one pool of workers; then write the summaries.

    `overrides` are RunOptions fields (results_root, jobs, only, force, threads, render, verbose,
    reuse_stale): `force` reruns completed runs; `reuse_stale` skips runs completed with the same
    parameters even when the code fingerprint changed since (for edits known not to affect results).
    """
    opts = dataclasses.replace(options or RunOptions(), **overrides)
    jobs = int(opts.jobs or experiment.jobs)
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    selected = list(opts.only) if opts.only else [s.name for s in experiment.stages]
    for name in selected:
        notebook = experiment.stage(name).notebook
        if not notebook.is_file():
            raise ConfigError(f"stage {name!r}: notebook {notebook} does not exist")
    plan = plan_experiment(experiment, opts.results_root)
    results_root = Path(opts.results_root).resolve()
    exp_dir = results_root / experiment.name
    check_choice("executor", opts.executor, EXECUTORS)
    if opts.executor == "dask" and opts.scheduler is None:
        raise ConfigError("--executor dask needs --scheduler ADDRESS (tcp://host:8786) or --scheduler local")
    session = _Session(experiment, plan, exp_dir, opts, jobs)
    with experiment_lock(exp_dir):
        _write_experiment_info(experiment, exp_dir, plan)
        started = time.perf_counter()
        executor = DaskExecutor(opts.scheduler, jobs, opts.threads) if opts.executor == "dask" else \
            LocalExecutor(jobs, opts.threads, session.gpus)
        try:
            for wave in stage_waves(experiment, plan, selected):
                session.run_wave(wave, executor)
        finally:
            executor.close()
        write_summary(exp_dir, session.results, time.perf_counter() - started)
        write_headline(exp_dir)
    if opts.render:
        render_notebooks(exp_dir, verbose=opts.verbose)
        write_index(results_root)
    return session.results


class _Session:
    """The state of one `run_experiment` call: outcomes so far, and how to run a stage's runs."""

    def __init__(self, experiment: Experiment, plan: dict[str, list[Run]], exp_dir: Path, opts: RunOptions,
                 jobs: int):
        self.experiment, self.plan, self.exp_dir, self.opts, self.jobs = experiment, plan, exp_dir, opts, jobs
        self.results: list[RunResult] = []
        self.status_of: dict[tuple[str, str], str] = {}
        self.gpus = gpu_ids()
        self.revision = git_revision()
        self.log: Callable[[str], None] = (lambda msg: tqdm.write(msg)) if opts.verbose else (lambda msg: None)

    def record(self, result: RunResult) -> None:
        self.results.append(result)
        self.status_of[(result.stage, result.run_id)] = result.status

    def fingerprint_of(self, run: Run) -> str | None:
        return None if self.opts.reuse_stale else code_fingerprint(run.notebook)

    def triage(self, stage: Stage, fingerprint: str | None) -> list[Run]:
        """Record the stage's blocked and complete runs; return the ones to execute."""
        todo: list[Run] = []
        for run in self.plan[stage.name]:
            blocker = _blocker(run, self.plan, self.status_of, exp_dir=self.exp_dir, experiment=self.experiment,
                               fingerprint_of=self.fingerprint_of)
            if blocker:
                self.record(RunResult(run.stage, run.run_id, "blocked", 0.0, blocker, str(run.run_dir)))
            elif not self.opts.force and is_complete(run, fingerprint):
                self.record(RunResult(run.stage, run.run_id, "skipped", 0.0, "", str(run.run_dir)))
            else:
                todo.append(run)
                continue
            self.log(f"[{stage.name}] {self.results[-1].status:8s} {run.run_id} {self.results[-1].error}")
        return todo

    def spec(self, run: Run, fingerprint: str) -> dict[str, Any]:
        """What a worker process needs to execute `run` (sent as JSON on its stdin)."""
        return {"experiment": self.experiment.name, "stage": run.stage, "run_id": run.run_id,
                "run_name": run.run_name, "config_hash": run.config_hash, "notebook": str(run.notebook),
                "run_dir": str(run.run_dir), "parameters": run.parameters, "portable": run.portable,
                "code_fingerprint": fingerprint, "git_revision": self.revision,
                "timeout_s": run.timeout_s, "require_metrics": run.require_metrics}

    def run_wave(self, stages: Sequence[Stage], executor: "LocalExecutor | DaskExecutor") -> None:
        """Run the pending runs of `stages` side by side; a warm_up stage's first run goes alone before the
        stage's other runs (it builds the shared caches), while other stages' runs go on."""
        fingerprints = {st.name: code_fingerprint(st.notebook) for st in stages}
        first: list[tuple[Stage, Run]] = []
        after_warm_up: dict[str, list[Run]] = {}
        for st in stages:
            todo = self.triage(st, None if self.opts.reuse_stale else fingerprints[st.name])
            if not todo:
                continue
            width = min(executor.width, len(todo))
            where = f"{width} worker(s)" if isinstance(executor, LocalExecutor) else "the Dask cluster"
            self.log(f"[{st.name}] running {len(todo)} of {len(self.plan[st.name])} run(s) with {where}")
            split = st.warm_up and executor.width > 1 and len(todo) > 1
            first += [(st, r) for r in (todo[:1] if split else todo)]
            after_warm_up[st.name] = todo[1:] if split else []
        if not first:
            return
        total = len(first) + sum(map(len, after_warm_up.values()))
        bar = progress_bar(total=total, unit="run", disable=not self.opts.verbose or not sys.stderr.isatty())
        pool = ThreadPoolExecutor(max_workers=min(executor.width, total))
        submit = lambda st, r: pool.submit(_launch, r, self.spec(r, fingerprints[st.name]), executor,  # noqa: E731
                                           self.opts.force)
        running = {submit(st, r): st for st, r in first}
        done: list[RunResult] = []
        try:
            while running:
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    st = running.pop(future)
                    result = future.result()
                    done.append(result)
                    bar.update(1)
                    self.log(f"[{st.name}] {result.status:8s} {result.run_id} ({result.duration_s:.0f} s) {result.error}")
                    for r in after_warm_up.pop(st.name, []):
                        running[submit(st, r)] = st
        except KeyboardInterrupt:
            executor.cancel()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        finally:
            pool.shutdown(wait=True)
            bar.close()
        order = {(st.name, r.run_id): (k, i) for k, st in enumerate(stages) for i, r in enumerate(self.plan[st.name])}
        for result in sorted(done, key=lambda res: order[(res.stage, res.run_id)]):
            self.record(result)


def stage_waves(experiment: Experiment, plan: dict[str, list[Run]], selected: Sequence[str]) -> list[list[Stage]]:
    """The selected stages in waves: a stage joins the first wave after every stage its runs need
    ({run:STAGE/...}, {stage:STAGE}) has run; stages not selected count as done (used as they are)."""
    needs = {st.name: {name for r in plan[st.name] for name, _ in r.needs_runs} | {name for r in plan[st.name]
                                                                                    for name in r.needs_stages}
             for st in experiment.stages}
    done = {st.name for st in experiment.stages if st.name not in selected}
    todo = [st for st in experiment.stages if st.name in selected]
    waves: list[list[Stage]] = []
    while todo:
        wave = [st for st in todo if needs[st.name] <= done] or todo[:1]
        waves.append(wave)
        done |= {st.name for st in wave}
        todo = [st for st in todo if st not in wave]
    return waves


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
    headline: dict[str, str | list[str]] = {}
    resolver = Resolver(experiment, exp_dir, plan)
    for key, ref in experiment.headline.items():
        headline[key] = [os.path.relpath(resolver.resolve(r), exp_dir) for r in ref] if isinstance(ref, list) \
            else os.path.relpath(resolver.resolve(ref), exp_dir)
    try:
        source = str(experiment.source.relative_to(REPO_ROOT)) if experiment.source else None
    except ValueError:
        source = str(experiment.source)
    atomic_write_json(exp_dir / "experiment.json", {
        "name": experiment.name, "description": experiment.description, "source": source,
        "seed": experiment.seed, "variables": portable_value(experiment.variables),
        "stages": [{"name": s.name, "output": s.output, "notebook": s.notebook.name,
                    "description": s.description} for s in experiment.stages],
        "headline": headline,
    })



# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of `python -m fer_lib pipeline` (= `python -m fer_lib.workflow.pipeline`)."""
    parser = argparse.ArgumentParser(
        prog="python -m fer_lib pipeline",
        description="Run an experiment (stages of papermill notebooks) into results/<experiment>/.",
        epilog="Experiments are the files experiments/*.toml (--list-experiments); training recipes, a "
               "different namespace, are listed by python -m fer_lib.training.presets --list.")
    parser.add_argument("experiment", nargs="?",
                        help=f"experiment name or .toml file (default: main; experiments: {', '.join(available_experiments())})")
    parser.add_argument("--preset", metavar="EXPERIMENT", help="the same as the positional EXPERIMENT (former spelling)")
    parser.add_argument("--jobs", "-j", type=int, help="parallel worker processes per stage (default: the file's jobs)")
    parser.add_argument("--threads", type=int, help="threads per worker (default: max(1, cores // jobs))")
    parser.add_argument("--only", action="append", metavar="STAGE",
                        help="run only this stage (repeatable or comma-separated); others are used as they are")
    parser.add_argument("--force", action="store_true", help="rerun runs even when already complete")
    parser.add_argument("--reuse-stale", action="store_true",
                        help="skip runs completed with the same parameters even if the code changed since")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="override a [variables] entry (value parsed as TOML, else JSON, else a string)")
    parser.add_argument("--results", default=str(DEFAULT_RESULTS), help="results root folder (default: results/)")
    parser.add_argument("--list", action="store_true", help="print the planned runs and their status, run nothing")
    parser.add_argument("--list-experiments", action="store_true", help="list the experiments of experiments/")
    parser.add_argument("--no-render", action="store_true", help="skip the HTML rendering and index")
    parser.add_argument("--executor", choices=EXECUTORS, default="local",
                        help="where runs execute: local worker processes (default) or a Dask cluster")
    parser.add_argument("--scheduler", metavar="ADDRESS",
                        help="with --executor dask: the scheduler (tcp://host:8786), or 'local' for a LocalCluster here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: exit 0 if every run succeeded or was skipped, 1 if any failed, 2 on bad input, 3 if busy.

    Bad input and OS errors (a full disk, an unwritable --results) print one line naming the
    file and what to do (fer_lib.utils.run_cli); --debug adds the traceback.
    """
    parser = build_parser()
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    if args.worker:
        return _worker_main()
    return run_cli(lambda: _main(args), args.debug)


def _overrides(items: Sequence[str]) -> dict[str, Any]:
    """--set NAME=VALUE items; relative paths given on the command line are taken from the current folder."""
    overrides = parse_assignments(items)
    for key, parsed in overrides.items():
        if is_path_key(key) and isinstance(parsed, str) and parsed and not os.path.isabs(parsed):
            overrides[key] = str(Path(parsed).resolve())
    return overrides


def _print_plan(experiment: Experiment, results: str) -> None:
    plan = plan_experiment(experiment, results)
    for stage in experiment.stages:
        fingerprint = code_fingerprint(stage.notebook) if stage.notebook.is_file() else ""
        for run in plan[stage.name]:
            done = "complete" if fingerprint and is_complete(run, fingerprint) else "to run"
            print(f"{stage.name:18s} {run.run_id:50s} {done}")


def _main(args: argparse.Namespace) -> int:
    """The body of `main` (errors a user can fix propagate to run_cli)."""
    if args.list_experiments:
        print("experiments (python -m fer_lib pipeline NAME; training recipes: python -m fer_lib.training.presets --list):")
        for name, description in describe_experiments().items():
            print(f"  {name:18s} {description}")
        return 0
    try:
        if args.experiment and args.preset:
            raise ConfigError("give the experiment either as an argument or with --preset, not both")
        experiment = load_experiment(args.experiment or args.preset or "main", _overrides(args.set))
        only = [s.strip() for item in (args.only or []) for s in item.split(",") if s.strip()]
        if args.list:
            _print_plan(experiment, args.results)
            return 0
        wall = time.perf_counter()
        results = run_experiment(experiment, results_root=args.results, jobs=args.jobs, only=only,
                                 force=args.force, threads=args.threads, render=not args.no_render,
                                 reuse_stale=args.reuse_stale, executor=args.executor, scheduler=args.scheduler)
    except PipelineBusy as exc:
        print(f"error: {exc}", file=sys.stderr)
        return BUSY_EXIT
    exp_dir = Path(args.results).resolve() / experiment.name
    print("\n" + format_summary(results))
    headline = experiment_headline(exp_dir)
    if headline is not None:
        print(f"\nHeadline ({headline_split(exp_dir)}):\n" + format_headline(headline))
    print(f"\nResults: {portable_path(exp_dir)}  (summary.csv, per-run folders)")
    if not args.no_render:
        print(f"Open {portable_path(Path(args.results) / 'index.html')} for the rendered notebooks; "
              f"index: {portable_path(Path(args.results) / 'README.md')}")
    print(f"Wall time: {time.perf_counter() - wall:.0f} s")
    return 1 if any(r.status in FAILED for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
