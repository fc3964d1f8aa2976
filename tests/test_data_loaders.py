"""Dataset readers on tiny fake trees, label mappings, aligned transforms, unreadable images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fer_lib.faces.au import EXPRESSIONS, combine_aus
from fer_lib.data import (COMPOUND_EXPRESSIONS, DatasetLayoutError, FERDataset, LabelError, Record, build_datasets,
                          generate_sample, geometric_transform, load_affectnet, load_csv_manifest, load_fer2013_csv,
                          load_image_folder, load_rafdb)
from fer_lib.data.dataset import DEFAULT_FER2013_ROOT
from fer_lib.faces.landmarks import ANCHOR_INDEX, flip_anchors
from fer_lib.utils import ConfigError


def _png(path: Path, value: int = 128, size: int = 24) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)
    return path


def _rafdb(root: Path, subset: str, labels: dict[str, int]) -> Path:
    base = root / subset
    lines = []
    for name, lab in labels.items():
        _png(base / "Image" / "aligned" / f"{name}_aligned.jpg")
        lines.append(f"{name}.jpg {lab}")
    (base / "EmoLabel").mkdir(parents=True, exist_ok=True)
    (base / "EmoLabel" / "list_patition_label.txt").write_text("\n".join(lines) + "\n")
    return root


def test_rafdb_basic_mapping_and_roots(tmp_path):
    labels = {f"train_{i:05d}": 1 + i % 7 for i in range(1, 29)}
    labels.update({f"test_{i:04d}": 1 + i % 7 for i in range(1, 8)})
    root = _rafdb(tmp_path, "basic", labels)
    index = load_rafdb(root, val_fraction=0.25)
    assert index.class_names == EXPRESSIONS
    by_name = {Path(r.path).name: r for r in index.records}
    raf_to_project = {1: "surprise", 2: "fear", 3: "disgust", 4: "happiness", 5: "sadness", 6: "anger", 7: "neutral"}
    for name, lab in labels.items():
        assert EXPRESSIONS[by_name[f"{name}_aligned.jpg"].label] == raf_to_project[lab]
    assert set(index.splits()) == {"train", "val", "test"}
    assert all((r.split == "test") == Path(r.path).name.startswith("test_") for r in index.records)
    assert len(load_rafdb(root / "basic", val_fraction=0.0).records) == len(labels)  # root at basic/ directly


def test_rafdb_compound_and_errors(tmp_path):
    root = _rafdb(tmp_path, "compound", {f"train_{i:04d}": i for i in range(1, 12)} | {"test_0001": 11})
    index = load_rafdb(root, subset="compound", val_fraction=0.0)
    assert index.class_names == COMPOUND_EXPRESSIONS and len(COMPOUND_EXPRESSIONS) == 11
    assert {COMPOUND_EXPRESSIONS[r.label] for r in index.records} == set(COMPOUND_EXPRESSIONS)
    assert COMPOUND_EXPRESSIONS[0] == "happily_surprised" and COMPOUND_EXPRESSIONS[-1] == "disgustedly_surprised"
    with pytest.raises(DatasetLayoutError, match="list_patition_label.txt"):
        load_rafdb(tmp_path / "nowhere")
    with pytest.raises(DatasetLayoutError, match="Image/aligned"):
        load_rafdb(tmp_path)  # compound tree only: no basic label file
    bad = _rafdb(tmp_path / "bad", "basic", {"train_00001": 9})
    with pytest.raises(LabelError, match="valid labels 1-7"):
        load_rafdb(bad)


def test_affectnet_skips_non_expressions_with_counts(tmp_path):
    rows = ["subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,valence,arousal"]
    for i, e in enumerate([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 10, 1]):
        rel = f"{i % 3}/img{i}.jpg"
        _png(tmp_path / "Manually_Annotated_Images" / rel)
        rows.append(f"{rel},0,0,24,24,,{e},0.1,0.2")
    lists = tmp_path / "Manually_Annotated_file_lists"
    lists.mkdir()
    (lists / "training.csv").write_text("\n".join(rows) + "\n")
    (lists / "validation.csv").write_text("\n".join(rows[:4]) + "\n")
    seven = load_affectnet(tmp_path, num_classes=7, val_fraction=0.0)
    assert seven.stats["skipped_labels"] == {"contempt": 1, "none": 1, "uncertain": 1, "non_face": 2}
    assert len(seven.split("train")) == 8 and len(seven.split("test")) == 3
    assert [EXPRESSIONS[r.label] for r in seven.split("test")] == ["neutral", "happiness", "sadness"]
    eight = load_affectnet(tmp_path, num_classes=8, val_fraction=0.0)
    assert eight.class_names[7] == "contempt" and sum(r.label == 7 for r in eight.records) == 1
    (lists / "training.csv").write_text(rows[0] + "\n0/img0.jpg,0,0,24,24,,12,0,0\n")
    with pytest.raises(LabelError, match="unknown AffectNet expression id 12"):
        load_affectnet(tmp_path)
    with pytest.raises(DatasetLayoutError, match="training.csv"):
        load_affectnet(tmp_path / "Manually_Annotated_Images")


def test_fer2013_csv_mapping_gray_to_rgb_and_bad_rows(tmp_path):
    rng = np.random.default_rng(0)
    lines = ["emotion,pixels,Usage"]
    usages = ["Training", "PublicTest", "PrivateTest"]
    for e in range(7):
        for u in usages:
            lines.append(f"{e},{' '.join(map(str, rng.integers(0, 256, 48 * 48)))},{u}")
    lines.append("3,1 2 3,Training")  # too few pixels: skipped with the reason
    csv = tmp_path / "fer2013.csv"
    csv.write_text("\n".join(lines) + "\n")
    index = load_fer2013_csv(csv)
    fer_to_project = ["anger", "disgust", "fear", "happiness", "sadness", "surprise", "neutral"]
    assert [EXPRESSIONS[r.label] for r in index.split("train")] == fer_to_project
    assert len(index.split("val")) == len(index.split("test")) == 7
    assert len(index.skipped) == 1 and "bad pixel string" in index.skipped[0][1]
    ds = build_datasets("fer2013", root=csv, image_size=32, landmarks="none", progress=False)
    x, y, m, h = ds["train"][0]
    assert x.shape == (3, 32, 32) and not bool(h) and float(m.abs().sum()) == 0.0
    assert len(ds["train"].skipped) == 1


def test_image_folder_synonyms_and_unknown_class(tmp_path):
    for split in ("train", "val"):
        for folder in ("angry", "happy", "Sad", "surprised", "fearful", "disgusted", "neutral"):
            for i in range(3):
                _png(tmp_path / "ok" / split / folder / f"{i}.png", value=10 * i)
    (tmp_path / "ok" / "train" / "happy" / "notes.txt").write_text("not an image")
    index = load_image_folder(tmp_path / "ok")
    assert index.class_names == EXPRESSIONS and index.stats["ignored_non_image_files"] == 1
    mapping = index.stats["class_folders"]
    assert mapping == {"angry": "anger", "happy": "happiness", "Sad": "sadness", "surprised": "surprise",
                       "fearful": "fear", "disgusted": "disgust", "neutral": "neutral"}
    for r in index.records:
        assert EXPRESSIONS[r.label] == mapping[Path(r.path).parent.name]
    assert index.counts()["val"] == {e: 3 for e in EXPRESSIONS}
    _png(tmp_path / "bad" / "grumpy" / "0.png")
    with pytest.raises(LabelError, match="grumpy"):
        load_image_folder(tmp_path / "bad")
    with pytest.raises(DatasetLayoutError, match="<split>/<class>"):
        load_image_folder(tmp_path / "missing")


def test_csv_manifest_names_ids_and_splits(tmp_path):
    for i in range(4):
        _png(tmp_path / "img" / f"{i}.png")
    (tmp_path / "m.csv").write_text("path,label,split\nimg/0.png,happy,train\nimg/1.png,6,test\n"
                                    "img/2.png,Sadness,val\nimg/3.png,contempt,train\n")
    index = load_csv_manifest(tmp_path / "m.csv")
    assert index.class_names[-1] == "contempt"
    assert [(index.class_names[r.label], r.split) for r in index.records] == [
        ("happiness", "train"), ("anger", "test"), ("sadness", "val"), ("contempt", "train")]
    (tmp_path / "bad.csv").write_text("path,label\nimg/0.png,grumpy\n")
    with pytest.raises(LabelError, match="accepted names"):
        load_csv_manifest(tmp_path / "bad.csv")
    (tmp_path / "cols.csv").write_text("file,emotion\nimg/0.png,happy\n")
    with pytest.raises(DatasetLayoutError, match="path,label"):
        load_csv_manifest(tmp_path / "cols.csv")


def test_unreadable_images_are_skipped_and_reported(tmp_path):
    root = tmp_path / "data"
    for e in ("happy", "sad"):
        for i in range(4):
            _png(root / "train" / e / f"{i}.png", size=32)
        _png(root / "val" / e / "0.png", size=32)
    (root / "train" / "happy" / "empty.png").write_bytes(b"")
    (root / "train" / "sad" / "text.png").write_text("hello")
    good = (root / "train" / "sad" / "0.png").read_bytes()
    (root / "train" / "sad" / "cut.png").write_bytes(good[: len(good) // 2])
    out = tmp_path / "out"
    ds = build_datasets("imagefolder", root=root, image_size=32, landmarks="none", output_dir=out, progress=False)
    skipped = dict(ds["train"].skipped)
    assert len(skipped) == 3 and len(ds["train"]) == 8
    assert "empty" in skipped[str(root / "train" / "happy" / "empty.png")]
    assert (out / "skipped_train.csv").read_text().count("\n") == 4
    import torch

    loader = torch.utils.data.DataLoader(ds["train"], batch_size=4)
    assert sum(len(b[0]) for b in loader) == 8


def _dot_image(size: int, point: np.ndarray) -> Image.Image:
    arr = np.zeros((size, size, 3), np.uint8)
    x, y = int(point[0] * size), int(point[1] * size)
    arr[y - 1:y + 2, x - 1:x + 2] = 255
    return Image.fromarray(arr)


@pytest.mark.parametrize("kw", [dict(flip=True), dict(centre=(0.45, 0.55), scale=0.8, angle_deg=9.0),
                                dict(centre=(0.55, 0.5), scale=0.9, angle_deg=-7.0, flip=True)])
def test_transform_moves_anchors_with_the_image(kw):
    s = generate_sample("happiness", seed=2, index=1)
    corner = s.anchors[ANCHOR_INDEX["left_mouth_corner"]]
    img, anchors = geometric_transform(_dot_image(112, corner), s.anchors, 96, **kw)
    arr = np.asarray(img)[..., 0].astype(float)
    ys, xs = np.nonzero(arr > 0.5 * arr.max())
    seen = np.array([xs.mean() + 0.5, ys.mean() + 0.5]) / 96
    name = "right_mouth_corner" if kw.get("flip") else "left_mouth_corner"  # a flip swaps the names
    assert np.abs(seen - anchors[ANCHOR_INDEX[name]]).max() < 2.5 / 96


def test_flip_keeps_au_maps_on_the_right_side():
    s = generate_sample("happiness", seed=0, index=0)
    shifted = s.anchors + np.array([0.12, 0.0])  # face on the image right: an asymmetric map
    base_img, base = geometric_transform(Image.fromarray(s.image), shifted, 112)
    flip_img, flipped = geometric_transform(Image.fromarray(s.image), shifted, 112, flip=True)
    assert np.array_equal(np.asarray(flip_img), np.asarray(base_img)[:, ::-1])
    m0 = combine_aus(base, (6, 12, 25), 112)
    m1 = combine_aus(flipped, (6, 12, 25), 112)
    assert np.abs(m1 - m0[:, ::-1]).max() < 1e-4
    assert m0[:, 56:].sum() > 2 * m0[:, :56].sum() and m1[:, :56].sum() > 2 * m1[:, 56:].sum()
    assert flipped[ANCHOR_INDEX["left_mouth_corner"], 0] > 0.5 - 0.12  # subject's left still on the image right
    assert np.allclose(flip_anchors(flipped), base, atol=1e-6)


def test_dataset_augmentation_renders_maps_from_transformed_anchors():
    s = generate_sample("surprise", seed=1, index=3)
    rec = Record(path="mem", label=EXPRESSIONS.index("surprise"), split="train", image=s.image,
                 anchors=s.anchors, has_landmarks=True)
    ds = FERDataset([rec], EXPRESSIONS, image_size=64, augment=True)
    rgb, anchors, au = ds.sample(0, rng=np.random.default_rng(0))
    assert np.allclose(au, combine_aus(anchors, (1, 2, 5, 26, 27), 64), atol=1e-5)
    x, y, m, h = ds[0]
    assert x.shape == (3, 64, 64) and int(y) == 3 and bool(h) and 0.99 < float(m.max()) <= 1.0


def test_ground_truth_only_for_synthetic(tmp_path):
    with pytest.raises(ConfigError, match="only available for the synthetic"):
        build_datasets("imagefolder", root=tmp_path, landmarks="ground_truth")
    with pytest.raises(ConfigError, match="valid choices"):
        build_datasets("mnist")


@pytest.mark.realdata
def test_reads_shared_fer2013_image_folder():
    if not DEFAULT_FER2013_ROOT.is_dir():
        pytest.skip(f"FER2013 not available at {DEFAULT_FER2013_ROOT} (only on machines with the shared data)")
    ds = build_datasets("fer2013", image_size=48, landmarks="none", max_per_class=2, progress=False)
    assert set(ds) == {"train", "val"}
    assert ds["train"].class_names == EXPRESSIONS and len(ds["train"]) == 14 and len(ds["val"]) == 14
    for i in range(len(ds["val"])):
        x, y, m, h = ds["val"][i]
        assert x.shape == (3, 48, 48)
        folder = Path(ds["val"].records[i].path).parent.name
        assert {"angry": "anger", "happy": "happiness", "sad": "sadness"}.get(folder, folder) == EXPRESSIONS[int(y)]


# --------------------------------------------------------------------------- AffectNet as distributed now
def _affectnet_npy_tree(root: Path) -> dict:
    """train_set/ and val_set/ with images/<id>.jpg and annotations/<id>_{exp,val,aro,lnd}.npy (AffectNet's layout)."""
    rng = np.random.default_rng(0)
    truth = {}
    items = {"train_set": [("0", "1", True), ("1", "6", True), ("2", "9", True), ("3", "0", False), ("4", None, True),
                           ("5", "3", True)],
             "val_set": [("10", "2", True), ("11", "7", True)]}
    for folder, rows in items.items():
        (root / folder / "images").mkdir(parents=True)
        (root / folder / "annotations").mkdir()
        for stem, exp, with_lnd in rows:
            Image.fromarray(rng.integers(0, 255, (224, 200, 3), dtype=np.uint8)).save(root / folder / "images" / f"{stem}.jpg")
            notes = root / folder / "annotations"
            if exp is None:
                continue  # an image without its label file
            np.save(notes / f"{stem}_exp.npy", np.array(exp))  # stored as text, as distributed
            np.save(notes / f"{stem}_val.npy", np.array(f"{0.1 * int(stem) - 0.3:.3f}"))
            np.save(notes / f"{stem}_aro.npy", np.array(0.25))
            if with_lnd:
                px = np.column_stack([rng.uniform(20, 180, 68), rng.uniform(20, 204, 68)])
                np.save(notes / f"{stem}_lnd.npy", np.array(";".join(f"{v:.3f}" for v in px.reshape(-1))))
                truth[stem] = np.round(px, 3)
    return truth


def test_affectnet_npy_layout_uses_its_own_landmarks_and_keeps_valence_arousal(tmp_path, monkeypatch):
    from fer_lib.data import dataset as dataset_mod
    from fer_lib.data import load_affectnet
    from fer_lib.faces.landmarks import DLIB_68

    truth = _affectnet_npy_tree(tmp_path / "affectnet")
    index = load_affectnet(tmp_path / "affectnet", val_fraction=0.0)
    by_stem = {Path(r.path).stem: r for r in index.records}
    assert sorted(by_stem) == ["0", "1", "10", "3", "5"]  # 2: id 9 (uncertain), 11: contempt (7 classes), 4: no label
    assert index.stats["skipped_labels"] == {"uncertain": 1, "contempt": 1} and index.stats["without_landmarks"] == 1
    assert [Path(p).name for p, why, _ in index.skipped] == ["4.jpg"] and "_exp.npy" in index.skipped[0][1]
    assert by_stem["0"].label == EXPRESSIONS.index("happiness") and by_stem["1"].label == EXPRESSIONS.index("anger")
    assert by_stem["10"].split == "test" and by_stem["0"].split == "train"
    assert by_stem["5"].meta["valence"] == pytest.approx(0.2) and by_stem["5"].meta["arousal"] == pytest.approx(0.25)
    assert load_affectnet(tmp_path / "affectnet", num_classes=8, val_fraction=0.0).stats["skipped_labels"] == {"uncertain": 1}

    detected = []
    real = dataset_mod.detect_landmarks

    def counting(items, *a, **k):
        detected.extend(items)
        return real(items, *a, **k)

    monkeypatch.setattr(dataset_mod, "detect_landmarks", counting)
    out = build_datasets("affectnet", tmp_path / "affectnet", image_size=32, augment=False, val_fraction=0.0,
                         cache_dir=str(tmp_path / "cache"), progress=False)
    assert [Path(p).stem for p in detected] == ["3"]  # only the image without its own landmarks is detected
    for ds in out.values():
        for r in ds.records:
            stem = Path(r.path).stem
            if stem in truth:
                expected = DLIB_68.to_anchors(truth[stem] / np.array([200, 224]))
                assert r.has_landmarks and r.meta["landmark_source"] == "dataset"
                np.testing.assert_allclose(r.anchors, expected, atol=1e-5)
    assert out["train"].landmark_stats["dataset_landmarks"] == 4


def test_affectnet_layout_errors_name_both_layouts(tmp_path):
    from fer_lib.data import load_affectnet

    with pytest.raises(DatasetLayoutError, match="train_set/.*training.csv"):
        load_affectnet(tmp_path / "nowhere")
    (tmp_path / "a" / "train_set").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match="lacks images/ or annotations/"):
        load_affectnet(tmp_path / "a")


def test_a_registered_dataset_builds_by_name_and_unknown_options_are_refused(tmp_path):
    from PIL import Image

    from fer_lib.data import DatasetSource, build_datasets, dataset, list_datasets, register_dataset
    from fer_lib.utils import ConfigError

    for split in ("train", "test"):
        for cls in ("happy", "sad"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (40, 40), (40 * i, 90, 200 if cls == "sad" else 10)).save(tmp_path / split / cls / f"{i}.png")
    seen = {}

    def load(root, seed, image_size, progress, **options):
        seen.update(root=root, seed=seed, **options)
        return load_image_folder(root, seed=seed, **options)

    register_dataset(DatasetSource("toy_faces", load, options=("val_fraction",)))
    try:
        assert "toy_faces" in list_datasets()
        splits = build_datasets("toy_faces", tmp_path, image_size=32, seed=3, landmarks="none", val_fraction=0.34,
                                progress=False)
        assert seen == {"root": tmp_path, "seed": 3, "val_fraction": 0.34}
        assert sum(len(d) for d in splits.values()) == 12 and len(splits["test"]) == 6
        with pytest.raises(ConfigError, match=r"unknown option\(s\) \['test_fraction'\] for dataset 'toy_faces'"):
            build_datasets("toy_faces", tmp_path, landmarks="none", test_fraction=0.2)
        with pytest.raises(ConfigError, match="dataset 'toy_faces' needs root="):
            build_datasets("toy_faces", None, landmarks="none")
    finally:
        dataset._SOURCES.pop("toy_faces")
    with pytest.raises(ConfigError, match="unknown dataset 'toy_faces'; valid choices: synthetic, rafdb"):
        build_datasets("toy_faces", tmp_path)


def test_au_maps_at_the_layer_size_are_the_pooled_image_maps():
    import torch

    from fer_lib.data import build_datasets

    splits = build_datasets("synthetic", None, image_size=64, seed=0, landmarks="ground_truth", n_per_class=2,
                            progress=False, augment=False)
    ds = splits["train"]
    full = [ds[i][2] for i in range(len(ds))]
    ds.au_map_size = (4, 4)
    small = [ds[i][2] for i in range(len(ds))]
    assert all(m.shape == (1, 4, 4) for m in small) and any(float(m.max()) > 0 for m in small)
    for f, m in zip(full, small):
        pooled = torch.nn.functional.adaptive_avg_pool2d(f[None], (4, 4))[0]
        assert float((pooled - m).abs().max()) <= 0.05
        if float(pooled.max()) > 0:
            assert float(torch.nn.functional.cosine_similarity(pooled.flatten(), m.flatten(), dim=0)) >= 0.999


def test_reference_style_au_maps_follow_the_face_under_augmentation(tmp_path):
    from fer_lib.data import AugmentConfig, build_datasets

    with pytest.raises(ConfigError, match="au_style='reference' draws on dlib-68 positions from detected landmarks"):
        build_datasets("synthetic", None, image_size=64, landmarks="ground_truth", n_per_class=1, au_style="reference")
    splits = build_datasets("synthetic", None, image_size=96, seed=0, landmarks="detect", cache_dir=tmp_path,
                            n_per_class={"train": 2}, progress=False, au_style="reference")
    ds = splits["train"]
    assert ds.au_style == "reference"
    found = [i for i, r in enumerate(ds.records) if r.has_landmarks and ds.class_names[r.label] != "neutral"]
    assert found and all(ds.records[i].meta["dlib68"].shape == (68, 2) for i in found)
    i = found[0]
    plain = ds.sample(i, augment=False)[2]
    assert plain.shape == (96, 96) and plain.max() == pytest.approx(1.0)
    ds.augment_config = AugmentConfig(crop_scale=(1.0, 1.0), rotation_deg=0.0, flip_p=1.0, color_jitter=0.0)
    flipped = ds.sample(i, augment=True, rng=np.random.default_rng(0))[2]
    assert np.abs(flipped - plain[:, ::-1]).max() < 0.05  # the map mirrors with the face
    gaussian = build_datasets("synthetic", None, image_size=96, seed=0, landmarks="detect", cache_dir=tmp_path,
                              n_per_class={"train": 2}, progress=False)["train"]
    ours = gaussian.sample(i, augment=False)[2]
    cos = float((ours * plain).sum() / np.linalg.norm(ours) / np.linalg.norm(plain))
    assert 0.2 < cos < 0.99  # the same AU regions, drawn as ellipses instead of Gaussian blobs


def test_layer_size_maps_and_preloaded_images_are_dataset_options():
    from fer_lib.data import build_datasets

    common = dict(image_size=64, seed=0, landmarks="ground_truth", n_per_class=2, progress=False, augment=False)
    plain = build_datasets("synthetic", None, **common)["train"]
    fast = build_datasets("synthetic", None, au_map_size=[4, 4], preload_images=True, **common)["train"]
    assert fast.au_map_size == (4, 4) and all(r.image is not None for r in fast.records)
    assert all(r.image is None for r in plain.records)
    for i in range(len(plain)):
        assert torch.equal(plain[i][0], fast[i][0])  # the same pixels from memory
        assert fast[i][2].shape == (1, 4, 4)
    with pytest.raises(ConfigError, match=r"au_map_size must be a positive integer or \[h, w\]"):
        build_datasets("synthetic", None, au_map_size=[4], **common)
