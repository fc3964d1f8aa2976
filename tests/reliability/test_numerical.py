"""Numerical faults: a NaN/inf loss stops the run (last good checkpoint kept) or skips the batch; AMP scaler."""
from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch

from _toy_data import ToyFER, toy_splits
import fer_lib.training.train as train_mod
from fer_lib.training.losses import AUGuidedLoss
from fer_lib.models import load_checkpoint
from fer_lib.training.train import NonFiniteLossError, TrainConfig, train

from .conftest import SIZE


def toy_config(out_dir, **kw) -> TrainConfig:
    base = dict(backbone="resnet18", layers=(5,), epochs=2, image_size=SIZE, batch_size=16, lr=0.02,
                device="cpu", landmarks="ground_truth", out_dir=str(out_dir), seed=2, schedule="none")
    base.update(kw)
    return TrainConfig(**base)


class PoisonedAfter(ToyFER):
    """Toy train set whose images turn NaN once `clean_items` items have been read (i.e. from epoch 2 on)."""

    def __init__(self, clean_items: int, **kw):
        super().__init__(**kw)
        self.clean_items, self.reads = clean_items, 0

    def __getitem__(self, i):
        x, y, m, h = super().__getitem__(i)
        self.reads += 1
        return (torch.full_like(x, float("nan")) if self.reads > self.clean_items else x), y, m, h


def splits_poisoned_from_epoch_2() -> dict:
    splits = toy_splits(SIZE)
    splits["train"] = PoisonedAfter(clean_items=48, n=48, size=SIZE, seed=0)  # 48 items = one epoch
    return splits


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(NonFiniteLossError) as info:
        train(toy_config(tmp_path), splits_poisoned_from_epoch_2())
    message = str(info.value)
    assert "non-finite loss at epoch 2, step 1" in message and "nan" in message
    assert str(tmp_path / "checkpoints") in message and "nan_policy='skip'" in message
    model, ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point())
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / ".lock").exists()
    assert len(json.loads((tmp_path / "history.json").read_text())) == 1


def test_inf_loss_stops_too(tmp_path, monkeypatch):
    class InfOnSecondStep(AUGuidedLoss):
        calls = 0

        def forward(self, *args, **kwargs):
            loss, parts = super().forward(*args, **kwargs)
            InfOnSecondStep.calls += 1
            if InfOnSecondStep.calls == 2:
                loss, parts = loss * float("inf"), dataclasses.replace(parts, total=float("inf"))
            return loss, parts

    monkeypatch.setattr(train_mod, "AUGuidedLoss", InfOnSecondStep)
    with pytest.raises(NonFiniteLossError, match="non-finite loss at epoch 1, step 2"):
        train(toy_config(tmp_path, epochs=1), toy_splits(SIZE))
    assert not (tmp_path / "checkpoints" / "last.pt").exists()  # no epoch finished: nothing half-good saved
    assert not (tmp_path / ".lock").exists()


def test_nan_policy_skip_leaves_the_weights_untouched_by_bad_batches(tmp_path, monkeypatch):
    """Every batch of epoch 2 is NaN: all skipped, and the weights (and BatchNorm stats) stay those of epoch 1."""
    saved: dict[int, dict] = {}
    real = train_mod._save_checkpoint

    def keep_states(path, model, *args, **kwargs):
        epoch = args[3]
        saved[epoch] = copy.deepcopy({k: v.detach().clone() for k, v in train_mod._unwrap(model).state_dict().items()})
        return real(path, model, *args, **kwargs)

    monkeypatch.setattr(train_mod, "_save_checkpoint", keep_states)
    res = train(toy_config(tmp_path, nan_policy="skip"), splits_poisoned_from_epoch_2())
    history = json.loads((tmp_path / "history.json").read_text())
    assert [h["train"]["skipped_batches"] for h in history] == [0, 3]
    assert res["skipped_batches"] == 3 and math.isfinite(res["test"]["accuracy"])
    assert set(saved) == {1, 2}
    for name, value in saved[1].items():
        assert torch.equal(value, saved[2][name]), name


@pytest.mark.slow
def test_amp_flag_is_inert_on_cpu_and_the_scaler_state_is_checkpointed(tmp_path):
    """On CPU AMP is off whatever the flag (fp32, so results equal amp=False); the scaler state is saved for resume."""
    a = train(toy_config(tmp_path / "amp", epochs=1, amp=True, max_steps_per_epoch=2), toy_splits(SIZE))
    b = train(toy_config(tmp_path / "fp32", epochs=1, amp=False, max_steps_per_epoch=2), toy_splits(SIZE))
    assert a["test"] == b["test"]
    ckpt = torch.load(tmp_path / "amp" / "checkpoints" / "last.pt", weights_only=False)
    assert "scaler" in ckpt


@pytest.mark.skipif(not torch.cuda.is_available(), reason="AMP (fp16 + GradScaler) runs only on a CUDA GPU")
def test_amp_overflow_is_absorbed_by_the_grad_scaler(tmp_path, monkeypatch):
    """A huge initial loss scale overflows fp16 gradients: the scaler skips those steps and lowers the scale."""
    real = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda *a, **k: real(*a, **{**k, "init_scale": 2.0 ** 40}))
    res = train(toy_config(tmp_path, epochs=2, device="cuda", amp=True), toy_splits(SIZE))
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["scaler"]["scale"] < 2.0 ** 40  # overflowing steps were skipped and the scale backed off
    model, _ = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point())
    assert res["skipped_batches"] == 0 and math.isfinite(res["test"]["ce"])
