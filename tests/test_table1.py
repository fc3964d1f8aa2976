"""Table 1 (fer_lib.analysis.table1, notebook 11, experiments/table1*.toml): rows from tiny runs, plans."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from fer_lib.analysis import table1
from fer_lib.metrics import write_metrics
from fer_lib.workflow import pipeline

PAIRS = ("plain", "wildcat", "acol", "prm", "adl", "cutmix", "apvit")
CPU_RUNS = {f"{m}-{g}" for m in PAIRS for g in ("without", "with")}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """Two 1-step synthetic trainings at 32 px (plain resnet18 lambda 0, WILDCAT lambda 9), a copy of the plain
    one relabelled lambda 9, a failed run and a hidden folder (both left out)."""
    from fer_lib.training.train import TrainConfig, train

    root = tmp_path_factory.mktemp("sweep")
    for name, backbone, lam in (("plain-without", "resnet18", 0.0), ("wildcat-with", "wildcat:resnet18", 9.0)):
        out = root / name
        train(TrainConfig(dataset="synthetic", dataset_kwargs={"n_per_class": 3}, landmarks="ground_truth",
                          backbone=backbone, layers=("last",), image_size=32, epochs=1, batch_size=8,
                          max_steps_per_epoch=1, au_weight=lam, device="cpu", out_dir=str(out / "run")))
        shutil.copy(out / "run" / "metrics.json", out / "metrics.json")  # notebook 02's layout
        (out / "run.json").write_text(json.dumps({"status": "ok"}))
    shutil.copytree(root / "plain-without", root / "plain-with")
    metrics = json.loads((root / "plain-with" / "metrics.json").read_text())
    metrics["config"]["au_weight"] = 9.0
    (root / "plain-with" / "metrics.json").write_text(json.dumps(metrics))
    shutil.copytree(root / "plain-without", root / "failed")
    (root / "failed" / "run.json").write_text(json.dumps({"status": "failed"}))
    (root / "failed" / "metrics.json").unlink()  # the notebook failed after training: only run/metrics.json
    shutil.copytree(root / "plain-without", root / ".superseded-1")
    return root


def test_collect_table1_rows_and_columns(sweep, tmp_path):
    runs = table1.find_runs(sweep)
    assert sorted(r.folder.name for r in runs) == ["plain-with", "plain-without", "wildcat-with"]
    assert {r.method for r in runs} == {"plain", "wildcat"}
    table = table1.collect_table1(sweep, split="test", cam_samples=6, device="cpu")
    assert list(table.columns) == list(table1.TABLE1_COLUMNS)
    # the plain classifier's two runs give the four CAM rows each; WILDCAT's guided run one row; paper order
    assert list(zip(table["method"], table["au_guided"])) == [
        ("CAM", False), ("CAM", True), ("WILDCAT", True), ("GradCAM", False), ("GradCAM", True),
        ("GradCAM++", False), ("GradCAM++", True), ("LayerCAM", False), ("LayerCAM", True)]
    assert list(table["cam_method"][:3]) == ["cam", "cam", "cam"]
    assert set(table[table["method"] == "LayerCAM"]["cam_method"]) == {"layercam"}
    # accuracy / ATT-COS: the runs' own final evaluation of the split, with their intervals
    own = json.loads((sweep / "wildcat-with" / "metrics.json").read_text())["test"]
    row = table[table["method"] == "WILDCAT"].iloc[0]
    assert row["accuracy"] == pytest.approx(own["accuracy"]) and row["n"] == own["n"]
    assert row["accuracy_low"] <= row["accuracy"] <= row["accuracy_high"]
    assert row["accuracy_source"].startswith("training")
    # CAM-COS: one fixed subset of faces with AU maps, the same for every row
    assert set(table["cam_n"]) == {6}
    for _, r in table.iterrows():
        assert 0.0 <= r["cam_cos"] <= 1.0 and r["cam_cos_low"] <= r["cam_cos"] + 1e-9
    wide = table1.paper_comparison(table)
    assert list(wide.index) == [label for label, _, _ in table1.TABLE1_ROWS]
    assert wide.loc["GradCAM++", "accuracy paper with"] == 89.14 and wide.loc["CAM", "CAM-COS paper without"] == 0.55
    assert math.isnan(wide.loc["ACoL", "accuracy ours with"]) and math.isnan(wide.loc["WILDCAT", "CAM-COS ours without"])
    assert wide.loc["CAM", "accuracy ours with"] == pytest.approx(100 * table["accuracy"][1])
    assert len(table1.format_table1(table)) == len(table)
    record = table1.table1_record(table, {"split": "test"})
    assert record["missing"] == ["ACoL", "PRM", "ADL", "CutMix", "TS-CAM", "APViT"]
    path = write_metrics(tmp_path, record, kind="table1")
    assert json.loads(path.read_text())["kind"] == "table1"
    # a run without the split's final evaluation: accuracy and ATT-COS measured here, on the whole split
    shutil.copytree(sweep / "wildcat-with", tmp_path / "alone" / "wildcat-with")
    lone = tmp_path / "alone" / "wildcat-with" / "metrics.json"
    lone.write_text(json.dumps({k: v for k, v in json.loads(lone.read_text()).items() if k != "val"}))
    other = table1.collect_table1(tmp_path / "alone", split="val", cam_samples=4, device="cpu")
    assert list(other["method"]) == ["WILDCAT"] and other["cam_n"][0] == 4
    assert other["accuracy_source"][0].startswith("evaluated") and 0 <= other["accuracy"][0] <= 1


def test_collect_table1_needs_runs(tmp_path):
    from fer_lib.utils import ConfigError

    with pytest.raises(ConfigError, match="no finished training runs"):
        table1.collect_table1(tmp_path)
    with pytest.raises(ConfigError, match="not a folder"):
        table1.collect_table1(tmp_path / "absent")
    assert table1.method_of("wildcat:tf_efficientnet_lite0") == "wildcat"
    assert table1.method_of("tf_efficientnet_lite0") == table1.method_of("resnet50") == "plain"


def _train_runs(plan) -> dict[str, dict]:
    return {r.run_name: r.parameters for r in plan["train"]}


def test_table1_experiments_plan_every_row(tmp_path):
    cpu = pipeline.load_experiment("table1_cpu")
    plan = pipeline.plan_experiment(cpu, tmp_path)
    runs = _train_runs(plan)
    assert set(runs) == CPU_RUNS   # TS-CAM is left to the GPU file
    assert runs["wildcat-with"]["backbone"] == "wildcat:tf_efficientnet_lite0" and runs["wildcat-with"]["au_weight"] == 9
    assert runs["plain-without"]["backbone"] == "tf_efficientnet_lite0" and runs["plain-without"]["au_weight"] == 0
    for params in runs.values():
        assert params["dataset"] == "fer2013" and params["pretrained"] == "imagenet"
        assert params["image_size"] == 112 and params["layers"] == "4" and params["epochs"] == 1
        assert Path(params["data_root"]).name == "fer2013"
    (collect,) = plan["table1"]
    assert collect.parameters["sweep_dir"] == str(tmp_path.resolve() / "table1_cpu" / "train")
    assert collect.parameters["split"] == "val" and collect.needs_stages == ["train"]

    gpu = pipeline.load_experiment("table1", {"data_root": "/data/raf"})
    runs = _train_runs(pipeline.plan_experiment(gpu, tmp_path))
    assert set(runs) == CPU_RUNS | {"tscam-without", "tscam-with"}
    assert runs["tscam-with"]["backbone"] == "tscam:deit_small_patch16_224"
    assert runs["acol-without"]["backbone"] == "acol:resnet50" and runs["acol-with"]["au_weight"] == 9
    assert all(p["image_size"] == 224 and p["data_root"] == "/data/raf" and p["epochs"] == 20 for p in runs.values())
    # every configuration builds a valid training config (backbone, layers, image size)
    from fer_lib.training.train import TrainConfig

    for params in runs.values():
        keep = {k: params[k] for k in ("backbone", "layers", "image_size", "au_weight")}
        TrainConfig.from_params({**keep, "dataset": "synthetic", "device": "cpu"})


@pytest.mark.slow
def test_notebook11_smoke(sweep, tmp_path):
    import papermill as pm

    from conftest import REPO

    out = tmp_path / "out"
    pm.execute_notebook(str(REPO / "notebooks" / "11_table1.ipynb"), str(tmp_path / "11.ipynb"),
                        parameters={"sweep_dir": str(sweep), "split": "test", "cam_samples": 6, "device": "cpu",
                                    "output_dir": str(out)},
                        kernel_name="python3", language="python", cwd=str(REPO / "notebooks"), progress_bar=False)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["kind"] == "table1" and len(metrics["rows"]) == 9 and len(metrics["comparison"]) == 11
    for name in ("table1.csv", "table1_vs_paper.csv", "table1_cam_cos.png"):
        assert (out / name).stat().st_size > 0
