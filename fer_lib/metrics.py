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
    shortcut  (kind "shortcut": notebook 10)  per role: headline.<role>.shortcut_accuracy (clean test
              accuracy of the model trained with the spurious cue), headline.<role>.cue_energy

Uncertainty: beside a headline number, `<key>_ci` holds its 95% interval as [low, high] (`CI_LEVEL`):
accuracy by `wilson_interval`, macro-F1 and means of per-sample scores (ATT-COS, CAM-COS) by the
percentile `bootstrap_interval` over samples (seed 0). Runs written before these keys have none.

A CAM-COS value is a number, or {method: number} where the headline picks the model's own CAM
("cam"), else Grad-CAM, else the mean over methods (`CAM_PREFERENCE`).
"""
from __future__ import annotations

import math
from pathlib import Path
from statistics import NormalDist
from typing import Any, Callable, Mapping, Sequence, TypedDict

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
    "shortcut": "notebook 10: checkpoints, settings, report {model: {test set: cue report}}, headline {role: ...}",
    "table1": "notebook 11 (fer_lib.analysis.table1): settings, rows (table1.csv), paper, comparison, missing",
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
    accuracy_ci: list[float] | None       # [low, high] 95%: Wilson
    macro_f1_ci: list[float] | None       # [low, high] 95%: bootstrap over samples
    att_cos_ci: list[float] | None        # [low, high] 95%: bootstrap of the mean of per-sample ATT-COS
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
    accuracy_ci: list[float] | None       # 95% intervals [low, high] of accuracy, macro_f1, att_cos_mean, cam_cos
    macro_f1_ci: list[float] | None
    att_cos_ci: list[float] | None
    cam_cos_ci: list[float] | None
    cam_cos_ci_by_method: dict[str, list[float] | None]   # method -> [low, high] (bootstrap over samples)
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
                 "cam_cos": "test.cam_cos", "train_time_s": "train_time_s", "n_test": "test.n",
                 "oracle_accuracy": "data.ceiling.oracle_accuracy"},
    "interpret": {"att_cos": "{role}.att_cos_mean", "cam_cos": "{role}.cam_cos"},
    "comparison": {"rows": "comparison", "accuracy": "accuracy", "macro_f1": "macro_f1", "att_cos": "att_cos",
                   "cam_cos": "cam_cos", "train_time_s": "train_time_s"},
    "shortcut": {"shortcut_accuracy": "headline.{role}.shortcut_accuracy", "cue_energy": "headline.{role}.cue_energy"},
}
#: the 95% interval ([low, high]) of a headline number, where the step that wrote it measured one
INTERVAL_PATHS: dict[str, dict[str, str]] = {
    "training": {"accuracy": "test.accuracy_ci", "macro_f1": "test.macro_f1_ci", "att_cos": "test.att_cos_ci"},
    "interpret": {"cam_cos": "{role}.cam_cos_ci"},
    "shortcut": {"shortcut_accuracy": "headline.{role}.shortcut_accuracy_ci", "cue_energy": "headline.{role}.cue_energy_ci"},
}
CAM_PREFERENCE = ("cam", "gradcam")   # the paper reports the model's own CAM; else Grad-CAM; else the mean


def metric_at(record: Mapping[str, Any] | None, path: str) -> Any:
    """The value at a dotted key path of a metrics record ("test.accuracy"), None where absent."""
    node: Any = record
    for part in path.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    return node


def interval_at(record: Mapping[str, Any] | None, path: str) -> tuple[float, float] | None:
    """The [low, high] interval at a key path as two floats; None where absent or not two finite numbers."""
    value = metric_at(record, path)
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        return None
    low, high = (headline_number(v) for v in value)
    return None if low is None or high is None else (low, high)


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
        where = {"interpret": record, "shortcut": record.get("headline") or {}}.get(kind)
        roles = [r for r in ("baseline", "guided") if r in where] if where is not None else [""]
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


# --------------------------------------------------------------------------- uncertainty: 95% intervals
#: the level of every interval the library reports (`<metric>_ci` keys hold [low, high] at this level)
CI_LEVEL = 0.95
MEAN_INTERVAL_METHODS: tuple[str, ...] = ("t", "bootstrap")


def _check_level(level: float) -> float:
    if isinstance(level, bool) or not isinstance(level, (int, float, np.floating)) or not 0 < float(level) < 1:
        raise ValueError(f"level must be a number strictly between 0 and 1 (e.g. 0.95 for a 95% interval), "
                         f"got {level!r}")
    return float(level)


def _check_count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def wilson_interval(k: int, n: int, level: float = CI_LEVEL) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (accuracy = correct/total).

    Unlike the normal (Wald) interval it stays inside [0, 1] and is not empty at k = 0 or k = n
    (it is [0, x] and [x, 1] there). ValueError for n < 1, k outside 0..n or level outside (0, 1).
    """
    level = _check_level(level)
    n = _check_count("n (number of trials)", n, 1)
    k = _check_count("k (number of successes)", k, 0)
    if k > n:
        raise ValueError(f"k (number of successes) must be between 0 and n={n}, got k={k}")
    z = NormalDist().inv_cdf(0.5 + level / 2)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return low, high


def _bootstrap_arrays(data: Any) -> tuple[list[np.ndarray], bool]:
    """(arrays resampled together, whether they are paired); NaN dropped from a single array of values."""
    paired = isinstance(data, tuple) and len(data) > 0 and all(np.ndim(a) >= 1 for a in data)
    arrays = [np.asarray(a) for a in data] if paired else [np.asarray(data, dtype=float)]
    if any(a.ndim != 1 for a in arrays):
        raise ValueError(f"bootstrap_interval needs 1-D values or a tuple of 1-D arrays of one length, "
                         f"got shapes {[a.shape for a in arrays]}")
    if len({a.shape[0] for a in arrays}) > 1:
        raise ValueError(f"paired arrays must have one length, got lengths {[a.shape[0] for a in arrays]}")
    if not paired:
        arrays = [arrays[0][~np.isnan(arrays[0])]]
    return arrays, paired


def bootstrap_interval(data: Any, statistic: Callable[..., float] = np.mean, n_boot: int = 1000,
                       level: float = CI_LEVEL, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of `statistic` by resampling samples with replacement.

    `data`: 1-D values (NaN ignored; `statistic(values)`, e.g. the mean of per-sample ATT-COS), or
    a tuple of 1-D arrays of one length resampled together (`statistic(*arrays)`, e.g.
    (y_true, y_pred) with `macro_f1`). Deterministic from `seed`. The interval is widened to hold
    the statistic of the data itself (a percentile interval of a biased statistic, e.g. macro-F1 on
    a handful of samples, can miss it). ValueError for no (non-NaN) samples, n_boot < 1 or level
    outside (0, 1).
    """
    level = _check_level(level)
    n_boot = _check_count("n_boot", n_boot, 1)
    arrays, paired = _bootstrap_arrays(data)
    n = arrays[0].shape[0]
    if n == 0:
        raise ValueError("bootstrap_interval got no samples" + ("" if paired else " (after dropping NaN)")
                         + "; it needs at least one")
    estimate = float(statistic(*arrays))
    rng = np.random.default_rng(seed)
    stats = np.empty(n_boot)
    for b in range(n_boot):
        idx = rng.integers(0, n, n)
        stats[b] = statistic(*(a[idx] for a in arrays))
    stats = stats[~np.isnan(stats)]
    if not stats.size or math.isnan(estimate):
        return float("nan"), float("nan")
    low, high = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return float(min(low, estimate)), float(max(high, estimate))


def mean_interval(values: Any, level: float = CI_LEVEL, method: str = "t", n_boot: int = 1000,
                  seed: int = 0) -> tuple[float, float]:
    """Interval of the mean of `values`, NaN ignored: Student t (method="t", needs >= 2 values) or
    the percentile bootstrap (method="bootstrap", see `bootstrap_interval`)."""
    check_choice("method", method, MEAN_INTERVAL_METHODS)
    level = _check_level(level)
    arr = np.asarray(values, dtype=float).ravel()
    arr = arr[~np.isnan(arr)]
    if method == "bootstrap":
        return bootstrap_interval(arr, np.mean, n_boot=n_boot, level=level, seed=seed)
    if arr.size < 2:
        raise ValueError(f"a t interval of the mean needs at least 2 non-NaN values, got {arr.size}; "
                         "use method='bootstrap' for fewer")
    from scipy import stats as sps

    centre = float(arr.mean())
    half = float(sps.t.ppf(0.5 + level / 2, arr.size - 1) * arr.std(ddof=1) / math.sqrt(arr.size))
    return centre - half, centre + half


def macro_f1(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, n_classes: int) -> float:
    """Macro-F1 over the classes present in y_true or y_pred (as `classification_metrics`), fast enough to
    bootstrap (labels 0..n_classes-1 assumed)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if not y_true.size:
        return float("nan")
    tp = np.bincount(y_true[y_true == y_pred], minlength=n_classes).astype(float)
    support = np.bincount(y_true, minlength=n_classes).astype(float)
    predicted = np.bincount(y_pred, minlength=n_classes).astype(float)
    present = (support > 0) | (predicted > 0)
    f1 = 2 * tp[present] / (support[present] + predicted[present])  # = 2PR/(P+R); 0 where tp = 0
    return float(f1.mean())


def as_interval(interval: tuple[float, float] | None) -> list[float] | None:
    """An interval as the JSON-ready [low, high] of the `<metric>_ci` keys; None where not finite."""
    if interval is None or not all(math.isfinite(v) for v in interval):
        return None
    return [float(interval[0]), float(interval[1])]


def accuracy_with_interval(correct: int, n: int, level: float = CI_LEVEL) -> dict[str, Any]:
    """{"accuracy", "ci_low", "ci_high", "n"}: k/n with its Wilson interval, for tables (NaN when n = 0)."""
    if n == 0:
        return {"accuracy": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": 0}
    low, high = wilson_interval(int(correct), int(n), level)
    return {"accuracy": correct / n, "ci_low": float(low), "ci_high": float(high), "n": int(n)}


def classification_intervals(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray,
                             n_classes: int, level: float = CI_LEVEL, n_boot: int = 1000,
                             seed: int = 0) -> dict[str, list[float] | None]:
    """accuracy_ci (Wilson) and macro_f1_ci (bootstrap over samples) as [low, high]; None with no samples."""
    y_true = np.asarray(y_true, dtype=np.int64).ravel()
    y_pred = np.asarray(y_pred, dtype=np.int64).ravel()
    if not y_true.size:
        return {"accuracy_ci": None, "macro_f1_ci": None}
    f1 = bootstrap_interval((y_true, y_pred), lambda t, p: macro_f1(t, p, n_classes), n_boot, level, seed)
    return {"accuracy_ci": as_interval(wilson_interval(int((y_true == y_pred).sum()), int(y_true.size), level)),
            "macro_f1_ci": as_interval(f1)}
