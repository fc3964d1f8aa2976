"""Interruptions: SIGKILL mid-epoch then the same command resumes; a kill mid-write keeps the old file."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from _toy_data import toy_splits
from fer_lib.models import load_checkpoint
from fer_lib.training.train import TrainConfig, train
from fer_lib.utils import atomic_write_json

from .conftest import REPO, SIZE, Child, subprocess_env, train_cli


def _history(out: Path) -> list[dict]:
    return [{k: v for k, v in h.items() if k != "time_s"} for h in json.loads((out / "history.json").read_text())]


def _final(out: Path) -> dict:
    m = json.loads((out / "metrics.json").read_text())
    return {k: m[k] for k in ("best_epoch", "val", "test", "skipped_batches", "data")}


@pytest.mark.slow
def test_sigkill_mid_epoch_then_same_command_resumes_to_identical_metrics(tmp_path, synthetic_root):
    """Kill -9 while epoch 2 trains (epoch 1's checkpoint on disk); rerun the command; compare with a clean run."""
    clean_dir, killed_dir = tmp_path / "clean", tmp_path / "killed"
    clean = Child(train_cli(clean_dir, synthetic_root))            # runs side by side with the killed one
    victim = Child(train_cli(killed_dir, synthetic_root))
    last = killed_dir / "checkpoints" / "last.pt"
    assert victim.wait_for(lambda: last.exists() and b"epoch 2/3" in victim.err), victim.err.decode()[-2000:]
    victim.proc.send_signal(signal.SIGKILL)
    rc, _, _ = victim.finish()
    assert rc == -signal.SIGKILL
    # killed inside epoch 2: epoch 1 is the last checkpoint, nothing final was written, the lock is stale
    assert torch.load(last, weights_only=False)["epoch"] == 1
    assert len(json.loads((killed_dir / "history.json").read_text())) == 1
    assert not (killed_dir / "metrics.json").exists() and (killed_dir / ".lock").exists()
    load_checkpoint(killed_dir / "checkpoints" / "best.pt")  # the good checkpoint is intact and loadable

    again = subprocess.run(train_cli(killed_dir, synthetic_root), cwd=REPO, env=subprocess_env(),
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming" in again.stdout and "after epoch 1" in again.stdout
    rc, out, err = clean.finish()
    assert rc == 0, err[-3000:]
    assert "resuming" not in out
    assert _final(killed_dir) == _final(clean_dir)
    assert _history(killed_dir) == _history(clean_dir)
    assert not (killed_dir / ".lock").exists()


# --------------------------------------------------------------------------- kill while writing
def toy_config(out_dir: Path) -> TrainConfig:
    return TrainConfig(backbone="resnet18", layers=(5,), epochs=2, image_size=SIZE, batch_size=16, lr=0.02,
                       device="cpu", landmarks="ground_truth", out_dir=str(out_dir), seed=4)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    return train(toy_config(out), toy_splits(SIZE)), out


@pytest.mark.slow
def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch, uninterrupted):
    """The process dies half-way through writing epoch 2's last.pt: epoch 1's stays whole; a rerun ends the same."""
    results, clean_out = uninterrupted
    config = toy_config(tmp_path)
    real_save = torch.save
    saves: list[str] = []

    def dies_mid_write(obj, f, *args, **kwargs):
        saves.append(str(f))
        if len(saves) == 3:  # epoch 1: best.pt, last.pt; epoch 2: best.pt or last.pt -> dies half-way
            real_save(obj, f, *args, **kwargs)
            data = Path(f).read_bytes()
            Path(f).write_bytes(data[: len(data) // 2])
            raise SystemExit("simulated kill while writing a checkpoint")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(SystemExit):
        train(config, toy_splits(SIZE))
    monkeypatch.setattr(torch, "save", real_save)
    ckpt_dir = tmp_path / "checkpoints"
    model, ckpt = load_checkpoint(ckpt_dir / "last.pt")  # whole and loadable
    assert ckpt["epoch"] == 1
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["best.pt", "last.pt"]  # no half-written file left
    (ckpt_dir / ".last.pt.k9x2.tmp").write_bytes(b"what a kill -9 mid-write leaves behind")
    resumed = train(config, toy_splits(SIZE))
    assert not list(ckpt_dir.glob(".*.tmp"))  # cleaned up by the restarted run (it holds the lock)
    assert resumed["test"] == results["test"] and resumed["val"] == results["val"]


KILL_MID_WRITE = textwrap.dedent("""
    import os, signal, sys
    from fer_lib.utils import atomic_path
    target, payload = sys.argv[1], open(sys.argv[2], "rb").read()
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(payload[: len(payload) // 2])
            fh.flush()
            os.kill(os.getpid(), signal.SIGKILL)
""")


@pytest.mark.parametrize("kind", ["metrics.json", "last.pt"])
def test_sigkill_while_writing_a_results_file_leaves_the_old_one_intact(tmp_path, kind):
    """A real kill -9 in the middle of an atomic write: the old file is byte-identical and loads."""
    target = tmp_path / kind
    if kind == "metrics.json":
        atomic_write_json(target, {"test": {"accuracy": 0.5}, "epoch": 1})
        new = json.dumps({"test": {"accuracy": 0.9}, "epoch": 2, "pad": "x" * 100_000}).encode()
    else:
        torch.save({"epoch": 1, "w": torch.arange(10.0)}, target)
        new_path = tmp_path / "new.bin"
        torch.save({"epoch": 2, "w": torch.randn(50_000)}, new_path)
        new = new_path.read_bytes()
    before = target.read_bytes()
    (tmp_path / "payload").write_bytes(new)
    proc = subprocess.run([sys.executable, "-c", KILL_MID_WRITE, str(target), str(tmp_path / "payload")],
                          cwd=REPO, env=subprocess_env(), capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert target.read_bytes() == before
    if kind == "metrics.json":
        assert json.loads(target.read_text())["epoch"] == 1
    else:
        assert torch.load(target, weights_only=False)["epoch"] == 1
    # what a kill -9 leaves: one hidden, half-written temporary beside it, never the target itself
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{kind}.")]
    assert len(leftovers) == 1 and leftovers[0].endswith(".tmp")
