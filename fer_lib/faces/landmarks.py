"""Facial landmarks: detection (MediaPipe FaceMesh), named anchors, and an on-disk cache.

Every landmark scheme (MediaPipe's 478 points, dlib's 68, a dataset's own points, or the
synthetic generator's exact anchors) is an adapter onto one set of named facial anchors
(`ANCHORS`). AU regions (fer_lib.faces.au) are defined on those names only, so a new detector
plugs in by writing one `LandmarkScheme`.

Conventions
-----------
* Coordinates are normalised to the image: x in [0, 1] left to right, y in [0, 1] top to
  bottom, so the same landmarks render AU maps at any resolution.
* Photos are read upright (`read_image`: EXIF orientation applied; CMYK, 16-bit, palette and
  animated images converted, the first frame of an animation noted; huge JPEGs decoded
  downscaled). `MediaPipeFaceMesh` finds one face in a face crop (the datasets' images);
  `detect_faces` / `FaceFinder` find every face of a photo (full-range face detector over the
  photo and its tiles, then FaceMesh per face), largest first, the largest being the face
  used wherever one face is wanted.
* "left"/"right" are the *subject's* anatomical sides (the expert's convention: AU12 left
  is the subject's left lip corner, which appears on the image's right in a frontal
  photo). A horizontal flip mirrors x and swaps every left_/right_ pair (`flip_anchors`).
"""
from __future__ import annotations

import dataclasses
import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fer_lib.utils import UserError, atomic_write_bytes, atomic_write_json, progress_bar, sha256_bytes

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- anchors
ANCHORS: tuple[str, ...] = (
    "forehead_center",
    "glabella",
    "left_brow_inner", "left_brow_mid", "left_brow_outer",
    "right_brow_inner", "right_brow_mid", "right_brow_outer",
    "left_eye_inner", "left_eye_outer", "left_upper_lid", "left_lower_lid", "left_eye_center",
    "right_eye_inner", "right_eye_outer", "right_upper_lid", "right_lower_lid", "right_eye_center",
    "nose_root", "nose_tip", "left_nose_wing", "right_nose_wing",
    "left_cheek", "right_cheek",
    "left_nasolabial", "right_nasolabial",
    "left_mouth_corner", "right_mouth_corner",
    "upper_lip", "lower_lip", "mouth_center",
    "chin", "left_jaw", "right_jaw",
)
ANCHOR_INDEX: dict[str, int] = {name: i for i, name in enumerate(ANCHORS)}


def _mirror_name(name: str) -> str:
    if name.startswith("left_"):
        return "right_" + name[5:]
    if name.startswith("right_"):
        return "left_" + name[6:]
    return name


#: permutation that maps anchors to their mirror images (used by horizontal flips)
FLIP_PERMUTATION: np.ndarray = np.array([ANCHOR_INDEX[_mirror_name(n)] for n in ANCHORS], dtype=np.int64)


def flip_anchors(anchors: np.ndarray) -> np.ndarray:
    """Mirror normalised anchors (..., A, 2) horizontally: x -> 1 - x and left/right swapped."""
    out = np.asarray(anchors, dtype=np.float32)[..., FLIP_PERMUTATION, :].copy()
    out[..., 0] = 1.0 - out[..., 0]
    return out


# --------------------------------------------------------------------------- schemes
@dataclass(frozen=True)
class LandmarkScheme:
    """Adapter from a detector's point layout to the named anchors.

    `anchor_points[name]` lists the point indices whose mean is that anchor.
    """

    name: str
    num_points: int
    anchor_points: Mapping[str, tuple[int, ...]]

    def __post_init__(self) -> None:
        missing = [a for a in ANCHORS if a not in self.anchor_points]
        if missing:
            raise ValueError(f"scheme {self.name!r} lacks anchors: {missing}")
        bad = [i for idx in self.anchor_points.values() for i in idx if not 0 <= i < self.num_points]
        if bad:
            raise ValueError(f"scheme {self.name!r} refers to points outside 0..{self.num_points - 1}: {bad}")

    def to_anchors(self, points: np.ndarray) -> np.ndarray:
        """(..., num_points, 2) -> (..., len(ANCHORS), 2) float32."""
        points = np.asarray(points, dtype=np.float32)
        if points.shape[-2] != self.num_points:
            raise ValueError(f"scheme {self.name!r} expects {self.num_points} points, got {points.shape[-2]}")
        return np.stack([points[..., list(self.anchor_points[a]), :].mean(axis=-2) for a in ANCHORS], axis=-2)


# MediaPipe FaceMesh (468 mesh points + 10 iris points with refine_landmarks=True).
# Subject's right eye is MediaPipe's 33/133 side (image left in a frontal photo).
MEDIAPIPE_478 = LandmarkScheme(
    name="mediapipe478",
    num_points=478,
    anchor_points={
        "forehead_center": (151,),
        "glabella": (9,),
        "right_brow_inner": (107, 55), "right_brow_mid": (105, 52), "right_brow_outer": (70, 46),
        "left_brow_inner": (336, 285), "left_brow_mid": (334, 282), "left_brow_outer": (300, 276),
        "right_eye_inner": (133,), "right_eye_outer": (33,), "right_upper_lid": (159, 158, 160),
        "right_lower_lid": (145, 144, 153), "right_eye_center": (468,),
        "left_eye_inner": (362,), "left_eye_outer": (263,), "left_upper_lid": (386, 385, 387),
        "left_lower_lid": (374, 373, 380), "left_eye_center": (473,),
        "nose_root": (168,), "nose_tip": (1,), "right_nose_wing": (129,), "left_nose_wing": (358,),
        "right_cheek": (117, 118, 50), "left_cheek": (346, 347, 280),
        "right_nasolabial": (206, 205), "left_nasolabial": (426, 425),
        "right_mouth_corner": (61,), "left_mouth_corner": (291,),
        "upper_lip": (0, 13), "lower_lip": (14, 17), "mouth_center": (13, 14),
        "chin": (152, 175), "right_jaw": (172, 136), "left_jaw": (397, 365),
    },
)

# dlib / iBUG 68 points (0-based). Points 0-16 jaw, 17-21 subject's right brow, 22-26 left
# brow, 27-35 nose, 36-41 right eye, 42-47 left eye, 48-67 mouth.
DLIB_68 = LandmarkScheme(
    name="dlib68",
    num_points=68,
    anchor_points={
        "forehead_center": (19, 24, 21, 22),  # dlib has no forehead point: the brows' centre stands in
        "glabella": (21, 22),
        "right_brow_inner": (21,), "right_brow_mid": (19,), "right_brow_outer": (17,),
        "left_brow_inner": (22,), "left_brow_mid": (24,), "left_brow_outer": (26,),
        "right_eye_inner": (39,), "right_eye_outer": (36,), "right_upper_lid": (37, 38),
        "right_lower_lid": (40, 41), "right_eye_center": (36, 37, 38, 39, 40, 41),
        "left_eye_inner": (42,), "left_eye_outer": (45,), "left_upper_lid": (43, 44),
        "left_lower_lid": (46, 47), "left_eye_center": (42, 43, 44, 45, 46, 47),
        "nose_root": (27,), "nose_tip": (30,), "right_nose_wing": (31,), "left_nose_wing": (35,),
        "right_cheek": (1, 2, 31, 41), "left_cheek": (15, 14, 35, 46),
        "right_nasolabial": (31, 48), "left_nasolabial": (35, 54),
        "right_mouth_corner": (48,), "left_mouth_corner": (54,),
        "upper_lip": (51, 62), "lower_lip": (57, 66), "mouth_center": (62, 66),
        "chin": (8,), "right_jaw": (4, 5), "left_jaw": (12, 11),
    },
)

#: dlib-68 points from MediaPipe's 478 (the mean of the listed points), for the reference code's AU maps
DLIB68_FROM_MEDIAPIPE: tuple[tuple[int, ...], ...] = (
    (127,), (234,), (93,), (132, 58), (58, 172), (136,), (150,), (176,), (152,), (400,), (379,), (365,),
    (397, 288), (361,), (323,), (454,), (356,),                              # 0-16 jaw
    (70,), (63,), (105,), (66,), (107,), (336,), (296,), (334,), (293,), (300,),  # 17-26 brows
    (168, 6), (197, 195), (5,), (4,), (75,), (97,), (2,), (326,), (305,),     # 27-35 nose
    (33,), (160,), (158,), (133,), (153,), (144,), (362,), (385,), (387,), (263,), (373,), (380,),  # 36-47 eyes
    (61,), (40,), (37,), (0,), (267,), (270,), (291,), (321,), (314,), (17,), (84,), (91,),  # 48-59 outer lips
    (78,), (81,), (13,), (311,), (308,), (402,), (14,), (178,),               # 60-67 inner lips
)
#: the dlib-68 point each point becomes in a horizontally mirrored face
DLIB68_MIRROR: tuple[int, ...] = (
    tuple(range(16, -1, -1)) + (26, 25, 24, 23, 22, 21, 20, 19, 18, 17) + (27, 28, 29, 30, 35, 34, 33, 32, 31)
    + (45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40)
    + (54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55) + (64, 63, 62, 61, 60, 67, 66, 65))


def dlib68_points(landmarks: "FaceLandmarks") -> np.ndarray:
    """(68, 2) normalised dlib-68 positions of a face found by MediaPipe (478 points) or dlib (68)."""
    if landmarks.scheme == "dlib68":
        return np.asarray(landmarks.points, np.float32)
    if landmarks.scheme != "mediapipe478":
        raise ValueError(f"dlib-68 positions come from the mediapipe478 or dlib68 scheme, not {landmarks.scheme!r}")
    pts = np.asarray(landmarks.points, np.float32)
    return np.stack([pts[list(idx)].mean(axis=0) for idx in DLIB68_FROM_MEDIAPIPE])


#: identity scheme for points that already are the named anchors (synthetic ground truth)
ANCHOR_SCHEME = LandmarkScheme(
    name="anchors", num_points=len(ANCHORS), anchor_points={a: (i,) for i, a in enumerate(ANCHORS)}
)

SCHEMES: dict[str, LandmarkScheme] = {s.name: s for s in (MEDIAPIPE_478, DLIB_68, ANCHOR_SCHEME)}


def get_scheme(name: str) -> LandmarkScheme:
    if name not in SCHEMES:
        raise ValueError(f"unknown landmark scheme {name!r}; valid: {', '.join(SCHEMES)}")
    return SCHEMES[name]


@dataclass
class FaceLandmarks:
    """Landmarks of one face: normalised points in a scheme, plus the source image size."""

    points: np.ndarray  # (N, 2) float32, normalised
    scheme: str
    image_size: tuple[int, int]  # (width, height) of the image they were found on

    def anchors(self) -> np.ndarray:
        """(len(ANCHORS), 2) normalised anchor coordinates."""
        return get_scheme(self.scheme).to_anchors(self.points)

    def anchor(self, name: str) -> np.ndarray:
        return self.anchors()[ANCHOR_INDEX[name]]

    def pixels(self) -> np.ndarray:
        """Points in pixel coordinates of the source image."""
        w, h = self.image_size
        return self.points * np.array([w, h], dtype=np.float32)


# --------------------------------------------------------------------------- images
class ImageError(UserError, ValueError):
    """An image that cannot be used, with the reason (missing file, not an image, truncated...)."""


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
MAX_IMAGE_PIXELS = 80_000_000
#: the EXIF tag that says how a stored photo must be rotated/mirrored to be upright
EXIF_ORIENTATION = 0x0112


def to_rgb_uint8(image: Image.Image) -> np.ndarray:
    """Convert any PIL mode (L, LA, P, RGBA, I;16, I, F, CMYK) to an RGB uint8 array.

    16-bit and 32-bit integer images are scaled by their bit depth (65535 -> 255), not
    stretched, so a dark photo stays dark; float images in [0, 1] are scaled by 255; other
    ranges (and integer images outside 0..65535) are min-max scaled. Transparent pixels
    are composited on white.
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if image.mode.startswith("I;16") or (image.mode == "I" and lo >= 0 and hi <= 65535):
            arr = arr / 257.0 if hi > 255 or image.mode.startswith("I;16") else arr
        elif image.mode == "F" and lo >= 0 and hi <= 1.0:
            arr = arr * 255.0
        else:
            arr = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        image = Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def _downscale(image: Image.Image, max_side: int | None) -> Image.Image:
    """The image with its longer side at most `max_side` (aspect kept; a no-op for None or small images)."""
    if max_side is None or max(image.size) <= max_side:
        return image
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    if image.mode not in ("RGB", "RGBA", "L", "LA"):
        image = Image.fromarray(to_rgb_uint8(image))
    return image.resize(size, Image.BILINEAR, reducing_gap=2.0)


def read_image(path: str | os.PathLike, max_pixels: int = MAX_IMAGE_PIXELS, max_side: int | None = None
               ) -> tuple[np.ndarray, list[str]]:
    """Read an image file upright as RGB uint8 (H, W, 3) plus notes on what was done; ImageError if unusable.

    The EXIF orientation tag is applied (phones store photos rotated and tag them), so faces
    are upright. An animated image (GIF, WebP, APNG) gives its first frame, and a note says
    so. With `max_side`, the image is downscaled to that longer side; a JPEG is then decoded
    at a reduced scale (libjpeg's DCT scaling), so memory stays bounded even for photos above
    `max_pixels`, which are otherwise refused.
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(f"image file does not exist: {path}")
    if path.is_dir():
        raise ImageError(f"expected an image file, got a directory: {path}")
    if path.stat().st_size == 0:
        raise ImageError(f"image file is empty (0 bytes): {path}")
    notes: list[str] = []
    try:
        with Image.open(path) as im:
            full = im.size
            if max_side is not None and im.format == "JPEG" and max(im.size) > max_side:
                im.draft("RGB" if im.mode in ("RGB", "CMYK", "YCbCr") else im.mode,
                         (max(1, im.width * max_side // max(im.size)), max(1, im.height * max_side // max(im.size))))
            if im.width * im.height > max_pixels:
                raise ImageError(
                    f"image too large ({full[0]}x{full[1]} > {max_pixels} pixels): {path}; "
                    "resize it or raise max_pixels" + ("" if max_side is not None else " (or read it with max_side=...)")
                )
            if getattr(im, "is_animated", False) and getattr(im, "n_frames", 1) > 1:
                notes.append(f"animated image with {im.n_frames} frames: the first frame is used")
                im.seek(0)
            im.load()
            orientation = im.getexif().get(EXIF_ORIENTATION, 1)
            upright = ImageOps.exif_transpose(im) if orientation not in (None, 1) else im
            if orientation not in (None, 1):
                notes.append(f"EXIF orientation {orientation} applied")
            if im.mode == "CMYK":
                notes.append("CMYK image converted to RGB")
            small = _downscale(upright, max_side)
            if small.size != upright.size or im.size != full:
                notes.append(f"downscaled from {full[0]}x{full[1]} to {small.size[0]}x{small.size[1]}")
            return to_rgb_uint8(small), notes
    except UnidentifiedImageError:
        raise ImageError(
            f"not a readable image: {path} (accepted formats: {', '.join(IMAGE_EXTENSIONS)})"
        ) from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image too large: {path}: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        if isinstance(exc, ImageError):
            raise
        raise ImageError(f"corrupt or truncated image: {path}: {exc}") from None


def load_image(path: str | os.PathLike, max_pixels: int = MAX_IMAGE_PIXELS, max_side: int | None = None) -> np.ndarray:
    """Read an image file upright (EXIF orientation applied) as RGB uint8 (H, W, 3), or raise ImageError.

    See `read_image` for animated images and `max_side`; its notes are logged at INFO.
    """
    rgb, notes = read_image(path, max_pixels, max_side)
    for note in notes:
        log.info("%s: %s", path, note)
    return rgb


def as_rgb_array(image: np.ndarray | Image.Image | str | os.PathLike) -> np.ndarray:
    """Accept a path, a PIL image or an array (gray HxW, HxWx1, RGB, RGBA; uint8 or float in [0,1])."""
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    if isinstance(image, Image.Image):
        if image.getexif().get(EXIF_ORIENTATION, 1) not in (None, 1):
            image = ImageOps.exif_transpose(image)  # a PIL image opened by the caller: upright it too
        return to_rgb_uint8(image)
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ImageError(f"expected an image array of shape HxW, HxWx3 or HxWx4, got {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and arr.size and float(np.nanmax(arr)) <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.nan_to_num(arr), 0, 255).round().astype(np.uint8)
    return np.ascontiguousarray(arr)


# --------------------------------------------------------------------------- detectors
class LandmarkDetector(Protocol):
    """Anything that finds one face's landmarks in an RGB uint8 image."""

    scheme: str

    @property
    def cache_key(self) -> str:  # identifies detector + settings in the cache
        ...

    def detect(self, image: np.ndarray) -> FaceLandmarks | None:
        ...


class MediaPipeFaceMesh:
    """MediaPipe FaceMesh on static images: 478 points (refined iris), one face.

    Small images (FER2013 is 48 px) are upscaled to `min_size` before detection, which
    raises the detection rate; coordinates are normalised so nothing needs rescaling.
    """

    scheme = "mediapipe478"

    def __init__(self, min_size: int = 192, min_detection_confidence: float = 0.5) -> None:
        self.min_size = int(min_size)
        self.min_detection_confidence = float(min_detection_confidence)
        self._mesh = None
        self._pid: int | None = None

    @property
    def cache_key(self) -> str:
        return f"mediapipe478-v1-min{self.min_size}-conf{self.min_detection_confidence:g}"

    def _get_mesh(self):
        if self._mesh is None or self._pid != os.getpid():  # FaceMesh is not fork-safe
            try:
                from mediapipe.python.solutions import face_mesh
            except ImportError as exc:  # pragma: no cover - dependency problem
                raise RuntimeError(
                    "mediapipe FaceMesh is not available; install mediapipe==0.10.21 "
                    "(the newest release that bundles the FaceMesh model)"
                ) from exc
            self._mesh = face_mesh.FaceMesh(
                static_image_mode=True, max_num_faces=1, refine_landmarks=True,
                min_detection_confidence=self.min_detection_confidence,
            )
            self._pid = os.getpid()
        return self._mesh

    def detect(self, image: np.ndarray) -> FaceLandmarks | None:
        rgb = as_rgb_array(image)
        h, w = rgb.shape[:2]
        work = rgb
        if min(h, w) < self.min_size:
            scale = self.min_size / min(h, w)
            work = np.asarray(
                Image.fromarray(rgb).resize((round(w * scale), round(h * scale)), Image.BICUBIC)
            )
        result = self._get_mesh().process(np.ascontiguousarray(work))
        if not result.multi_face_landmarks:
            return None
        lms = result.multi_face_landmarks[0].landmark
        points = np.array([[p.x, p.y] for p in lms], dtype=np.float32)
        if points.shape[0] != 478:
            return None
        return FaceLandmarks(points=points, scheme=self.scheme, image_size=(w, h))

    def close(self) -> None:
        if self._mesh is not None:
            self._mesh.close()
            self._mesh = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_mesh"] = None
        state["_pid"] = None
        return state


# --------------------------------------------------------------------------- several faces per photo
#: photos are downscaled to this longer side before face detection (memory and time stay bounded)
DETECT_MAX_SIDE = 2048
#: the smallest face (pixels, landmark box side) `detect_faces` is built to find
MIN_FACE = 48


@dataclass(frozen=True)
class FaceBox:
    """A face candidate of the face detector: box (x0, y0, x1, y1) in pixels of the image searched, and its score."""

    x0: float
    y0: float
    x1: float
    y1: float
    score: float = 1.0

    @property
    def area(self) -> float:
        return max(0.0, self.x1 - self.x0) * max(0.0, self.y1 - self.y0)

    def iou(self, other: "FaceBox") -> float:
        """Intersection over union with another box."""
        w = min(self.x1, other.x1) - max(self.x0, other.x0)
        h = min(self.y1, other.y1) - max(self.y0, other.y0)
        inter = max(0.0, w) * max(0.0, h)
        union = self.area + other.area - inter
        return inter / union if union > 0 else 0.0

    def contains(self, x: float, y: float, grow: float = 0.0) -> bool:
        """Whether (x, y) lies inside the box grown by `grow` of its size on each side."""
        gw, gh = grow * (self.x1 - self.x0), grow * (self.y1 - self.y0)
        return self.x0 - gw <= x <= self.x1 + gw and self.y0 - gh <= y <= self.y1 + gh


def non_max_suppression(boxes: Sequence[FaceBox], iou: float = 0.3) -> list[FaceBox]:
    """Keep the best-scoring box of every group of boxes that overlap by more than `iou` (highest score first)."""
    kept: list[FaceBox] = []
    for box in sorted(boxes, key=lambda b: -b.score):
        if all(box.iou(k) <= iou for k in kept):
            kept.append(box)
    return kept


def _tiles(length: int, tile: int) -> list[int]:
    """Start offsets of tiles of side `tile` covering 0..length with half-tile overlap."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, tile // 2))
    return starts + [length - tile]


class MediaPipeFaceDetector:
    """MediaPipe's full-range face detector (BlazeFace, `model_selection=1`) over the photo and overlapping tiles.

    The detector sees a 192 px input, so on a whole group photo a small face is a few pixels
    and is missed. It therefore also runs on square tiles (half-tile overlap) whose side
    halves from the photo's shorter side down to `tile_factor * min_face` (8 x 48 = 384 px:
    a 48 px face is then 1/8 of the tile), and overlapping boxes are merged (non-maximum
    suppression). Boxes are in pixels of the image given.
    """

    def __init__(self, min_face: int = MIN_FACE, min_confidence: float = 0.5, tile_factor: int = 8,
                 nms_iou: float = 0.3) -> None:
        self.min_face = int(min_face)
        self.min_confidence = float(min_confidence)
        self.tile_factor = int(tile_factor)
        self.nms_iou = float(nms_iou)
        self._detector = None
        self._pid: int | None = None

    @property
    def cache_key(self) -> str:
        return f"blazefull-v1-min{self.min_face}-conf{self.min_confidence:g}-t{self.tile_factor}"

    def _get(self):
        if self._detector is None or self._pid != os.getpid():  # not fork-safe, like FaceMesh
            try:
                from mediapipe.python.solutions import face_detection
            except ImportError as exc:  # pragma: no cover - dependency problem
                raise RuntimeError("mediapipe face detection is not available; install mediapipe==0.10.21") from exc
            self._detector = face_detection.FaceDetection(model_selection=1,
                                                          min_detection_confidence=self.min_confidence)
            self._pid = os.getpid()
        return self._detector

    def _run(self, rgb: np.ndarray, ox: int, oy: int) -> list[FaceBox]:
        result = self._get().process(np.ascontiguousarray(rgb))
        h, w = rgb.shape[:2]
        out = []
        for det in result.detections or []:
            b = det.location_data.relative_bounding_box
            x0, y0 = ox + b.xmin * w, oy + b.ymin * h
            out.append(FaceBox(x0, y0, x0 + b.width * w, y0 + b.height * h, float(det.score[0])))
        return out

    def tile_sizes(self, height: int, width: int) -> list[int]:
        """Tile sides searched after the whole image: halving from the shorter side while >= tile_factor * min_face."""
        sizes, side = [], min(height, width)
        while side >= self.tile_factor * self.min_face:
            sizes.append(side)
            side //= 2
        return sizes

    def boxes(self, image: Any) -> list[FaceBox]:
        """Every face candidate of the image (pixels), best score first."""
        rgb = as_rgb_array(image)
        h, w = rgb.shape[:2]
        found = self._run(rgb, 0, 0)
        for tile in self.tile_sizes(h, w):
            if tile >= max(h, w):
                continue  # the whole image was searched already
            for y in _tiles(h, tile):
                for x in _tiles(w, tile):
                    found += self._run(rgb[y:y + tile, x:x + tile], x, y)
        return non_max_suppression(found, self.nms_iou)

    def close(self) -> None:
        if self._detector is not None:
            self._detector.close()
            self._detector = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_detector"] = None
        state["_pid"] = None
        return state


@dataclass
class Face:
    """One face of a photo: its index (0 = largest), box in photo pixels, landmarks normalised to the photo."""

    index: int
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 of the landmarks (photo pixels)
    landmarks: FaceLandmarks
    score: float = float("nan")  # face detector score (nan: found by FaceMesh alone or from the cache)

    @property
    def size(self) -> int:
        """The longer side of the face box in photo pixels."""
        return int(max(self.box[2] - self.box[0], self.box[3] - self.box[1]))


def landmark_box(landmarks: FaceLandmarks) -> FaceBox:
    """The landmarks' bounding box in pixels of the image they are normalised to."""
    px = landmarks.pixels()
    (x0, y0), (x1, y1) = px.min(axis=0), px.max(axis=0)
    return FaceBox(float(x0), float(y0), float(x1), float(y1))


def _largest_first(faces: Sequence[tuple[FaceLandmarks, float]]) -> list[tuple[FaceLandmarks, float]]:
    """THE rule where one face is wanted: the largest landmark box (area) first; ties by detector score."""
    return sorted(faces, key=lambda f: (-landmark_box(f[0]).area, -(f[1] if np.isfinite(f[1]) else -1.0)))


class FaceFinder:
    """Every face of a photo: the full-range face detector finds boxes, FaceMesh gives each its 478 points.

    `find(image)` returns all faces' landmarks normalised to the photo, largest first (landmark
    box area: the documented rule where one face is wanted); `detect(image)` is the largest
    one, so a FaceFinder is also a LandmarkDetector. With exactly one candidate, FaceMesh runs
    on the whole photo first (identical to MediaPipeFaceMesh there); otherwise, or if that
    finds no face in the candidate box, on a square crop twice the box's size around each
    candidate, mapped back. Where the face detector finds nothing (a tight face crop such as
    FER2013), FaceMesh on the whole image is the fallback. Photos larger than `max_side` are
    searched downscaled; coordinates are normalised, so nothing changes for the caller.
    """

    scheme = "mediapipe478"

    def __init__(self, min_face: int = MIN_FACE, max_side: int = DETECT_MAX_SIDE, crop_scale: float = 2.0,
                 mesh: MediaPipeFaceMesh | None = None, face_detector: MediaPipeFaceDetector | None = None) -> None:
        self.mesh = mesh or MediaPipeFaceMesh()
        self.face_detector = face_detector or MediaPipeFaceDetector(min_face=min_face)
        self.max_side = int(max_side)
        self.crop_scale = float(crop_scale)

    @property
    def cache_key(self) -> str:
        return f"faces-v1-{self.face_detector.cache_key}-{self.mesh.cache_key}-side{self.max_side}-x{self.crop_scale:g}"

    def _mesh_in_crop(self, rgb: np.ndarray, box: FaceBox) -> FaceLandmarks | None:
        h, w = rgb.shape[:2]
        side = self.crop_scale * max(box.x1 - box.x0, box.y1 - box.y0)
        cx, cy = (box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2
        x0, y0 = max(0, int(cx - side / 2)), max(0, int(cy - side / 2))
        x1, y1 = min(w, int(np.ceil(cx + side / 2))), min(h, int(np.ceil(cy + side / 2)))
        if x1 - x0 < 8 or y1 - y0 < 8:
            return None
        lm = self.mesh.detect(rgb[y0:y1, x0:x1])
        if lm is None:
            return None
        px = lm.points * np.array([x1 - x0, y1 - y0], np.float32) + np.array([x0, y0], np.float32)
        return FaceLandmarks(points=(px / np.array([w, h], np.float32)).astype(np.float32), scheme=lm.scheme,
                             image_size=(w, h))

    def find(self, image: Any, max_faces: int | None = None) -> list[tuple[FaceLandmarks, float]]:
        """[(landmarks normalised to the image, detector score)] of every face, largest first."""
        if max_faces is not None and (not isinstance(max_faces, (int, np.integer)) or max_faces < 1):
            raise ValueError(f"max_faces must be a positive integer or None (every face), got {max_faces!r}")
        if isinstance(image, (str, os.PathLike)):
            rgb = load_image(image, max_side=self.max_side)
        else:
            rgb = as_rgb_array(image)
            if max(rgb.shape[:2]) > self.max_side:
                rgb = np.asarray(_downscale(Image.fromarray(rgb), self.max_side))
        h, w = rgb.shape[:2]
        candidates = self.face_detector.boxes(rgb)
        faces: list[tuple[FaceLandmarks, float]] = []
        boxes: list[FaceBox] = []

        def accept(lm: FaceLandmarks | None, score: float, within: FaceBox | None) -> bool:
            if lm is None:
                return False
            centre = lm.pixels().mean(axis=0)
            if within is not None and not within.contains(float(centre[0]), float(centre[1]), grow=0.5):
                return False  # FaceMesh found another face than the candidate
            box = landmark_box(lm)
            if any(box.iou(b) > 0.3 or b.contains(float(centre[0]), float(centre[1])) and box.area < b.area
                   for b in boxes):
                return False  # the same face again
            faces.append((lm, score))
            boxes.append(box)
            return True

        if len(candidates) == 1 and accept(self.mesh.detect(rgb), candidates[0].score, candidates[0]):
            pass
        else:
            for cand in candidates:
                accept(self._mesh_in_crop(rgb, cand), cand.score, cand)
        if not faces:
            accept(self.mesh.detect(rgb), float("nan"), None)
        faces = _largest_first(faces)
        return faces if max_faces is None else faces[:int(max_faces)]

    def detect(self, image: np.ndarray) -> FaceLandmarks | None:
        """The largest face's landmarks (normalised to the image), or None."""
        faces = self.find(image, max_faces=1)
        return faces[0][0] if faces else None

    def close(self) -> None:
        self.mesh.close()
        self.face_detector.close()


def _to_faces(found: Sequence[tuple[FaceLandmarks, float]], size: tuple[int, int]) -> list[Face]:
    out = []
    for i, (lm, score) in enumerate(found):
        lm = FaceLandmarks(points=lm.points, scheme=lm.scheme, image_size=size)
        b = landmark_box(lm)
        box = (int(np.floor(max(0.0, b.x0))), int(np.floor(max(0.0, b.y0))),
               int(np.ceil(min(size[0], b.x1))), int(np.ceil(min(size[1], b.y1))))
        out.append(Face(index=i, box=box, landmarks=lm, score=float(score)))
    return out


def photo_size(image: Any) -> tuple[int, int]:
    """(width, height) of a photo as it is shown (EXIF orientation applied), read from the header for files."""
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as im:
                w, h = im.size
                if im.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8):
                    w, h = h, w
                return int(w), int(h)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise ImageError(f"not a readable image: {image}: {exc}") from None
    if isinstance(image, Image.Image):
        w, h = image.size
        return (h, w) if image.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8) else (w, h)
    arr = as_rgb_array(image)
    return int(arr.shape[1]), int(arr.shape[0])


def _pack_faces(found: Sequence[tuple[FaceLandmarks, float]]) -> FaceLandmarks | None:
    """Several faces as one cache entry: their points stacked (n * 478, 2), largest first."""
    if not found:
        return None
    lm0 = found[0][0]
    return FaceLandmarks(points=np.concatenate([lm.points for lm, _ in found]).astype(np.float32), scheme=lm0.scheme,
                         image_size=lm0.image_size)


def _unpack_faces(packed: FaceLandmarks | None) -> list[tuple[FaceLandmarks, float]]:
    if packed is None:
        return []
    n = get_scheme(packed.scheme).num_points
    return [(FaceLandmarks(points=packed.points[i:i + n], scheme=packed.scheme, image_size=packed.image_size),
             float("nan")) for i in range(0, len(packed.points), n)]


def detect_faces(image: np.ndarray | Image.Image | str | os.PathLike, max_faces: int | None = None,
                 finder: FaceFinder | None = None, cache: "LandmarkCache | str | os.PathLike | None" = None
                 ) -> list[Face]:
    """Every face of a photo (array, PIL image or path), largest first, each with its landmarks and box in photo
    coordinates; at most `max_faces` (None: all). An empty list when there is no face; ImageError if unreadable.

    See `FaceFinder` for the method. With `cache`, the faces of a file or array are stored
    under its content, so a rerun (or a resumed batch) never detects the same photo twice.
    """
    if max_faces is not None and (not isinstance(max_faces, (int, np.integer)) or isinstance(max_faces, bool)
                                  or max_faces < 1):
        raise ValueError(f"max_faces must be a positive integer or None (every face), got {max_faces!r}")
    own = finder is None
    finder = finder or FaceFinder()
    try:
        size = photo_size(image)
        if cache is not None and not isinstance(cache, LandmarkCache):
            cache = LandmarkCache(cache)
        key = None
        if cache is not None and not isinstance(image, Image.Image):
            try:
                key = content_key(image, finder.cache_key)
            except OSError as exc:
                raise ImageError(f"unreadable: {image}: {exc}") from None
        rec = cache.get(key) if key is not None else None
        if rec is not None:
            found = _unpack_faces(rec.landmarks)
        else:
            found = finder.find(image)
            if key is not None:
                cache.put(key, _pack_faces(found), "" if found else "no face found by " + finder.cache_key,
                          image_size=size)
    finally:
        if own:
            finder.close()
    faces = _to_faces(found, size)
    return faces if max_faces is None else faces[:int(max_faces)]


# --------------------------------------------------------------------------- cache
CACHE_FORMAT = 1


class LandmarkCache:
    """Landmarks on disk, one small .npz per (image content, detector) pair.

    Entries record a found face (points) or a missing one (the reason), so a rerun never
    detects the same image twice. Each file carries a checksum of its payload; a corrupt,
    truncated or foreign file is detected on read, deleted and reported as a miss, so the
    caller re-detects instead of silently using bad data.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.corrupt_entries = 0

    def path_for(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npz"

    @staticmethod
    def _checksum(points: np.ndarray, found: bool, reason: str, scheme: str, size: Sequence[int]) -> str:
        blob = np.ascontiguousarray(points, dtype=np.float32).tobytes()
        meta = f"{int(found)}|{reason}|{scheme}|{int(size[0])}x{int(size[1])}|{CACHE_FORMAT}".encode()
        return sha256_bytes(blob + meta)[:32]

    def get(self, key: str) -> "LandmarkRecord | None":
        path = self.path_for(key)
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                points = z["points"].astype(np.float32)
                found = bool(z["found"])
                reason = str(z["reason"])
                scheme = str(z["scheme"])
                size = tuple(int(v) for v in z["image_size"])
                checksum = str(z["checksum"])
                owner = str(z["key"]) if "key" in z.files else key  # entries written before keys were stored
            if checksum != self._checksum(points, found, reason, scheme, size):
                raise ValueError("checksum mismatch")
            if owner != key:
                raise ValueError(f"entry of another image ({owner[:12]}...) under this key")
        except Exception as exc:  # noqa: BLE001 - any unreadable entry is a miss, never used
            self.corrupt_entries += 1
            log.warning("landmark cache entry %s is corrupt (%s); it will be rebuilt", path, exc)
            path.unlink(missing_ok=True)
            return None
        lm = FaceLandmarks(points=points, scheme=scheme, image_size=size) if found else None
        return LandmarkRecord(key=key, landmarks=lm, reason=reason, cached=True)

    def put(self, key: str, landmarks: FaceLandmarks | None, reason: str = "", image_size=(0, 0)) -> None:
        found = landmarks is not None
        points = landmarks.points if found else np.zeros((0, 2), np.float32)
        scheme = landmarks.scheme if found else ""
        size = landmarks.image_size if found else tuple(image_size)
        buf = io.BytesIO()
        np.savez(
            buf, points=points.astype(np.float32), found=np.array(found), reason=np.array(reason),
            scheme=np.array(scheme), image_size=np.array(size, dtype=np.int64),
            checksum=np.array(self._checksum(points, found, reason, scheme, size)), key=np.array(key),
        )
        atomic_write_bytes(self.path_for(key), buf.getvalue())


@dataclass
class LandmarkRecord:
    """Result for one image in a batch: landmarks, or None with the reason it is missing."""

    key: str
    landmarks: FaceLandmarks | None
    reason: str = ""
    cached: bool = False
    source: str = ""

    @property
    def found(self) -> bool:
        return self.landmarks is not None


@dataclass
class LandmarkBatch:
    """All records of a batch run plus counts for the run summary."""

    records: list[LandmarkRecord]
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def missing(self) -> list[LandmarkRecord]:
        return [r for r in self.records if not r.found]

    def detection_rate(self) -> float:
        return sum(r.found for r in self.records) / max(1, len(self.records))

    def anchors(self) -> tuple[np.ndarray, np.ndarray]:
        """(N, A, 2) anchors (NaN where missing) and (N,) found mask."""
        out = np.full((len(self.records), len(ANCHORS), 2), np.nan, dtype=np.float32)
        found = np.zeros(len(self.records), dtype=bool)
        for i, r in enumerate(self.records):
            if r.landmarks is not None:
                out[i] = r.landmarks.anchors()
                found[i] = True
        return out, found

    def write_report(self, path: str | os.PathLike) -> Path:
        """JSON report: counts and every missing item with its reason."""
        return atomic_write_json(path, {
            "stats": self.stats,
            "detection_rate": self.detection_rate(),
            "missing": [{"source": r.source, "key": r.key, "reason": r.reason} for r in self.missing],
        })


def content_key(image: np.ndarray | str | os.PathLike, detector_key: str) -> str:
    """Cache key: hash of the file bytes (paths) or pixel bytes (arrays), plus the detector's key.

    Files with an EXIF orientation other than 1 get a distinct key: entries cached before the
    orientation was applied (landmarks of the sideways pixels) are never reused for them.
    """
    if isinstance(image, Image.Image):
        image = as_rgb_array(image)
    if isinstance(image, (str, os.PathLike)):
        data = Path(image).read_bytes()
        if _exif_rotated(image):
            data += b"|exif-upright"
    else:
        arr = np.ascontiguousarray(image)
        data = arr.tobytes() + str(arr.shape).encode()
    return sha256_bytes(data + b"|" + detector_key.encode())[:40]


def _exif_rotated(path: str | os.PathLike) -> bool:
    """Whether a file carries an EXIF orientation other than 1 (header only; False if unreadable)."""
    try:
        with Image.open(path) as im:
            return im.getexif().get(EXIF_ORIENTATION, 1) not in (None, 1)
    except Exception:  # noqa: BLE001 - unreadable files are reported by load_image, not here
        return False


def as_image_sequence(images: Any) -> Any:
    """A sequence of images from one image (path, PIL image, HxW / HxWxC array) or a sequence of them.

    An array is one image when it is HxW or HxWx{1,3,4}, a sequence when it is NxHxWx{1,3,4}; any
    other array is refused (a 3-D array of gray images is ambiguous: pass a list).
    """
    if isinstance(images, (str, os.PathLike, Image.Image)):
        return [images]
    if isinstance(images, np.ndarray) or hasattr(images, "__array_interface__"):
        arr = np.asarray(images)
        if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 3, 4)):
            return [arr]
        if arr.ndim == 4 and arr.shape[3] in (1, 3, 4):
            return list(arr)
        raise ImageError(f"cannot tell the images in an array of shape {arr.shape}: give one image (HxW or "
                         f"HxWx3/4), a batch (NxHxWx3/4) or a list of images/paths")
    return images


def detect_landmarks(
    images: Iterable[np.ndarray | str | os.PathLike] | np.ndarray | Image.Image | str | os.PathLike,
    detector: LandmarkDetector | None = None,
    cache: LandmarkCache | str | os.PathLike | None = None,
    progress: bool = True,
    desc: str = "landmarks",
    total: int | None = None,
) -> LandmarkBatch:
    """Detect landmarks for many images (or one: a path, PIL image or HxWx3 array), using and filling the cache.

    Never raises for a bad item: unreadable images and faces that are not found become
    records with `landmarks=None` and a reason; counts go into `stats`.
    """
    images = as_image_sequence(images)
    detector = detector or MediaPipeFaceMesh()
    if cache is not None and not isinstance(cache, LandmarkCache):
        cache = LandmarkCache(cache)
    records: list[LandmarkRecord] = []
    stats = {"total": 0, "found": 0, "no_face": 0, "unreadable": 0, "cache_hits": 0}
    if total is None and hasattr(images, "__len__"):
        total = len(images)  # type: ignore[arg-type]
    for item in progress_bar(images, total=total, desc=desc, disable=not progress):
        stats["total"] += 1
        source = str(item) if isinstance(item, (str, os.PathLike)) else f"array#{stats['total'] - 1}"
        try:
            key = content_key(item, detector.cache_key)
        except OSError as exc:
            try:  # load_image words the reason for a person (missing, empty, a folder...)
                load_image(item)  # type: ignore[arg-type]
                reason = f"unreadable: {exc}"
            except ImageError as err:
                reason = f"unreadable: {err}"
            records.append(LandmarkRecord(key="", landmarks=None, reason=reason, source=source))
            stats["unreadable"] += 1
            continue
        rec = cache.get(key) if cache is not None else None
        if rec is not None:
            stats["cache_hits"] += 1
        else:
            try:
                rgb = as_rgb_array(item)
            except ImageError as exc:
                rec = LandmarkRecord(key=key, landmarks=None, reason=f"unreadable: {exc}")
                stats["unreadable"] += 1
                records.append(dataclasses.replace(rec, source=source))
                continue  # unreadable files are not cached: fixing the file should retry it
            lm = detector.detect(rgb)
            reason = "" if lm is not None else "no face found by " + detector.cache_key
            rec = LandmarkRecord(key=key, landmarks=lm, reason=reason)
            if cache is not None:
                cache.put(key, lm, reason, image_size=(rgb.shape[1], rgb.shape[0]))
        rec.source = source
        if rec.found:
            stats["found"] += 1
        elif rec.reason.startswith("unreadable"):
            stats["unreadable"] += 1
        else:
            stats["no_face"] += 1
        records.append(rec)
    if cache is not None:
        stats["corrupt_cache_entries_rebuilt"] = cache.corrupt_entries
    return LandmarkBatch(records=records, stats=stats)


def crop_to_face(image: np.ndarray, landmarks: FaceLandmarks, margin: float = 0.25,
                 square: bool = True) -> tuple[np.ndarray, FaceLandmarks]:
    """Crop an RGB image to the face's landmark box (plus `margin` of its size on each side).

    Returns the crop and the landmarks re-normalised to it, so AU maps rendered on the crop
    line up with it (the aligned-crop setting the reference sigma assumes).
    """
    rgb = as_rgb_array(image)
    h, w = rgb.shape[:2]
    px = landmarks.points * np.array([w, h], np.float32)
    x0, y0 = px.min(axis=0)
    x1, y1 = px.max(axis=0)
    bw, bh = x1 - x0, y1 - y0
    if square:
        side = max(bw, bh)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        x0, x1, y0, y1 = cx - side / 2, cx + side / 2, cy - side / 2, cy + side / 2
        bw = bh = side
    x0, x1 = x0 - margin * bw, x1 + margin * bw
    y0, y1 = y0 - margin * bh, y1 + margin * bh
    ix0, iy0 = max(0, int(np.floor(x0))), max(0, int(np.floor(y0)))
    ix1, iy1 = min(w, int(np.ceil(x1))), min(h, int(np.ceil(y1)))
    if ix1 - ix0 < 2 or iy1 - iy0 < 2:
        raise ImageError(f"face box {ix0},{iy0},{ix1},{iy1} is empty inside a {w}x{h} image")
    crop = rgb[iy0:iy1, ix0:ix1]
    points = (px - np.array([ix0, iy0], np.float32)) / np.array([ix1 - ix0, iy1 - iy0], np.float32)
    return crop, FaceLandmarks(points=points.astype(np.float32), scheme=landmarks.scheme,
                               image_size=(ix1 - ix0, iy1 - iy0))
