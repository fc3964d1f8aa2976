"""Interpretability analysis: layer attention, CAMs, and how well they agree with AU maps.

The paper's second question is whether AU guidance makes a model's explanations land on
the action units of the expression it recognises. This module answers it for any trained
`TappedModel` (fer_lib.models):

* `layer_attention_maps`: a tapped layer's attention (mean over channels), upsampled.
* `compute_cams`: the CAM of any method in the registry (`CAM_REGISTRY`, `register_cam`, like
  timm's register_model): pytorch-grad-cam's GradCAM, GradCAM++, LayerCAM, HiResCAM, XGradCAM,
  ScoreCAM, EigenCAM for CNNs and ViTs (the model's `to_spatial` is the reshape transform), plus
  the model's own CAM (classifier weights x last features, "cam") for GAP-headed CNNs. Every map
  is (B, H, W) at image size in [0, 1] (ReLU, then min-max). A new method is one decorated
  pytorch-grad-cam `BaseCAM` subclass or function: `@register_cam("mycam")`.
* `CAMSettings`: the CAM parameters (methods, layers, target, threshold, device, ScoreCAM batch,
  max samples, seed, progress) in one validated, frozen object that every function here takes.
* `map_cosine` (fer_lib.metrics, the number training reports), `map_pearson`,
  `energy_ratio` (share of the map's mass inside the AU regions) and `region_fraction`
  (the AU regions' share of the image: what a uniform map would score).
* `evaluate_interpretability`: ATT-COS per layer, CAM-COS per method, Pearson and energy ratio
  over the valid samples (landmarks found and a class with AUs), plus accuracy (CL) over all
  samples; a tidy per-sample DataFrame and a summary dict. A model or checkpoint is evaluated
  on a dataset through the one entry point, fer_lib.analysis.evaluate.evaluate, which calls it.
* `faithfulness_scores`: ROAD (most/least relevant first) and the CAM-times-image confidence
  change from pytorch-grad-cam's metrics, with two control "explanations" scored the same
  way: the AU prior itself ("au_prior") and a smooth random map ("random"). A map that only
  copies the AU prior scores like "au_prior"; one that explains the model does better.
* `collect_sample_maps`, `overlay_figure`, `class_grid_figure`: figures for chosen samples.

Conventions: ATT-COS uses the raw attention (as the training loss and its metric do);
Pearson and energy ratio use the attention min-max scaled to [0, 1], the same form as a CAM.
"""
from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
import functools
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fer_lib.data import build_datasets
from fer_lib.faces.au import CODEBOOK, EXPRESSIONS
from fer_lib.metrics import as_interval, bootstrap_interval, classification_intervals, classification_metrics, map_cosine
from fer_lib.models import layer_attention
from fer_lib.models import resolve_layers as _resolve_model_layers
from fer_lib.models.checkpoints import read_checkpoint
from fer_lib.plots import save_figure
from fer_lib.utils import (ConfigError, atomic_write_csv, atomic_write_json, check_choice, check_number, resolve_device,
                           progress_bar, repo_path, run_info)

# pytorch-grad-cam is the engine of every gradient/activation CAM
from pytorch_grad_cam import (EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, ScoreCAM,
                              XGradCAM)
from pytorch_grad_cam.base_cam import BaseCAM
from pytorch_grad_cam.metrics.cam_mult_image import CamMultImageConfidenceChange
from pytorch_grad_cam.metrics.road import (ROADLeastRelevantFirstAverage,
                                           ROADMostRelevantFirstAverage)
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget, ClassifierOutputTarget

#: the model's own CAM (Zhou et al. 2016): classifier weights x last features, GAP + linear heads only
OWN_CAM = "cam"
#: which class a CAM explains
TARGET_MODES: tuple[str, ...] = ("label", "prediction")
#: control explanations for the faithfulness table
CONTROL_MAPS: tuple[str, ...] = ("au_prior", "random")
#: faithfulness metrics (pytorch-grad-cam): confidence change after perturbing by the map
FAITHFULNESS_METRICS: tuple[str, ...] = ("road_morf", "road_lerf", "road_combined", "cam_mult")
#: what the faithfulness metrics measure the change of
FAITHFULNESS_SCORES: tuple[str, ...] = ("probability", "logit")
#: how to read each faithfulness metric
FAITHFULNESS_DIRECTION: dict[str, str] = {
    "road_morf": "lower is more faithful (removing the most relevant pixels should hurt)",
    "road_lerf": "higher is more faithful (removing the least relevant pixels should not hurt)",
    "road_combined": "higher is more faithful ((lerf - morf) / 2)",
    "cam_mult": "higher is more faithful (keeping only the map should keep the confidence)",
}


# ----------------------------------------------------------------------------- the CAM registry
@dataclass(frozen=True)
class CAMMethod:
    """A registered CAM method: `run(model, images, class_ids, layer=..., score_cam_batch_size=...)` returns
    (B, H, W) maps in [0, 1]; `engine` is the pytorch-grad-cam class it runs (None for the model's own CAM)."""

    name: str
    run: Callable[..., torch.Tensor]
    default: bool = True
    engine: type | None = None


#: CAM methods by name, in registration order (register_cam adds one)
CAM_REGISTRY: dict[str, CAMMethod] = {}


def register_cam(name: str, *, default: bool = True) -> Callable[[Any], Any]:
    """Register a CAM method under `name` (like timm's register_model); returns the decorated object unchanged.

    Decorate a pytorch-grad-cam `BaseCAM` subclass (it runs through the grad-cam engine on the
    tapped layer, with the model's `to_spatial` as reshape transform: overriding one hook such as
    `get_cam_weights` is a new method), or a function `(model, images, class_ids, *, layer,
    score_cam_batch_size) -> (B, H, W)` in [0, 1]. `default=False` leaves it out of a default run
    (DEFAULT_CAM_METHODS), as ScoreCAM is (one forward pass per channel).
    """
    key = str(name).strip().lower()

    def add(obj: Any) -> Any:
        if key in CAM_REGISTRY:
            raise ValueError(f"CAM method {key!r} is already registered")
        if isinstance(obj, type) and issubclass(obj, BaseCAM):
            CAM_REGISTRY[key] = CAMMethod(key, functools.partial(_run_grad_cam, obj), default, obj)
        elif callable(obj):
            CAM_REGISTRY[key] = CAMMethod(key, obj, default)
        else:
            raise TypeError(f"register_cam({key!r}) decorates a pytorch-grad-cam BaseCAM subclass or a function, "
                            f"got {type(obj).__name__}")
        return obj

    return add


class _RegistryNames(collections.abc.Sequence):
    """A live, read-only tuple-like view of registered CAM names (so that methods registered later appear)."""

    def __init__(self, names: Callable[[], tuple[str, ...]]) -> None:
        self._names = names

    def __getitem__(self, index: Any) -> Any:
        return self._names()[index]

    def __len__(self) -> int:
        return len(self._names())

    def __eq__(self, other: object) -> bool:
        return tuple(self) == (tuple(other) if isinstance(other, (tuple, list, _RegistryNames)) else other)

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return repr(self._names())


#: every CAM method name accepted by `compute_cams` (the registry, in registration order)
CAM_METHODS: Sequence[str] = _RegistryNames(lambda: tuple(CAM_REGISTRY))
#: the pytorch-grad-cam methods among them
GRAD_CAM_METHODS: Sequence[str] = _RegistryNames(lambda: tuple(n for n, m in CAM_REGISTRY.items() if m.engine))
#: methods cheap enough for a default run: the model's own CAM first (the paper's headline), then the others
DEFAULT_CAM_METHODS: Sequence[str] = _RegistryNames(lambda: tuple(sorted(
    (n for n, m in CAM_REGISTRY.items() if m.default), key=lambda n: n != OWN_CAM)))


# ----------------------------------------------------------------------------- helpers
def check_cam_methods(methods: str | Iterable[str] | None) -> list[str]:
    """Parse 'a,b' or a list of CAM method names; raise ConfigError listing the valid names."""
    if methods is None:
        return list(DEFAULT_CAM_METHODS)
    if isinstance(methods, str):
        methods = [m for m in (p.strip() for p in methods.split(",")) if m]
        if methods == ["all"]:
            return list(CAM_METHODS)
    out: list[str] = []
    for m in methods:
        check_choice("CAM method", str(m).strip().lower(), CAM_METHODS)
        if str(m).strip().lower() not in out:
            out.append(str(m).strip().lower())
    return out


def check_target(target: str) -> str:
    """Return `target` if it is 'label' or 'prediction', else raise ConfigError."""
    return check_choice("CAM target", target, TARGET_MODES)


@dataclass(frozen=True)
class CAMSettings:
    """The CAM parameters of every analysis here, validated once when made (ConfigError naming what is accepted).

    cam_methods           names: 'a,b', a list, 'all'; None -> DEFAULT_CAM_METHODS; 'none' or empty -> no CAM
    layers                tapped layers for attention maps (None / 'all': every tap; see `tapped_layers`)
    cam_layer             the layer grad-cam methods weigh (None: the model's last tap)
    target                the class a CAM explains: 'label' or 'prediction'
    threshold             AU region = AU map > threshold (energy ratio, region share), in [0, 1)
    device                'auto' / None, 'cpu', 'cuda', 'cuda:N' (fer_lib.utils.resolve_device)
    score_cam_batch_size  ScoreCAM's forward batch
    max_samples           at most this many samples get maps (None: all)
    seed                  seeded subsets, ROAD's imputer noise and the random control maps
    progress              progress bars
    """

    cam_methods: Any = None
    layers: Any = None
    cam_layer: str | None = None
    target: str = "label"
    threshold: float = 0.1
    device: Any = None
    score_cam_batch_size: int = 32
    max_samples: int | None = None
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        methods = self.cam_methods
        if isinstance(methods, str) and methods.strip().lower() == "none":
            methods = ()
        object.__setattr__(self, "cam_methods", tuple(check_cam_methods(methods)))
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))
        check_target(self.target)
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not 0.0 <= self.threshold < 1.0:
            raise ConfigError(f"threshold must be in [0, 1); got {self.threshold}")
        resolve_device(self.device)
        check_number("score_cam_batch_size", self.score_cam_batch_size, integer=True, minimum=1)
        if self.max_samples is not None:
            check_number("max_samples", self.max_samples, integer=True, minimum=1)
        check_number("seed", self.seed, integer=True)

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None = None, **overrides: Any) -> "CAMSettings":
        """Settings from the fields found in `params` (e.g. a notebook's parameters; other keys are ignored),
        then `overrides` (which must be fields)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in dict(params or {}).items() if k in names}, **overrides)

    def replace(self, **changes: Any) -> "CAMSettings":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @property
    def torch_device(self) -> torch.device:
        """The resolved device."""
        return resolve_device(self.device)


def tapped_layers(model: nn.Module, layers: str | int | Iterable[str | int] | None = None) -> list[str]:
    """Tapped layers to analyse: None/'all' -> every tap, else specs as fer_lib.models.resolve_layers takes.

    Specs are stage numbers (paper convention), negative indices, 'last' or module names;
    each must be one of the model's taps (ConfigError listing them otherwise).
    """
    names = list(model.tap_names)
    if layers is None or (isinstance(layers, str) and layers.strip() in ("", "all")):
        return names
    if isinstance(layers, str):
        layers = [p.strip() for p in layers.split(",") if p.strip()]
    elif isinstance(layers, int):
        layers = [layers]
    layers = list(layers)
    backbone = (getattr(model, "config", None) or {}).get("backbone")
    try:
        import timm

        known = isinstance(backbone, str) and timm.is_model(backbone)
    except ImportError:  # pragma: no cover
        known = False
    out: list[str] = []
    for spec in layers:
        if isinstance(spec, str) and spec in names:
            name = spec
        elif known:
            name = _resolve_model_layers(backbone, [spec])[0]
        else:
            name = _resolve_model_layers(names, [spec])[0]
        if name not in names:
            raise ConfigError(f"layer {spec!r} ({name}) is not tapped by this model; tapped layers: "
                              f"{', '.join(names)} (rebuild the model with layers=... to tap more)")
        if name not in out:
            out.append(name)
    return out


class LogitsOnly(nn.Module):
    """Wrap a TappedModel so that forward returns logits only (what pytorch-grad-cam expects)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.classify(x)


def cam_target_layer(model: nn.Module, layer: str | None = None) -> nn.Module:
    """The module whose activations a grad-cam method weighs: the tapped `layer` (default: the model's last tap,
    so a model trained with --layers 4 gets its CAMs from stage 4 instead of an error).

    For a transformer block (timm `Block`, with `norm1` and `attn`) this is the block's
    `norm1`, as pytorch-grad-cam recommends for ViTs: with class-token pooling the last
    block's output patch tokens get no gradient, its input tokens do.
    """
    name = tapped_layers(model, layer)[0] if layer is not None else list(model.tap_names)[-1]
    module = model.tap_modules()[list(model.tap_names).index(name)]
    if hasattr(module, "norm1") and hasattr(module, "attn"):
        return module.norm1
    return module


def minmax_scale(maps: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Scale each map of (B, ...) to [0, 1] (constant maps become zeros)."""
    flat = maps.flatten(1)
    lo = flat.amin(dim=1).view(-1, *([1] * (maps.dim() - 1)))
    hi = flat.amax(dim=1).view(-1, *([1] * (maps.dim() - 1)))
    return ((maps - lo) / (hi - lo + eps)).clamp_(0.0, 1.0)


def _as_b1hw(maps: torch.Tensor, name: str) -> torch.Tensor:
    maps = torch.as_tensor(maps)
    if maps.dim() == 3:
        maps = maps[:, None]
    if maps.dim() != 4 or maps.shape[1] != 1:
        raise ValueError(f"{name} must be (B, H, W) or (B, 1, H, W) maps; got shape {tuple(maps.shape)}")
    return maps.float()


def _resize_to(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if pred.shape[-2:] != target.shape[-2:]:
        pred = F.interpolate(pred, size=target.shape[-2:], mode="bilinear", align_corners=False)
    return pred


def upsample_maps(maps: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    """Bilinearly resize (B, 1, h, w) maps to `size` (int or (H, W))."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    return F.interpolate(_as_b1hw(maps, "maps"), size=size, mode="bilinear", align_corners=False)


# ----------------------------------------------------------------------------- metrics
def map_pearson(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pearson correlation per sample between flattened maps (pred bilinearly resized to target); NaN if constant."""
    pred, target = _as_b1hw(pred, "pred"), _as_b1hw(target, "target")
    p = _resize_to(pred, target).flatten(1).double()
    t = target.flatten(1).double().to(p.device)
    p = p - p.mean(dim=1, keepdim=True)
    t = t - t.mean(dim=1, keepdim=True)
    denom = p.norm(dim=1) * t.norm(dim=1)
    r = (p * t).sum(dim=1) / denom
    r[denom <= 1e-12] = float("nan")
    return r.float()


def region_fraction(target: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """Share of pixels inside the AU regions (target > threshold): the energy ratio of a uniform map."""
    return (_as_b1hw(target, "target") > threshold).flatten(1).float().mean(dim=1)


def energy_ratio(pred: torch.Tensor, target: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """Share of the map's mass inside the AU regions (target > threshold); negative values count as 0; NaN for empty maps."""
    pred, target = _as_b1hw(pred, "pred"), _as_b1hw(target, "target")
    p = _resize_to(pred, target).clamp_min(0).flatten(1).double()
    inside = (target > threshold).flatten(1).to(p.device)
    total = p.sum(dim=1)
    ratio = (p * inside).sum(dim=1) / total
    ratio[total <= 1e-12] = float("nan")
    return ratio.float()


def map_scores(pred: torch.Tensor, target: torch.Tensor, threshold: float = 0.1,
               pred_scaled: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Cosine (on `pred`), Pearson and energy ratio (on `pred_scaled`, default `pred`) vs the AU maps."""
    scaled = pred if pred_scaled is None else pred_scaled
    return {
        "cosine": map_cosine(_as_b1hw(pred, "pred"), _as_b1hw(target, "target"), at="image").detach().float().cpu(),
        "pearson": map_pearson(scaled, target).cpu(),
        "energy_ratio": energy_ratio(scaled, target, threshold).cpu(),
    }


def valid_au_mask(au_maps: torch.Tensor, has_landmarks: torch.Tensor) -> torch.Tensor:
    """Samples whose AU map is usable: landmarks found and a class with AUs (non-zero map)."""
    au_maps = _as_b1hw(au_maps, "au_maps")
    return torch.as_tensor(has_landmarks).bool().view(-1).cpu() & (au_maps.flatten(1).amax(dim=1) > 0).cpu()


# ----------------------------------------------------------------------------- maps
@torch.no_grad()
def layer_attention_maps(model: nn.Module, images: torch.Tensor, layers: str | Iterable[str] | None = None,
                         size: int | Sequence[int] | str | None = None, scale: bool = False,
                         features: Sequence[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Attention (mean over channels) of tapped layers as {layer: (B, 1, H, W)} at `size` (default: image size).

    `size="layer"` keeps each layer's own resolution; `scale=True` min-max scales each map to [0, 1] for display; `features` reuses the
    spatial features of an earlier `model(images)` call.
    """
    names = tapped_layers(model, layers)
    if features is None:
        _, features = model(images)
    size = images.shape[-2:] if size is None else size
    out: dict[str, torch.Tensor] = {}
    for name in names:
        att = layer_attention(features[list(model.tap_names).index(name)]).float()
        att = att if isinstance(size, str) and size == "layer" else upsample_maps(att, size)
        out[name] = minmax_scale(att) if scale else att
    return out


def class_ids_for(model: nn.Module, images: torch.Tensor, labels: torch.Tensor | None, target: str = "label",
                  logits: torch.Tensor | None = None) -> torch.Tensor:
    """The class each CAM explains: the true label or the model's prediction."""
    check_target(target)
    if target == "label":
        if labels is None:
            raise ConfigError("target='label' needs labels; pass labels or use target='prediction'")
        return torch.as_tensor(labels).view(-1).long().cpu()
    if logits is None:
        with torch.no_grad():
            logits = model.classify(images)
    return logits.argmax(dim=1).cpu()


@contextlib.contextmanager
def _quiet_score_cam() -> Iterator[None]:
    """Silence ScoreCAM's per-image inner progress bar (our own bar runs over the data)."""
    import pytorch_grad_cam.score_cam as score_cam_module
    import tqdm as tqdm_module

    quiet = type("QuietTqdm", (), {"tqdm": staticmethod(functools.partial(tqdm_module.tqdm, disable=True))})
    original = score_cam_module.tqdm
    score_cam_module.tqdm = quiet
    try:
        yield
    finally:
        score_cam_module.tqdm = original


def _run_grad_cam(engine: type, model: nn.Module, images: torch.Tensor, class_ids: torch.Tensor, *,
                  layer: str | None = None, score_cam_batch_size: int = 32) -> torch.Tensor:
    """Run a pytorch-grad-cam method on the tapped `layer` (see `cam_target_layer`); (B, H, W) in [0, 1] on the CPU."""
    cam = engine(model=LogitsOnly(model), target_layers=[cam_target_layer(model, layer)],
                 reshape_transform=model.to_spatial)
    if issubclass(engine, ScoreCAM):
        cam.batch_size = int(score_cam_batch_size)
    targets = [ClassifierOutputTarget(int(c)) for c in class_ids]
    try:
        # the input requires grad so gradients reach the target layer even when weights are frozen
        x = images.detach().clone().requires_grad_(True)
        with torch.enable_grad(), _quiet_score_cam():
            maps = cam(input_tensor=x, targets=targets)
    finally:
        cam.activations_and_grads.release()
    maps = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))
    return torch.nan_to_num(maps, nan=0.0).clamp_(0.0, 1.0)


for _name, _engine in (("gradcam", GradCAM), ("gradcam++", GradCAMPlusPlus), ("layercam", LayerCAM),
                       ("hirescam", HiResCAM), ("xgradcam", XGradCAM), ("scorecam", ScoreCAM), ("eigencam", EigenCAM)):
    register_cam(_name, default=_name != "scorecam")(_engine)


@register_cam(OWN_CAM)
def own_cam(model: nn.Module, images: torch.Tensor, class_ids: torch.Tensor, **_grad_cam_options: Any) -> torch.Tensor:
    """The model's own CAM (classifier weights x last features), (B, H, W) in [0, 1]; for a model whose net
    has `class_maps` (the trained methods of fer_lib.models.wsol), the class's map from it.

    Else defined only where logits = Linear(global-average-pool(features)): checked on the batch,
    with a ConfigError naming the backbone otherwise (use a grad-cam method there).
    """
    net = getattr(model, "net", model)
    backbone = getattr(model, "config", {}).get("backbone", type(net).__name__)
    if hasattr(net, "class_maps"):  # a method with its own maps (fer_lib.models.wsol: WILDCAT, ACoL, PRM, ...)
        with torch.no_grad():
            maps = net.class_maps(images)
            cam = maps[torch.arange(len(class_ids)), class_ids.to(maps.device)].clamp_min(0)[:, None]
            return minmax_scale(upsample_maps(cam, images.shape[-2:]))[:, 0].float().cpu()
    head = net.get_classifier() if hasattr(net, "get_classifier") else None
    if not isinstance(head, nn.Linear) or not hasattr(net, "forward_features"):
        raise ConfigError(f"the model's own CAM needs a CNN whose head is global average pooling + one "
                          f"Linear layer; {backbone!r} has head {type(head).__name__}. Use a grad-cam method "
                          f"({', '.join(GRAD_CAM_METHODS)})")
    with torch.no_grad():
        feats = net.forward_features(images)
        if feats.dim() != 4 or feats.shape[1] != head.in_features:
            raise ConfigError(f"the model's own CAM needs NCHW features with {head.in_features} channels before a "
                              f"GAP + Linear head; {backbone!r} gives shape {tuple(feats.shape)} (a transformer?). "
                              f"Use a grad-cam method ({', '.join(GRAD_CAM_METHODS)})")
        logits = model.classify(images)
        from_gap = head(feats.mean(dim=(2, 3)))
        tol = 1e-3 * (1.0 + float(logits.abs().max()))
        if from_gap.shape != logits.shape or not torch.allclose(from_gap, logits, atol=tol, rtol=1e-3):
            raise ConfigError(f"the model's own CAM needs logits = Linear(GAP(features)); {backbone!r} has more "
                              f"between its features and its logits. Use a grad-cam method "
                              f"({', '.join(GRAD_CAM_METHODS)})")
        weights = head.weight[class_ids.to(head.weight.device)]  # (B, C)
        cam = torch.einsum("bc,bchw->bhw", weights, feats).clamp_min(0)[:, None]
        cam = upsample_maps(cam, images.shape[-2:])
        return minmax_scale(cam)[:, 0].float().cpu()


def compute_cams(model: nn.Module, images: torch.Tensor, method: str, class_ids: torch.Tensor,
                 layer: str | None = None, score_cam_batch_size: int = 32) -> torch.Tensor:
    """CAMs of the registered `method` for `class_ids` as (B, H, W) float32 in [0, 1] on the CPU.

    Grad-cam methods weigh the tapped `layer` (default: the last; see `cam_target_layer`)
    with the model's `to_spatial` as reshape transform; runs on the model's device.
    """
    method = check_cam_methods([method])[0]
    class_ids = torch.as_tensor(class_ids).view(-1).long()
    if class_ids.numel() != images.shape[0]:
        raise ValueError(f"{class_ids.numel()} class ids for {images.shape[0]} images")
    images = images.to(next(model.parameters()).device)
    return CAM_REGISTRY[method].run(model, images, class_ids, layer=layer, score_cam_batch_size=score_cam_batch_size)


# ----------------------------------------------------------------------------- dataset evaluation
@dataclass
class InterpretabilityResult:
    """Per-sample scores (tidy: one row per sample and map), predictions, and a summary."""

    scores: Any  # pandas.DataFrame
    predictions: Any  # pandas.DataFrame
    summary: dict[str, Any]

    def save(self, out_dir: str | Path, prefix: str = "") -> dict[str, Path]:
        """Write scores.csv, predictions.csv and summary.json (stamped with run_info) atomically."""
        out_dir = Path(out_dir)
        paths = {"scores": out_dir / f"{prefix}scores.csv", "predictions": out_dir / f"{prefix}predictions.csv",
                 "summary": out_dir / f"{prefix}summary.json"}
        atomic_write_csv(paths["scores"], self.scores)
        atomic_write_csv(paths["predictions"], self.predictions)
        atomic_write_json(paths["summary"], {"run": run_info(self.summary.get("config")), **self.summary})
        return paths


def _nanmean(values: Any) -> float:
    arr = np.asarray(values, dtype=float)
    return float(np.nanmean(arr)) if arr.size and np.isfinite(arr).any() else float("nan")


def mean_ci(values: Any) -> list[float] | None:
    """95% interval [low, high] of the mean of per-sample scores (bootstrap over samples, NaN ignored); None
    without a finite value."""
    arr = np.asarray(values, dtype=float)
    return as_interval(bootstrap_interval(arr)) if np.isfinite(arr).any() else None


def _class_names(model: nn.Module, loader: Any, class_names: Sequence[str] | None) -> list[str]:
    if class_names is not None:
        return list(class_names)
    ds = getattr(loader, "dataset", None)
    for obj in (ds, getattr(ds, "dataset", None)):
        if obj is not None and getattr(obj, "class_names", None):
            return list(obj.class_names)
    names = getattr(model, "config", {}).get("class_names")
    if names:
        return list(names)
    return list(EXPRESSIONS)


def _tqdm(iterable: Iterable, progress: bool, desc: str, total: int | None = None) -> Iterable:
    return progress_bar(iterable, desc=desc, total=total, leave=False) if progress else iterable


def _contract_batch(batch: Any) -> tuple[Any, Any, Any, Any]:
    try:
        images, labels, au_maps, has_lm = batch[:4]
    except (TypeError, ValueError) as exc:
        raise ValueError("loader must yield (image, label, au_map, has_landmarks) batches (contract 1)") from exc
    return images, labels, au_maps, has_lm


def _map_scores_of_batch(model: nn.Module, images: torch.Tensor, feats: Any, target_maps: torch.Tensor,
                         vidx: torch.Tensor, class_ids: torch.Tensor, names: Sequence[str], cams: CAMSettings
                         ) -> list[tuple[str, str, dict[str, torch.Tensor]]]:
    """(kind, name, scores) of every attention layer and CAM method on the valid samples `vidx` of a batch."""
    vdev = vidx.to(images.device)
    per_map: list[tuple[str, str, dict[str, torch.Tensor]]] = []
    raw = layer_attention_maps(model, images, names, size="layer", features=feats)
    for name in names:
        att = raw[name][vdev]
        per_map.append(("attention", name, map_scores(
            att, target_maps, cams.threshold, pred_scaled=minmax_scale(upsample_maps(att, images.shape[-2:])))))
    for method in cams.cam_methods:
        maps = compute_cams(model, images[vdev], method, class_ids[vidx], layer=cams.cam_layer,
                            score_cam_batch_size=cams.score_cam_batch_size)
        per_map.append(("cam", method, map_scores(maps[:, None].to(images.device), target_maps, cams.threshold)))
    return per_map


def _score_batch(model: nn.Module, batch: Any, seen: int, names: Sequence[str], classes: Sequence[str],
                 cams: CAMSettings, rows: list[dict[str, Any]], preds_rows: list[dict[str, Any]]) -> int:
    """Append one batch's prediction rows and map-score rows (valid samples only); return the batch size."""
    images, labels, au_maps, has_lm = _contract_batch(batch)
    if cams.max_samples is not None:
        keep = cams.max_samples - seen
        images, labels, au_maps, has_lm = images[:keep], labels[:keep], au_maps[:keep], has_lm[:keep]
    dev = cams.torch_device
    b = images.shape[0]
    images = images.to(dev)
    labels = torch.as_tensor(labels).view(-1).long()
    au_maps = _as_b1hw(au_maps, "au_map").to(dev)
    valid = valid_au_mask(au_maps, has_lm)
    with torch.no_grad():
        logits, feats = model(images)
    probs = logits.float().softmax(dim=1).cpu()
    preds = probs.argmax(dim=1)
    class_ids = class_ids_for(model, images, labels, cams.target, logits=logits)
    for i in range(b):
        preds_rows.append({"sample": seen + i, "label": int(labels[i]), "label_name": classes[int(labels[i])],
                           "pred": int(preds[i]), "pred_name": classes[int(preds[i])],
                           "correct": bool(preds[i] == labels[i]), "confidence": float(probs[i, preds[i]]),
                           "has_landmarks": bool(torch.as_tensor(has_lm).view(-1)[i]), "valid": bool(valid[i])})
    vidx = torch.nonzero(valid).view(-1)
    if len(vidx):
        target_maps = au_maps[vidx.to(dev)]
        area = region_fraction(target_maps, cams.threshold).cpu()
        per_map = _map_scores_of_batch(model, images, feats, target_maps, vidx, class_ids, names, cams)
        for j, i in enumerate(vidx.tolist()):
            base = {"sample": seen + i, "label": int(labels[i]), "label_name": classes[int(labels[i])],
                    "pred": int(preds[i]), "correct": bool(preds[i] == labels[i]),
                    "cam_class": int(class_ids[i]), "au_area": float(area[j])}
            for kind, name, scores in per_map:
                rows.append({**base, "kind": kind, "name": name, **{k: float(v[j]) for k, v in scores.items()}})
    return b


def _interpretability_summary(scores: Any, predictions: Any, classes: Sequence[str], names: Sequence[str],
                              cams: CAMSettings) -> dict[str, Any]:
    """Accuracy over all samples; ATT-COS / CAM-COS, Pearson and energy ratio averaged over the valid ones.

    With their 95% intervals: accuracy_ci (Wilson), macro_f1_ci, att_cos_ci (of att_cos_mean: each sample's
    mean over layers) and cam_cos_ci {method: [low, high]} (bootstrap over samples, fer_lib.metrics).
    """
    methods = list(cams.cam_methods)
    cls = classification_metrics(predictions["label"].to_numpy(), predictions["pred"].to_numpy(), classes)
    summary: dict[str, Any] = {
        "n": int(len(predictions)), "n_valid": int(predictions["valid"].sum()),
        "accuracy": float(cls["accuracy"]), "macro_f1": float(cls["macro_f1"]),
        "per_class_accuracy": cls.get("per_class_accuracy"), "confusion": cls.get("confusion"),
        "accuracy_valid": float(predictions.loc[predictions["valid"], "correct"].mean())
        if predictions["valid"].any() else float("nan"),
        "target": cams.target, "threshold": cams.threshold, "layers": list(names), "cam_methods": methods,
        "au_area": _nanmean(scores.drop_duplicates("sample")["au_area"]) if len(scores) else float("nan"),
        "att_cos": {}, "cam_cos": {}, "pearson": {}, "energy_ratio": {}, "cam_cos_ci": {},
        **classification_intervals(predictions["label"].to_numpy(), predictions["pred"].to_numpy(), len(classes)),
    }
    for kind, key in (("attention", "att_cos"), ("cam", "cam_cos")):
        for name in (names if kind == "attention" else methods):
            sel = scores[(scores["kind"] == kind) & (scores["name"] == name)]
            summary[key][name] = _nanmean(sel["cosine"])
            if kind == "cam":
                summary["cam_cos_ci"][name] = mean_ci(sel["cosine"])
            summary["pearson"][f"{kind}:{name}"] = _nanmean(sel["pearson"])
            summary["energy_ratio"][f"{kind}:{name}"] = _nanmean(sel["energy_ratio"])
    summary["att_cos_mean"] = _nanmean(list(summary["att_cos"].values()))
    attention = scores[scores["kind"] == "attention"]
    summary["att_cos_ci"] = mean_ci(attention.groupby("sample")["cosine"].mean()) if len(attention) else None
    return summary


def evaluate_interpretability(model: nn.Module, loader: Iterable, cams: CAMSettings | None = None, *,
                              class_names: Sequence[str] | None = None, config: Mapping[str, Any] | None = None
                              ) -> InterpretabilityResult:
    """ATT-COS per layer, CAM-COS per method (+ Pearson, energy ratio) vs AU maps, and accuracy.

    `loader` yields contract-1 batches (image, label, au_map, has_landmarks); `cams` (default
    CAMSettings()) says which maps, on which device, for at most how many samples. Map scores are
    computed over valid samples only (landmarks and a class with AUs); CAMs are computed only
    for those. Accuracy (CL) and macro-F1 are over all samples. For a model or checkpoint on a
    dataset, fer_lib.analysis.evaluate.evaluate is the entry point (it calls this).
    """
    import pandas as pd

    cams = cams or CAMSettings()
    names = tapped_layers(model, cams.layers)
    model = model.to(cams.torch_device).eval()
    classes = _class_names(model, loader, class_names)
    rows: list[dict[str, Any]] = []
    preds_rows: list[dict[str, Any]] = []
    seen = 0
    total = len(loader) if cams.max_samples is None and hasattr(loader, "__len__") else None
    for batch in _tqdm(loader, cams.progress, "interpret", total):
        if cams.max_samples is not None and seen >= cams.max_samples:
            break
        seen += _score_batch(model, batch, seen, names, classes, cams, rows, preds_rows)
    if not preds_rows:
        raise ValueError("the loader yielded no samples")
    predictions = pd.DataFrame(preds_rows)
    columns = ["sample", "label", "label_name", "pred", "correct", "cam_class", "au_area", "kind", "name",
               "cosine", "pearson", "energy_ratio"]
    scores = pd.DataFrame(rows, columns=columns)
    summary = _interpretability_summary(scores, predictions, classes, names, cams)
    if config is not None:
        summary["config"] = dict(config)
    return InterpretabilityResult(scores=scores, predictions=predictions, summary=summary)


def subset_indices(n: int, max_samples: int | None, seed: int = 0) -> list[int]:
    """A seeded random subset of range(n) of size max_samples (sorted), or all of it."""
    if max_samples is None or max_samples >= n:
        return list(range(n))
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(n, size=int(max_samples), replace=False).tolist())


def make_loader(dataset: Any, indices: Sequence[int] | None = None, batch_size: int = 16,
                num_workers: int = 0) -> torch.utils.data.DataLoader:
    """An ordered DataLoader over `dataset` (optionally a subset of `indices`)."""
    ds = dataset if indices is None else torch.utils.data.Subset(dataset, list(indices))
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers)


def checkpoint_dataset(checkpoint: str | Path | Mapping[str, Any], split: str = "test", dataset: str | None = None,
                       data_root: str | None = None, landmarks: str | None = None, image_size: int | None = None,
                       seed: int | None = None, **dataset_kwargs: Any) -> Any:
    """The unaugmented `split` of the dataset a checkpoint was trained on (its saved TrainConfig), normalised
    with the model's mean and std.

    Any argument given overrides the checkpoint's value (e.g. another `dataset`, in which
    case the checkpoint's dataset options are not reused).
    """
    ckpt = checkpoint if isinstance(checkpoint, Mapping) else read_checkpoint(checkpoint)
    cfg = dict(ckpt.get("config") or {})
    model_cfg = dict(ckpt.get("model_config") or {})
    name = dataset or cfg.get("dataset")
    if not name:
        raise ConfigError("the checkpoint records no training dataset; pass dataset=... (e.g. 'synthetic')")
    same = name == cfg.get("dataset")
    kwargs = {**((cfg.get("dataset_kwargs") or {}) if same else {}), **dataset_kwargs}
    kwargs.setdefault("splits", [split])
    for key in ("mean", "std"):  # read the way the model was trained (e.g. 0.5 / 0.5 for the ImageNet lite0)
        if model_cfg.get(key) is not None:
            kwargs.setdefault(key, tuple(model_cfg[key]))
    recorded = cfg.get("data_root") if same else None  # recorded relative to the repository root
    out = build_datasets(name, root=data_root or (repo_path(recorded) if recorded else None),
                         image_size=int(image_size or model_cfg.get("image_size") or cfg.get("image_size") or 112),
                         seed=int(cfg.get("seed", 0) if seed is None else seed),
                         landmarks=landmarks or cfg.get("landmarks") or "detect",
                         cache_dir=cfg.get("cache_dir"), augment=False, **kwargs)
    if split not in out:
        raise ConfigError(f"dataset {name!r} has no {split!r} split; it has: {', '.join(out)}")
    return out[split]


def headline_cam_method(methods: Sequence[str]) -> str:
    """The CAM the paper reports (the model's own CAM) when computed, else the first method."""
    if not methods:
        raise ConfigError("no CAM method computed")
    return OWN_CAM if OWN_CAM in methods else list(methods)[0]


def _with_interval(row: dict[str, Any], name: str, value: Any, ci: Sequence[float] | None, scale: float = 1.0) -> None:
    """row[name] = value and, when the summary has its interval, row[name + " low"] / row[name + " high"]."""
    row[name] = value
    if ci is not None:
        row[f"{name} low"], row[f"{name} high"] = scale * ci[0], scale * ci[1]


def comparison_table(results: Mapping[str, InterpretabilityResult]) -> Any:
    """Table-1 style: one row per model: CL (accuracy %), ATT-COS (mean over layers), CAM-COS per method,
    each followed by its 95% interval ("<column> low", "<column> high") where the summary holds one."""
    import pandas as pd

    rows = []
    for model_name, res in results.items():
        s = res.summary
        cam_ci = s.get("cam_cos_ci") or {}
        row: dict[str, Any] = {"model": model_name}
        _with_interval(row, "CL", 100 * s["accuracy"], s.get("accuracy_ci"), 100)
        _with_interval(row, "macro_f1", 100 * s["macro_f1"], s.get("macro_f1_ci"), 100)
        _with_interval(row, "ATT-COS", s["att_cos_mean"], s.get("att_cos_ci"))
        if s["cam_methods"]:
            head = headline_cam_method(s["cam_methods"])
            _with_interval(row, "CAM-COS", s["cam_cos"][head], cam_ci.get(head))
        row.update({f"ATT-COS {k}": v for k, v in s["att_cos"].items()} if len(s["att_cos"]) > 1 else {})
        for k, v in s["cam_cos"].items():
            _with_interval(row, f"CAM-COS {k}", v, cam_ci.get(k))
        row.update({"n": s["n"], "n_valid": s["n_valid"]})
        rows.append(row)
    return pd.DataFrame(rows).set_index("model")


def method_table(results: Mapping[str, InterpretabilityResult], metric: str = "cosine") -> Any:
    """Table-2 style: one row per map (CAM method / attention layer), one column per model, plus the change.

    With exactly two models the last column is second minus first (e.g. AU-guided minus baseline).
    """
    import pandas as pd

    check_choice("metric", metric, ("cosine", "pearson", "energy_ratio"))
    cols = {}
    for model_name, res in results.items():
        sc = res.scores
        cols[model_name] = sc.groupby(["kind", "name"], sort=False)[metric].mean()
    table = pd.DataFrame(cols)
    if len(cols) == 2:
        first, second = list(cols)
        table["change"] = table[second] - table[first]
    return table


def combined_scores(results: Mapping[str, InterpretabilityResult]) -> Any:
    """All models' tidy scores in one frame with a `model` column (for seaborn)."""
    import pandas as pd

    return pd.concat([r.scores.assign(model=name) for name, r in results.items()], ignore_index=True)


# ----------------------------------------------------------------------------- faithfulness
def random_smooth_maps(n: int, size: int | Sequence[int], seed: int = 0, grid: int = 7) -> torch.Tensor:
    """Seeded smooth random maps (B, H, W) in [0, 1]: a control explanation unrelated to the model."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand((n, 1, grid, grid), generator=gen)
    return minmax_scale(upsample_maps(coarse, size))[:, 0]


def _break_ties(maps: np.ndarray, rng: np.random.Generator, scale: float = 1e-5) -> np.ndarray:
    # ROAD thresholds at a percentile; a map with many equal values (zeros) would otherwise
    # remove all or none of them. A tiny seeded jitter gives a strict order, the same for all maps.
    return (maps + scale * rng.random(maps.shape)).astype(np.float32)


def _faithfulness_scorer(metrics: Sequence[str], percentiles: Sequence[int]
                         ) -> Callable[[torch.Tensor, np.ndarray, list, nn.Module], dict[str, np.ndarray]]:
    """A function (images, maps, targets, model) -> {metric: per-sample score} over the wanted metrics."""
    need_morf = any(m in ("road_morf", "road_combined") for m in metrics)
    need_lerf = any(m in ("road_lerf", "road_combined") for m in metrics)
    morf = ROADMostRelevantFirstAverage(percentiles) if need_morf else None
    lerf = ROADLeastRelevantFirstAverage(percentiles) if need_lerf else None
    mult = CamMultImageConfidenceChange() if "cam_mult" in metrics else None

    @torch.no_grad()
    def score(x: torch.Tensor, m: np.ndarray, targets: list, wrapped: nn.Module) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        if morf is not None:
            found["road_morf"] = morf(x, m, targets, wrapped)
        if lerf is not None:
            found["road_lerf"] = lerf(x, m, targets, wrapped)
        if "road_combined" in metrics:
            found["road_combined"] = (found["road_lerf"] - found["road_morf"]) / 2
        if mult is not None:
            found["cam_mult"] = mult(x, m, targets, wrapped)
        return found

    return score


def _explanations(model: nn.Module, x: torch.Tensor, au_maps: torch.Tensor, class_ids: torch.Tensor,
                  controls: Sequence[str], cams: CAMSettings, seen: int) -> dict[str, np.ndarray]:
    """Each CAM method's maps, then the control maps (the AU prior, a smooth random map), (B, H, W) numpy."""
    maps: dict[str, np.ndarray] = {}
    for method in cams.cam_methods:
        maps[method] = compute_cams(model, x, method, class_ids, layer=cams.cam_layer,
                                    score_cam_batch_size=cams.score_cam_batch_size).numpy()
    if "au_prior" in controls:
        maps["au_prior"] = upsample_maps(au_maps, x.shape[-2:])[:, 0].numpy()
    if "random" in controls:
        maps["random"] = random_smooth_maps(len(x), x.shape[-2:], seed=cams.seed + seen).numpy()
    return maps


def faithfulness_scores(model: nn.Module, loader: Iterable, cams: CAMSettings | None = None, *,
                        metrics: Iterable[str] = ("road_morf", "road_lerf", "road_combined"),
                        controls: Iterable[str] = CONTROL_MAPS, percentiles: Sequence[int] = (20, 50, 80),
                        score: str = "probability") -> Any:
    """Faithfulness of each CAM method and control map, tidy DataFrame (sample, method, metric, score).

    `cams` (default: CAMSettings(max_samples=32)) gives the methods, target, seed, device and the
    number of valid samples scored. ROAD (Rong et al. 2022, pytorch-grad-cam): change of the CAM
    class's `score` ("probability": softmax, default; "logit": the raw logit) after imputing the
    most (morf) / least (lerf) relevant pixels, averaged over `percentiles`; road_combined =
    (lerf - morf) / 2; cam_mult: change after multiplying the image by the map. Valid samples
    only (the "au_prior" control needs the AU map). See FAITHFULNESS_DIRECTION for how to read each.
    """
    import pandas as pd

    cams = cams or CAMSettings(max_samples=32)
    metrics = [check_choice("faithfulness metric", m, FAITHFULNESS_METRICS) for m in metrics]
    controls = [check_choice("control map", c, CONTROL_MAPS) for c in controls]
    check_choice("faithfulness score", score, FAITHFULNESS_SCORES)
    target_cls = ClassifierOutputSoftmaxTarget if score == "probability" else ClassifierOutputTarget
    pct = [int(p) for p in percentiles]
    if not pct or any(not 0 < p < 100 for p in pct):
        raise ConfigError(f"percentiles must be integers in (0, 100); got {list(percentiles)}")
    dev, limit = cams.torch_device, cams.max_samples
    model = model.to(dev).eval()
    wrapped = LogitsOnly(model).eval()
    rng = np.random.default_rng(cams.seed)
    torch_state = torch.get_rng_state()
    torch.manual_seed(cams.seed)  # ROAD's imputer adds torch noise
    scorer = _faithfulness_scorer(metrics, pct)
    rows: list[dict[str, Any]] = []
    seen = done = 0
    try:
        for batch in _tqdm(loader, cams.progress, "faithfulness"):
            if limit is not None and done >= limit:
                break
            images, labels, au_maps, has_lm = batch[:4]
            labels = torch.as_tensor(labels).view(-1).long()
            au_maps = _as_b1hw(au_maps, "au_map")
            vidx = torch.nonzero(valid_au_mask(au_maps, has_lm)).view(-1)
            vidx = vidx if limit is None else vidx[: limit - done]
            if len(vidx):
                x = images[vidx].to(dev)
                class_ids = class_ids_for(model, x, labels[vidx], cams.target)
                targets = [target_cls(int(c)) for c in class_ids]
                for name, m in _explanations(model, x, au_maps[vidx], class_ids, controls, cams, seen).items():
                    found = scorer(x, _break_ties(m, rng), targets, wrapped)
                    rows += [{"sample": seen + i, "label": int(labels[i]), "cam_class": int(class_ids[j]),
                              "method": name, "kind": "control" if name in CONTROL_MAPS else "cam", "metric": metric,
                              "score": float(np.asarray(found[metric]).reshape(-1)[j])}
                             for metric in metrics for j, i in enumerate(vidx.tolist())]
                done += len(vidx)
            seen += images.shape[0]
    finally:
        torch.set_rng_state(torch_state)
    return pd.DataFrame(rows, columns=["sample", "label", "cam_class", "method", "kind", "metric", "score"])


def faithfulness_table(scores: Any) -> Any:
    """Mean score per method (rows) and metric (columns) from `faithfulness_scores`."""
    if len(scores) == 0:
        return scores
    return scores.pivot_table(index="method", columns="metric", values="score", aggfunc="mean")


# ----------------------------------------------------------------------------- figures
@dataclass
class SampleMaps:
    """Images and their maps for a few chosen samples, ready to plot (all numpy, [0, 1])."""

    indices: list[int]
    images: np.ndarray  # (N, H, W, 3)
    labels: np.ndarray
    preds: np.ndarray
    cam_classes: np.ndarray
    au_maps: np.ndarray  # (N, H, W)
    valid: np.ndarray
    attention: dict[str, np.ndarray] = field(default_factory=dict)  # layer -> (N, H, W)
    cams: dict[str, np.ndarray] = field(default_factory=dict)  # method -> (N, H, W)
    class_names: list[str] = field(default_factory=list)

    def map(self, name: str) -> np.ndarray:
        """The maps called `name`: 'au', an attention layer or a CAM method."""
        if name == "au":
            return self.au_maps
        if name in self.cams:
            return self.cams[name]
        if name in self.attention:
            return self.attention[name]
        raise ConfigError(f"unknown map {name!r}; valid: {', '.join(['au', *self.attention, *self.cams])}")


def denormalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(B, 3, H, W) normalised tensors -> (B, H, W, 3) float images in [0, 1]."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    out = (images.detach().float().cpu() * std_t + mean_t).clamp(0, 1)
    if out.shape[1] == 1:
        out = out.expand(-1, 3, -1, -1)
    return out.permute(0, 2, 3, 1).numpy()


def dataset_labels(dataset: Any) -> np.ndarray:
    """Labels of every item, from `.records` when present (no image loading), else by indexing."""
    records = getattr(dataset, "records", None)
    if records is not None and len(records) == len(dataset):
        labels = []
        for r in records:
            lab = r.get("label") if isinstance(r, Mapping) else getattr(r, "label", None)
            if lab is None:
                break
            labels.append(int(lab))
        else:
            return np.asarray(labels, dtype=int)
    return np.asarray([int(dataset[i][1]) for i in range(len(dataset))], dtype=int)


def au_map_indices(dataset: Any) -> list[int]:
    """Indices of the items with a usable AU map: landmarks found and a class with AUs (from `.records`)."""
    return [i for i, r in enumerate(dataset.records)
            if r.has_landmarks and CODEBOOK.get(dataset.class_names[r.label])]


def select_per_class(dataset: Any, per_class: int = 3, seed: int = 0, classes: Iterable[int] | None = None,
                     among: Sequence[int] | None = None) -> list[int]:
    """Seeded choice of up to `per_class` dataset indices for each class (class order kept), optionally only
    `among` some indices (e.g. `au_map_indices(dataset)`)."""
    labels = dataset_labels(dataset)
    pool = np.arange(len(labels)) if among is None else np.asarray(list(among), dtype=int)
    rng = np.random.default_rng(seed)
    wanted = sorted(set(labels[pool].tolist())) if classes is None else list(classes)
    out: list[int] = []
    for c in wanted:
        idx = pool[labels[pool] == c]
        if len(idx):
            out.extend(sorted(rng.choice(idx, size=min(per_class, len(idx)), replace=False).tolist()))
    return out


def collect_sample_maps(model: nn.Module, dataset: Any, indices: Sequence[int], cams: CAMSettings | None = None, *,
                        batch_size: int = 16, mean: Sequence[float] | None = None,
                        std: Sequence[float] | None = None) -> SampleMaps:
    """Images, AU maps, attention and CAMs (all at image size, [0, 1]) for `indices` of `dataset`.

    `cams` (default CAMSettings()) gives the CAM methods, attention layers, target, device and CAM layer.
    """
    cams = cams or CAMSettings()
    methods = list(cams.cam_methods)
    names = tapped_layers(model, cams.layers)
    if not indices:
        raise ValueError("no samples to collect: `indices` is empty")
    dev = cams.torch_device
    model = model.to(dev).eval()
    cfg = getattr(model, "config", {}) or {}
    mean = mean if mean is not None else getattr(dataset, "mean", None) or cfg.get("mean") or (0.5, 0.5, 0.5)
    std = std if std is not None else getattr(dataset, "std", None) or cfg.get("std") or (0.5, 0.5, 0.5)
    parts: dict[str, list] = {k: [] for k in ("images", "labels", "preds", "cls", "au", "valid")}
    att: dict[str, list] = {n: [] for n in names}
    maps: dict[str, list] = {m: [] for m in methods}
    for batch in make_loader(dataset, indices, batch_size=batch_size):
        images, labels, au_maps, has_lm = batch[:4]
        x = images.to(dev)
        with torch.no_grad():
            logits, feats = model(x)
        class_ids = class_ids_for(model, x, labels, cams.target, logits=logits)
        parts["images"].append(denormalise(images, mean, std))
        parts["labels"].append(torch.as_tensor(labels).view(-1).numpy())
        parts["preds"].append(logits.argmax(1).cpu().numpy())
        parts["cls"].append(class_ids.numpy())
        parts["au"].append(upsample_maps(au_maps, x.shape[-2:])[:, 0].numpy())
        parts["valid"].append(valid_au_mask(au_maps, has_lm).numpy())
        for name, m in layer_attention_maps(model, x, names, scale=True, features=feats).items():
            att[name].append(m[:, 0].cpu().numpy())
        for method in methods:
            maps[method].append(compute_cams(model, x, method, class_ids, layer=cams.cam_layer,
                                             score_cam_batch_size=cams.score_cam_batch_size).numpy())
    cat = {k: np.concatenate(v) for k, v in parts.items()}
    return SampleMaps(indices=list(indices), images=cat["images"], labels=cat["labels"], preds=cat["preds"],
                      cam_classes=cat["cls"], au_maps=cat["au"], valid=cat["valid"],
                      attention={k: np.concatenate(v) for k, v in att.items()},
                      cams={k: np.concatenate(v) for k, v in maps.items()},
                      class_names=_class_names(model, None, getattr(dataset, "class_names", None)))


def _overlay(ax: Any, image: np.ndarray, heat: np.ndarray | None, alpha: float, cmap: str) -> None:
    ax.imshow(image)
    if heat is not None:
        ax.imshow(heat, cmap=cmap, alpha=alpha, vmin=0.0, vmax=1.0)
    ax.set_xticks([])
    ax.set_yticks([])


def overlay_figure(maps: SampleMaps, samples: Sequence[int] | None = None, columns: Sequence[str] | None = None,
                   path: str | Path | None = None, alpha: float = 0.5, cmap: str = "jet",
                   cell: float = 1.6) -> Any:
    """Rows = samples, columns = image, AU map, attention per layer, CAM per method, as overlays."""
    import matplotlib.pyplot as plt

    rows = list(range(len(maps.indices))) if samples is None else list(samples)
    if not rows:
        raise ValueError("no samples to plot")
    cols = ["image", "au", *[f"att:{k}" for k in maps.attention], *maps.cams] if columns is None else list(columns)
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(cell * len(cols), cell * len(rows)), squeeze=False)
    names = maps.class_names
    for r, i in enumerate(rows):
        for c, col in enumerate(cols):
            ax = axes[r, c]
            heat = None if col == "image" else maps.map(col[4:] if col.startswith("att:") else col)[i]
            _overlay(ax, maps.images[i], heat, alpha, cmap)
            if r == 0:
                ax.set_title(col, fontsize=8)
        label = names[maps.labels[i]] if names else str(maps.labels[i])
        pred = names[maps.preds[i]] if names else str(maps.preds[i])
        axes[r, 0].set_ylabel(f"#{maps.indices[i]}\n{label}\n(pred {pred})", fontsize=7)
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path)
    return fig


def class_grid_figure(maps: SampleMaps, map_name: str = "au", per_class: int = 4, path: str | Path | None = None,
                      alpha: float = 0.5, cmap: str = "jet", cell: float = 1.4) -> Any:
    """Rows = classes, columns = up to `per_class` samples of that class, each overlaid with `map_name`."""
    import matplotlib.pyplot as plt

    maps.map(map_name)  # validate the name early
    classes = sorted(set(maps.labels.tolist()))
    fig, axes = plt.subplots(len(classes), per_class, figsize=(cell * per_class, cell * len(classes)),
                             squeeze=False)
    for r, c in enumerate(classes):
        idx = np.flatnonzero(maps.labels == c)[:per_class]
        for k in range(per_class):
            ax = axes[r, k]
            if k < len(idx):
                i = idx[k]
                _overlay(ax, maps.images[i], maps.map(map_name)[i], alpha, cmap)
                mark = "" if maps.preds[i] == c else " x"
                ax.set_title(f"#{maps.indices[i]}{mark}", fontsize=7)
            else:
                ax.axis("off")
        axes[r, 0].set_ylabel(maps.class_names[c] if maps.class_names else str(c), fontsize=8)
    fig.suptitle(f"{map_name} per class", fontsize=9)
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path)
    return fig


__all__ = [
    "CAM_METHODS", "CAM_REGISTRY", "CONTROL_MAPS", "CAMMethod", "CAMSettings", "DEFAULT_CAM_METHODS",
    "FAITHFULNESS_DIRECTION", "FAITHFULNESS_METRICS", "FAITHFULNESS_SCORES", "GRAD_CAM_METHODS", "OWN_CAM",
    "TARGET_MODES", "InterpretabilityResult", "LogitsOnly", "SampleMaps", "cam_target_layer", "check_cam_methods",
    "checkpoint_dataset", "combined_scores", "comparison_table", "headline_cam_method", "method_table", "check_target",
    "class_grid_figure", "class_ids_for", "collect_sample_maps", "compute_cams", "dataset_labels", "denormalise",
    "energy_ratio", "evaluate_interpretability", "faithfulness_scores", "faithfulness_table", "layer_attention_maps",
    "make_loader", "map_cosine", "map_pearson", "map_scores", "minmax_scale", "overlay_figure", "own_cam",
    "random_smooth_maps", "region_fraction", "register_cam", "resolve_device", "tapped_layers", "save_figure",
    "select_per_class", "au_map_indices", "subset_indices", "upsample_maps", "valid_au_mask",
]
