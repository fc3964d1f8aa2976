"""The composite loss: cross-entropy + lambda * mean over tapped layers of an attention/AU-map alignment.

    loss = CE(logits, y) + au_weight * mean_layers( mean_valid_samples( align(att_l, resize(au_map, l)) ) )

- `att_l` is the layer attention: the mean over channels (fer_lib.models.layer_attention,
  `attention="mean"`), or the reference code's `random_avg`: per sample, the mean over a
  Bernoulli(`attention_p`) random subset of the channels (p = 1 is the plain mean).
- The AU map is resized to the layer's size by area interpolation (average pooling, `au_resize=
  "area"`), which keeps its mass where it was; or as the reference code does it (`"bilinear_clamp"`):
  bilinear with antialias and aligned corners, then clamped to the map's own min/max.
- Valid samples have landmarks and a class with AUs (non-zero map). Others (neutral, no face)
  contribute CE only: they are masked out of the mean, never compared with a zero map. If no
  sample in the batch is valid the AU term is exactly 0 (still connected to the graph, so DDP
  sees the same parameters used on every rank).

Alignment kinds (the paper ablates the loss; "cosine" is the paper's):
- "cosine": 1 - cosine(flattened attention, flattened map); scale-invariant, no normalisation.
- "l1" / "l2": mean |a - m| / mean (a - m)^2 after min-max normalising both maps to [0, 1]
  per sample (the attention's scale is arbitrary, so it is removed first).
- "kl": KL(map || attention) with both maps as spatial distributions: the attention is
  min-max normalised and the map taken as is, each plus 1e-6 and divided by its sum.
- "std_cosine" (the reference code's): the attention standardised per sample (mean 0, std with
  Bessel's correction + 1e-4), then 1 - cosine with the map.
All are computed in float32 (safe under AMP).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fer_lib.models import layer_attention
from fer_lib.faces.au import valid_map_mask
from fer_lib.utils import ConfigError, check_choice, check_number

AU_LOSSES: tuple[str, ...] = ("cosine", "l1", "l2", "kl", "std_cosine")
ATTENTIONS: tuple[str, ...] = ("mean", "random_avg")
AU_RESIZES: tuple[str, ...] = ("area", "bilinear_clamp")
_EPS = 1e-6


def resize_map(au_map: torch.Tensor, size: Sequence[int], mode: str = "area") -> torch.Tensor:
    """Resize a (B,1,H,W) map to `size` (h, w): "area" (average pooling, exact for integer ratios) or
    "bilinear_clamp" (bilinear, antialias, aligned corners, clamped to each map's own min and max)."""
    check_choice("au_resize", mode, AU_RESIZES)
    h, w = int(size[0]), int(size[1])
    if tuple(au_map.shape[-2:]) == (h, w):
        return au_map
    if mode == "area":
        return F.adaptive_avg_pool2d(au_map, (h, w))
    flat = au_map.flatten(1)
    lo, hi = flat.amin(dim=1)[:, None, None, None], flat.amax(dim=1)[:, None, None, None]
    out = F.interpolate(au_map, size=(h, w), mode="bilinear", align_corners=True, antialias=True)
    return torch.minimum(torch.maximum(out, lo), hi)


def random_channel_attention(feature: torch.Tensor, p: float) -> torch.Tensor:
    """Mean over a Bernoulli(p) random subset of channels, drawn per sample: (B,C,h,w) -> (B,1,h,w);
    a sample whose draw selects no channel gets a zero map. p = 1 is the plain channel mean."""
    check_number("attention_p", p, above=0.0, maximum=1.0)
    if p == 1.0:
        return layer_attention(feature)
    keep = torch.bernoulli(torch.full(feature.shape[:2], p, device=feature.device)).to(feature.dtype)
    total = (feature * keep[:, :, None, None]).sum(dim=1, keepdim=True)
    return total / keep.sum(dim=1).clamp_min(1.0)[:, None, None, None]


def _minmax(x: torch.Tensor) -> torch.Tensor:
    lo = x.amin(dim=1, keepdim=True)
    hi = x.amax(dim=1, keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(_EPS)


def alignment(attention: torch.Tensor, target: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """Per-sample misalignment (B,) between an attention map and a same-size AU map (0 = aligned)."""
    check_choice("au_loss", kind, AU_LOSSES)
    a = attention.flatten(1).float()
    m = target.flatten(1).float()
    if a.shape != m.shape:
        raise ValueError(f"attention {tuple(attention.shape)} and map {tuple(target.shape)} differ in size")
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(a, m, dim=1, eps=1e-8)
    if kind == "std_cosine":
        a = (a - a.mean(dim=1, keepdim=True)) / (a.std(dim=1, keepdim=True, correction=1) + 1e-4)
        return 1.0 - F.cosine_similarity(a, m, dim=1, eps=1e-8)
    if kind == "l1":
        return (_minmax(a) - _minmax(m)).abs().mean(dim=1)
    if kind == "l2":
        return ((_minmax(a) - _minmax(m)) ** 2).mean(dim=1)
    p = _minmax(a) + _EPS
    p = p / p.sum(dim=1, keepdim=True)
    t = m.clamp_min(0) + _EPS
    t = t / t.sum(dim=1, keepdim=True)
    return (t * (t.log() - p.log())).sum(dim=1)


@dataclass
class LossParts:
    """Detached parts of the loss for logging."""

    total: float
    ce: float
    au: float
    n_valid: int


class AUGuidedLoss(nn.Module):
    """CE (optional label smoothing) + au_weight * mean over layers of masked alignment."""

    def __init__(self, au_weight: float = 9.0, kind: str = "cosine", label_smoothing: float = 0.0,
                 attention: str = "mean", attention_p: float = 1.0, au_resize: str = "area"):
        super().__init__()
        check_number("au_weight (lambda)", au_weight, minimum=0)
        check_number("label_smoothing", label_smoothing, minimum=0.0)
        if label_smoothing >= 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        check_number("attention_p", attention_p, above=0.0, maximum=1.0)
        self.au_weight = float(au_weight)
        self.kind = check_choice("au_loss", kind, AU_LOSSES)
        self.label_smoothing = float(label_smoothing)
        self.attention = check_choice("attention", attention, ATTENTIONS)
        self.attention_p = float(attention_p)
        self.au_resize = check_choice("au_resize", au_resize, AU_RESIZES)

    def layer_attention(self, feature: torch.Tensor) -> torch.Tensor:
        """The attention the loss aligns: the channel mean, or random_avg while training."""
        if self.attention == "random_avg" and self.training:
            return random_channel_attention(feature, self.attention_p)
        return layer_attention(feature)

    def au_term(self, features: Sequence[torch.Tensor], au_maps: torch.Tensor,
                valid: torch.Tensor) -> torch.Tensor:
        """Mean over layers of the alignment averaged over valid samples (0 when none is valid)."""
        mask = valid.float()
        n = mask.sum().clamp_min(1.0)
        terms = []
        for feat in features:
            att = self.layer_attention(feat.float())
            target = resize_map(au_maps.float(), att.shape[-2:], self.au_resize)
            per_sample = alignment(att, target, self.kind)
            per_sample = torch.where(valid, per_sample, torch.zeros_like(per_sample))
            terms.append((per_sample * mask).sum() / n)
        return torch.stack(terms).mean()

    def forward(self, logits: torch.Tensor, features: Sequence[torch.Tensor], labels: torch.Tensor,
                au_maps: torch.Tensor, has_landmarks: torch.Tensor) -> tuple[torch.Tensor, LossParts]:
        ce = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        valid = valid_map_mask(au_maps, has_landmarks)
        if self.au_weight > 0 and len(features) > 0:
            au = self.au_term(features, au_maps, valid)
        else:
            au = ce.new_zeros(())
        total = ce + self.au_weight * au
        parts = LossParts(total=float(total.detach()), ce=float(ce.detach()), au=float(au.detach()),
                          n_valid=int(valid.sum()))
        return total, parts
