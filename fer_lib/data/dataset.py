"""The torch Dataset of the project and `build_datasets`, the one entry point for every dataset.

`FERDataset[i]` -> (image (3,S,S) normalised, label (), au_map (1,S,S) in [0,1], has_landmarks ()).
Geometric augmentations (random resized crop, small rotation, horizontal flip) move the
landmark anchors with the image, and the AU map is rendered AFTER the transform from the
transformed anchors, so it always lies on the face it describes (a flip swaps the
subject's left/right anchors via `fer_lib.faces.landmarks.flip_anchors`).

Unreadable images are found when the dataset is built (each file is decoded once), listed
in `.skipped` with the reason and left out, so nothing fails inside a DataLoader worker.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from fer_lib.faces.au import CODEBOOK, combine_aus, combine_aus_at, reference_heatmap
from fer_lib.faces.landmarks import (ANCHOR_INDEX, ANCHORS, ImageError, LandmarkCache, MediaPipeFaceMesh, as_rgb_array,
                         DLIB68_MIRROR, FaceLandmarks, detect_landmarks, dlib68_points, flip_anchors,
                         get_scheme, load_image, photo_size)
from fer_lib.utils import REPO_ROOT, ConfigError, atomic_write_csv, atomic_write_json, check_choice, progress_bar
from fer_lib.data import loaders
from fer_lib.data.loaders import DatasetIndex, Record
from fer_lib.data.synthetic import SyntheticConfig, build_synthetic, load_truth, oracle_accuracy

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LANDMARK_MODES = ("detect", "ground_truth", "none")
DEFAULT_FER2013_ROOT = REPO_ROOT.parent / "shared" / "data" / "fer2013"


# --------------------------------------------------------------------------- transforms
@dataclass
class AugmentConfig:
    """Training-time geometric and photometric augmentation (all keep anchors aligned)."""

    crop_scale: tuple[float, float] = (0.85, 1.0)  # side of the random crop, fraction of the image
    rotation_deg: float = 10.0
    flip_p: float = 0.5
    color_jitter: float = 0.15  # brightness/contrast factor range +-

    def __post_init__(self) -> None:
        lo, hi = self.crop_scale
        if not 0.2 <= lo <= hi <= 1.0:
            raise ConfigError(f"crop_scale must satisfy 0.2 <= lo <= hi <= 1, got {self.crop_scale}")
        if not 0.0 <= self.flip_p <= 1.0:
            raise ConfigError(f"flip_p is a probability, got {self.flip_p}")


def affine_coefficients(size: int, centre: Sequence[float], scale: float, angle_deg: float) -> tuple[float, ...]:
    """PIL AFFINE coefficients (output pixel -> input pixel) for a crop of side `scale` at `centre`, rotated."""
    r = np.deg2rad(angle_deg)
    m = scale * np.array([[np.cos(r), -np.sin(r)], [np.sin(r), np.cos(r)]])
    half = size / 2.0
    offset = np.asarray(centre, float) * size - 0.5 + m @ np.array([0.5 - half, 0.5 - half])
    return (m[0, 0], m[0, 1], offset[0], m[1, 0], m[1, 1], offset[1])


def transform_anchors(anchors: np.ndarray, centre: Sequence[float], scale: float, angle_deg: float) -> np.ndarray:
    """Move normalised anchors by the same crop/rotation as `affine_coefficients` (input -> output)."""
    r = np.deg2rad(angle_deg)
    m = scale * np.array([[np.cos(r), -np.sin(r)], [np.sin(r), np.cos(r)]])
    return ((np.asarray(anchors, float) - np.asarray(centre, float)) @ np.linalg.inv(m).T + 0.5).astype(np.float32)


def geometric_transform(image: Image.Image, anchors: np.ndarray | None, size: int, centre=(0.5, 0.5),
                        scale: float = 1.0, angle_deg: float = 0.0, flip: bool = False
                        ) -> tuple[Image.Image, np.ndarray | None]:
    """Resize to size x size, then crop/rotate/flip image and anchors together."""
    image = image.resize((size, size), Image.BILINEAR, reducing_gap=None) if image.size != (size, size) else image
    if scale != 1.0 or angle_deg != 0.0 or tuple(centre) != (0.5, 0.5):
        image = image.transform((size, size), Image.AFFINE, affine_coefficients(size, centre, scale, angle_deg),
                                resample=Image.BILINEAR)
        if anchors is not None:
            anchors = transform_anchors(anchors, centre, scale, angle_deg)
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
        if anchors is not None:
            anchors = flip_anchors(anchors)
    return image, anchors


# --------------------------------------------------------------------------- dataset
class FERDataset:
    """Images with labels, landmark anchors and AU maps aligned under augmentation (a torch Dataset).

    AU maps come at image size, or directly at a tapped layer's size when `au_map_size` = (h, w) is set
    (fer_lib.faces.au.combine_aus_at: the area-pooled image map without drawing it; training sets it).
    `au_style`: "gaussian" (ours: blobs on named anchors) or "reference" (the reference code's ellipses on
    dlib-68 positions, fer_lib.faces.au.reference_heatmap; needs detected landmarks, at image size).
    """

    au_map_size: tuple[int, int] | None = None
    au_style: str = "gaussian"

    def __init__(self, records: Sequence[Record], class_names: Sequence[str], image_size: int = 112,
                 augment: bool = False, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 augment_config: AugmentConfig | None = None, skipped: Sequence[tuple[str, str]] = (),
                 name: str = "", split: str = "") -> None:
        self.records = list(records)
        self.class_names = tuple(class_names)
        self.image_size = int(image_size)
        self.augment = bool(augment)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        if isinstance(augment_config, dict):  # from a JSON/TOML config or a saved TrainConfig
            fields = [f.name for f in dataclasses.fields(AugmentConfig)]
            unknown = sorted(set(augment_config) - set(fields))
            if unknown:
                raise ConfigError(f"unknown augment_config key(s) {unknown}; valid: {', '.join(fields)}")
            augment_config = AugmentConfig(**{k: tuple(v) if k == "crop_scale" else v for k, v in augment_config.items()})
        self.augment_config = augment_config or AugmentConfig()
        self.skipped = list(skipped)
        self.name = name
        self.split = split
        self.landmark_stats: dict[str, Any] = {}
        self.landmark_report: dict[str, Any] = {}
        bad = [r.label for r in self.records if not 0 <= r.label < len(self.class_names)]
        if bad:
            raise ValueError(f"labels {sorted(set(bad))} outside 0..{len(self.class_names) - 1} ({self.class_names})")
        self._class_aus = [tuple(CODEBOOK.get(c, ())) for c in self.class_names]

    def __len__(self) -> int:
        return len(self.records)

    @property
    def labels(self) -> np.ndarray:
        return np.array([r.label for r in self.records], dtype=np.int64)

    def load_rgb(self, index: int) -> np.ndarray:
        """The record's image as RGB uint8 (gray images become 3 channels)."""
        r = self.records[index]
        return as_rgb_array(r.image) if r.image is not None else load_image(r.path)

    def sample(self, index: int, augment: bool | None = None, rng: np.random.Generator | None = None
               ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """Transformed (RGB uint8 SxS, anchors or None, AU map float32 SxS or au_map_size): the un-normalised sample."""
        import torch

        r = self.records[index]
        augment = self.augment if augment is None else augment
        image = Image.fromarray(self.load_rgb(index))
        anchors = r.anchors if (r.has_landmarks and r.anchors is not None and np.isfinite(r.anchors).all()) else None
        S = self.image_size
        if augment:
            a = self.augment_config
            u = (lambda: float(rng.random())) if rng is not None else (lambda: float(torch.rand(())))
            scale = a.crop_scale[0] + (a.crop_scale[1] - a.crop_scale[0]) * u()
            slack = (1.0 - scale) / 2
            centre = (0.5 + (2 * u() - 1) * slack, 0.5 + (2 * u() - 1) * slack)
            angle = (2 * u() - 1) * a.rotation_deg
            flip = u() < a.flip_p
            image, anchors = geometric_transform(image, anchors, S, centre, scale, angle, flip)
            moves = (centre, scale, angle, flip)
            arr = np.asarray(image, np.float32)
            if a.color_jitter > 0:
                contrast = 1 + (2 * u() - 1) * a.color_jitter
                bright = 1 + (2 * u() - 1) * a.color_jitter
                m = arr.mean()
                arr = np.clip(((arr - m) * contrast + m) * bright, 0, 255)
            rgb = arr.astype(np.uint8)
        else:
            image, anchors = geometric_transform(image, anchors, S)
            rgb, moves = np.asarray(image, np.uint8), None
        return rgb, anchors, self._au_map(r, anchors, moves)

    def _au_map(self, r: Record, anchors: np.ndarray | None, moves: tuple | None) -> np.ndarray:
        """The sample's AU map in the dataset's style and size (zeros without landmarks or AUs)."""
        aus, S = self._class_aus[r.label], self.image_size
        if self.au_style == "reference":
            points = r.meta.get("dlib68")
            if anchors is None or points is None or not aus:
                return np.zeros((S, S), np.float32)
            if moves is not None:
                centre, scale, angle, flip = moves
                points = transform_anchors(points, centre, scale, angle) if (scale, angle, tuple(centre)) != (
                    1.0, 0.0, (0.5, 0.5)) else points
                if flip:
                    points = np.asarray(points, np.float32)[list(DLIB68_MIRROR)] * [-1, 1] + [1, 0]
            return reference_heatmap(points, aus, S)
        if self.au_map_size is not None:
            size = tuple(self.au_map_size)
            return combine_aus_at(anchors, aus, size, S) if anchors is not None and aus else np.zeros(size, np.float32)
        return combine_aus(anchors, aus, S) if anchors is not None and aus else np.zeros((S, S), np.float32)
        return rgb, anchors, au

    def __getitem__(self, index: int):
        import torch

        rgb, anchors, au = self.sample(index)
        x = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)
        x = (x - torch.tensor(self.mean)[:, None, None]) / torch.tensor(self.std)[:, None, None]
        return (x, torch.tensor(self.records[index].label, dtype=torch.long), torch.from_numpy(au)[None],
                torch.tensor(anchors is not None, dtype=torch.bool))

    def write_skipped(self, path: str | os.PathLike) -> Path:
        """CSV of the items left out (path, reason)."""
        import pandas as pd

        return atomic_write_csv(path, pd.DataFrame(self.skipped, columns=["path", "reason"]))

    def __repr__(self) -> str:
        return (f"FERDataset({self.name}:{self.split}, n={len(self)}, classes={len(self.class_names)}, "
                f"size={self.image_size}, augment={self.augment}, skipped={len(self.skipped)})")


# --------------------------------------------------------------------------- validation and landmarks
def validate_records(records: Sequence[Record], progress: bool = True, desc: str = "checking images"
                     ) -> tuple[list[Record], list[tuple[str, str]]]:
    """Decode every image once; return (readable records, [(path, reason)] of the others)."""
    good, bad = [], []
    for r in progress_bar(records, desc=desc, disable=not progress):
        try:
            if r.image is not None:
                as_rgb_array(r.image)
            else:
                load_image(r.path)
        except ImageError as exc:
            bad.append((r.path, str(exc)))
            continue
        good.append(r)
    return good, bad


def landmark_nme(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Per-face normalised mean error: mean anchor distance / true inter-ocular distance (NaN if no prediction)."""
    pred = np.asarray(pred, np.float64)
    true = np.asarray(true, np.float64)
    if pred.shape != true.shape or pred.shape[-2:] != (len(ANCHORS), 2):
        raise ValueError(f"pred and true must both be (N, {len(ANCHORS)}, 2) anchors, got {pred.shape} and {true.shape}")
    single = pred.ndim == 2
    if single:
        pred, true = pred[None], true[None]
    iod = np.linalg.norm(true[:, ANCHOR_INDEX["left_eye_center"]] - true[:, ANCHOR_INDEX["right_eye_center"]], axis=-1)
    err = np.linalg.norm(pred - true, axis=-1).mean(axis=-1) / np.maximum(iod, 1e-9)
    return err[0] if single else err


def landmark_error_report(pred: np.ndarray, true: np.ndarray) -> dict[str, Any]:
    """Detection rate, NME (mean/median) and per-anchor NME of detected anchors against ground truth."""
    pred = np.asarray(pred, np.float64)
    true = np.asarray(true, np.float64)
    found = np.isfinite(pred).reshape(len(pred), -1).all(axis=1)
    report: dict[str, Any] = {"n": int(len(pred)), "detected": int(found.sum()),
                              "detection_rate": float(found.mean()) if len(pred) else float("nan")}
    if found.any():
        nme = landmark_nme(pred[found], true[found])
        iod = np.linalg.norm(true[found, ANCHOR_INDEX["left_eye_center"]] - true[found, ANCHOR_INDEX["right_eye_center"]], axis=-1)
        per_anchor = (np.linalg.norm(pred[found] - true[found], axis=-1) / iod[:, None]).mean(axis=0)
        report.update(nme_mean=float(nme.mean()), nme_median=float(np.median(nme)),
                      nme_per_anchor={a: float(v) for a, v in zip(ANCHORS, per_anchor)})
    return report


def attach_dataset_landmarks(records: Sequence[Record]) -> int:
    """Anchors from a dataset's own landmarks (`meta['landmarks_px']` in pixels, `meta['landmark_scheme']`, e.g.
    AffectNet's 68 points through the dlib-68 scheme); returns how many records got them."""
    n = 0
    for r in records:
        points = r.meta.get("landmarks_px")
        if points is None:
            continue
        size = (r.image.shape[1], r.image.shape[0]) if r.image is not None else photo_size(r.path)
        norm = np.asarray(points, np.float32) / np.asarray(size, np.float32)
        scheme = str(r.meta.get("landmark_scheme", "dlib68"))
        r.anchors = get_scheme(scheme).to_anchors(norm)
        r.has_landmarks = bool(np.isfinite(r.anchors).all())
        if scheme in ("dlib68", "mediapipe478"):
            r.meta["dlib68"] = dlib68_points(FaceLandmarks(norm, scheme, size))
        r.meta["landmark_source"] = "dataset"
        n += int(r.has_landmarks)
    return n


def attach_detected_landmarks(records: Sequence[Record], cache_dir: str | os.PathLike | None = None,
                              progress: bool = True, detector=None) -> dict[str, Any]:
    """Store anchors on the records: the dataset's own landmarks where it has them (AffectNet), else the landmark
    detector's (through the on-disk cache)."""
    own = attach_dataset_landmarks(records)
    todo = [r for r in records if not (r.has_landmarks and r.meta.get("landmark_source") == "dataset")]
    cache = LandmarkCache(Path(cache_dir) if cache_dir is not None else REPO_ROOT / ".cache" / "landmarks")
    items = [r.image if r.image is not None else r.path for r in todo]
    batch = detect_landmarks(items, detector or MediaPipeFaceMesh(), cache, progress=progress and bool(items),
                             total=len(items))
    anchors, found = batch.anchors()
    for r, a, f, rec in zip(todo, anchors, found, batch.records):
        r.anchors = a if f else None
        r.has_landmarks = bool(f)
        if f and rec.landmarks.scheme in ("dlib68", "mediapipe478"):
            r.meta["dlib68"] = dlib68_points(rec.landmarks)  # for au_style="reference"
        if not f:
            r.meta["landmark_reason"] = rec.reason
    stats = dict(batch.stats)
    if own:
        stats["dataset_landmarks"] = own
        stats["found"] = stats.get("found", 0) + own
        stats["total"] = stats.get("total", 0) + own
    rate = sum(r.has_landmarks for r in records) / max(1, len(records))
    return {**stats, "detection_rate": rate}


def _limit_per_class(records: list[Record], max_per_class: int | dict[str, int] | None, seed: int) -> list[Record]:
    if max_per_class is None:
        return records
    rng = np.random.default_rng(seed)
    out: list[Record] = []
    groups: dict[tuple[str, int], list[Record]] = {}
    for r in records:
        groups.setdefault((r.split, r.label), []).append(r)
    for (split, label), items in sorted(groups.items()):
        n = max_per_class.get(split) if isinstance(max_per_class, dict) else max_per_class
        if n is None or len(items) <= n:
            out.extend(items)
        else:
            keep = np.sort(rng.permutation(len(items))[:n])
            out.extend(items[i] for i in keep)
    return out


# --------------------------------------------------------------------------- the dataset registry
@dataclass(frozen=True)
class DatasetSource:
    """A named dataset: `load(root, seed=, image_size=, progress=, **options) -> DatasetIndex` (records,
    no decoding), the loader options it takes, and whether it needs a root (else its default_root)."""

    name: str
    load: Callable[..., DatasetIndex]
    options: tuple[str, ...] = ()
    needs_root: bool = True
    default_root: Path | None = None


_SOURCES: dict[str, DatasetSource] = {}
_COMMON_KWARGS = ("max_per_class", "output_dir", "mean", "std", "augment_config", "progress", "validate", "splits",
                  "au_style", "au_map_size", "preload_images")
AU_STYLES = ("gaussian", "reference")


def register_dataset(source: DatasetSource) -> DatasetSource:
    """Make a dataset buildable by name (build_datasets, TrainConfig.dataset, evaluate --dataset)."""
    _SOURCES[source.name] = source
    return source


def list_datasets() -> list[str]:
    """Names of the registered datasets."""
    return list(_SOURCES)


def dataset_source(name: str) -> DatasetSource:
    """The registered dataset `name`; an unknown name is an error listing the valid ones."""
    check_choice("dataset", name, tuple(_SOURCES))
    return _SOURCES[name]


def load_index(name: str, root: str | os.PathLike | None = None, seed: int = 0, image_size: int = 112,
               progress: bool = True, **kwargs: Any) -> DatasetIndex:
    """The records of a named dataset (no image decoding, no landmarks)."""
    source = dataset_source(name)
    if root is None and source.needs_root:
        if source.default_root is None or not source.default_root.is_dir():
            raise ConfigError(f"dataset {name!r} needs root= (the folder or file holding it)")
        root = source.default_root
    return source.load(None if root is None else Path(root), seed=seed, image_size=image_size, progress=progress,
                       **kwargs)


def dataset_ceiling(dataset: Any) -> dict[str, Any] | None:
    """What is learnable from a dataset built by `build_datasets`, where the dataset knows it: for the synthetic
    set, the test accuracy of an oracle on the true AU intensities the generator drew
    (`fer_lib.data.synthetic.oracle_accuracy`); None for real datasets."""
    config = (getattr(dataset, "index_stats", None) or {}).get("config")
    if not config:
        return None
    cfg = SyntheticConfig(**{**config, "expressions": tuple(config["expressions"]),
                             "intensity_range": tuple(config["intensity_range"])})
    return {"oracle_accuracy": oracle_accuracy(cfg), "split": "test",
            "oracle": "logistic regression on the true AU intensities (train split)"}


def _load_synthetic(root: Path | None, seed: int, image_size: int, progress: bool, **kwargs: Any) -> DatasetIndex:
    cfg = SyntheticConfig(image_size=image_size, seed=seed, **kwargs)
    built = build_synthetic(cfg, root=None if root is None else root / f"synthetic-{cfg.key()}", progress=progress)
    index = loaders.load_csv_manifest(built / "manifest.csv", class_names=cfg.expressions, val_fraction=0.0,
                                      test_fraction=0.0, seed=seed)
    truth = load_truth(built)
    for r in index.records:
        t = truth[Path(r.path).relative_to(built).as_posix()]
        r.meta.update(true_anchors=t["anchors"], aus=t["aus"], spurious=t["spurious"])
    index.name = "synthetic"
    index.stats["config"] = dataclasses.asdict(cfg)
    return index


def _load_folder(name: str) -> Callable[..., DatasetIndex]:
    def load(root: Path, seed: int, image_size: int, progress: bool, **kwargs: Any) -> DatasetIndex:
        if name == "fer2013" and root.suffix.lower() == ".csv":
            return loaders.load_fer2013_csv(root)
        index = loaders.load_image_folder(root, seed=seed, **kwargs)
        index.name = name
        return index
    return load


def _load_csv(root: Path, seed: int, image_size: int, progress: bool, **kwargs: Any) -> DatasetIndex:
    images_root = kwargs.pop("images_root", None)
    return loaders.load_csv_manifest(root, root=images_root, seed=seed, **kwargs)


_SPLIT_OPTIONS = ("class_names", "val_fraction", "test_fraction")
for _source in (
    DatasetSource("synthetic", _load_synthetic, needs_root=False, options=tuple(
        f.name for f in dataclasses.fields(SyntheticConfig) if f.name not in ("image_size", "seed"))),
    DatasetSource("rafdb", lambda root, seed, image_size, progress, **kw: loaders.load_rafdb(root, "basic", seed=seed, **kw),
                  options=("val_fraction", "image_dir")),
    DatasetSource("rafdb_compound", lambda root, seed, image_size, progress, **kw: loaders.load_rafdb(
        root, "compound", seed=seed, **kw), options=("val_fraction", "image_dir")),
    DatasetSource("affectnet", lambda root, seed, image_size, progress, **kw: loaders.load_affectnet(root, seed=seed, **kw),
                  options=("num_classes", "val_fraction", "check_files")),
    DatasetSource("fer2013", _load_folder("fer2013"), options=_SPLIT_OPTIONS, default_root=DEFAULT_FER2013_ROOT),
    DatasetSource("fer2013_csv", lambda root, seed, image_size, progress: loaders.load_fer2013_csv(root)),
    DatasetSource("imagefolder", _load_folder("imagefolder"), options=_SPLIT_OPTIONS),
    DatasetSource("csv", _load_csv, options=_SPLIT_OPTIONS + ("check_files", "images_root")),
):
    register_dataset(_source)
#: the built-in datasets (list_datasets() also names the ones registered later)
DATASETS: tuple[str, ...] = tuple(list_datasets())


def _attach_landmarks(records: list[Record], name: str, landmarks: str, cache_dir: str | os.PathLike | None,
                      progress: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Anchors on the records as `landmarks` asks; returns (detection stats, the synthetic set's error report)."""
    if landmarks == "ground_truth":
        for r in records:
            r.anchors = np.asarray(r.meta["true_anchors"], np.float32)
            r.has_landmarks = True
        return {}, {}
    if landmarks != "detect":
        for r in records:
            r.anchors, r.has_landmarks = None, False
        return {}, {}
    stats = attach_detected_landmarks(records, cache_dir, progress=progress)
    if name != "synthetic":
        return stats, {}
    pred = np.stack([r.anchors if r.has_landmarks else np.full((len(ANCHORS), 2), np.nan, np.float32)
                     for r in records]) if records else np.zeros((0, len(ANCHORS), 2))
    true = np.stack([r.meta["true_anchors"] for r in records]) if records else pred
    return stats, landmark_error_report(pred, true)


def _map_size(value: Any) -> tuple[int, int]:
    """au_map_size as (h, w): an int or a pair of positive integers, else ConfigError."""
    pair = (value, value) if isinstance(value, int) else tuple(value) if isinstance(value, (list, tuple)) else ()
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
        raise ConfigError(f"au_map_size must be a positive integer or [h, w] (a tapped layer's size), got {value!r}")
    return (int(pair[0]), int(pair[1]))


def _write_data_summary(output_dir: Path, name: str, out: dict[str, FERDataset], index: DatasetIndex,
                        landmarks: str, landmark_stats: dict[str, Any], report: dict[str, Any]) -> None:
    """skipped_<split>.csv per split and data_summary.json (counts, skips, landmark statistics)."""
    for split, ds in out.items():
        ds.write_skipped(output_dir / f"skipped_{split}.csv")
    atomic_write_json(output_dir / "data_summary.json", {
        "dataset": name, "class_names": index.class_names, "counts": {s: len(d) for s, d in out.items()},
        "skipped": {s: len(d.skipped) for s, d in out.items()}, "index_stats": index.stats,
        "landmarks": landmarks, "landmark_stats": landmark_stats, "landmark_report": report,
    })


def build_datasets(name: str, root: str | os.PathLike | None = None, image_size: int = 112, seed: int = 0,
                   landmarks: str = "detect", cache_dir: str | os.PathLike | None = None, augment: bool = True,
                   **dataset_kwargs: Any) -> dict[str, FERDataset]:
    """Build {split: FERDataset} for a named dataset; train is augmented when `augment`.

    name: a registered dataset (list_datasets()). landmarks: "detect" (the dataset's own landmarks where it ships them,
    as AffectNet's 68 points, else MediaPipe FaceMesh through the cache in `cache_dir`, default
    .cache/landmarks), "ground_truth" (synthetic only) or "none".
    Loader options (val_fraction, num_classes, class_names, ...), synthetic options
    (n_per_class, spurious_p, spurious_eval, ...) and common options (max_per_class,
    output_dir for skipped/landmark reports, mean, std, augment_config, progress,
    validate=True, splits, au_style="gaussian" | "reference", au_map_size=[h, w] (AU maps rendered at a tapped
    layer's size), preload_images=True (decode every image once into memory)) go in `dataset_kwargs`.
    """
    source = dataset_source(name)
    check_choice("landmarks", landmarks, LANDMARK_MODES)
    au_style = check_choice("au_style", dataset_kwargs.get("au_style", "gaussian"), AU_STYLES)
    if au_style == "reference" and landmarks != "detect":
        raise ConfigError("au_style='reference' draws on dlib-68 positions from detected landmarks: use "
                          f"landmarks='detect', not {landmarks!r}")
    if landmarks == "ground_truth" and name != "synthetic":
        raise ConfigError(f"landmarks='ground_truth' is only available for the synthetic dataset (it has exact "
                          f"anchors); for {name!r} use landmarks='detect' or 'none'")
    allowed = set(source.options) | set(_COMMON_KWARGS)
    unknown = sorted(set(dataset_kwargs) - allowed)
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown} for dataset {name!r}; valid: {', '.join(sorted(allowed))}")
    common = {k: dataset_kwargs.pop(k) for k in list(dataset_kwargs) if k in _COMMON_KWARGS}
    progress = bool(common.get("progress", True))
    index = load_index(name, root, seed=seed, image_size=image_size, progress=progress, **dataset_kwargs)
    records = _limit_per_class(index.records, common.get("max_per_class"), seed)
    wanted = common.get("splits")
    if wanted is not None:
        for s in wanted:
            check_choice("split", s, loaders.SPLITS)
        records = [r for r in records if r.split in wanted]
    bad: list[tuple[str, str]] = []
    if common.get("validate", True):
        records, bad = validate_records(records, progress=progress, desc=f"{name}: checking images")
    bad_paths = dict(bad)
    landmark_stats, report = _attach_landmarks(records, name, landmarks, cache_dir, progress)
    out: dict[str, FERDataset] = {}
    record_split = {r.path: r.split for r in index.records}
    for split in loaders.SPLITS:
        split_records = [r for r in records if r.split == split]
        if not split_records:
            continue
        skipped = [(p, why) for p, why in bad_paths.items() if record_split.get(p) == split]
        skipped += [(p, why) for p, why, s in index.skipped if s in (split, "")]
        ds = FERDataset(split_records, index.class_names, image_size, augment=augment and split == "train",
                        mean=common.get("mean", IMAGENET_MEAN), std=common.get("std", IMAGENET_STD),
                        augment_config=common.get("augment_config"), skipped=skipped, name=name, split=split)
        ds.landmark_stats = landmark_stats
        ds.landmark_report = report
        ds.index_stats = index.stats
        ds.au_style = au_style
        if common.get("au_map_size") is not None:
            ds.au_map_size = _map_size(common["au_map_size"])
        if common.get("preload_images"):  # decoded once, held in memory (FER2013: about 200 MB at 48 px)
            for i, r in enumerate(ds.records):
                r.image = ds.load_rgb(i)
        out[split] = ds
    if not out:
        raise ConfigError(f"dataset {name!r} has no usable images after checks ({len(bad)} unreadable)")
    if common.get("output_dir") is not None:
        _write_data_summary(Path(common["output_dir"]), name, out, index, landmarks, landmark_stats, report)
    return out
