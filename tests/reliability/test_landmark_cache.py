"""Landmark cache: corrupt, partial, tampered or misplaced entries are detected, re-detected and counted."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from fer_lib import landmarks as L
from fer_lib.data import Record, attach_detected_landmarks


class CountingDetector:
    """A fast stand-in for FaceMesh: deterministic anchors from the pixels; blank images have no face."""

    scheme = "anchors"
    cache_key = "counting-v1"

    def __init__(self) -> None:
        self.calls = 0

    def detect(self, image):
        self.calls += 1
        rgb = L.as_rgb_array(image)
        if rgb.std() == 0:
            return None
        rng = np.random.default_rng(int(rgb.sum()) % (2**32))
        points = (0.3 + 0.4 * rng.random((len(L.ANCHORS), 2))).astype(np.float32)
        return L.FaceLandmarks(points=points, scheme=self.scheme, image_size=(rgb.shape[1], rgb.shape[0]))


@pytest.fixture()
def images():
    rng = np.random.default_rng(0)
    faces = [rng.integers(0, 256, (24, 24, 3), dtype=np.uint8) for _ in range(5)]
    return faces + [np.full((24, 24, 3), 9, np.uint8)]  # the last one has "no face"


def damage(path, how: str, donor=None) -> None:
    data = path.read_bytes()
    if how == "truncate":           # a partially written entry
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(b"\x00" * len(data))
    elif how == "tamper":           # a valid npz whose points changed after the checksum was written
        with np.load(path) as z:
            fields = {k: z[k] for k in z.files}
        fields["points"] = fields["points"][::-1].copy()
        with open(path, "wb") as fh:
            np.savez(fh, **fields)
    elif how == "foreign":          # another image's entry under this key (a copied or renamed file)
        shutil.copyfile(donor, path)


def test_batch_redetects_exactly_the_bad_entries_and_reports_the_count(tmp_path, images):
    cache = tmp_path / "cache"
    det = CountingDetector()
    first = L.detect_landmarks(images, det, cache, progress=False)
    assert det.calls == 6 and first.stats["found"] == 5 and first.stats["no_face"] == 1
    paths = [L.LandmarkCache(cache).path_for(r.key) for r in first.records]
    for path, how in zip(paths, ["truncate", "garbage", "tamper", "foreign"]):
        damage(path, how, donor=paths[4])
    (paths[4].parent / f".{paths[4].name}.abc123.tmp").write_bytes(b"half")  # a writer killed mid-write

    det.calls = 0
    second = L.detect_landmarks(images, det, cache, progress=False)
    assert det.calls == 4  # only the four bad entries were detected again
    assert second.stats["corrupt_cache_entries_rebuilt"] == 4 and second.stats["cache_hits"] == 2
    for a, b in zip(first.records, second.records):
        assert a.found == b.found and a.reason == b.reason
        if a.found:
            np.testing.assert_array_equal(a.landmarks.points, b.landmarks.points)  # nothing wrong was used
    det.calls = 0
    third = L.detect_landmarks(images, det, cache, progress=False)
    assert det.calls == 0 and third.stats["cache_hits"] == 6 and third.stats["corrupt_cache_entries_rebuilt"] == 0


def test_dataset_landmark_stats_report_the_rebuilt_entries(tmp_path, images):
    records = [Record(path=f"mem{i}", label=1, split="train", image=im) for i, im in enumerate(images)]
    det = CountingDetector()
    attach_detected_landmarks(records, tmp_path, progress=False, detector=det)
    key = L.content_key(images[0], det.cache_key)
    damage(L.LandmarkCache(tmp_path).path_for(key), "truncate")
    fresh = [Record(path=r.path, label=1, split="train", image=r.image) for r in records]
    stats = attach_detected_landmarks(fresh, tmp_path, progress=False, detector=det)
    assert stats["corrupt_cache_entries_rebuilt"] == 1 and stats["cache_hits"] == 5
    assert [r.has_landmarks for r in fresh] == [True] * 5 + [False]
    np.testing.assert_array_equal(fresh[0].anchors, records[0].anchors)
    assert "no face" in fresh[5].meta["landmark_reason"]


def test_an_entry_of_another_image_is_never_served(tmp_path, astronaut_landmarks):
    cache = L.LandmarkCache(tmp_path)
    cache.put("a" * 40, astronaut_landmarks)
    cache.put("b" * 40, None, reason="no face found", image_size=(10, 10))
    shutil.copyfile(cache.path_for("a" * 40), cache.path_for("b" * 40))
    assert cache.get("b" * 40) is None and cache.corrupt_entries == 1
    assert cache.get("a" * 40).found  # the genuine entry still serves
