"""Shared test set-up: quiet MediaPipe/TensorFlow logs, a real face photo with its landmarks."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("GLOG_minloglevel", "2")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
FER2013 = (REPO.parent / "shared" / "data" / "fer2013").resolve()


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    """A real face photo shipped inside scikit-image (512x512 RGB)."""
    from skimage import data

    return data.astronaut()


@pytest.fixture(scope="session")
def astronaut_landmarks(astronaut):
    from fer_lib.faces.landmarks import MediaPipeFaceMesh

    detector = MediaPipeFaceMesh()
    lm = detector.detect(astronaut)
    detector.close()
    assert lm is not None, "MediaPipe FaceMesh must find the astronaut's face"
    return lm


@pytest.fixture(scope="session")
def fer2013_root() -> Path:
    """../shared/data/fer2013, or skip with the reason where this machine lacks it."""
    if not (FER2013 / "train").is_dir():
        pytest.skip(f"FER2013 not found at {FER2013} (optional real-face data; see README)")
    return FER2013
