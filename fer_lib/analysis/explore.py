"""Interactive exploration for notebooks: one call explains one image with a trained model.

    from fer_lib.analysis.explore import explore
    fig, result = explore("results/main/train/guided-.../run/checkpoints/best.pt", "face.jpg")

shows, side by side, the image the model saw (with the facial anchors), the class
probabilities, the AU map of the predicted class (MediaPipe landmarks, face crop optional),
the layer attention of each tapped layer and a chosen CAM, with ATT-COS / CAM-COS of this
image in the titles; `result` holds the numbers and maps. `explore_sample` does the same for
a dataset item (its own landmarks, true label shown) and `sample_slider` flips through the
test samples with an ipywidgets slider (ipywidgets is a dependency of the project; the slider
still says what to do where it is missing).

Nothing is re-implemented here: checkpoints load through `fer_lib.models.load_checkpoint`,
maps come from `fer_lib.analysis.interpret` (`layer_attention_maps`, `compute_cams`), AU maps from
`fer_lib.faces.au.heatmap`, cosines from `fer_lib.metrics.map_cosine`, overlays from
`fer_lib.plots.overlay`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from fer_lib.analysis.interpret import (CAM_METHODS, check_cam_methods, checkpoint_dataset, compute_cams, denormalise,
                                        layer_attention_maps, tapped_layers)
from fer_lib.faces import au
from fer_lib.faces.landmarks import (DETECT_MAX_SIDE, FaceFinder, FaceLandmarks, as_rgb_array, crop_to_face,
                                     detect_faces, load_image)
from fer_lib.metrics import map_cosine
from fer_lib.models import TappedModel, input_tensor, load_checkpoint
from fer_lib.models.checkpoints import resolve_checkpoint
from fer_lib.plots import overlay, save_figure
from fer_lib.utils import ConfigError, atomic_write_json, resolve_device, run_cli

#: CAM shown by default: works for CNNs and transformers alike
DEFAULT_CAM = "gradcam"
_MODEL_CACHE: dict[tuple[str, float, str], TappedModel] = {}
_DETECTOR: FaceFinder | None = None


@dataclass(frozen=True)
class ExploreSettings:
    """What `explore` shows and where it runs, validated when made (ConfigError listing the valid choices).

    cam        the CAM method (fer_lib.analysis.interpret.CAM_METHODS)
    layers     tapped layers whose attention is shown (None: all)
    target     the class the AU map and CAM are for: None / 'prediction', 'label' (dataset samples), a name or index
    cam_layer  the layer a grad-cam method weighs (None: the model's last tap)
    device     None: where the model is (a checkpoint: the CPU); else 'auto', 'cpu', 'cuda', ...
    max_faces  faces explored in a photo, largest first (None: all)
    alpha, cmap  the overlays' opacity and colour map
    """

    cam: str = DEFAULT_CAM
    layers: Any = None
    target: int | str | None = None
    cam_layer: str | None = None
    device: Any = None
    max_faces: int | None = None
    alpha: float = 0.5
    cmap: str = "jet"

    def __post_init__(self) -> None:
        object.__setattr__(self, "cam", check_cam_methods([self.cam])[0])
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))
        if self.device is not None:
            resolve_device(self.device)
        if self.max_faces is not None and (not isinstance(self.max_faces, int) or self.max_faces < 1):
            raise ConfigError(f"max_faces must be a positive integer or None (every face), got {self.max_faces!r}")

    def replace(self, **changes: Any) -> "ExploreSettings":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


@dataclass
class Exploration:
    """What `explore` computed for one image (maps are (S, S) float arrays in [0, 1])."""

    image: np.ndarray                      # (S, S, 3) uint8: the model's input, before normalisation
    class_names: list[str]
    probabilities: np.ndarray              # (K,) softmax of the logits
    predicted: int
    explained: int                         # the class the AU map and the CAM are for
    au_map: np.ndarray | None              # None when no landmarks; zeros for a class without AUs
    anchors: np.ndarray | None             # (A, 2) normalised anchors on `image`
    attention: dict[str, np.ndarray]       # tapped layer -> min-max scaled attention at image size
    cam: np.ndarray
    cam_method: str
    att_cos: dict[str, float] = field(default_factory=dict)   # raw attention vs AU map (nan: no valid map)
    cam_cos: float = math.nan
    label: int | None = None               # true class, when known (dataset samples)
    notes: list[str] = field(default_factory=list)
    source: str = ""
    face: int = 0                          # index of the face in the photo (0 = the largest)
    box: tuple[int, int, int, int] | None = None  # the face's box (x0, y0, x1, y1) in photo pixels
    faces: list["Exploration"] = field(default_factory=list)  # every face of the photo (this one included)

    @property
    def predicted_name(self) -> str:
        """Name of the predicted class."""
        return self.class_names[self.predicted]

    @property
    def explained_name(self) -> str:
        """Name of the class the AU map and CAM explain."""
        return self.class_names[self.explained]

    def top(self, k: int = 3) -> list[tuple[str, float]]:
        """The k most probable classes as (name, probability), most probable first."""
        order = np.argsort(-self.probabilities)[:k]
        return [(self.class_names[i], float(self.probabilities[i])) for i in order]

    def summary(self) -> dict[str, Any]:
        """A JSON-friendly digest: prediction, probabilities, scores, notes."""
        def num(v: float) -> float | None:
            return None if v is None or not math.isfinite(v) else round(float(v), 4)

        return {"source": self.source, "face": self.face, "box": None if self.box is None else list(self.box),
                "predicted": self.predicted_name,
                "label": None if self.label is None else self.class_names[self.label],
                "explained": self.explained_name,
                "probabilities": {n: round(float(p), 4) for n, p in zip(self.class_names, self.probabilities)},
                "landmarks": self.anchors is not None, "cam_method": self.cam_method,
                "att_cos": {k: num(v) for k, v in self.att_cos.items()}, "cam_cos": num(self.cam_cos),
                "notes": list(self.notes)}


# ----------------------------------------------------------------------------- inputs
def load_model(checkpoint: str | os.PathLike | nn.Module | tuple, device: str | torch.device | None = None,
               trust: bool = False) -> TappedModel:
    """A TappedModel in eval mode from a checkpoint path or shipped name (cached by path and mtime), a model
    or (model, ckpt); checkpoints that are not plain data are refused unless `trust` (fer_lib.models.checkpoints)."""
    if isinstance(checkpoint, tuple) and checkpoint and isinstance(checkpoint[0], nn.Module):
        checkpoint = checkpoint[0]
    if isinstance(checkpoint, nn.Module):
        if not hasattr(checkpoint, "tap_names") or not hasattr(checkpoint, "classify"):
            raise ConfigError(f"expected a fer_lib TappedModel (fer_lib.models.build_model / load_checkpoint), "
                              f"got {type(checkpoint).__name__}")
        model = checkpoint
        if device is not None:
            model = model.to(resolve_device(device))
        return model.eval()
    if not isinstance(checkpoint, (str, os.PathLike)):
        raise ConfigError(f"checkpoint must be a path to a fer_lib checkpoint or a TappedModel, "
                          f"got {type(checkpoint).__name__}")
    path = resolve_checkpoint(Path(checkpoint).expanduser()).resolve()  # a file or a shipped name
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    dev = resolve_device(device)
    key = (str(path), path.stat().st_mtime, str(dev))
    if key not in _MODEL_CACHE:
        model, _ = load_checkpoint(path, map_location="cpu", trust=trust)
        _MODEL_CACHE.clear()          # keep one model: notebooks flip between images, not checkpoints
        _MODEL_CACHE[key] = model.to(dev).eval()
    return _MODEL_CACHE[key]


def _detector() -> FaceFinder:
    """The shared face finder (every face; `detect` gives the largest, the rule where one face is wanted)."""
    global _DETECTOR
    if _DETECTOR is None:
        _DETECTOR = FaceFinder()
    return _DETECTOR


def _anchors_of(landmarks: FaceLandmarks | np.ndarray) -> np.ndarray:
    anchors = landmarks.anchors() if isinstance(landmarks, FaceLandmarks) else np.asarray(landmarks, np.float32)
    if anchors.ndim != 2 or anchors.shape[1] != 2:
        raise ConfigError(f"landmarks must be a FaceLandmarks or normalised (A, 2) anchors, got shape {anchors.shape}")
    return anchors.astype(np.float32)


def prepare_image(image: Any, image_size: int, crop_face: bool = True, detector: Any = None,
                  landmarks: FaceLandmarks | np.ndarray | bool | None = None, margin: float = 0.25
                  ) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """(S x S RGB uint8 input, anchors normalised on it or None, notes) for a path / array / PIL image.

    Landmarks: detected with `detector` (default: the largest face of fer_lib.faces.landmarks.FaceFinder) unless given (a
    FaceLandmarks or anchors normalised on `image`) or `landmarks=False` (no AU map). With
    `crop_face`, the image is cropped to the face box plus `margin` first (the aligned-crop
    setting models are trained on); then it is resized to S x S like the datasets do.
    """
    rgb = as_rgb_array(image)
    notes: list[str] = []
    found: FaceLandmarks | np.ndarray | None
    if landmarks is False:
        found = None
        notes.append("landmarks disabled: no AU map")
    elif landmarks is None or landmarks is True:
        found = (detector or _detector()).detect(rgb)
        if found is None:
            notes.append("no face found by the landmark detector: no AU map" + (", image not cropped" if crop_face else ""))
    else:
        found = landmarks
    anchors = None
    if found is not None:
        if crop_face:
            if not isinstance(found, FaceLandmarks):
                found = FaceLandmarks(points=_anchors_of(found), scheme="anchors", image_size=rgb.shape[1::-1])
            rgb, found = crop_to_face(rgb, found, margin=margin)
        anchors = _anchors_of(found)
    if rgb.shape[:2] != (image_size, image_size):
        rgb = np.asarray(Image.fromarray(rgb).resize((image_size, image_size), Image.BILINEAR, reducing_gap=None))
    return np.ascontiguousarray(rgb, dtype=np.uint8), anchors, notes


def to_input(model: TappedModel, rgb: np.ndarray) -> torch.Tensor:
    """(1, C, S, S) tensor normalised with the model's mean/std (gray for one-channel models)."""
    return input_tensor(model.config, rgb)[None]


def _class_index(value: int | str, class_names: Sequence[str]) -> int:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if 0 <= int(value) < len(class_names):
            return int(value)
    elif isinstance(value, str) and value in class_names:
        return list(class_names).index(value)
    raise ConfigError(f"unknown class {value!r}; valid choices: 'prediction', 'label', "
                      f"{', '.join(class_names)} or 0..{len(class_names) - 1}")


# ----------------------------------------------------------------------------- computing
def explain_input(model: TappedModel, rgb: np.ndarray, anchors: np.ndarray | None,
                  settings: ExploreSettings | None = None, *, label: int | None = None, notes: Sequence[str] = (),
                  source: str = "") -> Exploration:
    """Prediction, probabilities, AU map, attention and CAM (`settings`, default ExploreSettings()) for one
    prepared S x S input."""
    settings = settings or ExploreSettings()
    method, target = settings.cam, settings.target
    names = tapped_layers(model, settings.layers)
    class_names = list(model.config.get("class_names") or [f"class_{i}" for i in range(model.config["num_classes"])])
    notes = list(notes)
    device = next(model.parameters()).device
    x = to_input(model, rgb).to(device)
    with torch.no_grad():
        logits, feats = model(x)
    probs = torch.softmax(logits.float(), dim=1)[0].cpu().numpy()
    predicted = int(probs.argmax())
    if target is None or target == "prediction":
        explained = predicted
    elif target == "label":
        if label is None:
            raise ConfigError("target='label' needs a known label (use explore_sample, or target='prediction')")
        explained = int(label)
    else:
        explained = _class_index(target, class_names)
    name = class_names[explained]
    size = int(rgb.shape[0])
    au_map = None
    if anchors is not None:
        if name in au.CODEBOOK:
            au_map = au.heatmap(anchors, name, size)
            if not au.has_au_map(name):
                notes.append(f"{name} has no AU in the codebook: empty AU map")
        else:
            notes.append(f"class {name!r} is not in the AU codebook: no AU map")
    shown = layer_attention_maps(model, x, names, scale=True, features=feats)
    raw = layer_attention_maps(model, x, names, size="layer", features=feats)
    cam_map = compute_cams(model, x, method, torch.tensor([explained]), layer=settings.cam_layer)[0].numpy()
    att_cos = {n: math.nan for n in names}
    cam_cos = math.nan
    if au_map is not None and float(au_map.max()) > 0:
        target_map = torch.from_numpy(au_map)[None, None]
        att_cos = {n: float(map_cosine(raw[n].cpu(), target_map)[0]) for n in names}
        cam_cos = float(map_cosine(torch.from_numpy(cam_map)[None, None], target_map)[0])
    return Exploration(image=np.asarray(rgb, np.uint8), class_names=class_names, probabilities=probs,
                       predicted=predicted, explained=explained, au_map=au_map, anchors=anchors,
                       attention={n: shown[n][0, 0].cpu().numpy() for n in names}, cam=cam_map, cam_method=method,
                       att_cos=att_cos, cam_cos=cam_cos, label=label, notes=notes, source=source)


# ----------------------------------------------------------------------------- plotting
def _fmt_cos(name: str, value: float) -> str:
    return f"\n{name} {value:.2f}" if math.isfinite(value) else ""


def plot_exploration(result: Exploration, alpha: float = 0.5, cmap: str = "jet", panel: float = 2.6,
                     path: str | os.PathLike | None = None) -> Any:
    """One row of panels: input, probabilities, AU map, attention per layer, CAM (axes labelled by panel)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    n = 4 + len(result.attention)
    fig, axes = plt.subplots(1, n, figsize=(panel * n, panel * 1.25),
                             gridspec_kw={"width_ratios": [1, 1.3] + [1] * (n - 2)})
    image = result.image
    size = image.shape[0]

    ax = axes[0]
    ax.set_label("input")
    ax.imshow(image)
    if result.anchors is not None:
        ax.scatter(result.anchors[:, 0] * size, result.anchors[:, 1] * size, s=6, c="red")
    truth = f"label: {result.class_names[result.label]}\n" if result.label is not None else ""
    ax.set_title(f"input ({result.source or 'image'})\n{truth}".rstrip(), fontsize=8)

    ax = axes[1]
    ax.set_label("probabilities")
    colours = ["tab:orange" if i == result.predicted else "tab:blue" for i in range(len(result.class_names))]
    sns.barplot(x=result.probabilities, y=list(result.class_names), hue=list(result.class_names),
                palette=colours, legend=False, orient="h", ax=ax)
    ax.set_xlim(0, 1)
    ax.set_xlabel("probability", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_title(f"prediction: {result.predicted_name} ({result.probabilities[result.predicted]:.2f})", fontsize=8)

    ax = axes[2]
    ax.set_label("au_map")
    if result.au_map is not None:
        ax.imshow(overlay(image, result.au_map, alpha, cmap))
        aus = ", ".join(f"AU{a}" for a in au.CODEBOOK.get(result.explained_name, ())) or "no AU"
        ax.set_title(f"AU map: {result.explained_name}\n{aus}", fontsize=8)
    else:
        ax.imshow(image)
        ax.set_title(f"AU map: {result.explained_name}\n(unavailable)", fontsize=8)

    for ax, (layer, att) in zip(axes[3:-1], result.attention.items()):
        ax.set_label(f"attention:{layer}")
        ax.imshow(overlay(image, att, alpha, cmap))
        ax.set_title(f"attention: {layer}{_fmt_cos('ATT-COS', result.att_cos.get(layer, math.nan))}", fontsize=8)

    ax = axes[-1]
    ax.set_label("cam")
    ax.imshow(overlay(image, result.cam, alpha, cmap))
    ax.set_title(f"{result.cam_method}: {result.explained_name}{_fmt_cos('CAM-COS', result.cam_cos)}", fontsize=8)

    for ax in [axes[0], *axes[2:]]:
        ax.set_xticks([])
        ax.set_yticks([])
    if result.notes:
        fig.text(0.01, 0.01, "; ".join(result.notes), fontsize=7, color="#a00")
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path)
    return fig


def plot_faces(photo: np.ndarray, results: Sequence[Exploration], alpha: float = 0.5, cmap: str = "jet",
               panel: float = 2.6, path: str | os.PathLike | None = None) -> Any:
    """A photo with several faces: an overview (a box and a label per face), then one row of panels per face."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    n = 4 + max(len(r.attention) for r in results)
    rows = 1 + len(results)
    fig = plt.figure(figsize=(panel * n, panel * 1.25 * rows))
    grid = fig.add_gridspec(rows, n, width_ratios=[1, 1.3] + [1] * (n - 2))
    ax = fig.add_subplot(grid[0, :])
    ax.set_label("faces")
    ax.imshow(photo)
    colours = plt.get_cmap("tab10")
    for r in results:
        if r.box is None:
            continue
        x0, y0, x1, y1 = r.box
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec=colours(r.face % 10), lw=2))
        ax.text(x0, y0, f"{r.face}: {r.predicted_name} {r.probabilities[r.predicted]:.2f}", fontsize=8, va="bottom",
                color="white", bbox={"facecolor": colours(r.face % 10), "pad": 1, "lw": 0})
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{len(results)} faces", fontsize=9)
    for i, r in enumerate(results, start=1):
        sub = plot_exploration(r, alpha=alpha, cmap=cmap, panel=panel)
        for j, src in enumerate(sub.axes):
            dst = fig.add_subplot(grid[i, j])
            dst.set_label(f"face{r.face}:{src.get_label()}")
            for image in src.get_images():
                dst.imshow(image.get_array(), cmap=image.get_cmap(), alpha=image.get_alpha(),
                           vmin=image.norm.vmin, vmax=image.norm.vmax)
            for coll in src.collections:
                offsets = coll.get_offsets()
                if len(offsets):
                    dst.scatter(offsets[:, 0], offsets[:, 1], s=6, c="red")
            for bar in src.patches:
                dst.barh(bar.get_y() + bar.get_height() / 2, bar.get_width(), height=bar.get_height(),
                         color=bar.get_facecolor())
            if src.patches:
                dst.set_yticks(src.get_yticks(), [t.get_text() for t in src.get_yticklabels()], fontsize=7)
                dst.set_xlim(0, 1)
                dst.invert_yaxis()
            else:
                dst.set_xticks([])
                dst.set_yticks([])
            title = src.get_title()
            dst.set_title(f"face {r.face}: {title}" if j == 0 else title, fontsize=8)
        plt.close(sub)
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path)
    return fig


# ----------------------------------------------------------------------------- one-call entry points
def explore(checkpoint: str | os.PathLike | nn.Module | tuple, image: Any, settings: ExploreSettings | None = None, *,
            crop_face: bool = True, landmarks: FaceLandmarks | np.ndarray | bool | None = None, detector: Any = None,
            path: str | os.PathLike | None = None, trust: bool = False) -> tuple[Any, Exploration]:
    """Explain every face of one image (path, array or PIL) with a checkpoint (path, shipped name or model): returns
    (Figure, Exploration of the largest face), that Exploration's `faces` listing every face's.

    `settings` (default ExploreSettings()): the CAM, the attention layers, the class the AU map
    and CAM are for (default the prediction; a class name or index), device, number of faces and
    overlay look; `path` also saves the figure; `trust`: see load_model. Faces are found by
    fer_lib.faces.landmarks.detect_faces (at most `settings.max_faces`, largest first); a photo
    with several faces gets an overview (a box and label per face) and one row of panels per
    face, each face cropped. Given `landmarks` or a `detector` explain one face.
    """
    settings = settings or ExploreSettings()
    model = load_model(checkpoint, settings.device, trust=trust)
    size = int(model.config["image_size"])
    source = Path(image).name if isinstance(image, (str, os.PathLike)) else "array"
    photo = load_image(image, max_side=DETECT_MAX_SIDE) if isinstance(image, (str, os.PathLike)) else as_rgb_array(image)
    faces = None
    if detector is None and (landmarks is None or landmarks is True):
        faces = detect_faces(photo, settings.max_faces, _detector())
    if faces is None or len(faces) <= 1:
        given = faces[0].landmarks if faces else landmarks
        if faces == []:
            given = False
        rgb, anchors, notes = prepare_image(photo, size, crop_face=crop_face, detector=detector, landmarks=given)
        if faces == []:
            notes = ["no face found by the landmark detector: no AU map" + (", image not cropped" if crop_face else "")]
        result = explain_input(model, rgb, anchors, settings, notes=notes, source=source)
        if faces:
            result.box = faces[0].box
        result.faces = [result]
        return plot_exploration(result, alpha=settings.alpha, cmap=settings.cmap, path=path), result
    results = []
    for face in faces:
        rgb, anchors, notes = prepare_image(photo, size, crop_face=True, landmarks=face.landmarks)
        if not crop_face:
            notes.append("several faces: each face is cropped")
        res = explain_input(model, rgb, anchors, settings, notes=notes, source=f"{source} face {face.index}")
        res.face, res.box = face.index, face.box
        results.append(res)
    for res in results:
        res.faces = results
    return plot_faces(photo, results, alpha=settings.alpha, cmap=settings.cmap, path=path), results[0]


def dataset_sample(dataset: Any, index: int, image_size: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray | None, int]:
    """(RGB uint8 S x S, anchors or None, label) of one unaugmented dataset item.

    FERDataset items come from `.sample(index, augment=False)` (with their landmark anchors);
    other contract-1 datasets are de-normalised from their tensors (no anchors).
    """
    if not 0 <= int(index) < len(dataset):
        raise IndexError(f"sample {index} out of range: the dataset has {len(dataset)} items")
    if hasattr(dataset, "sample") and hasattr(dataset, "records"):
        rgb, anchors, _ = dataset.sample(int(index), augment=False)
        label = int(dataset.records[int(index)].label)
    else:
        item = dataset[int(index)]
        mean = getattr(dataset, "mean", None) or (0.5, 0.5, 0.5)
        std = getattr(dataset, "std", None) or (0.5, 0.5, 0.5)
        rgb = (denormalise(item[0][None], mean, std)[0] * 255).round().astype(np.uint8)
        anchors, label = None, int(item[1])
    if image_size is not None and rgb.shape[:2] != (image_size, image_size):
        rgb = np.asarray(Image.fromarray(rgb).resize((image_size, image_size), Image.BILINEAR, reducing_gap=None))
    return rgb, anchors, label


def explore_sample(checkpoint: str | os.PathLike | nn.Module | tuple, dataset: Any, index: int,
                   settings: ExploreSettings | None = None, *, path: str | os.PathLike | None = None,
                   trust: bool = False) -> tuple[Any, Exploration]:
    """`explore` for item `index` of a dataset (its own landmarks; the true label is shown)."""
    settings = settings or ExploreSettings()
    model = load_model(checkpoint, settings.device, trust=trust)
    rgb, anchors, label = dataset_sample(dataset, index, int(model.config["image_size"]))
    notes = [] if anchors is not None else ["no landmarks for this sample: no AU map"]
    result = explain_input(model, rgb, anchors, settings, label=label, notes=notes, source=f"sample {index}")
    return plot_exploration(result, alpha=settings.alpha, cmap=settings.cmap, path=path), result


def ipywidgets_available() -> bool:
    """True where ipywidgets can be imported (a dependency of the project, but a bare environment may lack it)."""
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


def sample_slider(checkpoint: str | os.PathLike | nn.Module | tuple, dataset: Any = None,
                  indices: Sequence[int] | None = None, split: str = "test", settings: ExploreSettings | None = None,
                  trust: bool = False) -> Any:
    """An ipywidgets slider over dataset samples that redraws `explore_sample` with `settings` (needs ipywidgets).

    Default dataset: the checkpoint's own `split` (test) split, rebuilt from its saved
    training config (fer_lib.analysis.interpret.checkpoint_dataset).
    """
    if not ipywidgets_available():
        raise ConfigError("sample_slider needs ipywidgets, which is not installed; "
                          "install it (pip install ipywidgets) or call explore_sample(checkpoint, dataset, i)")
    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    settings = settings or ExploreSettings()
    model = load_model(checkpoint, settings.device, trust=trust)
    settings = settings.replace(device=None)  # the model is where it should be
    if dataset is None:
        if not isinstance(checkpoint, (str, os.PathLike)):
            raise ConfigError("pass dataset=... when checkpoint is a model (only a checkpoint file records its data)")
        dataset = checkpoint_dataset(checkpoint, split=split)
    indices = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
    if not indices:
        raise ConfigError("no samples to show: the dataset or `indices` is empty")
    slider = widgets.IntSlider(value=0, min=0, max=len(indices) - 1, step=1, description="sample",
                               continuous_update=False)
    out = widgets.Output()

    def render(change: Any = None) -> None:
        with out:
            out.clear_output(wait=True)
            fig, _ = explore_sample(model, dataset, indices[slider.value], settings)
            from IPython.display import display

            display(fig)
            plt.close(fig)

    slider.observe(render, names="value")
    render()
    return widgets.VBox([slider, out])


__all__ = ["CAM_METHODS", "DEFAULT_CAM", "Exploration", "dataset_sample", "explain_input", "explore",
           "explore_sample", "ExploreSettings", "ipywidgets_available", "load_model", "main", "plot_exploration", "plot_faces",
           "prepare_image", "sample_slider", "to_input"]


# ----------------------------------------------------------------------------- command line
def main(argv: Sequence[str] | None = None) -> int:
    """`python -m fer_lib.analysis.explore CHECKPOINT IMAGE --out fig.png`: the figure of `explore` for every face, and each
    face's numbers as JSON; errors print one line and exit 2 (--debug adds the traceback)."""
    p = argparse.ArgumentParser(prog="python -m fer_lib.analysis.explore", description=main.__doc__.split(":")[0])
    p.add_argument("checkpoint", help="a fer_lib checkpoint or a shipped name (python -m fer_lib.models.checkpoints list)")
    p.add_argument("image", help="a photo; every face in it is explored")
    p.add_argument("--cam", default=DEFAULT_CAM, help=f"one of: {', '.join(CAM_METHODS)}")
    p.add_argument("--layers", default=None, help="tapped layers whose attention is shown (default: all)")
    p.add_argument("--target", default=None, help="class the AU map and CAM explain (default: the prediction)")
    p.add_argument("--max-faces", type=int, default=None, help="at most this many faces, largest first")
    p.add_argument("--no-crop", action="store_true", help="feed a one-face photo whole instead of its face crop")
    p.add_argument("--out", default="explore.png", help="the figure (PNG); the numbers go beside it as .json")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow a checkpoint that is not plain data")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = p.parse_args(argv)

    def body() -> int:
        import matplotlib

        matplotlib.use("Agg")
        if args.max_faces is not None and args.max_faces < 1:
            raise ConfigError(f"--max-faces must be a positive integer, got {args.max_faces}")
        out = Path(args.out)
        settings = ExploreSettings(cam=args.cam, layers=args.layers, target=args.target, device=args.device,
                                   max_faces=args.max_faces)
        fig, result = explore(args.checkpoint, args.image, settings, crop_face=not args.no_crop, path=out,
                              trust=args.trust_checkpoint)
        summaries = [r.summary() for r in result.faces]
        atomic_write_json(out.with_suffix(".json"), {"image": str(args.image), "faces": summaries})
        for r in summaries:
            print(json.dumps(r))
        print(f"wrote {out} and {out.with_suffix('.json')}")
        return 0

    return run_cli(body, args.debug, user_errors=(FileNotFoundError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
