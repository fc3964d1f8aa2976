"""Evaluation metrics: map cosine (ATT-COS / CAM-COS) and classification summaries.

ATT-COS and CAM-COS are averaged only over samples whose AU map is valid (landmarks found
and a class with AUs); `map_cosine` itself returns one value per sample and the caller masks.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fer_lib.utils import check_choice

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
