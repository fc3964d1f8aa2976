"""Explanations in the expert's language: per-AU evidence for a prediction, and checks that it is true.

An expert explains an expression by its action units ("happiness: AU12 and AU6"). This module
turns a model's explanation map (the layer attention of a tapped stage, or a CAM from
`fer_lib.analysis.interpret.compute_cams`) into that vocabulary, for one face or a whole test set:

    model, _ = load_checkpoint("best.pt")
    item = explain_images(model, ["face.jpg"])[0]       # detects landmarks (MediaPipe)
    print(item.evidence.summary)
    # happiness (p=0.91), mainly from AU12 (lip corner puller) and AU6 (cheek raiser); 18% ...

or on the command line, over photos, folders and globs (every face of every photo, a progress
bar, one summary `explain_summary.csv` / `.json` for the batch, resumable: rerun the same command
after an interruption; photos without a face or unreadable are listed with the reason):
`python -m fer_lib.analysis.explain photos/ 'more/**/*.jpg' --checkpoint best.pt --out expl/`.

AU evidence (the exact formulas)
--------------------------------
Let M >= 0 be the explanation map at image size (attention is min-max scaled to [0, 1] as
CAMs are; negative values count as 0), N the number of pixels, and R_a the region of AU a on
this face: the pixels where `fer_lib.faces.au.au_map(anchors, a)` >= `threshold` (default 0.5, the
half-maximum contour of the AU's Gaussian blobs on its landmarks). Then

    mass_share(a) = sum(M * R_a) / sum(M)        share of the explanation inside the region
    area_share(a) = |R_a| / N                    share of the image the region covers
    evidence(a)   = mass_share(a) / area_share(a) = mean(M in R_a) / mean(M over the image)

`evidence` is the area-normalised score the table is ranked by: 1 means "as much as a uniform
map would put there", so a big region cannot win by its size alone. `outside` is the share of
the mass (and of the area) outside the union of all AU regions: evidence the codebook cannot
explain. Regions overlap (AU4 contains AU1's brows, AU26 contains AU17's chin), so mass
shares over AUs do not sum to 1; AUs defined on the same landmarks have the same region
(AU12 = AU15 = AU20 at the mouth corners, AU23 = AU24 on the lips): they get the same
evidence, are listed in `same_region`, and the ranking breaks their ties in favour of the AUs
of the explained class (then by AU number). The one-line summary names the top distinct
regions whose evidence exceeds 1.

Faithfulness (`deletion_test`, `au_evidence_report`)
--------------------------------------------------
An explanation is faithful if removing what it points at changes the model's score. For each
face, the distinct AU regions are deleted (filled with the face's mean colour, or blurred)
and the explained class's score (softmax probability by default) is measured again:
`drop = score(original) - score(deleted)`, for the top-ranked region, a random region of
similar area (within `area_tolerance`, seeded) and the lowest-ranked region. A ROAD-style
curve deletes the regions cumulatively in ranked order (most evidence first, "morf"),
reverse order ("lerf") and a random order; a faithful ranking drops the score fastest under
"morf".

Validation (`au_evidence_report` on the synthetic set): the synthetic faces carry the true
intensity of every AU, so the Spearman correlation between AU evidence and true intensity
says whether the explanation names the AUs the face really shows (per image over the 18 AUs,
and per AU over the images). On real faces without AU labels (FER2013), `class_evidence`
averages the evidence per predicted class and `codebook_evidence_agreement` compares it with the
codebook (the AUC of codebook AUs against the others).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import matplotlib
import numpy as np
import torch
from torch import nn

from PIL import Image

from fer_lib.analysis.interpret import (CAM_METHODS, compute_cams, layer_attention_maps, minmax_scale, subset_indices,
                                        tapped_layers)
from fer_lib.data import geometric_transform
from fer_lib.faces.au import ALL_AUS, AU_NAMES, CODEBOOK, au_map
from fer_lib.faces.landmarks import (ANCHORS, DETECT_MAX_SIDE, IMAGE_EXTENSIONS, Face, FaceFinder, ImageError,
                                     LandmarkCache, as_image_sequence, as_rgb_array, crop_to_face, detect_faces,
                                     detect_landmarks, landmark_box, load_image, read_image)
from fer_lib.metrics import as_interval, bootstrap_interval
from fer_lib.models import input_tensor, load_checkpoint
from fer_lib.plots import save_figure
from fer_lib.training.train import TrainConfig, train
from fer_lib.utils import (ConfigError, atomic_write_bytes, atomic_write_csv, atomic_write_json, check_choice,
                           config_hash, progress_bar, resolve_device, run_cli, run_info)

#: the map name for the layer attention (mean over channels of a tapped stage)
ATTENTION = "attention"
#: every explanation map `explain_*` accepts: layer attention or a CAM method of fer_lib.analysis.interpret
#: (as registered at import; check_map also accepts methods registered later)
MAP_CHOICES: tuple[str, ...] = (ATTENTION, *CAM_METHODS)
#: how a deleted region is filled
FILL_MODES: tuple[str, ...] = ("mean", "blur")
#: which score the deletion test watches
SCORE_KINDS: tuple[str, ...] = ("probability", "logit")
#: how the attention map is made non-negative before mass shares are taken
SCALE_MODES: tuple[str, ...] = ("minmax", "relu")
#: default region threshold: the half-maximum contour of each AU's blobs
DEFAULT_THRESHOLD = 0.5
#: the three deletions of the faithfulness test, and the orders of its curves
DELETIONS: tuple[str, ...] = ("top", "random", "bottom")
CURVE_ORDERS: tuple[str, ...] = ("morf", "lerf", "random")


# ----------------------------------------------------------------------------- validation
def check_map(name: str | None) -> str:
    """'attention' (also for None / '') or a CAM method name; ConfigError listing the choices otherwise."""
    if name is None or str(name).strip() == "":
        return ATTENTION
    return check_choice("explanation map", str(name).strip().lower(), (ATTENTION, *CAM_METHODS))  # registry: live


def check_threshold(threshold: float) -> float:
    """A region threshold in (0, 1)."""
    if not isinstance(threshold, (int, float)) or not 0.0 < float(threshold) < 1.0:
        raise ConfigError(f"threshold must be a number in (0, 1) (the AU map level that bounds a region); "
                          f"got {threshold!r}")
    return float(threshold)


def _check_anchors(anchors: Any) -> np.ndarray:
    arr = np.asarray(anchors, np.float32)
    if arr.shape != (len(ANCHORS), 2):
        raise ValueError(f"anchors must be ({len(ANCHORS)}, 2) normalised coordinates "
                         f"(fer_lib.faces.landmarks.ANCHORS); got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("anchors contain NaN/inf: this face has no landmarks, so it has no AU regions")
    return arr


def _size_hw(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


@dataclass(frozen=True)
class ExplainSettings:
    """How a face is explained in AU terms, validated when made (ConfigError naming what is accepted).

    map_name     'attention' (the tapped layer's attention) or a CAM method of fer_lib.analysis.interpret
    layer        tapped layer for the attention / CAM (None: the model's last tap)
    target       the class explained: 'prediction', 'label' (dataset reports), a class name or class id(s)
    threshold    AU region = au_map >= threshold, in (0, 1)
    scale        how the attention becomes non-negative: 'minmax' or 'relu'
    max_aus      AU regions named in the one-line summary
    aus          the AUs whose evidence is tabled
    crop_margin  crop a one-face photo to its face with this margin first (None: whole; several faces: FACE_MARGIN)
    max_faces    faces explained per photo, largest first (None: every face)
    device       None: where the model is; else 'auto', 'cpu', 'cuda', ...
    progress     progress bars
    """

    map_name: str | None = None
    layer: str | None = None
    target: Any = "prediction"
    threshold: float = DEFAULT_THRESHOLD
    scale: str = "minmax"
    max_aus: int = 2
    aus: tuple[int, ...] = tuple(ALL_AUS)
    crop_margin: float | None = None
    max_faces: int | None = None
    device: Any = None
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "map_name", check_map(self.map_name))
        object.__setattr__(self, "threshold", check_threshold(self.threshold))
        object.__setattr__(self, "aus", tuple(int(a) for a in self.aus))
        check_choice("scale", self.scale, SCALE_MODES)
        if self.crop_margin is not None and not 0.0 <= float(self.crop_margin) <= 2.0:
            raise ConfigError(f"crop_margin must be in [0, 2] (a fraction of the face box) or None; "
                              f"got {self.crop_margin!r}")
        if self.max_faces is not None and (not isinstance(self.max_faces, (int, np.integer)) or self.max_faces < 1):
            raise ConfigError(f"max_faces must be a positive integer or None (every face), got {self.max_faces!r}")
        if self.device is not None:
            resolve_device(self.device)

    def replace(self, **changes: Any) -> "ExplainSettings":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class DeletionSettings:
    """The deletion test (`deletion_test`): how deleted pixels are filled, which score is watched, and how close in
    area the random control region must be to the top one."""

    fill: str = "mean"
    score: str = "probability"
    area_tolerance: float = 0.5

    def __post_init__(self) -> None:
        check_choice("fill mode", self.fill, FILL_MODES)
        check_choice("score", self.score, SCORE_KINDS)


# ----------------------------------------------------------------------------- regions and evidence
def au_region_masks(anchors: Any, size: int | Sequence[int], aus: Iterable[int] = ALL_AUS,
                    threshold: float = DEFAULT_THRESHOLD, sigma: float | None = None,
                    sigma_mode: str = "image") -> dict[int, np.ndarray]:
    """Boolean region (H, W) of each AU on this face: `au_map(anchors, au, size) >= threshold`."""
    threshold = check_threshold(threshold)
    arr = _check_anchors(anchors)
    hw = _size_hw(size)
    return {int(a): au_map(arr, int(a), hw, sigma, sigma_mode) >= threshold for a in aus}


def region_groups(masks: Mapping[int, np.ndarray]) -> dict[int, tuple[int, ...]]:
    """For each AU, the AUs whose region is identical to its own (itself included), sorted."""
    by_key: dict[bytes, list[int]] = {}
    for au, m in masks.items():
        by_key.setdefault(np.packbits(np.asarray(m, bool)).tobytes() + str(np.shape(m)).encode(), []).append(int(au))
    return {au: tuple(sorted(group)) for group in by_key.values() for au in group}


TABLE_COLUMNS = ("rank", "au", "name", "evidence", "mass_share", "area_share", "in_class", "same_region")


def au_evidence_table(saliency: Any, masks: Mapping[int, np.ndarray], class_aus: Iterable[int] = ()
                      ) -> tuple[Any, dict[str, float]]:
    """Per-AU evidence of one map (see the module doc) as a ranked DataFrame, plus the outside share.

    Columns: rank (1 = most evidence), au, name, evidence (= mass_share / area_share),
    mass_share, area_share, in_class (AU of the explained class), same_region (AUs with the
    identical region). Empty regions get NaN and rank last; an all-zero map gives NaN shares.
    """
    import pandas as pd

    sal = np.nan_to_num(np.asarray(saliency, np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if sal.ndim != 2:
        raise ValueError(f"saliency must be one (H, W) map; got shape {sal.shape}")
    if not masks:
        raise ValueError("no AU regions given")
    sal = np.clip(sal, 0.0, None)
    total = float(sal.sum())
    class_aus = {int(a) for a in class_aus}
    groups = region_groups(masks)
    union = np.zeros(sal.shape, bool)
    rows = []
    for au, mask in masks.items():
        mask = np.asarray(mask, bool)
        if mask.shape != sal.shape:
            raise ValueError(f"region of AU{au} has shape {mask.shape}, the map {sal.shape}")
        union |= mask
        area = float(mask.mean())
        mass = float(sal[mask].sum() / total) if total > 1e-12 else float("nan")
        rows.append({"au": int(au), "name": AU_NAMES.get(int(au), ""), "mass_share": mass, "area_share": area,
                     "evidence": mass / area if area > 0 else float("nan"), "in_class": int(au) in class_aus,
                     "same_region": ",".join(str(a) for a in groups[int(au)] if a != int(au))})
    table = pd.DataFrame(rows)
    table = table.sort_values(["evidence", "in_class", "au"], ascending=[False, False, True],
                              na_position="last", kind="mergesort").reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    outside_area = float(1.0 - union.mean())
    outside_mass = float(sal[~union].sum() / total) if total > 1e-12 else float("nan")
    outside = {"mass_share": outside_mass, "area_share": outside_area,
               "evidence": outside_mass / outside_area if outside_area > 0 else float("nan")}
    return table[list(TABLE_COLUMNS)], outside


def _join(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def summarise(class_name: str, probability: float, table: Any, outside: Mapping[str, float],
              max_aus: int = 2) -> str:
    """One line in the expert's terms: 'happiness (p=0.91), mainly from AU12 (lip corner puller) and AU6 (...)'.

    Names up to `max_aus` distinct regions (AUs sharing a region count once) whose evidence
    exceeds 1 (more than a uniform map), then the share of evidence outside every AU region.
    """
    chosen: list[str] = []
    used: set[frozenset] = set()
    for row in table.itertuples(index=False):
        if len(chosen) >= max_aus or not np.isfinite(row.evidence) or row.evidence <= 1.0:
            break
        group = frozenset([int(row.au), *[int(a) for a in str(row.same_region).split(",") if a]])
        if group in used:
            continue
        used.add(group)
        chosen.append(f"AU{int(row.au)} ({row.name})")
    text = f"{class_name} (p={probability:.2f})"
    text += f", mainly from {_join(chosen)}" if chosen else ", no AU region stands out (the evidence is spread " \
                                                            "evenly or lies outside the AU regions)"
    out = outside.get("mass_share", float("nan"))
    if np.isfinite(out):
        text += f"; {100 * out:.0f}% of the evidence lies outside every AU region"
    return text


# ----------------------------------------------------------------------------- explanations
@dataclass
class AUEvidence:
    """One prediction explained in AU terms: probabilities, the map, the ranked AU table, a summary."""

    predicted: int
    target: int  # the class the map explains
    probabilities: np.ndarray
    class_names: list[str]
    map_name: str  # "attention:<layer>" or a CAM method
    saliency: np.ndarray  # (H, W) in [0, 1]
    table: Any  # pandas DataFrame, TABLE_COLUMNS, ranked
    outside: dict[str, float]
    summary: str
    threshold: float = DEFAULT_THRESHOLD
    image: np.ndarray | None = None  # (H, W, 3) uint8: the model's input as shown
    anchors: np.ndarray | None = None
    masks: dict[int, np.ndarray] = field(default_factory=dict)
    source: str = ""
    face: int = 0  # index of the face in its photo (0 = the largest)
    box: tuple[int, int, int, int] | None = None  # the face's box (x0, y0, x1, y1) in photo pixels

    @property
    def predicted_name(self) -> str:
        return self.class_names[self.predicted]

    @property
    def target_name(self) -> str:
        return self.class_names[self.target]

    def ranked_aus(self) -> list[int]:
        """AUs from most to least evidence."""
        return [int(a) for a in self.table["au"]]

    def evidence_of(self, au: int) -> float:
        """The evidence (area-normalised) of one AU."""
        sel = self.table.loc[self.table["au"] == int(au), "evidence"]
        if sel.empty:
            raise KeyError(f"AU{au} is not in this table; AUs: {self.ranked_aus()}")
        return float(sel.iloc[0])

    def to_frame(self) -> Any:
        """The table plus a last row for the evidence outside every AU region (for CSV)."""
        import pandas as pd

        out = pd.DataFrame([{"rank": pd.NA, "au": pd.NA, "name": "outside all AU regions",
                             "evidence": self.outside["evidence"], "mass_share": self.outside["mass_share"],
                             "area_share": self.outside["area_share"], "in_class": False, "same_region": ""}])
        frame = pd.concat([self.table.astype({"rank": "Int64", "au": "Int64"}),
                           out.astype({"rank": "Int64", "au": "Int64"})], ignore_index=True)
        frame.insert(0, "region", [f"AU{a}" for a in self.table["au"]] + ["outside"])
        frame.insert(0, "face", self.face)
        return frame

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: prediction, probabilities by class, map, threshold, AU rows, outside, summary."""
        return {
            "source": self.source, "face": self.face, "box": None if self.box is None else list(self.box),
            "predicted": self.predicted_name, "explained_class": self.target_name,
            "probabilities": {c: float(p) for c, p in zip(self.class_names, self.probabilities)},
            "map": self.map_name, "threshold": self.threshold, "summary": self.summary,
            "aus": [{k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
                    for row in self.table.to_dict(orient="records")],
            "outside": dict(self.outside),
        }

    def save(self, out_dir: str | os.PathLike, stem: str, figure: bool = True) -> dict[str, Path]:
        """Write <stem>_evidence.csv, <stem>_evidence.json and (figure=True) <stem>_explanation.png atomically."""
        out_dir = Path(out_dir)
        paths = {"csv": out_dir / f"{stem}_evidence.csv", "json": out_dir / f"{stem}_evidence.json"}
        atomic_write_csv(paths["csv"], self.to_frame())
        atomic_write_json(paths["json"], {"run": run_info(), **self.to_dict()})
        if figure:
            import matplotlib.pyplot as plt

            paths["png"] = out_dir / f"{stem}_explanation.png"
            fig = evidence_figure(self, paths["png"])
            plt.close(fig)
        return paths


def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters
        return torch.device("cpu")


def _class_names(model: nn.Module, n: int, class_names: Sequence[str] | None) -> list[str]:
    names = list(class_names) if class_names is not None else list((getattr(model, "config", {}) or {})
                                                                   .get("class_names") or [])
    if len(names) != n:
        names = [f"class_{i}" for i in range(n)]
    return names


def _resolve_targets(target: Any, n: int, preds: torch.Tensor, class_names: Sequence[str]) -> torch.Tensor:
    if target is None or (isinstance(target, str) and target == "prediction"):
        return preds.clone()
    if isinstance(target, str):
        if target not in class_names:
            raise ConfigError(f"unknown target class {target!r}; valid: 'prediction' or one of {', '.join(class_names)}")
        return torch.full((n,), list(class_names).index(target), dtype=torch.long)
    ids = torch.as_tensor(target).view(-1).long()
    if ids.numel() == 1:
        ids = ids.expand(n).clone()
    if ids.numel() != n or (ids < 0).any() or (ids >= len(class_names)).any():
        raise ConfigError(f"target must be 'prediction', a class name or class ids in 0..{len(class_names) - 1} "
                          f"(one or one per image); got {target!r}")
    return ids


def explanation_maps(model: nn.Module, images: torch.Tensor, map_name: str = ATTENTION,
                     class_ids: torch.Tensor | None = None, layer: str | None = None,
                     scale: str = "minmax") -> tuple[np.ndarray, str]:
    """The explanation maps (B, H, W) at image size, non-negative, and their label ('attention:layer4', 'gradcam').

    Attention: the tapped `layer`'s (default: the model's last tap) mean over channels, bilinearly upsampled,
    then min-max scaled ("minmax") or clamped at 0 ("relu"). CAMs: fer_lib.analysis.interpret.compute_cams
    for `class_ids` (already in [0, 1]).
    """
    map_name = check_map(map_name)
    check_choice("scale", scale, SCALE_MODES)
    if map_name == ATTENTION:
        name = tapped_layers(model, layer)[0] if layer is not None else list(model.tap_names)[-1]
        att = layer_attention_maps(model, images, [name])[name][:, 0].float()
        maps = minmax_scale(att) if scale == "minmax" else att.clamp_min(0.0)
        return maps.detach().cpu().numpy(), f"attention:{name}"
    if class_ids is None:
        raise ValueError("a CAM needs the class ids it explains")
    return compute_cams(model, images, map_name, class_ids, layer=layer).numpy(), map_name


def explain_batch(model: nn.Module, images: torch.Tensor, anchors: Any, settings: ExplainSettings | None = None, *,
                  class_names: Sequence[str] | None = None, rgb: np.ndarray | None = None,
                  sources: Sequence[str] | None = None, timings: dict[str, float] | None = None) -> list[AUEvidence]:
    """Explain a batch of normalised images (B, 3, H, W) with their faces' anchors (B, A, 2).

    `settings` (default ExplainSettings()): the map, layer, target ("prediction", a class name,
    or class id(s)), threshold, scale, AUs and summary length. Every face needs finite anchors
    (faces without landmarks have no AU regions: filter them first). `timings`, if given,
    accumulates the seconds of the model's forward pass ("model") and of the maps and tables ("explanation").
    """
    settings = settings or ExplainSettings()
    images = torch.as_tensor(images)
    if images.dim() != 4:
        raise ValueError(f"images must be a (B, 3, H, W) batch; got shape {tuple(images.shape)}")
    anchors = np.asarray(anchors, np.float32).reshape(images.shape[0], -1, 2) if len(images) else np.zeros((0, 0, 2))
    for a in anchors:
        _check_anchors(a)
    model.eval()
    x = images.to(_model_device(model))
    t0 = time.perf_counter()
    with torch.no_grad():
        logits = model.classify(x).float()
    probs = logits.softmax(dim=1).cpu()
    t1 = time.perf_counter()
    preds = probs.argmax(dim=1)
    names = _class_names(model, probs.shape[1], class_names)
    targets = _resolve_targets(settings.target, len(x), preds, names)
    maps, label = explanation_maps(model, x, settings.map_name, targets, settings.layer, settings.scale)
    h, w = x.shape[-2:]
    out: list[AUEvidence] = []
    for i in range(len(x)):
        masks = au_region_masks(anchors[i], (h, w), settings.aus, settings.threshold)
        cls = names[int(targets[i])]
        table, outside = au_evidence_table(maps[i], masks, CODEBOOK.get(cls, ()))
        summary = summarise(cls, float(probs[i, targets[i]]), table, outside, settings.max_aus)
        if int(targets[i]) != int(preds[i]):
            summary = f"[explaining {cls}; predicted {names[int(preds[i])]}] " + summary
        out.append(AUEvidence(predicted=int(preds[i]), target=int(targets[i]), probabilities=probs[i].numpy(),
                              class_names=names, map_name=label, saliency=maps[i], table=table, outside=outside,
                              summary=summary, threshold=settings.threshold,
                              image=None if rgb is None else np.asarray(rgb[i]), anchors=anchors[i], masks=masks,
                              source="" if sources is None else str(sources[i])))
    if timings is not None:
        timings["model"] = timings.get("model", 0.0) + (t1 - t0)
        timings["explanation"] = timings.get("explanation", 0.0) + (time.perf_counter() - t1)
    return out


def model_input(rgb: np.ndarray, anchors: np.ndarray | None, model: nn.Module) -> tuple[np.ndarray, np.ndarray | None,
                                                                                        torch.Tensor]:
    """Resize a face (RGB uint8) to the model's input size exactly as the datasets do; (rgb, anchors, tensor)."""
    cfg = getattr(model, "config", {}) or {}
    size = int(cfg.get("image_size") or 112)
    image, anchors = geometric_transform(Image.fromarray(as_rgb_array(rgb)), anchors, size)
    arr = np.asarray(image, np.uint8)
    return arr, anchors, input_tensor(cfg, arr)


@dataclass
class ExplainedImage:
    """The outcome for one face of an input image: its AUEvidence, or why there is none (no face, unreadable).

    A photo with several faces gives one ExplainedImage per face (`face` 0 = the largest,
    `box` in photo pixels, `n_faces` in the photo); a photo without a face gives one with
    `evidence=None` and `face=-1`.
    """

    source: str
    evidence: AUEvidence | None
    error: str = ""
    face: int = 0
    box: tuple[int, int, int, int] | None = None
    n_faces: int = 1
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.evidence is not None


#: margin around each face box when a photo with several faces is cut into faces (crop_margin=None)
FACE_MARGIN = 0.25


def _photo_faces(item: Any, max_faces: int | None, finder: Any, cache: Any) -> tuple[np.ndarray, list[Any], list[str]]:
    """(the photo upright as RGB, its faces largest first, notes on how it was read); ImageError if unreadable."""
    notes: list[str] = []
    if isinstance(item, (str, os.PathLike)):
        rgb, notes = read_image(item, max_side=DETECT_MAX_SIDE)
    else:
        rgb = as_rgb_array(item)
    faces = detect_faces(item if isinstance(item, (str, os.PathLike)) else rgb, max_faces, finder, cache)
    return rgb, faces, notes


def _find_faces(images: list[Any], settings: ExplainSettings, detector: Any, cache: Any
                ) -> list[tuple[str, Any, list[Any], list[str], str]]:
    """(source, rgb, faces, notes, error) per input: detect_faces (every face), or one face per image of a
    single-face LandmarkDetector `detector`."""
    photos: list[tuple[str, Any, list[Any], list[str], str]] = []
    if detector is not None and not isinstance(detector, FaceFinder):
        batch = detect_landmarks(images, detector, cache, progress=settings.progress, desc="landmarks")
        for i, (item, rec) in enumerate(zip(images, batch.records)):
            faces = [] if rec.landmarks is None else [_single_face(rec.landmarks)]
            photos.append((results_source(item, i), item, faces, [], rec.reason or "no face found"))
        return photos
    finder = detector or FaceFinder()
    try:
        for i, item in enumerate(progress_bar(images, desc="faces", disable=not settings.progress)):
            try:
                rgb, faces, notes = _photo_faces(item, settings.max_faces, finder, cache)
                photos.append((results_source(item, i), rgb, faces, notes,
                               "" if faces else "no face found by " + finder.cache_key))
            except ImageError as exc:
                photos.append((results_source(item, i), None, [], [], f"unreadable: {exc}"))
    finally:
        if detector is None:
            finder.close()
    return photos


def _face_inputs(model: nn.Module, photos: list[tuple[str, Any, list[Any], list[str], str]],
                 crop_margin: float | None) -> tuple[list[ExplainedImage], list[tuple[int, np.ndarray, np.ndarray, torch.Tensor]]]:
    """One ExplainedImage per face (or per photo without one), and each explainable face's (result index, rgb,
    anchors, model input), cropped and resized as the datasets do."""
    results: list[ExplainedImage] = []
    ready: list[tuple[int, np.ndarray, np.ndarray, torch.Tensor]] = []
    for source, item, faces, notes, error in photos:
        if not faces:
            results.append(ExplainedImage(source, None, error, face=-1, n_faces=0, notes=notes))
            continue
        try:
            rgb = as_rgb_array(item)
        except ImageError as exc:
            results.append(ExplainedImage(source, None, f"unreadable: {exc}", face=-1, n_faces=0, notes=notes))
            continue
        for face in faces:
            res = ExplainedImage(source, None, face=face.index, box=face.box, n_faces=len(faces), notes=notes)
            results.append(res)
            try:
                lm, face_rgb = face.landmarks, rgb
                margin = crop_margin if crop_margin is not None or len(faces) == 1 else FACE_MARGIN
                if margin is not None:
                    face_rgb, lm = crop_to_face(rgb, lm, margin=float(margin))
                anchors = lm.anchors()
                if not np.isfinite(anchors).all():
                    raise ImageError("landmarks without finite anchors")
                arr, anchors, x = model_input(face_rgb, anchors, model)
            except ImageError as exc:
                res.error = f"unreadable: {exc}"
                continue
            ready.append((len(results) - 1, arr, anchors, x))
    return results, ready


def explain_images(model: nn.Module, images: Any, settings: ExplainSettings | None = None, *, detector: Any = None,
                   cache: LandmarkCache | str | os.PathLike | None = None, batch_size: int = 16,
                   timings: dict[str, float] | None = None) -> list[ExplainedImage]:
    """Explain every face of image files / arrays / PIL images (or one of them): find faces, resize as the datasets
    do, explain.

    Faces: `fer_lib.faces.landmarks.detect_faces` (full-range face detector, then FaceMesh on each
    face), largest first, at most `settings.max_faces` per photo (None: all); a `detector` given (a
    LandmarkDetector) instead finds one face per image. A photo with one face is fed whole
    (`settings.crop_margin=None`, as the datasets do) or cropped to the face with that margin; with
    several faces each face is cropped (margin `crop_margin`, default FACE_MARGIN).
    Never raises for one bad item: unreadable files and photos without a face come back with
    `evidence=None` and the reason. `timings`, if given, accumulates seconds per step
    ("landmarks", "model", "explanation").
    """
    settings = settings or ExplainSettings()
    images = list(as_image_sequence(images))
    timings = timings if timings is not None else {}
    t0 = time.perf_counter()
    photos = _find_faces(images, settings, detector, cache)
    timings["landmarks"] = timings.get("landmarks", 0.0) + time.perf_counter() - t0
    dev = resolve_device(settings.device) if settings.device is not None else _model_device(model)
    model = model.to(dev).eval()
    results, ready = _face_inputs(model, photos, settings.crop_margin)
    chunks = [ready[s:s + batch_size] for s in range(0, len(ready), batch_size)]
    for chunk in progress_bar(chunks, desc="explain", disable=not settings.progress or not chunks, leave=False):
        idx = [c[0] for c in chunk]
        evs = explain_batch(model, torch.stack([c[3] for c in chunk]), np.stack([c[2] for c in chunk]), settings,
                            rgb=np.stack([c[1] for c in chunk]), sources=[results[i].source for i in idx],
                            timings=timings)
        for i, ev in zip(idx, evs):
            ev.face, ev.box = results[i].face, results[i].box
            results[i].evidence = ev
    return results


def _single_face(landmarks: Any) -> Any:
    """A one-face result of a single-face LandmarkDetector, in detect_faces' terms (index 0, its landmark box)."""
    b = landmark_box(landmarks)
    w, h = landmarks.image_size
    box = (max(0, int(b.x0)), max(0, int(b.y0)), min(int(w), int(np.ceil(b.x1))), min(int(h), int(np.ceil(b.y1))))
    return Face(index=0, box=box, landmarks=landmarks)


def results_source(item: Any, index: int) -> str:
    """How an input is named in reports: its path, or 'array#i'."""
    return str(item) if isinstance(item, (str, os.PathLike)) else f"array#{index}"


# ----------------------------------------------------------------------------- deletion test
def _face_box(anchors: np.ndarray, h: int, w: int) -> tuple[slice, slice]:
    a = np.clip(np.asarray(anchors, np.float64), 0.0, 1.0)
    x0, y0 = int(np.floor(a[:, 0].min() * w)), int(np.floor(a[:, 1].min() * h))
    x1, y1 = int(np.ceil(a[:, 0].max() * w)), int(np.ceil(a[:, 1].max() * h))
    return slice(y0, max(y1, y0 + 1)), slice(x0, max(x1, x0 + 1))


def fill_image(image: torch.Tensor, anchors: np.ndarray, mode: str = "mean") -> torch.Tensor:
    """What deleted pixels become: the face's mean colour (over the landmark box) everywhere, or a blurred copy."""
    check_choice("fill mode", mode, FILL_MODES)
    image = torch.as_tensor(image).float()
    c, h, w = image.shape
    if mode == "mean":
        ys, xs = _face_box(anchors, h, w)
        colour = image[:, ys, xs].reshape(c, -1).mean(dim=1)
        return colour[:, None, None].expand(c, h, w).clone()
    from torchvision.transforms.functional import gaussian_blur

    sigma = max(1.0, 0.05 * max(h, w))
    k = int(2 * np.ceil(3 * sigma) + 1)
    return gaussian_blur(image[None], [k, k], [sigma, sigma])[0]


def _delete(image: torch.Tensor, fill: torch.Tensor, mask: np.ndarray) -> torch.Tensor:
    m = torch.from_numpy(np.asarray(mask, bool)).to(image.device)[None]
    return torch.where(m, fill, image)


@dataclass
class DeletionResult:
    """Scores of the explained class after deleting AU regions (see `deletion_test`)."""

    base: float
    drops: dict[str, float]  # "top" / "random" / "bottom" -> score(original) - score(deleted)
    regions: dict[str, list[int]]  # which AUs (one region) each deletion removed
    areas: dict[str, float]  # image share of each deleted region
    curves: dict[str, np.ndarray]  # "morf" / "lerf" / "random" -> score after deleting 0..K regions
    curve_areas: dict[str, np.ndarray]  # deleted image share after 0..K regions
    order: list[list[int]]  # the distinct regions (AU groups) in ranked order


def _distinct_regions(evidence: AUEvidence) -> list[tuple[list[int], np.ndarray, float]]:
    seen: set[frozenset] = set()
    out = []
    for row in evidence.table.itertuples(index=False):
        if not np.isfinite(row.evidence):
            continue
        group = frozenset([int(row.au), *[int(a) for a in str(row.same_region).split(",") if a]])
        if group in seen:
            continue
        seen.add(group)
        au = int(row.au)
        out.append(([au, *sorted(group - {au})], evidence.masks[au], float(row.area_share)))
    return out


@torch.no_grad()
def _scores(model: nn.Module, batch: torch.Tensor, target: int, score: str, chunk: int = 32) -> np.ndarray:
    out = []
    for s in range(0, len(batch), chunk):
        logits = model.classify(batch[s:s + chunk]).float()
        val = logits.softmax(dim=1)[:, target] if score == "probability" else logits[:, target]
        out.append(val.cpu())
    return torch.cat(out).numpy().astype(np.float64)


def deletion_test(model: nn.Module, image: torch.Tensor, evidence: AUEvidence, fill: str = "mean",
                  score: str = "probability", seed: int = 0, area_tolerance: float = 0.5) -> DeletionResult:
    """Delete the top, a random (similar area) and the bottom AU region of one face; plus ranked-deletion curves.

    `image` is the normalised (3, H, W) input the evidence was computed on. The random
    region is drawn (seeded) among the other distinct regions whose area is within a factor
    (1 + area_tolerance) of the top region's, or the three closest in area if none is.
    """
    check_choice("fill mode", fill, FILL_MODES)
    check_choice("score", score, SCORE_KINDS)
    if evidence.anchors is None or not evidence.masks:
        raise ValueError("the evidence carries no anchors/regions (it must come from explain_batch/explain_images)")
    regions = _distinct_regions(evidence)
    if len(regions) < 2:
        raise ValueError(f"the deletion test needs at least 2 distinct non-empty AU regions; this face has {len(regions)}")
    rng = np.random.default_rng(seed)
    device = _model_device(model)
    model.eval()
    x = torch.as_tensor(image).float().to(device)
    filler = fill_image(x.cpu(), evidence.anchors, fill).to(device)
    top, bottom = regions[0], regions[-1]
    others = regions[1:]
    ratio = np.array([abs(np.log(max(r[2], 1e-9) / max(top[2], 1e-9))) for r in others])
    close = [r for r, q in zip(others, ratio) if q <= np.log1p(area_tolerance)]
    if not close:
        close = [others[j] for j in np.argsort(ratio, kind="stable")[:3]]
    rand = close[int(rng.integers(len(close)))]
    chosen = {"top": top, "random": rand, "bottom": bottom}
    k = len(regions)
    orders = {"morf": list(range(k)), "lerf": list(range(k))[::-1], "random": list(rng.permutation(k))}
    batch = [x] + [_delete(x, filler, chosen[d][1]) for d in DELETIONS]
    curve_areas: dict[str, np.ndarray] = {}
    for name, order in orders.items():
        union = np.zeros_like(regions[0][1], dtype=bool)
        areas = [0.0]
        for j in order:
            union |= regions[j][1]
            batch.append(_delete(x, filler, union))
            areas.append(float(union.mean()))
        curve_areas[name] = np.asarray(areas)
    scores = _scores(model, torch.stack(batch), evidence.target, score)
    base = float(scores[0])
    drops = {d: base - float(scores[1 + i]) for i, d in enumerate(DELETIONS)}
    curves, pos = {}, 1 + len(DELETIONS)
    for name in orders:
        curves[name] = np.concatenate([[base], scores[pos:pos + k]])
        pos += k
    return DeletionResult(base=base, drops=drops, regions={d: list(chosen[d][0]) for d in DELETIONS},
                          areas={d: float(chosen[d][2]) for d in DELETIONS}, curves=curves, curve_areas=curve_areas,
                          order=[r[0] for r in regions])


# ----------------------------------------------------------------------------- dataset evaluation
@dataclass
class EvidenceReport:
    """AU evidence, deletion drops and curves over a dataset, with a summary (see `au_evidence_report`)."""

    evidence: Any  # DataFrame: one row per (sample, au)
    samples: Any  # DataFrame: one row per sample (prediction, outside share, deletion drops)
    curves: Any  # DataFrame: one row per (sample, order, k)
    summary: dict[str, Any]
    skipped: list[tuple[int, str]] = field(default_factory=list)
    examples: list[AUEvidence] = field(default_factory=list)

    def save(self, out_dir: str | os.PathLike, prefix: str = "") -> dict[str, Path]:
        """Write <prefix>evidence.csv, samples.csv, curves.csv and summary.json (with run_info) atomically."""
        out_dir = Path(out_dir)
        paths = {k: out_dir / f"{prefix}{k}.csv" for k in ("evidence", "samples", "curves")}
        atomic_write_csv(paths["evidence"], self.evidence)
        atomic_write_csv(paths["samples"], self.samples)
        atomic_write_csv(paths["curves"], self.curves)
        paths["summary"] = out_dir / f"{prefix}summary.json"
        atomic_write_json(paths["summary"], {"run": run_info(self.summary.get("config")), **self.summary,
                                             "skipped": [{"index": i, "reason": r} for i, r in self.skipped]})
        return paths


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    a, b = np.asarray(a, float), np.asarray(b, float)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0:
        return float("nan")
    return float(spearmanr(a[ok], b[ok]).statistic)


def spearman_summary(evidence: Any) -> dict[str, Any]:
    """Spearman(evidence, true intensity): per image over AUs (mean, median, n), per AU over images, pooled."""
    if "true_intensity" not in evidence or evidence["true_intensity"].isna().all():
        return {"available": False}
    ev = evidence.dropna(subset=["true_intensity"])
    per_image = ev.groupby("sample").apply(lambda g: _spearman(g["evidence"], g["true_intensity"]),
                                           include_groups=False)
    per_au = ev.groupby("au").apply(lambda g: _spearman(g["evidence"], g["true_intensity"]), include_groups=False)
    vals = per_image.to_numpy(float)
    ok = vals[np.isfinite(vals)]
    au_vals = per_au.to_numpy(float)
    return {"available": True, "per_image_mean": float(ok.mean()) if ok.size else float("nan"),
            "per_image_median": float(np.median(ok)) if ok.size else float("nan"),
            "per_image_se": float(ok.std(ddof=1) / np.sqrt(ok.size)) if ok.size > 1 else float("nan"),
            "n_images": int(ok.size),
            "per_au": {int(a): float(v) for a, v in per_au.items()},
            "per_au_mean": float(np.nanmean(au_vals)) if np.isfinite(au_vals).any() else float("nan"),
            "pooled": _spearman(ev["evidence"], ev["true_intensity"])}


def deletion_summary(samples: Any) -> dict[str, Any]:
    """Mean drops (top / random / bottom, with standard errors), how often top beats the controls, Wilcoxon p,
    and the effect size: mean_diff_top_vs_<control> (mean of drop_top - drop_<control>) with its 95% bootstrap
    interval mean_diff_top_vs_<control>_ci = [low, high] (None without samples)."""
    from scipy.stats import wilcoxon

    cols = [f"drop_{d}" for d in DELETIONS]
    if any(c not in samples for c in cols):
        return {"available": False}
    frame = samples.dropna(subset=cols)
    n = len(frame)
    out: dict[str, Any] = {"available": n > 0, "n": int(n)}
    for d in DELETIONS:
        v = frame[f"drop_{d}"].to_numpy(float)
        out[f"mean_drop_{d}"] = float(v.mean()) if n else float("nan")
        out[f"se_drop_{d}"] = float(v.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    for other in ("random", "bottom"):
        diff = (frame["drop_top"] - frame[f"drop_{other}"]).to_numpy(float)
        out[f"top_beats_{other}_rate"] = float((diff > 0).mean()) if n else float("nan")
        out[f"mean_diff_top_vs_{other}"] = float(diff.mean()) if n else float("nan")
        out[f"mean_diff_top_vs_{other}_ci"] = as_interval(bootstrap_interval(diff)) if n else None
        try:
            out[f"wilcoxon_p_top_vs_{other}"] = float(wilcoxon(diff, alternative="greater").pvalue) \
                if n >= 5 and np.any(diff != 0) else float("nan")
        except ValueError:
            out[f"wilcoxon_p_top_vs_{other}"] = float("nan")
    out["base_score_mean"] = float(frame["base_score"].mean()) if n else float("nan")
    return out


def curve_summary(curves: Any) -> dict[str, Any]:
    """Mean score after deleting k regions, per order, and the mean over k (area under the curve)."""
    if len(curves) == 0:
        return {}
    mean = curves.groupby(["order", "k"])["score"].mean()
    out: dict[str, Any] = {}
    for order in CURVE_ORDERS:
        if order in mean.index.get_level_values(0):
            vals = mean.loc[order].to_numpy(float)
            out[order] = vals.tolist()
            out[f"{order}_auc"] = float(vals.mean())
    if "morf_auc" in out and "lerf_auc" in out:
        out["lerf_minus_morf_auc"] = out["lerf_auc"] - out["morf_auc"]
    return out


def _true_intensities(dataset: Any, index: int) -> dict[int, float] | None:
    records = getattr(dataset, "records", None)
    if records is None or index >= len(records):
        return None
    meta = getattr(records[index], "meta", None) or {}
    aus = meta.get("aus")
    return {int(k): float(v) for k, v in aus.items()} if aus else None


def _report_items(dataset: Any, chunk: Sequence[int], mean: torch.Tensor, std: torch.Tensor,
                  skipped: list[tuple[int, str]]) -> list[tuple[int, np.ndarray, np.ndarray, torch.Tensor]]:
    """(index, rgb, anchors, normalised input) of the un-augmented items of `chunk` with landmarks (others skipped)."""
    items = []
    for i in chunk:
        rgb, anchors, _ = dataset.sample(i, augment=False)
        if anchors is None or not np.isfinite(anchors).all():
            skipped.append((int(i), "no landmarks"))
            continue
        x = (torch.from_numpy(np.array(rgb, np.uint8)).permute(2, 0, 1).float() / 255.0 - mean) / std
        items.append((int(i), rgb, np.asarray(anchors, np.float32), x))
    return items


def _evidence_rows(i: int, label: int, ev: AUEvidence, truth: dict[int, float] | None) -> list[dict[str, Any]]:
    return [{"sample": i, "label": label, "pred": ev.predicted, "target": ev.target, "au": int(row.au),
             "rank": int(row.rank), "evidence": float(row.evidence), "mass_share": float(row.mass_share),
             "area_share": float(row.area_share), "in_class": bool(row.in_class),
             "true_intensity": truth.get(int(row.au), np.nan) if truth else np.nan}
            for row in ev.table.itertuples(index=False)]


def _deletion_rows(model: nn.Module, x: torch.Tensor, ev: AUEvidence, i: int, deletion: DeletionSettings, seed: int,
                   srow: dict[str, Any], curve_rows: list[dict[str, Any]]) -> str | None:
    """Run the deletion test of one face into its sample row and the curve rows; the reason when it cannot run."""
    try:
        res = deletion_test(model, x, ev, deletion.fill, deletion.score, seed=seed + i,
                            area_tolerance=deletion.area_tolerance)
    except ValueError as exc:
        return f"deletion test: {exc}"
    srow["base_score"] = res.base
    for d in DELETIONS:
        srow[f"drop_{d}"] = res.drops[d]
        srow[f"{d}_region"] = "+".join(f"AU{a}" for a in res.regions[d])
        srow[f"{d}_area"] = res.areas[d]
    for order, vals in res.curves.items():
        for k, v in enumerate(vals):
            curve_rows.append({"sample": i, "order": order, "k": k, "score": float(v),
                               "deleted_area": float(res.curve_areas[order][k])})
    return None


def _report_summary(evidence: Any, samples: Any, curves: Any, settings: ExplainSettings, map_label: str,
                    deletion: DeletionSettings | None, n_requested: int, n_skipped: int) -> dict[str, Any]:
    mean = lambda col: float(samples[col].mean()) if len(samples) else float("nan")  # noqa: E731
    return {
        "n_requested": n_requested, "n_explained": int(len(samples)), "n_skipped": n_skipped, "map": map_label,
        "threshold": settings.threshold, "target": settings.target,
        "fill": (deletion or DeletionSettings()).fill, "score": (deletion or DeletionSettings()).score,
        "accuracy": mean("correct"), "outside_mass_mean": mean("outside_mass"), "outside_area_mean": mean("outside_area"),
        "spearman": spearman_summary(evidence),
        "deletion": deletion_summary(samples) if deletion is not None and len(samples) else {"available": False},
        "curves": curve_summary(curves),
    }


def au_evidence_report(model: nn.Module, dataset: Any, settings: ExplainSettings | None = None,
                       deletion: DeletionSettings | None = DeletionSettings(), *, n_samples: int | None = 64,
                       seed: int = 0, batch_size: int = 16, n_examples: int = 0) -> EvidenceReport:
    """AU evidence (and the deletion test, unless `deletion=None`) for a seeded subset of a FERDataset.

    `settings.target`: "prediction" or "label" (the class the map explains). Faces without
    landmarks are skipped and listed. Synthetic records carry true AU intensities
    (`record.meta["aus"]`), which add `true_intensity` to the evidence rows and the Spearman
    summary. `n_examples` keeps that many AUEvidence objects for figures.
    """
    import pandas as pd

    settings = settings or ExplainSettings()
    check_choice("target", settings.target, ("prediction", "label"))
    if not hasattr(dataset, "sample"):
        raise ConfigError("au_evidence_report needs a fer_lib.data.FERDataset (it reads each face's anchors via "
                          f".sample()); got {type(dataset).__name__}")
    model = model.to(resolve_device(settings.device)).eval()
    names = list(getattr(dataset, "class_names", None) or _class_names(model, int(model.config["num_classes"]), None))
    mean = torch.tensor(dataset.mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(dataset.std, dtype=torch.float32)[:, None, None]
    indices = subset_indices(len(dataset), n_samples, seed)
    ev_rows: list[dict[str, Any]] = []
    sample_rows: list[dict[str, Any]] = []
    curve_rows: list[dict[str, Any]] = []
    skipped: list[tuple[int, str]] = []
    examples: list[AUEvidence] = []
    chunks = [indices[s:s + batch_size] for s in range(0, len(indices), batch_size)]
    for chunk in progress_bar(chunks, desc="AU evidence", disable=not settings.progress, leave=False):
        items = _report_items(dataset, chunk, mean, std, skipped)
        if not items:
            continue
        labels = [int(dataset.records[i].label) for i, *_ in items]
        evs = explain_batch(model, torch.stack([it[3] for it in items]), np.stack([it[2] for it in items]),
                            settings.replace(target="prediction" if settings.target == "prediction" else labels),
                            class_names=names, rgb=np.stack([it[1] for it in items]),
                            sources=[str(getattr(dataset.records[i], "path", i)) for i, *_ in items])
        for (i, _, _, x), label, ev in zip(items, labels, evs):
            ev_rows += _evidence_rows(i, label, ev, _true_intensities(dataset, i))
            srow: dict[str, Any] = {"sample": i, "label": label, "label_name": names[label], "pred": ev.predicted,
                                    "pred_name": ev.predicted_name, "target": ev.target,
                                    "probability": float(ev.probabilities[ev.target]),
                                    "correct": ev.predicted == label, "top_au": ev.ranked_aus()[0],
                                    "outside_mass": ev.outside["mass_share"], "outside_area": ev.outside["area_share"],
                                    "summary": ev.summary}
            why = _deletion_rows(model, x, ev, i, deletion, seed, srow, curve_rows) if deletion is not None else None
            if why:
                skipped.append((i, why))
            sample_rows.append(srow)
            if len(examples) < n_examples:
                examples.append(ev)
    evidence = pd.DataFrame(ev_rows, columns=["sample", "label", "pred", "target", "au", "rank", "evidence",
                                              "mass_share", "area_share", "in_class", "true_intensity"])
    samples = pd.DataFrame(sample_rows)
    curves = pd.DataFrame(curve_rows, columns=["sample", "order", "k", "score", "deleted_area"])
    map_label = settings.map_name if settings.map_name != ATTENTION else \
        f"attention:{tapped_layers(model, settings.layer or 'last')[0]}"
    summary = _report_summary(evidence, samples, curves, settings, map_label, deletion, len(indices), len(skipped))
    d = deletion or DeletionSettings()
    summary["config"] = {"n_samples": n_samples, "map": settings.map_name, "layer": settings.layer,
                         "target": settings.target, "threshold": settings.threshold, "deletion": deletion is not None,
                         "fill": d.fill, "score": d.score, "seed": seed, "area_tolerance": d.area_tolerance,
                         "model": getattr(model, "config", None),
                         "dataset": f"{getattr(dataset, 'name', '')}:{getattr(dataset, 'split', '')}"}
    return EvidenceReport(evidence=evidence, samples=samples, curves=curves, summary=summary, skipped=skipped,
                          examples=examples)


def class_evidence(evidence: Any, by: str = "pred", class_names: Sequence[str] | None = None) -> Any:
    """Mean AU evidence per class (rows, by predicted class or label) and AU (columns)."""
    check_choice("by", by, ("pred", "label", "target"))
    table = evidence.pivot_table(index=by, columns="au", values="evidence", aggfunc="mean")
    if class_names is not None:
        table.index = [class_names[int(i)] for i in table.index]
    table.columns = [f"AU{int(a)}" for a in table.columns]
    return table


def codebook_evidence_agreement(class_table: Any) -> Any:
    """Per class: mean evidence of its codebook AUs vs the other AUs, and the AUC (P(codebook AU > other AU))."""
    import pandas as pd

    rows = []
    for cls, row in class_table.iterrows():
        aus = set(CODEBOOK.get(str(cls), ()))
        vals = {int(c[2:]): float(v) for c, v in row.items() if np.isfinite(v)}
        own = np.array([v for a, v in vals.items() if a in aus])
        other = np.array([v for a, v in vals.items() if a not in aus])
        if own.size and other.size:
            auc = float(((own[:, None] > other[None]).sum() + 0.5 * (own[:, None] == other[None]).sum())
                        / (own.size * other.size))
        else:
            auc = float("nan")
        rows.append({"class": cls, "codebook_aus": ",".join(map(str, sorted(aus))),
                     "mean_evidence_codebook": float(own.mean()) if own.size else float("nan"),
                     "mean_evidence_other": float(other.mean()) if other.size else float("nan"), "auc": auc,
                     "top_aus": ",".join(c[2:] for c in row.sort_values(ascending=False).index[:3])})
    return pd.DataFrame(rows).set_index("class")


# ----------------------------------------------------------------------------- figures
def evidence_figure(ev: AUEvidence, path: str | os.PathLike | None = None, show_regions: int = 3,
                    cmap: str = "jet", alpha: float = 0.5) -> Any:
    """Face with its top AU regions outlined, the map as an overlay, and a bar chart of the evidence per AU."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.9), gridspec_kw={"width_ratios": [1, 1, 1.5]})
    image = ev.image if ev.image is not None else np.full((*ev.saliency.shape, 3), 128, np.uint8)
    axes[0].imshow(image)
    colours = plt.get_cmap("tab10")
    shown = 0
    handles: list[Any] = []
    used: set[frozenset] = set()
    for row in ev.table.itertuples(index=False):
        if shown >= show_regions or not np.isfinite(row.evidence):
            break
        group = frozenset([int(row.au), *[int(a) for a in str(row.same_region).split(",") if a]])
        m = ev.masks.get(int(row.au))
        if group in used or m is None or not m.any():
            continue
        used.add(group)
        colour = to_hex(colours(shown))
        axes[0].contour(m.astype(float), levels=[0.5], colors=[colour], linewidths=1.5)
        handles.append(Line2D([], [], color=colour, lw=2, label=f"AU{int(row.au)}"))
        shown += 1
    if handles:
        axes[0].legend(handles=handles, fontsize=7, loc="lower right", framealpha=0.7)
    axes[0].set_title(f"{ev.predicted_name} (p={ev.probabilities[ev.predicted]:.2f})", fontsize=9)
    axes[1].imshow(image)
    axes[1].imshow(ev.saliency, cmap=cmap, alpha=alpha, vmin=0.0, vmax=1.0)
    axes[1].set_title(f"{ev.map_name} for {ev.target_name}", fontsize=9)
    for ax in axes[:2]:
        ax.set_xticks([])
        ax.set_yticks([])
    t = ev.table
    labels = [f"AU{int(a)} {n}" for a, n in zip(t["au"], t["name"])] + ["outside AU regions"]
    values = list(t["evidence"].to_numpy(float)) + [ev.outside["evidence"]]
    cols = ["tab:orange" if c else "tab:blue" for c in t["in_class"]] + ["tab:gray"]
    ypos = np.arange(len(labels))
    axes[2].barh(ypos, np.nan_to_num(values), color=cols)
    axes[2].axvline(1.0, color="k", ls="--", lw=0.8)
    axes[2].set_yticks(ypos, labels, fontsize=7)
    axes[2].invert_yaxis()
    axes[2].set_xlabel("evidence = mass share / area share (1 = uniform)", fontsize=8)
    axes[2].set_title(f"AU evidence (orange: AUs of {ev.target_name} in the codebook)", fontsize=8)
    fig.suptitle("\n".join(textwrap.wrap(f"face {ev.face}: {ev.summary}", 120)), fontsize=9)
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path)
    return fig


def deletion_figure(reports: Mapping[str, EvidenceReport], path: str | os.PathLike | None = None) -> Any:
    """Left: mean score drop when deleting the top / a random / the bottom AU region; right: ranked-deletion curves
    (mean change of the score from the original face, +- standard error)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 1 + len(reports), figsize=(4.2 * (1 + len(reports)), 3.6), squeeze=False)
    axes = axes[0]
    width = 0.8 / max(1, len(reports))
    for j, (name, rep) in enumerate(reports.items()):
        d = rep.summary.get("deletion", {})
        if not d.get("available"):
            continue
        means = [d[f"mean_drop_{k}"] for k in DELETIONS]
        ses = [d[f"se_drop_{k}"] for k in DELETIONS]
        axes[0].bar(np.arange(3) + j * width, means, width, yerr=np.nan_to_num(ses), capsize=3, label=name)
    axes[0].set_xticks(np.arange(3) + width * (len(reports) - 1) / 2, list(DELETIONS))
    axes[0].axhline(0, color="k", lw=0.6)
    axes[0].set_ylabel("score drop (original - deleted)")
    axes[0].set_title("deleting one AU region (top / random of similar area / bottom)", fontsize=8)
    axes[0].legend(fontsize=8)
    for ax, (name, rep) in zip(axes[1:], reports.items()):
        if len(rep.curves):
            base = rep.curves[rep.curves["k"] == 0].groupby(["sample", "order"])["score"].first()
            change = rep.curves["score"].to_numpy() - base.loc[list(zip(rep.curves["sample"], rep.curves["order"]))].to_numpy()
            grouped = rep.curves.assign(change=change).groupby(["order", "k"])["change"]
            mean, se = grouped.mean(), grouped.sem()
            for order in CURVE_ORDERS:
                if order in mean.index.get_level_values(0):
                    m, s = mean.loc[order], se.loc[order].fillna(0)
                    ax.plot(m.index, m.values, marker="o", ms=3, label=order)
                    ax.fill_between(m.index, m.values - s.values, m.values + s.values, alpha=0.2)
        ax.set_xlabel("AU regions deleted")
        ax.axhline(0, color="k", lw=0.6)
        ax.set_ylabel(f"change of the explained class's {rep.summary.get('score', 'score')}", fontsize=8)
        ax.set_title(f"{name}: ROAD-style deletion curves", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path)
    return fig


def spearman_figure(reports: Mapping[str, EvidenceReport], path: str | os.PathLike | None = None) -> Any:
    """Per-image Spearman(evidence, true AU intensity) for each model (box + points), and per AU."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [1, 2]})
    data, labels = [], []
    for name, rep in reports.items():
        ev = rep.evidence.dropna(subset=["true_intensity"])
        vals = ev.groupby("sample").apply(lambda g: _spearman(g["evidence"], g["true_intensity"]),
                                          include_groups=False).to_numpy(float) if len(ev) else np.array([])
        data.append(vals[np.isfinite(vals)])
        labels.append(name)
    axes[0].boxplot(data, showmeans=True)
    axes[0].set_xticks(range(1, len(labels) + 1), labels)
    rng = np.random.default_rng(0)
    for j, vals in enumerate(data):
        axes[0].scatter(j + 1 + 0.08 * rng.standard_normal(len(vals)), vals, s=6, alpha=0.5)
    axes[0].axhline(0, color="k", lw=0.6)
    axes[0].set_ylabel("Spearman per image (18 AUs)")
    axes[0].set_title("AU evidence vs true AU intensity", fontsize=9)
    width = 0.8 / max(1, len(reports))
    for j, (name, rep) in enumerate(reports.items()):
        per_au = rep.summary.get("spearman", {}).get("per_au", {})
        aus = sorted(per_au)
        axes[1].bar(np.arange(len(aus)) + j * width, [per_au[a] for a in aus], width, label=name)
        axes[1].set_xticks(np.arange(len(aus)) + width * (len(reports) - 1) / 2, [f"AU{a}" for a in aus],
                           fontsize=7, rotation=60)
    axes[1].axhline(0, color="k", lw=0.6)
    axes[1].set_ylabel("Spearman over images")
    axes[1].set_title("per AU", fontsize=9)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path)
    return fig


def codebook_figure(class_table: Any, path: str | os.PathLike | None = None, title: str = "") -> Any:
    """Heatmap of mean AU evidence per class, codebook AUs of each class outlined."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    fig, ax = plt.subplots(figsize=(0.45 * class_table.shape[1] + 2.5, 0.45 * class_table.shape[0] + 1.6))
    vals = class_table.to_numpy(float)
    im = ax.imshow(vals, cmap="magma", aspect="auto")
    ax.set_xticks(range(class_table.shape[1]), list(class_table.columns), rotation=60, fontsize=7)
    ax.set_yticks(range(class_table.shape[0]), [str(i) for i in class_table.index], fontsize=8)
    for r, cls in enumerate(class_table.index):
        for c, col in enumerate(class_table.columns):
            if int(str(col)[2:]) in CODEBOOK.get(str(cls), ()):
                ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, ec="cyan", lw=1.5))
    fig.colorbar(im, ax=ax, label="mean evidence (1 = uniform)")
    ax.set_title(title or "mean AU evidence per class (cyan: codebook AUs)", fontsize=9)
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path)
    return fig


# ----------------------------------------------------------------------------- notebook helper
#: TrainConfig fields of `train_pair`'s tiny runs (any TrainConfig field can be overridden)
TINY_PAIR: dict[str, Any] = {
    "dataset": "synthetic", "landmarks": "ground_truth", "backbone": "resnet18", "image_size": 64, "epochs": 1,
    "batch_size": 16, "lr": 0.03, "seed": 0, "device": "cpu", "max_steps_per_epoch": 2,
    "dataset_kwargs": {"n_per_class": 8, "progress": False},
}


def train_pair(out_dir: str | os.PathLike, config: Mapping[str, Any] | None = None, au_weight: float = 9.0,
               roles: Sequence[str] = ("baseline", "guided")) -> dict[str, Path]:
    """Train (or reuse) a CE-only baseline (lambda 0) and an AU-guided model (lambda `au_weight`) with the same
    TrainConfig fields (TINY_PAIR, then `config`) into <out_dir>/<role>; their best.pt paths by role.

    A smoke-test helper for the notebooks when no checkpoints are given: tiny and near chance
    by default; raise image_size / epochs / dataset_kwargs' n_per_class for meaningful numbers.
    """
    out_dir = Path(out_dir)
    common = {**TINY_PAIR, **dict(config or {})}
    paths = {}
    for name in roles:
        check_choice("role", name, ("baseline", "guided"))
        run = out_dir / name
        train(TrainConfig(**{**common, "au_weight": 0.0 if name == "baseline" else float(au_weight),
                             "out_dir": str(run)}))
        paths[name] = run / "checkpoints" / "best.pt"
    return paths


# ----------------------------------------------------------------------------- command line
def _stems(sources: Sequence[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for s in sources:
        stem = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in Path(s).stem) or "image"
        seen[stem] = seen.get(stem, 0) + 1
        out.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return out


def expand_inputs(items: Sequence[str]) -> list[str]:
    """Photo paths from files, folders (every image below, sorted) and glob patterns ('photos/**/*.jpg').

    A plain path is kept even when it does not exist (it is then reported as unreadable); a
    pattern that matches nothing raises ConfigError. Duplicates are dropped, order kept.
    """
    import glob

    out: list[str] = []
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise ConfigError(f"folder {path} holds no image ({', '.join(IMAGE_EXTENSIONS)}); give photos, "
                                  f"folders of photos or glob patterns")
            out += found
        elif glob.has_magic(str(item)):
            found = sorted(glob.glob(str(path), recursive=True))
            files = [f for f in found if Path(f).is_file()]
            files += [str(p) for d in found if Path(d).is_dir() for p in sorted(Path(d).rglob("*"))
                      if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
            if not files:
                raise ConfigError(f"no file matches {item!r}; give photos, folders of photos or glob patterns "
                                  f"(quote them so that the shell does not expand them)")
            out += files
        else:
            out.append(str(path))
    return list(dict.fromkeys(out))


#: columns of the batch summary (explain_summary.csv), one row per face (or per photo without one)
SUMMARY_COLUMNS = ("photo", "face", "n_faces", "x0", "y0", "x1", "y1", "predicted", "probability", "top_aus",
                   "summary", "status", "reason", "notes")


def summary_rows(res: ExplainedImage, class_names: Sequence[str] | None = None, top: int = 3) -> dict[str, Any]:
    """One batch-summary row: photo, face index, box, predicted class, probabilities (p_<class>), top AUs, status."""
    box = res.box or (None, None, None, None)
    row: dict[str, Any] = {"photo": res.source, "face": res.face if res.face >= 0 else None, "n_faces": res.n_faces,
                           "x0": box[0], "y0": box[1], "x1": box[2], "y1": box[3], "predicted": None,
                           "probability": None, "top_aus": "", "summary": "", "status": "explained" if res.ok else
                           ("no_face" if res.face < 0 and "no face" in res.error else "failed"),
                           "reason": res.error, "notes": "; ".join(res.notes)}
    ev = res.evidence
    if ev is not None:
        chosen: list[str] = []
        for r in ev.table.itertuples(index=False):
            if len(chosen) >= top or not np.isfinite(r.evidence):
                break
            chosen.append(f"AU{int(r.au)}")
        row.update(predicted=ev.predicted_name, probability=float(ev.probabilities[ev.predicted]),
                   top_aus=" ".join(chosen), summary=ev.summary,
                   **{f"p_{c}": float(p) for c, p in zip(ev.class_names, ev.probabilities)})
    elif class_names:
        row.update({f"p_{c}": None for c in class_names})
    return row


def faces_overview(photo: Any, results: Sequence[ExplainedImage], path: str | os.PathLike) -> Path:
    """The photo with a box and a label ('0: happiness 0.91') per explained face, written atomically as PNG."""
    import io

    from PIL import ImageDraw, ImageFont

    image = Image.fromarray(as_rgb_array(photo))
    draw = ImageDraw.Draw(image)
    width = max(2, round(max(image.size) / 400))
    try:
        font = ImageFont.load_default(size=max(12, round(max(image.size) / 60)))
    except TypeError:  # pragma: no cover - Pillow < 10.1
        font = ImageFont.load_default()
    colours = ["#ff3030", "#30c030", "#3080ff", "#ffb000", "#c040ff", "#00c0c0"]
    for res in results:
        if res.box is None:
            continue
        colour = colours[res.face % len(colours)]
        draw.rectangle(res.box, outline=colour, width=width)
        label = f"{res.face}: " + (f"{res.evidence.predicted_name} {res.evidence.probabilities[res.evidence.predicted]:.2f}"
                                   if res.evidence is not None else "not explained")
        x, y = res.box[0], max(0, res.box[1] - font.size - 2 * width) if hasattr(font, "size") else res.box[1]
        left, top, right, bottom = draw.textbbox((x, y), label, font=font)
        if right > image.width:  # keep the label inside the photo
            x, left, right = x - (right - image.width), left - (right - image.width), image.width
        draw.rectangle((left - 1, top - 1, right + 1, bottom + 1), fill=colour)
        draw.text((x, y), label, fill="white", font=font)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


class BatchJournal:
    """What a batch has done so far, one JSON line per photo (fsynced), so an interrupted batch resumes.

    A photo is done when its line is in the journal with the same size and modification time;
    the journal belongs to one set of options (its first line holds their hash): other options
    start a new one. A torn last line (a kill mid-write) is ignored.
    """

    def __init__(self, path: str | os.PathLike, options: Mapping[str, Any]) -> None:
        self.path = Path(path)
        self.options_hash = config_hash(dict(options))
        self.done: dict[str, dict[str, Any]] = {}
        lines = self.path.read_text().splitlines() if self.path.is_file() else []
        header = _json_line(lines[0]) if lines else None
        if header is None or header.get("options_hash") != self.options_hash:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"options_hash": self.options_hash, "options": dict(options)},
                                            default=str) + "\n")
            return
        for line in lines[1:]:
            entry = _json_line(line)
            if entry is not None and "photo" in entry:
                self.done[entry["photo"]] = entry

    @staticmethod
    def signature(photo: str) -> list[int] | None:
        try:
            st = os.stat(photo)
        except OSError:
            return None
        return [int(st.st_size), int(st.st_mtime_ns)]

    def finished(self, photo: str) -> dict[str, Any] | None:
        """The journal entry of a photo done with the same file content (size, mtime), else None."""
        entry = self.done.get(photo)
        return entry if entry is not None and entry.get("signature") == self.signature(photo) else None

    def record(self, entries: Sequence[dict[str, Any]]) -> None:
        """Append photos' entries and fsync, so a kill after this keeps them."""
        with open(self.path, "a") as fh:
            for entry in entries:
                fh.write(json.dumps(entry, default=_json_safe) + "\n")
                self.done[entry["photo"]] = entry
            fh.flush()
            os.fsync(fh.fileno())


def _json_line(line: str) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (Path, tuple)):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def build_parser() -> argparse.ArgumentParser:
    """The `python -m fer_lib.analysis.explain` argument parser."""
    p = argparse.ArgumentParser(prog="python -m fer_lib.analysis.explain",
                                description="Explain expression predictions by action units: per-AU evidence for "
                                            "every face of every photo, an overlay figure and a table per face, and "
                                            "one summary (CSV and JSON) for the whole batch; resumable.")
    p.add_argument("images", nargs="+", help="photos, folders of photos (searched recursively) or glob patterns "
                                             "(quoted, e.g. 'photos/**/*.jpg'); every face is explained")
    p.add_argument("--checkpoint", required=True,
                   help="a fer_lib checkpoint (best.pt of fer_lib.training.train, a shipped .safetensors) or a shipped name "
                        "(python -m fer_lib.models.checkpoints list), e.g. fer2013_lite0_guided")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow a checkpoint that is not plain data (unpickles code): only for a file you made")
    p.add_argument("--cam", default=None, help=f"explain with a CAM instead of the layer attention; one of: "
                                               f"{', '.join(CAM_METHODS)}")
    p.add_argument("--layer", default=None, help="tapped layer for attention / CAM (default: the model's last tap)")
    p.add_argument("--target", default="prediction", help="class to explain: 'prediction' or a class name")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="AU region = au_map >= threshold")
    p.add_argument("--crop-margin", type=float, default=None,
                   help=f"crop to the face's landmark box with this margin first (default: the whole photo when it "
                        f"has one face, each face with margin {FACE_MARGIN} when it has several)")
    p.add_argument("--max-faces", type=int, default=None, help="explain at most this many faces per photo, largest "
                                                               "first (default: every face)")
    p.add_argument("--out", default="explanations", help="output folder (PNG, CSV, JSON per face; the batch summary)")
    p.add_argument("--cache", default=None, help="landmark cache folder (default: none)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--batch-size", type=int, default=16, help="photos explained (and journalled) together")
    p.add_argument("--no-figure", action="store_true", help="write only the tables (no explanation or overview PNG)")
    p.add_argument("--restart", action="store_true", help="ignore what an earlier run of this batch already did")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


def _face_stem(stem: str, res: ExplainedImage) -> str:
    return stem if res.n_faces <= 1 else f"{stem}_face{res.face}"


def _explain_group(model: nn.Module, group: Sequence[str], settings: ExplainSettings, args: argparse.Namespace,
                   stems: Mapping[str, str], timings: dict[str, float]) -> list[dict[str, Any]]:
    """Explain one group of photos, write each face's files and the photos' overviews; their journal entries."""
    names = _class_names(model, int(model.config.get("num_classes") or 0), None)
    out = Path(args.out)
    results = explain_images(model, group, settings, cache=args.cache, batch_size=16, timings=timings)
    t0 = time.perf_counter()
    entries: dict[str, dict[str, Any]] = {p: {"photo": p, "signature": BatchJournal.signature(p), "rows": [],
                                              "files": []} for p in group}
    for res in results:
        entry = entries[res.source]
        entry["rows"].append(summary_rows(res, names))
        if res.evidence is not None:
            paths = res.evidence.save(out, _face_stem(stems[res.source], res), figure=not args.no_figure)
            entry["files"] += [str(p) for p in paths.values()]
    if not args.no_figure:
        for photo in group:
            faces = [r for r in results if r.source == photo and r.box is not None]
            if faces:
                try:
                    rgb = explain_photo_rgb(photo)
                except ImageError:
                    continue
                path = faces_overview(rgb, faces, out / f"{stems[photo]}_faces.png")
                entries[photo]["files"].append(str(path))
    timings["writing"] += time.perf_counter() - t0
    return list(entries.values())


def _write_batch_summary(out: Path, photos: Sequence[str], rows: list[dict[str, Any]], options: Mapping[str, Any],
                         resumed: int, speed: dict[str, Any]) -> list[dict[str, Any]]:
    """Write explain_summary.csv (one row per face) and explain_summary.json; the photos that failed."""
    import pandas as pd

    frame = pd.DataFrame(rows)
    cols = list(SUMMARY_COLUMNS[:9]) + [c for c in frame.columns if c.startswith("p_")] + list(SUMMARY_COLUMNS[9:])
    atomic_write_csv(out / "explain_summary.csv", frame.reindex(columns=cols))
    explained_photos = sorted({r["photo"] for r in rows if r["status"] == "explained"})
    failed = [{"source": r["photo"], "reason": r["reason"]} for r in rows if r["face"] is None]
    atomic_write_json(out / "explain_summary.json", {
        "run": run_info(dict(options)), "n_images": len(photos), "n_explained": len(explained_photos),
        "n_faces": sum(r["status"] == "explained" for r in rows), "n_failed": len(failed), "resumed": resumed,
        "explained": [{"source": r["photo"], "face": r["face"], "box": [r["x0"], r["y0"], r["x1"], r["y1"]],
                       "predicted": r["predicted"], "probability": r["probability"], "top_aus": r["top_aus"],
                       "summary": r["summary"]} for r in rows if r["status"] == "explained"],
        "failed": failed, "speed": speed, "rows": rows})
    return failed


def explain_batch_files(args: argparse.Namespace) -> int:
    """The body of `main`: explain every face of every photo, journal each group, write the batch summary."""
    check_map(args.cam)
    check_threshold(args.threshold)
    if args.max_faces is not None and args.max_faces < 1:
        raise ConfigError(f"--max-faces must be a positive integer (or left out for every face), got {args.max_faces}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be a positive integer, got {args.batch_size}")
    if args.crop_margin is not None and not 0.0 <= args.crop_margin <= 2.0:
        raise ConfigError(f"--crop-margin must be in [0, 2] (a fraction of the face box), got {args.crop_margin}")
    settings = ExplainSettings(map_name=args.cam, layer=args.layer, target=args.target, threshold=args.threshold,
                               crop_margin=args.crop_margin, max_faces=args.max_faces, progress=False)
    photos = expand_inputs(args.images)
    model, _ = load_checkpoint(args.checkpoint, map_location="cpu", trust=args.trust_checkpoint)
    model = model.to(resolve_device(args.device)).eval()
    if args.layer is not None:
        tapped_layers(model, args.layer)
    matplotlib.use("Agg")
    out = Path(args.out)
    options = {"checkpoint": str(args.checkpoint), "map": settings.map_name, "layer": args.layer,
               "target": args.target, "threshold": args.threshold, "crop_margin": args.crop_margin,
               "max_faces": args.max_faces, "figure": not args.no_figure}
    journal_path = out / "explain_journal.jsonl"
    if args.restart:
        journal_path.unlink(missing_ok=True)
    journal = BatchJournal(journal_path, options)
    stems = dict(zip(photos, _stems(photos)))
    todo = [p for p in photos if journal.finished(p) is None]
    resumed = len(photos) - len(todo)
    if resumed:
        print(f"resuming: {resumed} of {len(photos)} photo(s) already done (see {journal_path}; --restart redoes them)")
    timings = {"landmarks": 0.0, "model": 0.0, "explanation": 0.0, "writing": 0.0}
    wall = time.perf_counter()
    bar = progress_bar(total=len(todo), desc="photos", unit="photo", disable=args.no_progress)
    for start in range(0, len(todo), args.batch_size):
        group = todo[start:start + args.batch_size]
        journal.record(_explain_group(model, group, settings, args, stems, timings))
        bar.update(len(group))
    bar.close()
    elapsed = time.perf_counter() - wall
    rows = [row for p in photos for row in (journal.finished(p) or {"rows": []})["rows"]]
    for row in rows:
        if row["status"] == "explained":
            print(f"{row['photo']} [face {row['face']}]: {row['summary']}")
        else:
            print(f"{row['photo']}: FAILED: {row['reason']}")
    done_now = len(todo)
    faces_now = sum(r["status"] == "explained" for p in todo for r in (journal.finished(p) or {"rows": []})["rows"])
    speed = {"photos": done_now, "faces": faces_now, "wall_s": elapsed,
             "photos_per_s": done_now / elapsed if elapsed > 0 else None,
             "faces_per_s": faces_now / elapsed if elapsed > 0 else None, "seconds": timings}
    failed = _write_batch_summary(out, photos, rows, options, resumed, speed)
    if done_now:
        print(f"{done_now} photo(s), {faces_now} face(s) in {elapsed:.1f} s: {speed['photos_per_s']:.2f} photos/s, "
              f"{speed['faces_per_s']:.2f} faces/s (landmarks {timings['landmarks']:.1f} s, model "
              f"{timings['model']:.1f} s, explanation {timings['explanation']:.1f} s, writing {timings['writing']:.1f} s)")
    if failed:
        print(f"{len(failed)} of {len(photos)} photo(s) could not be explained (see {out / 'explain_summary.csv'})",
              file=sys.stderr)
    return min(len(failed), 100)


def explain_photo_rgb(photo: Any) -> np.ndarray:
    """A photo as explain reads it for detection: upright, at most DETECT_MAX_SIDE on its longer side."""
    return load_image(photo, max_side=DETECT_MAX_SIDE) if isinstance(photo, (str, os.PathLike)) else as_rgb_array(photo)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: explain every face of each photo; exit status = number of photos that could not be explained
    (max 100), or 2 for an error in the options, the checkpoint or the output folder (one line, no traceback)."""
    args = build_parser().parse_args(argv)
    return run_cli(lambda: explain_batch_files(args), args.debug, user_errors=(FileNotFoundError, ValueError))


__all__ = [
    "ATTENTION", "AUEvidence", "BatchJournal", "CURVE_ORDERS", "FACE_MARGIN", "SUMMARY_COLUMNS", "DEFAULT_THRESHOLD", "DELETIONS", "DeletionResult", "EvidenceReport",
    "ExplainedImage", "FILL_MODES", "MAP_CHOICES", "SCALE_MODES", "SCORE_KINDS", "TABLE_COLUMNS",
    "au_evidence_table", "au_region_masks", "build_parser", "check_map", "check_threshold", "class_evidence",
    "codebook_evidence_agreement", "codebook_figure", "curve_summary", "deletion_figure", "deletion_summary", "deletion_test",
    "au_evidence_report", "DeletionSettings", "ExplainSettings", "evidence_figure", "expand_inputs", "explain_batch", "explain_images", "faces_overview", "explanation_maps", "fill_image",
    "main", "model_input", "region_groups", "spearman_figure", "spearman_summary", "summarise", "summary_rows",
    "train_pair",
]

if __name__ == "__main__":
    sys.exit(main())
