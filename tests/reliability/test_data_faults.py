"""Data faults: a messy ImageFolder tree and CSV manifest still train and get landmarks; every skip is listed."""
from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fer_lib import landmarks as L
from fer_lib.data import SyntheticConfig, build_datasets, build_synthetic, load_csv_manifest
from fer_lib.data.loaders import LabelError
from fer_lib.training.train import TrainConfig, train

from .conftest import SIZE

UNREADABLE = {  # file name -> words its reason must hold
    "truncated.jpg": "corrupt or truncated",
    "empty.png": "empty (0 bytes)",
    "text.jpg": "not a readable image",
    "huge.png": "too large",
}
ODD_BUT_FINE = ("gray.png", "rgba.png", "gray16.png", "noface.png", "duplicate.png")


def huge_png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (no real pixel data: it is never decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def messy(tmp_path_factory) -> dict:
    """Synthetic faces in ImageFolder layout (+ manifest.csv), then every kind of bad file in train/happiness."""
    root = tmp_path_factory.mktemp("messy") / "faces"
    cfg = SyntheticConfig(n_per_class={"train": 2, "val": 1, "test": 1}, image_size=64, seed=0)
    build_synthetic(cfg, root=root, progress=False)
    folder = root / "train" / "happiness"
    face_path = sorted(folder.glob("*.png"))[0]
    face = np.asarray(Image.open(face_path).convert("RGB"))
    buf = folder / "face.jpg"
    Image.fromarray(face).save(buf, quality=90)
    data = buf.read_bytes()
    buf.unlink()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.jpg").write_text("label,path\nnot,an image\n")
    (folder / "huge.png").write_bytes(huge_png_header(100_000, 100_000))
    gray = np.asarray(Image.fromarray(face).convert("L"))
    Image.fromarray(gray).save(folder / "gray.png")
    Image.fromarray(np.dstack([face, np.full(gray.shape, 200, np.uint8)]), mode="RGBA").save(folder / "rgba.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(folder / "gray16.png")
    assert Image.open(folder / "gray16.png").mode.startswith("I;16")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "noface.png")
    shutil.copyfile(face_path, folder / "duplicate.png")
    return {"root": root, "folder": folder, "face": face_path, "cache": root.parent / "landmark_cache"}


def train_on(kind: str, data_root: Path, out_dir: Path, cache: Path) -> dict:
    config = TrainConfig(dataset=kind, data_root=str(data_root), landmarks="detect", cache_dir=str(cache),
                         dataset_kwargs={"progress": False}, backbone="resnet18", layers=("last",),
                         image_size=SIZE, batch_size=8, epochs=1, max_steps_per_epoch=2, device="cpu",
                         out_dir=str(out_dir), seed=0)
    return train(config)


def skipped_by_name(out_dir: Path, split: str = "train") -> dict[str, str]:
    frame = pd.read_csv(out_dir / f"skipped_{split}.csv")
    return {Path(p).name: why for p, why in zip(frame["path"], frame["reason"])}


@pytest.mark.slow
def test_image_folder_with_every_fault_trains_and_lists_what_it_left_out(messy, tmp_path):
    out = tmp_path / "run"
    results = train_on("imagefolder", messy["root"], out, messy["cache"])
    skipped = skipped_by_name(out)
    assert set(skipped) == set(UNREADABLE)
    for name, words in UNREADABLE.items():
        assert words in skipped[name], (name, skipped[name])
    data = json.loads((out / "metrics.json").read_text())["data"]
    assert data == results["data"]
    train_split = data["splits"]["train"]
    n_files = sum(1 for p in (messy["root"] / "train").rglob("*") if p.is_file())
    assert train_split["skipped"] == len(UNREADABLE) and train_split["n"] == n_files - len(UNREADABLE)
    assert data["skipped_total"] == len(UNREADABLE) and data["splits"]["val"]["skipped"] == 0
    stats = data["landmark_stats"]
    assert stats["total"] == sum(s["n"] for s in data["splits"].values())
    assert stats["found"] + stats["no_face"] + stats["unreadable"] == stats["total"] and stats["unreadable"] == 0
    assert stats["cache_hits"] >= 1  # duplicate.png has the bytes of another face: one detection serves both
    missing = pd.read_csv(out / "landmarks_missing_train.csv")
    assert "noface.png" in {Path(p).name for p in missing["path"]}
    assert missing["reason"].str.contains("no face").all()
    assert train_split["without_landmarks"] == len(missing)
    assert np.isfinite(results["test"]["accuracy"]) and results["test"]["n"] == data["splits"]["test"]["n"]


def write_faulty_manifest(messy) -> Path:
    root, folder = messy["root"], messy["folder"]
    manifest = pd.read_csv(root / "manifest.csv")[["path", "label", "split"]]
    rel = lambda name: (folder / name).relative_to(root).as_posix()  # noqa: E731
    extra = [(rel(n), "happiness", "train") for n in (*UNREADABLE, *ODD_BUT_FINE)]
    extra += [
        (manifest.path[0], 9, "train"),                      # class id out of range (7 classes: 0..6)
        (manifest.path[1], -1, "train"),                     # negative id
        (manifest.path[2], "grumpy", "train"),               # a name no table knows
        (manifest.path[3], "", "train"),                     # the label entry is missing
        ("train/happiness/never_written.png", "happiness", "train"),  # listed, but the file is missing
        (manifest.path[4], manifest.label[4], manifest.split[4]),     # the same row twice
    ]
    frame = pd.concat([manifest.iloc[5:], manifest.iloc[4:5], pd.DataFrame(extra, columns=manifest.columns)])
    path = root / "faulty.csv"
    frame.to_csv(path, index=False)
    return path


def test_csv_manifest_index_lists_bad_labels_missing_entries_and_repeats(messy):
    index = load_csv_manifest(write_faulty_manifest(messy), val_fraction=0.0)
    reasons = [why for _, why, _ in index.skipped]
    assert index.stats == {"missing_files": 1, "bad_labels": 3, "missing_labels": 1, "duplicate_rows": 1}
    assert sum("outside 0..6" in r for r in reasons) == 2 and sum("'grumpy'" in r for r in reasons) == 1
    assert any(r.startswith("missing label") for r in reasons) and any("listed twice" in r for r in reasons)
    assert all(s == "train" for _, _, s in index.skipped)
    only_bad = messy["root"] / "only_bad.csv"
    only_bad.write_text("path,label\nx.png,9\n")
    with pytest.raises(LabelError, match="no usable row.*outside 0..6"):
        load_csv_manifest(only_bad)


@pytest.mark.slow
def test_csv_manifest_with_every_fault_trains_and_lists_what_it_left_out(messy, tmp_path):
    out = tmp_path / "run"
    results = train_on("csv", write_faulty_manifest(messy), out, messy["cache"])
    skipped = skipped_by_name(out)
    for name, words in UNREADABLE.items():
        assert words in skipped[name]
    frame = pd.read_csv(out / "skipped_train.csv")
    assert frame["reason"].str.contains("outside 0..6").sum() == 2
    assert frame["reason"].str.contains("missing label").sum() == 1
    assert frame["reason"].str.contains("missing image file").sum() == 1
    assert frame["reason"].str.contains("listed twice").sum() == 1
    data = results["data"]
    assert data["splits"]["train"]["skipped"] == len(frame) == len(UNREADABLE) + 6
    assert data["skipped_total"] == len(frame)
    assert {Path(p).name for p in frame["path"]}.isdisjoint(ODD_BUT_FINE)


def test_direct_landmark_extraction_over_the_messy_folder_completes(messy):
    files = sorted(p for p in messy["folder"].iterdir())
    batch = L.detect_landmarks(files, cache=messy["cache"], progress=False)
    by_name = {Path(r.source).name: r for r in batch.records}
    assert len(batch.records) == len(files)
    for name, words in UNREADABLE.items():
        assert not by_name[name].found and by_name[name].reason.startswith("unreadable") and words in by_name[name].reason
    assert not by_name["noface.png"].found and "no face" in by_name["noface.png"].reason
    s = batch.stats
    assert s["found"] + s["no_face"] + s["unreadable"] == s["total"] == len(files)
    assert s["unreadable"] == len(UNREADABLE)
    # a real cap, lowered through the parameter, names the limit
    with pytest.raises(L.ImageError, match="image too large .* > 100 pixels"):
        L.load_image(messy["face"], max_pixels=100)
