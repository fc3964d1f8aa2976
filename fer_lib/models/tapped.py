"""The tapped model: any classifier plus forward hooks on chosen stages, and its layer attention.

`TappedModel(net, tap_names, config).forward(x)` gives `(logits, [spatial feature map per tapped
stage])`; `layer_attention` turns a feature map into the paper's layer attention (the mean over
channels, (B,1,h,w)): the one place where layer attention is computed (the reference code's
random-channel variant lives in fer_lib.training.losses and averages the same maps).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from fer_lib.models.registry import LayerSpec
from fer_lib.utils import ConfigError


def resolve_stage_names(stages: Sequence[str], layers: Sequence[LayerSpec] | LayerSpec, owner: str = "") -> list[str]:
    """Map layer specs (stage number, negative index, "last" or module name) to names among `stages`
    (stage 1 first); `owner` names the model in errors."""
    stages = list(stages)
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
            raise ConfigError(f"invalid layer {spec!r} for backbone {owner or stages!r}; valid choices: {choices}")
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


def input_tensor(config: dict, rgb: np.ndarray) -> torch.Tensor:
    """(C, S, S) model input from an S x S RGB uint8 image, normalised with the model config's
    mean/std (averaged to gray for one-channel models); the one place photos become inputs."""
    x = torch.from_numpy(np.asarray(rgb, np.float32) / 255.0).permute(2, 0, 1)
    if int(config.get("in_chans", 3)) == 1:
        x = x.mean(dim=0, keepdim=True)
    mean = torch.tensor(config.get("mean") or (0.5,) * x.shape[0], dtype=torch.float32)[: x.shape[0], None, None]
    std = torch.tensor(config.get("std") or (0.5,) * x.shape[0], dtype=torch.float32)[: x.shape[0], None, None]
    return (x - mean) / std
