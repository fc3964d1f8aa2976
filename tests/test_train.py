"""fer_lib.training.train: config validation, outputs, determinism, resume after a kill, locks, NaN policy."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _toy_data import ToyFER, toy_splits  # noqa: E402

import fer_lib.training.train as train_mod  # noqa: E402
from fer_lib.models import load_checkpoint  # noqa: E402
from fer_lib.training.train import NonFiniteLossError, RunLockedError, TrainConfig, evaluate, main, train  # noqa: E402
from fer_lib.utils import ConfigError, file_lock  # noqa: E402

SIZE = 32


def tiny_config(out_dir, **kw) -> TrainConfig:
    base = dict(backbone="resnet18", layers=(4, 5), epochs=2, image_size=SIZE, batch_size=16, lr=0.02,
                device="cpu", landmarks="ground_truth", out_dir=str(out_dir), au_weight=9.0, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def _strip_times(history):
    return [{k: v for k, v in h.items() if k != "time_s"} for h in history]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    config = tiny_config(out)
    return config, train(config, toy_splits(SIZE)), out


@pytest.mark.parametrize("field,value,match", [
    ("optimizer", "adam", "sgd, adamw"), ("schedule", "linear", "step, cosine, none"),
    ("au_loss", "dice", "cosine, l1, l2, kl"), ("device", "tpu", "auto, cpu, cuda"),
    ("nan_policy", "ignore", "stop, skip"), ("epochs", 0, "an integer >= 1"),
    ("au_weight", -1.0, ">= 0"), ("layers", (7,), "valid choices"), ("backbone", "resnet_18", "resnet18"),
    ("pretrained", True, "weights"),
])
def test_invalid_config_fails_at_construction(tmp_path, field, value, match):
    with pytest.raises(ConfigError, match=match):
        tiny_config(tmp_path, **{field: value})


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_gpu_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        tiny_config(tmp_path, device="cuda")


def test_outputs_follow_the_contract(finished_run):
    config, results, out = finished_run
    assert (out / "checkpoints" / "best.pt").is_file() and (out / "checkpoints" / "last.pt").is_file()
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["best_epoch"] == results["best_epoch"] in (1, 2)
    assert on_disk["run"]["config"]["backbone"] == "resnet18" and "git_revision" in on_disk["run"]
    for split in ("val", "test"):
        m = on_disk[split]
        assert {"accuracy", "macro_f1", "per_class_accuracy", "confusion", "att_cos", "att_cos_mean", "n"} <= set(m)
        assert m["n"] == 21 and set(m["att_cos"]) == {"layer3", "layer4"}
        assert sum(map(sum, m["confusion"])) == 21
        ds = toy_splits(SIZE)[split]  # every 5th sample without landmarks, neutral without AUs
        expected = sum(bool(h) and int(y) != 0 for y, h in zip(ds.labels, ds.has_landmarks))
        assert m["n_valid_maps"] == expected < 21
        for key, ci in (("accuracy", "accuracy_ci"), ("macro_f1", "macro_f1_ci"), ("att_cos_mean", "att_cos_ci")):
            low, high = m[ci]  # the 95% interval beside each headline number
            assert 0.0 <= low <= m[key] <= high <= 1.0 and high > low, (split, ci, m[ci])
    assert on_disk["train_time_s"] > 0 and on_disk["images_per_s"] > 0
    import pandas as pd

    csv = pd.read_csv(out / "metrics.csv")
    assert list(csv["split"]) == ["train", "val", "train", "val"]
    assert csv.loc[csv.split == "train", "au"].gt(0).all()  # the AU term was active
    assert {"att_cos/layer3", "att_cos/layer4", "macro_f1", "lr"} <= set(csv.columns)


def test_checkpoint_rebuilds_the_model_alone(finished_run):
    config, results, out = finished_run
    model, ckpt = load_checkpoint(out / "checkpoints" / "best.pt")
    assert set(ckpt) >= {"model_state", "model_config", "optimizer", "scheduler", "scaler", "epoch",
                         "rng_state", "config", "run", "metrics"}
    assert model.config["class_names"][1] == "happiness" and model.tap_names == ["layer3", "layer4"]
    again = evaluate(model, toy_splits(SIZE)["test"], "cpu", batch_size=8)
    assert again["accuracy"] == results["test"]["accuracy"]
    assert again["att_cos"]["layer4"] == pytest.approx(results["test"]["att_cos"]["layer4"], abs=1e-6)
    # the final val record is the best epoch's own evaluation of these weights (reused, not recomputed): equal
    val = evaluate(model, toy_splits(SIZE)["val"], "cpu", batch_size=8)
    assert val["accuracy"] == results["val"]["accuracy"] and val["confusion"] == results["val"]["confusion"]
    assert val["att_cos_mean"] == pytest.approx(results["val"]["att_cos_mean"], abs=1e-6)


def test_same_seed_same_metrics_and_finished_run_is_not_redone(finished_run, tmp_path):
    config, results, out = finished_run
    stale = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    os.makedirs(tmp_path / "again", exist_ok=True)
    (tmp_path / "again" / ".lock").write_text(json.dumps({"pid": int(stale.stdout), "host": os.uname().nodename}))
    second = train(tiny_config(tmp_path / "again"), toy_splits(SIZE))  # stale lock of a dead pid: taken over
    assert not (tmp_path / "again" / ".lock").exists()
    assert second["test"] == results["test"] and second["val"] == results["val"]
    h1 = json.loads((out / "history.json").read_text())
    h2 = json.loads((tmp_path / "again" / "history.json").read_text())
    assert _strip_times(h1) == _strip_times(h2)
    assert train(config, toy_splits(SIZE))["run"] == results["run"]  # already finished: read back


def test_resume_after_a_kill_ends_like_an_uninterrupted_run(finished_run, tmp_path, monkeypatch):
    _, results, out = finished_run
    real = train_mod._train_one_epoch
    calls = []

    def killed_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated kill")
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "_train_one_epoch", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tmp_path), toy_splits(SIZE))
    assert torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)["epoch"] == 1
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / ".lock").exists()
    monkeypatch.setattr(train_mod, "_train_one_epoch", real)
    resumed = train(tiny_config(tmp_path), toy_splits(SIZE))
    assert resumed["test"] == results["test"]
    assert _strip_times(json.loads((tmp_path / "history.json").read_text())) == \
        _strip_times(json.loads((out / "history.json").read_text()))


def test_other_config_in_the_same_out_dir_is_refused(finished_run):
    config, _, out = finished_run
    with pytest.raises(ConfigError, match="different config.*au_weight: 9.0 -> 0.0"):
        train(tiny_config(out, au_weight=0.0), toy_splits(SIZE))


def test_a_live_lock_refuses_a_second_run(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    holder = json.dumps({"pid": os.getpid(), "host": os.uname().nodename})
    with file_lock(tmp_path / ".lock", blocking=False, holder=holder):  # a live run holds the folder
        with pytest.raises(RunLockedError, match=f"in use by another run \\(pid {os.getpid()} on "):
            train(tiny_config(tmp_path), toy_splits(SIZE))
    assert not (tmp_path / "checkpoints").exists()


class NaNFER(ToyFER):
    """Toy set whose first `bad` images are NaN (forces a non-finite loss)."""

    def __init__(self, bad: int, **kw):
        super().__init__(**kw)
        self.images[:bad] = float("nan")


def test_non_finite_loss_stops_or_skips(tmp_path):
    splits = {"train": NaNFER(bad=48, n=48, size=SIZE), "val": ToyFER(14, SIZE, 1)}
    with pytest.raises(NonFiniteLossError, match="non-finite loss at epoch 1.*nan_policy='skip'"):
        train(tiny_config(tmp_path / "stop", epochs=1), splits)
    splits["train"] = NaNFER(bad=16, n=48, size=SIZE, seed=0)
    res = train(tiny_config(tmp_path / "skip", epochs=1, nan_policy="skip", batch_size=8), splits)
    assert res["skipped_batches"] >= 1
    model, _ = load_checkpoint(tmp_path / "skip" / "checkpoints" / "last.pt")
    assert all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point())
    assert math.isfinite(res["val"]["accuracy"])


def test_cli_rejects_bad_flags(capsys):
    assert main(["--optimizer", "adam", "--device", "cpu"]) == 2
    assert "sgd, adamw" in capsys.readouterr().err


# --------------------------------------------------------------------------- the shared step and schedule
def test_shared_step_stops_or_skips_a_non_finite_loss_and_builds_one_schedule():
    from fer_lib.training.step import OptimSpec, Schedule, StepSettings, TrainStep, build_optimizer

    class Regression(TrainStep):
        def compute_loss(self, batch):
            x, y = batch
            return ((self.model(x) - y) ** 2).mean(), "mse"

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
    opt, sched = build_optimizer(model.parameters(), OptimSpec("sgd", lr=0.1), Schedule("cosine", total_steps=4))
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    step = Regression(model, opt, sched)
    before = [p.detach().clone() for p in model.parameters()]
    assert step((x, y), where="step 1") == "mse"
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # a step was taken
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi / 4)))
    bad = (torch.full_like(x, float("nan")), y)
    skipper = Regression(model, opt, sched, settings=StepSettings(nan_policy="skip"))
    params = [p.detach().clone() for p in model.parameters()]
    buffers = [b.detach().clone() for b in model.buffers()]
    assert skipper(bad, where="step 2") is None
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))  # BatchNorm stats restored
    assert sched.last_epoch == 2  # the schedule still advanced
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 3; lower lr") as info:
        step(bad, where="step 3")
    assert isinstance(info.value, FloatingPointError)  # what continual and ssl raised before
    # warm-up then cosine; step decay; constant
    warm = Schedule("cosine", total_steps=10, warmup_steps=2)
    assert [warm.factor(s) for s in (0, 1, 2)] == [0.5, 1.0, 1.0] and warm.factor(10) == pytest.approx(0.0)
    assert [Schedule("step", step_every=2, gamma=0.5).factor(s) for s in range(5)] == [1, 1, 0.5, 0.5, 0.25]
    assert Schedule("none").factor(7) == 1.0
    with pytest.raises(ConfigError, match="valid choices: sgd, adamw"):
        build_optimizer(model.parameters(), OptimSpec("adam"), Schedule())
