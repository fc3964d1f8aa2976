"""Checkpoints are data, never code: malicious files are refused everywhere a model file is read,
fer_lib's own checkpoints load with weights_only=True and round-trip bit for bit."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from fer_lib import checkpoints as C
from fer_lib.analysis.evaluate import make_synthetic_imagefolder
from fer_lib.models import build_model, load_checkpoint
from fer_lib.training.train import TrainConfig, train

REPO = Path(__file__).resolve().parent.parent
FOLDERS = {"angry": "anger", "happy": "happiness", "neutral": "neutral"}


class _RunsCommand:
    """Unpickling this calls os.system: what a malicious model file does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 1-epoch run on a tiny ImageFolder: its out_dir, data root and config."""
    root = tmp_path_factory.mktemp("faces")
    make_synthetic_imagefolder(root, 2, splits=("train", "val"), seed=1, folders=FOLDERS)
    out = tmp_path_factory.mktemp("run")
    cfg = dict(dataset="imagefolder", data_root=str(root), backbone="resnet18", image_size=48, epochs=1,
               batch_size=4, max_steps_per_epoch=2, landmarks="none", device="cpu", au_weight=0.0)
    train(TrainConfig(out_dir=str(out), **cfg))
    return {"out": out, "root": root, "cfg": cfg}


@pytest.fixture()
def evil(tmp_path, run):
    """Two malicious files (object at the top, object inside model_state) and the marker they would create."""
    marker = tmp_path / "PWNED"
    good = torch.load(run["out"] / "checkpoints" / "best.pt", weights_only=True)
    top = tmp_path / "evil.pt"
    torch.save({**good, "payload": _RunsCommand(marker)}, top)
    inner = tmp_path / "evil_inner.pt"
    torch.save({**good, "model_state": {**good["model_state"], "x": _RunsCommand(marker)}}, inner)
    return {"files": [top, inner], "marker": marker}


def test_fer_lib_checkpoints_are_plain_data_and_round_trip_bit_for_bit(run):
    path = run["out"] / "checkpoints" / "best.pt"
    ckpt = torch.load(path, map_location="cpu", weights_only=True)  # no unpickling of code needed
    model, loaded = load_checkpoint(path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt["model_state"][k]), k
    # a resumable checkpoint's RNG states come back exactly
    last = torch.load(run["out"] / "checkpoints" / "last.pt", weights_only=True)
    state = C.restore_rng_state(last["rng_state"])
    np.random.set_state(state["numpy"])
    a = np.random.rand(3)
    np.random.set_state(C.restore_rng_state(C.plain_rng_state({"numpy": state["numpy"]}))["numpy"])
    assert np.array_equal(a, np.random.rand(3))


def test_malicious_files_are_refused_by_every_entry_point(run, evil, capsys, tmp_path):
    from fer_lib.analysis import evaluate
    from fer_lib.analysis import explain
    from fer_lib.analysis.explore import explore

    image = next((run["root"] / "val" / "happy").glob("*.png"))
    for bad in evil["files"]:
        assert evaluate.main(["--checkpoint", str(bad), "--data", str(run["root"]), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "refused to load" in err and str(bad) in err and "--trust-checkpoint" in err
        assert explain.main([str(image), "--checkpoint", str(bad), "--out", str(tmp_path / "x")]) == 2
        assert "refused to load" in capsys.readouterr().err
        with pytest.raises(C.UnsafeCheckpointError, match="trust=True"):
            explore(bad, np.zeros((48, 48, 3), np.uint8), landmarks=False)
        with pytest.raises(C.UnsafeCheckpointError):
            build_model("resnet18", image_size=48, pretrained=True, weights=bad)
        from fer_lib.training.train import main as train_main
        out = tmp_path / f"w_{bad.stem}"
        argv = ["--dataset", "imagefolder", "--data-root", str(run["root"]), "--backbone", "resnet18",
                "--image-size", "48", "--epochs", "1", "--batch-size", "4", "--max-steps-per-epoch", "1",
                "--landmarks", "none", "--device", "cpu", "--pretrained", "--weights", str(bad),
                "--out-dir", str(out)]
        assert train_main(argv) == 2
        assert "refused to load" in capsys.readouterr().err
        assert not (out / ".lock").exists()  # the run lock is released
    assert not evil["marker"].exists(), "a refused file must never run its code"


def test_resume_refuses_a_malicious_last_checkpoint(run, evil, tmp_path, capsys):
    from fer_lib.training.train import main as train_main

    out = tmp_path / "resume"
    (out / "checkpoints").mkdir(parents=True)
    cfg = TrainConfig(out_dir=str(out), **{**run["cfg"], "epochs": 2})
    (out / "config.json").write_text(json.dumps(cfg.to_dict()))
    evil["files"][0].rename(out / "checkpoints" / "last.pt")
    argv = ["--dataset", "imagefolder", "--data-root", str(run["root"]), "--backbone", "resnet18", "--image-size",
            "48", "--epochs", "2", "--batch-size", "4", "--max-steps-per-epoch", "2", "--landmarks", "none",
            "--device", "cpu", "--au-weight", "0", "--out-dir", str(out)]
    assert train_main(argv) == 2
    err = capsys.readouterr().err
    assert "refused to load" in err and "last.pt" in err
    assert not evil["marker"].exists()


def test_old_checkpoints_need_the_explicit_opt_in_and_convert_to_the_safe_format(run, tmp_path):
    good = torch.load(run["out"] / "checkpoints" / "last.pt", weights_only=True)
    old = tmp_path / "old.pt"  # what fer_lib wrote before: numpy / python RNG states pickled as objects
    np_state, py_state = np.random.get_state(), __import__("random").getstate()
    torch.save({**good, "rng_state": {"torch": torch.get_rng_state(), "numpy": np_state, "python": py_state}}, old)
    with pytest.raises(C.UnsafeCheckpointError, match="--trust-checkpoint"):
        load_checkpoint(old)
    model, _ = load_checkpoint(old, trust=True)
    with pytest.raises(C.UnsafeCheckpointError):
        C.convert(old, tmp_path / "new.pt")
    new = C.convert(old, tmp_path / "new.pt", trust=True)
    safe = torch.load(new, weights_only=True)
    restored = C.restore_rng_state(safe["rng_state"])
    assert np.array_equal(restored["numpy"][1], np_state[1]) and restored["numpy"][2] == np_state[2]
    assert restored["python"] == py_state
    rebuilt, _ = load_checkpoint(new)
    for k, v in model.state_dict().items():
        assert torch.equal(v, rebuilt.state_dict()[k])
    assert C.main(["convert", str(old), str(tmp_path / "n2.pt")]) == 2


def test_corrupt_and_missing_files_say_so(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_text("hello")
    with pytest.raises(C.CheckpointError, match="could not read checkpoint .*corrupt"):
        C.load_file(junk)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(C.CheckpointNotFoundError, match="shipped"):
        C.resolve_checkpoint("no_such_shipped_name")


def test_shipped_format_round_trips_in_fp16(run, tmp_path):
    model, ckpt = load_checkpoint(run["out"] / "checkpoints" / "best.pt")
    weights, card = C.save_shipped(tmp_path / "demo", model.state_dict(), {"model_config": model.config, "x": 1})
    assert weights.suffix == ".safetensors" and json.loads(card.read_text())["x"] == 1
    assert C.shipped_checkpoints(tmp_path) == {"demo": weights}
    back, _ = load_checkpoint(weights)
    for k, v in model.state_dict().items():
        expected = v.half().float() if v.is_floating_point() else v
        assert torch.equal(back.state_dict()[k], expected), k
    card.write_text("{not json")
    with pytest.raises(C.CheckpointError, match="model card"):
        load_checkpoint(weights)


def test_no_unsafe_load_outside_the_opt_in_path():
    offenders = []
    for path in (REPO / "fer_lib").rglob("*.py"):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"weights_only\s*=\s*False", line) and path.name != "checkpoints.py":
                offenders.append(f"{path.relative_to(REPO)}:{i}")
            if re.search(r"\bpickle\.loads?\(", line):
                offenders.append(f"{path.relative_to(REPO)}:{i}")
    assert offenders == []
    text = (REPO / "fer_lib" / "models" / "checkpoints.py").read_text()
    assert len(re.findall(r"weights_only\s*=\s*False", text)) == 1  # the trust=True path only


# --------------------------------------------------------------------------- the shipped FER2013 checkpoints
def test_shipped_checkpoints_load_by_name_and_say_what_they_are():
    from fer_lib.models import shipped_checkpoints
    from fer_lib.training.presets import preset_dict

    shipped = shipped_checkpoints()
    assert {"fer2013_lite0_baseline", "fer2013_lite0_guided"} <= set(shipped)
    recipe = preset_dict("fer2013_lite0")
    for name, lam in (("fer2013_lite0_baseline", 0.0), ("fer2013_lite0_guided", 9.0)):
        path = shipped[name]
        assert path.stat().st_size <= 12 * 2**20  # fp16, at most 12 MB each
        card = json.loads(path.with_suffix(".json").read_text())
        assert "research use" in card["terms"] and "PublicTest" in card["protocol"]
        train_cfg = card["train_config"]
        assert train_cfg["au_weight"] == lam
        for key in ("backbone", "pretrained", "image_size", "epochs", "lr", "optimizer", "label_smoothing"):
            assert train_cfg[key] == recipe[key], key  # the preset reproduces the shipped recipe
        assert list(train_cfg["layers"]) == list(recipe["layers"])
        assert 0.0 < card["metrics"]["accuracy"] <= 1.0 and card["metrics"]["n"] == 3589
        model, _ = load_checkpoint(name)  # by name, as every --checkpoint option takes it
        assert model.config["tap_names"] == ["blocks.4"] and model.config["mean"] == [0.5, 0.5, 0.5]
        with torch.no_grad():
            logits, feats = model.eval()(torch.zeros(1, 3, 112, 112))
        assert logits.shape == (1, 7) and tuple(feats[0].shape[-2:]) == (7, 7)


def test_a_corrupt_shipped_file_is_refused_with_its_path(tmp_path):
    from fer_lib.models import shipped_checkpoints

    src = shipped_checkpoints()["fer2013_lite0_guided"]
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(src.read_bytes()[: 4096])
    (tmp_path / "broken.json").write_text(src.with_suffix(".json").read_text())
    with pytest.raises(C.CheckpointError, match=str(bad)):
        load_checkpoint(bad)


def test_commands_take_a_shipped_name(run, capsys, tmp_path):
    from fer_lib.analysis import evaluate
    from fer_lib.analysis import explain

    out = tmp_path / "eval.json"
    assert evaluate.main(["--checkpoint", "fer2013_lite0_guided", "--data", str(run["root"]), "--landmarks", "none",
                          "--cam-methods", "none", "--no-progress", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["model"]["backbone"] == "tf_efficientnet_lite0" and res["n"] > 0
    with pytest.raises(C.CheckpointNotFoundError, match="fer2013_lite0_baseline"):
        load_checkpoint("fer2013_lite0_guidedd")  # a typo lists the shipped names
    assert explain.main([str(tmp_path / "none.png"), "--checkpoint", "no_such_name", "--out", str(tmp_path)]) == 2
    assert "fer2013_lite0_guided" in capsys.readouterr().err
