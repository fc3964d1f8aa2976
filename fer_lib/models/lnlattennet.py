"""LNLAttenNet: a local multi-network ensemble over a 4x4 grid of face regions, weighted by a
non-local attention network, fused with a global branch (Shi, Mao et al., "Adaptively enhancing
facial expression crucial regions via a local non-local joint network", MIR 2024, arXiv 2203.14045).

    model = build_lnlattennet(num_classes=7, image_size=112)        # or build_model("lnlattennet")
    logits, [weights] = model(x)            # weights: (B,1,4,4), softmax over the 16 regions
    model.region_weights(x)                 # (B,16), each row sums to 1

Our reading of the paper (its abstract and figures; the code is not public):
- the face image is split into 16 local regions (a 4x4 grid, no landmarks);
- local part: an ensemble of local networks, one per region. `local="separate"` gives each
  region its own small CNN on its image crop (the 16 CNNs run as one grouped convolution, so
  their weights are independent); `local="shared"` runs one trunk over the whole image and pools
  its feature map per region, with a separate head per region (cheaper, larger receptive field);
- non-local part: a whole-image trunk (the paper uses a U-Net to mix deep and shallow features:
  `trunk="unet"`; `"conv"` is a plain 4-layer CNN; any timm CNN name, e.g. `"resnet18"` or
  `"tf_efficientnet_lite0"`, runs that network up to its stage `trunk_stage` (1-based as
  fer_lib.models' layers; 3 = stride 8), and with `pretrained="imagenet"` the trunk starts from its
  ImageNet weights, loaded exactly as for the plain timm backbone (offline for the lite models))
  gives a global embedding; a non-local block (embedded-Gaussian self-attention, Wang et al.
  2018) relates the 16 region embeddings and the global token; a scorer turns each related
  region token into one score and a softmax over the regions gives the region weights (they sum
  to 1 per image; the scorer starts at zero so every region starts at 1/16);
- the weights are "fed into the local part": the local features are averaged with them, and the
  local networks' own class votes (per-region classifiers) are averaged with them too
  (`votes=True`); the weighted local feature and the global feature are concatenated and
  classified. logits = head([sum_r w_r e_r, g]) + sum_r w_r * vote_r. The votes are inside the
  logits, so cross-entropy on the logits trains the ensemble and the attention jointly and the
  project's loss and training loop need no change (no separate per-region auxiliary losses).

The region-weight map is the model's first tapped feature, so fer_lib.training.losses' AU alignment
(au_weight > 0) aligns the region weights with the AU map area-pooled to the grid: AU guidance on
region weights, which neither paper has. `layers` may add the trunk's feature map ("trunk").
The model follows fer_lib.models' TappedModel contract (forward, classify, tap_names,
tap_modules, to_spatial, config).
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from fer_lib.faces.au import EXPRESSIONS, valid_map_mask
from fer_lib.models import timm_backbones
from fer_lib.models.checkpoints import load_file
from fer_lib.models.registry import IMAGENET_MEAN, IMAGENET_STD, ModelFamily, ModelSpec, register_family
from fer_lib.models.tapped import resolve_stage_names
from fer_lib.utils import ConfigError, check_choice

#: how the local networks see their regions
LOCAL_MODES: tuple[str, ...] = ("separate", "shared")
#: whole-image trunks (the global / non-local branch; also the local features when local="shared"):
#: the built-in ones, then timm CNNs tried here (any other timm CNN name works too)
OWN_TRUNKS: tuple[str, ...] = ("conv", "unet")
TRUNKS: tuple[str, ...] = OWN_TRUNKS + ("resnet18", "tf_efficientnet_lite0")
#: model names buildable through fer_lib.models.build_model, with the options each implies. The `_lite0`
#: ones run tf_efficientnet_lite0 up to stage 4 (blocks.4: 112 channels, 7x7 at 112 px, the main job's
#: tapped layer); build them with pretrained="imagenet" to start the trunk from ImageNet.
LNL_VARIANTS: dict[str, dict[str, Any]] = {
    "lnlattennet": {"local": "separate", "trunk": "conv"},
    "lnlattennet_shared": {"local": "shared", "trunk": "conv"},
    "lnlattennet_unet": {"local": "separate", "trunk": "unet"},
    "lnlattennet_shared_resnet18": {"local": "shared", "trunk": "resnet18"},
    "lnlattennet_shared_lite0": {"local": "shared", "trunk": "tf_efficientnet_lite0", "trunk_stage": 4},
    "lnlattennet_lite0": {"local": "separate", "trunk": "tf_efficientnet_lite0", "trunk_stage": 4},
}
LNL_BACKBONES: tuple[str, ...] = tuple(LNL_VARIANTS)
#: tappable modules in stage order (stage 1 = "trunk", stage 2 = "last" = the region weights)
LNL_STAGES: tuple[str, ...] = ("trunk", "region_attention")
_ALIASES = {"regions": "region_attention", "region_weights": "region_attention", "weights": "region_attention",
            "global": "trunk", "features": "trunk"}
_TRUNK_STRIDE = 8


def _conv_bn(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ConvTrunk(nn.Module):
    """A plain 4-layer CNN, stride 8: (B,in,S,S) -> (B,channels,S/8,S/8)."""

    def __init__(self, in_chans: int = 3, channels: int = 128):
        super().__init__()
        self.out_channels = channels
        self.body = nn.Sequential(_conv_bn(in_chans, 32, 2), _conv_bn(32, 64, 2), _conv_bn(64, channels, 2),
                                  _conv_bn(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class UNetTrunk(nn.Module):
    """A small U-Net (encoder to stride 16, decoder back to stride 8 with a skip): deep + detail features."""

    def __init__(self, in_chans: int = 3, channels: int = 128):
        super().__init__()
        self.out_channels = channels
        self.enc1 = nn.Sequential(_conv_bn(in_chans, 32, 2), _conv_bn(32, 32))
        self.enc2 = _conv_bn(32, 64, 2)
        self.enc3 = _conv_bn(64, channels, 2)
        self.enc4 = _conv_bn(channels, 2 * channels, 2)
        self.up = nn.Conv2d(2 * channels, channels, 1)
        self.dec = _conv_bn(2 * channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e3 = self.enc3(self.enc2(self.enc1(x)))
        e4 = self.enc4(e3)
        up = F.interpolate(self.up(e4), size=e3.shape[-2:], mode="bilinear", align_corners=False)
        return self.dec(torch.cat([e3, up], dim=1))


def check_trunk(name: str) -> str:
    """`name` if it is a built-in trunk or a timm CNN, else ConfigError listing the choices."""
    if name in OWN_TRUNKS:
        return name
    try:
        return timm_backbones.check_cnn_trunk(name)
    except ConfigError:
        raise ConfigError(f"unknown trunk {name!r}; valid choices: {', '.join(TRUNKS)} "
                          "(or any other timm CNN name)") from None


class TimmTrunk(nn.Module):
    """A timm CNN up to its stage `stage` (1-based, as fer_lib.models' layers; 3 = resnet18's layer2 or
    lite0's blocks.2, stride 8), later blocks and head removed, returning the stage's map (B,C,h,w).

    pretrained: False, or "imagenet" / True with `weights` (a timm state dict file): the weights are
    loaded into the whole network exactly as fer_lib's timm family does (offline for the lite models),
    before the unused blocks are cut.
    """

    def __init__(self, in_chans: int = 3, name: str = "resnet18", stage: int = 3, pretrained: bool | str = False,
                 weights: Any = None, allow_download: bool = False):
        super().__init__()
        names = timm_backbones.stage_names(name)
        if not isinstance(stage, int) or not 1 <= stage <= len(names):
            raise ConfigError(f"trunk_stage must be a stage number 1..{len(names)} of {name} "
                              f"({', '.join(f'{i + 1}={n}' for i, n in enumerate(names))}), got {stage!r}")
        if pretrained:
            spec = ModelSpec(backbone=name, num_classes=7, image_size=224, pretrained=pretrained, weights=weights,
                             in_chans=in_chans, allow_download=allow_download, tap_names=[names[-1]])
            body = timm_backbones.build(spec).net
        else:
            body = timm.create_model(name, pretrained=False, in_chans=in_chans, num_classes=7)
        body.prune_intermediate_layers([stage - 1], prune_head=True)
        self.body, self.stage, self.stage_name = body, stage, names[stage - 1]
        self.out_channels = int(body.feature_info[stage - 1]["num_chs"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body.forward_intermediates(x, indices=[self.stage - 1], intermediates_only=True)[-1]


class SeparateLocalNets(nn.Module):
    """One small CNN per region, all run at once as grouped convolutions over the stacked crops."""

    def __init__(self, n_regions: int, in_chans: int = 3, channels: Sequence[int] = (16, 32, 64)):
        super().__init__()
        self.n_regions = n_regions
        layers, cin = [], in_chans
        for i, c in enumerate(channels):
            layers.append(_conv_bn(cin * n_regions, c * n_regions, stride=2 if i < 3 else 1, groups=n_regions))
            cin = c
        self.body = nn.Sequential(*layers)
        self.out_channels = cin

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        """(B, R*in, s, s) stacked crops -> (B, R, C) one pooled feature per region."""
        f = self.body(crops).mean(dim=(2, 3))
        return f.view(f.shape[0], self.n_regions, self.out_channels)


class RegionLinear(nn.Module):
    """A separate linear layer per region: (B,R,cin) -> (B,R,cout)."""

    def __init__(self, n_regions: int, cin: int, cout: int, zero: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_regions, cin, cout))
        self.bias = nn.Parameter(torch.zeros(n_regions, cout))
        if not zero:  # as nn.Linear: U(-1/sqrt(cin), 1/sqrt(cin))
            bound = 1.0 / math.sqrt(cin)
            nn.init.uniform_(self.weight, -bound, bound)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("brc,rcd->brd", x, self.weight) + self.bias


class NonLocalRegionAttention(nn.Module):
    """Region weights from region embeddings and the global embedding: non-local block + scorer + softmax.

    forward(tokens (B,R,D), global (B,D)) -> weights (B,1,g,g), softmax over the R = g*g regions.
    """

    def __init__(self, dim: int, grid: int, temperature: float = 1.0):
        super().__init__()
        self.grid = grid
        self.temperature = float(temperature)
        self.position = nn.Parameter(torch.zeros(1, grid * grid + 1, dim))
        nn.init.trunc_normal_(self.position, std=0.02)
        inner = max(dim // 2, 8)
        self.theta = nn.Linear(dim, inner)
        self.phi = nn.Linear(dim, inner)
        self.g = nn.Linear(dim, inner)
        self.out = nn.Linear(inner, dim)
        self.norm = nn.LayerNorm(dim)
        self.score_hidden = nn.Linear(2 * dim, dim)
        self.score = nn.Linear(dim, 1)
        nn.init.zeros_(self.score.weight)  # uniform weights (1/R) at the start
        nn.init.zeros_(self.score.bias)

    def scores(self, tokens: torch.Tensor, global_embedding: torch.Tensor) -> torch.Tensor:
        """Unnormalised region scores (B,R)."""
        seq = torch.cat([global_embedding[:, None], tokens], dim=1) + self.position
        q, k, v = self.theta(seq), self.phi(seq), self.g(seq)
        affinity = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
        seq = self.norm(seq + self.out(affinity @ v))  # non-local block with a residual connection
        regions, glob = seq[:, 1:], seq[:, :1].expand(-1, tokens.shape[1], -1)
        hidden = F.gelu(self.score_hidden(torch.cat([regions, glob], dim=-1)))
        return self.score(hidden).squeeze(-1)

    def forward(self, tokens: torch.Tensor, global_embedding: torch.Tensor) -> torch.Tensor:
        s = self.scores(tokens, global_embedding).float() / self.temperature
        w = torch.softmax(s, dim=1).to(tokens.dtype)
        return w.view(w.shape[0], 1, self.grid, self.grid)


def split_regions(x: torch.Tensor, grid: int) -> torch.Tensor:
    """(B,C,S,S) -> (B, grid*grid*C, S/grid, S/grid): the grid cells stacked on the channel axis, row-major.

    Sides that are not a multiple of `grid` are resized up to the next multiple first.
    """
    b, c, h, w = x.shape
    hh, ww = math.ceil(h / grid) * grid, math.ceil(w / grid) * grid
    if (hh, ww) != (h, w):
        x = F.interpolate(x, size=(hh, ww), mode="bilinear", align_corners=False)
    sh, sw = hh // grid, ww // grid
    cells = x.view(b, c, grid, sh, grid, sw).permute(0, 2, 4, 1, 3, 5)
    return cells.reshape(b, grid * grid * c, sh, sw)


@dataclass
class LNLOptions:
    """LNLAttenNet's architecture: local networks ("separate" per region or "shared" on the trunk), trunk
    ("conv", "unet" or a timm CNN name, run up to its stage `trunk_stage`, 1-based), region grid side (4 = the paper's 16 regions), embedding dim,
    channels, region votes, attention temperature and dropout. Invalid values fail listing the choices."""

    local: str = "separate"
    trunk: str = "conv"
    grid: int = 4
    dim: int = 128
    trunk_channels: int = 128
    local_channels: Sequence[int] = (16, 32, 64)
    votes: bool = True
    temperature: float = 1.0
    dropout: float = 0.0
    trunk_stage: int = 3

    def __post_init__(self) -> None:
        check_trunk(self.trunk)
        check_choice("local", self.local, LOCAL_MODES)
        if not isinstance(self.grid, int) or not 2 <= self.grid <= 8:
            raise ConfigError(f"grid must be an integer in 2..8 (4 = the paper's 16 regions), got {self.grid!r}")
        for name in ("dim", "trunk_channels"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 8:
                raise ConfigError(f"{name} must be an integer >= 8, got {getattr(self, name)!r}")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ConfigError(f"temperature must be a number > 0, got {self.temperature!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")


class LNLAttenNet(nn.Module):
    """Local multi-network ensemble + non-local region attention + global branch (TappedModel contract)."""

    def __init__(self, num_classes: int = 7, in_chans: int = 3, options: "LNLOptions | None" = None,
                 tap_names: Sequence[str] = ("region_attention",), config: dict[str, Any] | None = None,
                 trunk_pretrained: bool | str = False, trunk_weights: Any = None, allow_download: bool = False):
        """trunk_pretrained / trunk_weights / allow_download: a timm trunk's starting weights (TimmTrunk)."""
        super().__init__()
        o = options or LNLOptions()
        local, trunk, grid, dim, trunk_channels = o.local, o.trunk, o.grid, o.dim, o.trunk_channels
        local_channels, votes, temperature, dropout = tuple(o.local_channels), o.votes, o.temperature, o.dropout
        self.grid, self.n_regions, self.local_mode = grid, grid * grid, local
        if trunk == "conv":
            self.trunk: nn.Module = ConvTrunk(in_chans, trunk_channels)
        elif trunk == "unet":
            self.trunk = UNetTrunk(in_chans, trunk_channels)
        else:
            self.trunk = TimmTrunk(in_chans, trunk, o.trunk_stage, pretrained=trunk_pretrained,
                                   weights=trunk_weights, allow_download=allow_download)
        tc = self.trunk.out_channels
        if local == "separate":
            self.local_nets: nn.Module | None = SeparateLocalNets(self.n_regions, in_chans, local_channels)
            local_in = self.local_nets.out_channels
        else:
            self.local_nets = None
            local_in = tc
        self.region_heads = RegionLinear(self.n_regions, local_in, dim)
        self.global_head = nn.Sequential(nn.Linear(tc, dim), nn.ReLU(inplace=True))
        self.region_attention = NonLocalRegionAttention(dim, grid, temperature)
        self.region_votes = RegionLinear(self.n_regions, dim, num_classes) if votes else None
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(2 * dim, num_classes)
        self.tap_names = list(tap_names)
        bad = [n for n in self.tap_names if n not in LNL_STAGES]
        if bad or not self.tap_names or self.tap_names[0] != "region_attention":
            raise ConfigError(f"tap_names must start with 'region_attention' and use {', '.join(LNL_STAGES)}; "
                              f"got {self.tap_names}")
        self.config = dict(config or {})

    @property
    def net(self) -> nn.Module:
        """The model itself (TappedModel's `.net`; there is no separate timm classifier inside)."""
        return self

    def tap_modules(self) -> list[nn.Module]:
        """The tapped modules, region attention first (forward hooks give the tapped outputs)."""
        return [getattr(self, n) for n in self.tap_names]

    def to_spatial(self, output: torch.Tensor) -> torch.Tensor:
        """A tapped output as (B,C,h,w): identity for maps; (B,R) weights or (B,R,D) tokens -> grid."""
        if output.ndim == 4:
            return output
        if output.ndim == 2 and output.shape[1] == self.n_regions:
            return output.view(output.shape[0], 1, self.grid, self.grid)
        if output.ndim == 3 and output.shape[1] == self.n_regions:
            return output.transpose(1, 2).reshape(output.shape[0], output.shape[2], self.grid, self.grid)
        raise ValueError(f"cannot make a (B,C,h,w) map of shape {tuple(output.shape)}")

    def forward_details(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """All intermediate results: logits, weights (B,1,g,g), region_logits (B,R,K) or None, trunk map."""
        if x.ndim != 4:
            raise ValueError(f"expected images (B,C,H,W), got shape {tuple(x.shape)}")
        feat = self.trunk(x)
        if self.local_nets is not None:
            local = self.local_nets(split_regions(x, self.grid))
        else:
            local = F.adaptive_avg_pool2d(feat, self.grid).flatten(2).transpose(1, 2)  # (B,R,C) row-major
        tokens = F.relu(self.region_heads(local))
        glob = self.global_head(feat.mean(dim=(2, 3)))
        weights = self.region_attention(tokens, glob)
        w = weights.flatten(1)
        fused = torch.cat([(w[:, :, None] * tokens).sum(dim=1), glob], dim=1)
        logits = self.head(self.dropout(fused))
        region_logits = None
        if self.region_votes is not None:
            region_logits = self.region_votes(tokens)
            logits = logits + (w[:, :, None] * region_logits).sum(dim=1)
        return {"logits": logits, "weights": weights, "region_logits": region_logits, "trunk": feat}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(logits, [region weights (B,1,g,g), then the other tapped maps])."""
        d = self.forward_details(x)
        maps = {"region_attention": d["weights"], "trunk": d["trunk"]}
        return d["logits"], [maps[n] for n in self.tap_names]

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Logits only."""
        return self.forward_details(x)["logits"]

    def region_weights(self, x: torch.Tensor) -> torch.Tensor:
        """(B, R) region weights (row-major over the grid, each row sums to 1)."""
        return self.forward_details(x)["weights"].flatten(1)


def lnl_layers(layers: Sequence[str | int] | str | int = ("last",)) -> list[str]:
    """Resolve layer specs to tap names, region attention first (aliases: regions, trunk, global)."""
    if isinstance(layers, (str, int)):
        layers = [layers]
    specs = [_ALIASES.get(s, s) if isinstance(s, str) else s for s in layers]
    names = resolve_stage_names(LNL_STAGES, specs) if specs else []
    return ["region_attention"] + [n for n in names if n != "region_attention"]


def _load_state(model: nn.Module, path: str | os.PathLike) -> None:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"weights file not found: {path}")
    obj = load_file(path)  # plain data only: a file that would unpickle code is refused
    if isinstance(obj, dict) and isinstance(obj.get("model_state"), dict):
        obj = obj["model_state"]
    if not isinstance(obj, dict):
        raise ConfigError(f"{path} does not hold a state dict")
    try:
        model.load_state_dict(obj)
    except RuntimeError as exc:
        raise ConfigError(f"weights in {path} do not fit this LNLAttenNet: {exc}") from exc


_ARCH_OPTIONS = tuple(f.name for f in dataclasses.fields(LNLOptions) if f.name not in ("local", "trunk"))


def build_lnlattennet(num_classes: int = 7, image_size: int = 112, layers: Sequence[str | int] | str | int = ("last",),
                      backbone: str = "lnlattennet", **options: Any) -> LNLAttenNet:
    """Build an LNLAttenNet; `backbone` (one of LNL_BACKBONES) sets local/trunk unless given explicitly.

    options: the fields of LNLOptions (local, trunk, grid=4, dim=128, trunk_channels=128,
    local_channels=(16, 32, 64), votes=True, temperature=1.0, dropout=0.0, trunk_stage=3) and
    pretrained: True with weights (a local LNLAttenNet checkpoint), or "imagenet" (a timm trunk starts
    from its ImageNet weights, e.g. backbone="lnlattennet_shared_lite0"; the rest starts fresh);
    allow_download, in_chans, class_names, mean, std. Invalid values fail at once.
    """
    check_choice("backbone", backbone, LNL_BACKBONES)
    variant = LNL_VARIANTS[backbone]
    trunk = options.pop("trunk", None) or variant["trunk"]
    local = options.pop("local", None) or variant["local"]
    if trunk == variant["trunk"] and "trunk_stage" in variant:
        options.setdefault("trunk_stage", variant["trunk_stage"])
    check_trunk(trunk)
    check_choice("local", local, LOCAL_MODES)
    build = {k: options.pop(k) for k in ("pretrained", "weights", "in_chans", "class_names", "mean", "std",
                                         "allow_download") if k in options}
    unknown = [k for k in options if k not in _ARCH_OPTIONS]
    if unknown:
        raise ConfigError(f"unknown LNLAttenNet option(s) {unknown}; valid options: {', '.join(_ARCH_OPTIONS)}")
    grid = options.get("grid", 4)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    arch = LNLOptions(local=local, trunk=trunk, **options)
    if not isinstance(image_size, int) or image_size < 8 * grid:
        raise ConfigError(f"image_size must be an integer >= {8 * grid} for a {grid}x{grid} grid, got {image_size!r}")
    weights, pretrained = build.get("weights"), build.get("pretrained", False)
    imagenet = isinstance(pretrained, str) and pretrained.lower() == "imagenet"
    if imagenet and trunk in OWN_TRUNKS:
        raise ConfigError(f"pretrained='imagenet' needs a timm trunk (e.g. backbone='lnlattennet_shared_lite0' or "
                          f"trunk='tf_efficientnet_lite0'); trunk {trunk!r} has no ImageNet weights")
    if pretrained and not imagenet and weights is None:
        raise ConfigError("pretrained=True needs weights=<path to a local LNLAttenNet checkpoint>: "
                          "this project never downloads weights")
    class_names = build.get("class_names")
    if class_names is None:
        class_names = list(EXPRESSIONS) if num_classes == len(EXPRESSIONS) else [f"class_{i}" for i in range(num_classes)]
    if len(class_names) != num_classes:
        raise ConfigError(f"{len(class_names)} class_names for num_classes={num_classes}")
    in_chans, mean, std = build.get("in_chans", 3), build.get("mean"), build.get("std")
    if trunk not in OWN_TRUNKS and (mean is None or std is None):  # the trunk's own pretrained normalisation
        trunk_mean, trunk_std = timm_backbones.pretrained_normalisation(trunk)
        mean, std = (trunk_mean if mean is None else mean), (trunk_std if std is None else std)
    config = {
        "backbone": backbone, "num_classes": num_classes,
        "layers": [str(l) for l in ([layers] if isinstance(layers, (str, int)) else layers)],
        "tap_names": lnl_layers(layers), "image_size": image_size, "class_names": list(class_names),
        "mean": list(mean if mean is not None else (0.485, 0.456, 0.406)),
        "std": list(std if std is not None else (0.229, 0.224, 0.225)),
        "in_chans": in_chans, "pretrained": "imagenet" if imagenet else bool(pretrained),
        "lnl_options": {"local": local, "trunk": trunk, **{
            k: (list(v) if isinstance(v, tuple) else v) for k, v in options.items()}},
    }
    model = LNLAttenNet(num_classes=num_classes, in_chans=in_chans, options=arch, tap_names=config["tap_names"],
                        config=config, trunk_pretrained="imagenet" if imagenet else False,
                        allow_download=bool(build.get("allow_download", False)))
    if weights is not None:
        _load_state(model, weights)
    return model


def lnl_from_config(model_config: dict[str, Any]) -> LNLAttenNet:
    """Rebuild an LNLAttenNet (untrained) from a checkpoint's `model_config`, options included."""
    opts = dict(model_config.get("lnl_options", {}))
    model = build_lnlattennet(num_classes=model_config["num_classes"], image_size=model_config["image_size"],
                              layers=model_config["tap_names"], backbone=model_config["backbone"],
                              in_chans=model_config.get("in_chans", 3), class_names=model_config.get("class_names"),
                              mean=model_config.get("mean"), std=model_config.get("std"), **opts)
    model.config["layers"] = list(model_config.get("layers", model.config["layers"]))
    return model


def _build_from_spec(spec: ModelSpec) -> LNLAttenNet:
    if spec.output_stride is not None:
        raise ConfigError(f"{spec.backbone} takes no output_stride")
    return build_lnlattennet(backbone=spec.backbone, num_classes=spec.num_classes, layers=spec.layers,
                             image_size=spec.image_size, pretrained=spec.pretrained, weights=spec.weights,
                             allow_download=spec.allow_download,
                             in_chans=spec.in_chans, class_names=spec.class_names, mean=spec.mean, std=spec.std,
                             **spec.options)


def _normalisation(backbone: str) -> tuple[list[float], list[float]]:
    """A timm trunk's pretrained (mean, std) (0.5/0.5 for lite0); ImageNet's for the built-in trunks."""
    trunk = LNL_VARIANTS[backbone]["trunk"]
    if trunk in OWN_TRUNKS:
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    return timm_backbones.pretrained_normalisation(trunk)


register_family(ModelFamily(
    name="lnlattennet", build=_build_from_spec, stages=lambda backbone: LNL_STAGES,
    min_image_size=lambda backbone: 32,  # the default 4x4 region grid needs 8 px per region
    names=LNL_BACKBONES, from_config=lnl_from_config, checks_own_size=True, normalisation=_normalisation))


def region_grid_targets(au_maps: torch.Tensor, grid: int = 4) -> torch.Tensor:
    """AU maps (B,1,H,W) area-pooled to the region grid and normalised to sum 1: (B, grid*grid)."""
    pooled = F.adaptive_avg_pool2d(au_maps.float(), grid).flatten(1)
    return pooled / pooled.sum(dim=1, keepdim=True).clamp_min(1e-8)


# --------------------------------------------------------------------------- analysis
@torch.no_grad()
def collect_region_weights(model: LNLAttenNet, dataset: Any, batch_size: int = 64,
                           device: str | torch.device = "cpu", progress: bool = True) -> dict[str, Any]:
    """Region weights of every dataset item with its label, AU map pooled to the grid and validity.

    Returns numpy arrays: weights (N,R), au_grid (N,R) (area-pooled AU map, not normalised),
    labels (N,), valid (N,) (landmarks found and a class with AUs), pred (N,), and the grid side.
    """
    import numpy as np
    from torch.utils.data import DataLoader

    from fer_lib.utils import progress_bar


    if not isinstance(model, LNLAttenNet):
        raise ConfigError(f"collect_region_weights needs an LNLAttenNet, got {type(model).__name__}")
    device = torch.device(device)
    was_training = model.training
    model.eval().to(device)
    out: dict[str, list] = {"weights": [], "au_grid": [], "labels": [], "valid": [], "pred": []}
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for images, labels, au_maps, has_lm in progress_bar(loader, desc="region weights", leave=False,
                                                        disable=not progress):
        d = model.forward_details(images.to(device))
        out["weights"].append(d["weights"].flatten(1).float().cpu())
        out["pred"].append(d["logits"].argmax(1).cpu())
        out["au_grid"].append(F.adaptive_avg_pool2d(au_maps.float(), model.grid).flatten(1))
        out["labels"].append(labels)
        out["valid"].append(valid_map_mask(au_maps, has_lm))
    model.train(was_training)
    if not out["weights"]:
        raise ValueError("the dataset is empty: no region weights to collect")
    result: dict[str, Any] = {k: torch.cat(v).numpy() for k, v in out.items()}
    result["grid"] = model.grid
    result["labels"] = result["labels"].astype(np.int64)
    result["valid"] = result["valid"].astype(bool)
    return result


def codebook_agreement(collected: dict[str, Any], class_names: Sequence[str]) -> Any:
    """Per class (and overall): do the learned region weights sit where the class's AUs are?

    Columns: n, n_valid; pearson_class_mean (Pearson r over the grid cells between the class-mean
    region weights and the class-mean AU map pooled to the grid); cos_class_mean (their cosine);
    att_cos_layer (mean per-sample cosine between weights and pooled AU map, valid samples: the
    ATT-COS of the region weights at grid resolution); uniform_cos (what uniform weights score:
    the chance level); top_cell_hit (share of valid samples whose highest-weight region is among
    the 4 regions with most AU mass); pearson_class_contrast (Pearson r between the class-mean
    weights minus the mean over classes and the class-mean AU map minus the mean over classes:
    class-specific agreement, free of the shared "the face centre matters" layout; the "all" row
    of the two class-mean columns averages the classes). Classes without AUs (neutral) get NaN map columns.
    """
    import numpy as np
    import pandas as pd

    w, au, labels, valid = (np.asarray(collected[k]) for k in ("weights", "au_grid", "labels", "valid"))
    if w.shape != au.shape or w.shape[0] != labels.shape[0]:
        raise ValueError(f"inconsistent arrays: weights {w.shape}, au_grid {au.shape}, labels {labels.shape}")

    def cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)

    def pearson(a: np.ndarray, b: np.ndarray) -> float:
        if a.std() < 1e-12 or b.std() < 1e-12:
            return float("nan")
        return float(np.corrcoef(a, b)[0, 1])

    top4 = np.argsort(-au, axis=1)[:, :4]
    hit = np.array([w[i].argmax() in top4[i] for i in range(len(w))])
    per_sample_cos = cos(w, au)
    uniform_cos = cos(np.ones_like(au), au)
    rows = []
    groups = [(name, labels == k) for k, name in enumerate(class_names)] + [("all", np.ones_like(valid))]
    for name, sel in groups:
        v = sel & valid
        row = {"class": name, "n": int(sel.sum()), "n_valid": int(v.sum())}
        if v.any():
            mw, ma = w[v].mean(0), au[v].mean(0)
            row.update(pearson_class_mean=pearson(mw, ma) if name != "all" else float("nan"),
                       cos_class_mean=float(cos(mw, ma)) if name != "all" else float("nan"),
                       att_cos_layer=float(per_sample_cos[v].mean()), uniform_cos=float(uniform_cos[v].mean()),
                       top_cell_hit=float(hit[v].mean()))
        else:
            row.update(pearson_class_mean=float("nan"), cos_class_mean=float("nan"), att_cos_layer=float("nan"),
                       uniform_cos=float("nan"), top_cell_hit=float("nan"))
        rows.append(row)
    means = {name: (w[sel & valid].mean(0), au[sel & valid].mean(0)) for name, sel in groups[:-1] if (sel & valid).any()}
    if len(means) >= 2:
        w_avg = np.mean([m[0] for m in means.values()], axis=0)
        a_avg = np.mean([m[1] for m in means.values()], axis=0)
        for row in rows:
            if row["class"] in means:
                mw, ma = means[row["class"]]
                row["pearson_class_contrast"] = pearson(mw - w_avg, ma - a_avg)
    for row in rows:
        row.setdefault("pearson_class_contrast", float("nan"))
    table = pd.DataFrame(rows).set_index("class")
    classes = table.drop(index="all")
    table.loc["all", "pearson_class_mean"] = float(classes["pearson_class_mean"].mean(skipna=True)) \
        if classes["pearson_class_mean"].notna().any() else float("nan")
    for col in ("pearson_class_contrast",):
        table.loc["all", col] = float(classes[col].mean(skipna=True)) if classes[col].notna().any() else float("nan")
    table.loc["all", "cos_class_mean"] = float(classes["cos_class_mean"].mean(skipna=True)) \
        if classes["cos_class_mean"].notna().any() else float("nan")
    return table


def class_mean_grids(collected: dict[str, Any], class_names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per class: mean region weights and mean pooled AU map (valid samples for the map), as (g,g) arrays."""
    import numpy as np

    g = int(collected["grid"])
    w, au, labels, valid = (np.asarray(collected[k]) for k in ("weights", "au_grid", "labels", "valid"))
    out = {}
    for k, name in enumerate(class_names):
        sel = labels == k
        out[name] = {"weights": w[sel].mean(0).reshape(g, g) if sel.any() else np.full((g, g), np.nan),
                     "au": au[sel & valid].mean(0).reshape(g, g) if (sel & valid).any() else np.zeros((g, g))}
    return out


def measure_throughput(models: dict[str, nn.Module], image_size: int = 112, batch_size: int = 32,
                       repeats: int = 3, train: bool = False, seed: int = 0) -> dict[str, float]:
    """Images/s of each model on one random batch, measured round-robin in one run (fair under CPU contention).

    train=True times forward + backward + an SGD step (it changes the weights: pass freshly built
    models, not trained ones); False times inference (no grad). Reported
    per model as the best of `repeats` rounds (the least disturbed by other processes).
    """
    import time

    if repeats < 1 or batch_size < 1:
        raise ConfigError(f"repeats and batch_size must be >= 1, got {repeats}, {batch_size}")
    g = torch.Generator().manual_seed(seed)
    best = {name: 0.0 for name in models}
    for m in models.values():
        m.train(train)
    x_by = {name: torch.randn(batch_size, int(getattr(m, "config", {}).get("in_chans", 3)), image_size, image_size,
                              generator=g).to(next(m.parameters()).device) for name, m in models.items()}
    opts = {name: torch.optim.SGD(m.parameters(), lr=1e-4) for name, m in models.items()} if train else {}

    def step(name: str) -> None:
        m, x = models[name], x_by[name]
        if train:
            out = m(x)
            logits = out[0] if isinstance(out, tuple) else out
            loss = logits.float().logsumexp(1).mean()
            opts[name].zero_grad()
            loss.backward()
            opts[name].step()
        else:
            with torch.no_grad():
                out = m(x)

    for name in models:  # warm-up
        step(name)
    for _ in range(repeats):
        for name in models:
            if x_by[name].is_cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(name)
            if x_by[name].is_cuda:
                torch.cuda.synchronize()
            best[name] = max(best[name], batch_size / (time.perf_counter() - t0))
    return best
