"""Run parameterised notebooks as reproducible experiments: papermill sweeps, resumable and parallel.

An experiment file (TOML, in experiments/) lists ordered stages; each stage runs one notebook
over a set of configurations and writes, per configuration, into
`results/<experiment>/<stage>/<run-id>/`: the executed notebook, the notebook's own
`metrics.json` (and figures; written with `fer_lib.metrics.write_metrics` in the one schema, which
the headline reads at one key path per number), `run.log` (kernel output) and `run.json` (the
completion marker: status, parameters, code version). Usage:

    python -m fer_lib pipeline experiments/main.toml --jobs 2      (= python -m fer_lib.workflow.pipeline)
    python -m fer_lib pipeline paper --set data_root=/data/rafdb --set dataset=rafdb
    python -m fer_lib pipeline --list-experiments

The code is split by step, and this module re-exports their public names:
`fer_lib.workflow.plan` (experiment files, placeholders, planning, run identity and completion
markers), `fer_lib.workflow.run` (the lock, worker processes, resumability, the command line) and
`fer_lib.workflow.report` (summaries, the headline table, HTML renderings, results/index.html and
README.md). Experiments (experiments/*.toml, by name: `main`, `paper`, ...; `--preset NAME` is
the former spelling) are not the training recipes of `fer_lib.training.presets`; both take
`--set NAME=VALUE` with one syntax (a TOML value, else JSON, else a string).

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
folder) and `seed`. Relative values of parameters named checkpoint/weights or ending in
_dir/_root/_path/_file/_checkpoint are taken from the repository root (relative paths given
with --set: from the current directory). Notebooks run with the repository root as working
directory, and every path inside the repository reaches them (and run.json) relative to it
("results/main/train/..."), paths outside it absolute: the executed notebooks and results files
hold no machine's folder and work from any checkout. Progress bars are off in the notebooks the
pipeline executes (FER_LIB_PROGRESS=0, fer_lib.utils.progress_bar): saved outputs hold no bar text.

A run is skipped when its run.json says "ok" for the same parameters and the same code
fingerprint (a content hash of fer_lib/ and of the notebook; git_revision() is recorded for
provenance); --reuse-stale ignores the code fingerprint, --force reruns everything. A failed
or interrupted run restarts in its folder (training resumes from its checkpoints); a finished
run that is redone starts from an empty folder. A failing notebook is kept, executed up to its
traceback, and the other runs go on; runs that need a failed run's folder are "blocked".
Each run executes in its own worker process with a thread budget of max(1, cores // jobs)
(OMP/MKL/OpenBLAS threads; GPUs round-robin through CUDA_VISIBLE_DEVICES). Stages form a graph:
a stage starts once the stages whose runs it uses ({run:...}, {stage:...}) have run, and stages that
are ready run side by side in one pool of workers (`run.stage_waves`). One pipeline per
experiment folder at a time (a file lock; a second one exits with status 3 and says who holds it). At the end: summary.csv/json
per experiment, an HTML rendering beside every executed notebook, results/index.html and
results/README.md; exit status 0 if nothing failed, 1 if a run failed or was blocked, 2 for
an invalid experiment or option.
"""
from __future__ import annotations

import sys

from fer_lib.metrics import CAM_PREFERENCE, HEADLINE_PATHS, write_metrics
from fer_lib.workflow.plan import (CODE_DIRS, DEFAULT_RESULTS, EXPERIMENTS_DIR, MARKER, Experiment, Run, Stage,
    available_experiments, available_presets, code_fingerprint, describe_experiments, experiment_from_dict,
    is_complete, load_experiment, notebook_parameters, parse_assignments, parse_value, plan_experiment, read_marker,
    resolve_experiment_path)
from fer_lib.workflow.report import (ablation_summary, collect_training_runs, comparison_headline,
    experiment_headline, format_headline, format_summary, headline_split, headline_table, markdown_table,
    render_notebooks, training_headline_row, write_index, write_summary)
from fer_lib.workflow.run import (BUSY_EXIT, FAILED, LOCK_NAME, THREAD_VARS, PipelineBusy, RunOptions, RunResult,
    build_parser, cpu_count, execute_run, experiment_lock, gpu_ids, main, run_experiment, stage_waves, worker_env)

__all__ = [
    "BUSY_EXIT", "CAM_PREFERENCE", "CODE_DIRS", "DEFAULT_RESULTS", "EXPERIMENTS_DIR", "FAILED", "HEADLINE_PATHS",
    "LOCK_NAME", "MARKER", "THREAD_VARS", "Experiment", "PipelineBusy", "Run", "RunOptions", "RunResult", "Stage",
    "ablation_summary", "available_experiments", "available_presets", "build_parser", "code_fingerprint",
    "collect_training_runs", "comparison_headline", "cpu_count", "describe_experiments", "execute_run",
    "experiment_from_dict", "experiment_headline", "experiment_lock", "format_headline", "format_summary",
    "gpu_ids", "headline_split", "headline_table", "is_complete", "load_experiment", "main", "markdown_table",
    "notebook_parameters", "parse_assignments", "parse_value", "plan_experiment", "read_marker",
    "render_notebooks", "resolve_experiment_path", "run_experiment", "stage_waves", "training_headline_row", "worker_env",
    "write_index", "write_metrics", "write_summary",
]

if __name__ == "__main__":
    sys.exit(main())
