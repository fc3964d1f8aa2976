"""The FER2013 preset and `python -m fer_lib.analysis.evaluate` on a tiny ImageFolder of synthetic faces made here."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fer_lib.faces.au import EXPRESSIONS
from fer_lib.data import AugmentConfig, build_datasets
from fer_lib.analysis.evaluate import (EvalOptions, comparison_frame, evaluate, format_table, main,
                                      make_synthetic_imagefolder, pair_deltas)
from fer_lib.analysis.interpret import CAMSettings
from fer_lib.training.presets import PRESETS, FER2013_AUGMENT, list_presets, preset, preset_dict
from fer_lib.utils import ConfigError

# FER2013-style folder names (synonyms of the project's classes), grayscale 48 px like FER2013
FOLDERS = {"happy": "happiness", "surprise": "surprise", "neutral": "neutral", "angry": "anger"}
N_TRAIN, N_VAL = 3, 2


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> dict:
    """train/ and val/ class folders of synthetic faces, plus one unreadable file in val."""
    root = tmp_path_factory.mktemp("tinyfer")
    make_synthetic_imagefolder(root, N_TRAIN, splits=("train",), seed=3, folders=FOLDERS)
    make_synthetic_imagefolder(root, N_VAL, splits=("val",), seed=3, folders=FOLDERS)
    n_val = N_VAL * len(FOLDERS)
    (root / "val" / "happy" / "broken.png").write_bytes(b"not an image at all")
    plain = tmp_path_factory.mktemp("plainfer")
    make_synthetic_imagefolder(plain, 1, splits=("test",), seed=3, folders=FOLDERS)
    plain = plain / "test"  # a class-folder tree without split folders
    n_plain = len(FOLDERS)
    return {"root": root, "n_val": n_val, "plain": plain, "n_plain": n_plain,
            "cache": tmp_path_factory.mktemp("landmarks")}


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_folder, tmp_path_factory) -> Path:
    """A 2-step checkpoint trained through the fer2013 preset on the tiny folder."""
    from fer_lib.training.train import train

    out = tmp_path_factory.mktemp("run")
    config = preset("fer2013", data_root=tiny_folder["root"], backbone="resnet18", image_size=48, epochs=1,
                    batch_size=4, max_steps_per_epoch=2, cache_dir=str(tiny_folder["cache"]), device="cpu",
                    out_dir=str(out))
    train(config)
    path = out / "checkpoints" / "best.pt"
    assert path.is_file()
    return path


# --------------------------------------------------------------------------- presets
def test_presets_are_listed_and_validated(tmp_path):
    assert {"fer2013", "synthetic_default"} <= set(PRESETS) == set(list_presets())
    cfg = preset("fer2013", data_root=tmp_path, epochs=2, dataset_kwargs={"max_per_class": 5})
    assert cfg.dataset == "fer2013" and cfg.data_root == str(tmp_path) and cfg.epochs == 2
    # dataset options merge into the preset's own (the augmentation stays)
    assert cfg.dataset_kwargs["max_per_class"] == 5
    aug = AugmentConfig(**{**cfg.dataset_kwargs["augment_config"],
                           "crop_scale": tuple(cfg.dataset_kwargs["augment_config"]["crop_scale"])})
    assert aug == FER2013_AUGMENT and aug.flip_p > 0 and 0 < aug.rotation_deg <= 15 and aug.crop_scale[0] < 1
    assert preset("synthetic_default").dataset == "synthetic"
    with pytest.raises(ConfigError, match="valid: .*epochs"):
        preset("fer2013", epochz=3)
    with pytest.raises(ConfigError, match="fer2013"):
        preset("fer2014")
    assert preset_dict("fer2013", data_root=tmp_path, au_weight=0)["au_weight"] == 0


def test_fer2013_preset_defaults_to_shared_data(fer2013_root):
    assert Path(preset("fer2013").data_root).resolve() == fer2013_root


def test_preset_augmentation_reaches_the_dataset(tiny_folder):
    cfg = preset("fer2013", data_root=tiny_folder["root"], image_size=48)
    out = build_datasets(cfg.dataset, root=cfg.data_root, image_size=cfg.image_size, landmarks="none",
                         progress=False, **cfg.dataset_kwargs)
    train = out["train"]
    assert train.augment and train.augment_config == FER2013_AUGMENT
    x, y, au, has_lm = train[0]
    assert tuple(x.shape) == (3, 48, 48) and tuple(au.shape) == (1, 48, 48)
    # grayscale 48 px PNGs become three equal channels before normalisation
    rgb = train.load_rgb(0)
    assert rgb.shape == (48, 48, 3) and np.array_equal(rgb[..., 0], rgb[..., 2])
    assert len(out["val"].skipped) == 1 and "broken.png" in out["val"].skipped[0][0]


# --------------------------------------------------------------------------- evaluate command
def test_evaluate_command_on_imagefolder(tiny_folder, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "eval.json"
    rc = main(["--checkpoint", str(tiny_checkpoint), "--data", str(tiny_folder["root"]), "--split", "val",
               "--cam-methods", "gradcam", "--cache-dir", str(tiny_folder["cache"]), "--out", str(out),
               "--no-progress"])
    assert rc == 0
    res = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "confusion" in printed and "ATT-COS" in printed
    assert res["n"] == tiny_folder["n_val"] and res["split"] == "val"
    assert res["skipped"]["count"] == 1 and res["skipped"]["items"][0]["path"].endswith("broken.png")
    assert res["class_names"] == list(EXPRESSIONS)
    confusion = np.array(res["confusion"])
    assert confusion.sum() == res["n"] and np.isclose(np.trace(confusion) / res["n"], res["accuracy"])
    for folder, name in FOLDERS.items():  # per-class accuracy for the classes present
        assert confusion[EXPRESSIONS.index(name)].sum() == N_VAL
        assert 0.0 <= res["per_class_accuracy"][name] <= 1.0
    assert res["per_class_accuracy"]["fear"] is None
    lm = res["landmarks"]
    assert lm["n"] == res["n"] and 0 <= lm["detected"] <= lm["n"]
    assert sum(v["detected"] for v in lm["per_class"].values()) == lm["detected"]
    assert list(res["att_cos"]) == res["model"]["tap_names"]
    assert res["cam_methods"] == ["gradcam"] and "gradcam" in res["cam_cos"]
    if res["n_valid_maps"]:
        assert -1.0 <= res["att_cos_mean"] <= 1.0 and -1.0 <= res["cam_cos"]["gradcam"] <= 1.0
        assert res["att_cos_ci"][0] <= res["att_cos_mean"] <= res["att_cos_ci"][1]
        low, high = res["cam_cos_ci"]["gradcam"]
        assert low <= res["cam_cos"]["gradcam"] <= high and "95%" in format_table(res)
    assert res["accuracy_ci"][0] <= res["accuracy"] <= res["accuracy_ci"][1]
    assert res["macro_f1_ci"][0] <= res["macro_f1"] <= res["macro_f1_ci"][1]
    assert "run" in res and res["run"]["config"]["checkpoint"] == str(tiny_checkpoint)
    assert "accuracy" in format_table(res)


def test_evaluate_plain_class_folder_uses_every_image(tiny_folder, tiny_checkpoint):
    res = evaluate(tiny_checkpoint, tiny_folder["plain"], CAMSettings(cam_methods="none", progress=False),
                   EvalOptions(cache_dir=str(tiny_folder["cache"])))
    assert res["split"] == "all" and res["n"] == tiny_folder["n_plain"] and res["cam_cos"] == {}


def test_evaluate_bad_inputs_fail_clearly(tiny_folder, tiny_checkpoint, tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "missing.pt"), "--data", str(tiny_folder["root"])]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    junk = tmp_path / "junk.pt"
    junk.write_text("hello")
    assert main(["--checkpoint", str(junk), "--data", str(tiny_folder["root"])]) == 2
    assert "could not read checkpoint" in capsys.readouterr().err
    bad = tmp_path / "no_classes"
    (bad / "holiday_photos").mkdir(parents=True)
    Image.new("L", (48, 48)).save(bad / "holiday_photos" / "a.png")
    assert main(["--checkpoint", str(tiny_checkpoint), "--data", str(bad), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "holiday_photos" in err and "not a known class" in err
    assert main(["--checkpoint", str(tiny_checkpoint), "--data", str(tmp_path / "nowhere")]) == 2
    assert "data not found" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="CAM method"):
        evaluate(tiny_checkpoint, tiny_folder["root"], CAMSettings(cam_methods="gradcamz"))


def test_evaluate_on_fer2013_subset(fer2013_root, tiny_checkpoint):
    res = evaluate(tiny_checkpoint, fer2013_root, CAMSettings(cam_methods="none", progress=False),
                   EvalOptions(dataset="fer2013", split="val", dataset_kwargs={"max_per_class": 6}))
    assert res["n"] == 42 and res["dataset"] == "fer2013" and res["skipped"]["count"] == 0
    assert res["landmarks"]["n"] == 42 and res["landmarks"]["detection_rate"] > 0.5
    assert all(v["n"] == 6 for v in res["landmarks"]["per_class"].values())


def test_evaluate_takes_a_model_and_a_dataset_object(tiny_folder, tiny_checkpoint):
    from fer_lib.analysis.evaluate import load_eval_dataset
    from fer_lib.models import load_checkpoint

    model, ckpt = load_checkpoint(tiny_checkpoint)
    options = EvalOptions(cache_dir=str(tiny_folder["cache"]))
    ds, name, split = load_eval_dataset(model.config, ckpt.get("config"), tiny_folder["root"], options, progress=False)
    by_path = evaluate(tiny_checkpoint, tiny_folder["root"], CAMSettings(cam_methods="gradcam", progress=False), options)
    by_object = evaluate(model, ds, CAMSettings(cam_methods="gradcam", progress=False), options)
    assert (name, split) == ("imagefolder", "val") and by_object["checkpoint"] is None
    for key in ("n", "accuracy", "macro_f1", "att_cos", "cam_cos", "cam_n"):
        assert by_object[key] == by_path[key], key
    if by_path["n_valid_maps"]:
        assert by_path.interpretability is not None and len(by_path.interpretability.predictions) == by_path["cam_n"]
    with pytest.raises(ConfigError, match="batch_size"):
        EvalOptions(batch_size=0)


def test_comparison_table_and_deltas(tiny_folder, tiny_checkpoint):
    res = evaluate(tiny_checkpoint, tiny_folder["plain"], CAMSettings(cam_methods="gradcam", progress=False),
                   EvalOptions(cache_dir=str(tiny_folder["cache"])))
    shifted = json.loads(json.dumps(res))
    shifted["accuracy"] += 0.25
    shifted["att_cos_mean"] = (res["att_cos_mean"] or 0.0) + 0.5
    table = comparison_frame({"base": res, "guided": shifted})
    assert list(table.index) == ["base", "guided"] and "cam_cos_gradcam" in table.columns
    assert table.loc["base", "train_time_s"] > 0  # read from the run's metrics.json
    deltas = pair_deltas(table, {"pair": ("base", "guided")})
    assert np.isclose(deltas.loc["pair", "accuracy"], 0.25) and np.isclose(deltas.loc["pair", "att_cos"], 0.5)
    with pytest.raises(ConfigError, match="not an evaluated model"):
        pair_deltas(table, {"pair": ("base", "nope")})


@pytest.mark.slow
def test_notebook08_smoke(tmp_path):
    """Without checkpoints the notebook trains a two-step pair on synthetic faces and writes every output."""
    import papermill as pm

    from conftest import REPO

    out_dir = tmp_path / "out"
    pm.execute_notebook(str(REPO / "notebooks" / "08_real_faces.ipynb"), str(tmp_path / "08.ipynb"),
                        parameters={"output_dir": str(out_dir), "n_samples": 8, "cam_methods": "gradcam"},
                        kernel_name="python3", language="python", cwd=str(REPO / "notebooks"), progress_bar=False)
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["smoke"] is True and "run" in metrics
    assert [d["pair"] for d in metrics["deltas"]] == ["cnn"]
    assert {m["model"] for m in metrics["comparison"]} == {"cnn baseline", "cnn AU-guided"}
    for name in metrics["figures"]:
        assert (out_dir / name).stat().st_size > 0
