"""Facial landmarks: detection (MediaPipe FaceMesh), named anchors, and an on-disk cache.

Every landmark scheme (MediaPipe's 478 points, dlib's 68, a dataset's own points, or the
synthetic generator's exact anchors) is an adapter onto one set of named facial anchors
(`ANCHORS`). AU regions (fer_lib.au) are defined on those names only, so a new detector
plugs in by writing one `LandmarkScheme`.

Conventions
-----------
* Coordinates are normalised to the image: x in [0, 1] left to right, y in [0, 1] top to
  bottom, so the same landmarks render AU maps at any resolution.
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
from PIL import Image, UnidentifiedImageError

from .utils import atomic_write_bytes, atomic_write_json, sha256_bytes

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
class ImageError(ValueError):
    """An image that cannot be used, with the reason (missing file, not an image, truncated...)."""


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
MAX_IMAGE_PIXELS = 80_000_000


def to_rgb_uint8(image: Image.Image) -> np.ndarray:
    """Convert any PIL mode (L, LA, P, RGBA, I;16, I, F, CMYK) to an RGB uint8 array."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        image = Image.fromarray(arr.round().astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def load_image(path: str | os.PathLike, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Read an image file as RGB uint8 (H, W, 3), or raise ImageError saying what is wrong."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"image file does not exist: {path}")
    if path.is_dir():
        raise ImageError(f"expected an image file, got a directory: {path}")
    if path.stat().st_size == 0:
        raise ImageError(f"image file is empty (0 bytes): {path}")
    try:
        with Image.open(path) as im:
            if im.width * im.height > max_pixels:
                raise ImageError(
                    f"image too large ({im.width}x{im.height} > {max_pixels} pixels): {path}; "
                    "resize it or raise max_pixels"
                )
            im.load()
            return to_rgb_uint8(im)
    except UnidentifiedImageError:
        raise ImageError(
            f"not a readable image: {path} (accepted formats: {', '.join(IMAGE_EXTENSIONS)})"
        ) from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image too large: {path}: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, ImageError):
            raise
        raise ImageError(f"corrupt or truncated image: {path}: {exc}") from None


def as_rgb_array(image: np.ndarray | Image.Image | str | os.PathLike) -> np.ndarray:
    """Accept a path, a PIL image or an array (gray HxW, HxWx1, RGB, RGBA; uint8 or float in [0,1])."""
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    if isinstance(image, Image.Image):
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
    """Cache key: hash of the file bytes (paths) or pixel bytes (arrays), plus the detector's key."""
    if isinstance(image, (str, os.PathLike)):
        data = Path(image).read_bytes()
    else:
        arr = np.ascontiguousarray(image)
        data = arr.tobytes() + str(arr.shape).encode()
    return sha256_bytes(data + b"|" + detector_key.encode())[:40]


def detect_landmarks(
    images: Iterable[np.ndarray | str | os.PathLike],
    detector: LandmarkDetector | None = None,
    cache: LandmarkCache | str | os.PathLike | None = None,
    progress: bool = True,
    desc: str = "landmarks",
    total: int | None = None,
) -> LandmarkBatch:
    """Detect landmarks for many images, using and filling the cache.

    Never raises for a bad item: unreadable images and faces that are not found become
    records with `landmarks=None` and a reason; counts go into `stats`.
    """
    from tqdm.auto import tqdm

    detector = detector or MediaPipeFaceMesh()
    if cache is not None and not isinstance(cache, LandmarkCache):
        cache = LandmarkCache(cache)
    records: list[LandmarkRecord] = []
    stats = {"total": 0, "found": 0, "no_face": 0, "unreadable": 0, "cache_hits": 0}
    if total is None and hasattr(images, "__len__"):
        total = len(images)  # type: ignore[arg-type]
    for item in tqdm(images, total=total, desc=desc, disable=not progress):
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
