"""Evaluate any fer_lib checkpoint on any supported dataset: one command, no other configuration.

    python -m fer_lib.analysis.evaluate --checkpoint runs/r18/checkpoints/best.pt --data ../shared/data/fer2013
    python -m fer_lib.analysis.evaluate --checkpoint best.pt --data my_faces/ --cam-methods gradcam,cam --out eval.json

The checkpoint carries everything needed to rebuild the model and read the data the way it
was trained (backbone, tapped layers, image size, class order, normalisation:
fer_lib.models.load_checkpoint). The data is any dataset fer_lib.data reads; a folder is
read as an ImageFolder (class folders named after the expressions, synonyms accepted, with
or without train/val/test split folders; without split folders every image is evaluated).
Without `--data` the checkpoint's own training dataset is used (its full `--split`).

Reported: accuracy, macro-F1, per-class accuracy, confusion matrix (rows = true class),
ATT-COS per tapped layer (fer_lib.training.train.evaluate), CAM-COS per CAM method on a seeded subset
(fer_lib.analysis.interpret.evaluate_checkpoint; CAMs cost a backward pass each), and the landmark
detection rate overall and per class (MediaPipe through the on-disk cache). Map scores count
only samples with a valid AU map (landmarks found and a class with AUs; neutral has none).
Unreadable images are skipped, counted and listed with the reason. The JSON is written
atomically and stamped with run_info; a table is printed.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from fer_lib.metrics import protocol_note
from fer_lib.utils import ConfigError, UserError, atomic_write_json, check_choice, repo_relative, run_cli, run_info

#: CAM methods computed by default (the model's own CAM is added when the head allows it)
DEFAULT_EVAL_CAMS: tuple[str, ...] = ("gradcam",)
#: how many skipped items are listed by name in the JSON (all are counted)
MAX_LISTED_SKIPPED = 50


class EvaluationError(UserError, RuntimeError):
    """The checkpoint or the data cannot be evaluated (the message says why and what is accepted)."""


def _load_model(checkpoint: str | Path, trust: bool = False):
    """(model, checkpoint dict) from a checkpoint file or shipped name; files that are not plain data are
    refused unless `trust` (fer_lib.models.checkpoints)."""
    from fer_lib.models import load_checkpoint

    try:
        return load_checkpoint(checkpoint, map_location="cpu", trust=trust)
    except ConfigError:  # not found, refused as unsafe, not a fer_lib checkpoint: the message says which
        raise
    except (ValueError, KeyError) as exc:
        raise EvaluationError(f"{checkpoint} is not a fer_lib checkpoint: {exc}") from exc
    except Exception as exc:  # a state dict that does not fit the recorded architecture, ...
        raise EvaluationError(f"could not read checkpoint {checkpoint}: {type(exc).__name__}: {exc}") from exc


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
    from fer_lib.data.loaders import SPLIT_NAMES

    return any(d.is_dir() and d.name.lower() in SPLIT_NAMES for d in root.iterdir())


def load_eval_dataset(model_config: dict[str, Any], train_config: dict[str, Any] | None, data: str | Path | None,
                      dataset: str | None = None, split: str = "val", landmarks: str = "detect",
                      cache_dir: str | None = None, seed: int = 0, progress: bool = True,
                      dataset_kwargs: dict[str, Any] | None = None) -> tuple[Any, str, str]:
    """Build the unaugmented split to evaluate, read the way the model expects; returns (dataset, name, split)."""
    from fer_lib.data import build_datasets
    from fer_lib.data.dataset import DATASETS

    kwargs: dict[str, Any] = dict(dataset_kwargs or {})
    kwargs.setdefault("progress", progress)
    for key in ("mean", "std"):
        if model_config.get(key) is not None:
            kwargs.setdefault(key, tuple(model_config[key]))
    image_size = int(model_config.get("image_size") or 112)
    train_config = train_config or {}
    if data is None:
        name = dataset or train_config.get("dataset")
        if not name:
            raise ConfigError("the checkpoint records no training dataset; pass --data (and --dataset)")
        root = train_config.get("data_root") if name == train_config.get("dataset") else None
        if name == train_config.get("dataset"):
            saved = dict(train_config.get("dataset_kwargs") or {})
            saved.pop("max_per_class", None)  # evaluate the whole split, not the training subset
            saved.pop("augment_config", None)
            kwargs = {**saved, **kwargs}
    else:
        name = dataset or guess_dataset(data)
        root = data
    check_choice("dataset", name, DATASETS)
    class_names = model_config.get("class_names")
    if name in ("imagefolder", "fer2013", "csv") and class_names:
        kwargs.setdefault("class_names", tuple(class_names))  # labels in the model's class order
    eval_split = split
    if name in ("imagefolder", "fer2013") and root is not None and Path(root).is_dir() and not _folder_has_splits(Path(root)):
        kwargs.setdefault("val_fraction", 0.0)  # a plain class-folder tree: evaluate every image
        kwargs.setdefault("test_fraction", 0.0)
        eval_split = "train"
        split = "all"
    else:
        kwargs.setdefault("splits", [eval_split])
    out = build_datasets(name, root=root, image_size=image_size, seed=seed, landmarks=landmarks,
                         cache_dir=cache_dir, augment=False, **kwargs)
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


def evaluate_checkpoint_on_data(checkpoint: str | Path, data: str | Path | None = None, dataset: str | None = None,
                                split: str = "val", cam_methods: str | Sequence[str] | None = DEFAULT_EVAL_CAMS,
                                cam_samples: int | None = 1000, max_samples: int | None = None,
                                batch_size: int = 64, landmarks: str = "detect", cache_dir: str | None = None,
                                seed: int = 0, device: str = "auto", progress: bool = True,
                                dataset_kwargs: dict[str, Any] | None = None, trust: bool = False) -> dict[str, Any]:
    """Every metric of one checkpoint on one dataset split, as a JSON-ready dict (see the module docstring)."""
    from fer_lib.analysis.interpret import check_cam_methods, evaluate_checkpoint, subset_indices
    from fer_lib.utils import resolve_device
    from fer_lib.training.train import evaluate as train_evaluate

    methods = check_cam_methods(cam_methods) if cam_methods not in (None, "", "none", ()) else []
    check_choice("landmarks", landmarks, ("detect", "ground_truth", "none"))
    for name, value in (("batch_size", batch_size), ("cam_samples", cam_samples), ("max_samples", max_samples)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigError(f"{name} must be a positive integer{' or None' if name != 'batch_size' else ''}, got {value!r}")
    dev = resolve_device(device)
    config = {"checkpoint": str(checkpoint), "data": None if data is None else str(data), "dataset": dataset,
              "split": split, "cam_methods": methods, "cam_samples": cam_samples, "max_samples": max_samples,
              "batch_size": batch_size, "landmarks": landmarks, "seed": seed, "device": str(dev)}
    model, ckpt = _load_model(checkpoint, trust=trust)
    mc = dict(model.config)
    check_cams_run(model, [m for m in methods if m != "cam"])  # before reading any data: fail in seconds, not hours
    ds, name, split_used = load_eval_dataset(mc, ckpt.get("config"), data, dataset, split, landmarks, cache_dir,
                                             seed, progress, dataset_kwargs)
    config.update(dataset=name, split=split_used)
    if len(ds) == 0:
        raise EvaluationError(f"no readable images to evaluate ({len(ds.skipped)} skipped)")
    dropped = []
    if "cam" in methods and not _has_own_cam(model):
        methods = [m for m in methods if m != "cam"]
        dropped.append("cam (the model's own CAM needs a global-average-pool + linear head after the tapped layer)")
    indices = subset_indices(len(ds), max_samples, seed)
    target = ds if max_samples is None else torch.utils.data.Subset(ds, indices)
    model = model.to(dev).eval()
    t0 = time.perf_counter()
    cls = train_evaluate(model, target, dev, batch_size=batch_size, desc="evaluate")
    elapsed = time.perf_counter() - t0
    result: dict[str, Any] = {
        "run": run_info(config), "checkpoint": repo_relative(str(checkpoint)),
        "data": None if data is None else repo_relative(str(data)),
        "dataset": name, "split": split_used, "n": int(cls["n"]), "class_names": list(ds.class_names),
        "model": {k: mc.get(k) for k in ("backbone", "image_size", "tap_names", "num_classes", "mean", "std")},
        "train_config": {k: (ckpt.get("config") or {}).get(k) for k in
                         ("dataset", "au_weight", "layers", "epochs", "seed", "image_size", "dataset_kwargs")},
        "checkpoint_epoch": ckpt.get("epoch"),
        "training": training_summary(checkpoint) or dict((ckpt.get("card") or {}).get("training") or {}),
        "accuracy": cls["accuracy"], "macro_f1": cls["macro_f1"], "per_class_accuracy": cls["per_class_accuracy"],
        "confusion": cls["confusion"], "ce": cls.get("ce"),
        "att_cos": cls["att_cos"], "att_cos_mean": cls["att_cos_mean"], "n_valid_maps": cls["n_valid_maps"],
        "cam_cos": {}, "cam_pearson": {}, "cam_energy_ratio": {}, "cam_n": 0, "cam_n_valid": 0,
        "landmarks": landmark_summary(ds, None if max_samples is None else indices) if landmarks != "none" else None,
        "skipped": {"count": len(ds.skipped),
                    "items": [{"path": p, "reason": why} for p, why in ds.skipped[:MAX_LISTED_SKIPPED]]},
        "eval_time_s": elapsed, "eval_images_per_s": cls["n"] / elapsed if elapsed > 0 else None,
        "protocol": protocol_note(name if name != "imagefolder" or not _is_fer2013(data) else "fer2013", split_used),
    }
    if methods and landmarks != "none" and cls["n_valid_maps"]:
        cam_n = cam_samples if max_samples is None else min(cam_samples or len(indices), len(indices))
        cam_indices = subset_indices(len(target), cam_n, seed)
        cam_target = torch.utils.data.Subset(target, cam_indices)
        cam_target.class_names = ds.class_names  # type: ignore[attr-defined]
        t1 = time.perf_counter()
        interp = evaluate_checkpoint(model, cam_target, methods, batch_size=min(batch_size, 32), seed=seed,
                                     device=dev, progress=progress)
        s = interp.summary
        result.update(cam_cos=s["cam_cos"], cam_n=s["n"], cam_n_valid=s["n_valid"], cam_time_s=time.perf_counter() - t1,
                      cam_pearson={m: s["pearson"].get(f"cam:{m}") for m in methods},
                      cam_energy_ratio={m: s["energy_ratio"].get(f"cam:{m}") for m in methods},
                      au_area=s.get("au_area"))
    result["cam_methods"] = methods
    result["cam_methods_dropped"] = dropped
    return result


def _is_fer2013(data: str | Path | None) -> bool:
    """Whether a folder is FER2013 with its official split (the shared copy, or a folder named fer2013)."""
    return data is not None and Path(data).name.lower() == "fer2013" and (Path(data) / "val").is_dir()


def check_cams_run(model: torch.nn.Module, methods: Sequence[str]) -> None:
    """Run each CAM method once on a blank input, so a method this model cannot use fails before any data is read."""
    from fer_lib.analysis.interpret import compute_cams

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
    from fer_lib.analysis.interpret import own_cam

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

    m = result["model"]
    lines = [f"checkpoint {result['checkpoint']}  ({m['backbone']}, {m['image_size']} px, "
             f"lambda {result['train_config'].get('au_weight')})",
             f"data       {result['dataset']}:{result['split']} {result['data'] or '(training dataset)'}  "
             f"n={result['n']}  skipped={result['skipped']['count']}",
             f"accuracy   {f(result['accuracy'], True)}",
             f"macro-F1   {f(result['macro_f1'], True)}"]
    for layer, v in (result["att_cos"] or {}).items():
        lines.append(f"ATT-COS    {f(v)}  ({layer}, {result['n_valid_maps']} valid maps)")
    for method, v in (result["cam_cos"] or {}).items():
        lines.append(f"CAM-COS    {f(v)}  ({method}, {result['cam_n_valid']} valid of {result['cam_n']} sampled)")
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


def training_summary(checkpoint: str | Path) -> dict[str, Any]:
    """Wall time, images/s, best epoch and config of the run that wrote `checkpoint` (its metrics.json), if present."""
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
    from PIL import Image

    from fer_lib.data import generate_sample
    from fer_lib.utils import atomic_path

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
    from fer_lib.data.dataset import DATASETS

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
    cams = None if args.cam_methods.strip().lower() in ("", "none") else args.cam_methods

    def body() -> int:
        result = evaluate_checkpoint_on_data(
            args.checkpoint, args.data, args.dataset, args.split, cams,
            cam_samples=None if args.cam_samples == 0 else args.cam_samples, max_samples=args.max_samples,
            batch_size=args.batch_size, landmarks=args.landmarks, cache_dir=args.cache_dir, seed=args.seed,
            device=args.device, progress=not args.no_progress, trust=args.trust_checkpoint)
        out = Path(args.out) if args.out else default_output(args.checkpoint, result["dataset"], result["split"])
        atomic_write_json(out, result)
        print(format_table(result))
        print(f"\nwrote {out}")
        return 0

    return run_cli(body, args.debug, user_errors=(FileNotFoundError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
