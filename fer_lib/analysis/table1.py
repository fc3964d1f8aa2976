"""The paper's Table 1 from a sweep of training runs: every interpretable method without and with AU guidance.

Belharbi et al. (FG 2024), Table 1, reports per method the classification accuracy and CAM-COS (the cosine
between the method's class activation map and the AU map) without (lambda 0) and with (lambda 9) AU guidance.
The trained methods (WILDCAT, ACoL, PRM, ADL, CutMix, TS-CAM, APViT: fer_lib.models.wsol) are read with
their own CAM ("cam"); the plain classifier gives four rows, one per post-hoc CAM read from the same two
trained models (CAM, GradCAM, GradCAM++, LayerCAM). `experiments/table1.toml` (the paper's GPU setting) and
`experiments/table1_cpu.toml` (FER2013 at CPU scale) train the sweep; notebook 11 runs `collect_table1`:

    from fer_lib.analysis.table1 import collect_table1, paper_comparison
    table = collect_table1("results/table1_cpu/train", split="val", cam_samples=300)   # one row per row x guidance
    paper_comparison(table)                            # laid out as the paper's table, its RAF-DB numbers beside

Per run (a folder with a training metrics.json and `[run/]checkpoints/best.pt`; runs whose run.json says they
failed are left out): the method comes from the checkpoint's backbone (`wildcat:tf_efficientnet_lite0` ->
WILDCAT, a plain timm name -> the four CAM rows), the guidance from its au_weight (> 0: guided). Accuracy and
ATT-COS (mean over tapped layers) are the best checkpoint's on the whole evaluation split, read from the run's
own metrics.json (its final evaluation of that split, with 95% intervals) or, where the run has no such
section or `data` names other data, evaluated here (`fer_lib.analysis.evaluate.evaluate`). CAM-COS is
measured here on one fixed, seeded subset of `cam_samples` faces of the split that have an AU map (landmarks
found, a class with AUs), the same faces for every run, with its 95% bootstrap interval.
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from fer_lib.faces.au import CODEBOOK
from fer_lib.metrics import METRICS_FILE
from fer_lib.utils import ConfigError

#: Table 1's rows in the paper's order: (row label, method, CAM read); method "plain" = the plain classifier
TABLE1_ROWS: tuple[tuple[str, str, str], ...] = (
    ("CAM", "plain", "cam"), ("WILDCAT", "wildcat", "cam"), ("GradCAM", "plain", "gradcam"),
    ("GradCAM++", "plain", "gradcam++"), ("ACoL", "acol", "cam"), ("PRM", "prm", "cam"), ("ADL", "adl", "cam"),
    ("CutMix", "cutmix", "cam"), ("LayerCAM", "plain", "layercam"), ("TS-CAM", "tscam", "cam"),
    ("APViT", "apvit", "cam"),
)
#: the trained methods (model-name prefixes of fer_lib.models.wsol); any other backbone is a plain classifier
TRAINED_METHODS: tuple[str, ...] = tuple(m for _, m, _ in TABLE1_ROWS if m != "plain")
#: the paper's RAF-DB numbers (Table 1): accuracy in %, CAM-COS; (without AUs, with AUs); APViT: no CAM-COS
PAPER_TABLE1: dict[str, dict[str, tuple[float, float] | None]] = {
    "CAM": {"accuracy": (88.20, 88.95), "cam_cos": (0.55, 0.70)},
    "WILDCAT": {"accuracy": (88.26, 88.85), "cam_cos": (0.52, 0.69)},
    "GradCAM": {"accuracy": (88.39, 88.85), "cam_cos": (0.55, 0.74)},
    "GradCAM++": {"accuracy": (87.84, 89.14), "cam_cos": (0.60, 0.82)},
    "ACoL": {"accuracy": (87.94, 88.68), "cam_cos": (0.54, 0.67)},
    "PRM": {"accuracy": (88.13, 88.88), "cam_cos": (0.48, 0.59)},
    "ADL": {"accuracy": (87.45, 88.65), "cam_cos": (0.50, 0.63)},
    "CutMix": {"accuracy": (88.39, 88.59), "cam_cos": (0.55, 0.57)},
    "LayerCAM": {"accuracy": (87.90, 88.88), "cam_cos": (0.60, 0.84)},
    "TS-CAM": {"accuracy": (86.70, 88.00), "cam_cos": (0.58, 0.71)},
    "APViT": {"accuracy": (91.00, 91.03), "cam_cos": None},
}
PAPER_DATA = "RAF-DB (basic, 7 classes; ResNet50 at 224 px, lambda 9 on layer 5)"
#: the columns of table1.csv (one row per Table 1 row, guidance and seed)
TABLE1_COLUMNS: tuple[str, ...] = (
    "method", "au_guided", "accuracy", "accuracy_low", "accuracy_high", "cam_cos", "cam_cos_low", "cam_cos_high",
    "att_cos", "att_cos_low", "att_cos_high", "cam_method", "backbone", "au_weight", "seed", "n", "cam_n",
    "accuracy_source", "run")


@dataclass
class TrainedRun:
    """One training run of a sweep: its folder, best checkpoint, training metrics and what it trained."""

    folder: Path
    checkpoint: Path
    metrics: dict[str, Any]
    backbone: str
    method: str
    au_weight: float
    seed: int


def method_of(backbone: str) -> str:
    """The Table 1 method a model name trains: 'wildcat:resnet18' -> 'wildcat'; a plain timm name -> 'plain'."""
    prefix = str(backbone).partition(":")[0]
    return prefix if prefix in TRAINED_METHODS else "plain"


def _status_ok(folder: Path, root: Path) -> bool:
    """False when the run.json of the folder or of a folder above it (up to `root`) says the run did not finish;
    a folder without one (a run made by hand) counts."""
    for where in [folder, *[p for p in folder.parents if p == root or root in p.parents]]:
        try:
            marker = json.loads((where / "run.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if marker.get("status") not in (None, "ok"):
            return False
    return True


def find_runs(sweep_dir: str | Path) -> list[TrainedRun]:
    """The finished training runs under `sweep_dir` (searched recursively), outermost folder first.

    A run is a folder whose metrics.json holds a training `config` and which has checkpoints/best.pt, itself or
    in run/ (notebook 02 keeps the trainer's folder there); a metrics.json nested inside an accepted run is the
    same run; runs whose run.json says they did not finish and hidden folders are left out."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise ConfigError(f"sweep_dir {root} is not a folder (give the training stage's folder, e.g. "
                          f"results/table1_cpu/train)")
    runs: list[TrainedRun] = []
    taken: list[Path] = []
    for path in sorted(root.rglob(METRICS_FILE), key=lambda p: (len(p.parts), str(p))):
        folder = path.parent
        rel = folder.relative_to(root).parts
        if any(part.startswith(".") for part in rel) or any(t == folder or t in folder.parents for t in taken):
            continue
        try:
            metrics = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        config = metrics.get("config") if isinstance(metrics, dict) else None
        ckpt = next((c for c in (folder / "run" / "checkpoints" / "best.pt", folder / "checkpoints" / "best.pt")
                     if c.is_file()), None)
        if not isinstance(config, dict) or ckpt is None:
            continue
        taken.append(folder)
        if not _status_ok(folder, root):
            continue
        backbone = str(config.get("backbone"))
        runs.append(TrainedRun(folder, ckpt, metrics, backbone, method_of(backbone),
                               float(config.get("au_weight") or 0.0), int(config.get("seed") or 0)))
    return runs


def valid_map_indices(dataset: Any) -> list[int]:
    """Indices of the faces with an AU map: landmarks found and a class with AUs (read from the records;
    a dataset without records is asked item by item)."""
    records = getattr(dataset, "records", None)
    if records is None:
        return [i for i in range(len(dataset)) if bool(dataset[i][3]) and float(dataset[i][2].max()) > 0]
    names = list(dataset.class_names)
    out = []
    for i, r in enumerate(records):
        anchors = getattr(r, "anchors", None)
        if r.has_landmarks and anchors is not None and np.isfinite(anchors).all() and CODEBOOK.get(names[r.label]):
            out.append(i)
    return out


def fixed_subset(dataset: Any, cam_samples: int | None, seed: int = 0) -> tuple[Any, list[int]]:
    """(a dataset of `cam_samples` seeded faces with AU maps, their indices in `dataset`); all of them for
    cam_samples None or <= 0. A FERDataset stays one (same class names, maps and normalisation)."""
    from fer_lib.analysis.interpret import subset_indices

    valid = valid_map_indices(dataset)
    n = None if cam_samples is None or int(cam_samples) <= 0 else int(cam_samples)
    chosen = [valid[i] for i in subset_indices(len(valid), n, seed)]
    if hasattr(dataset, "records"):
        sub = copy.copy(dataset)
        sub.records = [dataset.records[i] for i in chosen]
        return sub, chosen
    import torch

    return torch.utils.data.Subset(dataset, chosen), chosen


def _interval(value: Any) -> tuple[float, float]:
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
        return float(value[0]), float(value[1])
    return math.nan, math.nan


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


class _Datasets:
    """The evaluation split, built once per way of reading it (image size, normalisation, classes, data)."""

    def __init__(self, data: Any, split: str, landmarks: str | None, seed: int, progress: bool):
        self.data, self.split, self.landmarks, self.seed, self.progress = data, split, landmarks, seed, progress
        self.cache: dict[str, Any] = {}

    def get(self, model_config: Mapping[str, Any], train_config: Mapping[str, Any]) -> tuple[Any, Any]:
        from fer_lib.analysis.evaluate import EvalOptions, load_eval_dataset

        landmarks = self.landmarks or train_config.get("landmarks") or "detect"
        options = EvalOptions(split=self.split, landmarks=landmarks, cache_dir=train_config.get("cache_dir"))
        key = json.dumps([self.split, landmarks, str(self.data)] +
                         [model_config.get(k) for k in ("image_size", "mean", "std", "class_names")] +
                         [train_config.get(k) for k in ("dataset", "data_root", "cache_dir")] +
                         [{k: v for k, v in (train_config.get("dataset_kwargs") or {}).items()
                           if k not in ("max_per_class", "augment_config")}], sort_keys=True, default=str)
        if key not in self.cache:
            ds, _, _ = load_eval_dataset(model_config, train_config, self.data, options, seed=self.seed,
                                         progress=self.progress)
            self.cache[key] = ds
        return self.cache[key], options


def evaluate_run(run: TrainedRun, datasets: _Datasets, cam_samples: int | None, device: str = "auto",
                 seed: int = 0, progress: bool = False) -> list[dict[str, Any]]:
    """The Table 1 rows of one run: one per CAM it is read with (four for the plain classifier)."""
    from fer_lib.analysis.evaluate import evaluate
    from fer_lib.analysis.interpret import CAMSettings
    from fer_lib.models import load_checkpoint

    model, ckpt = load_checkpoint(run.checkpoint, map_location="cpu")
    train_config = dict(ckpt.get("config") or run.metrics.get("config") or {})
    ds, options = datasets.get(dict(model.config), train_config)
    labels = [(label, cam) for label, method, cam in TABLE1_ROWS if method == run.method]
    cams = tuple(dict.fromkeys(cam for _, cam in labels))
    split_metrics = run.metrics.get(datasets.split) if datasets.data is None else None
    if isinstance(split_metrics, Mapping) and split_metrics.get("accuracy") is not None:
        whole, source = split_metrics, f"training ({datasets.split}, all {split_metrics.get('n')} faces)"
    else:
        whole = evaluate(model, ds, CAMSettings(cam_methods=(), device=device, seed=seed, progress=progress), options)
        source = f"evaluated ({datasets.split}, all {whole.get('n')} faces)"
    subset, _ = fixed_subset(ds, cam_samples, seed)
    scored = evaluate(model, subset, CAMSettings(cam_methods=cams, device=device, seed=seed, progress=progress),
                      options) if len(subset) else {}
    cam_cos, cam_ci = scored.get("cam_cos") or {}, scored.get("cam_cos_ci") or {}
    rows = []
    for label, cam in labels:
        acc_lo, acc_hi = _interval(whole.get("accuracy_ci"))
        att_lo, att_hi = _interval(whole.get("att_cos_ci"))
        cam_lo, cam_hi = _interval(cam_ci.get(cam))
        rows.append({
            "method": label, "au_guided": run.au_weight > 0, "accuracy": _number(whole.get("accuracy")),
            "accuracy_low": acc_lo, "accuracy_high": acc_hi, "cam_cos": _number(cam_cos.get(cam)),
            "cam_cos_low": cam_lo, "cam_cos_high": cam_hi, "att_cos": _number(whole.get("att_cos_mean")),
            "att_cos_low": att_lo, "att_cos_high": att_hi, "cam_method": cam, "backbone": run.backbone,
            "au_weight": run.au_weight, "seed": run.seed, "n": int(whole.get("n") or 0),
            "cam_n": int(scored.get("cam_n_valid") or 0), "accuracy_source": source, "run": str(run.folder)})
    return rows


def _order(table: pd.DataFrame) -> pd.DataFrame:
    rank = {label: i for i, (label, _, _) in enumerate(TABLE1_ROWS)}
    key = table["method"].map(rank).fillna(len(rank))
    return table.assign(_k=key).sort_values(["_k", "au_guided", "au_weight", "seed"]).drop(columns="_k") \
        .reset_index(drop=True)


def collect_table1(sweep_dir: str | Path, split: str = "val", cam_samples: int | None = 300, data: Any = None,
                   landmarks: str | None = None, device: str = "auto", seed: int = 0,
                   progress: bool = False) -> pd.DataFrame:
    """Table 1 of a sweep of training runs: one row per Table 1 row, guidance and seed (`TABLE1_COLUMNS`).

    split: the evaluation split ("val" = PublicTest under FER2013's official protocol; "test" for RAF-DB).
    cam_samples: faces with an AU map on which CAM-COS is measured, one seeded subset for every run
    (None or <= 0: all of them). data: None reads each run's own training data (its data_root); a path or a
    dataset object evaluates there instead (accuracy then evaluated here too). landmarks: None = the runs'.
    """
    from fer_lib.data.loaders import SPLITS
    from fer_lib.utils import check_choice

    check_choice("split", split, SPLITS)
    runs = find_runs(sweep_dir)
    if not runs:
        raise ConfigError(f"no finished training runs (metrics.json with a config and checkpoints/best.pt) under "
                          f"{sweep_dir}")
    datasets = _Datasets(data, split, landmarks, seed, progress)
    rows = [row for run in runs for row in evaluate_run(run, datasets, cam_samples, device, seed, progress)]
    return _order(pd.DataFrame(rows, columns=list(TABLE1_COLUMNS)))


def paper_comparison(table: pd.DataFrame) -> pd.DataFrame:
    """Table 1 laid out as in the paper, ours beside the paper's RAF-DB numbers (for direction only: other data).

    One row per Table 1 row in the paper's order (rows not run are kept, ours empty); accuracy in %, ours the
    mean over seeds; columns `<metric> <who> <without|with>` for accuracy and CAM-COS (paper, ours), ATT-COS
    (ours), and the change with AUs (`... delta`)."""
    rows = []
    for label, _, _ in TABLE1_ROWS:
        paper = PAPER_TABLE1[label]
        ours = table[table["method"] == label] if len(table) else table
        row: dict[str, Any] = {"method": label}
        for metric, scale in (("accuracy", 100.0), ("cam_cos", 1.0), ("att_cos", 1.0)):
            name = {"accuracy": "accuracy", "cam_cos": "CAM-COS", "att_cos": "ATT-COS"}[metric]
            if metric != "att_cos":
                pair = paper.get(metric)
                row[f"{name} paper without"] = pair[0] if pair else math.nan
                row[f"{name} paper with"] = pair[1] if pair else math.nan
            for guided, word in ((False, "without"), (True, "with")):
                sel = ours[ours["au_guided"] == guided][metric] if len(ours) else pd.Series(dtype=float)
                row[f"{name} ours {word}"] = float(sel.mean()) * scale if sel.notna().any() else math.nan
            row[f"{name} ours delta"] = row[f"{name} ours with"] - row[f"{name} ours without"]
        rows.append(row)
    return pd.DataFrame(rows).set_index("method")


def format_table1(table: pd.DataFrame) -> pd.DataFrame:
    """table1.csv for reading: accuracy in % and cosines with their 95% intervals as 'value [low, high]'."""
    def cell(row: pd.Series, metric: str, scale: float, digits: int) -> str:
        v, lo, hi = (row[metric] * scale, row[f"{metric}_low"] * scale, row[f"{metric}_high"] * scale)
        if not math.isfinite(v):
            return "-"
        return f"{v:.{digits}f}" + (f" [{lo:.{digits}f}, {hi:.{digits}f}]" if math.isfinite(lo) else "")

    out = pd.DataFrame({
        "method": table["method"], "AUs": np.where(table["au_guided"], "with", "without"),
        "accuracy %": [cell(r, "accuracy", 100.0, 2) for _, r in table.iterrows()],
        "CAM-COS": [cell(r, "cam_cos", 1.0, 3) for _, r in table.iterrows()],
        "ATT-COS": [cell(r, "att_cos", 1.0, 3) for _, r in table.iterrows()],
        "CAM": table["cam_method"], "backbone": table["backbone"], "seed": table["seed"],
        "n (acc)": table["n"], "n (CAM)": table["cam_n"]})
    return out.reset_index(drop=True)


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return _plain(value.item())
    return value


def table1_record(table: pd.DataFrame, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The sections of notebook 11's metrics.json (kind "table1"): settings, rows (table1.csv), the paper's
    numbers and the side-by-side comparison; NaN written as null."""
    comparison = paper_comparison(table).reset_index()
    return {
        "settings": dict(settings),
        "rows": [{k: _plain(v) for k, v in r.items()} for r in table.to_dict(orient="records")],
        "paper": {"data": PAPER_DATA, "table1": {k: {m: list(v) if v else None for m, v in d.items()}
                                                  for k, d in PAPER_TABLE1.items()}},
        "comparison": [{k: _plain(v) for k, v in r.items()} for r in comparison.to_dict(orient="records")],
        "missing": [label for label, _, _ in TABLE1_ROWS if label not in set(table["method"])],
    }


__all__ = [
    "PAPER_DATA", "PAPER_TABLE1", "TABLE1_COLUMNS", "TABLE1_ROWS", "TRAINED_METHODS", "TrainedRun", "collect_table1",
    "evaluate_run", "find_runs", "fixed_subset", "format_table1", "method_of", "paper_comparison", "table1_record",
    "valid_map_indices",
]
