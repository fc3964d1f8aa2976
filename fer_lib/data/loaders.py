"""Index readers for FER datasets: RAF-DB (basic, compound), AffectNet, FER2013 csv, ImageFolder, CSV.

Each reader returns a `DatasetIndex`: records (path or in-memory pixels, project class id,
split) and the class names. Every dataset's own label order is mapped to the project's
order (`fer_lib.faces.au.EXPRESSIONS`) through the explicit tables below. Readers never open
images; `fer_lib.data.dataset` validates and loads them.

Errors name the expected layout, so a wrong root or a missing label file says at once
what was looked for.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from fer_lib.faces.au import EXPRESSIONS
from fer_lib.faces.landmarks import IMAGE_EXTENSIONS
from fer_lib.utils import UserError

SPLITS = ("train", "val", "test")

# --------------------------------------------------------------------------- label tables
#: RAF-DB basic: labels 1-7 in RAF order
RAFDB_BASIC_LABELS: dict[int, str] = {
    1: "surprise", 2: "fear", 3: "disgust", 4: "happiness", 5: "sadness", 6: "anger", 7: "neutral",
}
#: RAF-DB compound: labels 1-11 (class ids 0-10 in this order)
COMPOUND_EXPRESSIONS: tuple[str, ...] = (
    "happily_surprised", "happily_disgusted", "sadly_fearful", "sadly_angry", "sadly_surprised",
    "sadly_disgusted", "fearfully_angry", "fearfully_surprised", "angrily_surprised", "angrily_disgusted",
    "disgustedly_surprised",
)
RAFDB_COMPOUND_LABELS: dict[int, str] = {i + 1: name for i, name in enumerate(COMPOUND_EXPRESSIONS)}
#: AffectNet expression ids (0-7 are expressions; 8-10 are not and are skipped with counts)
AFFECTNET_LABELS: dict[int, str] = {
    0: "neutral", 1: "happiness", 2: "sadness", 3: "surprise", 4: "fear", 5: "disgust", 6: "anger", 7: "contempt",
}
AFFECTNET_NON_EXPRESSION: dict[int, str] = {8: "none", 9: "uncertain", 10: "non_face"}
#: FER2013 csv: emotion ids and Usage -> split
FER2013_LABELS: dict[int, str] = {
    0: "anger", 1: "disgust", 2: "fear", 3: "happiness", 4: "sadness", 5: "surprise", 6: "neutral",
}
FER2013_USAGE: dict[str, str] = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}
EXPRESSIONS_8: tuple[str, ...] = EXPRESSIONS + ("contempt",)

#: folder / label names accepted for each class (lower case; '-' and ' ' read as '_')
SYNONYMS: dict[str, str] = {
    "neutral": "neutral", "neutrality": "neutral", "calm": "neutral",
    "happy": "happiness", "happiness": "happiness", "joy": "happiness",
    "sad": "sadness", "sadness": "sadness",
    "surprise": "surprise", "surprised": "surprise",
    "fear": "fear", "fearful": "fear", "afraid": "fear", "scared": "fear",
    "disgust": "disgust", "disgusted": "disgust",
    "anger": "anger", "angry": "anger",
    "contempt": "contempt", "contemptuous": "contempt",
    **{name: name for name in COMPOUND_EXPRESSIONS},
}
SPLIT_NAMES: dict[str, str] = {
    "train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
    "publictest": "val", "test": "test", "testing": "test", "privatetest": "test",
}


class DatasetLayoutError(UserError, FileNotFoundError):
    """A dataset root that does not have the expected layout (the message describes it)."""


class LabelError(UserError, ValueError):
    """A label that no mapping table knows (the message lists the accepted ones)."""


@dataclass
class Record:
    """One image: where it is (or its pixels), its project class id and split, and its landmarks."""

    path: str
    label: int
    split: str
    image: np.ndarray | None = None  # in-memory pixels (FER2013 csv); None when read from `path`
    anchors: np.ndarray | None = None  # (A, 2) normalised, when known
    has_landmarks: bool = False
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class DatasetIndex:
    """What a reader found: records, class names, and counts of what it skipped and why."""

    name: str
    class_names: tuple[str, ...]
    records: list[Record]
    root: Path
    stats: dict[str, Any] = field(default_factory=dict)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (path, reason, split or "")

    def split(self, split: str) -> list[Record]:
        return [r for r in self.records if r.split == split]

    def splits(self) -> list[str]:
        return [s for s in SPLITS if any(r.split == s for r in self.records)]

    def counts(self) -> dict[str, dict[str, int]]:
        """{split: {class name: count}}."""
        out: dict[str, dict[str, int]] = {}
        for s in self.splits():
            c = Counter(r.label for r in self.split(s))
            out[s] = {self.class_names[k]: int(c.get(k, 0)) for k in range(len(self.class_names))}
        return out


# --------------------------------------------------------------------------- helpers
def canonical_name(name: str) -> str | None:
    """The canonical class name for a folder/label name (synonyms, any case), or None."""
    key = str(name).strip().lower().replace("-", "_").replace(" ", "_")
    return SYNONYMS.get(key)


def resolve_label(value: Any, class_names: Sequence[str], where: str = "") -> int:
    """Class id in `class_names` for a label given as a name (with synonyms) or an integer id."""
    text = str(value).strip()
    if text.lstrip("-").isdigit():
        k = int(text)
        if 0 <= k < len(class_names):
            return k
        raise LabelError(f"label id {k}{where} outside 0..{len(class_names) - 1} "
                         f"(classes in order: {', '.join(class_names)})")
    if text in class_names:
        return class_names.index(text)
    canon = canonical_name(text)
    if canon is not None and canon in class_names:
        return class_names.index(canon)
    accepted = sorted(k for k, v in SYNONYMS.items() if v in class_names)
    raise LabelError(f"unknown label {text!r}{where}; accepted names: {', '.join(accepted)} "
                     f"or integer ids 0..{len(class_names) - 1} in the order {', '.join(class_names)}")


def split_fractions(records: list[Record], fractions: Mapping[str, float], seed: int,
                    source: str = "train") -> None:
    """Reassign part of the `source` records to other splits, stratified by class, in place."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[Record]] = {}
    for r in records:
        if r.split == source:
            by_class.setdefault(r.label, []).append(r)
    for label in sorted(by_class):
        items = sorted(by_class[label], key=lambda r: r.path)
        order = rng.permutation(len(items))
        start = 0
        for split, frac in fractions.items():
            n = int(round(frac * len(items)))
            if frac > 0 and n == 0 and len(items) - start > 1:
                n = 1
            for i in order[start:start + n]:
                items[i].split = split
            start += n


def _check_fraction(name: str, value: float) -> float:
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return float(value)


def _list_images(folder: Path) -> tuple[list[Path], int]:
    files, ignored = [], 0
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            if p.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(p)
            elif not p.name.startswith("."):
                ignored += 1
    return files, ignored


# --------------------------------------------------------------------------- RAF-DB
RAFDB_LAYOUT = ("<root>/{subset}/Image/aligned/<name>_aligned.jpg and "
                "<root>/{subset}/EmoLabel/list_patition_label.txt (lines '<name>.jpg <label>'); "
                "root may also point at the {subset}/ folder itself")


def load_rafdb(root: str | os.PathLike, subset: str = "basic", val_fraction: float = 0.1, seed: int = 0,
               image_dir: str = "aligned") -> DatasetIndex:
    """RAF-DB basic (7 classes, RAF labels 1-7) or compound (11 classes) in the official layout.

    The official split has train and test; `val_fraction` of train (stratified, seeded)
    becomes val. Label lines whose image file is missing are listed in `skipped`.
    """
    if subset not in ("basic", "compound"):
        raise ValueError(f"unknown RAF-DB subset {subset!r}; valid: basic, compound")
    layout = RAFDB_LAYOUT.format(subset=subset)
    root = Path(root)
    if not root.exists():
        raise DatasetLayoutError(f"RAF-DB root {root} does not exist; expected {layout}")
    base = root / subset if (root / subset).is_dir() else root
    label_file = base / "EmoLabel" / "list_patition_label.txt"
    if not label_file.is_file():
        raise DatasetLayoutError(f"RAF-DB label file not found at {label_file}; expected {layout}")
    img_dir = base / "Image" / image_dir
    if not img_dir.is_dir():
        raise DatasetLayoutError(f"RAF-DB image folder not found at {img_dir}; expected {layout}")
    table = RAFDB_BASIC_LABELS if subset == "basic" else RAFDB_COMPOUND_LABELS
    class_names = EXPRESSIONS if subset == "basic" else COMPOUND_EXPRESSIONS
    records: list[Record] = []
    skipped: list[tuple[str, str, str]] = []
    for lineno, line in enumerate(label_file.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        where = f" at {label_file}:{lineno}"
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise DatasetLayoutError(f"malformed line {line!r}{where}; expected '<name>.jpg <label>' ({layout})")
        name, raf = parts[0], int(parts[1])
        if raf not in table:
            raise LabelError(f"unknown RAF-DB {subset} label {raf}{where}; valid labels {min(table)}-{max(table)}: "
                             + ", ".join(f"{k} {v}" for k, v in table.items()))
        stem = Path(name).stem
        split = "train" if stem.startswith("train") else "test" if stem.startswith("test") else None
        if split is None:
            raise DatasetLayoutError(f"cannot tell the split of {name!r}{where}: RAF-DB names start with "
                                     f"'train_' or 'test_' ({layout})")
        candidates = [img_dir / f"{stem}_aligned.jpg", img_dir / name]
        path = next((c for c in candidates if c.exists()), None)
        if path is None:
            skipped.append((str(candidates[0]), "missing image file listed in " + label_file.name, split))
            continue
        records.append(Record(path=str(path), label=class_names.index(table[raf]), split=split))
    if not records:
        raise DatasetLayoutError(f"no RAF-DB image of {label_file} found under {img_dir}; expected {layout}")
    if val_fraction > 0:
        split_fractions(records, {"val": _check_fraction("val_fraction", val_fraction)}, seed)
    return DatasetIndex(name=f"rafdb_{subset}", class_names=tuple(class_names), records=records, root=root,
                        stats={"missing_files": len(skipped)}, skipped=skipped)


# --------------------------------------------------------------------------- AffectNet
AFFECTNET_LAYOUT = ("<root>/training.csv and <root>/validation.csv (or under <root>/Manually_Annotated_file_lists/), "
                    "columns subDirectory_filePath,expression,...; images under <root>/Manually_Annotated_Images/ "
                    "(or <root>/ itself) at subDirectory_filePath")


AFFECTNET_NPY_LAYOUT = ("<root>/train_set/ and <root>/val_set/, each with images/<id>.jpg and "
                        "annotations/<id>_exp.npy (expression id 0-7), <id>_val.npy, <id>_aro.npy (valence, arousal) "
                        "and <id>_lnd.npy (68 landmarks, x,y in image pixels)")


def _npy_value(path: Path) -> np.ndarray:
    """The numbers of one AffectNet annotation file (stored as numbers or as numeric strings)."""
    value = np.asarray(np.load(path, allow_pickle=False))
    if value.dtype.kind in "US":  # numbers stored as text, one per element or separated in one string
        text = " ".join(str(v) for v in value.reshape(-1)).replace(";", " ").replace(",", " ")
        return np.array(text.split(), dtype=np.float64)
    return value.astype(np.float64).reshape(-1)


def load_affectnet_npy(root: Path, num_classes: int = 7, val_fraction: float = 0.1, seed: int = 0,
                       check_files: bool = True) -> DatasetIndex:
    """AffectNet as distributed now: train_set/ -> train (+ val carved out), val_set/ -> test, one .npy per label.

    Each record keeps valence and arousal (`meta['valence']`, `meta['arousal']`) and the
    dataset's own 68 landmarks (`meta['landmarks_px']`, dlib/iBUG order, pixels), which
    build_datasets uses through the dlib-68 scheme instead of detecting landmarks.
    Expression ids 8-10 and (with `num_classes=7`) contempt are skipped and counted; an
    image without its _exp.npy, or an unreadable annotation, is listed in `skipped`.
    """
    class_names = EXPRESSIONS if num_classes == 7 else EXPRESSIONS_8
    records: list[Record] = []
    skipped: list[tuple[str, str, str]] = []
    skipped_labels: Counter = Counter()
    without_landmarks = 0
    for folder, split in (("train_set", "train"), ("val_set", "test")):
        base = root / folder
        if not base.is_dir():
            if split == "train":
                raise DatasetLayoutError(f"AffectNet folder {base} not found; expected {AFFECTNET_NPY_LAYOUT}")
            continue
        images, notes = base / "images", base / "annotations"
        if not images.is_dir() or not notes.is_dir():
            raise DatasetLayoutError(f"{base} lacks images/ or annotations/; expected {AFFECTNET_NPY_LAYOUT}")
        for path in sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS):
            exp_file = notes / f"{path.stem}_exp.npy"
            if not exp_file.is_file():
                skipped.append((str(path), f"no expression label {exp_file.name} in {notes}", split))
                continue
            try:
                e = int(round(float(_npy_value(exp_file)[0])))
                extra = {}
                for key, suffix in (("valence", "val"), ("arousal", "aro")):
                    f = notes / f"{path.stem}_{suffix}.npy"
                    extra[key] = float(_npy_value(f)[0]) if f.is_file() else float("nan")
                lnd = notes / f"{path.stem}_lnd.npy"
                points = _npy_value(lnd) if lnd.is_file() else None
            except (OSError, ValueError, IndexError) as exc:
                skipped.append((str(path), f"unreadable annotation of {path.stem} in {notes}: {exc}", split))
                continue
            if e in AFFECTNET_NON_EXPRESSION or (e == 7 and num_classes == 7):
                skipped_labels[AFFECTNET_NON_EXPRESSION.get(e, "contempt")] += 1
                continue
            if e not in AFFECTNET_LABELS:
                raise LabelError(f"unknown AffectNet expression id {e} in {exp_file}; valid ids: "
                                 + ", ".join(f"{k} {v}" for k, v in {**AFFECTNET_LABELS, **AFFECTNET_NON_EXPRESSION}.items()))
            if points is not None and points.size == 136 and np.isfinite(points).all():
                extra["landmarks_px"] = points.reshape(68, 2).astype(np.float32)
                extra["landmark_scheme"] = "dlib68"
            else:
                without_landmarks += 1
            records.append(Record(path=str(path), label=class_names.index(AFFECTNET_LABELS[e]), split=split,
                                  meta=extra))
    if not records:
        raise DatasetLayoutError(f"no labelled AffectNet image found under {root}; expected {AFFECTNET_NPY_LAYOUT}")
    if val_fraction > 0:
        split_fractions(records, {"val": _check_fraction("val_fraction", val_fraction)}, seed)
    return DatasetIndex(name=f"affectnet{num_classes}", class_names=tuple(class_names), records=records, root=root,
                        stats={"layout": "npy", "skipped_labels": dict(skipped_labels),
                               "missing_labels": len(skipped), "without_landmarks": without_landmarks},
                        skipped=skipped)


def load_affectnet(root: str | os.PathLike, num_classes: int = 7, val_fraction: float = 0.1, seed: int = 0,
                   check_files: bool = True) -> DatasetIndex:
    """AffectNet in either layout: the current train_set/ + val_set/ with .npy annotations (`load_affectnet_npy`), or
    the older CSV manifests (training.csv -> train, + val carved out; validation.csv -> test).

    Expression ids 8-10 (none, uncertain, non-face) are skipped and counted; with
    `num_classes=7`, contempt (7) is skipped and counted too.
    """
    import pandas as pd

    if num_classes not in (7, 8):
        raise ValueError(f"AffectNet num_classes must be 7 or 8, got {num_classes}")
    root = Path(root)
    if not root.exists():
        raise DatasetLayoutError(f"AffectNet root {root} does not exist; expected {AFFECTNET_NPY_LAYOUT}, or "
                                 f"{AFFECTNET_LAYOUT}")
    if (root / "train_set").is_dir():
        return load_affectnet_npy(root, num_classes, val_fraction, seed, check_files)
    csv_dir = next((d for d in (root, root / "Manually_Annotated_file_lists") if (d / "training.csv").is_file()), None)
    if csv_dir is None:
        raise DatasetLayoutError(f"AffectNet training.csv (or train_set/) not found in {root}; expected "
                                 f"{AFFECTNET_NPY_LAYOUT}, or {AFFECTNET_LAYOUT}")
    img_root = next((d for d in (root / "Manually_Annotated_Images",
                                 root / "Manually_Annotated" / "Manually_Annotated_Images") if d.is_dir()), root)
    class_names = EXPRESSIONS if num_classes == 7 else EXPRESSIONS_8
    records: list[Record] = []
    skipped: list[tuple[str, str, str]] = []
    skipped_labels: Counter = Counter()
    for csv_name, split in (("training.csv", "train"), ("validation.csv", "test")):
        csv = csv_dir / csv_name
        if not csv.is_file():
            if split == "train":
                raise DatasetLayoutError(f"missing {csv}; expected {AFFECTNET_LAYOUT}")
            continue
        frame = pd.read_csv(csv, dtype={"subDirectory_filePath": str}, low_memory=False)
        missing_cols = [c for c in ("subDirectory_filePath", "expression") if c not in frame.columns]
        if missing_cols:
            raise DatasetLayoutError(f"{csv} lacks columns {missing_cols} (has {list(frame.columns)[:10]}); "
                                     f"expected {AFFECTNET_LAYOUT}")
        for i, (rel, expr) in enumerate(zip(frame["subDirectory_filePath"], frame["expression"])):
            try:
                e = int(expr)
            except (TypeError, ValueError):
                raise LabelError(f"non-integer expression {expr!r} at {csv} row {i + 2}; AffectNet ids are 0-10") from None
            if e in AFFECTNET_NON_EXPRESSION or (e == 7 and num_classes == 7):
                skipped_labels[AFFECTNET_NON_EXPRESSION.get(e, "contempt")] += 1
                continue
            if e not in AFFECTNET_LABELS:
                raise LabelError(f"unknown AffectNet expression id {e} at {csv} row {i + 2}; valid ids: "
                                 + ", ".join(f"{k} {v}" for k, v in {**AFFECTNET_LABELS, **AFFECTNET_NON_EXPRESSION}.items()))
            path = img_root / str(rel)
            if check_files and not path.exists():
                skipped.append((str(path), f"missing image file listed in {csv.name}", split))
                continue
            records.append(Record(path=str(path), label=class_names.index(AFFECTNET_LABELS[e]), split=split))
    if not records:
        raise DatasetLayoutError(f"no AffectNet image found under {img_root}; expected {AFFECTNET_LAYOUT}")
    if val_fraction > 0:
        split_fractions(records, {"val": _check_fraction("val_fraction", val_fraction)}, seed)
    return DatasetIndex(name=f"affectnet{num_classes}", class_names=tuple(class_names), records=records, root=root,
                        stats={"skipped_labels": dict(skipped_labels), "missing_files": len(skipped)}, skipped=skipped)


# --------------------------------------------------------------------------- FER2013 csv
FER2013_CSV_LAYOUT = ("a CSV file with columns emotion,pixels,Usage: emotion 0-6 (0 Angry 1 Disgust 2 Fear 3 Happy "
                      "4 Sad 5 Surprise 6 Neutral), pixels = 2304 space-separated gray values (48x48), Usage in "
                      "Training/PublicTest/PrivateTest")


def load_fer2013_csv(path: str | os.PathLike) -> DatasetIndex:
    """FER2013 from its original csv (pixel strings); images are kept in memory as 48x48 uint8."""
    import pandas as pd

    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("*.csv"))
        if len(found) != 1:
            raise DatasetLayoutError(f"{path} is a folder with {len(found)} csv files; pass the csv itself "
                                     f"({FER2013_CSV_LAYOUT})")
        path = found[0]
    if not path.is_file():
        raise DatasetLayoutError(f"FER2013 csv {path} does not exist; expected {FER2013_CSV_LAYOUT}")
    frame = pd.read_csv(path, dtype={"pixels": str})
    missing_cols = [c for c in ("emotion", "pixels") if c not in frame.columns]
    if missing_cols:
        raise DatasetLayoutError(f"{path} lacks columns {missing_cols}; expected {FER2013_CSV_LAYOUT}")
    usage = frame["Usage"] if "Usage" in frame.columns else ["Training"] * len(frame)
    records: list[Record] = []
    skipped: list[tuple[str, str, str]] = []
    for i, (emotion, pixels, use) in enumerate(zip(frame["emotion"], frame["pixels"], usage)):
        source = f"{path}#row{i + 2}"
        e = int(emotion) if str(emotion).strip().lstrip("-").isdigit() else None
        if e not in FER2013_LABELS:
            raise LabelError(f"unknown FER2013 emotion {emotion!r} at {source}; valid: "
                             + ", ".join(f"{k} {v}" for k, v in FER2013_LABELS.items()))
        if str(use) not in FER2013_USAGE:
            raise LabelError(f"unknown Usage {use!r} at {source}; valid: {', '.join(FER2013_USAGE)}")
        try:
            values = np.array(str(pixels).split(), dtype=np.float64) if isinstance(pixels, str) else np.zeros(0)
        except ValueError:
            values = np.zeros(0)
        side = int(round(np.sqrt(values.size)))
        if values.size == 0 or side * side != values.size or values.min() < 0 or values.max() > 255:
            skipped.append((source, f"bad pixel string ({values.size} values; expected a square of gray values 0-255)",
                            FER2013_USAGE[str(use)]))
            continue
        records.append(Record(path=source, label=EXPRESSIONS.index(FER2013_LABELS[e]), split=FER2013_USAGE[str(use)],
                              image=values.reshape(side, side).astype(np.uint8)))
    if not records:
        raise DatasetLayoutError(f"no usable row in {path}; expected {FER2013_CSV_LAYOUT}")
    return DatasetIndex(name="fer2013", class_names=EXPRESSIONS, records=records, root=path,
                        stats={"bad_rows": len(skipped)}, skipped=skipped)


# --------------------------------------------------------------------------- ImageFolder
IMAGE_FOLDER_LAYOUT = ("<root>/<split>/<class>/*.png|jpg with split in train/val/test (val may be 'valid' or "
                       "'validation'), or <root>/<class>/* without splits; class folders named after the "
                       "expressions (synonyms accepted: {names})")


def _folder_classes(folders: Iterable[Path], class_names: Sequence[str] | None) -> dict[str, str]:
    out = {}
    for f in folders:
        name = f.name if class_names is not None and f.name in class_names else canonical_name(f.name)
        if name is None or (class_names is not None and name not in class_names):
            valid = ", ".join(class_names) if class_names is not None else ", ".join(sorted(SYNONYMS))
            raise LabelError(f"class folder {f} is not a known class; accepted folder names: {valid}\n"
                             f"expected layout: {IMAGE_FOLDER_LAYOUT.format(names='see above')}")
        out[f.name] = name
    return out


def load_image_folder(root: str | os.PathLike, class_names: Sequence[str] | None = None,
                      val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0) -> DatasetIndex:
    """Class-folder tree, with or without train/val/test split folders.

    Without `class_names`, folder names are mapped to the project's classes through the
    synonym table (angry/anger, happy/happiness, ...) and the class list is EXPRESSIONS
    (plus contempt or the compound classes when such folders exist). A missing val split is
    carved out of train (`val_fraction`); a tree without split folders is split by both fractions.
    """
    root = Path(root)
    layout = IMAGE_FOLDER_LAYOUT.format(names=", ".join(sorted(SYNONYMS)))
    if not root.is_dir():
        raise DatasetLayoutError(f"image folder root {root} does not exist or is not a folder; expected {layout}")
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    split_dirs = {SPLIT_NAMES[d.name.lower()]: d for d in subdirs if d.name.lower() in SPLIT_NAMES}
    if split_dirs:
        trees = split_dirs
    elif subdirs:
        trees = {"train": root}
    else:
        raise DatasetLayoutError(f"{root} has no class or split folders; expected {layout}")
    class_dirs = {s: sorted(d for d in t.iterdir() if d.is_dir() and not d.name.startswith(".")) for s, t in trees.items()}
    mapping: dict[str, str] = {}
    for s, dirs in class_dirs.items():
        if not dirs:
            raise DatasetLayoutError(f"split folder {trees[s]} has no class folders; expected {layout}")
        mapping.update(_folder_classes(dirs, class_names))
    if class_names is None:
        found = set(mapping.values())
        if found & set(COMPOUND_EXPRESSIONS):
            names: tuple[str, ...] = COMPOUND_EXPRESSIONS
            if found - set(COMPOUND_EXPRESSIONS):
                raise LabelError(f"{root} mixes basic and compound class folders: {sorted(found)}")
        else:
            names = EXPRESSIONS_8 if "contempt" in found else EXPRESSIONS
    else:
        names = tuple(class_names)
    records: list[Record] = []
    ignored = 0
    for s, dirs in class_dirs.items():
        for d in dirs:
            files, n_ignored = _list_images(d)
            ignored += n_ignored
            label = names.index(mapping[d.name])
            records.extend(Record(path=str(p), label=label, split=s) for p in files)
    if not records:
        raise DatasetLayoutError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root}; expected {layout}")
    fractions = {}
    if "val" not in split_dirs:
        fractions["val"] = _check_fraction("val_fraction", val_fraction)
    if not split_dirs:
        fractions["test"] = _check_fraction("test_fraction", test_fraction)
    if any(v > 0 for v in fractions.values()):
        split_fractions(records, fractions, seed)
    return DatasetIndex(name="imagefolder", class_names=names, records=records, root=root,
                        stats={"ignored_non_image_files": ignored, "class_folders": mapping})


# --------------------------------------------------------------------------- CSV manifest
CSV_LAYOUT = ("a CSV with columns path,label[,split]: path relative to the csv's folder (or root), label a class "
              "name (synonyms accepted) or an integer id in the class order, split in train/val/test")


def _manifest_records(frame: Any, csv: Path, base: Path, names: Sequence[str], check_files: bool
                      ) -> tuple[list[Record], list[tuple[str, str, str]], list[str]]:
    """The usable rows of a manifest as Records; the others as (path, reason, split) and bad-label messages."""
    has_split = "split" in frame.columns
    extra = [c for c in frame.columns if c not in ("path", "label", "split")]
    records: list[Record] = []
    skipped: list[tuple[str, str, str]] = []
    bad_labels: list[str] = []
    seen: dict[str, int] = {}
    for i, row in enumerate(frame.itertuples(index=False)):
        row = row._asdict()
        where = f" at {csv} row {i + 2}"
        split = "train"
        if has_split:
            key = str(row["split"]).strip().lower()
            if key not in SPLIT_NAMES:
                raise LabelError(f"unknown split {row['split']!r}{where}; valid: train, val, test")
            split = SPLIT_NAMES[key]
        tag = split if has_split else ""
        if not str(row["path"]).strip():
            skipped.append((f"{csv}#row{i + 2}", f"no image path{where}", tag))
            continue
        p = Path(str(row["path"]).strip())
        path = p if p.is_absolute() else base / p
        if not str(row["label"]).strip():  # a row whose label entry is missing: listed, not guessed
            skipped.append((str(path), f"missing label{where}", tag))
            continue
        try:
            label = resolve_label(row["label"], names, where)
        except LabelError as exc:  # out-of-range id or unknown name: listed with the reason, the rest is used
            bad_labels.append(str(exc))
            skipped.append((str(path), f"bad label: {exc}", tag))
            continue
        if str(path) in seen:
            skipped.append((str(path), f"listed twice{where} (first at row {seen[str(path)]}); the repeat is ignored",
                            tag))
            continue
        seen[str(path)] = i + 2
        if check_files and not path.exists():
            skipped.append((str(path), "missing image file listed in " + csv.name, tag))
            continue
        records.append(Record(path=str(path), label=label, split=split, meta={c: row[c] for c in extra}))
    return records, skipped, bad_labels


def load_csv_manifest(csv: str | os.PathLike, root: str | os.PathLike | None = None,
                      class_names: Sequence[str] | None = None, val_fraction: float = 0.1,
                      test_fraction: float = 0.1, seed: int = 0, check_files: bool = True) -> DatasetIndex:
    """A CSV manifest (path,label[,split], extra columns kept in Record.meta).

    Without a split column, records are split by the fractions (stratified, seeded); with
    one that lacks val, `val_fraction` of train becomes val.
    """
    import pandas as pd

    csv = Path(csv)
    if csv.is_dir():
        csv = csv / "manifest.csv"
    if not csv.is_file():
        raise DatasetLayoutError(f"CSV manifest {csv} does not exist; expected {CSV_LAYOUT}")
    base = Path(root) if root is not None else csv.parent
    frame = pd.read_csv(csv, dtype={"path": str, "label": str, "split": str}, keep_default_na=False)
    missing_cols = [c for c in ("path", "label") if c not in frame.columns]
    if missing_cols:
        raise DatasetLayoutError(f"{csv} lacks columns {missing_cols} (has {list(frame.columns)}); expected {CSV_LAYOUT}")
    names = tuple(class_names) if class_names is not None else None
    if names is None:
        labels = {canonical_name(v) for v in frame["label"] if not str(v).strip().lstrip("-").isdigit()}
        names = EXPRESSIONS_8 if "contempt" in labels else EXPRESSIONS
        if labels & set(COMPOUND_EXPRESSIONS):
            names = COMPOUND_EXPRESSIONS
    has_split = "split" in frame.columns
    records, skipped, bad_labels = _manifest_records(frame, csv, base, names, check_files)
    if not records:
        if bad_labels:
            raise LabelError(f"no usable row in {csv}: {len(bad_labels)} bad label(s), the first: {bad_labels[0]}")
        raise DatasetLayoutError(f"none of the files listed in {csv} exists under {base}; expected {CSV_LAYOUT}")
    present = {r.split for r in records}
    fractions = {}
    if "val" not in present:
        fractions["val"] = _check_fraction("val_fraction", val_fraction)
    if not has_split:
        fractions["test"] = _check_fraction("test_fraction", test_fraction)
    if any(v > 0 for v in fractions.values()):
        split_fractions(records, fractions, seed)
    reasons = [why for _, why, _ in skipped]
    return DatasetIndex(name="csv", class_names=names, records=records, root=base,
                        stats={"missing_files": sum(w.startswith("missing image") for w in reasons),
                               "bad_labels": len(bad_labels),
                               "missing_labels": sum(w.startswith(("missing label", "no image path")) for w in reasons),
                               "duplicate_rows": sum(w.startswith("listed twice") for w in reasons)},
                        skipped=skipped)
