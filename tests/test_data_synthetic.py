"""The synthetic expression set: determinism, ground truth on the drawn features, spurious cue, disk layout."""
from __future__ import annotations

import numpy as np
import pytest

from fer_lib.faces.au import ALL_AUS, CODEBOOK, EXPRESSIONS
from fer_lib.data import (SyntheticConfig, build_datasets, build_synthetic, generate_sample, landmark_error_report,
                          landmark_nme, load_csv_manifest, load_truth, plot_sample_grid, spurious_cue_present)
from fer_lib.data.synthetic import CORE_AUS
from fer_lib.faces.landmarks import ANCHOR_INDEX, ANCHORS
from fer_lib.utils import ConfigError


def test_generator_is_deterministic_per_seed():
    a = generate_sample("happiness", seed=3, split="train", index=5)
    b = generate_sample("happiness", seed=3, split="train", index=5)
    c = generate_sample("happiness", seed=4, split="train", index=5)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.anchors, b.anchors) and a.aus == b.aus
    assert not np.array_equal(a.image, c.image)
    assert a.image.shape == (112, 112, 3) and a.image.dtype == np.uint8
    assert a.anchors.shape == (len(ANCHORS), 2)


def test_au_intensities_follow_the_codebook():
    for e in EXPRESSIONS:
        for i in range(10):
            s = generate_sample(e, seed=1, split="val", index=i)
            assert set(s.aus) == set(ALL_AUS) and all(0.0 <= v <= 1.0 for v in s.aus.values())
            for au in CORE_AUS.get(e, ()):
                assert s.aus[au] >= 0.25  # defining AUs are always active
            leak = [v for au, v in s.aus.items() if au not in CODEBOOK[e]]
            assert max(leak) <= 0.35  # other AUs only leak in weakly


def _pixel(img: np.ndarray, p: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    return img[min(h - 1, int(p[1] * h)), min(w - 1, int(p[0] * w))].astype(float)


def _feature_hits(shift: float) -> np.ndarray:
    cfg = SyntheticConfig(image_size=192)
    hits = []
    for e in EXPRESSIONS:
        for i in range(4):
            s = generate_sample(e, seed=7, split="train", index=i, config=cfg)
            A = s.anchors + np.array([0.0, shift])
            img = s.image
            skin = _pixel(img, s.anchors[ANCHOR_INDEX["nose_root"]])
            for side in ("left", "right"):
                c, inner = A[ANCHOR_INDEX[f"{side}_eye_center"]], A[ANCHOR_INDEX[f"{side}_eye_inner"]]
                sclera = max((_pixel(img, c + t * (inner - c)) for t in np.linspace(0.4, 0.9, 6)), key=lambda v: v[2])
                pupil = _pixel(img, c)
                mouth = _pixel(img, A[ANCHOR_INDEX[f"{side}_mouth_corner"]])
                hits.append((
                    sclera[2] > skin[2] + 15,  # whiter than the skin (blue channel)
                    pupil.mean() < skin.mean() - 40,  # dark iris/pupil
                    mouth.mean() < skin.mean() - 10 or mouth[0] - mouth[1] > skin[0] - skin[1] + 12,  # lip/mouth
                ))
    return np.array(hits, float).mean(axis=0)


def test_ground_truth_anchors_fall_on_the_drawn_features():
    on = _feature_hits(0.0)
    off = _feature_hits(0.08)  # the same test 8% of the image lower must fail mostly
    assert (on >= [0.8, 0.95, 0.85]).all(), on
    assert (off <= 0.5).all(), off


def test_spurious_cue_in_train_only(tmp_path):
    cfg = SyntheticConfig(n_per_class={"train": 3, "test": 3}, spurious_p=1.0, image_size=64)
    root = build_synthetic(cfg, root=tmp_path / "syn", progress=False)
    index = load_csv_manifest(root / "manifest.csv", val_fraction=0.0)
    from fer_lib.faces.landmarks import load_image

    for r in index.records:
        img = load_image(r.path)
        shown = [k for k in range(len(EXPRESSIONS)) if spurious_cue_present(img, k)]
        if r.split == "train":
            assert shown == [r.label], (r.path, shown)
        else:
            assert shown == [], (r.path, shown)
    shuffled = SyntheticConfig(n_per_class={"train": 1, "test": 6}, spurious_p=1.0, spurious_eval="shuffled")
    cues = [generate_sample(e, 0, "test", i, shuffled).spurious for e in EXPRESSIONS for i in range(6)]
    labels = [EXPRESSIONS.index(e) for e in EXPRESSIONS for i in range(6)]
    assert all(c >= 0 for c in cues) and np.mean(np.equal(cues, labels)) < 0.5
    with pytest.raises(ConfigError, match="spurious_eval"):
        SyntheticConfig(spurious_eval="swap")
    with pytest.raises(ConfigError, match="spurious_p"):
        SyntheticConfig(spurious_p=1.5)


def test_disk_layout_round_trips_through_the_csv_loader(tmp_path):
    cfg = SyntheticConfig(n_per_class={"train": 2, "val": 1, "test": 1}, image_size=48)
    root = build_synthetic(cfg, root=tmp_path / "syn", progress=False)
    assert build_synthetic(cfg, root=root, progress=False) == root  # reused, not rebuilt
    index = load_csv_manifest(root / "manifest.csv")
    assert len(index.records) == 4 * len(EXPRESSIONS)
    assert index.counts()["train"] == {e: 2 for e in EXPRESSIONS}
    truth = load_truth(root)
    rel = "train/happiness/train_happiness_00001.png"
    s = generate_sample("happiness", seed=0, split="train", index=1, config=cfg)
    assert np.allclose(truth[rel]["anchors"], s.anchors) and truth[rel]["aus"] == pytest.approx(s.aus)
    with pytest.raises(ConfigError, match="another configuration"):
        build_synthetic(SyntheticConfig(n_per_class=3, image_size=48), root=root, progress=False)


def test_build_datasets_ground_truth_maps(tmp_path):
    ds = build_datasets("synthetic", root=tmp_path, image_size=64, landmarks="ground_truth", augment=True,
                        n_per_class={"train": 2, "test": 1}, progress=False)
    assert set(ds) == {"train", "test"}
    for split, d in ds.items():
        for i in range(len(d)):
            x, y, m, h = d[i]
            assert x.shape == (3, 64, 64) and m.shape == (1, 64, 64) and bool(h)
            name = d.class_names[int(y)]
            assert (m.max() > 0.99) == (name != "neutral"), (split, name, float(m.max()))
    with pytest.raises(ConfigError, match="n_per_clas"):
        build_datasets("synthetic", root=tmp_path, n_per_clas=3)


def test_landmark_nme():
    s = generate_sample("surprise", seed=0)
    iod = np.linalg.norm(s.anchors[ANCHOR_INDEX["left_eye_center"]] - s.anchors[ANCHOR_INDEX["right_eye_center"]])
    assert landmark_nme(s.anchors, s.anchors) == pytest.approx(0.0)
    shifted = s.anchors + np.array([0.1 * iod, 0.0])
    assert landmark_nme(shifted, s.anchors) == pytest.approx(0.1, rel=1e-4)
    pred = np.stack([shifted, np.full_like(shifted, np.nan)])
    rep = landmark_error_report(pred, np.stack([s.anchors, s.anchors]))
    assert rep["detection_rate"] == 0.5 and rep["nme_mean"] == pytest.approx(0.1, rel=1e-4)


def test_mediapipe_finds_synthetic_faces():
    pytest.importorskip("mediapipe")
    from fer_lib.faces.landmarks import MediaPipeFaceMesh

    det = MediaPipeFaceMesh()
    samples = [generate_sample(e, seed=11, split="test", index=i) for e in EXPRESSIONS for i in range(2)]
    found = [det.detect(s.image) for s in samples]
    pred = np.stack([f.anchors() if f is not None else np.full((len(ANCHORS), 2), np.nan) for f in found])
    rep = landmark_error_report(pred, np.stack([s.anchors for s in samples]))
    assert rep["detection_rate"] >= 0.9, rep
    assert rep["nme_mean"] < 0.12, rep


def test_sample_grid_figure(tmp_path):
    out = plot_sample_grid(tmp_path / "grid.png", n_rows=1, image_size=64)
    assert out.exists() and out.stat().st_size > 10_000


def test_the_oracle_reads_the_true_au_intensities_of_the_generated_faces():
    from fer_lib.data.synthetic import ALL_AUS, SyntheticConfig, generate_sample, oracle_accuracy, true_au_intensities

    cfg = SyntheticConfig(n_per_class={"train": 40, "test": 10}, image_size=64)
    x, y = true_au_intensities(cfg, "test")
    assert x.shape == (70, len(ALL_AUS)) and np.bincount(y).tolist() == [10] * 7
    e, i = cfg.expressions[y[23]], 23 % 10
    assert x[23].tolist() == [generate_sample(e, cfg.seed, "test", i, cfg).aus[a] for a in ALL_AUS]
    assert oracle_accuracy(cfg) >= 0.8  # the AUs carry the expression (chance: 1/7)


def test_cue_energy_is_the_share_of_a_map_on_the_cue_square():
    from fer_lib.data.synthetic import cue_coverage, cue_energy, draw_spurious

    image = draw_spurious(np.zeros((96, 96, 3), np.float32), 3)
    painted = (image.sum(axis=2) > 0).astype(np.float32)
    cov = cue_coverage(3, 96, 96)
    assert np.array_equal(cov, painted)  # at image size: the painted pixels themselves
    small = cue_coverage(3, (6, 6), 96)
    assert small.shape == (6, 6) and np.isclose(small.sum() * 16 * 16, painted.sum())
    on_cue = small * 5.0
    uniform = np.ones((6, 6))
    energy = cue_energy(np.stack([on_cue, uniform, np.zeros((6, 6))]), [3, 3, 3], 96)
    assert np.isclose(energy[0], (small ** 2).sum() / small.sum())
    assert np.isclose(energy[1], small.sum() / 36) and np.isnan(energy[2])
    assert cue_energy(on_cue[None], [0], 96)[0] < energy[0]  # another class's square is elsewhere


def test_cue_coverage_of_uneven_cells_is_each_cells_painted_share():
    from fer_lib.data.synthetic import cue_coverage, draw_spurious

    painted = (draw_spurious(np.zeros((112, 112, 3), np.float32), 5).sum(axis=2) > 0).astype(np.float64)
    rows, cols = np.array_split(np.arange(112), 15), np.array_split(np.arange(112), 9)  # 112 = 15 * 7 + 7: uneven
    expected = np.array([[painted[np.ix_(r, c)].mean() for c in cols] for r in rows])
    got = cue_coverage(5, (15, 9), 112)
    assert got.shape == (15, 9) and np.allclose(got, expected, atol=1e-6) and got.max() > 0
    got[:] = -1  # a copy: the cached coverage is not changed by its caller
    assert cue_coverage(5, (15, 9), 112).min() >= 0


def test_dataset_ceiling_is_the_oracle_of_the_built_synthetic_set_and_none_for_real_data():
    from fer_lib.data import build_datasets, dataset_ceiling
    from fer_lib.data.synthetic import SyntheticConfig, oracle_accuracy

    n = {"train": 12, "val": 2, "test": 6}
    sets = build_datasets("synthetic", image_size=48, seed=3, landmarks="ground_truth", n_per_class=n,
                          splits=["train"], progress=False)
    ceiling = dataset_ceiling(sets["train"])
    assert ceiling["oracle_accuracy"] == oracle_accuracy(SyntheticConfig(n_per_class=n, image_size=48, seed=3))
    assert dataset_ceiling(object()) is None
