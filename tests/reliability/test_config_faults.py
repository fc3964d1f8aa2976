"""Configuration faults fail before any work, with a message that lists the valid choices (or the minimum)."""
from __future__ import annotations

import pytest
import torch

import fer_lib.data as data_mod
import fer_lib.training.train as train_mod
from fer_lib.analysis import evaluate, interpret
from fer_lib.training.losses import AUGuidedLoss
from fer_lib.models import build_model, min_image_size
from fer_lib.training.train import TrainConfig, main
from fer_lib.utils import ConfigError, resolve_device

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")

# (TrainConfig field overrides, CLI flags, words the message must hold: the valid choices / the minimum)
CASES = {
    "unknown backbone": ({"backbone": "resnet_18"}, ["--backbone", "resnet_18"],
                         ["unknown backbone 'resnet_18'", "Did you mean", "resnet18", "Valid choices"]),
    "negative lambda": ({"au_weight": -1.0}, ["--au-weight", "-1"], ["au_weight", ">= 0"]),
    "layer out of range": ({"layers": (9,)}, ["--layers", "9"],
                           ["invalid layer 9", "stage numbers 1..5", "5=layer4", "'last'"]),
    "image too small for a CNN": ({"image_size": 16}, ["--image-size", "16"],
                                  ["too small for backbone 'resnet18'", "minimum is image_size=32"]),
    "image too small for a ViT": ({"backbone": "vit_tiny_patch16_224", "image_size": 8},
                                  ["--backbone", "vit_tiny_patch16_224", "--image-size", "8"],
                                  ["too small", "minimum is image_size=16"]),
    "unknown optimizer": ({"optimizer": "adam"}, ["--optimizer", "adam"], ["valid choices: sgd, adamw"]),
    "unknown au loss": ({"au_loss": "dice"}, ["--au-loss", "dice"], ["valid choices: cosine, l1, l2, kl"]),
    "unknown dataset": ({"dataset": "rafdb2"}, ["--dataset", "rafdb2"], ["valid choices", "synthetic", "rafdb"]),
}


def base_kwargs(out_dir) -> dict:
    return dict(backbone="resnet18", layers=("last",), image_size=32, epochs=1, device="cpu", out_dir=str(out_dir))


@pytest.fixture()
def no_work(monkeypatch):
    """Any dataset or model construction fails the test: configuration errors must come first."""
    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the configuration was validated")

    monkeypatch.setattr(data_mod, "build_datasets", forbidden)
    monkeypatch.setattr(train_mod, "build_model", forbidden)
    monkeypatch.setattr(train_mod, "_build_datasets", forbidden)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_training_config_fails_at_construction(tmp_path, no_work, case):
    fields, _, words = CASES[case]
    with pytest.raises(ConfigError) as info:
        TrainConfig(**{**base_kwargs(tmp_path / "run"), **fields})
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", ["unknown backbone", "layer out of range", "image too small for a ViT",
                                  "negative lambda"])
def test_bad_flags_on_the_command_line_exit_2_before_any_work(tmp_path, no_work, capsys, case):
    _, flags, words = CASES[case]
    out = tmp_path / "run"
    assert main(["--device", "cpu", "--image-size", "32", "--out-dir", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and all(w in err for w in words), err
    assert not out.exists()


@NO_GPU
def test_cuda_on_a_machine_without_gpu(tmp_path, no_work, capsys):
    with pytest.raises(ConfigError, match="no CUDA GPU is available; valid choices here: auto, cpu"):
        TrainConfig(**{**base_kwargs(tmp_path / "run"), "device": "cuda"})
    assert main(["--device", "cuda", "--out-dir", str(tmp_path / "run")]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err and not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="valid choices here: auto, cpu"):
        resolve_device("cuda")


def test_min_image_size_follows_the_backbone_stride():
    assert min_image_size("resnet18") == 32 and min_image_size("vit_tiny_patch16_224") == 16
    with pytest.raises(ConfigError, match="minimum is image_size=32"):
        build_model("convnext_atto", image_size=24)
    assert build_model("resnet18", image_size=32).config["image_size"] == 32  # the minimum itself works


class Untouchable:
    """A dataset that fails the test if anything reads it."""

    class_names = ("a", "b")

    def __len__(self):
        raise AssertionError("the dataset was touched before the options were validated")

    __getitem__ = __len__


def test_unknown_cam_method_or_device_fails_before_loading_anything(tmp_path):
    missing = tmp_path / "no_such_checkpoint.pt"  # a check after loading would raise FileNotFoundError instead
    with pytest.raises(ConfigError) as info:
        evaluate.evaluate(missing, Untouchable(), interpret.CAMSettings(cam_methods="gradcam,gradcamz"))
    assert "unknown CAM method 'gradcamz'" in str(info.value)
    assert all(m in str(info.value) for m in ("gradcam", "gradcam++", "layercam", "scorecam"))
    with pytest.raises(ConfigError, match="valid choices: label, prediction"):
        evaluate.evaluate(missing, Untouchable(), interpret.CAMSettings(target="logits"))
    with pytest.raises(ConfigError, match="unknown device 'gpu0'; valid choices: auto, cpu, cuda"):
        evaluate.evaluate(missing, Untouchable(), interpret.CAMSettings(device="gpu0"))


def test_layer_not_tapped_and_negative_lambda_elsewhere():
    model = build_model("resnet18", layers=(5,), image_size=32)
    with pytest.raises(ConfigError, match="stage numbers 1..5"):
        interpret.tapped_layers(model, 9)
    with pytest.raises(ConfigError, match="tapped layers: layer4"):
        interpret.tapped_layers(model, 3)
    with pytest.raises(ConfigError, match=">= 0"):
        AUGuidedLoss(au_weight=-0.5)
