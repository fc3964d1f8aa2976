"""Action units: the expression->AU codebook, AU regions on named anchors, and heatmap renderers.

The codebook is the paper's (Belharbi et al., FG 2024, Fig. 2). Each AU is a set of
Gaussian blobs centred on named facial anchors (fer_lib.faces.landmarks.ANCHORS); an
expression's heatmap is the max over its AUs' blobs, normalised to [0, 1].

Blob width follows the reference code: variance 64 px^2 at 224 px, i.e. sigma = 8/224 of
the image side (`sigma_mode="image"`, right for aligned face crops). For photos where the
face fills an arbitrary part of the frame, `sigma_mode="face"` scales sigma with the
inter-ocular distance instead.

Neutral has no AU: its heatmap is all zeros and `has_au_map()` is False, so the training
loss masks it out (CE only) rather than pulling attention towards an empty map.

Two renderers give the same maps: `heatmap()` (numpy, one face, for plots and datasets) and
`render_heatmaps()` (torch, a batch at once on CPU or GPU, for training and evaluation).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

from fer_lib.faces.landmarks import ANCHOR_INDEX, ANCHORS, FaceLandmarks

#: the project's label order (AffectNet's first seven); every loader maps its own order to this
EXPRESSIONS: tuple[str, ...] = ("neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger")

#: FACS names of the AUs used by the codebook
AU_NAMES: dict[int, str] = {
    1: "inner brow raiser", 2: "outer brow raiser", 4: "brow lowerer", 5: "upper lid raiser",
    6: "cheek raiser", 7: "lid tightener", 9: "nose wrinkler", 10: "upper lip raiser",
    12: "lip corner puller", 15: "lip corner depressor", 16: "lower lip depressor",
    17: "chin raiser", 20: "lip stretcher", 23: "lip tightener", 24: "lip pressor",
    25: "lips part", 26: "jaw drop", 27: "mouth stretch",
}
ALL_AUS: tuple[int, ...] = tuple(sorted(AU_NAMES))

#: the paper's codebook for the basic expressions (Fig. 2)
CODEBOOK: dict[str, tuple[int, ...]] = {
    "neutral": (),
    "happiness": (6, 12, 25),
    "sadness": (1, 4, 6, 15, 17),
    "surprise": (1, 2, 5, 26, 27),
    "fear": (1, 2, 4, 5, 20, 25, 26, 27),
    "disgust": (9, 10, 16, 17, 25, 26),
    "anger": (4, 5, 7, 10, 17, 23, 24, 25, 26),
}

#: each AU as the anchors its Gaussian blobs sit on (the facial muscle's visible region)
AU_REGIONS: dict[int, tuple[str, ...]] = {
    1: ("left_brow_inner", "right_brow_inner"),
    2: ("left_brow_outer", "right_brow_outer"),
    4: ("left_brow_inner", "right_brow_inner", "glabella"),
    5: ("left_upper_lid", "right_upper_lid"),
    6: ("left_cheek", "right_cheek", "left_eye_outer", "right_eye_outer"),
    7: ("left_lower_lid", "right_lower_lid"),
    9: ("nose_root", "left_nose_wing", "right_nose_wing"),
    10: ("upper_lip", "left_nasolabial", "right_nasolabial"),
    12: ("left_mouth_corner", "right_mouth_corner"),
    15: ("left_mouth_corner", "right_mouth_corner"),
    16: ("lower_lip",),
    17: ("chin",),
    20: ("left_mouth_corner", "right_mouth_corner"),
    23: ("upper_lip", "lower_lip"),
    24: ("upper_lip", "lower_lip"),
    25: ("mouth_center",),
    26: ("mouth_center", "chin"),
    27: ("mouth_center", "lower_lip", "chin"),
}

REFERENCE_SIGMA = 8.0 / 224.0  # sqrt(64 px^2) at 224 px, as a fraction of the image side
FACE_SIGMA = 0.25  # sigma as a fraction of the inter-ocular distance (sigma_mode="face")
SIGMA_MODES = ("image", "face")
TRUNCATE = 4.0  # the batched renderer draws each blob within +-4 sigma


def check_expression(expression: str, expressions: Sequence[str] | None = None) -> str:
    """Return the expression name or raise ValueError listing the valid ones."""
    valid = tuple(expressions) if expressions is not None else tuple(CODEBOOK)
    if expression not in valid or expression not in CODEBOOK:
        raise ValueError(f"unknown expression {expression!r}; valid expressions: {', '.join(valid)}")
    return expression


def expression_aus(expression: str) -> tuple[int, ...]:
    return CODEBOOK[check_expression(expression)]


def has_au_map(expression: str) -> bool:
    """False for classes without AUs (neutral): they get CE only."""
    return len(expression_aus(expression)) > 0


def register_expression(name: str, aus: Sequence[int]) -> None:
    """Add an expression (e.g. a compound one) to the codebook; its AUs must have regions."""
    unknown = [a for a in aus if a not in AU_REGIONS]
    if unknown:
        raise ValueError(f"AUs without a region: {unknown}; known AUs: {list(AU_REGIONS)}")
    if name in CODEBOOK and tuple(CODEBOOK[name]) != tuple(aus):
        raise ValueError(f"expression {name!r} already in the codebook with AUs {CODEBOOK[name]}")
    CODEBOOK[name] = tuple(aus)


def _size_hw(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def _as_anchors(landmarks: FaceLandmarks | np.ndarray) -> np.ndarray:
    anchors = landmarks.anchors() if isinstance(landmarks, FaceLandmarks) else np.asarray(landmarks, np.float32)
    if anchors.shape != (len(ANCHORS), 2):
        raise ValueError(f"expected {len(ANCHORS)} normalised anchors of shape ({len(ANCHORS)}, 2), got {anchors.shape}")
    return anchors


def sigma_for(anchors: np.ndarray, sigma: float | None = None, sigma_mode: str = "image") -> float:
    """Blob sigma in normalised image units for one face."""
    if sigma_mode not in SIGMA_MODES:
        raise ValueError(f"unknown sigma_mode {sigma_mode!r}; valid: {', '.join(SIGMA_MODES)}")
    if sigma_mode == "image":
        return float(REFERENCE_SIGMA if sigma is None else sigma)
    iod = float(np.linalg.norm(anchors[ANCHOR_INDEX["left_eye_center"]] - anchors[ANCHOR_INDEX["right_eye_center"]]))
    return float((FACE_SIGMA if sigma is None else sigma) * iod)


def _blobs(centres: np.ndarray, size: tuple[int, int], sigma: float) -> np.ndarray:
    """Max over Gaussian blobs centred at normalised `centres` (K, 2) -> (h, w)."""
    h, w = size
    out = np.zeros((h, w), np.float32)
    if len(centres) == 0 or not np.isfinite(centres).all():
        return out
    ys = (np.arange(h, dtype=np.float32) + 0.5) / h
    xs = (np.arange(w, dtype=np.float32) + 0.5) / w
    for cx, cy in centres:
        gy = np.exp(-((ys - cy) ** 2) / (2 * sigma**2))
        gx = np.exp(-((xs - cx) ** 2) / (2 * sigma**2))
        np.maximum(out, np.outer(gy, gx), out=out)
    return out


def _normalise(m: np.ndarray) -> np.ndarray:
    peak = float(m.max()) if m.size else 0.0
    return (m / peak).astype(np.float32) if peak > 0 else m.astype(np.float32)


def _au_region(au: int) -> tuple[str, ...]:
    if au not in AU_REGIONS:
        raise ValueError(f"unknown AU {au!r}; valid AUs: {', '.join(map(str, AU_REGIONS))}")
    return tuple(AU_REGIONS[au])


def _union_index(aus: Sequence[int]) -> list[int]:
    """Anchor indices of every region of `aus`, each once (first-seen order)."""
    return list(dict.fromkeys(ANCHOR_INDEX[a] for au in aus for a in _au_region(au)))


def _raw_au_map(anchors: np.ndarray, au: int, size: tuple[int, int], sigma: float) -> np.ndarray:
    return _blobs(anchors[[ANCHOR_INDEX[a] for a in _au_region(au)]], size, sigma)


def au_map(landmarks: FaceLandmarks | np.ndarray, au: int, size: int | Sequence[int],
           sigma: float | None = None, sigma_mode: str = "image") -> np.ndarray:
    """The map of one AU (float32 HxW in [0, 1])."""
    anchors = _as_anchors(landmarks)
    return _normalise(_raw_au_map(anchors, au, _size_hw(size), sigma_for(anchors, sigma, sigma_mode)))


def au_maps(landmarks: FaceLandmarks | np.ndarray, aus: Sequence[int] | str, size: int | Sequence[int],
            sigma: float | None = None, sigma_mode: str = "image") -> dict[int, np.ndarray]:
    """Per-AU maps for a list of AUs, or for an expression's AUs when given its name."""
    if isinstance(aus, str):
        aus = expression_aus(aus)
    return {au: au_map(landmarks, au, size, sigma, sigma_mode) for au in aus}


def combine_aus(landmarks: FaceLandmarks | np.ndarray, aus: Sequence[int], size: int | Sequence[int],
                sigma: float | None = None, sigma_mode: str = "image") -> np.ndarray:
    """Max over the given AUs' maps, normalised to [0, 1]; zeros if `aus` is empty."""
    hw = _size_hw(size)
    if not aus:
        return np.zeros(hw, np.float32)
    anchors = _as_anchors(landmarks)
    sig = sigma_for(anchors, sigma, sigma_mode)
    # the max over the AUs' blobs is the max over the union of their anchors: each blob drawn once,
    # normalised once (the same maps as render_heatmaps())
    return _normalise(_blobs(anchors[_union_index(aus)], hw, sig))


def heatmap(landmarks: FaceLandmarks | np.ndarray, expression: str, size: int | Sequence[int],
            sigma: float | None = None, sigma_mode: str = "image") -> np.ndarray:
    """The expression's AU heatmap: float32 HxW in [0, 1] (zeros for neutral)."""
    return combine_aus(landmarks, expression_aus(expression), size, sigma, sigma_mode)


def all_au_heatmap(landmarks: FaceLandmarks | np.ndarray, size: int | Sequence[int],
                   sigma: float | None = None, sigma_mode: str = "image") -> np.ndarray:
    """Generic map of every AU region of the codebook (expression-independent)."""
    return combine_aus(landmarks, ALL_AUS, size, sigma, sigma_mode)


def valid_map_mask(au_maps, has_landmarks):
    """(B,) True where an AU map can guide a model: landmarks found and a non-zero map (torch tensors)."""
    return has_landmarks.bool().view(-1) & (au_maps.flatten(1).amax(dim=1) > 0)


# --------------------------------------------------------------------------- batched (torch)
@dataclass
class BlobTable:
    """Per-class blob centres as anchor indices, padded: (C, K) indices and (C, K) validity."""

    expressions: tuple[str, ...]
    index: np.ndarray
    valid: np.ndarray

    @classmethod
    def for_expressions(cls, expressions: Sequence[str] = EXPRESSIONS) -> "BlobTable":
        per_class = []
        for e in expressions:
            anchors = sorted({ANCHOR_INDEX[a] for au in expression_aus(e) for a in AU_REGIONS[au]})
            per_class.append(anchors)
        k = max(1, max(len(a) for a in per_class))
        index = np.zeros((len(per_class), k), np.int64)
        valid = np.zeros((len(per_class), k), bool)
        for c, anchors in enumerate(per_class):
            index[c, : len(anchors)] = anchors
            valid[c, : len(anchors)] = True
        return cls(tuple(expressions), index, valid)


_TABLES: dict[tuple[str, ...], BlobTable] = {}


def blob_table(expressions: Sequence[str] = EXPRESSIONS) -> BlobTable:
    key = tuple(expressions)
    if key not in _TABLES:
        _TABLES[key] = BlobTable.for_expressions(key)
    return _TABLES[key]


def render_heatmaps(anchors, labels, size: int | Sequence[int], sigma: float | None = None,
                    sigma_mode: str = "image", expressions: Sequence[str] = EXPRESSIONS,
                    chunk: int = 256):
    """Render many expression heatmaps at once with torch, on the anchors' device.

    anchors: (B, A, 2) normalised anchors (NaN rows = no landmarks); labels: (B,) class
    indices into `expressions`. Returns (maps (B, h, w) float32 in [0, 1], valid (B,) bool),
    where `valid` is False for faces without landmarks and for classes without AUs.
    Equal to `heatmap()` per face up to the +-4 sigma truncation (< 4e-4; see tests).
    """
    import torch

    h, w = _size_hw(size)
    centres, keep, has_face, sig = _batch_blobs(anchors, labels, sigma, sigma_mode, expressions)
    device = centres.device
    # Each blob is drawn only inside its +-TRUNCATE sigma window (values beyond are < 4e-4)
    # and scattered into the flat maps with a max: only real blobs (no padding), far less
    # work than dense (B, K, h, w) products.
    n = centres.shape[0]
    out = torch.zeros(n * h * w, device=device)
    img, _ = keep.nonzero(as_tuple=True)
    c = centres[keep]  # (N, 2) all real blobs of the batch
    if len(c):
        radius = int(np.ceil(TRUNCATE * float(sig.max()) * max(h, w)))
        offsets = torch.arange(-radius, radius + 1, device=device)
        for s in range(0, len(c), chunk * 16):
            cs, ims = c[s:s + chunk * 16], img[s:s + chunk * 16]
            inv = (1.0 / (2 * sig[ims] ** 2))[:, None]
            px = (cs[:, 0:1] * w).floor().long() + offsets  # (m, win) pixel columns
            py = (cs[:, 1:2] * h).floor().long() + offsets  # (m, win) pixel rows
            gx = torch.exp(-(((px + 0.5) / w) - cs[:, 0:1]) ** 2 * inv) * ((px >= 0) & (px < w))
            gy = torch.exp(-(((py + 0.5) / h) - cs[:, 1:2]) ** 2 * inv) * ((py >= 0) & (py < h))
            values = (gy[:, :, None] * gx[:, None, :]).flatten(1)
            rows = py.clamp_(0, h - 1).mul_(w).add_((ims * (h * w))[:, None])
            index = (rows[:, :, None] + px.clamp_(0, w - 1)[:, None, :]).flatten(1)
            out.scatter_reduce_(0, index.flatten(), values.flatten(), reduce="amax")
    out = out.reshape(n, h, w)
    peak = out.flatten(1).amax(dim=1).clamp_min(1e-12) if h * w else torch.ones(n, device=out.device)
    out = out / peak[:, None, None]
    valid = keep.any(dim=1)
    out[~valid] = 0.0
    return out, valid


def _batch_blobs(anchors, labels, sigma: float | None, sigma_mode: str, expressions: Sequence[str]):
    """Blob centres (B, K, 2), which are real (B, K), which faces have landmarks (B,) and sigma (B,)."""
    import torch

    anchors = torch.as_tensor(anchors, dtype=torch.float32)
    labels = torch.as_tensor(labels, dtype=torch.long, device=anchors.device)
    table = blob_table(expressions)
    index = torch.as_tensor(table.index, device=anchors.device)[labels]
    valid_k = torch.as_tensor(table.valid, device=anchors.device)[labels]
    has_face = torch.isfinite(anchors).flatten(1).all(dim=1)
    safe = torch.where(torch.isfinite(anchors), anchors, torch.zeros_like(anchors))
    centres = torch.gather(safe, 1, index[..., None].expand(-1, -1, 2))
    if sigma_mode not in SIGMA_MODES:
        raise ValueError(f"unknown sigma_mode {sigma_mode!r}; valid: {', '.join(SIGMA_MODES)}")
    if sigma_mode == "image":
        sig = torch.full((anchors.shape[0],), REFERENCE_SIGMA if sigma is None else sigma, device=anchors.device)
    else:
        iod = (safe[:, ANCHOR_INDEX["left_eye_center"]] - safe[:, ANCHOR_INDEX["right_eye_center"]]).norm(dim=-1)
        sig = (FACE_SIGMA if sigma is None else sigma) * iod.clamp_min(1e-3)
    return centres, valid_k & has_face[:, None], has_face, sig


def _cell_means(centres: np.ndarray, sigma: float, n_cells: int, n_pixels: int, sub: int) -> np.ndarray:
    """Mean of a 1-D Gaussian over each sub-cell of the adaptive-pooling cells: (K,) centres ->
    (K, n_cells * sub). Cell i spans pixels [floor(i*n/c), ceil((i+1)*n/c)) as in adaptive_avg_pool,
    cut into `sub` equal parts; the mean over a part is the integral (an erf difference) over its width."""
    from scipy.special import erf

    i = np.arange(n_cells, dtype=np.float64)
    lo = np.floor(i * n_pixels / n_cells)
    width = (np.ceil((i + 1) * n_pixels / n_cells) - lo) / sub
    a = ((lo[:, None] + width[:, None] * np.arange(sub)) / n_pixels).ravel()
    b = a + np.repeat(width / n_pixels, sub)
    s = sigma * math.sqrt(2.0)
    c = np.asarray(centres, np.float64)[:, None]
    mean = (erf((b - c) / s) - erf((a - c) / s)) * (s * math.sqrt(math.pi) / 2) / (b - a)
    return np.where(mean > 1e-15, mean, 0.0)  # far tails to 0: no subnormal products


def default_subcells(size: int | Sequence[int], image_size: int | Sequence[int], sigma: float) -> int:
    """Parts per cell side: no wider than half the blob sigma (sigma: a fraction of the image), nor than a pixel."""
    (h, w), (H, W) = _size_hw(size), _size_hw(image_size)
    cell_px = max(H / h, W / w)
    return max(1, min(math.ceil(cell_px), math.ceil(2 * cell_px / max(sigma * min(H, W), 1e-6))))


def _layer_map(centres: np.ndarray, sigma: float, size: tuple[int, int], image_size: tuple[int, int],
               subcells: int | None) -> np.ndarray:
    """Max over blobs (K, 2) of their means on sub-cells, averaged per cell, over the image map's peak."""
    (h, w), (H, W) = size, image_size
    sub = default_subcells(size, image_size, sigma) if subcells is None else int(subcells)
    gy = _cell_means(centres[:, 1], sigma, h, H, sub)  # (K, h * sub)
    gx = _cell_means(centres[:, 0], sigma, w, W, sub)  # (K, w * sub)
    parts = np.zeros((h * sub, w * sub))
    for y, x in zip(gy, gx):
        np.maximum(parts, np.outer(y, x), out=parts)
    cells = parts.reshape(h, sub, w, sub).mean(axis=(1, 3))
    # the image map's peak: each blob's value at its nearest pixel centre, max over the blobs
    near_x = (np.clip(np.floor(centres[:, 0] * W), 0, W - 1) + 0.5) / W - centres[:, 0]
    near_y = (np.clip(np.floor(centres[:, 1] * H), 0, H - 1) + 0.5) / H - centres[:, 1]
    peak = float(np.exp(-(near_x ** 2 + near_y ** 2) / (2 * sigma ** 2)).max())
    return (cells / max(peak, 1e-12)).astype(np.float32)


def combine_aus_at(landmarks: FaceLandmarks | np.ndarray, aus: Sequence[int], size: int | Sequence[int],
                   image_size: int | Sequence[int], sigma: float | None = None, sigma_mode: str = "image",
                   subcells: int | None = None) -> np.ndarray:
    """`combine_aus` of one face rendered directly at a layer's `size` for an image of `image_size`:
    float32 (h, w) in [0, 1], standing for area-pooling (adaptive_avg_pool2d) the image-size map without
    drawing it. A Gaussian's mean over a rectangle is a product of two erf differences, exact; the map
    is the max over blobs, and the mean of a max is not the max of the means where two blobs meet. So
    each cell is cut into `subcells` x `subcells` parts (default: no wider than half the blob sigma), the
    max over blobs is taken per part and the parts are averaged. Tolerance against pooling the pixel map
    (tests, faces of the synthetic set): cosine >= 0.9999 per map and max |difference| <= 0.05; exact to
    1e-3 for one blob. The image map's normalisation (its peak over pixel centres) is known in closed form."""
    hw = _size_hw(size)
    if not aus:
        return np.zeros(hw, np.float32)
    anchors = _as_anchors(landmarks)
    centres = np.asarray(anchors[_union_index(aus)], np.float64)
    if not np.isfinite(centres).all():
        return np.zeros(hw, np.float32)
    return _layer_map(centres, sigma_for(anchors, sigma, sigma_mode), hw, _size_hw(image_size), subcells)


def render_layer_heatmaps(anchors, labels, size: int | Sequence[int], image_size: int | Sequence[int],
                          sigma: float | None = None, sigma_mode: str = "image",
                          expressions: Sequence[str] = EXPRESSIONS, subcells: int | None = None):
    """Expression heatmaps of many faces at a layer's `size` (combine_aus_at per face): the batched
    counterpart of `render_heatmaps` for what training needs. Returns (maps (B, h, w), valid (B,)) tensors."""
    import torch

    anchors = np.asarray(torch.as_tensor(anchors, dtype=torch.float32).cpu())
    labels = np.asarray(torch.as_tensor(labels).cpu())
    hw = _size_hw(size)
    maps = np.zeros((len(anchors), *hw), np.float32)
    valid = np.zeros(len(anchors), bool)
    for i, (a, label) in enumerate(zip(anchors, labels)):
        aus = expression_aus(expressions[int(label)])
        if aus and np.isfinite(a).all():
            maps[i] = combine_aus_at(a, aus, hw, image_size, sigma, sigma_mode, subcells)
            valid[i] = True
    return torch.from_numpy(maps), torch.from_numpy(valid)


# --------------------------------------------------------------------------- the reference code's maps
#: size of the images the reference code draws on (RAF-DB's aligned faces): its pixel sizes are fractions of it
REFERENCE_WORK_SIZE = 100
REFERENCE_BLUR_SIZE = 28  # each AU's ellipses are resized to 28x28, blurred 3x3 there, resized back


def _px(n: float) -> float:
    return n / REFERENCE_WORK_SIZE


def _span(p: np.ndarray, a: int, b: int, floor: float) -> tuple[float, float, float, float]:
    """The reference's ellipse between points a and b: centred between them, half their x and y extents
    as axes (its fallback when an extent is 0)."""
    (xa, ya), (xb, yb) = p[a], p[b]
    ax, ay = max((xb - xa) / 2, 0.0) or floor, max((yb - ya) / 2, 0.0) or floor
    return ((xa + xb) / 2, (ya + yb) / 2, ax, ay)


def _eyes(p: np.ndarray, extra: float = 0.0) -> list[tuple[float, float, float, float]]:
    """An ellipse per eye from its corners (x) and lids (y); AU7's is taller by `extra` on each lid."""
    out = []
    for left, top, right, bottom in ((36, 38, 39, 41), (42, 44, 45, 47)):
        x0, x1, y0, y1 = p[left, 0], p[right, 0], p[top, 1], p[bottom, 1]
        ax = max((x1 - x0) / 2, 0.0) or _px(5)
        ay = max((y1 + extra - y0 + extra) / 2, 0.0) or _px(5)
        out.append(((x0 + x1) / 2, (y0 + y1) / 2, ax, ay))
    return out


def _circles(p: np.ndarray, centres: Sequence[tuple[float, float]], r: float) -> list[tuple[float, float, float, float]]:
    return [(float(x), float(y), r, r) for x, y in centres]


def _mouth(p: np.ndarray) -> list[tuple[float, float, float, float]]:
    cx, cy = (p[48, 0] + p[54, 0]) / 2, (p[51, 1] + p[57, 1]) / 2
    return [(cx, cy, max((p[54, 0] - p[48, 0]) / 2, 0.0) or _px(5), max((p[57, 1] - p[51, 1]) / 2, 0.0) or _px(5))]


#: each AU's filled ellipses (cx, cy, half-axis x, half-axis y), normalised, from dlib-68 points `p`,
#: as the reference code draws them (its action_units.py; pixel sizes at REFERENCE_WORK_SIZE)
REFERENCE_AU_ELLIPSES: dict[int, Callable[[np.ndarray], list[tuple[float, float, float, float]]]] = {
    1: lambda p: [(p[i, 0], p[i, 1], 1 / 8, 1 / 10) for i in (20, 23)],
    2: lambda p: [(p[i, 0], p[i, 1], 1 / 8, 1 / 10) for i in (18, 25)],
    4: lambda p: [_span(p, 19, 24, _px(10))],
    5: lambda p: _eyes(p),
    6: lambda p: [(p[i, 0], p[i, 1] + 1 / 6, 1 / 10, 1 / 10) for i in (41, 46)],
    7: lambda p: _eyes(p, extra=_px(10)),
    9: lambda p: _circles(p, [(p[31, 0], p[29, 1]), (p[35, 0], p[29, 1])], _px(20)),
    10: lambda p: _circles(p, [(p[48, 0], p[50, 1]), (p[52, 0], p[54, 1])], _px(20)),
    12: lambda p: _circles(p, [p[48], p[54]], _px(20)),
    15: lambda p: _circles(p, [p[48], p[54]], _px(20)),
    16: lambda p: _circles(p, [p[59], p[55]], _px(20)),
    17: lambda p: [_span(p, 59, 8, _px(5))],
    20: lambda p: _circles(p, [(p[48] + p[6]) / 2, (p[50] + p[10]) / 2], _px(20)),
    23: _mouth, 24: _mouth, 26: _mouth, 27: _mouth,
    25: lambda p: [(p[i, 0], p[i, 1], _px(25), _px(10)) for i in (51, 57)],
}


def reference_au_map(dlib68: np.ndarray, au: int, size: int) -> np.ndarray | None:
    """One AU's map as the reference code draws it: filled ellipses, resized to 28x28, a 3x3 box blur,
    resized back (bilinear); float32 (size, size), or None when every ellipse falls outside the image."""
    import torch
    import torch.nn.functional as F

    if au not in REFERENCE_AU_ELLIPSES:
        raise ValueError(f"AU {au} has no reference ellipse; valid AUs: {', '.join(map(str, REFERENCE_AU_ELLIPSES))}")
    p = np.asarray(dlib68, np.float64)
    centres = (np.arange(size) + 0.5) / size
    canvas = np.zeros((size, size), np.float32)
    for cx, cy, ax, ay in REFERENCE_AU_ELLIPSES[au](p):
        inside = ((centres[None, :] - cx) / ax) ** 2 + ((centres[:, None] - cy) / ay) ** 2 <= 1.0
        canvas[inside] = 1.0
    if not canvas.any():
        return None
    t = torch.from_numpy(canvas)[None, None]
    t = F.interpolate(t, size=(REFERENCE_BLUR_SIZE,) * 2, mode="bilinear", align_corners=False)
    t = F.avg_pool2d(F.pad(t, (1, 1, 1, 1), mode="reflect"), 3, stride=1)
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()


def reference_heatmap(dlib68: np.ndarray, aus: Sequence[int], size: int) -> np.ndarray:
    """The reference code's AU heatmap of a face: max over the AUs' maps, normalised to [0, 1]; zeros when
    no AU (neutral) or no ellipse inside the image. `au_style="reference"` of the datasets."""
    maps = [m for m in (reference_au_map(dlib68, au, size) for au in aus) if m is not None]
    return _normalise(np.max(np.stack(maps), axis=0)) if maps else np.zeros((size, size), np.float32)
