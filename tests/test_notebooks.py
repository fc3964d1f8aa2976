"""Notebooks are stored clean (no outputs, a `parameters` cell) and run under papermill."""
from __future__ import annotations

import json

import nbformat
import numpy as np
import pytest

from conftest import REPO
from fer_lib.metrics import METRICS_SCHEMA
from fer_lib.training.train import TrainConfig
from fer_lib.utils import ConfigError, config_hash

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_clean_with_parameters(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert not any(c.get("outputs") for c in code), "store notebooks without outputs"
    assert not any(c.get("execution_count") for c in code)
    assert any("parameters" in c.metadata.get("tags", []) for c in code), "needs a cell tagged parameters"
    assert nb.metadata["kernelspec"]["language"] == "python"
    assert nb.metadata["language_info"]["name"] == "python"


def run_notebook(name: str, tmp_path, **params):
    """Execute notebooks/<name> with papermill (cwd notebooks/) and return the executed copy."""
    import papermill as pm

    out = tmp_path / name
    pm.execute_notebook(
        str(REPO / "notebooks" / name), str(out), parameters=params, kernel_name="python3",
        language="python", cwd=str(REPO / "notebooks"), progress_bar=False,
    )
    return nbformat.read(out, as_version=4)


@pytest.mark.slow
def test_notebook01_smoke(tmp_path):
    out_dir = tmp_path / "out"
    nb = run_notebook("01_au_heatmaps.ipynb", tmp_path, expression="happiness", size=64,
                      output_dir=str(out_dir))
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["n_landmarks"] == 478
    assert metrics["expressions"]["happiness"]["aus"] == [6, 12, 25]
    assert metrics["run"]["config"]["size"] == 64
    assert metrics["schema"] == METRICS_SCHEMA and metrics["kind"] == "heatmaps"
    for figure in ("landmarks.png", "au_maps_happiness.png", "expression_heatmaps.png"):
        assert (out_dir / figure).stat().st_size > 1000


def _errors(nb) -> list:
    return [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]


@pytest.mark.slow
def test_notebook04_smoke_trains_a_tiny_pair_and_compares(tmp_path):
    out_dir = tmp_path / "out"
    nb = run_notebook("04_cam_interpretability.ipynb", tmp_path, epochs=1, n_per_class=8, n_samples=24,
                      faithfulness_samples=4, cam_methods="cam,gradcam,eigencam", output_dir=str(out_dir))
    assert not _errors(nb)
    metrics = json.loads((out_dir / "metrics.json").read_text())
    for model in ("baseline", "guided"):
        assert set(metrics[model]["cam_cos_by_method"]) == {"cam", "gradcam", "eigencam"}
        assert 0 <= metrics[model]["att_cos_mean"] <= 1
        m = metrics[model]  # 95% intervals beside the numbers
        assert set(m["cam_cos_ci_by_method"]) == {"cam", "gradcam", "eigencam"}
        assert m["cam_cos_ci"][0] <= m["cam_cos"] <= m["cam_cos_ci"][1]
        assert m["accuracy_ci"][0] <= m["accuracy"] <= m["accuracy_ci"][1]
    assert {"CAM-COS low", "CAM-COS high"} <= set(metrics["table1"][0])


@pytest.mark.slow
def test_notebook06_smoke_lnlattennet_vs_plain(tmp_path):
    out_dir = tmp_path / "out"
    nb = run_notebook("06_local_nonlocal.ipynb", tmp_path, image_size=64, n_per_class=10, epochs=1,
                      output_dir=str(out_dir))
    assert not _errors(nb)
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["run"]["git_revision"]
    assert metrics["schema"] == METRICS_SCHEMA and metrics["kind"] == "local_nonlocal"
    runs = {row["run"]: row for row in metrics["accuracy_cost"]}
    assert set(runs) == {"plain", "LNL", "LNL+AU"}
    for row in runs.values():
        assert 0.0 <= row["test_accuracy"] <= 1.0 and row["params_M"] > 0 and row["train_time_s"] > 0
    assert runs["LNL+AU"]["au_weight"] == 1.0 and runs["plain"]["au_weight"] == 0.0
    assert metrics["speed_ratio_lnl_over_plain"]["inference"] > 0
    # region weights are a softmax over the 16 cells of each image, so each class mean sums to 1
    for role, grids in metrics["class_mean_region_weights"].items():
        for name, grid in grids.items():
            assert np.asarray(grid).shape == (4, 4) and abs(float(np.sum(grid)) - 1.0) < 0.01, (role, name)
    for role in ("LNL", "LNL_AU"):
        assert (out_dir / f"region_weights_{role}.png").stat().st_size > 1000


@pytest.mark.slow
def test_notebook09_smoke_explanations(tmp_path):
    out_dir = tmp_path / "out"
    nb = run_notebook("09_au_explanations.ipynb", tmp_path, n_samples=6, fer2013_root="none",
                      output_dir=str(out_dir))
    assert not _errors(nb)
    assert json.loads((out_dir / "metrics.json").read_text())["run"]["git_revision"]


# Notebook 02's parameters as papermill gives them (the pipeline's main job passes the `main` values).
NB02 = dict(preset="", dataset="synthetic", data_root=None, backbone="resnet18", au_weight=9.0, au_loss="cosine",
            layers="last", epochs=3, image_size=64, batch_size=32, lr=0.01, optimizer="sgd", weight_decay=5e-4,
            weights="", seed=0, device="auto", landmarks="ground_truth", n_per_class=40, spurious_p=0.0,
            max_steps_per_epoch=None, num_examples=6, output_dir="results/02_train")
MAIN = dict(n_per_class=150, landmarks="detect", epochs=6, image_size=96, optimizer="adamw", lr=0.002,
            weight_decay=0.05, device="cpu")


@pytest.mark.parametrize("params", [NB02, {**NB02, **MAIN, "au_weight": 0}, {**NB02, **MAIN, "layers": "-2"},
                                    {**NB02, **MAIN, "backbone": "deit_tiny_patch16_224", "lr": 0.001},
                                    {**NB02, "dataset": "fer2013", "layers": "3,4", "max_steps_per_epoch": 2}])
def test_train_config_from_notebook_parameters_is_the_hand_built_one(params):
    """TrainConfig.from_params gives notebook 02 exactly the config it built field by field before
    (same run identity, so the same results and resumable runs)."""
    g = params
    by_hand = TrainConfig(
        dataset=g["dataset"], data_root=g["data_root"],
        dataset_kwargs={"n_per_class": g["n_per_class"], "spurious_p": float(g["spurious_p"])} if g["dataset"] == "synthetic" else {},
        landmarks=g["landmarks"], backbone=g["backbone"], layers=tuple(s.strip() for s in str(g["layers"]).split(",")),
        au_weight=float(g["au_weight"]), au_loss=g["au_loss"], epochs=int(g["epochs"]), image_size=int(g["image_size"]),
        batch_size=int(g["batch_size"]), lr=float(g["lr"]), optimizer=g["optimizer"], weight_decay=float(g["weight_decay"]),
        pretrained=bool(g["weights"]), weights=g["weights"] or None, seed=int(g["seed"]), device=g["device"],
        max_steps_per_epoch=g["max_steps_per_epoch"], out_dir="out/run")
    config = TrainConfig.from_params({**params, "out_dir": "out/run"})
    assert config == by_hand and repr(config.to_dict()) == repr(by_hand.to_dict())
    assert config_hash(config.identity()) == config_hash(by_hand.identity())


def test_train_config_from_params_refuses_unknown_names():
    with pytest.raises(ConfigError, match="unknown parameter.*epochz"):
        TrainConfig.from_params({**NB02, "epochz": 3})
    assert TrainConfig.from_params({"epochs": 2.0, "au_weight": 1, "output_dir": "x"}).epochs == 2


def test_train_config_from_params_takes_the_main_jobs_pretrained_recipe():
    params = {**NB02, "backbone": "tf_efficientnet_lite0", "pretrained": "imagenet", "layers": "4",
              "n_per_class": {"train": 100, "val": 30, "test": 60}}
    config = TrainConfig.from_params(params)
    assert config.pretrained == "imagenet" and config.layers == ("4",)
    assert config.dataset_kwargs["n_per_class"] == {"train": 100, "val": 30, "test": 60}
    assert TrainConfig.from_params({**NB02, "pretrained": ""}).pretrained is False  # "" = no ImageNet weights

def _fake_training_run(folder, au_weight, layers, seed, acc, att, intervals):
    test = {"accuracy": acc, "macro_f1": acc - 0.05, "att_cos": {"layer4": att}, "att_cos_mean": att, "n": 70}
    if intervals:  # runs written before intervals have none: the notebook must still work on them
        test.update(accuracy_ci=[acc - 0.1, acc + 0.1], macro_f1_ci=[acc - 0.15, acc + 0.05],
                    att_cos_ci=[att - 0.05, att + 0.05])
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({
        "config": {"backbone": "resnet18", "au_weight": au_weight, "layers": layers, "seed": seed},
        "best_epoch": 1, "test": test, "train_time_s": 10.0}))


@pytest.mark.slow
def test_notebook03_shows_intervals_and_reads_runs_without_them(tmp_path):
    sweep = tmp_path / "sweep"
    specs = [(0, [5], 0, 0.80, 0.30, False), (0, [5], 1, 0.78, 0.32, False), (9, [5], 0, 0.82, 0.80, True),
             (9, [5], 1, 0.84, 0.82, True), (9, [4, 5], 0, 0.81, 0.70, True)]
    for i, spec in enumerate(specs):
        _fake_training_run(sweep / f"r{i}", *spec)
    out_dir = tmp_path / "out"
    nb = run_notebook("03_ablations.ipynb", tmp_path, sweep_dir=str(sweep), output_dir=str(out_dir))
    assert not _errors(nb)
    metrics = json.loads((out_dir / "metrics.json").read_text())
    rows = {(r["layers"], r["au_weight"]): r for r in metrics["table"]}
    assert rows[("5", 0.0)]["accuracy_low"] is None  # the old runs: no interval
    guided = rows[("5", 9.0)]
    assert guided["accuracy_low"] == pytest.approx(0.73) and guided["accuracy_high"] == pytest.approx(0.93)
    assert guided["att_cos_low"] <= guided["att_cos"] <= guided["att_cos_high"]
    assert (out_dir / "ablation_lambda.png").stat().st_size > 1000 and (out_dir / "ablation_layers.png").is_file()
