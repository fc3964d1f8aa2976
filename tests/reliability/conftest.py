"""Shared helpers of the reliability suite: tiny configs, subprocess environment, a tiny synthetic set."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

TESTS = Path(__file__).resolve().parent.parent
REPO = TESTS.parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

SIZE = 32  # pixels: the smallest size resnet18 takes (its last stage is then 1x1)


def subprocess_env() -> dict[str, str]:
    """Environment for child processes: one thread each (repeatable and polite on a shared machine)."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = "1"
    env.update(PYTHONUNBUFFERED="1", PYTHONHASHSEED="0", GLOG_minloglevel="2", TF_CPP_MIN_LOG_LEVEL="3",
               CUDA_VISIBLE_DEVICES="",
               FER_LIB_PROGRESS="1")   # the bars' "epoch 2/3" tells a test where training is (stderr is a pipe)
    return env


def train_cli(out_dir: Path, data_root: Path, epochs: int = 3, n_per_class: int = 6, seed: int = 1,
              extra: tuple[str, ...] = ()) -> list[str]:
    """`python -m fer_lib.training.train ...` on a tiny synthetic set with exact (ground-truth) landmarks, on CPU."""
    return [sys.executable, "-m", "fer_lib.training.train", "--dataset", "synthetic", "--data-root", str(data_root),
            "--dataset-kwargs", f'{{"n_per_class": {n_per_class}, "progress": false}}',
            "--landmarks", "ground_truth", "--backbone", "resnet18", "--layers", "4,5",
            "--image-size", str(SIZE), "--batch-size", "4", "--epochs", str(epochs), "--lr", "0.02",
            "--device", "cpu", "--seed", str(seed), "--out-dir", str(out_dir), *extra]


class Child:
    """A child process whose stderr is collected in the background (tqdm bars show the epoch it is in)."""

    def __init__(self, cmd: list[str], cwd: Path = REPO) -> None:
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=subprocess_env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.out = bytearray()
        self.err = bytearray()
        self._threads = [threading.Thread(target=self._pump, args=(self.proc.stdout, self.out), daemon=True),
                         threading.Thread(target=self._pump, args=(self.proc.stderr, self.err), daemon=True)]
        for t in self._threads:
            t.start()

    @staticmethod
    def _pump(stream, sink: bytearray) -> None:
        for chunk in iter(lambda: stream.read1(4096), b""):
            sink.extend(chunk)

    def wait_for(self, condition: Callable[[], bool], timeout: float = 300.0) -> bool:
        """Poll `condition` every 20 ms while the child runs; True once it holds."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if condition():
                return True
            if self.proc.poll() is not None:
                return condition()
            time.sleep(0.02)
        return False

    def finish(self, timeout: float = 600.0) -> tuple[int, str, str]:
        rc = self.proc.wait(timeout=timeout)
        for t in self._threads:
            t.join(timeout=10)
        return rc, self.out.decode(errors="replace"), self.err.decode(errors="replace")


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """Root holding the tiny synthetic set the CLI runs use (generated once, then reused by every child)."""
    from fer_lib.data import build_datasets

    root = tmp_path_factory.mktemp("synthetic")
    build_datasets("synthetic", root=root, image_size=SIZE, seed=1, landmarks="ground_truth", n_per_class=6,
                   progress=False)
    return root
