"""ContraWarping: unsupervised expression representations from contrastive local warping.

Reproduces "Unsupervised Facial Expression Representation Learning with Contrastive Local
Warping" (Xue, Sun, Yang, arXiv 2303.09034) on any timm backbone, and evaluates the frozen
representation by linear probe, k-NN and expression retrieval.

Our reading of the paper
------------------------
Expression is invariant to *global* transformations (affine, flip, colour jitter, blur) but
is changed by *local* warps of the face (a lifted brow, a pulled lip corner). The paper
builds on BYOL (online encoder + projector + predictor; a target encoder + projector that is
an exponential moving average (EMA) of the online one; no other images as negatives, so
faces of the same expression are never pushed apart) and adds, for every face, negatives
made by random local warping of the *same* face. Its findings: (1) BYOL on global
positives alone already gives informative features; (2) the warped negatives add
expression-specific variation and improve substantially (RAF-DB linear probe 79.14%).

What we implement (`ContraWarping.loss`), per image x and direction (then symmetrised):
    v1 = G1(x), v2 = G2(x)            positives: two global transformations
    n1 = G1(W(x))                      negative: a local warp W of the same face, with
                                       EXACTLY the global transformation of v1, so v1 and n1
                                       differ only by the local warp (no shortcut)
    q(.) = online predictor(projector(encoder(.))), z(.) = target projector(encoder(.)),
    all L2-normalised; s+ = <q(v1), z(v2)>, s- = <q(n1), z(v2)>
    L = (2 - 2 s+)  +  neg_weight * softplus((s- - s+) / temperature)        ("infonce")
The first term is BYOL's regression loss (keeps the invariance to global transforms and,
with the predictor and the EMA target, avoids collapse); the second is InfoNCE with the
warped view as the one hard negative, -log(e^{s+/t} / (e^{s+/t} + e^{s-/t})). The warped
view is passed through the ONLINE network (and compared with the target embedding of the
other positive): were it only on the target side, the online encoder would never see a
warped face and could not learn to tell it apart. We keep the BYOL term because InfoNCE
with a single negative saturates once s+ exceeds s- by a few temperatures, after which it no
longer pulls positives together; the softmax push is bounded (unlike an unbounded
"minimise s-"), so it cannot blow up the embedding. Variants: objective="margin" (hinge
`relu(s- - s+ + margin)` instead of the softplus) and objective="byol" (no negatives: the
paper's ablation). The EMA momentum follows BYOL's cosine schedule from `ema` to 1.

Starting point (`pretrained`): by default the encoder starts from random weights, as in the
paper; `pretrained="imagenet"` starts it (online and target) from the backbone's ImageNet weights
(offline for tf_efficientnet_lite0/1/2, as fer_lib.models.build_model loads them), and
`run_experiment` then also probes the ImageNet features alone ("imagenet_init"), the starting point
ContraWarping has to improve on. Images are normalised as the backbone's pretrained weights expect.

AU-aware warping (new, `au_aware=True`): the local warps are concentrated on the AU regions
of the face (see fer_lib.methods.warps), so the negatives change exactly the geometry the AU
codebook says carries the expression.

Outputs: `pretrain()` writes `<out_dir>/checkpoints/backbone.pt` (the timm backbone's state
dict, classifier removed; load it with `fer_lib.models.build_model(backbone, pretrained=True,
weights=PATH)` or `TrainConfig(pretrained=True, weights=PATH)`), `backbone.json` (its
metadata), `checkpoints/contrawarping.pt` (online + target + optimiser, for inspection),
`pretrain.json` (history, run info) and `history.csv`. All writes are atomic.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from fer_lib.data import build_datasets
from fer_lib.faces.landmarks import ANCHORS, ImageError, load_image
from fer_lib.metrics import accuracy_with_interval
from fer_lib.methods.warps import (GlobalAugConfig, WarpConfig, apply_view, au_anchor_points, au_field_maps,
                                   random_displacement, sample_global_params)
from fer_lib.metrics import classification_metrics
from fer_lib.models import available_layers, build_model, load_checkpoint, pretrained_normalisation
from fer_lib.models.factory import check_pretrained
from fer_lib.plots import save_figure
from fer_lib.training.step import OPTIMIZERS, OptimSpec, Schedule, TrainStep, build_optimizer
from fer_lib.training.train import TrainConfig, train
from fer_lib.utils import (ConfigError, atomic_path, atomic_write_csv, atomic_write_json, check_choice, check_number,
                           config_hash, progress_bar, resolve_device, run_info, seed_everything)

OBJECTIVES: tuple[str, ...] = ("infonce", "margin", "byol")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
LANDMARK_MODES: tuple[str, ...] = ("ground_truth", "detect", "none")
DEFAULT_MEAN = (0.485, 0.456, 0.406)
DEFAULT_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- configuration
@dataclass
class SSLConfig:
    """A ContraWarping pretraining run (validated at construction)."""

    dataset: str = "synthetic"
    data_root: str | None = None
    dataset_kwargs: dict = field(default_factory=dict)  # passed to fer_lib.data.build_datasets
    landmarks: str = "ground_truth"  # where warps get their AU anchors: ground_truth (synthetic) | detect | none
    backbone: str = "resnet18"
    pretrained: bool | str = False  # "imagenet": the encoder starts from ImageNet weights (offline for lite0/1/2)
    image_size: int = 64
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3  # AdamW
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.0
    proj_dim: int = 128
    hidden_dim: int = 512
    ema: float = 0.99  # target momentum at the start (cosine schedule to 1)
    objective: str = "infonce"  # infonce | margin | byol (no negatives)
    neg_weight: float = 1.0
    temperature: float = 0.2
    margin: float = 0.5
    symmetric: bool = True
    au_aware: bool = False  # overrides warp.au_aware
    warp: WarpConfig = field(default_factory=WarpConfig)
    augment: GlobalAugConfig = field(default_factory=GlobalAugConfig)
    max_images: int | None = None  # subsample the pretraining images (seeded)
    seed: int = 0
    device: str = "auto"
    max_steps_per_epoch: int | None = None
    out_dir: str = "runs/contrawarping"

    def __post_init__(self) -> None:
        check_choice("objective", self.objective, OBJECTIVES)
        check_choice("device", self.device, DEVICES)
        check_choice("landmarks", self.landmarks, LANDMARK_MODES)
        for name in ("epochs", "image_size", "batch_size", "proj_dim", "hidden_dim"):
            check_number(name, getattr(self, name), integer=True, minimum=1)
        if self.batch_size < 2:
            raise ConfigError("batch_size must be >= 2 (BatchNorm in the projector needs 2 samples)")
        if self.image_size < 16:
            raise ConfigError(f"image_size must be >= 16, got {self.image_size}")
        for name in ("max_images", "max_steps_per_epoch"):
            if getattr(self, name) is not None:
                check_number(f"{name} (or None)", getattr(self, name), integer=True, minimum=1)
        for name in ("weight_decay", "neg_weight", "margin", "warmup_epochs"):
            check_number(name, getattr(self, name), minimum=0)
        for name in ("lr", "temperature"):
            check_number(name, getattr(self, name), above=0)
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"ema must be in [0, 1), got {self.ema!r}")
        if isinstance(self.warp, Mapping):
            self.warp = WarpConfig(**self.warp)
        if isinstance(self.augment, Mapping):
            self.augment = GlobalAugConfig(**self.augment)
        if not isinstance(self.dataset_kwargs, dict):
            raise ConfigError(f"dataset_kwargs must be a dict, got {type(self.dataset_kwargs).__name__}")
        self.warp = dataclasses.replace(self.warp, au_aware=bool(self.au_aware))
        available_layers(self.backbone)  # unknown backbone -> ConfigError listing valid names
        self.pretrained = _check_start(self.pretrained)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

    def contrast(self) -> "ContrastSettings":
        """The loss settings of `ContraWarping.loss`."""
        return ContrastSettings(self.objective, self.neg_weight, self.temperature, self.margin, self.symmetric)

    def identity(self) -> dict[str, Any]:
        """Fields that define the run's results (out_dir excluded)."""
        d = self.to_dict()
        d.pop("out_dir", None)
        return d


# --------------------------------------------------------------------------- unlabelled images
def _record_anchors(record: Any) -> np.ndarray | None:
    get = (lambda k: record.get(k)) if isinstance(record, Mapping) else (lambda k: getattr(record, k, None))
    if get("has_landmarks") is False:
        return None
    a = get("anchors")
    if a is None:
        return None
    if hasattr(a, "anchors") and callable(a.anchors):
        a = a.anchors()
    a = np.asarray(a, np.float32)
    return a if a.ndim == 2 and a.shape[1] == 2 and np.isfinite(a).all() else None


class UnlabelledImages(Dataset):
    """Un-normalised face images (uint8, in memory) with their anchors; labels are kept only for plots.

    Built from any dataset: `from_dataset(ds)` uses `ds.sample(i, augment=False)` when the
    dataset has it (fer_lib.data.FERDataset: RGB uint8 at the dataset's size and its anchors
    in that frame), else un-normalises `ds[i][0]` with `ds.mean`/`ds.std`. `from_paths`
    reads image files (fer_lib.faces.landmarks.load_image) and resizes them. Unreadable items are
    skipped and listed in `.skipped` as (item, reason).
    """

    def __init__(self, images: torch.Tensor, anchors: np.ndarray, labels: np.ndarray | None = None,
                 mean: Sequence[float] = DEFAULT_MEAN, std: Sequence[float] = DEFAULT_STD,
                 skipped: Sequence[tuple[str, str]] = ()) -> None:
        if images.ndim != 4 or images.shape[1] != 3 or images.dtype != torch.uint8:
            raise ValueError(f"images must be a uint8 tensor (N, 3, S, S), got {images.dtype} {tuple(images.shape)}")
        anchors = np.asarray(anchors, np.float32)
        if anchors.shape != (len(images), len(ANCHORS), 2):
            raise ValueError(f"anchors must be ({len(images)}, {len(ANCHORS)}, 2) (NaN = none), got {anchors.shape}")
        self.images = images
        self.anchors = anchors
        self.labels = np.full(len(images), -1, np.int64) if labels is None else np.asarray(labels, np.int64)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.skipped = list(skipped)
        self.has_anchors = np.isfinite(anchors).reshape(len(anchors), -1).all(axis=1)
        self._au_cache: dict[tuple[int, float], tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], torch.as_tensor(self.anchors[i])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    @classmethod
    def from_dataset(cls, dataset: Any, max_images: int | None = None, seed: int = 0,
                     progress: bool = True) -> "UnlabelledImages":
        """Collect the (un-augmented) images and anchors of any dataset; labels are not used for training."""
        n = len(dataset)
        if n == 0:
            raise ConfigError("the pretraining dataset is empty")
        order = np.arange(n)
        if max_images is not None and max_images < n:
            order = np.sort(np.random.default_rng(seed).choice(n, size=max_images, replace=False))
        mean = tuple(getattr(dataset, "mean", None) or DEFAULT_MEAN)
        std = tuple(getattr(dataset, "std", None) or DEFAULT_STD)
        records = getattr(dataset, "records", None) or []
        images, anchors, labels, skipped = [], [], [], []
        nan = np.full((len(ANCHORS), 2), np.nan, np.float32)
        for i in progress_bar(order, desc="collecting images", disable=not progress):
            i = int(i)
            try:
                if hasattr(dataset, "sample"):
                    rgb, a, _ = dataset.sample(i, augment=False)
                    x = torch.from_numpy(np.array(rgb, dtype=np.uint8, copy=True)).permute(2, 0, 1)
                    label = int(dataset.records[i].label) if records else -1
                else:
                    item = dataset[i]
                    img = item[0] if isinstance(item, (tuple, list)) else item
                    img = img.float() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
                    x = (img.clamp(0, 1) * 255).round().to(torch.uint8)
                    label = int(item[1]) if isinstance(item, (tuple, list)) and len(item) > 1 else -1
                    a = _record_anchors(records[i]) if i < len(records) else None
            except Exception as exc:  # a bad item is listed, not fatal
                skipped.append((str(i), f"{type(exc).__name__}: {exc}"))
                continue
            if x.ndim != 3 or x.shape[0] != 3:
                skipped.append((str(i), f"image of shape {tuple(x.shape)} is not (3, S, S)"))
                continue
            a = None if a is None else np.asarray(a, np.float32)
            images.append(x)
            anchors.append(a if a is not None and a.shape == nan.shape and np.isfinite(a).all() else nan)
            labels.append(label)
        if not images:
            raise ConfigError(f"no usable image in the dataset ({len(skipped)} skipped: {skipped[:3]})")
        sizes = {tuple(x.shape) for x in images}
        if len(sizes) > 1:
            raise ConfigError(f"the dataset yields images of several sizes {sorted(sizes)}; give one image_size")
        return cls(torch.stack(images), np.stack(anchors), np.asarray(labels), mean, std, skipped)

    @classmethod
    def from_paths(cls, paths: Sequence[str], image_size: int = 64, anchors: np.ndarray | None = None,
                   progress: bool = True, mean: Sequence[float] = DEFAULT_MEAN,
                   std: Sequence[float] = DEFAULT_STD) -> "UnlabelledImages":
        """Read image files (resized to image_size, anchors stay normalised); unreadable files are skipped."""
        from PIL import Image

        images, kept, skipped = [], [], []
        for j, p in enumerate(progress_bar(paths, desc="reading images", disable=not progress)):
            try:
                rgb = load_image(p)
            except ImageError as exc:
                skipped.append((str(p), str(exc)))
                continue
            im = Image.fromarray(rgb).resize((image_size, image_size), Image.BILINEAR)
            images.append(torch.from_numpy(np.asarray(im, np.uint8).copy()).permute(2, 0, 1))
            kept.append(j)
        if not images:
            raise ConfigError(f"none of the {len(paths)} image files could be read: {skipped[:3]}")
        a = np.full((len(kept), len(ANCHORS), 2), np.nan, np.float32) if anchors is None else np.asarray(anchors)[kept]
        return cls(torch.stack(images), a, None, mean, std, skipped)

    def au_fields(self, size: int, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(all-AU weight maps (N, size, size), AU anchor points (N, K, 2)), cached per (size, sigma)."""
        key = (int(size), float(sigma))
        if key not in self._au_cache:
            maps, _ = au_field_maps(self.anchors, size, sigma)
            self._au_cache[key] = (torch.from_numpy(maps), torch.from_numpy(au_anchor_points(self.anchors)))
        return self._au_cache[key]

    def normalise(self, x01: torch.Tensor) -> torch.Tensor:
        """[0, 1] images -> the dataset's normalisation."""
        mean = torch.tensor(self.mean, device=x01.device)[None, :, None, None]
        std = torch.tensor(self.std, device=x01.device)[None, :, None, None]
        return (x01 - mean) / std


# --------------------------------------------------------------------------- views
def make_views(images01: torch.Tensor, warp: WarpConfig, augment: GlobalAugConfig, generator: torch.Generator,
               au_field: torch.Tensor | None = None, au_points: torch.Tensor | None = None
               ) -> dict[str, torch.Tensor]:
    """Positives v1, v2 (global transforms of the same faces) and negatives n1, n2 (local warp + the same transforms).

    Returns [0, 1] images and the displacement fields d1, d2 (n, 2, F, F).
    """
    n = len(images01)
    p1 = sample_global_params(n, augment, generator)
    p2 = sample_global_params(n, augment, generator)
    kw = dict(config=warp, generator=generator, au_field=au_field, au_points=au_points, device=images01.device)
    d1 = random_displacement(n, **kw)
    d2 = random_displacement(n, **kw)
    return {"v1": apply_view(images01, p1), "v2": apply_view(images01, p2),
            "n1": apply_view(images01, p1, d1), "n2": apply_view(images01, p2, d2), "d1": d1, "d2": d2}


# --------------------------------------------------------------------------- model
def mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """BYOL's projector / predictor: Linear-BN-ReLU-Linear."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out_dim))


def pooled_features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Global (pre-logits) features of a timm model, with or without its classifier."""
    if hasattr(net, "forward_features") and hasattr(net, "forward_head"):
        return net.forward_head(net.forward_features(x), pre_logits=True)
    return net(x)


@torch.no_grad()
def feature_dim(net: nn.Module, image_size: int) -> int:
    """Width of `pooled_features` (num_features, or the head's hidden size for e.g. MobileNetV3)."""
    was = net.training
    net.eval()
    dim = int(pooled_features(net, torch.zeros(1, int(getattr(net, "in_chans", 3) or 3), image_size, image_size)).shape[1])
    net.train(was)
    return dim


def _check_start(pretrained: Any) -> bool | str:
    """False or "imagenet" (the starting points an encoder can take here), normalised; else ConfigError."""
    value = check_pretrained(pretrained, None) if pretrained is not True else True
    if value is True:
        raise ConfigError("pretrained must be False or 'imagenet' here (to start from a file, load it into the "
                          "encoder yourself); got True")
    return value


def create_backbone(backbone: str, image_size: int, pretrained: bool | str = False) -> nn.Module:
    """The timm model of fer_lib.models.build_model with its classifier removed (pooled features out);
    pretrained="imagenet" starts it from ImageNet weights (offline for tf_efficientnet_lite0/1/2)."""
    net = build_model(backbone, image_size=image_size, pretrained=_check_start(pretrained)).net
    net.reset_classifier(0)
    return net


@dataclass(frozen=True)
class ContrastSettings:
    """The ContraWarping objective (see the module docstring): infonce | margin | byol, the weight of the
    warped-negative term, its temperature (infonce) or margin (margin), and both directions or one."""

    objective: str = "infonce"
    neg_weight: float = 1.0
    temperature: float = 0.2
    margin: float = 0.5
    symmetric: bool = True


class ContraWarping(nn.Module):
    """BYOL-style online (encoder, projector, predictor) and EMA target (encoder, projector) networks."""

    def __init__(self, backbone: str = "resnet18", image_size: int = 64, proj_dim: int = 128,
                 hidden_dim: int = 512, pretrained: bool | str = False) -> None:
        super().__init__()
        self.backbone_name = backbone
        self.encoder = create_backbone(backbone, image_size, pretrained)
        dim = feature_dim(self.encoder, image_size)
        self.projector = mlp(dim, hidden_dim, proj_dim)
        self.predictor = mlp(proj_dim, hidden_dim, proj_dim)
        self.target_encoder = copy.deepcopy(self.encoder)
        self.target_projector = copy.deepcopy(self.projector)
        for p in self.target_parameters():
            p.requires_grad_(False)

    def online_parameters(self) -> list[nn.Parameter]:
        return [*self.encoder.parameters(), *self.projector.parameters(), *self.predictor.parameters()]

    def target_parameters(self) -> list[nn.Parameter]:
        return [*self.target_encoder.parameters(), *self.target_projector.parameters()]

    def online(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised online predictions q(x)."""
        return F.normalize(self.predictor(self.projector(pooled_features(self.encoder, x))), dim=-1)

    @torch.no_grad()
    def target(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised target projections z(x) (no gradient)."""
        return F.normalize(self.target_projector(pooled_features(self.target_encoder, x)), dim=-1)

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """EMA: target <- momentum * target + (1 - momentum) * online (BN buffers copied)."""
        pairs = [(self.target_encoder, self.encoder), (self.target_projector, self.projector)]
        for tgt, src in pairs:
            for pt, po in zip(tgt.parameters(), src.parameters()):
                pt.mul_(momentum).add_(po.detach(), alpha=1.0 - momentum)
            for bt, bo in zip(tgt.buffers(), src.buffers()):
                bt.copy_(bo)

    def loss(self, v1: torch.Tensor, v2: torch.Tensor, n1: torch.Tensor | None = None, n2: torch.Tensor | None = None,
             settings: ContrastSettings | None = None, **fields: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """The ContraWarping loss (see the module docstring) and its statistics (s_pos, s_neg, neg_acc).

        `settings` (or its fields as keywords: objective="byol", temperature=0.2, ...) choose the objective."""
        c = dataclasses.replace(settings or ContrastSettings(), **fields)
        objective, neg_weight, temperature, margin, symmetric = (c.objective, c.neg_weight, c.temperature, c.margin,
                                                                 c.symmetric)
        check_choice("objective", objective, OBJECTIVES)
        use_neg = objective != "byol" and n1 is not None
        b = len(v1)
        online_in = [v1, v2] if symmetric else [v1]
        if use_neg:
            online_in += [n1, n2] if symmetric else [n1]
        q = self.online(torch.cat(online_in))
        z = self.target(torch.cat([v1, v2] if symmetric else [v2]))
        if symmetric:
            q_pos = q[: 2 * b]
            z_other = torch.cat([z[b:], z[:b]])  # v1 is compared with z(v2), v2 with z(v1)
            q_neg = q[2 * b:] if use_neg else None
        else:
            q_pos, z_other = q[:b], z
            q_neg = q[b:] if use_neg else None
        s_pos = (q_pos * z_other).sum(-1)
        loss = (2 - 2 * s_pos).mean()
        stats = {"s_pos": float(s_pos.detach().mean())}
        if use_neg:
            s_neg = (q_neg * z_other).sum(-1)
            if objective == "infonce":
                neg = F.softplus((s_neg - s_pos) / temperature)
            else:
                neg = F.relu(s_neg - s_pos + margin)
            loss = loss + neg_weight * neg.mean()
            stats.update(s_neg=float(s_neg.detach().mean()), neg_acc=float((s_pos > s_neg).float().mean()),
                         neg_loss=float(neg.detach().mean()))
        stats["loss"] = float(loss.detach())
        return loss, stats


def ema_momentum(base: float, step: int, total_steps: int) -> float:
    """BYOL's schedule: 1 - (1 - base) * (cos(pi * step / total) + 1) / 2."""
    if total_steps <= 0:
        return base
    return 1.0 - (1.0 - base) * (math.cos(math.pi * min(step, total_steps) / total_steps) + 1.0) / 2.0


# --------------------------------------------------------------------------- checkpoints
def save_backbone(net: nn.Module, path: str | Path, meta: Mapping[str, Any] | None = None) -> Path:
    """Atomically save a timm backbone's state dict without its classifier (+ `<stem>.json` metadata)."""
    path = Path(path)
    state = net.state_dict()
    heads = getattr(net, "pretrained_cfg", {}).get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    state = {k: v.detach().cpu().clone() for k, v in state.items()
             if not any(k == h or k.startswith(h + ".") for h in heads)}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    if meta is not None:
        atomic_write_json(path.with_suffix(".json"), dict(meta))
    return path


def load_backbone(path: str | Path, backbone: str, image_size: int = 64) -> nn.Module:
    """A classifier-free timm backbone with the weights saved by `save_backbone`."""
    net = create_backbone(backbone, image_size)
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    return net


def backbone_with_fresh_head(path: str | Path, backbone: str, out_path: str | Path, num_classes: int = 7,
                             image_size: int = 64, seed: int = 0) -> Path:
    """Write the saved backbone plus a freshly initialised classifier (a full timm state dict).

    For loaders that require every key, e.g. `fer_lib.models.build_model(..., weights=...)`
    while its loader rejects a state dict without classifier keys.
    """
    torch.manual_seed(seed)
    net = build_model(backbone, num_classes=num_classes, image_size=image_size).net
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    result = net.load_state_dict(state, strict=False)
    heads = getattr(net, "pretrained_cfg", {}).get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    missing = [k for k in result.missing_keys if not any(k == h or k.startswith(h + ".") for h in heads)]
    if missing or result.unexpected_keys:
        raise ConfigError(f"{path} does not fit {backbone}: missing {missing[:5]}, "
                          f"unexpected {list(result.unexpected_keys)[:5]}")
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, tmp)
    return out_path


# --------------------------------------------------------------------------- pretraining
def _build_pretrain_images(config: SSLConfig, datasets: Mapping[str, Any] | Any | None) -> UnlabelledImages:
    if isinstance(datasets, UnlabelledImages):
        return datasets
    if datasets is None:
        mean, std = pretrained_normalisation(config.backbone)
        datasets = build_datasets(config.dataset, root=config.data_root, image_size=config.image_size,
                                  seed=config.seed, landmarks=config.landmarks, augment=False,
                                  **{"mean": mean, "std": std, **config.dataset_kwargs})
    source = datasets["train"] if isinstance(datasets, Mapping) else datasets
    return UnlabelledImages.from_dataset(source, max_images=config.max_images, seed=config.seed)


class ContraWarpingStep(TrainStep):
    """The pretraining step: the ContraWarping loss of (v1, v2, n1, n2) (fer_lib.training.step does the rest;
    the EMA target update follows each step, in `pretrain`)."""

    def __init__(self, model: ContraWarping, optimizer: torch.optim.Optimizer, scheduler: Any,
                 contrast: ContrastSettings) -> None:
        super().__init__(model, optimizer, scheduler)
        self.contrast = contrast

    def compute_loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        v1, v2, n1, n2 = batch
        return self.model.loss(v1, v2, n1, n2, self.contrast)

    def describe(self, outputs: Any) -> str:
        return str(outputs)


@dataclass
class _Pretraining:
    """The state of one pretraining run's loop."""

    config: SSLConfig
    data: UnlabelledImages
    step: ContraWarpingStep
    schedule: Schedule
    generator: torch.Generator
    device: torch.device
    batch_size: int
    steps_per_epoch: int
    au_fields: tuple[torch.Tensor, torch.Tensor]  # per image: the AU weighting of the warp field, AU anchor points
    done: int = 0  # optimizer steps so far


def pretrain(config: SSLConfig, datasets: Mapping[str, Any] | Any | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Pretrain ContraWarping on unlabelled images (labels ignored); returns the content of pretrain.json.

    `datasets`: None (build `config.dataset`), a {split: dataset} dict (its "train" split is
    used), any dataset, or an UnlabelledImages. A finished run in `out_dir` with the same
    configuration is returned as is; another configuration there is refused.
    """
    if not isinstance(config, SSLConfig):
        raise ConfigError(f"pretrain() needs an SSLConfig, got {type(config).__name__}")
    summary_path = Path(config.out_dir) / "pretrain.json"
    ident = config_hash(config.identity())
    if summary_path.exists():
        done = json.loads(summary_path.read_text())
        if done.get("config_hash") == ident:
            return done
        raise ConfigError(f"{config.out_dir} holds a pretraining run of another configuration; choose another out_dir")
    device = resolve_device(config.device)
    seed_everything(config.seed)
    data = _build_pretrain_images(config, datasets)
    n = len(data)
    if n < 2:
        raise ConfigError(f"pretraining needs at least 2 images, got {n}")
    au_fields = data.au_fields(config.warp.field_size, config.warp.au_sigma)
    model = ContraWarping(config.backbone, data.image_size, config.proj_dim, config.hidden_dim,
                          config.pretrained).to(device)
    bs = min(config.batch_size, n)
    steps_per_epoch = n // bs
    if config.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
    schedule = Schedule("cosine", total_steps=steps_per_epoch * config.epochs,
                        warmup_steps=int(config.warmup_epochs * steps_per_epoch))
    optimizer, scheduler = build_optimizer(model.online_parameters(),
                                           OptimSpec("adamw", config.lr, weight_decay=config.weight_decay), schedule)
    loop = _Pretraining(config, data, ContraWarpingStep(model, optimizer, scheduler, config.contrast()), schedule,
                        torch.Generator().manual_seed(config.seed), device, bs, steps_per_epoch, au_fields)
    history: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    model.train()
    for epoch in range(1, config.epochs + 1):
        history.append(_pretrain_epoch(loop, epoch, progress))
    return _save_pretraining(loop, history, time.perf_counter() - t_start, ident)


def _pretrain_epoch(loop: _Pretraining, epoch: int, progress: bool) -> dict[str, Any]:
    """One epoch of shuffled batches: views, the step, the EMA target update; the epoch's mean statistics."""
    config, data, model, bs = loop.config, loop.data, loop.step.model, loop.batch_size
    au_field, au_points = loop.au_fields
    perm = torch.randperm(len(data), generator=loop.generator)
    sums: dict[str, float] = {}
    t0 = time.perf_counter()
    bar = progress_bar(range(loop.steps_per_epoch), desc=f"contrawarping epoch {epoch}", disable=not progress,
                       leave=False)
    for s in bar:
        idx = perm[s * bs:(s + 1) * bs]
        x = data.images[idx].to(loop.device).float().div_(255.0)
        views = make_views(x, config.warp, config.augment, loop.generator, au_field[idx], au_points[idx])
        v1, v2, n1, n2 = (data.normalise(views[k]) for k in ("v1", "v2", "n1", "n2"))
        stats = loop.step((v1, v2, n1, n2), where=f"epoch {epoch}, step {s + 1} of ContraWarping")
        loop.done += 1
        model.update_target(ema_momentum(config.ema, loop.done, loop.schedule.total_steps))
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + v
        bar.set_postfix(loss=f"{stats['loss']:.3f}")
    record = {"epoch": epoch, "steps": loop.steps_per_epoch, "lr": config.lr * loop.schedule.factor(max(loop.done - 1, 0)),
              "time_s": time.perf_counter() - t0, **{k: v / max(1, loop.steps_per_epoch) for k, v in sums.items()}}
    if progress:
        extra = f" s+ {record.get('s_pos', float('nan')):.3f} s- {record.get('s_neg', float('nan')):.3f}"
        print(f"[fer_lib.methods.ssl] epoch {epoch}: loss {record.get('loss', float('nan')):.4f}{extra}", flush=True)
    return record


def _save_pretraining(loop: _Pretraining, history: list[dict[str, Any]], train_time: float,
                      ident: str) -> dict[str, Any]:
    """Write the backbone, the full ContraWarping state, history.csv and pretrain.json; return the summary."""
    import pandas as pd

    config, data, model = loop.config, loop.data, loop.step.model
    out_dir = Path(config.out_dir)
    ckpt_dir = out_dir / "checkpoints"
    meta = {"backbone": config.backbone, "pretrained": config.pretrained, "image_size": data.image_size,
            "mean": list(data.mean),
            "std": list(data.std), "method": "contrawarping", "objective": config.objective,
            "au_aware": config.au_aware, "config_hash": ident, "run": run_info(config.to_dict())}
    backbone_path = save_backbone(model.encoder, ckpt_dir / "backbone.pt", meta)
    with atomic_path(ckpt_dir / "contrawarping.pt") as tmp:
        torch.save({"ssl_state": model.state_dict(), "optimizer": loop.step.optimizer.state_dict(),
                    "config": config.to_dict(), "history": history, "meta": meta}, tmp)
    atomic_write_csv(out_dir / "history.csv", pd.DataFrame(history))
    total = loop.schedule.total_steps
    summary = {"run": run_info(config.to_dict()), "config": config.to_dict(), "config_hash": ident,
               "n_images": len(data), "n_with_anchors": int(data.has_anchors.sum()), "skipped": data.skipped,
               "history": history, "train_time_s": train_time,
               "images_per_s": total * loop.batch_size / train_time if train_time > 0 else None,
               "device": str(loop.device), "backbone_path": str(backbone_path)}
    atomic_write_json(out_dir / "pretrain.json", summary)
    return summary


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def extract_features(net: nn.Module, dataset: Any, batch_size: int = 128, device: torch.device | str = "cpu",
                     progress: bool = True, desc: str = "features") -> tuple[np.ndarray, np.ndarray]:
    """Frozen pooled features (N, D) and labels (N,) of a dataset of (image, label, ...) tuples."""
    device = torch.device(device)
    was = net.training
    net.eval().to(device)
    feats, labels = [], []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    for batch in progress_bar(loader, desc=desc, disable=not progress, leave=False):
        x, y = batch[0], batch[1]
        feats.append(pooled_features(net, x.to(device)).float().cpu().numpy())
        labels.append(np.asarray(y, np.int64))
    net.train(was)
    return np.concatenate(feats), np.concatenate(labels)


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 class_names: Sequence[str], c: float = 1.0, seed: int = 0) -> dict[str, Any]:
    """Logistic regression on standardised frozen features; classification_metrics on the test set."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    clf = LogisticRegression(C=c, max_iter=3000, random_state=seed)
    clf.fit(scaler.transform(train_x), train_y)
    return classification_metrics(test_y, clf.predict(scaler.transform(test_x)), class_names)


def _cosine_sim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return a @ b.T


def knn_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, k: int = 10,
                n_classes: int | None = None) -> np.ndarray:
    """Cosine k-NN with similarity-weighted votes (ties -> the nearest neighbour's class)."""
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    k = min(k, len(train_x))
    n_classes = int(n_classes or (train_y.max() + 1))
    sim = _cosine_sim(test_x, train_x)
    nn_idx = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    votes = np.zeros((len(test_x), n_classes))
    rows = np.arange(len(test_x))[:, None]
    np.add.at(votes, (np.broadcast_to(rows, nn_idx.shape), train_y[nn_idx]), np.exp(sim[rows, nn_idx] / 0.1))
    return votes.argmax(axis=1)


def retrieval_metrics(query_x: np.ndarray, query_y: np.ndarray, gallery_x: np.ndarray, gallery_y: np.ndarray,
                      ks: Sequence[int] = (1, 5, 10), exclude_self: bool = False) -> dict[str, float]:
    """Expression retrieval by cosine similarity: precision@k and mAP (relevant = same expression label).

    exclude_self: query and gallery are the same set; each query's own item is left out.
    """
    sim = _cosine_sim(query_x, gallery_x)
    if exclude_self:
        if sim.shape[0] != sim.shape[1]:
            raise ValueError("exclude_self needs the query set to be the gallery")
        np.fill_diagonal(sim, -np.inf)
    order = np.argsort(-sim, axis=1, kind="stable")
    if exclude_self:
        order = order[:, :-1]  # the own item sorts last
    rel = (gallery_y[order] == query_y[:, None]).astype(np.float64)
    out = {f"precision@{k}": float(rel[:, :k].mean()) for k in ks if k <= rel.shape[1]}
    hits = np.cumsum(rel, axis=1)
    ranks = np.arange(1, rel.shape[1] + 1)
    n_rel = rel.sum(axis=1)
    ap = np.where(n_rel > 0, (rel * hits / ranks).sum(axis=1) / np.maximum(n_rel, 1), 0.0)
    out["mAP"] = float(ap.mean())
    return out


@dataclass(frozen=True)
class ProbeSettings:
    """How `evaluate_representation` probes a frozen backbone: k of the k-NN, the probe's seed, a
    progress bar, and whether the features come back too (key "features")."""

    k: int = 10
    seed: int = 0
    progress: bool = True
    return_features: bool = False


def evaluate_representation(net: nn.Module, train_set: Any, test_set: Any, class_names: Sequence[str],
                            device: torch.device | str = "cpu", settings: ProbeSettings | None = None,
                            **fields: Any) -> dict[str, Any]:
    """Linear probe, k-NN accuracy and retrieval (test queries against the train gallery) of a frozen backbone.

    `settings` (or its fields as keywords: k=10, seed=0, progress=True, return_features=False)."""
    ps = dataclasses.replace(settings or ProbeSettings(), **fields)
    k, progress = ps.k, ps.progress
    tr_x, tr_y = extract_features(net, train_set, device=device, progress=progress, desc="features train")
    te_x, te_y = extract_features(net, test_set, device=device, progress=progress, desc="features test")
    probe = linear_probe(tr_x, tr_y, te_x, te_y, class_names, seed=ps.seed)
    knn = classification_metrics(te_y, knn_predict(tr_x, tr_y, te_x, k, len(class_names)), class_names)
    n_test = int(len(te_y))
    for result in (probe, knn):  # 95% Wilson interval over the test faces
        interval = accuracy_with_interval(int(round(result["accuracy"] * n_test)), n_test)
        result["accuracy_ci"] = [interval["ci_low"], interval["ci_high"]]
    out: dict[str, Any] = {
        "linear_probe": probe, "knn": knn, "knn_k": k,
        "retrieval": retrieval_metrics(te_x, te_y, tr_x, tr_y),
        "feature_dim": int(tr_x.shape[1]), "n_train": int(len(tr_y)), "n_test": int(len(te_y)),
    }
    if ps.return_features:
        out["features"] = {"train": (tr_x, tr_y), "test": (te_x, te_y)}
    return out


# --------------------------------------------------------------------------- experiment
@dataclass
class ExperimentConfig:
    """Pretrain ContraWarping, then compare frozen representations with random-init and supervised backbones."""

    dataset: str = "synthetic"
    data_root: str | None = None
    dataset_kwargs: dict = field(default_factory=dict)
    landmarks: str = "ground_truth"
    backbone: str = "resnet18"
    pretrained: bool | str = False  # "imagenet": every encoder (and the supervised one) starts from ImageNet
    image_size: int = 64
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    objective: str = "infonce"
    symmetric: bool = True  # False halves the pretraining cost (one direction per step)
    au_aware: bool = False
    ablation: bool = True  # also pretrain BYOL-only and the other warp variant (uniform <-> AU-aware)
    supervised_epochs: int = 5  # 0 = no supervised baseline
    supervised_lr: float = 0.01
    supervised_optimizer: str = "sgd"  # sgd | adamw (adamw, lr 1e-3 suits an ImageNet start)
    finetune_epochs: int = 0  # >0: fine-tune (fer_lib.training.train, CE) from scratch and from ContraWarping weights
    knn_k: int = 10
    seed: int = 0
    device: str = "auto"
    max_steps_per_epoch: int | None = None
    out_dir: str = "runs/contrawarping_experiment"

    def __post_init__(self) -> None:
        check_choice("objective", self.objective, OBJECTIVES)
        for name in ("supervised_epochs", "finetune_epochs"):
            check_number(name, getattr(self, name), integer=True, minimum=0)
        check_number("knn_k", self.knn_k, integer=True, minimum=1)
        check_choice("supervised_optimizer", self.supervised_optimizer, OPTIMIZERS)
        self.pretrained = _check_start(self.pretrained)
        self.ssl_config("main")  # validates the shared fields now

    def ssl_config(self, variant: str) -> SSLConfig:
        """The SSLConfig of one variant: main (objective, au_aware as given), byol, or the other warp."""
        objective, au_aware = self.objective, self.au_aware
        if variant == "byol":
            objective, au_aware = "byol", False
        elif variant == "other_warp":
            au_aware = not self.au_aware
        elif variant != "main":
            raise ConfigError(f"unknown variant {variant!r}; valid: main, byol, other_warp")
        return SSLConfig(dataset=self.dataset, data_root=self.data_root, dataset_kwargs=dict(self.dataset_kwargs),
                         landmarks=self.landmarks, backbone=self.backbone, pretrained=self.pretrained,
                         image_size=self.image_size,
                         epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, objective=objective,
                         au_aware=au_aware, symmetric=self.symmetric, seed=self.seed, device=self.device,
                         max_steps_per_epoch=self.max_steps_per_epoch,
                         out_dir=str(Path(self.out_dir) / variant_name(objective, au_aware)))

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))


def variant_name(objective: str, au_aware: bool) -> str:
    """Run name of a pretraining variant, e.g. 'contrawarping_au', 'byol'."""
    if objective == "byol":
        return "byol"
    base = "contrawarping" if objective == "infonce" else f"contrawarping_{objective}"
    return base + ("_au" if au_aware else "")


def _supervised_backbone(cfg: ExperimentConfig, datasets: Mapping[str, Any], out_dir: Path,
                         epochs: int, weights: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    tc = TrainConfig(dataset=cfg.dataset, data_root=cfg.data_root, landmarks=cfg.landmarks, backbone=cfg.backbone,
                     image_size=cfg.image_size, epochs=epochs, batch_size=cfg.batch_size, lr=cfg.supervised_lr,
                     optimizer=cfg.supervised_optimizer, au_weight=0.0,
                     pretrained=True if weights is not None else cfg.pretrained, weights=weights, seed=cfg.seed,
                     device=cfg.device, max_steps_per_epoch=cfg.max_steps_per_epoch, out_dir=str(out_dir))
    metrics = train(tc, datasets=dict(datasets))
    model, _ = load_checkpoint(out_dir / "checkpoints" / "best.pt")
    return model.net, metrics


def run_experiment(cfg: ExperimentConfig, progress: bool = True) -> dict[str, Any]:
    """Pretrain the variants, evaluate every frozen backbone; writes <out_dir>/results.json and returns it.

    Backbones compared: random initialisation, each ContraWarping variant, and (when
    supervised_epochs > 0) a CE-trained one from fer_lib.training.train on the labelled train split.
    """
    out_dir = Path(cfg.out_dir)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    mean, std = pretrained_normalisation(cfg.backbone)  # as fer_lib.training.train normalises this backbone
    common = dict(root=cfg.data_root, image_size=cfg.image_size, seed=cfg.seed, landmarks=cfg.landmarks,
                  **{"mean": mean, "std": std, **cfg.dataset_kwargs})
    plain = build_datasets(cfg.dataset, augment=False, **common)
    if "train" not in plain:
        raise ConfigError(f"dataset {cfg.dataset!r} has no train split: {sorted(plain)}")
    eval_split = "test" if "test" in plain else ("val" if "val" in plain else None)
    if eval_split is None:
        raise ConfigError(f"dataset {cfg.dataset!r} needs a val or test split to evaluate on")
    train_set, test_set = plain["train"], plain[eval_split]
    class_names = list(train_set.class_names)
    images = UnlabelledImages.from_dataset(train_set, progress=progress)

    variants = ["main"] + (["byol", "other_warp"] if cfg.ablation else [])
    backbones: dict[str, nn.Module] = {}
    pretrain_runs: dict[str, Any] = {}
    for v in variants:
        sc = cfg.ssl_config(v)
        name = variant_name(sc.objective, sc.au_aware)
        summary = pretrain(sc, images, progress=progress)
        pretrain_runs[name] = {"history": summary["history"], "train_time_s": summary["train_time_s"],
                               "backbone_path": summary["backbone_path"], "objective": sc.objective,
                               "au_aware": sc.au_aware}
        backbones[name] = load_backbone(summary["backbone_path"], cfg.backbone, cfg.image_size)
    seed_everything(cfg.seed)
    starts = {"random_init": create_backbone(cfg.backbone, cfg.image_size)}
    if cfg.pretrained == "imagenet":  # ContraWarping's own starting point: the ImageNet features alone
        starts["imagenet_init"] = create_backbone(cfg.backbone, cfg.image_size, "imagenet")
    backbones = {**starts, **backbones}
    supervised: dict[str, Any] = {}
    if cfg.supervised_epochs > 0:
        aug = build_datasets(cfg.dataset, augment=True, **common)
        net, m = _supervised_backbone(cfg, aug, out_dir / "supervised", cfg.supervised_epochs)
        backbones["supervised"] = net
        supervised["scratch"] = {"test_accuracy": m.get("test", {}).get("accuracy"), "epochs": cfg.supervised_epochs}
    finetune: dict[str, Any] = {}
    if cfg.finetune_epochs > 0:
        aug = build_datasets(cfg.dataset, augment=True, **common)
        main_name = variant_name(cfg.objective, cfg.au_aware)
        full = backbone_with_fresh_head(pretrain_runs[main_name]["backbone_path"], cfg.backbone,
                                        out_dir / "finetune" / f"{main_name}_init.pt", len(class_names),
                                        cfg.image_size, cfg.seed)
        for label, weights in (("scratch", None), (main_name, str(full))):
            _, m = _supervised_backbone(cfg, aug, out_dir / "finetune" / label, cfg.finetune_epochs, weights)
            finetune[label] = {"test_accuracy": m.get("test", {}).get("accuracy"),
                               "test_macro_f1": m.get("test", {}).get("macro_f1")}
    evaluation: dict[str, Any] = {}
    features: dict[str, Any] = {}
    for name, net in backbones.items():
        r = evaluate_representation(net, train_set, test_set, class_names, device, k=cfg.knn_k, seed=cfg.seed,
                                    progress=progress, return_features=True)
        features[name] = r.pop("features")
        evaluation[name] = r
    table = [{"backbone": name, "linear_probe_acc": r["linear_probe"]["accuracy"],
              "linear_probe_ci_low": r["linear_probe"]["accuracy_ci"][0],
              "linear_probe_ci_high": r["linear_probe"]["accuracy_ci"][1],
              "linear_probe_f1": r["linear_probe"]["macro_f1"], "knn_acc": r["knn"]["accuracy"],
              "knn_ci_low": r["knn"]["accuracy_ci"][0], "knn_ci_high": r["knn"]["accuracy_ci"][1],
              "n_test": r["n_test"],
              **{f"retrieval_{k}": v for k, v in r["retrieval"].items()}} for name, r in evaluation.items()]
    results = {"run": run_info(cfg.to_dict()), "config": cfg.to_dict(), "eval_split": eval_split,
               "n_pretrain_images": len(images), "n_with_anchors": int(images.has_anchors.sum()),
               "chance": 1.0 / len(class_names), "ci": "95% Wilson interval over the test faces",
               "pretraining": pretrain_runs, "evaluation": evaluation, "table": table,
               "supervised": supervised, "finetune": finetune, "device": str(device)}
    atomic_write_json(out_dir / "results.json", results)
    results["_features"] = features  # in-memory only (for plots): not written
    results["_images"] = images
    results["_datasets"] = plain
    return results


def public_results(results: Mapping[str, Any]) -> dict[str, Any]:
    """`results` without its in-memory entries (features, images, datasets)."""
    return {k: v for k, v in results.items() if not k.startswith("_")}


# --------------------------------------------------------------------------- figures
def plot_views(images: UnlabelledImages, path: str | Path, n: int = 6, seed: int = 0,
               warp: WarpConfig | None = None, augment: GlobalAugConfig | None = None) -> Path:
    """Per face (rows): source, positives v1 and v2, then per warp mode (uniform, AU-aware) the negative n1 and |d1|."""
    import matplotlib.pyplot as plt

    n = min(n, len(images))
    x = images.images[:n].float() / 255
    base = warp or WarpConfig()
    columns: list[tuple[str, torch.Tensor, bool]] = []
    for k, au_aware in enumerate((False, True)):
        cfg = dataclasses.replace(base, au_aware=au_aware)
        w, p = images.au_fields(cfg.field_size, cfg.au_sigma)
        views = make_views(x, cfg, augment or GlobalAugConfig(), torch.Generator().manual_seed(seed), w[:n], p[:n])
        if k == 0:
            columns += [("source", x, False), ("positive v1", views["v1"], False), ("positive v2", views["v2"], False)]
        tag = "AU-aware" if au_aware else "uniform"
        columns += [(f"negative n1\n({tag} warp)", views["n1"], False), (f"|d1| ({tag})", views["d1"].norm(dim=1), True)]
    fig, axes = plt.subplots(n, len(columns), figsize=(1.6 * len(columns), 1.7 * n), squeeze=False)
    for j, (title, t, is_field) in enumerate(columns):
        for i in range(n):
            ax = axes[i, j]
            if is_field:
                ax.imshow(t[i].numpy(), cmap="magma", vmin=0, vmax=base.magnitude)
            else:
                ax.imshow(t[i].permute(1, 2, 0).clamp(0, 1).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=7)
    fig.suptitle(f"ContraWarping views: positives share the face, negatives add a local warp "
                 f"(max {base.magnitude:.2f} of the side)", fontsize=8)
    fig.tight_layout()
    out = save_figure(fig, path)
    plt.close(fig)
    return out


def plot_pretraining(results: Mapping[str, Any], path: str | Path) -> Path:
    """Loss and similarity to the positive (s+) / warped negative (s-) per epoch, per variant."""
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    rows = [{"variant": name, **h} for name, run in results["pretraining"].items() for h in run["history"]]
    frame = pd.DataFrame(rows)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    sns.lineplot(data=frame, x="epoch", y="loss", hue="variant", marker="o", ax=axes[0])
    axes[0].set_title("pretraining loss")
    sims = frame.melt(id_vars=["variant", "epoch"], value_vars=[c for c in ("s_pos", "s_neg") if c in frame],
                      var_name="pair", value_name="cosine").dropna()
    sns.lineplot(data=sims, x="epoch", y="cosine", hue="variant", style="pair", marker="o", ax=axes[1])
    axes[1].set_title("cosine to positive (s_pos) and warped negative (s_neg)")
    fig.tight_layout()
    out = save_figure(fig, path)
    plt.close(fig)
    return out


def plot_metrics(results: Mapping[str, Any], path: str | Path) -> Path:
    """Bars: linear-probe accuracy, k-NN accuracy, retrieval precision@1 / mAP per backbone."""
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    frame = pd.DataFrame(results["table"])
    keep = ["linear_probe_acc", "knn_acc", "retrieval_precision@1", "retrieval_mAP"]
    long = frame.melt(id_vars="backbone", value_vars=[c for c in keep if c in frame], var_name="metric")
    fig, ax = plt.subplots(figsize=(9, 3.4))
    sns.barplot(data=long, x="metric", y="value", hue="backbone", ax=ax)
    chance = 1.0 / len(results["evaluation"][next(iter(results["evaluation"]))]["linear_probe"]["per_class_accuracy"])
    ax.axhline(chance, ls="--", c="gray", lw=1, label="chance")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=3)
    ax.set_title(f"frozen features on {results['config']['dataset']} ({results['eval_split']} split)")
    fig.tight_layout()
    out = save_figure(fig, path)
    plt.close(fig)
    return out


def plot_retrieval(results: Mapping[str, Any], path: str | Path, backbones: Sequence[str] | None = None,
                   n_queries: int = 4, k: int = 5, seed: int = 0) -> Path:
    """For a few test queries: the top-k train images per backbone (green title = same expression)."""
    import matplotlib.pyplot as plt

    feats = results["_features"]
    data = results["_datasets"]
    names = list(backbones or feats)
    train_set, test_set = data["train"], data[results["eval_split"]]
    class_names = list(train_set.class_names)
    te_y = feats[names[0]]["test"][1]
    queries = np.random.default_rng(seed).choice(len(te_y), size=min(n_queries, len(te_y)), replace=False)

    def rgb(ds: Any, i: int) -> np.ndarray:
        return ds.sample(int(i), augment=False)[0] if hasattr(ds, "sample") else \
            (ds[int(i)][0].permute(1, 2, 0).numpy() * np.array(ds.std) + np.array(ds.mean)).clip(0, 1)

    rows = [(q, name) for q in queries for name in names]
    fig, axes = plt.subplots(len(rows), k + 1, figsize=(1.3 * (k + 1), 1.45 * len(rows)), squeeze=False)
    for r, (q, name) in enumerate(rows):
        tr_x, tr_y = feats[name]["train"]
        te_x, _ = feats[name]["test"]
        top = np.argsort(-_cosine_sim(te_x[q:q + 1], tr_x)[0], kind="stable")[:k]
        axes[r, 0].imshow(rgb(test_set, q))
        axes[r, 0].set_title(f"query: {class_names[te_y[q]]}\n[{name}]", fontsize=6)
        for j, g in enumerate(top, start=1):
            axes[r, j].imshow(rgb(train_set, g))
            ok = tr_y[g] == te_y[q]
            axes[r, j].set_title(class_names[tr_y[g]], fontsize=6, color="green" if ok else "red")
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("expression retrieval: nearest train faces by cosine of frozen features", fontsize=8)
    fig.tight_layout()
    out = save_figure(fig, path)
    plt.close(fig)
    return out
