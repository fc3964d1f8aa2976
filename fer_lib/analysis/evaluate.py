"""Evaluate any fer_lib checkpoint on any supported dataset: one command, no other configuration.

    python -m fer_lib evaluate --checkpoint runs/r18/checkpoints/best.pt --data ../shared/data/fer2013
    python -m fer_lib evaluate --checkpoint best.pt --data my_faces/ --cam-methods gradcam,cam --out eval.json

    from fer_lib.analysis.evaluate import EvalOptions, evaluate
    from fer_lib.analysis.interpret import CAMSettings
    result = evaluate("fer2013_lite0_guided", "../shared/data/fer2013", CAMSettings(cam_methods="gradcam"))

`evaluate` is the one evaluation entry point for a model on a dataset: the command line, the
notebooks and fer_lib.analysis.explain's callers use it; it takes a TappedModel, a checkpoint
path or a shipped name, and a data folder / file, a dataset object or nothing.

The checkpoint carries everything needed to rebuild the model and read the data the way it
was trained (backbone, tapped layers, image size, class order, normalisation:
fer_lib.models.load_checkpoint). The data is any dataset fer_lib.data reads; a folder is
read as an ImageFolder (class folders named after the expressions, synonyms accepted, with
or without train/val/test split folders; without split folders every image is evaluated).
Without `--data` the checkpoint's own training dataset is used (its full `--split`).

Reported: accuracy, macro-F1, per-class accuracy, confusion matrix (rows = true class),
ATT-COS per tapped layer (fer_lib.training.train.evaluate), CAM-COS per CAM method on a seeded subset
(fer_lib.analysis.interpret.evaluate_interpretability; CAMs cost a backward pass each), and the landmark
detection rate overall and per class (MediaPipe through the on-disk cache), with 95% intervals as
[low, high]: accuracy_ci, macro_f1_ci, att_cos_ci and cam_cos_ci {method: [low, high]}. Map scores count
only samples with a valid AU map (landmarks found and a class with AUs; neutral has none).
Unreadable images are skipped, counted and listed with the reason. The JSON is written
atomically and stamped with run_info; a table is printed.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from fer_lib.analysis.interpret import (OWN_CAM, CAMSettings, InterpretabilityResult, compute_cams,
                                        evaluate_interpretability, faithfulness_scores, faithfulness_table,
                                        make_loader, own_cam, subset_indices)
from fer_lib.data import build_datasets, generate_sample
from fer_lib.data.dataset import DATASETS
from fer_lib.data.loaders import SPLIT_NAMES
from fer_lib.metrics import protocol_note
from fer_lib.models import TappedModel, load_checkpoint
from fer_lib.training.train import evaluate as train_evaluate
from fer_lib.utils import (ConfigError, UserError, atomic_path, atomic_write_json, check_choice, check_number,
                           repo_path, repo_relative, run_cli, run_info)

#: CAM methods computed by default (the model's own CAM is added when the head allows it)
DEFAULT_EVAL_CAMS: tuple[str, ...] = ("gradcam",)
#: how many skipped items are listed by name in the JSON (all are counted)
MAX_LISTED_SKIPPED = 50
#: landmark modes of the evaluated data
LANDMARK_MODES: tuple[str, ...] = ("detect", "ground_truth", "none")


class EvaluationError(UserError, RuntimeError):
    """The checkpoint or the data cannot be evaluated (the message says why and what is accepted)."""


@dataclass(frozen=True)
class EvalOptions:
    """How to read the data of an evaluation (the model and the CAM settings aside), validated when made.

    dataset         how to read `data` (fer_lib.data datasets; default: a folder is an ImageFolder, a .csv a csv)
    split           the split to evaluate where the data has splits (a plain class-folder tree is evaluated whole)
    landmarks       detect (MediaPipe, cached), ground_truth (synthetic data only) or none (no AU maps, no CAMs)
    cache_dir       landmark cache (default .cache/landmarks)
    max_samples     evaluate a seeded subset of the split of this size (None: all of it)
    batch_size      evaluation batch (CAM batches: at most 32)
    dataset_kwargs  more options for fer_lib.data.build_datasets
    faithfulness_samples      valid samples of the ROAD faithfulness table (0: none), from a seeded subset of
                              twice as many of the whole split (fer_lib.analysis.interpret.faithfulness_scores)
    faithfulness_percentiles  the ROAD percentiles
    """

    dataset: str | None = None
    split: str = "val"
    landmarks: str = "detect"
    cache_dir: str | None = None
    max_samples: int | None = None
    batch_size: int = 64
    dataset_kwargs: Mapping[str, Any] | None = None
    faithfulness_samples: int = 0
    faithfulness_percentiles: tuple[int, ...] = (20, 50, 80)

    def __post_init__(self) -> None:
        check_choice("landmarks", self.landmarks, LANDMARK_MODES)
        check_number("faithfulness_samples", self.faithfulness_samples, integer=True, minimum=0)
        object.__setattr__(self, "faithfulness_percentiles", tuple(int(p) for p in self.faithfulness_percentiles))
        check_number("batch_size", self.batch_size, integer=True, minimum=1)
        if self.max_samples is not None:
            check_number("max_samples", self.max_samples, integer=True, minimum=1)


class Evaluation(dict):
    """What `evaluate` returns: the JSON-ready metrics (this dict, see the module docstring), plus
    `interpretability`, the per-sample CAM/attention scores (fer_lib.analysis.interpret.InterpretabilityResult,
    None without CAMs), and `faithfulness`, the tidy ROAD scores (a DataFrame, None unless asked for)."""

    interpretability: InterpretabilityResult | None = None
    faithfulness: Any = None


def _model_and_checkpoint(model_or_checkpoint: Any, trust: bool) -> tuple[TappedModel, dict[str, Any], str | None]:
    """(model, checkpoint dict, checkpoint name) from a TappedModel, a checkpoint file or a shipped name (through
    fer_lib.models.load_checkpoint; files that are not plain data are refused unless `trust`)."""
    if isinstance(model_or_checkpoint, torch.nn.Module):
        return model_or_checkpoint, {}, None
    try:
        model, ckpt = load_checkpoint(model_or_checkpoint, map_location="cpu", trust=trust)
    except ConfigError:  # not found, refused as unsafe, not a fer_lib checkpoint: the message says which
        raise
    except (ValueError, KeyError) as exc:
        raise EvaluationError(f"{model_or_checkpoint} is not a fer_lib checkpoint: {exc}") from exc
    except Exception as exc:  # a state dict that does not fit the recorded architecture, ...
        raise EvaluationError(f"could not read checkpoint {model_or_checkpoint}: {type(exc).__name__}: {exc}") from exc
    return model, ckpt, str(model_or_checkpoint)


def guess_dataset(data: str | Path) -> str:
    """Dataset name for a path: a folder -> 'imagefolder', a .csv -> 'csv' (FER2013's own csv: pass 'fer2013_csv')."""
    path = Path(data)
    if path.is_dir():
        return "imagefolder"
    if path.suffix.lower() == ".csv":
        return "csv"
    if not path.exists():
        raise FileNotFoundError(f"data not found: {path} (give a class-folder tree, a dataset folder or a csv)")
    raise ConfigError(f"cannot tell the dataset of {path}; pass --dataset (one of the fer_lib.data datasets)")


def _folder_has_splits(root: Path) -> bool:
    return any(d.is_dir() and d.name.lower() in SPLIT_NAMES for d in root.iterdir())


def load_eval_dataset(model_config: Mapping[str, Any], train_config: Mapping[str, Any] | None,
                      data: str | Path | None, options: EvalOptions | None = None, seed: int = 0,
                      progress: bool = True) -> tuple[Any, str, str]:
    """Build the unaugmented split to evaluate, read the way the model expects; returns (dataset, name, split)."""
    options = options or EvalOptions()
    kwargs: dict[str, Any] = dict(options.dataset_kwargs or {})
    kwargs.setdefault("progress", progress)
    for key in ("mean", "std"):
        if model_config.get(key) is not None:
            kwargs.setdefault(key, tuple(model_config[key]))
    image_size = int(model_config.get("image_size") or 112)
    train_config = train_config or {}
    if data is None:
        name = options.dataset or train_config.get("dataset")
        if not name:
            raise ConfigError("the checkpoint records no training dataset; pass --data (and --dataset)")
        root = train_config.get("data_root") if name == train_config.get("dataset") else None
        root = repo_path(root) if root else None  # recorded relative to the repository root
        if name == train_config.get("dataset"):
            saved = dict(train_config.get("dataset_kwargs") or {})
            saved.pop("max_per_class", None)  # evaluate the whole split, not the training subset
            saved.pop("augment_config", None)
            kwargs = {**saved, **kwargs}
    else:
        name = options.dataset or guess_dataset(data)
        root = data
    check_choice("dataset", name, DATASETS)
    class_names = model_config.get("class_names")
    if name in ("imagefolder", "fer2013", "csv") and class_names:
        kwargs.setdefault("class_names", tuple(class_names))  # labels in the model's class order
    split = eval_split = options.split
    if name in ("imagefolder", "fer2013") and root is not None and Path(root).is_dir() and not _folder_has_splits(Path(root)):
        kwargs.setdefault("val_fraction", 0.0)  # a plain class-folder tree: evaluate every image
        kwargs.setdefault("test_fraction", 0.0)
        eval_split = "train"
        split = "all"
    else:
        kwargs.setdefault("splits", [eval_split])
    out = build_datasets(name, root=root, image_size=image_size, seed=seed, landmarks=options.landmarks,
                         cache_dir=options.cache_dir, augment=False, **kwargs)
    if eval_split not in out:
        raise ConfigError(f"dataset {name!r} at {root} has no {split!r} split; it has: {', '.join(out) or 'none'}")
    ds = out[eval_split]
    model_classes = list(class_names or [])
    if model_classes and list(ds.class_names) != model_classes:
        raise EvaluationError(f"the data's classes {list(ds.class_names)} do not match the model's {model_classes}; "
                              f"evaluate on data with the model's classes")
    return ds, name, split


def landmark_summary(dataset: Any, indices: Sequence[int] | None = None) -> dict[str, Any]:
    """Detection rate overall and per class from the dataset's records (has_landmarks), optionally of a subset."""
    records = dataset.records if indices is None else [dataset.records[i] for i in indices]
    labels = np.array([r.label for r in records], dtype=int)
    found = np.array([bool(r.has_landmarks) for r in records], dtype=bool)
    per_class = {}
    for i, name in enumerate(dataset.class_names):
        sel = labels == i
        per_class[name] = {"n": int(sel.sum()), "detected": int(found[sel].sum()),
                           "rate": float(found[sel].mean()) if sel.any() else None}
    reasons: dict[str, int] = {}
    for r in records:
        if not r.has_landmarks:
            why = str(r.meta.get("landmark_reason") or "not detected") if hasattr(r, "meta") else "not detected"
            why = "no face found" if why.startswith("no face") else why
            reasons[why] = reasons.get(why, 0) + 1
    return {"n": int(len(found)), "detected": int(found.sum()),
            "detection_rate": float(found.mean()) if len(found) else None, "per_class": per_class,
            "missing_reasons": reasons}


def _dataset_landmarks(ds: Any, indices: Sequence[int] | None, options: EvalOptions) -> dict[str, Any] | None:
    """landmark_summary of the evaluated items, where the data reads landmarks and its records carry them."""
    records = getattr(ds, "records", None)
    if options.landmarks == "none" or not records or not hasattr(records[0], "has_landmarks"):
        return None
    return landmark_summary(ds, indices)


def _read_data(model: TappedModel, ckpt: Mapping[str, Any], data: Any, options: EvalOptions,
               cams: CAMSettings) -> tuple[Any, str, str]:
    """(dataset, its name, the split evaluated) from a path / None (load_eval_dataset) or a dataset object."""
    if data is None or isinstance(data, (str, Path)):
        return load_eval_dataset(dict(model.config), ckpt.get("config"), data, options, cams.seed, cams.progress)
    return data, str(getattr(data, "name", None) or type(data).__name__), str(getattr(data, "split", None) or options.split)


def _cam_scores(model: TappedModel, ds: Any, target: Any, indices: Sequence[int], cams: CAMSettings,
                options: EvalOptions, checkpoint: str | None) -> InterpretabilityResult:
    """evaluate_interpretability on a seeded subset of `target` (cams.max_samples); samples named by dataset index."""
    cam_n = cams.max_samples if options.max_samples is None else min(cams.max_samples or len(indices), len(indices))
    cam_indices = subset_indices(len(target), cam_n, cams.seed)
    loader = make_loader(target, cam_indices, batch_size=min(options.batch_size, 32))
    config = {"checkpoint": checkpoint, "target": cams.target, "threshold": cams.threshold,
              "max_samples": cams.max_samples, "seed": cams.seed, "model": getattr(model, "config", None)}
    result = evaluate_interpretability(model, loader, cams, config=config,
                                       class_names=getattr(ds, "class_names", None))
    for frame in (result.scores, result.predictions):
        frame["sample"] = [indices[cam_indices[i]] for i in frame["sample"]]
    return result


def _faithfulness(model: TappedModel, ds: Any, cams: CAMSettings, options: EvalOptions) -> Any:
    """faithfulness_scores on the first `options.faithfulness_samples` valid samples of a seeded subset of `ds`."""
    n = options.faithfulness_samples
    loader = make_loader(ds, subset_indices(len(ds), max(n * 2, n), cams.seed), batch_size=8)
    return faithfulness_scores(model, loader, cams.replace(max_samples=n), percentiles=options.faithfulness_percentiles)


def evaluate(model_or_checkpoint: TappedModel | str | Path, data: Any = None, cams: CAMSettings | None = None,
             options: EvalOptions | None = None, *, trust: bool = False) -> Evaluation:
    """Every metric of one model on one dataset split, as a JSON-ready dict (see the module docstring).

    `model_or_checkpoint`: a TappedModel, a checkpoint file or a shipped name (fer_lib.models.load_checkpoint;
    `trust` allows a file that is not plain data). `data`: a folder or file (read as `options` say), a dataset
    object (contract 1), or None for the checkpoint's own training dataset. `cams` (default: no CAM) gives the
    CAM methods and their settings, CAM-COS on a seeded subset of `cams.max_samples`, and the device, seed and
    progress bars of the whole evaluation. The result's `interpretability` holds the per-sample map scores, its
    `faithfulness` the ROAD scores (`options.faithfulness_samples`, with the table under "faithfulness").
    """
    cams = cams if cams is not None else CAMSettings(cam_methods=())
    options = options or EvalOptions()
    dev, methods = cams.torch_device, list(cams.cam_methods)
    config = {"checkpoint": None if isinstance(model_or_checkpoint, torch.nn.Module) else str(model_or_checkpoint),
              "data": None if not isinstance(data, (str, Path)) else str(data), "dataset": options.dataset,
              "split": options.split, "cam_methods": methods, "cam_samples": cams.max_samples,
              "max_samples": options.max_samples, "batch_size": options.batch_size, "landmarks": options.landmarks,
              "seed": cams.seed, "device": str(dev)}
    model, ckpt, checkpoint = _model_and_checkpoint(model_or_checkpoint, trust)
    mc = dict(model.config)
    check_cams_run(model, [m for m in methods if m != OWN_CAM])  # before reading any data: fail in seconds, not hours
    ds, name, split_used = _read_data(model, ckpt, data, options, cams)
    config.update(dataset=name, split=split_used)
    if len(ds) == 0:
        raise EvaluationError(f"no readable images to evaluate ({len(getattr(ds, 'skipped', []))} skipped)")
    dropped = []
    if OWN_CAM in methods and not _has_own_cam(model):
        methods = [m for m in methods if m != OWN_CAM]
        dropped.append("cam (the model's own CAM needs a global-average-pool + linear head after the tapped layer)")
    indices = subset_indices(len(ds), options.max_samples, cams.seed)
    target = ds if options.max_samples is None else torch.utils.data.Subset(ds, indices)
    model = model.to(dev).eval()
    t0 = time.perf_counter()
    cls = train_evaluate(model, target, dev, batch_size=options.batch_size, desc="evaluate")
    elapsed = time.perf_counter() - t0
    skipped = list(getattr(ds, "skipped", []))
    path_data = data if isinstance(data, (str, Path)) else None
    result = Evaluation({
        "run": run_info(config), "checkpoint": None if checkpoint is None else repo_relative(checkpoint),
        "data": None if path_data is None else repo_relative(str(path_data)),
        "dataset": name, "split": split_used, "n": int(cls["n"]), "class_names": list(ds.class_names),
        "model": {k: mc.get(k) for k in ("backbone", "image_size", "tap_names", "num_classes", "mean", "std")},
        "train_config": {k: (ckpt.get("config") or {}).get(k) for k in
                         ("dataset", "au_weight", "layers", "epochs", "seed", "image_size", "dataset_kwargs")},
        "checkpoint_epoch": ckpt.get("epoch"),
        "training": (checkpoint_training_record(checkpoint) if checkpoint else {})
        or dict((ckpt.get("card") or {}).get("training") or {}),
        "accuracy": cls["accuracy"], "macro_f1": cls["macro_f1"], "per_class_accuracy": cls["per_class_accuracy"],
        "confusion": cls["confusion"], "ce": cls.get("ce"),
        "att_cos": cls["att_cos"], "att_cos_mean": cls["att_cos_mean"], "n_valid_maps": cls["n_valid_maps"],
        "accuracy_ci": cls.get("accuracy_ci"), "macro_f1_ci": cls.get("macro_f1_ci"), "att_cos_ci": cls.get("att_cos_ci"),
        "cam_cos": {}, "cam_cos_ci": {}, "cam_pearson": {}, "cam_energy_ratio": {}, "cam_n": 0, "cam_n_valid": 0,
        "landmarks": _dataset_landmarks(ds, None if options.max_samples is None else indices, options),
        "skipped": {"count": len(skipped), "items": [{"path": p, "reason": why} for p, why in skipped[:MAX_LISTED_SKIPPED]]},
        "eval_time_s": elapsed, "eval_images_per_s": cls["n"] / elapsed if elapsed > 0 else None,
        "protocol": protocol_note(name if name != "imagefolder" or not _is_fer2013(path_data) else "fer2013", split_used),
    })
    if methods and options.landmarks != "none" and cls["n_valid_maps"]:
        t1 = time.perf_counter()
        interp = _cam_scores(model, ds, target, indices, cams.replace(cam_methods=tuple(methods)), options, checkpoint)
        s = interp.summary
        result.update(cam_cos=s["cam_cos"], cam_cos_ci=s.get("cam_cos_ci") or {}, cam_n=s["n"], cam_n_valid=s["n_valid"], cam_time_s=time.perf_counter() - t1,
                      cam_pearson={m: s["pearson"].get(f"cam:{m}") for m in methods},
                      cam_energy_ratio={m: s["energy_ratio"].get(f"cam:{m}") for m in methods},
                      au_area=s.get("au_area"))
        result.interpretability = interp
        if options.faithfulness_samples:
            result.faithfulness = _faithfulness(model, ds, cams.replace(cam_methods=tuple(methods)), options)
            result["faithfulness"] = faithfulness_table(result.faithfulness).to_dict(orient="index")
    result["cam_methods"] = methods
    result["cam_methods_dropped"] = dropped
    return result


def _is_fer2013(data: str | Path | None) -> bool:
    """Whether a folder is FER2013 with its official split (the shared copy, or a folder named fer2013)."""
    return isinstance(data, (str, Path)) and Path(data).name.lower() == "fer2013" and (Path(data) / "val").is_dir()


def check_cams_run(model: torch.nn.Module, methods: Sequence[str]) -> None:
    """Run each CAM method once on a blank input, so a method this model cannot use fails before any data is read."""
    size = int(model.config.get("image_size") or 112)
    x = torch.zeros(1, int(model.config.get("in_chans") or 3), size, size)
    for method in methods:
        try:
            compute_cams(model.eval(), x, method, torch.zeros(1, dtype=torch.long))
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure here means this method cannot run on this model
            raise EvaluationError(f"CAM method {method!r} cannot run on this model ({type(exc).__name__}: {exc}); "
                                  f"choose other --cam-methods or 'none'") from exc


def _has_own_cam(model: torch.nn.Module) -> bool:
    """Whether the model's own CAM (classifier weights x last features) applies: a GAP + linear head."""
    try:
        x = torch.zeros(1, 3, int(model.config["image_size"]), int(model.config["image_size"]))
        own_cam(model.eval(), x, torch.zeros(1, dtype=torch.long))
        return True
    except Exception:
        return False


def format_table(result: dict[str, Any]) -> str:
    """A plain-text report of an evaluation result (summary, per-class table, confusion matrix)."""
    import pandas as pd

    def f(v: Any, pct: bool = False) -> str:
        if v is None or (isinstance(v, float) and not np.isfinite(v)):
            return "n/a"
        return f"{100 * v:.2f}%" if pct else f"{v:.3f}"

    def ci(interval: Any, pct: bool = False) -> str:
        """ "  [low, high] 95%" where the result holds an interval (older results: none)."""
        return f"  [{f(interval[0], pct)}, {f(interval[1], pct)}] 95%" if interval else ""

    m = result["model"]
    lines = [f"checkpoint {result['checkpoint']}  ({m['backbone']}, {m['image_size']} px, "
             f"lambda {result['train_config'].get('au_weight')})",
             f"data       {result['dataset']}:{result['split']} {result['data'] or '(training dataset)'}  "
             f"n={result['n']}  skipped={result['skipped']['count']}",
             f"accuracy   {f(result['accuracy'], True)}{ci(result.get('accuracy_ci'), True)}",
             f"macro-F1   {f(result['macro_f1'], True)}{ci(result.get('macro_f1_ci'), True)}"]
    for layer, v in (result["att_cos"] or {}).items():
        lines.append(f"ATT-COS    {f(v)}  ({layer}, {result['n_valid_maps']} valid maps)")
    if len(result["att_cos"] or {}) > 1 or result.get("att_cos_ci"):
        lines.append(f"ATT-COS    {f(result['att_cos_mean'])}{ci(result.get('att_cos_ci'))}  (mean over layers)")
    for method, v in (result["cam_cos"] or {}).items():
        lines.append(f"CAM-COS    {f(v)}{ci((result.get('cam_cos_ci') or {}).get(method))}  "
                     f"({method}, {result['cam_n_valid']} valid of {result['cam_n']} sampled)")
    lm = result.get("landmarks")
    if lm:
        lines.append(f"landmarks  {f(lm['detection_rate'], True)} detected ({lm['detected']}/{lm['n']})")
    rows = []
    for name in result["class_names"]:
        row = {"class": name, "accuracy": result["per_class_accuracy"].get(name)}
        if lm:
            row.update(n=lm["per_class"][name]["n"], landmarks=lm["per_class"][name]["rate"])
        rows.append(row)
    table = pd.DataFrame(rows).set_index("class")
    lines += ["", table.to_string(float_format=lambda v: f"{v:.3f}"), "",
              "confusion (rows: true, columns: predicted)",
              pd.DataFrame(result["confusion"], index=result["class_names"],
                           columns=[c[:5] for c in result["class_names"]]).to_string()]
    for note in result.get("cam_methods_dropped") or []:
        lines.append(f"\nnot computed: {note}")
    if result["skipped"]["count"]:
        lines.append(f"\nskipped {result['skipped']['count']} unreadable item(s), e.g.:")
        lines += [f"  {it['path']}: {it['reason']}" for it in result["skipped"]["items"][:5]]
    return "\n".join(lines)


def default_output(checkpoint: str | Path, dataset: str, split: str) -> Path:
    """<run folder>/evaluate/<dataset>-<split>.json beside the checkpoint's run."""
    path = Path(checkpoint)
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return run_dir / "evaluate" / f"{dataset}-{split}-{path.stem}.json"


def checkpoint_training_record(checkpoint: str | Path) -> dict[str, Any]:
    """Wall time, images/s, best epoch and config of the run that wrote `checkpoint` (its metrics.json), if present
    (not to be confused with fer_lib.workflow.pipeline.training_summary, which digests a metrics dict)."""
    path = Path(checkpoint)
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    metrics = run_dir / "metrics.json"
    if not metrics.is_file():
        return {}
    m = json.loads(metrics.read_text())
    cfg = m.get("config") or {}
    return {"train_time_s": m.get("train_time_s"), "images_per_s": m.get("images_per_s"),
            "best_epoch": m.get("best_epoch"), "epochs": cfg.get("epochs"), "device": m.get("device"),
            "train_dataset_kwargs": cfg.get("dataset_kwargs"), "seed": cfg.get("seed")}


def comparison_frame(results: dict[str, dict[str, Any]]) -> Any:
    """One row per evaluated model: accuracy, macro-F1, ATT-COS, CAM-COS per method, detection rate, training cost."""
    import pandas as pd

    rows = []
    for name, r in results.items():
        row: dict[str, Any] = {"model": name, "backbone": r["model"]["backbone"], "image_size": r["model"]["image_size"],
                               "au_weight": r["train_config"].get("au_weight"), "seed": r["train_config"].get("seed"),
                               "n": r["n"], "accuracy": r["accuracy"], "macro_f1": r["macro_f1"],
                               "att_cos": r["att_cos_mean"]}
        for method, v in (r.get("cam_cos") or {}).items():
            row[f"cam_cos_{method}"] = v
        row["detection_rate"] = (r.get("landmarks") or {}).get("detection_rate")
        train = r.get("training") or {}
        row.update(epochs=train.get("epochs"), train_time_s=train.get("train_time_s"),
                   images_per_s=train.get("images_per_s"))
        rows.append(row)
    return pd.DataFrame(rows).set_index("model")


def pair_deltas(table: Any, pairs: dict[str, tuple[str, str]]) -> Any:
    """Guided minus baseline for each (baseline, guided) pair of rows of `comparison_frame` (numeric metrics)."""
    import pandas as pd

    metrics = [c for c in table.columns if c in ("accuracy", "macro_f1", "att_cos", "train_time_s", "images_per_s")
               or c.startswith("cam_cos_")]
    rows = []
    for pair, (base, guided) in pairs.items():
        if base not in table.index or guided not in table.index:
            raise ConfigError(f"pair {pair!r}: {base!r} or {guided!r} is not an evaluated model ({list(table.index)})")
        row = {"pair": pair, "baseline": base, "guided": guided}
        numeric = lambda v: pd.to_numeric(v, errors="coerce")  # noqa: E731 - unknown (None) -> NaN
        row.update({m: numeric(table.loc[guided, m]) - numeric(table.loc[base, m]) for m in metrics})
        rows.append(row)
    return pd.DataFrame(rows).set_index("pair")


def make_synthetic_imagefolder(root: str | Path, n_per_class: int = 2, size: int = 48,
                               splits: Sequence[str] = ("train", "val"), seed: int = 0,
                               folders: dict[str, str] | None = None) -> Path:
    """A tiny FER2013-style ImageFolder (<root>/<split>/<class>/*.png, grayscale) of synthetic faces, for demos/smoke runs."""
    folders = folders or {"angry": "anger", "disgust": "disgust", "fear": "fear", "happy": "happiness",
                          "neutral": "neutral", "sad": "sadness", "surprise": "surprise"}
    root = Path(root)
    for split in splits:
        for folder, expression in folders.items():
            d = root / split / folder
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n_per_class):
                path = d / f"{i:04d}.png"
                if path.exists():
                    continue
                face = generate_sample(expression, seed=seed, split=split, index=i).image
                with atomic_path(path) as tmp:
                    Image.fromarray(face).convert("L").resize((size, size), Image.BILINEAR).save(tmp, format="PNG")
    return root


def build_parser() -> argparse.ArgumentParser:
    """The command-line options of `python -m fer_lib.analysis.evaluate`."""
    p = argparse.ArgumentParser(prog="python -m fer_lib.analysis.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True,
                   help="a fer_lib checkpoint (.pt from fer_lib.training.train, a shipped .safetensors) or a shipped name "
                        "(python -m fer_lib.models.checkpoints list)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow a checkpoint that is not plain data (unpickles code): only for a file you made")
    p.add_argument("--data", default=None, help="dataset folder/file (default: the checkpoint's training dataset)")
    p.add_argument("--dataset", default=None, choices=DATASETS, help="how to read --data (default: a folder is an ImageFolder)")
    p.add_argument("--split", default="val", choices=("train", "val", "test"),
                   help="split to evaluate where the data has splits (a plain class-folder tree is evaluated whole)")
    p.add_argument("--cam-methods", default=",".join(DEFAULT_EVAL_CAMS),
                   help="comma-separated CAM methods (fer_lib.analysis.interpret.CAM_METHODS), 'all', or 'none'")
    p.add_argument("--cam-samples", type=int, default=1000, help="seeded subset for CAM-COS (0 = every sample)")
    p.add_argument("--max-samples", type=int, default=None, help="evaluate a seeded subset of this size")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--landmarks", default="detect", choices=("detect", "ground_truth", "none"),
                   help="detect (MediaPipe, cached), ground_truth (synthetic data only) or none (no AU maps)")
    p.add_argument("--cache-dir", default=None, help="landmark cache (default .cache/landmarks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--out", default=None, help="JSON file (default <run>/evaluate/<dataset>-<split>-<ckpt>.json)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: evaluate, write the JSON atomically, print the table; exit 2 on bad input."""
    args = build_parser().parse_args(argv)

    def body() -> int:
        cams = CAMSettings(cam_methods=args.cam_methods, max_samples=None if args.cam_samples == 0 else args.cam_samples,
                           seed=args.seed, device=args.device, progress=not args.no_progress)
        options = EvalOptions(dataset=args.dataset, split=args.split, landmarks=args.landmarks, cache_dir=args.cache_dir,
                              max_samples=args.max_samples, batch_size=args.batch_size)
        result = evaluate(args.checkpoint, args.data, cams, options, trust=args.trust_checkpoint)
        out = Path(args.out) if args.out else default_output(args.checkpoint, result["dataset"], result["split"])
        atomic_write_json(out, result)
        print(format_table(result))
        print(f"\nwrote {out}")
        return 0

    return run_cli(body, args.debug, user_errors=(FileNotFoundError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
