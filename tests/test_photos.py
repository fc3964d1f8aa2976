"""Photos as users bring them: EXIF orientation, odd formats, huge photos, several faces, folders of photos.

Every image here is made by the test from scikit-image's astronaut or drawn with PIL.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from fer_lib import explain as X
from fer_lib import landmarks as L
from fer_lib.faces.landmarks import ANCHOR_INDEX
from fer_lib.models import build_model

SIZE = 48
#: landmark-box sides (px) of the astronaut faces pasted on the group photo, and where (top-left of the face box)
GROUP_FACES = {256: (980, 300), 150: (700, 60), 96: (420, 420), 64: (250, 120), 48: (60, 560)}


def _upright(lm: L.FaceLandmarks) -> bool:
    """Eyes above the mouth, left and right eyes side by side: a face that is not lying on its side."""
    a = lm.anchors()
    eyes = (a[ANCHOR_INDEX["left_eye_center"]] + a[ANCHOR_INDEX["right_eye_center"]]) / 2
    mouth = a[ANCHOR_INDEX["mouth_center"]]
    eye_dx = abs(a[ANCHOR_INDEX["left_eye_center"], 0] - a[ANCHOR_INDEX["right_eye_center"], 0])
    eye_dy = abs(a[ANCHOR_INDEX["left_eye_center"], 1] - a[ANCHOR_INDEX["right_eye_center"], 1])
    return bool(mouth[1] > eyes[1] and eye_dx > eye_dy)


@pytest.fixture(scope="module")
def finder():
    f = L.FaceFinder()
    yield f
    f.close()


@pytest.fixture(scope="module")
def face_box(astronaut, astronaut_landmarks):
    """The astronaut's landmark box (x0, y0, x1, y1) in its 512 px photo."""
    b = L.landmark_box(astronaut_landmarks)
    return b.x0, b.y0, b.x1, b.y1


@pytest.fixture(scope="module")
def group_photo(astronaut, face_box, tmp_path_factory):
    """A 1366x768 canvas with the astronaut's face pasted at landmark-box sides of GROUP_FACES; (path, {side: box})."""
    x0, y0, x1, y1 = face_box
    side = max(x1 - x0, y1 - y0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    crop_half = 0.9 * side  # the face with hair and neck around it
    crop = Image.fromarray(astronaut).crop((int(cx - crop_half), int(cy - crop_half),
                                            int(cx + crop_half), int(cy + crop_half)))
    rng = np.random.default_rng(0)
    canvas = Image.fromarray(rng.integers(70, 110, (768, 1366, 3), dtype=np.uint8))
    truth = {}
    for target, (px, py) in GROUP_FACES.items():
        scale = target / side
        piece = crop.resize((round(crop.width * scale), round(crop.height * scale)), Image.BICUBIC)
        canvas.paste(piece, (px, py))
        # where the face's landmark box lands on the canvas
        fx0 = px + (x0 - (cx - crop_half)) * scale
        fy0 = py + (y0 - (cy - crop_half)) * scale
        truth[target] = (fx0, fy0, fx0 + (x1 - x0) * scale, fy0 + (y1 - y0) * scale)
    path = tmp_path_factory.mktemp("group") / "group.png"
    canvas.save(path)
    return path, truth


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("resnet18", image_size=SIZE, layers=(4,))
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save({"model_state": model.state_dict(), "model_config": model.config}, path)
    return path


# ----------------------------------------------------------------------------- reading photos
def test_exif_orientation_is_applied_so_the_face_is_upright(astronaut, tmp_path, finder):
    stored = np.rot90(astronaut, k=1)  # the camera stored the photo turned left...
    exif = Image.Exif()
    exif[L.EXIF_ORIENTATION] = 6  # ...and tagged it "rotate 90 degrees clockwise to show"
    path = tmp_path / "phone.jpg"
    Image.fromarray(np.ascontiguousarray(stored)).save(path, quality=95, exif=exif)
    rgb, notes = L.read_image(path)
    assert rgb.shape == astronaut.shape and any("orientation 6" in n for n in notes)
    assert np.abs(rgb.astype(int) - astronaut).mean() < 6  # the upright photo, up to JPEG noise
    assert L.photo_size(path) == (512, 512)
    faces = L.detect_faces(path, finder=finder)
    assert len(faces) == 1 and _upright(faces[0].landmarks)
    # without the tag applied, the same pixels hold a face lying on its side
    sideways = L.MediaPipeFaceMesh().detect(np.ascontiguousarray(stored))
    assert sideways is None or not _upright(sideways)
    # a PIL image opened by the caller is uprighted too, and the cache keys the rotated file apart
    with Image.open(path) as im:
        assert np.abs(L.as_rgb_array(im).astype(int) - astronaut).mean() < 6
    plain = tmp_path / "plain.jpg"
    Image.fromarray(np.ascontiguousarray(stored)).save(plain, quality=95)
    assert L.content_key(path, "k") != L.content_key(plain, "k")


def test_cmyk_16bit_palette_and_animated_images(astronaut, tmp_path):
    Image.fromarray(astronaut).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    rgb, notes = L.read_image(tmp_path / "cmyk.jpg")
    assert rgb.shape == (512, 512, 3) and np.abs(rgb.astype(int) - astronaut).mean() < 12
    assert any("CMYK" in n for n in notes)
    # a dark 16-bit photo stays dark (scaled by its bit depth, not stretched to the full range)
    gray = np.asarray(Image.fromarray(astronaut).convert("L")) // 3
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "dark16.png")
    assert Image.open(tmp_path / "dark16.png").mode.startswith("I;16")
    out = L.load_image(tmp_path / "dark16.png")
    assert np.abs(out[..., 0].astype(int) - gray).max() <= 1
    Image.fromarray(astronaut).convert("P", palette=Image.Palette.ADAPTIVE, colors=256).save(tmp_path / "pal.png")
    assert np.abs(L.load_image(tmp_path / "pal.png").astype(int) - astronaut).mean() < 10
    frames = [Image.new("RGB", (40, 30), c) for c in ((250, 0, 0), (0, 0, 250))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    rgb, notes = L.read_image(tmp_path / "anim.gif")
    assert rgb[..., 0].mean() > 200 and rgb[..., 2].mean() < 50  # the first (red) frame
    assert any("first frame" in n and "2 frames" in n for n in notes)


def test_large_photo_is_decoded_downscaled_and_its_faces_map_back(astronaut, tmp_path, finder, face_box):
    big = Image.fromarray(astronaut).resize((2560, 2560), Image.BILINEAR)
    big.save(tmp_path / "big.jpg", quality=90)
    with pytest.raises(L.ImageError, match="too large"):
        L.read_image(tmp_path / "big.jpg", max_pixels=2_000_000)
    # with max_side, the JPEG is decoded at a reduced scale: under a pixel budget the full photo would exceed
    rgb, notes = L.read_image(tmp_path / "big.jpg", max_pixels=2_000_000, max_side=1024)
    assert max(rgb.shape[:2]) == 1024 and any("downscaled from 2560x2560" in n for n in notes)
    small = L.FaceFinder(max_side=1024, mesh=finder.mesh, face_detector=finder.face_detector)
    faces = L.detect_faces(tmp_path / "big.jpg", finder=small)
    assert len(faces) == 1
    expected = np.array(face_box) * 5  # photo coordinates of the 2560 px photo
    assert np.abs(np.array(faces[0].box) - expected).max() < 0.04 * 2560


# ----------------------------------------------------------------------------- several faces
def test_group_photo_every_face_found_largest_first(group_photo, finder):
    path, truth = group_photo
    faces = L.detect_faces(path, finder=finder)
    assert [f.index for f in faces] == list(range(len(faces)))
    sizes = [f.size for f in faces]
    assert sizes == sorted(sizes, reverse=True)
    matched = {}
    for target, (tx0, ty0, tx1, ty1) in truth.items():
        hits = [f for f in faces if tx0 <= (f.box[0] + f.box[2]) / 2 <= tx1 and ty0 <= (f.box[1] + f.box[3]) / 2 <= ty1]
        assert len(hits) == 1, f"the {target} px face at {truth[target]} was found {len(hits)} times: " \
                               f"{[(f.box, f.size) for f in faces]}"
        matched[target] = hits[0]
        assert 0.7 * target <= hits[0].size <= 1.3 * target
        assert _upright(hits[0].landmarks)
        assert hits[0].landmarks.image_size == (1366, 768)
    assert len(faces) == len(truth)  # and nothing else
    assert [f.size for f in L.detect_faces(path, max_faces=2, finder=finder)] == sizes[:2]
    largest = finder.detect(np.asarray(Image.open(path)))  # where one face is wanted: the largest
    assert largest is not None and L.landmark_box(largest).area == pytest.approx(
        L.landmark_box(matched[256].landmarks).area, rel=0.05)
    with pytest.raises(ValueError, match="max_faces"):
        L.detect_faces(path, max_faces=0, finder=finder)


def test_detect_faces_cache_and_tight_face_crops(astronaut, tmp_path, finder):
    face = np.asarray(Image.fromarray(astronaut).crop((160, 50, 290, 200)).resize((48, 48)))  # FER2013-like crop
    assert len(L.detect_faces(face, finder=finder)) == 1  # FaceMesh on the whole crop when BlazeFace finds nothing
    assert L.detect_faces(np.full((64, 64, 3), 127, np.uint8), finder=finder) == []
    first = L.detect_faces(astronaut, finder=finder, cache=tmp_path / "cache")

    class Refuses(L.FaceFinder):
        def find(self, image, max_faces=None):
            raise AssertionError("a cached photo must not be searched again")

    again = L.detect_faces(astronaut, finder=Refuses(mesh=finder.mesh, face_detector=finder.face_detector),
                           cache=tmp_path / "cache")
    assert [f.box for f in again] == [f.box for f in first]
    np.testing.assert_array_equal(again[0].landmarks.points, first[0].landmarks.points)


def test_detect_landmarks_takes_one_image_or_refuses_an_ambiguous_array(astronaut, tmp_path):
    Image.fromarray(astronaut).save(tmp_path / "a.png")
    for one in (astronaut, Image.fromarray(astronaut), tmp_path / "a.png", str(tmp_path / "a.png")):
        batch = L.detect_landmarks(one, progress=False)
        assert len(batch.records) == 1 and batch.records[0].found
    batch = L.detect_landmarks(np.stack([astronaut, np.zeros_like(astronaut)]), progress=False)
    assert [r.found for r in batch.records] == [True, False]
    with pytest.raises(L.ImageError, match="cannot tell the images.*list"):
        L.detect_landmarks(np.zeros((5, 64, 64)), progress=False)


# ----------------------------------------------------------------------------- explain and explore on photos
def test_explain_images_explains_every_face_with_its_index_and_box(group_photo, tiny_checkpoint):
    from fer_lib.models import load_checkpoint

    path, truth = group_photo
    model, _ = load_checkpoint(tiny_checkpoint)
    timings: dict = {}
    results = X.explain_images(model, path, X.ExplainSettings(progress=False, max_faces=3), timings=timings)
    assert [r.face for r in results] == [0, 1, 2] and all(r.ok and r.n_faces == 3 for r in results)
    assert [r.evidence.face for r in results] == [0, 1, 2] and results[0].box == results[0].evidence.box
    assert results[0].evidence.to_frame()["face"].eq(0).all() and results[2].evidence.to_dict()["face"] == 2
    assert set(timings) == {"landmarks", "model", "explanation"} and all(v > 0 for v in timings.values())


def test_explain_command_on_a_folder_writes_one_summary_and_resumes(group_photo, astronaut, tiny_checkpoint, tmp_path,
                                                                   monkeypatch, capsys):
    path, truth = group_photo
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    Image.open(path).save(photos / "group.png")
    Image.fromarray(astronaut).save(photos / "sub" / "astronaut.jpg")
    Image.fromarray(np.full((80, 80, 3), 127, np.uint8)).save(photos / "blank.png")
    (photos / "broken.jpg").write_text("not a photo")
    out = tmp_path / "out"
    args = [str(photos), "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--batch-size", "2",
            "--no-progress"]
    real = X.explain_images
    calls = []

    def interrupted(model, images, *a, **k):  # the second group never finishes: Ctrl-C
        calls.append(list(images))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(model, images, *a, **k)

    monkeypatch.setattr(X, "explain_images", interrupted)
    assert X.main(args) == 130
    journal = [json.loads(line) for line in (out / "explain_journal.jsonl").read_text().splitlines()[1:]]
    assert [Path_name(e["photo"]) for e in journal] == ["blank.png", "broken.jpg"]  # the first group, sorted
    monkeypatch.setattr(X, "explain_images", real)
    assert X.main(args) == 2  # two photos not explained: no face, unreadable
    printed = capsys.readouterr().out
    assert "resuming: 2 of 4" in printed and "photos/s" in printed and "faces/s" in printed
    frame = pd.read_csv(out / "explain_summary.csv")
    group = frame[frame["photo"].str.endswith("group.png")]
    assert sorted(group["face"]) == list(range(len(truth))) and (group["n_faces"] == len(truth)).all()
    assert group[["x0", "y0", "x1", "y1"]].notna().all().all() and group["predicted"].notna().all()
    assert {f"p_{c}" for c in ("happiness", "neutral")} <= set(frame.columns)
    assert group["top_aus"].str.match(r"^AU\d+ AU\d+ AU\d+$").all()
    reasons = dict(zip(frame["photo"].map(Path_name), frame["reason"].fillna("")))
    assert "no face" in reasons["blank.png"] and "unreadable" in reasons["broken.jpg"]
    summary = json.loads((out / "explain_summary.json").read_text())
    assert summary["n_images"] == 4 and summary["n_explained"] == 2 and summary["n_faces"] == len(truth) + 1
    assert summary["resumed"] == 2 and summary["speed"]["faces"] == len(truth) + 1
    assert set(summary["speed"]["seconds"]) == {"landmarks", "model", "explanation", "writing"}
    for k in range(len(truth)):
        for kind in ("evidence.csv", "evidence.json", "explanation.png"):
            assert (out / f"group_face{k}_{kind}").is_file()
        assert json.loads((out / f"group_face{k}_evidence.json").read_text())["face"] == k
    assert (out / "group_faces.png").stat().st_size > 10_000 and (out / "astronaut_evidence.csv").is_file()
    # a third run has nothing left to do
    monkeypatch.setattr(X, "explain_images", lambda *a, **k: pytest.fail("nothing should be explained again"))
    assert X.main(args) == 2
    assert "resuming: 4 of 4" in capsys.readouterr().out


def Path_name(p: str) -> str:
    from pathlib import Path

    return Path(p).name


def test_explain_expands_globs_and_refuses_empty_ones(tmp_path):
    (tmp_path / "a").mkdir()
    for name in ("a/x.jpg", "a/y.png", "a/notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [Path_name(p) for p in X.expand_inputs([str(tmp_path / "a" / "*.jpg"), str(tmp_path / "a")])] == \
        ["x.jpg", "y.png"]
    with pytest.raises(X.ConfigError, match="no file matches"):
        X.expand_inputs([str(tmp_path / "*.gif")])


def test_explore_a_group_photo_explains_each_face(group_photo, tiny_checkpoint, tmp_path):
    import matplotlib.pyplot as plt

    from fer_lib.analysis.explore import ExploreSettings, explore, main

    path, truth = group_photo
    fig, res = explore(tiny_checkpoint, path, ExploreSettings(cam="gradcam", max_faces=2), path=tmp_path / "g.png")
    assert [r.face for r in res.faces] == [0, 1] and res is res.faces[0] and res.box is not None
    labels = [ax.get_label() for ax in fig.axes]
    assert labels[0] == "faces" and "face1:cam" in labels
    assert len(fig.axes[0].patches) == 2 and len(fig.axes[0].texts) == 2  # a box and a label per face
    plt.close("all")
    assert main([str(tiny_checkpoint), str(path), "--max-faces", "2", "--out", str(tmp_path / "e.png")]) == 0
    saved = json.loads((tmp_path / "e.json").read_text())
    assert [f["face"] for f in saved["faces"]] == [0, 1]
