"""A procedural synthetic expression dataset with exact ground truth.

Real benchmark images cannot be shipped, so the project draws its own faces with PIL,
deterministically from a seed: an ellipse head with identity variation (face shape,
proportions, skin tone, hair), line brows, white eyes with lids, iris and pupil, a
triangle nose with nostrils, cheeks, a mouth made of lip curves, small pose jitter,
lighting, a textured background and pixel noise. Faces are drawn at a working
resolution of 192 px (where MediaPipe FaceMesh finds them) and downsampled.

Each expression activates its codebook AUs (`fer_lib.faces.au.CODEBOOK`) with random
intensities; every AU deforms only its own region (AU1/AU2 raise the inner/outer brows,
AU4 lowers and draws them together with glabella furrows, AU5 widens the eyes, AU6 raises
the cheeks and narrows the eyes from below with crow's feet, AU7 tightens the lids, AU9
wrinkles the nose, AU10 raises the upper lip, AU12 lifts the lip corners, AU15 lowers
them, AU16 depresses the lower lip, AU17 raises the chin, AU20 stretches the lips,
AU23/AU24 tighten and press them, AU25 parts them, AU26/AU27 drop the jaw). Class AUs are
sometimes dropped and other AUs leak in weakly, so classes overlap as real ones do.

Compound expressions (`fer_lib.faces.compound`, Du et al. 2014) can be generated too: pass their
names in `SyntheticConfig.expressions` (e.g. `EXPRESSIONS + ("happily_surprised",)`). A
compound face shows all of Du et al.'s AUs for it (never dropped) and, with probability
`COMPOUND_PART_P` each, the defining (core) AUs of its two basic parts that Du's set lacks,
so it reads as a blend of its parts. The basic classes are drawn exactly as before
(same images for the same seed and class).

The generator returns the ground-truth anchors (`fer_lib.faces.landmarks.ANCHORS`, subject's
left/right, transformed by the same pose jitter) and the true intensity of every AU.
`build_synthetic` writes the set as ImageFolder + CSV manifest (+ `truth.npz`), which
the generic loaders read back.

`spurious_p` adds a class-correlated cue outside the face (a coloured square at a
class-specific place on the border) to that fraction of TRAIN images; val/test get none
(`spurious_eval="none"`) or cues of random classes (`"shuffled"`), so a model that
learnt the shortcut instead of the face is exposed.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from fer_lib.faces.au import ALL_AUS, CODEBOOK, EXPRESSIONS, combine_aus
from fer_lib.faces.compound import ALL_COMPOUNDS, COMPOUND_AUS, COMPOUND_PARTS
from fer_lib.faces.landmarks import ANCHOR_INDEX, ANCHORS
from fer_lib.utils import (REPO_ROOT, ConfigError, atomic_path, atomic_save_npz, atomic_write_csv, atomic_write_json,
                           check_choice, config_hash, file_lock, progress_bar)

WORK_SIZE = 192  # drawing resolution: MediaPipe FaceMesh detects these faces reliably here
SPLITS = ("train", "val", "test")
SPURIOUS_EVAL_MODES = ("none", "shuffled")
GENERATOR_VERSION = 1  # bump when drawing changes, so cached sets are rebuilt
#: every class the generator can draw: the 7 basic ones (their ids unchanged), then the compounds
SYNTHETIC_EXPRESSIONS: tuple[str, ...] = EXPRESSIONS + ALL_COMPOUNDS
#: chance that a compound face also shows each core AU of its basic parts outside Du et al.'s set
COMPOUND_PART_P = 0.5

#: class-specific spurious cue: (x, y) centre of a square on the border, and its colour
SPURIOUS_CUES: tuple[tuple[tuple[float, float], tuple[int, int, int]], ...] = (
    ((0.07, 0.07), (230, 30, 30)),     # neutral: top-left, red
    ((0.93, 0.07), (30, 200, 40)),     # happiness: top-right, green
    ((0.07, 0.93), (40, 60, 230)),     # sadness: bottom-left, blue
    ((0.93, 0.93), (240, 220, 20)),    # surprise: bottom-right, yellow
    ((0.07, 0.50), (230, 30, 220)),    # fear: left-middle, magenta
    ((0.93, 0.50), (20, 220, 230)),    # disgust: right-middle, cyan
    ((0.07, 0.29), (250, 140, 0)),     # anger: left, upper third, orange
)
SPURIOUS_SIZE = 0.10  # side of the cue square, fraction of the image


# --------------------------------------------------------------------------- configuration
@dataclass
class SyntheticConfig:
    """Everything that determines a synthetic set (its hash names the cache folder)."""

    n_per_class: Mapping[str, int] | int = field(default_factory=lambda: {"train": 300, "val": 60, "test": 60})
    image_size: int = 112
    seed: int = 0
    spurious_p: float = 0.0
    spurious_eval: str = "none"
    intensity_range: tuple[float, float] = (0.25, 1.0)
    drop_p: float = 0.2  # chance that a class AU is absent (at least one stays)
    leak_p: float = 0.12  # chance that a non-class AU is weakly active
    leak_max: float = 0.35
    expressions: tuple[str, ...] = EXPRESSIONS

    def __post_init__(self) -> None:
        if isinstance(self.n_per_class, (int, np.integer)):
            n = int(self.n_per_class)
            self.n_per_class = {"train": n, "val": max(1, n // 5), "test": max(1, n // 5)}
        bad = [k for k in self.n_per_class if k not in SPLITS]
        if bad:
            raise ConfigError(f"unknown split(s) {bad} in n_per_class; valid splits: {', '.join(SPLITS)}")
        if any(int(v) < 0 for v in self.n_per_class.values()):
            raise ConfigError(f"n_per_class must be >= 0 per split, got {dict(self.n_per_class)}")
        self.n_per_class = {k: int(self.n_per_class[k]) for k in SPLITS if k in self.n_per_class}
        if not 8 <= int(self.image_size) <= 1024:
            raise ConfigError(f"image_size must be in 8..1024 pixels, got {self.image_size}")
        if not 0.0 <= float(self.spurious_p) <= 1.0:
            raise ConfigError(f"spurious_p is a probability in [0, 1], got {self.spurious_p}")
        check_choice("spurious_eval", self.spurious_eval, SPURIOUS_EVAL_MODES)
        lo, hi = self.intensity_range
        if not 0.0 <= lo <= hi <= 1.0:
            raise ConfigError(f"intensity_range must satisfy 0 <= lo <= hi <= 1, got {self.intensity_range}")
        for e in self.expressions:
            check_choice("expression", e, SYNTHETIC_EXPRESSIONS)
        if len(set(self.expressions)) != len(tuple(self.expressions)):
            raise ConfigError(f"expressions has duplicates: {list(self.expressions)}")
        self.intensity_range = (float(lo), float(hi))
        self.expressions = tuple(self.expressions)

    def key(self) -> str:
        """Short hash of the config and generator version (names the on-disk cache)."""
        return config_hash({**dataclasses.asdict(self), "generator_version": GENERATOR_VERSION}, length=12)


# --------------------------------------------------------------------------- sampling
@dataclass
class FaceParams:
    """Identity, pose, appearance and AU intensities of one synthetic face."""

    identity: dict[str, float]
    pose: tuple[float, float, float, float]  # rotation (deg), scale, dx, dy (normalised)
    colors: dict[str, tuple[int, int, int]]
    aus: dict[int, float]
    background: dict[str, Any]
    light: tuple[float, float]  # gradient angle (rad), strength
    noise: float
    hair: bool


SKIN_TONES = np.array([(244, 214, 190), (226, 186, 150), (198, 148, 110), (160, 112, 78), (112, 74, 50)], float)
HAIR_COLORS = np.array([(30, 22, 18), (70, 45, 25), (120, 80, 40), (200, 170, 110), (90, 90, 90)], float)
IRIS_COLORS = np.array([(70, 45, 25), (40, 90, 150), (60, 110, 60), (30, 25, 20), (110, 90, 60)], float)


#: AUs never dropped (the ones an observer needs to name the expression); the others may be
CORE_AUS: dict[str, tuple[int, ...]] = {
    "happiness": (12,), "sadness": (1, 15), "surprise": (2, 26), "fear": (4, 20), "disgust": (9,), "anger": (4,),
}


def sample_aus(expression: str, rng: np.random.Generator, intensity_range=(0.25, 1.0), drop_p: float = 0.2,
               leak_p: float = 0.12, leak_max: float = 0.35) -> dict[int, float]:
    """True AU intensities for one face of `expression` (all AUs, 0 when inactive)."""
    if expression in COMPOUND_AUS:
        return _sample_compound_aus(expression, rng, intensity_range, leak_p, leak_max)
    aus = {au: 0.0 for au in ALL_AUS}
    own = CODEBOOK[expression]
    for au in ALL_AUS:
        if au not in own and rng.random() < leak_p:
            aus[au] = float(rng.uniform(0.0, leak_max))
    if own:
        keep = (rng.random(len(own)) >= drop_p) | np.isin(own, CORE_AUS.get(expression, ()))
        lo, hi = intensity_range
        for au, k in zip(own, keep):
            if k:
                aus[au] = float(rng.uniform(lo, hi))
    return aus


def _sample_compound_aus(expression: str, rng: np.random.Generator, intensity_range=(0.25, 1.0),
                         leak_p: float = 0.12, leak_max: float = 0.35) -> dict[int, float]:
    """AU intensities of a compound face: Du et al.'s AUs always, its parts' core AUs sometimes."""
    own = COMPOUND_AUS[expression]
    extra = sorted({au for part in COMPOUND_PARTS[expression] for au in CORE_AUS.get(part, ())} - set(own))
    aus = {au: 0.0 for au in ALL_AUS}
    for au in ALL_AUS:
        if au not in own and au not in extra and rng.random() < leak_p:
            aus[au] = float(rng.uniform(0.0, leak_max))
    lo, hi = intensity_range
    for au in own:
        aus[au] = float(rng.uniform(lo, hi))
    for au in extra:
        if rng.random() < COMPOUND_PART_P:
            aus[au] = float(rng.uniform(lo, hi))
    return aus


def sample_face(expression: str, rng: np.random.Generator, config: SyntheticConfig | None = None) -> FaceParams:
    """Draw identity, pose, appearance and AU intensities for one face."""
    cfg = config or SyntheticConfig()
    u = rng.uniform
    identity = {
        "face_w": u(0.28, 0.32), "face_h": u(0.35, 0.39), "cy": u(0.50, 0.52),
        "eye_y": u(0.41, 0.44), "eye_dx": u(0.115, 0.135), "eye_w": u(0.055, 0.066), "eye_h": u(0.023, 0.029),
        "iris_r": u(0.95, 1.15), "brow_gap": u(0.050, 0.062), "brow_th": u(0.013, 0.019), "brow_arch": u(0.004, 0.012),
        "nose_len": u(0.130, 0.155), "wing_w": u(0.032, 0.042), "mouth_gap": u(0.070, 0.088),
        "mouth_w": u(0.080, 0.095), "lip_up": u(0.013, 0.018), "lip_lo": u(0.016, 0.022), "gaze": u(-0.15, 0.15),
        "blush": u(0.0, 0.25),
    }
    t = u(0, len(SKIN_TONES) - 1)
    i = int(min(t, len(SKIN_TONES) - 2))
    skin = SKIN_TONES[i] * (1 - (t - i)) + SKIN_TONES[i + 1] * (t - i) + rng.normal(0, 6, 3)
    lip = skin * np.array([0.78, 0.55, 0.55]) + np.array([30, 0, 5])
    colors = {
        "skin": _rgb(skin), "lip": _rgb(lip), "hair": _rgb(HAIR_COLORS[rng.integers(len(HAIR_COLORS))] + rng.normal(0, 8, 3)),
        "iris": _rgb(IRIS_COLORS[rng.integers(len(IRIS_COLORS))] + rng.normal(0, 8, 3)),
    }
    colors["brow"] = _rgb(np.minimum(np.array(colors["hair"], float), skin * 0.45) * 0.9)
    # backgrounds are only moderately saturated, so they never look like a (saturated) spurious cue
    bg1 = np.clip(rng.uniform(50, 215) + rng.normal(0, 28, 3), 0, 255)
    bg2 = np.clip(bg1 + rng.normal(0, 25, 3), 0, 255)
    background = {"c1": _rgb(bg1), "c2": _rgb(bg2), "angle": float(u(0, 2 * math.pi)),
                  "texture": float(u(0, 14)), "blobs": int(rng.integers(0, 4)),
                  "tex_seed": int(rng.integers(2**31))}
    pose = (float(rng.normal(0, 4.0)), float(u(0.92, 1.04)), float(rng.normal(0, 0.015)), float(rng.normal(0, 0.015)))
    aus = sample_aus(expression, rng, cfg.intensity_range, cfg.drop_p, cfg.leak_p, cfg.leak_max)
    return FaceParams(identity=identity, pose=pose, colors=colors, aus=aus, background=background,
                      light=(float(u(0, 2 * math.pi)), float(u(0.0, 0.3))), noise=float(u(1.5, 6.0)),
                      hair=bool(rng.random() < 0.75))


def _rgb(c) -> tuple[int, int, int]:
    c = np.clip(np.asarray(c, float), 0, 255)
    return int(c[0]), int(c[1]), int(c[2])


def _shade(c: Sequence[int], f: float, alpha: int | None = None) -> tuple[int, ...]:
    out = tuple(int(max(0, min(255, v * f))) for v in c[:3])
    return out if alpha is None else (*out, int(alpha))


# --------------------------------------------------------------------------- geometry
@dataclass
class FaceGeometry:
    """Canonical (un-posed) face shapes in normalised coordinates, plus anchors."""

    polys: dict[str, np.ndarray]
    anchors: np.ndarray  # (A, 2) canonical


def _curve(x0, y0, x1, y1, mid_dy, n=17, power=2.0):
    """Points from (x0,y0) to (x1,y1) whose middle is displaced by mid_dy (a bow)."""
    t = np.linspace(-1.0, 1.0, n)
    x = (x0 + x1) / 2 + t * (x1 - x0) / 2
    base = (y0 + y1) / 2 + t * (y1 - y0) / 2
    y = base + mid_dy * (1 - np.abs(t) ** power)
    return np.stack([x, y], axis=1)


@dataclass
class _Sketch:
    """A face geometry under construction: identity, AU intensities, anchors and polygons so far."""

    g: dict[str, Any]
    aus: Mapping[int, float]
    A: dict[str, np.ndarray] = field(default_factory=dict)
    polys: dict[str, np.ndarray] = field(default_factory=dict)

    def a(self, au: int) -> float:
        return float(self.aus.get(au, 0.0))


def face_geometry(p: FaceParams) -> FaceGeometry:
    """Compute every drawn shape and the anchors from identity and AU intensities."""
    k = _Sketch(p.identity, p.aus)
    g = k.g
    cx, cy = 0.5, g["cy"]
    fw, fh = g["face_w"], g["face_h"]
    jaw = 0.035 * k.a(26) + 0.05 * k.a(27)  # extra length of the lower face
    _head(k, cx, cy, jaw)
    brow_base = g["eye_y"] - g["brow_gap"]
    for side, s in (("left", 1.0), ("right", -1.0)):  # subject's left is on the image right
        _eye_and_brow(k, side, s, cx, brow_base)
    tip_y, ww, wing_y = _nose(k, cx, brow_base)
    _mouth(k, cx, tip_y, ww, wing_y)
    chin_y = cy + fh + jaw
    k.A["chin"] = np.array([cx, chin_y - 0.03 - 0.008 * k.a(17)])
    ang = math.radians(35)
    for side, s in (("left", 1.0), ("right", -1.0)):
        k.A[f"{side}_jaw"] = np.array([cx + s * (fw * math.cos(ang) - 0.025), cy + (fh + jaw) * math.sin(ang)])
    k.polys["chin_mark"] = _curve(cx - 0.025, chin_y - 0.05 + 0.01 * jaw, cx + 0.025, chin_y - 0.05 + 0.01 * jaw, 0.006)
    anchors = np.stack([k.A[name] for name in ANCHORS]).astype(np.float64)
    return FaceGeometry(polys=k.polys, anchors=anchors)


def _head(k: _Sketch, cx: float, cy: float, jaw: float) -> None:
    """Head (an ellipse whose lower half stretches with the jaw drop), neck and hair."""
    fw, fh = k.g["face_w"], k.g["face_h"]
    th = np.linspace(0, 2 * math.pi, 72, endpoint=False)
    hx = cx + fw * np.cos(th)
    hy_raw = np.sin(th)
    hy = cy + np.where(hy_raw > 0, (fh + jaw) * hy_raw, fh * hy_raw)
    k.polys["head"] = np.stack([hx, hy], 1)
    k.polys["neck"] = np.array([[cx - fw * 0.55, cy + fh * 0.6], [cx + fw * 0.55, cy + fh * 0.6],
                                [cx + fw * 0.62, 1.2], [cx - fw * 0.62, 1.2]])
    # hair: top cap of a slightly larger ellipse down to a curved hairline
    ht = np.linspace(math.pi * 1.06, math.pi * 1.94, 30)
    cap = np.stack([cx + fw * 1.07 * np.cos(ht), cy + fh * 1.07 * np.sin(ht)], 1)
    hairline = _curve(cap[-1, 0] - 0.01, cy - fh * 0.40, cap[0, 0] + 0.01, cy - fh * 0.40, -fh * 0.22, n=20)
    k.polys["hair"] = np.concatenate([cap, hairline], 0)


def _eye_and_brow(k: _Sketch, side: str, s: float, cx: float, brow_base: float) -> None:
    """One side's eye (lids move with AU5, AU6, AU7), brow (AU1 inner up, AU2 outer up, AU4 down and
    together), cheek (rises with AU6) and crow's feet."""
    g, a, A, polys = k.g, k.a, k.A, k.polys
    ey, dx, ew, eh = g["eye_y"], g["eye_dx"], g["eye_w"], g["eye_h"]
    ex = cx + s * dx
    h_up = eh * (1 + 0.75 * a(5) - 0.25 * a(7))
    h_lo = eh * (1 - 0.45 * a(7) - 0.5 * a(6))
    inner = np.array([ex - s * ew, ey + 0.002])
    outer = np.array([ex + s * ew, ey - 0.002 - 0.004 * a(6)])
    upper = _curve(inner[0], inner[1], outer[0], outer[1], -h_up, n=21, power=2.2)
    lower = _curve(inner[0], inner[1], outer[0], outer[1], h_lo, n=21, power=2.2)
    polys[f"{side}_eye_upper"] = upper
    polys[f"{side}_eye_lower"] = lower
    ix = ex + g["gaze"] * ew * 0.3
    A[f"{side}_eye_inner"], A[f"{side}_eye_outer"] = inner, outer
    A[f"{side}_upper_lid"] = np.array([ex, ey - h_up])
    A[f"{side}_lower_lid"] = np.array([ex, ey + h_lo])
    A[f"{side}_eye_center"] = np.array([ix, ey])
    polys[f"{side}_iris_c"] = np.array([[ix, ey, eh * g["iris_r"]]])
    b_in = np.array([ex - s * ew * 0.95 + s * 0.018 * a(4), brow_base - 0.04 * a(1) + 0.026 * a(4)])
    b_mid = np.array([ex + s * ew * 0.1, brow_base - g["brow_arch"] - 0.012 * a(1) - 0.028 * a(2) + 0.018 * a(4)])
    b_out = np.array([ex + s * ew * 1.25, brow_base + 0.006 - 0.036 * a(2) + 0.014 * a(4) + 0.01 * a(1) * (1 - a(2))])
    polys[f"{side}_brow"] = np.stack([b_in, (b_in + b_mid) / 2 + [0, -0.002], b_mid, (b_mid + b_out) / 2, b_out])
    A[f"{side}_brow_inner"], A[f"{side}_brow_mid"], A[f"{side}_brow_outer"] = b_in, b_mid, b_out
    # undrawn regions (cheek, nasolabial, jaw) sit where MediaPipe FaceMesh puts them on these faces
    A[f"{side}_cheek"] = np.array([ex + s * 0.06, ey + 0.085 - 0.018 * a(6)])
    polys[f"{side}_crows"] = np.array([[outer[0] + s * 0.010, outer[1] + k * 0.010] for k in (-1, 0, 1)])


def _nose(k: _Sketch, cx: float, brow_base: float) -> tuple[float, float, float]:
    """Glabella, forehead and nose (wings widen and rise with AU9, AU10); returns (tip_y, wing half-width, wing_y)."""
    g, a, A, polys = k.g, k.a, k.A, k.polys
    ey = g["eye_y"]
    A["glabella"] = np.array([cx, brow_base - 0.004])
    A["forehead_center"] = np.array([cx, brow_base - 0.075])
    A["nose_root"] = np.array([cx, ey - 0.004])
    tip_y = ey + g["nose_len"]
    ww = g["wing_w"] * (1 + 0.25 * a(9) + 0.1 * a(10))
    wing_y = tip_y - 0.004 - 0.014 * a(9) - 0.006 * a(10)
    polys["nose"] = np.array([[cx, ey + 0.01], [cx + ww, wing_y], [cx, tip_y + 0.006 - 0.01 * a(9)], [cx - ww, wing_y]])
    A["nose_tip"] = np.array([cx, tip_y - 0.012 - 0.008 * a(9)])
    A["left_nose_wing"], A["right_nose_wing"] = np.array([cx + ww, wing_y]), np.array([cx - ww, wing_y])
    polys["nostrils"] = np.array([[cx + ww * 0.45, wing_y + 0.004], [cx - ww * 0.45, wing_y + 0.004]])
    return tip_y, ww, wing_y


def _mouth(k: _Sketch, cx: float, tip_y: float, ww: float, wing_y: float) -> None:
    """Mouth corners, lips, opening and teeth, and the nasolabial folds."""
    g, a, A, polys = k.g, k.a, k.A, k.polys
    my = tip_y + g["mouth_gap"]
    mw = g["mouth_w"] * (1 + 0.14 * a(12) + 0.25 * a(20) - 0.25 * a(23) - 0.12 * a(24) - 0.15 * a(27))
    c_dy = -0.036 * a(12) + 0.034 * a(15) + 0.006 * a(20) - 0.004 * a(17)
    gap = (0.012 * a(25) + 0.03 * a(26) + 0.045 * a(27)) * (1 - 0.75 * a(24)) * (1 - 0.4 * a(23))
    up_raise = 0.02 * a(10)
    lo_drop = 0.6 * gap + 0.012 * a(16) - 0.006 * a(17)
    lo_drop = max(lo_drop, 0.0)
    up_gap = 0.4 * gap + up_raise
    thin = (1 - 0.45 * a(23)) * (1 - 0.55 * a(24))
    t_up, t_lo = g["lip_up"] * thin, g["lip_lo"] * thin * (1 + 0.3 * a(17))
    lc = np.array([cx + mw, my + c_dy])
    rc = np.array([cx - mw, my + c_dy])
    mid_off = -c_dy * 0.9  # the middle of the mouth stays, corners move

    def lip(dy_mid):
        return _curve(rc[0], rc[1], lc[0], lc[1], mid_off + dy_mid, n=25, power=2.0)

    polys["upper_outer"] = lip(-up_gap - t_up)
    polys["upper_inner"] = lip(-up_gap)
    polys["lower_inner"] = lip(lo_drop)
    polys["lower_outer"] = lip(lo_drop + t_lo)
    teeth = min(1.0, a(10) + a(12) + a(20) + a(16))
    polys["teeth_h"] = np.array([[teeth * min(0.6 * (up_gap + lo_drop), 0.02)]])
    centre = lambda curve: curve[len(curve) // 2]  # noqa: E731
    A["left_mouth_corner"], A["right_mouth_corner"] = lc, rc
    A["upper_lip"] = (centre(polys["upper_outer"]) + centre(polys["upper_inner"])) / 2
    A["lower_lip"] = (centre(polys["lower_outer"]) + centre(polys["lower_inner"])) / 2
    A["mouth_center"] = (centre(polys["upper_inner"]) + centre(polys["lower_inner"])) / 2
    for side, s in (("left", 1.0), ("right", -1.0)):
        A[f"{side}_nasolabial"] = np.array([cx + s * (ww + 0.09), (wing_y + my) / 2 - 0.026])
        start = np.array([cx + s * (ww + 0.012), wing_y - 0.012])
        end = np.array([cx + s * (mw + 0.018), my + c_dy + 0.018])
        polys[f"{side}_fold"] = _curve(start[0], start[1], end[0], end[1], 0.0, n=9) + np.array(
            [s * 0.012, 0.0]) * (1 - np.abs(np.linspace(-1, 1, 9)) ** 2)[:, None]


def pose_matrix(pose: tuple[float, float, float, float]) -> np.ndarray:
    """2x3 similarity transform (normalised coords) for rotation/scale/translation about the centre."""
    deg, scale, tx, ty = pose
    r = math.radians(deg)
    c, s = math.cos(r) * scale, math.sin(r) * scale
    m = np.array([[c, -s, 0.0], [s, c, 0.0]])
    m[:, 2] = np.array([0.5, 0.5]) - m[:, :2] @ np.array([0.5, 0.5]) + np.array([tx, ty])
    return m


def _apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ m[:, :2].T + m[:, 2]


# --------------------------------------------------------------------------- drawing
def render_face(p: FaceParams, size: int = 112, work_size: int = WORK_SIZE,
                spurious_class: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Draw one face; returns (RGB uint8 (size, size, 3), anchors (A, 2) normalised)."""
    geo = face_geometry(p)
    m = pose_matrix(p.pose)
    W = max(int(work_size), int(size))
    px = lambda pts: [tuple(v) for v in (_apply(m, np.asarray(pts, float)) * W)]  # noqa: E731
    scale_px = p.pose[1] * W
    rng_tex = np.random.default_rng(p.background["tex_seed"])
    img = _background(p, W, rng_tex)
    d = ImageDraw.Draw(img, "RGBA")
    _draw_head(d, px, scale_px, p, geo)
    _draw_eyes(d, px, scale_px, p, geo)
    _draw_nose_and_mouth(d, px, scale_px, p, geo)
    img = img.filter(ImageFilter.GaussianBlur(1.2 * W / WORK_SIZE))
    if W != size:  # lighting, cue and noise are applied at the output size (cheaper, same look)
        img = img.resize((size, size), Image.LANCZOS)
    arr = _lighting(np.asarray(img, dtype=np.float32), p.light)
    anchors = _apply(m, geo.anchors)
    if spurious_class is not None:
        arr = draw_spurious(arr, spurious_class)
    noise_rng = np.random.default_rng(int(rng_tex.integers(2**31)))
    arr += noise_rng.standard_normal(arr.shape, dtype=np.float32) * np.float32(p.noise)
    arr += 0.5
    return np.clip(arr, 0, 255).astype(np.uint8), anchors.astype(np.float32)


def _draw_head(d: ImageDraw.ImageDraw, px: Any, scale_px: float, p: FaceParams, geo: FaceGeometry) -> None:
    """Neck, head, ears, hair, cheeks (blush, AU6 highlight), brows, glabella furrows (AU4), nose wrinkles (AU9)."""
    skin, g = p.colors["skin"], p.identity
    a = lambda au: float(p.aus.get(au, 0.0))  # noqa: E731
    d.polygon(px(geo.polys["neck"]), fill=_shade(skin, 0.85))
    d.polygon(px(geo.polys["head"]), fill=skin)
    for s in (1, -1):
        ear = np.array([[0.5 + s * (g["face_w"] - 0.008), g["eye_y"] + 0.03]])
        e = px(ear)[0]
        r = (0.022 * scale_px, 0.045 * scale_px)
        d.ellipse([e[0] - r[0], e[1] - r[1], e[0] + r[0], e[1] + r[1]], fill=_shade(skin, 0.92))
    if p.hair:
        d.polygon(px(geo.polys["hair"]), fill=p.colors["hair"])
    for side in ("left", "right"):
        c = px(geo.anchors[[ANCHOR_INDEX[f"{side}_cheek"]]])[0]
        r = 0.035 * scale_px
        d.ellipse([c[0] - r, c[1] - r * 0.75, c[0] + r, c[1] + r * 0.75],
                  fill=(220, 90, 90, int(255 * (g["blush"] * 0.4 + 0.25 * a(6)))))
    bw = max(1, int(round(g["brow_th"] * scale_px)))
    for side in ("left", "right"):
        d.line(px(geo.polys[f"{side}_brow"]), fill=p.colors["brow"], width=bw, joint="curve")
    if a(4) > 0.05:
        for s in (1, -1):
            x = 0.5 + s * 0.012
            y0 = geo.anchors[ANCHOR_INDEX["glabella"], 1]
            d.line(px([[x, y0 - 0.005], [x + s * 0.003, y0 + 0.03]]), fill=_shade(skin, 0.55, 255 * a(4)),
                   width=max(1, int(0.006 * scale_px)))
    if a(9) > 0.05:
        y_root = geo.anchors[ANCHOR_INDEX["nose_root"], 1]
        for k in range(3):
            y = y_root + 0.012 + 0.011 * k
            d.line(px(_curve(0.5 - 0.03, y, 0.5 + 0.03, y, -0.006, n=7)), fill=_shade(skin, 0.45, 255 * a(9)),
                   width=max(1, int(0.007 * scale_px)))


def _draw_eyes(d: ImageDraw.ImageDraw, px: Any, scale_px: float, p: FaceParams, geo: FaceGeometry) -> None:
    """Sclera, iris and pupil clipped to the lids, lash line; crow's feet and lower-lid bulge with AU6."""
    skin = p.colors["skin"]
    a = lambda au: float(p.aus.get(au, 0.0))  # noqa: E731
    for side in ("left", "right"):
        upper, lower = geo.polys[f"{side}_eye_upper"], geo.polys[f"{side}_eye_lower"]
        d.polygon(px(np.concatenate([upper, lower[::-1]])), fill=(245, 245, 240))
        ix, iy, ir = geo.polys[f"{side}_iris_c"][0]
        for rad, col in ((ir, p.colors["iris"]), (ir * 0.45, (15, 10, 10))):
            circ = np.stack([ix + rad * np.cos(th := np.linspace(0, 2 * math.pi, 40)), iy + rad * np.sin(th)], 1)
            circ[:, 0] = np.clip(circ[:, 0], upper[:, 0].min(), upper[:, 0].max())
            lo_y = np.interp(circ[:, 0], *_sorted_xy(lower))
            up_y = np.interp(circ[:, 0], *_sorted_xy(upper))
            circ[:, 1] = np.clip(circ[:, 1], up_y, lo_y)
            d.polygon(px(circ), fill=col)
        d.line(px(upper), fill=(25, 18, 15), width=max(2, int(0.011 * scale_px)), joint="curve")
        d.line(px(lower), fill=_shade(skin, 0.6), width=max(1, int(0.005 * scale_px)))
        if a(6) > 0.05:  # crow's feet and the lower-lid bulge
            o = geo.anchors[ANCHOR_INDEX[f"{side}_eye_outer"]]
            s = 1 if side == "left" else -1
            for k in (-1, 0, 1):
                d.line(px([o + [s * 0.008, k * 0.004], o + [s * 0.026, k * 0.012]]),
                       fill=_shade(skin, 0.6, 230 * a(6)), width=max(1, int(0.005 * scale_px)))
            d.line(px(lower + [0, 0.01]), fill=_shade(skin, 0.7, 200 * a(6)), width=max(1, int(0.005 * scale_px)))


def _draw_nose_and_mouth(d: ImageDraw.ImageDraw, px: Any, scale_px: float, p: FaceParams, geo: FaceGeometry) -> None:
    """Nose and nostrils, nasolabial folds (AU10, AU12, AU9), mouth interior, teeth, lips, chin boss (AU17)."""
    skin = p.colors["skin"]
    a = lambda au: float(p.aus.get(au, 0.0))  # noqa: E731
    d.polygon(px(geo.polys["nose"]), fill=_shade(skin, 0.82), outline=_shade(skin, 0.62))
    for nx, ny in geo.polys["nostrils"]:
        c = px([[nx, ny]])[0]
        r = 0.009 * scale_px
        d.ellipse([c[0] - r, c[1] - r * 0.6, c[0] + r, c[1] + r * 0.6], fill=_shade(skin, 0.35))
    fold = max(a(10), 0.8 * a(12), 0.6 * a(9), 0.15)
    for side in ("left", "right"):
        d.line(px(geo.polys[f"{side}_fold"]), fill=_shade(skin, 0.6, 255 * fold), width=max(1, int(0.006 * scale_px)))
    uo, ui, li, lo = (geo.polys[k] for k in ("upper_outer", "upper_inner", "lower_inner", "lower_outer"))
    d.polygon(px(np.concatenate([ui, li[::-1]])), fill=(70, 20, 25))
    teeth_h = float(geo.polys["teeth_h"][0, 0])
    if teeth_h > 0.002:
        tb = ui.copy()
        tb[:, 1] = np.minimum(ui[:, 1] + teeth_h * (1 - np.linspace(-1, 1, len(ui)) ** 2), li[:, 1])
        d.polygon(px(np.concatenate([ui, tb[::-1]])), fill=(238, 236, 225))
    d.polygon(px(np.concatenate([uo, ui[::-1]])), fill=p.colors["lip"])
    d.polygon(px(np.concatenate([li, lo[::-1]])), fill=_shade(p.colors["lip"], 1.06))
    d.line(px(ui), fill=(60, 20, 25), width=max(1, int(0.007 * scale_px)), joint="curve")
    d.line(px(li), fill=(60, 20, 25), width=max(1, int(0.004 * scale_px)))
    if a(17) > 0.05:  # chin boss
        d.line(px(geo.polys["chin_mark"]), fill=_shade(skin, 0.65, 220 * a(17)), width=max(1, int(0.006 * scale_px)))


def _sorted_xy(curve: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    o = np.argsort(curve[:, 0])
    return curve[o, 0], curve[o, 1]


def _background(p: FaceParams, W: int, rng: np.random.Generator) -> Image.Image:
    b = p.background
    yy, xx = _grid(W)
    t = (np.cos(b["angle"]) * (xx - 0.5) + np.sin(b["angle"]) * (yy - 0.5)) + 0.5
    t = np.clip(t, 0, 1)[..., None]
    arr = np.asarray(b["c1"], np.float32) * (1 - t) + np.asarray(b["c2"], np.float32) * t
    if b["texture"] > 0:
        small = rng.normal(0, b["texture"], (12, 12, 1)).astype(np.float32)
        tex = np.asarray(Image.fromarray(small[..., 0]).resize((W, W), Image.BICUBIC))[..., None]
        arr = arr + tex
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img, "RGBA")
    for _ in range(b["blobs"]):  # soft shapes in the background (never in the border cue colours' places)
        cx, cy = rng.uniform(0.15, 0.85, 2) * W
        r = rng.uniform(0.05, 0.15) * W
        col = tuple(int(v) for v in rng.uniform(40, 220, 3)) + (70,)
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)
    return img


@functools.lru_cache(maxsize=8)
def _grid(W: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:W, 0:W].astype(np.float32) / W
    return yy, xx


def _lighting(arr: np.ndarray, light: tuple[float, float]) -> np.ndarray:
    angle, strength = light
    yy, xx = _grid(arr.shape[0])
    g = 1.0 + strength * (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5)) * 2
    return arr * g[..., None].astype(np.float32)


def _cue_pixels(class_id: int, h: int, w: int) -> tuple[int, int, int, int]:
    """Pixel rows y0:y1 and columns x0:x1 of class `class_id`'s cue square in an h x w image."""
    (cx, cy), _ = SPURIOUS_CUES[class_id % len(SPURIOUS_CUES)]
    half = SPURIOUS_SIZE / 2
    x0, x1 = int(round((cx - half) * w)), int(round((cx + half) * w))
    y0, y1 = int(round((cy - half) * h)), int(round((cy + half) * h))
    return max(0, y0), y1, max(0, x0), x1


def draw_spurious(arr: np.ndarray, class_id: int) -> np.ndarray:
    """Paint class `class_id`'s border cue (a coloured square) onto a float or uint8 RGB array."""
    y0, y1, x0, x1 = _cue_pixels(class_id, *arr.shape[:2])
    out = arr.astype(np.float32, copy=True)
    out[y0:y1, x0:x1] = np.asarray(SPURIOUS_CUES[class_id % len(SPURIOUS_CUES)][1], np.float32)
    return out


def cue_coverage(class_id: int, size: int | Sequence[int], image_size: int) -> np.ndarray:
    """The share of each cell of an (h, w) map (a layer's attention, a CAM) that class `class_id`'s cue
    square covers in an image of `image_size` px: float32 (h, w) in [0, 1]. Cells split the image's pixels as
    `np.array_split` does (equal cells when h divides the size)."""
    h, w = (size, size) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))
    return _cue_coverage(int(class_id), h, w, int(image_size)).copy()


@functools.lru_cache(maxsize=256)
def _cue_coverage(class_id: int, h: int, w: int, image_size: int) -> np.ndarray:
    y0, y1, x0, x1 = _cue_pixels(class_id, image_size, image_size)
    mask = np.zeros((image_size, image_size), np.float64)
    mask[y0:y1, x0:x1] = 1.0
    rows = np.cumsum([0] + [len(r) for r in np.array_split(np.arange(image_size), h)])
    cols = np.cumsum([0] + [len(c) for c in np.array_split(np.arange(image_size), w)])
    sums = np.add.reduceat(np.add.reduceat(mask, rows[:-1], axis=0), cols[:-1], axis=1)
    return (sums / np.outer(np.diff(rows), np.diff(cols))).astype(np.float32)


def cue_energy(maps: np.ndarray, class_ids: Sequence[int], image_size: int) -> np.ndarray:
    """Per map, the share of its (non-negative part's) energy on the cue square of `class_ids[i]`:
    maps (N, h, w) -> (N,) in [0, 1] (NaN for an all-zero map). The shortcut test's measure."""
    maps = np.clip(np.asarray(maps, np.float64), 0, None)
    out = np.full(len(maps), np.nan)
    for i, (m, c) in enumerate(zip(maps, class_ids)):
        total = m.sum()
        if total > 0:
            out[i] = float((m * cue_coverage(int(c), m.shape, image_size)).sum() / total)
    return out


def spurious_cue_present(image: np.ndarray, class_id: int, tol: float = 40.0) -> bool:
    """True if the cue of `class_id` is visible in an RGB uint8 image (mean colour of its square)."""
    (cx, cy), col = SPURIOUS_CUES[class_id % len(SPURIOUS_CUES)]
    h, w = image.shape[:2]
    q = SPURIOUS_SIZE / 4
    patch = image[int((cy - q) * h):int((cy + q) * h) + 1, int((cx - q) * w):int((cx + q) * w) + 1]
    return bool(np.abs(patch.reshape(-1, 3).mean(0) - np.asarray(col, float)).max() < tol)


# --------------------------------------------------------------------------- one sample
@dataclass
class SyntheticSample:
    """One generated face with its ground truth."""

    image: np.ndarray  # (S, S, 3) uint8
    anchors: np.ndarray  # (A, 2) float32, normalised, subject's left/right
    label: int
    expression: str
    aus: dict[int, float]
    spurious: int  # class id whose cue was drawn, -1 for none
    params: FaceParams


def image_rng(seed: int, split: str, label: int, index: int) -> np.random.Generator:
    """Independent random stream per image: the same image whatever order or process builds it."""
    return np.random.default_rng([int(seed), SPLITS.index(split), int(label), int(index)])


def generate_sample(expression: str, seed: int = 0, split: str = "train", index: int = 0,
                    config: SyntheticConfig | None = None) -> SyntheticSample:
    """Generate one face deterministically from (seed, split, expression, index).

    `label` is the index in SYNTHETIC_EXPRESSIONS (basic ids unchanged, compounds after);
    spurious cues exist for the 7 basic classes and are reused cyclically by compounds.
    """
    cfg = config or SyntheticConfig(seed=seed)
    check_choice("split", split, SPLITS)
    label = SYNTHETIC_EXPRESSIONS.index(check_choice("expression", expression, SYNTHETIC_EXPRESSIONS))
    rng = image_rng(seed, split, label, index)
    params = sample_face(expression, rng, cfg)
    spurious = -1
    if cfg.spurious_p > 0 and rng.random() < cfg.spurious_p:
        if split == "train":
            spurious = label
        elif cfg.spurious_eval == "shuffled":
            spurious = int(rng.integers(len(EXPRESSIONS)))
    image, anchors = render_face(params, cfg.image_size, spurious_class=spurious if spurious >= 0 else None)
    return SyntheticSample(image=image, anchors=anchors, label=label, expression=expression, aus=params.aus,
                           spurious=spurious, params=params)


# --------------------------------------------------------------------------- the on-disk set
MANIFEST = "manifest.csv"
TRUTH = "truth.npz"
CONFIG_FILE = "synthetic_config.json"


def default_root(config: SyntheticConfig) -> Path:
    """Default cache folder of a synthetic set: <repo>/.cache/data/synthetic-<hash>."""
    return REPO_ROOT / ".cache" / "data" / f"synthetic-{config.key()}"


def is_complete(root: str | os.PathLike) -> bool:
    root = Path(root)
    return all((root / f).exists() for f in (MANIFEST, TRUTH, CONFIG_FILE))


def build_synthetic(config: SyntheticConfig | None = None, root: str | os.PathLike | None = None,
                    progress: bool = True, overwrite: bool = False) -> Path:
    """Generate the set into `root` (ImageFolder layout + manifest.csv + truth.npz); reuse it if complete.

    Layout: `<root>/<split>/<expression>/<split>_<expression>_<index>.png`, `manifest.csv`
    (path,label,split,spurious; paths relative to root), `truth.npz` (paths, anchors (N,A,2),
    au_ids, au_intensity (N, n_aus), labels, spurious) and `synthetic_config.json`. The folder
    is written under a temporary name and renamed when complete, so a killed run never leaves
    a half set behind.
    """
    cfg = config or SyntheticConfig()
    root = Path(root) if root is not None else default_root(cfg)
    # one builder at a time per folder: parallel sweep workers wait, then reuse the set
    with file_lock(root.parent / f".{root.name}.lock"):
        return _build_locked(cfg, root, progress, overwrite)


def _build_locked(cfg: SyntheticConfig, root: Path, progress: bool, overwrite: bool) -> Path:
    import pandas as pd

    if is_complete(root) and not overwrite:
        stored = json.loads((root / CONFIG_FILE).read_text())
        if stored.get("key") == cfg.key():
            return root
        raise ConfigError(f"{root} holds a synthetic set of another configuration (key {stored.get('key')} != "
                          f"{cfg.key()}); pass another root or overwrite=True")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        jobs = [(split, e, i) for split, n in cfg.n_per_class.items() for e in cfg.expressions for i in range(n)]
        rows, anchors, intens, labels, spur = [], [], [], [], []
        t0 = time.perf_counter()
        for split, e, i in progress_bar(jobs, desc="synthetic faces", disable=not progress):
            s = generate_sample(e, cfg.seed, split, i, cfg)
            rel = f"{split}/{e}/{split}_{e}_{i:05d}.png"
            (tmp / split / e).mkdir(parents=True, exist_ok=True)
            Image.fromarray(s.image).save(tmp / rel, compress_level=1)
            rows.append({"path": rel, "label": e, "split": split, "spurious": s.spurious})
            anchors.append(s.anchors)
            intens.append([s.aus[a] for a in ALL_AUS])
            labels.append(s.label)
            spur.append(s.spurious)
        elapsed = time.perf_counter() - t0
        frame = pd.DataFrame(rows, columns=["path", "label", "split", "spurious"])
        atomic_write_csv(tmp / MANIFEST, frame)
        atomic_save_npz(tmp / TRUTH, paths=np.array([r["path"] for r in rows]),
                        anchors=np.asarray(anchors, np.float32).reshape(len(rows), len(ANCHORS), 2),
                        au_ids=np.asarray(ALL_AUS, np.int64),
                        au_intensity=np.asarray(intens, np.float32).reshape(len(rows), len(ALL_AUS)),
                        labels=np.asarray(labels, np.int64), spurious=np.asarray(spur, np.int64),
                        anchor_names=np.asarray(ANCHORS))
        atomic_write_json(tmp / CONFIG_FILE, {"key": cfg.key(), "config": dataclasses.asdict(cfg),
                                               "generator_version": GENERATOR_VERSION, "n_images": len(rows),
                                               "generation_s": elapsed})
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def load_truth(root: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Ground truth of a built set keyed by relative path: {"anchors", "aus" {AU: intensity}, "spurious"}."""
    with np.load(Path(root) / TRUTH, allow_pickle=False) as z:
        paths, anchors, au_ids, inten, spur = (z["paths"], z["anchors"], z["au_ids"], z["au_intensity"], z["spurious"])
    return {str(p): {"anchors": anchors[i], "aus": {int(a): float(v) for a, v in zip(au_ids, inten[i])},
                     "spurious": int(spur[i])} for i, p in enumerate(paths)}


def true_au_intensities(config: SyntheticConfig, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, len(ALL_AUS)) true AU intensities the generator draws for a split, and the (N,) labels, in the
    order of build_synthetic, without rendering any image."""
    feats, labels = [], []
    for e in config.expressions:
        label = SYNTHETIC_EXPRESSIONS.index(e)
        for i in range(config.n_per_class.get(split, 0)):
            params = sample_face(e, image_rng(config.seed, split, label, i), config)
            feats.append([params.aus.get(a, 0.0) for a in ALL_AUS])
            labels.append(config.expressions.index(e))
    return np.asarray(feats, np.float64).reshape(-1, len(ALL_AUS)), np.asarray(labels, np.int64)


def oracle_accuracy(config: SyntheticConfig, split: str = "test") -> float:
    """Test accuracy of the set's ceiling: a logistic regression on the true AU intensities (train split),
    the information that the faces carry about the expression, read without any vision."""
    from sklearn.linear_model import LogisticRegression

    x_train, y_train = true_au_intensities(config, "train")
    x_test, y_test = true_au_intensities(config, split)
    clf = LogisticRegression(max_iter=2000, C=10.0).fit(x_train, y_train)
    return float((clf.predict(x_test) == y_test).mean())


# --------------------------------------------------------------------------- figure
def plot_sample_grid(path: str | os.PathLike, seed: int = 0, image_size: int = 112, n_rows: int = 2,
                     show_anchors: bool = False) -> Path:
    """Figure of all 7 expressions (columns): for each of `n_rows` identities, the face and its AU map.

    The AU map is the expression's codebook heatmap rendered from the ground-truth anchors;
    the title lists the AUs that are truly active (intensity >= 0.2).
    """
    import matplotlib.pyplot as plt

    cols = len(EXPRESSIONS)
    fig, axes = plt.subplots(2 * n_rows, cols, figsize=(cols * 1.9, 2 * n_rows * 2.05))
    for r in range(n_rows):
        for c, e in enumerate(EXPRESSIONS):
            s = generate_sample(e, seed=seed, split="test", index=r, config=SyntheticConfig(seed=seed, image_size=image_size))
            ax = axes[2 * r, c]
            ax.imshow(s.image)
            if show_anchors:
                ax.scatter(s.anchors[:, 0] * image_size - 0.5, s.anchors[:, 1] * image_size - 0.5, s=3, c="lime")
            active = [a for a, v in s.aus.items() if v >= 0.2]
            ax.set_title(f"{e}\nAU " + ",".join(map(str, active)) if active else f"{e}\n(no AU)", fontsize=7)
            ax2 = axes[2 * r + 1, c]
            hm = combine_aus(s.anchors, CODEBOOK[e], image_size)
            ax2.imshow(s.image.mean(axis=2), cmap="gray")
            ax2.imshow(hm, cmap="jet", alpha=0.45 if hm.max() > 0 else 0.0, vmin=0, vmax=1)
            ax2.set_title(f"AU map {'+'.join(map(str, CODEBOOK[e])) or 'none'}", fontsize=6)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"Synthetic expressions (seed {seed}, {image_size} px): face and codebook AU map", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=130, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path
