"""The AU codebook against the paper, heatmap rendering, and the batched renderer."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fer_lib.faces import au
from fer_lib.faces.au import EXPRESSIONS, render_heatmaps, render_layer_heatmaps
from fer_lib.faces.landmarks import ANCHOR_INDEX, ANCHORS

# Paper (Belharbi et al., FG 2024), Fig. 2, transcribed independently of fer_lib.faces.au
PAPER_CODEBOOK = {
    "happiness": {6, 12, 25},
    "surprise": {1, 2, 5, 26, 27},
    "fear": {1, 2, 4, 5, 20, 25, 26, 27},
    "anger": {4, 5, 7, 10, 17, 23, 24, 25, 26},
    "disgust": {9, 10, 16, 17, 25, 26},
    "sadness": {1, 4, 6, 15, 17},
    "neutral": set(),
}


def test_codebook_matches_paper():
    assert set(au.EXPRESSIONS) == set(PAPER_CODEBOOK)
    for expression, aus in PAPER_CODEBOOK.items():
        assert set(au.CODEBOOK[expression]) == aus, expression
    assert all(a in au.AU_REGIONS and a in au.AU_NAMES for aus in PAPER_CODEBOOK.values() for a in aus)
    assert all(set(r) <= set(ANCHORS) for r in au.AU_REGIONS.values())


def _frontal_anchors() -> np.ndarray:
    """Hand-made anchors of a frontal face (normalised)."""
    pos = {
        "forehead_center": (0.5, 0.15), "glabella": (0.5, 0.3),
        "left_brow_inner": (0.58, 0.3), "left_brow_mid": (0.67, 0.28), "left_brow_outer": (0.76, 0.3),
        "right_brow_inner": (0.42, 0.3), "right_brow_mid": (0.33, 0.28), "right_brow_outer": (0.24, 0.3),
        "left_eye_inner": (0.58, 0.4), "left_eye_outer": (0.76, 0.4), "left_upper_lid": (0.67, 0.37),
        "left_lower_lid": (0.67, 0.43), "left_eye_center": (0.67, 0.4),
        "right_eye_inner": (0.42, 0.4), "right_eye_outer": (0.24, 0.4), "right_upper_lid": (0.33, 0.37),
        "right_lower_lid": (0.33, 0.43), "right_eye_center": (0.33, 0.4),
        "nose_root": (0.5, 0.4), "nose_tip": (0.5, 0.58), "left_nose_wing": (0.57, 0.57),
        "right_nose_wing": (0.43, 0.57), "left_cheek": (0.72, 0.55), "right_cheek": (0.28, 0.55),
        "left_nasolabial": (0.62, 0.64), "right_nasolabial": (0.38, 0.64),
        "left_mouth_corner": (0.64, 0.72), "right_mouth_corner": (0.36, 0.72),
        "upper_lip": (0.5, 0.69), "lower_lip": (0.5, 0.77), "mouth_center": (0.5, 0.73),
        "chin": (0.5, 0.9), "left_jaw": (0.78, 0.8), "right_jaw": (0.22, 0.8),
    }
    return np.array([pos[a] for a in ANCHORS], np.float32)


@pytest.mark.parametrize("expression", au.EXPRESSIONS)
def test_heatmap_shape_range_and_peaks(expression):
    anchors = _frontal_anchors()
    m = au.heatmap(anchors, expression, (64, 48))
    assert m.shape == (64, 48) and m.dtype == np.float32
    if expression == "neutral":
        assert not m.any() and not au.has_au_map("neutral")
        return
    assert m.min() >= 0 and m.max() == pytest.approx(1.0)
    # every blob centre of the expression is a local high point of the map
    for a in au.CODEBOOK[expression]:
        for name in au.AU_REGIONS[a]:
            x, y = anchors[ANCHOR_INDEX[name]]
            assert m[int(y * 64), int(x * 48)] > 0.8, (expression, a, name)


def test_happiness_mass_on_mouth_and_cheeks_not_forehead():
    m = au.heatmap(_frontal_anchors(), "happiness", 100)
    assert m[:30].sum() < 0.01 * m.sum()  # forehead and brows (y < 0.3)
    assert m[35:85].sum() > 0.95 * m.sum()  # eye corners (AU6), cheeks and mouth


def test_per_au_maps_and_generic_map():
    anchors = _frontal_anchors()
    maps = au.au_maps(anchors, "surprise", 32)
    assert sorted(maps) == sorted(au.CODEBOOK["surprise"])
    assert all(m.max() == pytest.approx(1.0) for m in maps.values())
    generic = au.all_au_heatmap(anchors, 32)
    for e in au.EXPRESSIONS:
        # same blobs, each map normalised by its own peak: equal up to sub-pixel peak offsets
        assert (generic >= au.heatmap(anchors, e, 32) - 0.05).all()


def test_sigma_reference_and_face_modes():
    anchors = _frontal_anchors()
    assert au.sigma_for(anchors) == pytest.approx(8 / 224)
    iod = 0.34
    assert au.sigma_for(anchors, sigma_mode="face") == pytest.approx(au.FACE_SIGMA * iod, rel=1e-4)
    wide = au.heatmap(anchors, "happiness", 64, sigma=0.1)
    narrow = au.heatmap(anchors, "happiness", 64, sigma=0.02)
    assert wide.sum() > 3 * narrow.sum()
    with pytest.raises(ValueError, match="valid: image, face"):
        au.heatmap(anchors, "happiness", 64, sigma_mode="bogus")


def test_unknown_expression_lists_valid_ones():
    with pytest.raises(ValueError, match="valid expressions: neutral, happiness"):
        au.heatmap(_frontal_anchors(), "joy", 32)
    with pytest.raises(ValueError, match="valid AUs"):
        au.au_map(_frontal_anchors(), 99, 32)


def test_batched_renderer_equals_numpy_and_masks_missing():
    rng = np.random.default_rng(0)
    base = _frontal_anchors()
    anchors = np.stack([base + rng.normal(0, 0.02, base.shape).astype(np.float32) for _ in range(14)])
    labels = np.arange(14) % len(au.EXPRESSIONS)
    anchors[3] = np.nan  # a face without landmarks
    maps, valid = au.render_heatmaps(torch.from_numpy(anchors), torch.from_numpy(labels), 40)
    assert maps.shape == (14, 40, 40)
    for i in range(14):
        expression = au.EXPRESSIONS[labels[i]]
        if i == 3:
            assert not valid[i] and not maps[i].any()
            continue
        np.testing.assert_allclose(maps[i].numpy(), au.heatmap(anchors[i], expression, 40), atol=1e-3)
        assert bool(valid[i]) == au.has_au_map(expression)
    small, _ = au.render_heatmaps(torch.from_numpy(anchors), torch.from_numpy(labels), 40, chunk=3)
    torch.testing.assert_close(small, maps)


def test_register_compound_expression():
    au.register_expression("test_happily_surprised", (1, 2, 12, 25))
    m = au.heatmap(_frontal_anchors(), "test_happily_surprised", 32)
    assert m.max() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="AUs without a region"):
        au.register_expression("bad", (1, 99))
    with pytest.raises(ValueError, match="already in the codebook"):
        au.register_expression("happiness", (1,))
    del au.CODEBOOK["test_happily_surprised"]


def test_astronaut_happiness_map_lies_on_mouth_and_cheeks(astronaut_landmarks):
    """On a real photo, the happiness map's mass is around mouth and cheeks, not the forehead."""
    anchors = astronaut_landmarks.anchors()
    m = au.heatmap(anchors, "happiness", 512, sigma_mode="face")
    ys, xs = np.mgrid[0:512, 0:512]
    cy = (m * ys).sum() / m.sum()
    forehead_y = anchors[ANCHOR_INDEX["forehead_center"], 1] * 512
    eye_y = anchors[ANCHOR_INDEX["left_eye_center"], 1] * 512
    chin_y = anchors[ANCHOR_INDEX["chin"], 1] * 512
    assert eye_y < cy < chin_y
    assert m[: int(forehead_y)].sum() < 0.02 * m.sum()  # forehead: almost nothing
    assert m[int(eye_y):].sum() > 0.7 * m.sum()  # cheeks and mouth: most of it


# --------------------------------------------------------------------------- maps at a layer's size
def test_cell_means_are_the_pixel_means_of_one_gaussian():
    from fer_lib.faces.au import _cell_means

    centres = np.array([0.43, 0.9, -0.02])
    for cells, pixels in ((7, 112), (6, 100), (28, 224)):
        xs = (np.arange(pixels) + 0.5) / pixels
        g = np.exp(-(xs[None] - centres[:, None]) ** 2 / (2 * 0.04 ** 2))  # (3, pixels)
        pooled = torch.nn.functional.adaptive_avg_pool1d(torch.from_numpy(g)[None], cells)[0].numpy()
        assert np.abs(_cell_means(centres, 0.04, cells, pixels, sub=1) - pooled).max() < 1e-3


def test_layer_size_maps_match_pooled_image_maps_within_the_stated_tolerance():
    from fer_lib.data.synthetic import SyntheticConfig, generate_sample

    faces = [generate_sample(e, seed=0, index=i, config=SyntheticConfig(image_size=112))
             for e in EXPRESSIONS[1:] for i in range(6)]
    anchors = np.stack([f.anchors for f in faces])
    anchors[0] = np.nan  # a face without landmarks
    labels = np.array([f.label for f in faces])
    for image_size, layer in ((112, 7), (112, 14), (96, 6), (224, 28), (100, 7)):
        full, valid = render_heatmaps(anchors, labels, image_size)
        pooled = torch.nn.functional.adaptive_avg_pool2d(full[:, None], layer)[:, 0]
        maps, valid_layer = render_layer_heatmaps(anchors, labels, layer, image_size)
        assert maps.shape == (len(faces), layer, layer) and torch.equal(valid, valid_layer) and not valid[0]
        assert float((maps - pooled).abs().max()) <= 0.05
        cos = torch.nn.functional.cosine_similarity(maps[valid].flatten(1), pooled[valid].flatten(1))
        assert float(cos.min()) >= 0.9999
        one_part = render_layer_heatmaps(anchors, labels, layer, image_size, subcells=1)[0]
        assert float((one_part - pooled).abs().max()) > 0.05  # the max over blobs is what the parts are for


# --------------------------------------------------------------------------- the reference code's style
def test_dlib68_points_from_mediapipe_are_a_mirror_consistent_face(astronaut_landmarks):
    from fer_lib.faces.landmarks import DLIB68_MIRROR, dlib68_points

    p = dlib68_points(astronaut_landmarks)
    assert p.shape == (68, 2) and np.isfinite(p).all()
    mirrored = p[list(DLIB68_MIRROR)]
    # a near-frontal face: a point and its mirror sit at about the same height, on opposite sides
    assert np.abs(p[:, 1] - mirrored[:, 1]).max() < 0.06
    axis = p[[27, 28, 29, 30, 33, 51, 57, 62, 66, 8], 0].mean()
    sides = np.sign(p[:, 0] - axis) * np.sign(mirrored[:, 0] - axis)
    assert (sides[[0, 17, 36, 39, 48, 31]] < 0).all()
    assert p[36, 0] < p[39, 0] < p[42, 0] < p[45, 0] and p[19, 1] < p[37, 1] < p[30, 1] < p[51, 1] < p[57, 1] < p[8, 1]


def test_reference_style_maps_sit_on_the_aus_regions(astronaut_landmarks):
    from fer_lib.faces.landmarks import dlib68_points

    full = dlib68_points(astronaut_landmarks)
    lo, hi = full.min(0) - 0.1 * np.ptp(full, 0), full.max(0) + 0.1 * np.ptp(full, 0)
    p = (full - lo) / (hi - lo)  # the face crop's frame: the reference draws on aligned face crops
    size = 112
    smile = au.reference_heatmap(p, au.CODEBOOK["happiness"], size)
    assert smile.shape == (size, size) and smile.max() == pytest.approx(1.0) and smile.min() >= 0
    lip_corner = au.reference_au_map(p, 12, size)
    at = lambda i: lip_corner[int(p[i, 1] * size), int(p[i, 0] * size)]  # noqa: E731
    assert at(48) >= 0.9 * lip_corner.max() and at(54) >= 0.9 * lip_corner.max()  # discs on both lip corners
    assert at(19) < 1e-3 and at(24) < 1e-3  # nothing on the brows
    assert au.reference_heatmap(p, (), size).max() == 0
    assert au.reference_au_map(p + 5.0, 12, size) is None  # every ellipse outside the image
    ours = au.heatmap((astronaut_landmarks.anchors() - lo) / (hi - lo), "happiness", size)
    cos = float((ours * smile).sum() / np.linalg.norm(ours) / np.linalg.norm(smile))
    assert 0.3 < cos < 0.99  # the same regions, drawn differently
    with pytest.raises(ValueError, match="no reference ellipse; valid AUs"):
        au.reference_au_map(p, 43, size)
