"""Results files name folders of the repository relative to its root ("results/..."), other folders
absolutely: they read the same on every machine and checkout (fer_lib.utils.repo_relative, portable_path)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fer_lib.metrics import write_metrics
from fer_lib.training.runs import check_run_identity
from fer_lib.utils import REPO_ROOT, ConfigError, portable_path, repo_path, repo_relative


def test_repo_relative_rewrites_the_checkout_inside_nested_values() -> None:
    record = {"out_dir": str(REPO_ROOT / "results" / "x"), "runs": [REPO_ROOT / "a", ("b", f"{REPO_ROOT}/c")],
              "root": str(REPO_ROOT), "other": "/elsewhere/results/x", "n": 3,
              "message": f"wrote {REPO_ROOT}/results/x/metrics.json"}
    assert repo_relative(record) == {"out_dir": "results/x", "runs": ["a", ["b", "c"]], "root": ".",
                                     "other": "/elsewhere/results/x", "n": 3,
                                     "message": "wrote results/x/metrics.json"}
    assert repo_relative(f"{REPO_ROOT}-old/x") == f"{REPO_ROOT}-old/x"     # a sibling folder is not inside


def test_portable_path_from_any_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO_ROOT / "notebooks")
    assert portable_path("../results/main/train") == "results/main/train"   # a notebook's own default
    assert portable_path(REPO_ROOT) == "."
    assert portable_path(tmp_path / "x") == str(tmp_path / "x")
    monkeypatch.chdir(tmp_path)
    assert portable_path("x") == str(tmp_path / "x")
    assert repo_path("results/x") == REPO_ROOT / "results" / "x" and repo_path(tmp_path) == tmp_path


class _Config:
    """The two methods check_run_identity uses (as TrainConfig has them)."""

    def __init__(self, out_dir: str, data_root: str, epochs: int = 1):
        self.values = {"out_dir": out_dir, "data_root": data_root, "epochs": epochs}

    def to_dict(self) -> dict:
        return dict(self.values)

    def identity(self) -> dict:
        return {k: v for k, v in self.values.items() if k != "out_dir"}


def test_config_json_is_portable_and_old_absolute_ones_still_match(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    out.mkdir()
    monkeypatch.chdir(REPO_ROOT / "notebooks")
    data = str(REPO_ROOT / "data" / "faces")
    check_run_identity(out, _Config("../results/demo/run", data), ignored=("out_dir",))
    # out_dir is the folder passed in (outside the repository here: absolute); data_root relative to the root
    assert json.loads((out / "config.json").read_text()) == {"out_dir": str(out), "data_root": "data/faces",
                                                              "epochs": 1}
    check_run_identity(out, _Config(str(out), data), ignored=("out_dir",))          # the same run: resumes
    with pytest.raises(ConfigError, match="different config"):
        check_run_identity(out, _Config(str(out), data, epochs=2), ignored=("out_dir",))
    # a config.json written before (absolute paths of this checkout) names the same run
    (out / "config.json").write_text(json.dumps({"out_dir": str(out), "data_root": data, "epochs": 1}))
    check_run_identity(out, _Config(str(out), "data/faces"), ignored=("out_dir",))


def test_metrics_json_holds_no_checkout_path(tmp_path: Path) -> None:
    record = {"test": {"accuracy": 0.5}, "config": {"out_dir": str(REPO_ROOT / "results" / "r")},
              "runs": {"plain": str(REPO_ROOT / "results" / "p")}, "data": os.fspath(tmp_path)}
    path = write_metrics(tmp_path, record, kind="training")
    text = path.read_text()
    assert str(REPO_ROOT) not in text
    written = json.loads(text)
    assert written["config"]["out_dir"] == "results/r" and written["runs"]["plain"] == "results/p"
    assert written["data"] == str(tmp_path)
