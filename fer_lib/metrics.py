"""Evaluation metrics: map cosine (ATT-COS / CAM-COS), classification summaries, and the one
schema of a run's `metrics.json`.

ATT-COS and CAM-COS are averaged only over samples whose AU map is valid (landmarks found
and a class with AUs); `map_cosine` itself returns one value per sample and the caller masks.

metrics.json (schema `METRICS_SCHEMA`): one JSON object per run folder, written by training
(`fer_lib.training.train`) and by every notebook through `write_metrics(output_dir, record, kind)`:

    schema   int    METRICS_SCHEMA (written by write_metrics; training's own file has none yet)
    kind     str    one of KINDS: which notebook or step wrote it, hence which sections follow
    run      dict   fer_lib.utils.run_info(...): git revision, seed, configuration, host
    ...             the kind's sections (`TrainingMetrics`, `InterpretMetrics`, `ComparisonMetrics`;
                    the other kinds document theirs in KINDS)

Each headline number has ONE key path (`HEADLINE_PATHS`), read with `metric_at` + `headline_number`:

    training  (kind "training": train.py, notebook 02)  accuracy test.accuracy, macro-F1 test.macro_f1,
              ATT-COS test.att_cos_mean, CAM-COS test.cam_cos, training time train_time_s
    interpret (kind "interpret": notebook 04)  per role ("baseline", "guided"): <role>.cam_cos,
              <role>.att_cos_mean
    comparison (kind "comparison": notebook 08)  comparison = [ComparisonRow, ...], each with model,
              backbone, au_weight, accuracy, macro_f1, att_cos, cam_cos, train_time_s

A CAM-COS value is a number, or {method: number} where the headline picks the model's own CAM
("cam"), else Grad-CAM, else the mean over methods (`CAM_PREFERENCE`).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence, TypedDict

import numpy as np
import torch
import torch.nn.functional as F

from fer_lib.utils import atomic_write_json, check_choice, repo_relative

MAP_AT: tuple[str, ...] = ("image", "layer")


def map_cosine(pred: torch.Tensor, target: torch.Tensor, at: str = "image") -> torch.Tensor:
    """Per-sample cosine (B,) between a (B,1,h,w) map and a (B,1,H,W) target.

    at="image": bilinear-resize pred to the target's size; at="layer": area-resize the
    target to pred's size. A zero map gives cosine 0.
    """
    check_choice("at", at, MAP_AT)
    if pred.ndim == 3:
        pred = pred[:, None]
    if target.ndim == 3:
        target = target[:, None]
    if pred.ndim != 4 or target.ndim != 4 or pred.shape[0] != target.shape[0]:
        raise ValueError(f"expected (B,1,h,w) maps with the same B, got {tuple(pred.shape)} and {tuple(target.shape)}")
    pred = pred.float()
    target = target.float().to(pred.device)
    if at == "image":
        if pred.shape[-2:] != target.shape[-2:]:
            pred = F.interpolate(pred, size=target.shape[-2:], mode="bilinear", align_corners=False)
    elif target.shape[-2:] != pred.shape[-2:]:
        target = F.adaptive_avg_pool2d(target, pred.shape[-2:])
    return F.cosine_similarity(pred.flatten(1), target.flatten(1), dim=1, eps=1e-8)


def classification_metrics(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray,
                           class_names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 (over classes present in y_true or y_pred), per-class accuracy, confusion."""
    y_true = np.asarray(y_true, dtype=np.int64).ravel()
    y_pred = np.asarray(y_pred, dtype=np.int64).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true and y_pred differ in length: {y_true.size} vs {y_pred.size}")
    k = len(class_names)
    bad = [int(v) for v in np.unique(np.concatenate([y_true, y_pred])) if v < 0 or v >= k]
    if bad:
        raise ValueError(f"labels {bad} outside 0..{k - 1} for {k} classes")
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (y_true, y_pred), 1)
    tp = np.diag(confusion).astype(float)
    support = confusion.sum(axis=1).astype(float)
    predicted = confusion.sum(axis=0).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / np.maximum(predicted, 1), 0.0)
        recall = np.where(support > 0, tp / np.maximum(support, 1), 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    present = (support > 0) | (predicted > 0)
    n = int(y_true.size)
    return {
        "accuracy": float(tp.sum() / n) if n else float("nan"),
        "macro_f1": float(f1[present].mean()) if present.any() else float("nan"),
        "per_class_accuracy": {name: (float(recall[i]) if support[i] > 0 else None)
                               for i, name in enumerate(class_names)},
        "confusion": confusion.tolist(),
        "n": n,
    }


#: what every FER2013 result states about its data (official split; PrivateTest is never used here)
FER2013_PROTOCOL = ("FER2013 official protocol: trained on Training (28,709 faces), model selection and reported "
                    "numbers on PublicTest (3,589 faces, the 'val' split); PrivateTest held out, never used")


def protocol_note(dataset: str | None, split: str | None = None) -> str | None:
    """The protocol statement for results on `dataset` (FER2013's official split), None for other data."""
    if dataset != "fer2013":
        return None
    return FER2013_PROTOCOL + (f"; these numbers: {'PublicTest' if split == 'val' else split}" if split else "")


# --------------------------------------------------------------------------- the metrics.json schema
METRICS_SCHEMA = 1
METRICS_FILE = "metrics.json"

#: kind -> the sections its metrics.json holds (besides schema, kind and run)
KINDS: dict[str, str] = {
    "training": "TrainingMetrics: config, best_epoch, selection, val, test, train_time_s, images_per_s, device, data",
    "heatmaps": "notebook 01: n_landmarks, sigma, expressions {name: {aus, mass, peak}}",
    "ablation": "notebook 03: n_runs, backbones, au_weights, layers, metrics, table, effects, best_by_att_cos, runs",
    "interpret": "InterpretMetrics (notebook 04): checkpoints, baseline, guided, table1, table2_cosine",
    "continual": "notebook 05: protocol, continual, summary, few_shot, cam_part_similarity, elapsed_s",
    "local_nonlocal": "notebook 06: params, accuracy_cost, speed_ratio_lnl_over_plain, codebook_agreement, "
                      "class_mean_region_weights, run_dirs",
    "contrawarping": "notebook 07: config, eval_split, pretraining, evaluation, table, supervised, finetune, figures",
    "comparison": "ComparisonMetrics (notebook 08): dataset, split, split_label, comparison, deltas, per_model",
    "explanations": "notebook 09: checkpoints, threshold, spearman, deletion_drops, synthetic, real_face, fer2013",
}


class SplitMetrics(TypedDict, total=False):
    """One evaluated split (fer_lib.training.train.evaluate): the `val` and `test` sections."""

    accuracy: float
    macro_f1: float
    per_class_accuracy: dict[str, float | None]
    confusion: list[list[int]]
    n: int
    ce: float
    att_cos: dict[str, float | None]      # tapped layer -> ATT-COS
    att_cos_mean: float | None            # the headline ATT-COS
    n_valid_maps: int
    cam_cos: float | dict[str, float]     # optional: a number or {CAM method: CAM-COS}


class TrainingMetrics(TypedDict, total=False):
    """A training run's metrics.json: the layout fer_lib.training.train writes (the schema's base)."""

    schema: int
    kind: str
    run: dict[str, Any]
    config: dict[str, Any]                # TrainConfig.to_dict()
    best_epoch: int
    selection: str
    val: SplitMetrics
    test: SplitMetrics
    train_time_s: float
    images_per_s: float | None
    world_size: int
    device: str
    protocol: str | None
    skipped_batches: int
    data: dict[str, Any]


class ModelInterpretation(TypedDict, total=False):
    """One model of an interpretability comparison (notebook 04's `baseline` / `guided`)."""

    accuracy: float
    macro_f1: float
    att_cos: dict[str, float | None]
    att_cos_mean: float | None
    cam_cos: float                        # the headline method's CAM-COS (cam_cos_method)
    cam_cos_by_method: dict[str, float]
    cam_cos_method: str
    best_cam_method: str


class InterpretMetrics(TypedDict, total=False):
    """Notebook 04: baseline vs AU-guided CAMs and attention."""

    schema: int
    kind: str
    run: dict[str, Any]
    checkpoints: dict[str, str]
    baseline: ModelInterpretation
    guided: ModelInterpretation


class ComparisonRow(TypedDict, total=False):
    """One evaluated checkpoint of a comparison (notebook 08): one headline row."""

    model: str
    backbone: str
    au_weight: float
    accuracy: float
    macro_f1: float
    att_cos: float | None
    cam_cos: float | None                 # the headline CAM method's score (also cam_cos_<method> columns)
    train_time_s: float | None


class ComparisonMetrics(TypedDict, total=False):
    """Notebook 08: several checkpoints evaluated on one split."""

    schema: int
    kind: str
    run: dict[str, Any]
    dataset: str
    split: str
    split_label: str
    comparison: list[ComparisonRow]


#: the ONE key path of each headline number ("{role}": baseline | guided)
HEADLINE_PATHS: dict[str, dict[str, str]] = {
    "training": {"accuracy": "test.accuracy", "macro_f1": "test.macro_f1", "att_cos": "test.att_cos_mean",
                 "cam_cos": "test.cam_cos", "train_time_s": "train_time_s", "n_test": "test.n"},
    "interpret": {"att_cos": "{role}.att_cos_mean", "cam_cos": "{role}.cam_cos"},
    "comparison": {"rows": "comparison", "accuracy": "accuracy", "macro_f1": "macro_f1", "att_cos": "att_cos",
                   "cam_cos": "cam_cos", "train_time_s": "train_time_s"},
}
CAM_PREFERENCE = ("cam", "gradcam")   # the paper reports the model's own CAM; else Grad-CAM; else the mean


def metric_at(record: Mapping[str, Any] | None, path: str) -> Any:
    """The value at a dotted key path of a metrics record ("test.accuracy"), None where absent."""
    node: Any = record
    for part in path.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    return node


def headline_number(value: Any) -> float | None:
    """A finite number as float; a {name: number} dict as its CAM_PREFERENCE entry, else its mean; else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Mapping):
        for method in CAM_PREFERENCE:
            picked = headline_number(value.get(method))
            if picked is not None:
                return picked
        nums = [v for v in (headline_number(x) for x in value.values()) if v is not None]
        return sum(nums) / len(nums) if nums else None
    return None


def check_metrics(record: Mapping[str, Any], kind: str) -> None:
    """ValueError naming the key path where a headline number of `kind` is not a number (None allowed)."""
    check_choice("metrics kind", kind, tuple(KINDS))
    paths = HEADLINE_PATHS.get(kind, {})
    if kind == "comparison":
        rows = metric_at(record, paths["rows"])
        if not isinstance(rows, list):
            raise ValueError(f"metrics.json of kind 'comparison' needs a list at {paths['rows']!r}")
        located = [(f"comparison[{i}].{k}", row.get(k)) for i, row in enumerate(rows) for k in paths if k != "rows"]
    else:
        roles = [r for r in ("baseline", "guided") if r in record] if kind == "interpret" else [""]
        located = [(p.format(role=r), metric_at(record, p.format(role=r))) for r in roles for p in paths.values()]
    for path, value in located:
        if value is not None and headline_number(value) is None and not _all_none(value):
            raise ValueError(f"metrics.json ({kind}): {path} must be a number or {{name: number}}, got {value!r}")


def _all_none(value: Any) -> bool:
    return isinstance(value, Mapping) and all(v is None for v in value.values())


def write_metrics(output_dir: str | Path, record: Mapping[str, Any], kind: str) -> Path:
    """Write `record` as <output_dir>/metrics.json in the schema: `schema` and `kind` first, then the
    record's sections; the headline numbers of `kind` are checked first (ValueError naming the key path).
    Paths inside the repository are written relative to its root (utils.repo_relative): the file is portable."""
    check_metrics(record, kind)
    body = repo_relative({k: v for k, v in record.items() if k not in ("schema", "kind")})
    return atomic_write_json(Path(output_dir) / METRICS_FILE, {"schema": METRICS_SCHEMA, "kind": kind, **body})
