"""The shortcut test: does guidance toward AU regions make a model rely less on a cue outside the face?

The synthetic set can paint a class-coloured square on the border of a share `spurious_p` of the TRAINING
images (`fer_lib.data.synthetic`, `draw_spurious`): the square's place and colour give the class, so a model
may learn the square instead of the face. A model trained that way is tested on faces

    clean      without the cue (the test split as it is drawn; `spurious_p=0`),
    shuffled   with the cue of a random class on every face (`spurious_p=1, spurious_eval="shuffled"`),

and compared with the same recipe trained on clean images. Per model and test set (`cue_report`):

    accuracy (Wilson 95% interval), macro-F1
    cue_follow      share of faces whose cue names another class that are classified as the cue's class
    att_cue_energy  share of the tapped layer's attention (its last tapped layer) on the cue square
    cam_cue_energy  the same for a CAM (Grad-CAM by default), explaining the predicted class

(energies: `fer_lib.data.synthetic.cue_energy`, mean with a 95% interval over the faces that carry a cue).
`shortcut_table` lays out several models; `shortcut_headline` gives the two headline numbers per role:
the clean accuracy of the cue-trained model (`shortcut_accuracy`) and its attention energy on the cue
(`cue_energy`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from fer_lib.analysis.interpret import (check_cam_methods, checkpoint_dataset, compute_cams, layer_attention_maps,
                                        make_loader)
from fer_lib.data.synthetic import cue_energy
from fer_lib.metrics import mean_interval, wilson_interval
from fer_lib.models import load_checkpoint
from fer_lib.utils import ConfigError, resolve_device

#: the test sets of the shortcut test: dataset options that override the checkpoint's
TEST_SETS: dict[str, dict[str, Any]] = {
    "clean": {"spurious_p": 0.0, "spurious_eval": "none"},
    "shuffled": {"spurious_p": 1.0, "spurious_eval": "shuffled"},
}


@dataclass(frozen=True)
class ShortcutSettings:
    """What `cue_report` computes: the CAM method (None: attention only), batch size and device."""

    cam_method: str | None = "gradcam"
    batch_size: int = 32
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.cam_method is not None:
            check_cam_methods([self.cam_method])
        if int(self.batch_size) < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")


def shortcut_test_set(checkpoint: str | Path | Mapping[str, Any], kind: str) -> Any:
    """The unaugmented synthetic test split of `checkpoint`'s training set as test set `kind` (`TEST_SETS`)."""
    if kind not in TEST_SETS:
        raise ConfigError(f"unknown shortcut test set {kind!r}; accepted: {', '.join(TEST_SETS)}")
    return checkpoint_dataset(checkpoint, "test", dataset="synthetic", **TEST_SETS[kind])


def cue_classes(dataset: Any) -> np.ndarray:
    """The class whose cue each face carries (-1: none), from the synthetic set's ground truth."""
    return np.asarray([int((r.meta or {}).get("spurious", -1)) for r in dataset.records], np.int64)


def _interval(values: np.ndarray) -> tuple[float, list[float]]:
    values = values[np.isfinite(values)]
    if len(values) < 2:  # no interval from fewer than two faces
        return (float(values.mean()) if len(values) else float("nan")), [float("nan"), float("nan")]
    low, high = mean_interval(values)
    return float(values.mean()), [float(low), float(high)]


def _macro_f1(labels: np.ndarray, preds: np.ndarray, n_classes: int) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(labels, preds, labels=list(range(n_classes)), average="macro", zero_division=0))


def cue_report(model: torch.nn.Module, dataset: Any, settings: ShortcutSettings | None = None) -> dict[str, Any]:
    """Accuracy, cue following and cue energy (attention and CAM) of `model` on one synthetic test set."""
    settings = settings or ShortcutSettings()
    device = resolve_device(settings.device)
    model = model.to(device).eval()
    cues = cue_classes(dataset)
    size = int(dataset.image_size)
    preds, labels, att_energy, cam_energy = [], [], [], []
    seen = 0
    for images, y, _au, _has in make_loader(dataset, batch_size=int(settings.batch_size)):
        images = images.to(device)
        with torch.no_grad():
            logits, feats = model(images)
        pred = logits.argmax(1).cpu()
        cue = cues[seen:seen + len(y)]
        seen += len(y)
        preds.append(pred.numpy())
        labels.append(y.numpy())
        if not (cue >= 0).any():
            continue
        att = list(layer_attention_maps(model, images, size="layer", features=feats).values())[-1]
        att_energy.append(np.where(cue >= 0, cue_energy(att[:, 0].cpu().numpy(), np.maximum(cue, 0), size), np.nan))
        if settings.cam_method:
            cams = compute_cams(model, images, settings.cam_method, pred).numpy()
            cam_energy.append(np.where(cue >= 0, cue_energy(cams, np.maximum(cue, 0), size), np.nan))
    preds_a, labels_a = np.concatenate(preds), np.concatenate(labels)
    correct = int((preds_a == labels_a).sum())
    other = (cues >= 0) & (cues != labels_a)
    out: dict[str, Any] = {
        "n": int(len(labels_a)), "accuracy": correct / len(labels_a),
        "accuracy_ci": list(wilson_interval(correct, len(labels_a))),
        "macro_f1": _macro_f1(labels_a, preds_a, int(logits.shape[1])),
        "n_with_cue": int((cues >= 0).sum()),
        "cue_follow": float((preds_a[other] == cues[other]).mean()) if other.any() else float("nan"),
    }
    for key, parts in (("att_cue_energy", att_energy), ("cam_cue_energy", cam_energy)):
        values = np.concatenate(parts) if parts else np.array([])
        out[key], out[f"{key}_ci"] = _interval(values)
    return out


def shortcut_report(checkpoints: Mapping[str, str | Path], settings: ShortcutSettings | None = None,
                    test_sets: Sequence[str] = tuple(TEST_SETS)) -> dict[str, dict[str, dict[str, Any]]]:
    """{model name: {test set: cue_report}} for checkpoints named e.g. "baseline", "guided", "shortcut-baseline"."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name, path in checkpoints.items():
        model, ckpt = load_checkpoint(path)
        out[name] = {kind: cue_report(model, shortcut_test_set(ckpt, kind), settings) for kind in test_sets}
    return out


def shortcut_table(report: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> Any:
    """One row per (model, test set) with the report's numbers and intervals."""
    import pandas as pd

    rows = [{"model": name, "test_set": kind, **{k: v for k, v in rec.items()}}
            for name, per_set in report.items() for kind, rec in per_set.items()]
    return pd.DataFrame(rows)


def shortcut_headline(report: Mapping[str, Mapping[str, Mapping[str, Any]]],
                      pairs: Mapping[str, tuple[str, str]]) -> dict[str, dict[str, Any]]:
    """Per role, from (clean-trained model, cue-trained model) names: the cue-trained model's clean accuracy
    (`shortcut_accuracy`, with its interval), its drop against the clean-trained model, its accuracy on shuffled
    cues, and its attention / CAM energy on the cue (shuffled faces)."""
    out: dict[str, dict[str, Any]] = {}
    for role, (clean_name, cue_name) in pairs.items():
        if clean_name not in report or cue_name not in report:
            raise ConfigError(f"shortcut headline for {role!r} needs models {clean_name!r} and {cue_name!r}; "
                              f"the report has: {', '.join(report)}")
        clean, cue = report[clean_name], report[cue_name]
        out[role] = {
            "shortcut_accuracy": cue["clean"]["accuracy"], "shortcut_accuracy_ci": cue["clean"]["accuracy_ci"],
            "shortcut_drop": clean["clean"]["accuracy"] - cue["clean"]["accuracy"],
            "shuffled_accuracy": cue["shuffled"]["accuracy"], "shuffled_accuracy_ci": cue["shuffled"]["accuracy_ci"],
            "cue_follow": cue["shuffled"]["cue_follow"],
            "cue_energy": cue["shuffled"]["att_cue_energy"], "cue_energy_ci": cue["shuffled"]["att_cue_energy_ci"],
            "cam_cue_energy": cue["shuffled"]["cam_cue_energy"],
            "cam_cue_energy_ci": cue["shuffled"]["cam_cue_energy_ci"],
        }
    return out
