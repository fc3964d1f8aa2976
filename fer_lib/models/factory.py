"""The model factory: `build_model(name, ...)` looks the name up in the registry and lets its family
build it; `load_checkpoint(path or shipped name)` is the one way to get a trained model back.

Stage numbering (1-based, the paper's convention) follows timm's `feature_info`:
- ResNet: 1 = act1 (stem), 2..5 = layer1..layer4, so the paper's "layer 5" of ResNet50 is
  `layer4`, the last stage; ConvNeXt / Swin: 1..4 = stages; EfficientNet / MobileNetV3: the
  five feature levels timm reports (stride 2, 4, 8, 16, 32).
- ViT / DeiT: every transformer block is a stage (1..depth, e.g. 1..12 for vit_tiny); their
  tokens are reshaped to the patch grid after dropping the class / distillation / register
  tokens (`num_prefix_tokens`).
A layer is given as a stage number, a negative index from the end (-1 = last), "last", or
the module name itself (e.g. "layer4"). `available_layers(backbone)` lists the choices.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import torch

from fer_lib.models.checkpoints import read_checkpoint, resolve_checkpoint
from fer_lib.models.registry import LayerSpec, ModelSpec, family_of
from fer_lib.models.tapped import TappedModel, resolve_stage_names
from fer_lib.models.timm_backbones import OFFLINE_IMAGENET
from fer_lib.utils import ConfigError

PRETRAINED_CHOICES = (False, True, "imagenet")


def min_image_size(backbone: str) -> int:
    """Smallest input side (px) a backbone takes: the stride of its deepest stage (its last map is then 1x1)."""
    return family_of(backbone).min_image_size(backbone)


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
    return {i + 1: name for i, name in enumerate(family_of(backbone).stages(backbone))}


def resolve_layers(backbone: str | Sequence[str], layers: Sequence[LayerSpec] | LayerSpec) -> list[str]:
    """Map layer specs (stage number, negative index, "last" or module name) to module names of a
    backbone (or of an explicit list of stage names)."""
    if isinstance(backbone, str):
        return resolve_stage_names(family_of(backbone).stages(backbone), layers, owner=backbone)
    return resolve_stage_names(backbone, layers)


def pretrained_normalisation(backbone: str) -> tuple[list[float], list[float]]:
    """(mean, std) of a backbone's pretrained weights (timm's pretrained_cfg; ImageNet's when absent)."""
    return family_of(backbone).normalisation(backbone)


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


def build_model(backbone: str, num_classes: int = 7, layers: Sequence[LayerSpec] = ("last",),
                **options: Any) -> TappedModel:
    """Build a registered model (any timm classifier, LNLAttenNet, mini-Xception, ...) with hooks on the
    chosen stages, validated before any work. options: the fields of `ModelSpec` (image_size=112,
    pretrained=False | "imagenet" | True with weights=PATH, in_chans, class_names, mean, std,
    output_stride, allow_download, trust) and family-specific keywords in options={...}."""
    family = family_of(backbone)
    spec = ModelSpec.from_kwargs(backbone, num_classes=num_classes, layers=layers, **options)
    if not isinstance(spec.num_classes, int) or spec.num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer, got {spec.num_classes!r}")
    if not isinstance(spec.image_size, int) or spec.image_size < 16:
        raise ConfigError(f"image_size must be an integer >= 16, got {spec.image_size!r}")
    if not family.checks_own_size:
        check_image_size(backbone, spec.image_size)
    spec.tap_names = resolve_layers(backbone, list(layers) if not isinstance(layers, (str, int)) else [layers])
    spec.pretrained = check_pretrained(spec.pretrained, spec.weights)
    if spec.output_stride not in (None, 8, 16, 32):
        raise ConfigError(f"output_stride must be None, 8, 16 or 32, got {spec.output_stride!r}")
    return family.build(spec)


def model_from_config(mc: dict[str, Any]) -> TappedModel:
    """An untrained TappedModel with the architecture a checkpoint's model_config records."""
    family = family_of(mc["backbone"])
    if family.from_config is not None:
        return family.from_config(mc)
    model = build_model(mc["backbone"], num_classes=mc["num_classes"], layers=mc["tap_names"],
                        image_size=mc["image_size"], in_chans=mc.get("in_chans", 3),
                        class_names=mc.get("class_names"), mean=mc.get("mean"), std=mc.get("std"),
                        output_stride=mc.get("output_stride"))
    model.config["pretrained"] = mc.get("pretrained", False)
    model.config["layers"] = list(mc.get("layers", model.config["layers"]))
    return model


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                    trust: bool = False) -> tuple[TappedModel, dict]:
    """The one way to get a trained model: rebuild a TappedModel from a fer_lib checkpoint alone (a
    training .pt, a shipped .safetensors with its model card, or a shipped name: shipped_checkpoints());
    returns (model, checkpoint dict). Files that are not plain data are refused unless trust=True."""
    ckpt = read_checkpoint(path, map_location=map_location, trust=trust)
    model = model_from_config(ckpt["model_config"])
    model.load_state_dict(ckpt["model_state"])
    return model, ckpt
