"""Landmark detection, the anchor adapters, bad input and the on-disk cache."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fer_lib import landmarks as L


def test_mediapipe_finds_478_points_on_real_face(astronaut_landmarks):
    lm = astronaut_landmarks
    assert lm.points.shape == (478, 2)
    assert lm.scheme == "mediapipe478"
    assert np.isfinite(lm.points).all()
    assert (lm.points >= 0).all() and (lm.points <= 1).all()


def test_anchor_geometry_on_real_face(astronaut_landmarks):
    """Anchors fall where anatomy puts them: brows above eyes above nose above mouth above chin,
    and the subject's left side on the image's right."""
    a = {n: p for n, p in zip(L.ANCHORS, astronaut_landmarks.anchors())}
    y = lambda n: a[n][1]  # noqa: E731
    assert y("forehead_center") < y("left_brow_mid") < y("left_eye_center") < y("nose_tip")
    assert y("nose_tip") < y("mouth_center") < y("chin")
    assert a["left_eye_center"][0] > a["right_eye_center"][0]
    assert a["left_mouth_corner"][0] > a["right_mouth_corner"][0]
    assert a["right_mouth_corner"][0] < a["mouth_center"][0] < a["left_mouth_corner"][0]


def test_every_scheme_maps_to_all_anchors():
    for scheme in L.SCHEMES.values():
        pts = np.random.default_rng(0).random((scheme.num_points, 2)).astype(np.float32)
        assert scheme.to_anchors(pts).shape == (len(L.ANCHORS), 2)
    with pytest.raises(ValueError, match="expects 68 points"):
        L.DLIB_68.to_anchors(np.zeros((478, 2)))
    with pytest.raises(ValueError, match="lacks anchors"):
        L.LandmarkScheme("broken", 3, {"chin": (0,)})
    with pytest.raises(ValueError, match="valid: mediapipe478"):
        L.get_scheme("nope")


def test_flip_anchors_mirrors_and_swaps_sides():
    rng = np.random.default_rng(1)
    a = rng.random((len(L.ANCHORS), 2)).astype(np.float32)
    f = L.flip_anchors(a)
    i, j = L.ANCHOR_INDEX["left_mouth_corner"], L.ANCHOR_INDEX["right_mouth_corner"]
    assert np.allclose(f[i], [1 - a[j, 0], a[j, 1]])
    c = L.ANCHOR_INDEX["chin"]
    assert np.allclose(f[c], [1 - a[c, 0], a[c, 1]])
    assert np.allclose(L.flip_anchors(f), a)


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16", "P"])
def test_load_image_converts_modes_to_rgb(tmp_path, mode):
    arr = (np.arange(32 * 32).reshape(32, 32) % 256).astype(np.uint8)
    if mode == "I;16":
        im = Image.fromarray(arr.astype(np.uint16) * 250)
        assert im.mode.startswith("I;16")
    elif mode == "RGBA":
        im = Image.fromarray(np.dstack([arr, arr, arr, np.full_like(arr, 128)]), mode="RGBA")
    else:
        im = Image.fromarray(arr, mode="L").convert(mode)
    path = tmp_path / f"img_{mode.replace(';', '')}.png"
    im.save(path)
    out = L.load_image(path)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert out.std() > 0


def test_bad_images_give_clear_errors(tmp_path):
    with pytest.raises(L.ImageError, match="does not exist"):
        L.load_image(tmp_path / "missing.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(L.ImageError, match="empty"):
        L.load_image(tmp_path / "empty.jpg")
    (tmp_path / "text.jpg").write_text("this is not an image")
    with pytest.raises(L.ImageError, match="not a readable image.*accepted formats"):
        L.load_image(tmp_path / "text.jpg")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "ok.jpg")
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 3])
    with pytest.raises(L.ImageError, match="corrupt or truncated"):
        L.load_image(tmp_path / "truncated.jpg")
    with pytest.raises(L.ImageError, match="HxW"):
        L.as_rgb_array(np.zeros((2, 3, 4, 5)))


def test_batch_records_missing_faces_and_bad_files(tmp_path, astronaut):
    blank = np.full((96, 96, 3), 127, np.uint8)
    (tmp_path / "junk.png").write_text("junk")
    Image.fromarray(astronaut).save(tmp_path / "face.png")
    items = [tmp_path / "face.png", blank, tmp_path / "junk.png", tmp_path / "nope.png"]
    batch = L.detect_landmarks(items, cache=tmp_path / "cache", progress=False)
    assert [r.found for r in batch.records] == [True, False, False, False]
    assert batch.stats == {"total": 4, "found": 1, "no_face": 1, "unreadable": 2, "cache_hits": 0,
                           "corrupt_cache_entries_rebuilt": 0}
    assert "no face" in batch.records[1].reason
    assert "not a readable image" in batch.records[2].reason
    assert "does not exist" in batch.records[3].reason
    anchors, found = batch.anchors()
    assert found.tolist() == [True, False, False, False] and np.isnan(anchors[1]).all()
    report = batch.write_report(tmp_path / "report.json")
    assert "junk.png" in report.read_text()


def test_cache_hit_returns_identical_arrays_and_skips_detection(tmp_path, astronaut):
    class CountingDetector(L.MediaPipeFaceMesh):
        calls = 0

        def detect(self, image):
            CountingDetector.calls += 1
            return super().detect(image)

    det = CountingDetector()
    first = L.detect_landmarks([astronaut], det, cache=tmp_path, progress=False)
    second = L.detect_landmarks([astronaut], det, cache=tmp_path, progress=False)
    assert CountingDetector.calls == 1
    assert second.stats["cache_hits"] == 1 and second.records[0].cached
    np.testing.assert_array_equal(first.records[0].landmarks.points, second.records[0].landmarks.points)
    # a missing face is cached too (no second detection attempt)
    blank = np.zeros((64, 64, 3), np.uint8)
    L.detect_landmarks([blank], det, cache=tmp_path, progress=False)
    again = L.detect_landmarks([blank], det, cache=tmp_path, progress=False)
    assert CountingDetector.calls == 2 and again.records[0].cached and not again.records[0].found


@pytest.mark.parametrize("damage", ["truncate", "garbage", "tamper"])
def test_corrupt_cache_entry_is_detected_and_rebuilt(tmp_path, astronaut_landmarks, damage):
    cache = L.LandmarkCache(tmp_path)
    cache.put("abcd" * 10, astronaut_landmarks)
    path = cache.path_for("abcd" * 10)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 100)
    else:  # a valid npz whose points were changed after the checksum was written
        with np.load(path) as z:
            fields = {k: z[k] for k in z.files}
        fields["points"] = fields["points"] + 0.01
        np.savez(path, **fields)
    assert cache.get("abcd" * 10) is None
    assert cache.corrupt_entries == 1 and not path.exists()


def test_crop_to_face_keeps_landmarks_aligned(astronaut, astronaut_landmarks):
    crop, lm = L.crop_to_face(astronaut, astronaut_landmarks, margin=0.2)
    assert crop.shape[0] < astronaut.shape[0] and crop.shape[:2] == lm.image_size[::-1]
    orig_px = astronaut_landmarks.pixels()
    assert np.allclose(lm.pixels() + (orig_px - lm.pixels())[0], orig_px, atol=1e-3)
    assert (lm.points > 0).all() and (lm.points < 1).all()
