"""Tests of fer_lib.workflow.pipeline: papermill sweeps, resumption, failures, placeholders, locking, index."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from fer_lib.workflow import pipeline, plan, report
from fer_lib.metrics import METRICS_SCHEMA, check_metrics, write_metrics
from fer_lib.training import presets
from fer_lib.utils import REPO_ROOT, ConfigError

KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}


def make_notebook(path: Path, parameters: str, body: str) -> Path:
    """Write a tiny parameterised notebook (first code cell tagged `parameters`)."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = KERNELSPEC
    nb.metadata["language_info"] = {"name": "python"}
    params = nbformat.v4.new_code_cell(textwrap.dedent(parameters))
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(textwrap.dedent(body))]
    nbformat.write(nb, path)
    return path


# A notebook that records what it was given, and fails on request (x == 13).
WRITE_METRICS = """
import json, os, pathlib, time
t_start = time.time()
out = pathlib.Path(output_dir)
assert out.is_absolute(), output_dir
if x == 13:
    raise ValueError("deliberate failure for x=13")
(out / "metrics.json").write_text(json.dumps({
    "x": x, "seed": seed, "square": x * x, "cwd": os.getcwd(),
    "threads": os.environ.get("OMP_NUM_THREADS"), "upstream": upstream, "t_start": t_start,
    "t_end": time.time()}))
"""


@pytest.fixture(autouse=True)
def private_code_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Fingerprint a private code folder: fer_lib/ is being edited by others while tests run."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "lib.py").write_text("VALUE = 1\n")
    monkeypatch.setattr(plan, "CODE_DIRS", (code,))   # code_fingerprint reads fer_lib.workflow.plan.CODE_DIRS
    return code


@pytest.fixture()
def square_nb(tmp_path: Path) -> Path:
    return make_notebook(tmp_path / "square.ipynb", "x = 1\nseed = 0\noutput_dir = '.'\nupstream = ''\n",
                         WRITE_METRICS)


def experiment(nb: Path, xs: list[int], name: str = "toy", extra_stages: list[dict] | None = None,
               jobs: int = 1, warm_up: bool = False) -> pipeline.Experiment:
    data = {"experiment": {"name": name, "seed": 5, "jobs": jobs},
            "stage": [{"name": "sq", "notebook": str(nb), "grid": {"x": xs}, "warm_up": warm_up}] + (extra_stages or [])}
    return pipeline.experiment_from_dict(data)


def statuses(results: list[pipeline.RunResult]) -> list[tuple[str, str]]:
    return sorted((r.run_id, r.status) for r in results)


@pytest.mark.slow
def test_sweep_runs_then_skips_then_reruns_on_change(tmp_path: Path, square_nb: Path, private_code_dir: Path) -> None:
    exp = experiment(square_nb, [2, 3])
    results = pipeline.run_experiment(exp, results_root=tmp_path / "res", verbose=False)
    assert [r.status for r in results] == ["ok", "ok"]
    for r in results:
        run_dir = Path(r.run_dir)
        assert run_dir.parent == tmp_path / "res" / "toy" / "sq"
        assert r.run_id.startswith("x=")
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["square"] == metrics["x"] ** 2 and metrics["seed"] == 5
        assert Path(metrics["cwd"]) == REPO_ROOT                 # notebooks run in the repository root
        marker = json.loads((run_dir / "run.json").read_text())
        assert marker["status"] == "ok" and marker["parameters"]["x"] == metrics["x"]
        assert marker["code_fingerprint"] and "git_revision" in marker
        executed = nbformat.read(run_dir / "square.ipynb", as_version=4)
        assert any("injected-parameters" in c.metadata.get("tags", []) for c in executed.cells)
        assert (run_dir / "square.html").exists() and "<html" in (run_dir / "square.html").read_text()[:2000].lower()
        assert not list(run_dir.glob(".*partial*"))
    assert sorted(json.loads(p.read_text())["x"] for p in (tmp_path / "res/toy/sq").glob("*/metrics.json")) == [2, 3]
    summary = pd.read_csv(tmp_path / "res" / "toy" / "summary.csv")
    assert sorted(summary["status"]) == ["ok", "ok"]
    assert (tmp_path / "res" / "index.html").exists() and (tmp_path / "res" / "README.md").exists()

    again = pipeline.run_experiment(exp, results_root=tmp_path / "res", verbose=False)
    assert [r.status for r in again] == ["skipped", "skipped"]
    assert json.loads((tmp_path / "res/toy/summary.json").read_text())["counts"]["skipped"] == 2

    # Editing the library changes the code fingerprint: both rerun, unless told to reuse them; a
    # finished run that is redone starts from an empty folder (no stale files).
    (private_code_dir / "lib.py").write_text("VALUE = 2\n")
    stale = Path(results[0].run_dir) / "stale.txt"
    stale.write_text("from the previous run")
    assert [r.status for r in pipeline.run_experiment(exp, results_root=tmp_path / "res", verbose=False,
                                                      render=False, reuse_stale=True)] == ["skipped", "skipped"]
    assert [r.status for r in pipeline.run_experiment(exp, results_root=tmp_path / "res", verbose=False,
                                                      render=False)] == ["ok", "ok"]
    assert not stale.exists() and not list((tmp_path / "res/toy/sq").glob(".*"))
    # So does editing the notebook; --force reruns complete runs.
    make_notebook(square_nb, "x = 1\nseed = 0\noutput_dir = '.'\nupstream = ''\n", WRITE_METRICS + "\n# edited\n")
    assert [r.status for r in pipeline.run_experiment(exp, results_root=tmp_path / "res", verbose=False,
                                                      render=False)] == ["ok", "ok"]
    forced = pipeline.run_experiment(exp, results_root=tmp_path / "res", verbose=False, render=False,
                                     force=True, only=["sq"])
    assert [r.status for r in forced] == ["ok", "ok"]


@pytest.mark.slow
def test_failing_config_is_kept_reported_and_does_not_stop_others(tmp_path: Path, square_nb: Path) -> None:
    exp_file = tmp_path / "exp.toml"
    exp_file.write_text(textwrap.dedent(f"""
        [experiment]
        name = "faulty"
        [[stage]]
        name = "sq"
        notebook = "{square_nb}"
        grid = {{ x = [13, 4] }}
    """))
    proc = subprocess.run([sys.executable, "-m", "fer_lib.workflow.pipeline", str(exp_file), "--results", str(tmp_path / "res"),
                           "--jobs", "2"], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "failed" in proc.stdout and "deliberate failure" in proc.stdout
    stage_dir = tmp_path / "res" / "faulty" / "sq"
    failed_dir = next(stage_dir.glob("x=13-*"))
    ok_dir = next(stage_dir.glob("x=4-*"))
    marker = json.loads((failed_dir / "run.json").read_text())
    assert marker["status"] == "failed" and marker["error"]["type"] == "ValueError"
    assert "deliberate failure" in marker["error"]["message"]
    executed = (failed_dir / "square.ipynb").read_text()
    assert "Traceback" in executed or "ValueError" in executed and "deliberate failure" in executed
    assert json.loads((ok_dir / "metrics.json").read_text())["square"] == 16
    summary = json.loads((tmp_path / "res" / "faulty" / "summary.json").read_text())
    assert summary["counts"] == {"ok": 1, "skipped": 0, "failed": 1, "blocked": 0}
    assert "failed" in (tmp_path / "res" / "README.md").read_text()
    partial = failed_dir / "partial_work.txt"       # a failed run restarts in its folder (training resumes)
    partial.write_text("checkpoint")
    # Rerun: the good run is skipped, the failed one is tried again (and fails again). (--reuse-stale
    # because other people may be editing fer_lib/ while this test runs.)
    proc2 = subprocess.run([sys.executable, "-m", "fer_lib.workflow.pipeline", str(exp_file), "--results",
                            str(tmp_path / "res"), "--no-render", "--reuse-stale"], capture_output=True, text=True, cwd=REPO_ROOT,
                           timeout=300)
    assert proc2.returncode == 1
    rows = {r["run_id"].split("-")[0]: r["status"] for r in
            json.loads((tmp_path / "res" / "faulty" / "summary.json").read_text())["runs"]}
    assert rows == {"x=13": "failed", "x=4": "skipped"}
    assert partial.read_text() == "checkpoint"


@pytest.mark.slow
def test_placeholders_dependencies_threads_and_blocking(tmp_path: Path, square_nb: Path) -> None:
    agg = make_notebook(tmp_path / "agg.ipynb", "sweep_dir = ''\nbase = ''\noutput_dir = '.'\nseed = 0\n", """
        import json, pathlib
        runs = sorted(json.loads(p.read_text())["square"] for p in pathlib.Path(sweep_dir).glob("*/metrics.json"))
        base_sq = json.loads((pathlib.Path(base) / "metrics.json").read_text())["square"]
        pathlib.Path(output_dir, "metrics.json").write_text(json.dumps({"squares": runs, "base": base_sq}))
    """)
    stages = [{"name": "agg", "notebook": str(agg),
               "parameters": {"sweep_dir": "{stage:sq}", "base": "{run:sq/x=3}"}},
              {"name": "after_fail", "notebook": str(square_nb), "parameters": {"x": 2, "upstream": "{run:sq/x=13}"}}]
    exp = experiment(square_nb, [3, 13, 5], extra_stages=stages, jobs=2, warm_up=True)
    results = pipeline.run_experiment(exp, results_root=tmp_path / "res", verbose=False, render=False)
    by_stage = {(r.stage, r.run_id.split("-")[0]): r for r in results}
    assert by_stage[("sq", "x=3")].status == "ok" and by_stage[("sq", "x=13")].status == "failed"
    assert by_stage[("agg", "run")].status == "ok"
    agg_metrics = json.loads((Path(by_stage[("agg", "run")].run_dir) / "metrics.json").read_text())
    assert agg_metrics == {"squares": [9, 25], "base": 9}
    blocked = by_stage[("after_fail", "run")]
    assert blocked.status == "blocked" and "x=13" in blocked.error
    # --jobs 2 on this machine: each worker's thread budget is cores // 2.
    threads = json.loads((Path(by_stage[("sq", "x=3")].run_dir) / "metrics.json").read_text())["threads"]
    assert threads == str(max(1, pipeline.cpu_count() // 2))
    # warm_up: the first configuration (x=3) ran alone before the others started.
    first = json.loads((Path(by_stage[("sq", "x=3")].run_dir) / "metrics.json").read_text())
    later = json.loads((Path(by_stage[("sq", "x=5")].run_dir) / "metrics.json").read_text())
    assert first["t_end"] <= later["t_start"]


def test_placeholder_resolution_and_run_ids(tmp_path: Path) -> None:
    nb = tmp_path / "nb.ipynb"
    data = {
        "experiment": {"name": "p", "seed": 1},
        "variables": {"epochs": 2, "root": "{repo}/data"},
        "defaults": {"device": "cpu"},
        "stage": [
            {"name": "train", "notebook": str(nb), "parameters": {"epochs": "{var:epochs}", "data_root": "{var:root}"},
             "configs": [{"run_name": "baseline", "au_weight": 0}, {"run_name": "guided", "au_weight": 9}]},
            {"name": "cmp", "notebook": str(nb),
             "parameters": {"baseline_checkpoint": "{run:train/baseline}/checkpoints/best.pt",
                            "sweep_dir": "{stage:train}", "cache_dir": "rel/cache", "note": "{results}/x",
                            "layers": ["{var:epochs}"]}},
        ],
    }
    exp = pipeline.experiment_from_dict(data, overrides={"epochs": 3})
    plan = pipeline.plan_experiment(exp, tmp_path / "res")
    base, guided = plan["train"]
    assert base.run_id.startswith("baseline-") and guided.run_id.startswith("guided-")
    assert base.parameters["epochs"] == 3 and isinstance(base.parameters["epochs"], int)
    assert base.parameters["data_root"] == "data" and base.parameters["seed"] == 1   # in the repo: relative to it
    assert base.parameters["device"] == "cpu" and base.parameters["output_dir"] == str(base.run_dir)
    assert "run_name" not in base.parameters
    cmp_params = plan["cmp"][0].parameters
    assert cmp_params["baseline_checkpoint"] == f"{base.run_dir}/checkpoints/best.pt"
    assert cmp_params["sweep_dir"] == str((tmp_path / "res" / "p" / "train").resolve())
    assert cmp_params["cache_dir"] == "rel/cache"
    assert cmp_params["note"] == str((tmp_path / "res" / "p").resolve()) + "/x"
    assert cmp_params["layers"] == [3]                     # a whole "{var:...}" keeps its type
    assert plan["cmp"][0].needs_runs == [("train", base.run_id)] and plan["cmp"][0].needs_stages == ["train"]
    # The hash ignores where the checkout lives ({repo}) but follows the parameters.
    assert base.portable["data_root"] == "{repo}/data"
    other = pipeline.plan_experiment(pipeline.experiment_from_dict(data, overrides={"epochs": 4}), tmp_path / "res")
    assert other["train"][0].run_id != base.run_id and other["train"][0].run_id.startswith("baseline-")
    assert pipeline.plan_experiment(exp, tmp_path / "res")["train"][0].run_id == base.run_id


def test_paths_inside_the_repository_reach_notebooks_relative_to_it(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Injected parameters name folders of the repository relative to its root (the kernel runs there),
    others absolute; the plan is the same from any working directory and run ids keep their hashes."""
    nb = tmp_path / "nb.ipynb"
    data = {"experiment": {"name": "p", "seed": 1},
            "stage": [{"name": "train", "notebook": str(nb),
                       "parameters": {"data_root": "{repo}/data", "cache_dir": "rel/cache",
                                      "weights": str(tmp_path / "w.pt")}},
                      {"name": "cmp", "notebook": str(nb),
                       "parameters": {"baseline_checkpoint": "{run:train}/run/checkpoints/best.pt",
                                      "sweep_dir": "{stage:train}", "note": "{results}/x"}}]}
    exp = pipeline.experiment_from_dict(data)
    inside = pipeline.plan_experiment(exp, REPO_ROOT / "results")
    train, cmp_ = inside["train"][0], inside["cmp"][0]
    assert train.run_dir == REPO_ROOT / "results" / "p" / "train" / train.run_id      # absolute, for use
    assert train.parameters["output_dir"] == f"results/p/train/{train.run_id}"       # relative, injected
    assert train.parameters["data_root"] == "data" and train.parameters["cache_dir"] == "rel/cache"
    assert train.parameters["weights"] == str(tmp_path / "w.pt")                     # outside: absolute
    assert cmp_.parameters["baseline_checkpoint"] == f"results/p/train/{train.run_id}/run/checkpoints/best.pt"
    assert cmp_.parameters["sweep_dir"] == "results/p/train" and cmp_.parameters["note"] == "results/p/x"
    assert str(REPO_ROOT) not in json.dumps([r.parameters for runs in inside.values() for r in runs])
    assert train.portable["data_root"] == "{repo}/data"       # the hash reads the checkout-free form, as before
    monkeypatch.chdir(tmp_path)
    again = pipeline.plan_experiment(exp, os.path.relpath(REPO_ROOT / "results"))
    assert again["train"][0].run_id == train.run_id and again["cmp"][0].parameters == cmp_.parameters


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["stage"][1]["parameters"].update(x="{run:train/nobody}"), "nobody"),
    (lambda d: d["stage"][1]["parameters"].update(x="{stage:later}"), "no earlier stage 'later'"),
    (lambda d: d["stage"][1]["parameters"].update(x="{var:missing}"), "unknown variable"),
    (lambda d: d["stage"][1]["parameters"].update(x="{run:train}"), "has 2 runs"),
    (lambda d: d["stage"][0].update(configs=[{"a": 1}, {"a": 1}]), "identical parameters"),
    (lambda d: d["stage"][0].update(colour="red"), "unknown key(s) colour"),
    (lambda d: d["stage"][0]["grid"].update(b=[]), "non-empty list"),
])
def test_bad_experiments_fail_with_clear_messages(tmp_path: Path, mutate, message: str) -> None:
    data = {"experiment": {"name": "bad"},
            "stage": [{"name": "train", "notebook": "nb.ipynb", "grid": {"a": [1, 2]}},
                      {"name": "use", "notebook": "nb.ipynb", "parameters": {}}]}
    mutate(data)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        pipeline.plan_experiment(pipeline.experiment_from_dict(data), tmp_path)


def test_unknown_preset_and_variable_are_listed() -> None:
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        pipeline.resolve_experiment_path("nope")
    with pytest.raises(ConfigError, match="valid choices: epochs"):
        pipeline.experiment_from_dict({"variables": {"epochs": 1}, "stage": [{"name": "a", "notebook": "x"}]},
                                      overrides={"epoch": 2})


def test_presets_parse_and_plan(tmp_path: Path) -> None:
    presets = pipeline.available_presets()
    assert {"main", "paper"} <= set(presets)
    for name in presets:
        exp = pipeline.load_experiment(name)
        plan = pipeline.plan_experiment(exp, tmp_path)
        assert sum(len(runs) for runs in plan.values()) >= 1
        for stage in exp.stages:
            assert stage.notebook.parent == REPO_ROOT / "notebooks", stage.notebook
        in_repo = pipeline.plan_experiment(exp)          # results/: what the notebooks and run.json get
        injected = json.dumps([r.parameters for runs in in_repo.values() for r in runs])
        assert str(REPO_ROOT) not in injected, name
        assert all(r.parameters["output_dir"] == r.run_dir.relative_to(REPO_ROOT).as_posix()
                   and r.run_dir.is_relative_to(REPO_ROOT / "results") for runs in in_repo.values() for r in runs)
    paper = pipeline.load_experiment("paper", {"data_root": "/data/raf"})
    train = pipeline.plan_experiment(paper, tmp_path)["train"]
    guided = [r for r in train if r.parameters.get("au_weight") == 9]
    assert guided and guided[0].parameters["backbone"] == "resnet50" and guided[0].parameters["image_size"] == 224
    assert guided[0].parameters["data_root"] == "/data/raf" and guided[0].parameters["epochs"] == 20


def test_worker_env_budgets_threads_and_round_robins_gpus() -> None:
    env = pipeline.worker_env(slot=3, jobs=2, gpus=["0", "1", "2"])
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == str(max(1, pipeline.cpu_count() // 2))
    assert env["CUDA_VISIBLE_DEVICES"] == "0"
    assert pipeline.worker_env(slot=1, jobs=64, gpus=["4", "5"])["CUDA_VISIBLE_DEVICES"] == "5"
    assert pipeline.worker_env(slot=0, jobs=64)["OMP_NUM_THREADS"] == "1"
    assert pipeline.worker_env(slot=0, jobs=1, threads=7)["OPENBLAS_NUM_THREADS"] == "7"


def test_lock_refuses_a_second_concurrent_pipeline(tmp_path: Path, square_nb: Path) -> None:
    exp_file = tmp_path / "exp.toml"
    exp_file.write_text(f'[experiment]\nname = "locked"\n[[stage]]\nname = "sq"\nnotebook = "{square_nb}"\n')
    exp = pipeline.load_experiment(exp_file)
    with pipeline.experiment_lock(tmp_path / "res" / "locked"):
        with pytest.raises(pipeline.PipelineBusy, match="in use by another pipeline"):
            pipeline.run_experiment(exp, results_root=tmp_path / "res", verbose=False)
        proc = subprocess.run([sys.executable, "-m", "fer_lib.workflow.pipeline", str(exp_file), "--results",
                               str(tmp_path / "res")], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
        assert proc.returncode == 3 and f"pid {os.getpid()}" in proc.stderr and "--results" in proc.stderr
    assert not (tmp_path / "res" / "locked" / "sq").exists()   # nothing ran while locked


def fake_training_metrics(au_weight: float, acc: float, att: float, layers=("last",), backbone="resnet18",
                          seed=0, cam: float | None = None) -> dict:
    test = {"accuracy": acc, "macro_f1": acc - 0.05, "att_cos": {layers[0]: att, "other": att},
            "att_cos_mean": att, "n": 70}
    if cam is not None:
        test["cam_cos"] = {"gradcam": cam - 0.1, "layercam": cam + 0.1}
    return {"run": {"git_revision": "abc"}, "config": {"backbone": backbone, "au_weight": au_weight,
                                                       "layers": list(layers), "seed": seed},
            "best_epoch": 1, "test": test, "train_time_s": 12.0}


def test_headline_table_from_fake_metrics() -> None:
    base = fake_training_metrics(0, 0.80, 0.30)
    guided = fake_training_metrics(9, 0.82, 0.85, cam=0.6)
    # CAM-COS: the model's own CAM ("cam") if scored, else Grad-CAM, else the mean over methods.
    interpret = {"baseline": {"cam_cos": 0.41}, "guided": {"cam_cos": {"layercam": 0.9, "cam": 0.7, "gradcam": 0.6}}}
    table = pipeline.headline_table(base, guided, interpret)
    assert list(table["model"]) == ["baseline", "AU-guided"]
    assert list(table["lambda"]) == [0, 9]
    assert table["accuracy"].tolist() == [0.80, 0.82]
    assert table["ATT-COS"].tolist() == [0.30, 0.85]
    assert table["CAM-COS"].tolist() == pytest.approx([0.41, 0.70])
    no_interp = pipeline.headline_table(base, guided)
    assert pd.isna(no_interp["CAM-COS"][0]) and no_interp["CAM-COS"][1] == pytest.approx(0.5)   # gradcam
    mean_only = pipeline.headline_table(base, guided, {"guided": {"cam_cos": {"eigencam": 0.2, "layercam": 0.4}}})
    assert mean_only["CAM-COS"][1] == pytest.approx(0.3)
    assert pipeline.headline_table(None, guided)["model"].tolist() == ["AU-guided"]
    md = pipeline.markdown_table(table)
    assert md.splitlines()[0].startswith("| model |") and "0.850" in md


def test_headline_shows_intervals_shortcut_and_writes_headline_json(tmp_path: Path) -> None:
    import json

    base, guided = fake_training_metrics(0, 0.80, 0.30), fake_training_metrics(9, 0.82, 0.85)
    base["test"]["accuracy_ci"] = [0.75, 0.84]
    base["data"] = {"ceiling": {"oracle_accuracy": 0.99}}
    shortcut = {"headline": {"baseline": {"shortcut_accuracy": 0.40, "shortcut_accuracy_ci": [0.35, 0.45],
                                          "cue_energy": 0.30},
                             "guided": {"shortcut_accuracy": 0.70, "cue_energy": 0.05, "cue_energy_ci": [0.04, 0.06]}}}
    table = pipeline.headline_table(base, guided, None, shortcut)
    assert table["shortcut_acc"].tolist() == [0.40, 0.70] and table["cue_energy"].tolist() == [0.30, 0.05]
    assert table["accuracy_ci"][0] == [0.75, 0.84] and table["accuracy_ci"][1] is None
    text = pipeline.format_headline(table)
    assert "0.800 [0.750, 0.840]" in text and "0.050 [0.040, 0.060]" in text and "CAM-COS" not in text  # none measured
    exp = tmp_path / "main"
    for name, record in (("train/b", base), ("train/g", guided), ("cut", shortcut)):
        (exp / name).mkdir(parents=True)
        (exp / name / "metrics.json").write_text(json.dumps(record))
    (exp / "experiment.json").write_text(json.dumps({"headline": {"baseline": "train/b", "guided": "train/g",
                                                                  "shortcut": "cut", "figures": ["cut/x.png"]}}))
    (exp / "summary.json").write_text(json.dumps({"wall_time_s": 1000.0, "git_revision": "abc1234",
                                                  "counts": {"skipped": 0}}))
    record = json.loads(report.write_headline(exp).read_text())
    assert set(record["baseline"]) >= {"accuracy", "macro_f1", "att_cos", "cam_cos", "shortcut_accuracy", "cue_energy"}
    assert record["baseline"]["accuracy_ci"] == [0.75, 0.84] and record["guided"]["cue_energy"] == 0.05
    assert record["oracle_accuracy"] == 0.99 and record["wall_time_s"] == 1000.0 and record["git_revision"] == "abc1234"
    (exp / "cut" / "x.png").write_bytes(b"png")
    index, _ = report.write_index(tmp_path)
    assert "<img src='main/cut/x.png'" in index.read_text() and "0.700" in index.read_text()
    assert "oracle on the true AU intensities: 0.990" in index.read_text()


def test_collect_and_summarise_training_runs(tmp_path: Path) -> None:
    specs = [(0, 0.8, 0.3, 0), (0, 0.7, 0.2, 1), (9, 0.9, 0.8, 0), (9, 0.8, 0.9, 1)]
    for i, (w, acc, att, seed) in enumerate(specs):
        run = tmp_path / "sweep" / f"r{i}"
        run.mkdir(parents=True)
        metrics = fake_training_metrics(w, acc, att, seed=seed)
        if w:  # newer runs hold 95% intervals; the lambda = 0 ones stand for runs written before them
            metrics["test"].update(accuracy_ci=[acc - 0.1, acc + 0.1], att_cos_ci=[att - 0.2, att + 0.1])
        (run / "metrics.json").write_text(json.dumps(metrics))
        (run / "run.json").write_text(json.dumps({"status": "ok"}))
    bad = tmp_path / "sweep" / "failed"
    bad.mkdir()
    (bad / "metrics.json").write_text(json.dumps(fake_training_metrics(30, 0.1, 0.1)))
    (bad / "run.json").write_text(json.dumps({"status": "failed"}))
    (tmp_path / "sweep" / "other.json").write_text("{}")
    nested = tmp_path / "sweep" / "r0" / "run"          # the trainer's own copy inside a run: not a second run
    nested.mkdir()
    (nested / "metrics.json").write_text(json.dumps(fake_training_metrics(0, 0.8, 0.3)))
    runs = pipeline.collect_training_runs(tmp_path / "sweep")
    assert len(runs) == 4 and set(runs["au_weight"]) == {0, 9}
    assert runs["run"].tolist() == ["r0", "r1", "r2", "r3"] and runs["tapped"][0] == "last+other"
    table = pipeline.ablation_summary(runs)
    assert table["au_weight"].tolist() == [0, 9] and table["n_runs"].tolist() == [2, 2]
    assert table["accuracy"].tolist() == pytest.approx([0.75, 0.85])
    assert table["att_cos_std"].tolist() == pytest.approx([0.05, 0.05])
    assert runs["accuracy_low"].isna().tolist() == [True, True, False, False] and runs["macro_f1_low"].isna().all()
    assert runs.loc[2, "att_cos_high"] == pytest.approx(0.9)
    assert table["accuracy_low"].isna().tolist() == [True, False]  # mean of the runs' bounds
    assert table.loc[1, "accuracy_low"] == pytest.approx(0.75) and table.loc[1, "att_cos_low"] == pytest.approx(0.65)
    assert "macro_f1_low" not in table  # no run holds it
    with pytest.raises(ConfigError, match="no training runs"):
        pipeline.ablation_summary(pipeline.collect_training_runs(tmp_path / "empty"))


def test_index_lists_runs_and_headline(tmp_path: Path) -> None:
    exp_dir = tmp_path / "res" / "demo"
    for name, w, acc, att in (("baseline-aaaaaa", 0, 0.8, 0.3), ("guided-bbbbbb", 9, 0.83, 0.86)):
        run = exp_dir / "train" / name
        run.mkdir(parents=True)
        (run / "metrics.json").write_text(json.dumps(fake_training_metrics(w, acc, att)))
        (run / "02_train.ipynb").write_text("{}")
        (run / "02_train.html").write_text("<html></html>")
        (run / "run.json").write_text(json.dumps({"status": "ok", "notebook": "notebooks/02_train.ipynb",
                                                  "git_revision": "abc1234", "duration_s": 3.0}))
    (exp_dir / "experiment.json").write_text(json.dumps({
        "name": "demo", "description": "a demo", "source": "experiments/demo.toml", "seed": 0,
        "stages": [{"name": "train", "output": "train"}],
        "headline": {"baseline": "train/baseline-aaaaaa", "guided": "train/guided-bbbbbb"}}))
    index, readme = pipeline.write_index(tmp_path / "res")
    page = index.read_text()
    assert 'href="demo/train/guided-bbbbbb/02_train.html"' in page and "AU-guided" in page and "0.860" in page
    text = readme.read_text()
    assert "| AU-guided | resnet18 | 9 |" in text and "(demo/train/baseline-aaaaaa/02_train.html)" in text


@pytest.mark.slow
def test_real_training_notebook_through_the_runner(tmp_path: Path) -> None:
    notebook = REPO_ROOT / "notebooks" / "02_train.ipynb"
    if not notebook.exists():
        pytest.skip("notebooks/02_train.ipynb is not there yet")
    data = {"experiment": {"name": "tiny", "seed": 0},
            "stage": [{"name": "train", "notebook": str(notebook),
                       "parameters": {"dataset": "synthetic", "backbone": "resnet18", "epochs": 1, "n_per_class": 8,
                                      "image_size": 48, "batch_size": 16, "device": "cpu", "layers": "last",
                                      "landmarks": "ground_truth", "num_examples": 2},
                       "configs": [{"run_name": "guided", "au_weight": 9}]},
                      {"name": "ablation", "notebook": str(REPO_ROOT / "notebooks" / "03_ablations.ipynb"),
                       "parameters": {"sweep_dir": "{stage:train}"}}]}
    results = pipeline.run_experiment(pipeline.experiment_from_dict(data), results_root=tmp_path / "res",
                                      verbose=False, render=False)
    assert [r.status for r in results] == ["ok", "ok"], [r.error for r in results]
    metrics = json.loads((Path(results[0].run_dir) / "metrics.json").read_text())
    assert 0.0 <= metrics["test"]["accuracy"] <= 1.0 and metrics["config"]["au_weight"] == 9
    assert (Path(results[0].run_dir) / "run" / "checkpoints" / "best.pt").exists()
    ablation = json.loads((Path(results[1].run_dir) / "metrics.json").read_text())
    assert ablation["n_runs"] == 1
    # both notebooks write the schema; 02 draws its attention overlays through interpret.overlay_figure
    assert (metrics["schema"], metrics["kind"], ablation["kind"]) == (METRICS_SCHEMA, "training", "ablation")
    assert (Path(results[0].run_dir) / "attention_examples.png").stat().st_size > 1000


def test_defaults_go_only_to_notebooks_that_declare_them(tmp_path: Path, square_nb: Path) -> None:
    data = {"defaults": {"device": "cpu", "upstream": "u"},
            "stage": [{"name": "sq", "notebook": str(square_nb)},
                      {"name": "missing", "notebook": str(tmp_path / "not_there.ipynb")}]}
    plan = pipeline.plan_experiment(pipeline.experiment_from_dict(data), tmp_path / "res")
    assert plan["sq"][0].parameters["upstream"] == "u" and "device" not in plan["sq"][0].parameters
    assert plan["missing"][0].parameters["device"] == "cpu"       # unreadable notebook: everything is passed


def test_undeclared_parameter_is_refused(tmp_path: Path, square_nb: Path) -> None:
    data = {"stage": [{"name": "sq", "notebook": str(square_nb), "grid": {"x": [1], "y_typo": [2]}}]}
    with pytest.raises(ConfigError, match="y_typo not declared .*valid choices: output_dir, seed, upstream, x"):
        pipeline.plan_experiment(pipeline.experiment_from_dict(data), tmp_path / "res")


def test_metrics_schema_one_key_path_per_headline_number(tmp_path: Path) -> None:
    base = fake_training_metrics(0, 0.80, 0.30)
    path = write_metrics(tmp_path, base, kind="training")
    written = json.loads(path.read_text())
    assert list(written)[:2] == ["schema", "kind"] and written["schema"] == METRICS_SCHEMA
    assert written["test"] == base["test"]
    with pytest.raises(ValueError, match=r"test\.accuracy"):
        write_metrics(tmp_path, {**base, "test": {**base["test"], "accuracy": "high"}}, kind="training")
    with pytest.raises(ValueError, match=r"guided\.cam_cos"):
        check_metrics({"guided": {"cam_cos": "n/a"}}, "interpret")
    with pytest.raises(ConfigError, match="metrics kind"):
        write_metrics(tmp_path, base, kind="nonsense")
    # CAM-COS is read at <role>.cam_cos only: other spellings are not part of the schema
    guided = fake_training_metrics(9, 0.82, 0.85)
    stray = pipeline.headline_table(base, guided, {"models": {"guided": {"cam_cos": 0.9}}, "guided": {"cam_cos_mean": 0.9}})
    assert stray["CAM-COS"].isna().all()
    table = pipeline.headline_table(base, guided, {"guided": {"cam_cos": 0.61, "att_cos_mean": 0.1}})
    assert table["CAM-COS"][1] == pytest.approx(0.61) and table["ATT-COS"][1] == pytest.approx(0.85)
    # a comparison row (notebook 08): cam_cos, else its first cam_cos_<method> column
    rows = {"comparison": [{"model": "a", "accuracy": 0.6, "cam_cos": 0.3, "cam_cos_gradcam": 0.2},
                           {"model": "b", "accuracy": 0.7, "cam_cos_gradcam": 0.25, "train_time_s": 12.34}]}
    assert pipeline.comparison_headline(rows)["CAM-COS"].tolist() == pytest.approx([0.3, 0.25])


def test_one_set_syntax_for_experiments_and_training_recipes() -> None:
    assert pipeline.parse_value is presets.parse_value
    cases = {"2": 2, "0.5": 0.5, "true": True, "[1, 2]": [1, 2], '"x y"': "x y", "word": "word",
             "/data/raf": "/data/raf", "{a = 1}": {"a": 1}, '{"a": 1}': {"a": 1}, "null": None, "1e-3": 0.001}
    assert {text: presets.parse_value(text) for text in cases} == cases
    assert presets.parse_assignments(["epochs=3", "layers=[\"last\", 3]"]) == {"epochs": 3, "layers": ["last", 3]}
    with pytest.raises(ConfigError, match="NAME=VALUE"):
        presets.parse_assignments(["epochs"])
    # the two namespaces: training recipes and experiments, each listed under its name
    assert presets.RECIPES is presets.PRESETS and presets.recipe is presets.preset
    assert {"main", "paper"} <= set(pipeline.available_experiments()) == set(pipeline.available_presets())
    assert not set(presets.RECIPES) & set(pipeline.available_experiments())
    listed = subprocess.run([sys.executable, "-m", "fer_lib", "pipeline", "--list-experiments"], capture_output=True,
                            text=True, cwd=REPO_ROOT, timeout=120)
    assert listed.returncode == 0 and listed.stdout.startswith("experiments") and " main " in listed.stdout
    recipes = subprocess.run([sys.executable, "-m", "fer_lib.presets", "--list"], capture_output=True, text=True,
                             cwd=REPO_ROOT, timeout=120)
    assert recipes.returncode == 0 and recipes.stdout.startswith("training recipes") and "fer2013_lite0" in recipes.stdout
    shown = subprocess.run([sys.executable, "-m", "fer_lib.training.presets", "synthetic_default", "--set", "epochs=3",
                            "--set", "layers=[\"last\", 3]", "--set", "data_root=null"], capture_output=True, text=True,
                           cwd=REPO_ROOT, timeout=120)
    config = json.loads(shown.stdout)
    assert (config["epochs"], config["layers"], config["data_root"]) == (3, ["last", 3], None)


@pytest.mark.slow
def test_a_sweep_through_a_local_dask_cluster_matches_the_local_executor(tmp_path: Path, square_nb: Path) -> None:
    from distributed import Client, LocalCluster

    exp = experiment(square_nb, [2, 3, 4, 13], jobs=2)
    local = pipeline.run_experiment(exp, results_root=tmp_path / "local", verbose=False, render=False)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        remote = pipeline.run_experiment(exp, results_root=tmp_path / "dask", verbose=False, render=False,
                                         executor="dask", scheduler=client)
        assert statuses(remote) == statuses(local)
        assert [rid for rid, status in statuses(remote) if status == "failed"][0].startswith("x=13")
        assert "deliberate failure for x=13" in next(r.error for r in remote if r.status == "failed")
        for r in remote:
            if r.status == "ok":
                got = json.loads((Path(r.run_dir) / "metrics.json").read_text())
                want = json.loads((tmp_path / "local/toy/sq" / r.run_id / "metrics.json").read_text())
                assert (got["x"], got["square"], got["seed"]) == (want["x"], want["square"], want["seed"])
                assert json.loads((Path(r.run_dir) / "run.json").read_text())["status"] == "ok"
        again = pipeline.run_experiment(exp, results_root=tmp_path / "dask", verbose=False, render=False,
                                        executor="dask", scheduler=client)
        assert sorted(r.status for r in again) == ["failed", "skipped", "skipped", "skipped"]  # resumable
    assert not list((tmp_path / "dask/toy/sq").glob(".*lock"))
    with pytest.raises(ConfigError, match="--executor dask needs --scheduler"):
        pipeline.run_experiment(exp, results_root=tmp_path / "dask", verbose=False, executor="dask")


def test_a_run_is_never_executed_twice_at_once(tmp_path: Path) -> None:
    from fer_lib.utils import file_lock
    from fer_lib.workflow import run as run_mod

    run_dir = tmp_path / "sq" / "x=2"
    with file_lock(tmp_path / "sq" / ".x=2.lock", blocking=False, holder="the first executor"):
        marker = run_mod.execute_run({"run_dir": str(run_dir)})
    assert marker["status"] == "busy" and "the first executor" in marker["error"]["message"]
    assert not (run_dir / "run.json").exists()  # the running execution's files are left alone


@pytest.mark.slow
def test_executed_notebook_is_clean_and_portable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One run through the runner's papermill call (in this process, in a stand-in checkout): the kernel
    works in the repository root with output_dir relative to it; the saved notebook, run.json and
    metrics hold no absolute checkout path, no progress-bar text and no tqdm IProgress warning."""
    from fer_lib import utils
    from fer_lib.workflow import run as run_mod

    root = tmp_path / "checkout"                     # stands for the repository root
    for module in (utils, plan, run_mod):
        monkeypatch.setattr(module, "REPO_ROOT", root)
    monkeypatch.delenv(utils.PROGRESS_ENV, raising=False)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    (root / "notebooks").mkdir(parents=True)
    make_notebook(root / "notebooks" / "bars.ipynb", "output_dir = '.'\nseed = 0\ndata_root = ''\n", """
        import json, os, pathlib, warnings
        warnings.simplefilter("always")
        from tqdm.auto import tqdm                   # as libraries do: no IProgress warning
        from fer_lib.utils import progress_bar
        for _ in progress_bar(range(200), desc="loop"):
            pass
        bar = progress_bar(total=3, desc="manual")
        bar.update(3)
        bar.close()
        out = pathlib.Path(output_dir)
        (out / "metrics.json").write_text(json.dumps({"cwd": os.getcwd(), "output_dir": output_dir,
                                                      "data_root": data_root}))
        print("wrote", out / "metrics.json")
    """)
    exp = pipeline.experiment_from_dict({"experiment": {"name": "clean", "seed": 0}, "stage": [
        {"name": "bars", "notebook": "notebooks/bars.ipynb", "parameters": {"data_root": "data/faces"}}]})
    run = pipeline.plan_experiment(exp, root / "results")["bars"][0]
    spec = {"experiment": "clean", "stage": run.stage, "run_id": run.run_id, "run_name": None,
            "config_hash": run.config_hash, "code_fingerprint": "x", "git_revision": "x",
            "notebook": str(run.notebook), "run_dir": str(run.run_dir), "parameters": run.parameters,
            "portable": run.portable, "timeout_s": 120, "require_metrics": True}
    marker = run_mod.execute_run(spec)
    assert marker["status"] == "ok", marker.get("error")
    metrics = json.loads((run.run_dir / "metrics.json").read_text())
    assert metrics == {"cwd": str(root), "output_dir": f"results/clean/bars/{run.run_id}", "data_root": "data/faces"}
    executed = (run.run_dir / "bars.ipynb").read_text()
    stored = executed + (run.run_dir / "run.json").read_text()
    assert str(root) not in stored and str(tmp_path) not in stored
    outputs = json.dumps([c.get("outputs", []) for c in nbformat.reads(executed, as_version=4).cells])
    assert f"wrote results/clean/bars/{run.run_id}/metrics.json" in outputs
    for noise in ("it/s", "s/it", "100%", "TqdmWarning", "IProgress", "widget-view"):
        assert noise not in outputs, noise
    assert utils.PROGRESS_ENV not in os.environ          # set for the kernel only


@pytest.mark.slow
def test_stages_that_need_nothing_run_side_by_side_and_dependents_wait(tmp_path: Path, square_nb: Path) -> None:
    slow = make_notebook(tmp_path / "slow.ipynb", "x = 1\nseed = 0\noutput_dir = '.'\nupstream = ''\n",
                         WRITE_METRICS.replace("t_start = time.time()\n", "t_start = time.time()\ntime.sleep(3)\n"))
    stages = [{"name": "other", "notebook": str(slow), "parameters": {"x": 7}},
              {"name": "uses_sq", "notebook": str(square_nb), "parameters": {"x": 4, "upstream": "{run:sq}"}}]
    exp = pipeline.experiment_from_dict({"experiment": {"name": "graph", "seed": 5, "jobs": 2}, "stage": [
        {"name": "sq", "notebook": str(slow), "parameters": {"x": 3}}] + stages})
    plan_ = plan.plan_experiment(exp, tmp_path / "res")
    assert [[s.name for s in wave] for wave in pipeline.stage_waves(exp, plan_, ["sq", "other", "uses_sq"])] == [
        ["sq", "other"], ["uses_sq"]]
    results = pipeline.run_experiment(exp, results_root=tmp_path / "res", verbose=False, render=False)
    assert [(r.stage, r.status) for r in results] == [("sq", "ok"), ("other", "ok"), ("uses_sq", "ok")]
    t = {r.stage: json.loads((Path(r.run_dir) / "metrics.json").read_text()) for r in results}
    assert t["other"]["t_start"] < t["sq"]["t_end"] and t["sq"]["t_start"] < t["other"]["t_end"]  # side by side
    assert t["uses_sq"]["t_start"] >= t["sq"]["t_end"]  # a dependent waits for what it uses
