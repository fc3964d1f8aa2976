"""Figures shared by the notebooks: landmarks on a face, AU maps, overlays, interval error bars; saved atomically."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from fer_lib.faces import au
from fer_lib.faces.landmarks import ANCHORS, FaceLandmarks
from fer_lib.utils import atomic_path


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Save a matplotlib figure atomically (format from the file's extension)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    return path


def interval_yerr(value: Any, low: Any, high: Any) -> np.ndarray:
    """matplotlib's `yerr` (2, n) for [low, high] intervals around values: the distances below and above."""
    v, lo, hi = (np.atleast_1d(np.asarray(a, dtype=float)) for a in (value, low, high))
    return np.vstack([np.clip(v - lo, 0, None), np.clip(hi - v, 0, None)])


def interval_errorbars(ax, x: Any, value: Any, low: Any, high: Any, color: Any = "black", **kwargs: Any) -> int:
    """Draw [low, high] error bars at (x, value), skipping points without a finite interval (runs written
    before intervals existed); returns how many were drawn."""
    x, v, lo, hi = (np.atleast_1d(np.asarray(a, dtype=float)) for a in (x, value, low, high))
    keep = np.isfinite(x) & np.isfinite(v) & np.isfinite(lo) & np.isfinite(hi)
    if keep.any():
        ax.errorbar(x[keep], v[keep], yerr=interval_yerr(v[keep], lo[keep], hi[keep]), fmt="none",
                    ecolor=color, capsize=kwargs.pop("capsize", 3), lw=kwargs.pop("lw", 1), **kwargs)
    return int(keep.sum())


def grouped_bars(ax, frame: Any, x: str, hue: str, y: str, low: str | None = None, high: str | None = None,
                 x_order: Sequence[Any] | None = None, hue_order: Sequence[Any] | None = None,
                 palette: Mapping[Any, Any] | None = None, width: float = 0.8) -> None:
    """Bars of `frame[y]` per `x` category, side by side per `hue` level, with [frame[low], frame[high]] error
    bars where those columns are given and finite (one row per (x, hue): e.g. an ablation table)."""
    import seaborn as sns

    x_order = list(x_order if x_order is not None else dict.fromkeys(frame[x]))
    hue_order = list(hue_order if hue_order is not None else dict.fromkeys(frame[hue]))
    palette = palette or dict(zip(hue_order, sns.color_palette(n_colors=len(hue_order))))
    step = width / max(len(hue_order), 1)
    for j, level in enumerate(hue_order):
        rows = frame[frame[hue] == level]
        pos = {cat: i for i, cat in enumerate(x_order)}
        xs = np.array([pos[c] for c in rows[x]], dtype=float) - width / 2 + step * (j + 0.5)
        ax.bar(xs, rows[y].to_numpy(dtype=float), width=step, color=palette[level], label=str(level))
        if low and high and low in rows and high in rows:
            interval_errorbars(ax, xs, rows[y], rows[low], rows[high])
    ax.set_xticks(range(len(x_order)))
    ax.set_xticklabels([str(c) for c in x_order])


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """Blend a [0,1] map (any size; resized) onto an RGB uint8 image -> RGB float [0,1]."""
    import matplotlib

    from PIL import Image

    h, w = image.shape[:2]
    if heat.shape != (h, w):
        heat = np.asarray(Image.fromarray(heat.astype(np.float32), mode="F").resize((w, h), Image.BILINEAR))
    colours = matplotlib.colormaps[cmap](np.clip(heat, 0, 1))[..., :3]
    return (1 - alpha) * (image.astype(np.float32) / 255.0) + alpha * colours


def plot_landmarks(image: np.ndarray, landmarks: FaceLandmarks, ax=None, label_anchors: bool = True):
    """The detector's points (small dots) and the named anchors (red) on the face."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 6))
    h, w = image.shape[:2]
    ax.imshow(image)
    pts = landmarks.points * [w, h]
    ax.scatter(pts[:, 0], pts[:, 1], s=1.5, c="cyan", alpha=0.7, label=f"{landmarks.scheme} ({len(pts)} points)")
    anchors = landmarks.anchors() * [w, h]
    ax.scatter(anchors[:, 0], anchors[:, 1], s=14, c="red", label="named anchors")
    if label_anchors:
        for name, (x, y) in zip(ANCHORS, anchors):
            ax.annotate(name, (x, y), fontsize=5, color="yellow", xytext=(2, 2), textcoords="offset points")
    ax.legend(loc="lower right", fontsize=7)
    ax.set_axis_off()
    return ax


def plot_au_maps(image: np.ndarray, anchors: np.ndarray, expression: str, size: int,
                 sigma_mode: str = "image", sigma: float | None = None):
    """One panel per AU of the expression plus the combined map, overlaid on the face."""
    import matplotlib.pyplot as plt

    maps = au.au_maps(anchors, expression, size, sigma, sigma_mode)
    combined = au.heatmap(anchors, expression, size, sigma, sigma_mode)
    n = len(maps) + 1
    fig, axes = plt.subplots(1, n, figsize=(2.2 * n, 2.6), squeeze=False)
    for ax, (a, m) in zip(axes[0], maps.items()):
        ax.imshow(overlay(image, m))
        ax.set_title(f"AU{a}\n{au.AU_NAMES[a]}", fontsize=8)
        ax.set_axis_off()
    axes[0, -1].imshow(overlay(image, combined))
    axes[0, -1].set_title(f"{expression}\n(max over AUs)", fontsize=8)
    axes[0, -1].set_axis_off()
    fig.tight_layout()
    return fig


def plot_expression_maps(image: np.ndarray, anchors: np.ndarray, size: int,
                         expressions: Sequence[str] = au.EXPRESSIONS, sigma_mode: str = "image",
                         sigma: float | None = None):
    """The combined AU heatmap of every expression on one face (a row of overlays + raw maps)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(expressions), figsize=(2.1 * len(expressions), 4.4), squeeze=False)
    for j, e in enumerate(expressions):
        m = au.heatmap(anchors, e, size, sigma, sigma_mode)
        axes[0, j].imshow(overlay(image, m))
        axes[0, j].set_title(f"{e}\nAU {', '.join(map(str, au.CODEBOOK[e])) or '(none)'}", fontsize=7)
        axes[1, j].imshow(m, cmap="magma", vmin=0, vmax=1)
        for ax in axes[:, j]:
            ax.set_axis_off()
    fig.tight_layout()
    return fig
