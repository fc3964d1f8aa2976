"""Every command reports a user's error (options, data layout, checkpoints, a full disk) as one line with exit 2."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fer_lib.training.train as train_mod
from fer_lib.models import build_model
from fer_lib.utils import error_line, run_cli

REPO = Path(__file__).resolve().parent.parent


def one_error_line(err: str) -> str:
    """The error line of a command's stderr (progress bars aside); fails on a traceback or several error lines."""
    assert "Traceback" not in err, err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def layer4_checkpoint(tmp_path_factory):
    """A tiny model trained with --layers 4: its last stage (blocks 'last') is not tapped."""
    torch.manual_seed(0)
    model = build_model("resnet18", image_size=48, layers=(4,))
    path = tmp_path_factory.mktemp("ckpt") / "layer4.pt"
    torch.save({"model_state": model.state_dict(), "model_config": model.config}, path)
    return path


def test_train_on_a_missing_data_root_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    code = train_mod.main(["--dataset", "imagefolder", "--data-root", "/nonexistent", "--device", "cpu",
                           "--image-size", "32", "--out-dir", str(out)])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and "/nonexistent" in line and "expected" in line
    assert not (out / ".lock").exists()  # the run lock is released


def test_debug_flag_shows_the_traceback(tmp_path, capsys):
    assert train_mod.main(["--dataset", "imagefolder", "--data-root", "/nonexistent", "--device", "cpu",
                           "--image-size", "32", "--out-dir", str(tmp_path / "run"), "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_os_errors_name_the_file_and_what_to_do():
    line = error_line(OSError(errno.ENOSPC, "No space left on device", "/data/run/checkpoints/last.pt"))
    assert line.startswith("/data/run/checkpoints/last.pt: No space left on device; the disk is full")
    assert "permissions" in error_line(PermissionError(errno.EACCES, "Permission denied", "/x/y.json"))

    def bug() -> int:
        raise KeyError("a bug is not a user error")

    with pytest.raises(KeyError):  # bugs keep their traceback
        run_cli(bug)


def test_full_disk_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    config = train_mod.TrainConfig(backbone="resnet18", layers=("last",), image_size=32, device="cpu",
                                   out_dir=str(tmp_path))
    model = build_model("resnet18", image_size=32, layers=("last",))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = train_mod._make_scheduler(optimizer, config, 1)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    path = tmp_path / "checkpoints" / "last.pt"
    train_mod._save_checkpoint(path, model, optimizer, scheduler, scaler, 1, config, {})
    before = path.read_bytes()
    real_save = torch.save

    def disk_fills_up(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        Path(f).write_bytes(Path(f).read_bytes()[:1000])
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1000 vs 960")

    monkeypatch.setattr(torch, "save", disk_fills_up)
    monkeypatch.setattr(train_mod.shutil, "disk_usage", lambda p: type("U", (), {"free": 0})())
    with pytest.raises(OSError) as info:
        train_mod._save_checkpoint(path, model, optimizer, scheduler, scaler, 2, config, {})
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert path.read_bytes() == before  # the previous checkpoint is intact
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no temporary left behind


FULL_DISK = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # files may not grow past 1 MB: a full disk
from fer_lib.training.train import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE stands in for a full disk on Linux")
def test_train_command_on_a_full_disk_is_one_line_and_releases_the_lock(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOG_minloglevel": "2", "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([sys.executable, "-c", FULL_DISK, "--dataset", "synthetic", "--landmarks", "ground_truth",
                           "--dataset-kwargs", '{"n_per_class": 1, "progress": false}', "--image-size", "32",
                           "--epochs", "1", "--max-steps-per-epoch", "1", "--batch-size", "4", "--device", "cpu",
                           "--out-dir", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    line = one_error_line(proc.stderr)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert str(out / "checkpoints") in line and ".pt" in line and "disk" in line
    assert not (out / ".lock").exists()
    assert not list((out / "checkpoints").glob("*")) if (out / "checkpoints").exists() else True


def test_evaluate_cams_default_to_a_tapped_layer_and_are_checked_before_the_data(layer4_checkpoint, tmp_path):
    from fer_lib import evaluate as E
    from fer_lib.analysis.interpret import compute_cams
    from fer_lib.models import load_checkpoint

    model, _ = load_checkpoint(layer4_checkpoint)
    assert list(model.tap_names) == ["layer3"]
    cams = compute_cams(model, torch.zeros(2, 3, 48, 48), "gradcam", torch.tensor([0, 1]))  # was: 'last' not tapped
    assert cams.shape == (2, 48, 48)
    E.check_cams_run(model, ["gradcam", "gradcam++"])
    data = E.make_synthetic_imagefolder(tmp_path / "faces", n_per_class=1, splits=("val",))
    out = tmp_path / "eval.json"
    assert E.main(["--checkpoint", str(layer4_checkpoint), "--data", str(data), "--cam-methods", "gradcam",
                   "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--out", str(out)]) == 0
    assert "gradcam" in json.loads(out.read_text())["cam_cos"]


def test_explain_and_explore_commands_report_errors_in_one_line(layer4_checkpoint, tmp_path, capsys, astronaut):
    from fer_lib.analysis import explain
    from fer_lib.analysis import explore

    photo = tmp_path / "a.png"
    Image.fromarray(astronaut).save(photo)
    assert explain.main([str(photo), "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in one_error_line(capsys.readouterr().err)
    assert explain.main([str(tmp_path / "*.jpg"), "--checkpoint", str(layer4_checkpoint)]) == 2
    assert "no file matches" in one_error_line(capsys.readouterr().err)
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the output folder should be")
    assert explain.main([str(photo), "--checkpoint", str(layer4_checkpoint), "--out", str(blocker),
                         "--no-progress"]) == 2
    assert str(blocker) in one_error_line(capsys.readouterr().err)
    assert explore.main([str(layer4_checkpoint), str(tmp_path / "nope.jpg"), "--out", str(tmp_path / "e.png")]) == 2
    assert "nope.jpg" in one_error_line(capsys.readouterr().err)
    assert explore.main([str(layer4_checkpoint), str(photo), "--cam", "gradcamz", "--out", str(tmp_path / "e.png")]) == 2
    assert "gradcam++" in one_error_line(capsys.readouterr().err)  # the valid choices are listed
    assert explore.main([str(layer4_checkpoint), str(photo), "--out", str(tmp_path / "e.png")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["faces"][0]["face"] == 0
    np.testing.assert_equal(Image.open(tmp_path / "e.png").size[0] > 500, True)
