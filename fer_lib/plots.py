"""Figures shared by the notebooks: landmarks on a face, AU maps, overlays; saved atomically."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

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
