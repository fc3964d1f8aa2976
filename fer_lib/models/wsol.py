"""Trained interpretable classifiers of the paper's Table 1 (Belharbi et al., FG 2024), as model families.

Each method is a head (or a training-time layer) on a timm CNN trunk, and each exposes its own class
activation maps, `class_maps(x) -> (B, C, h, w)`, which CAM-COS uses (fer_lib.analysis.interpret):

    wildcat  WILDCAT: multi-map class pooling (Durand et al., "WILDCAT: Weakly Supervised Learning of
             Deep ConvNets for Image Classification, Pointwise Localization and Segmentation", CVPR 2017)
    acol     ACoL: adversarial complementary learning (Zhang et al., "Adversarial Complementary Learning
             for Weakly Supervised Object Localization", CVPR 2018)
    prm      PRM: peak response maps (Zhou et al., "Weakly Supervised Instance Segmentation using Class
             Peak Response", CVPR 2018)
    adl      ADL: attention-based dropout layer (Choe & Shim, "Attention-based Dropout Layer for Weakly
             Supervised Object Localization", CVPR 2019)
    cutmix   CutMix: the plain CAM model trained on images with a pasted patch of another image, labels
             mixed by area (Yun et al., "CutMix: Regularization Strategy to Train Strong Classifiers with
             Localizable Features", ICCV 2019); the training step mixes the batch (`cutmix_batch`)
    tscam    TS-CAM on a ViT: token semantic coupled attention maps (Gao et al., "TS-CAM: Token Semantic
             Coupled Attention Map for Weakly Supervised Object Localization", ICCV 2021)
    apvit    APViT: a CNN's feature patches, attentive patch pooling, transformer blocks with attentive token
             pooling (Xue et al., "Vision Transformer with Attentive Pooling for Robust Facial Expression
             Recognition", IEEE TAC 2022); here on any timm CNN with a small transformer trained from scratch

A model name is the method alone (on the paper's ResNet50) or `method:trunk`, e.g.
`wildcat:tf_efficientnet_lite0` (any timm CNN; its ImageNet weights load as for the timm family). Layers
are the trunk's stages (`available_layers("wildcat:resnet18")`), so AU guidance taps the same maps as
for the plain backbone. A method with a second objective (ACoL's erased branch) adds it through
`aux_loss(labels)`, computed from the last forward pass.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fer_lib.models import timm_backbones
from fer_lib.models.registry import ModelFamily, ModelSpec, register_family
from fer_lib.models.tapped import TappedModel
from fer_lib.utils import ConfigError

DEFAULT_TRUNK = "resnet50"  # the paper's backbone
DEFAULT_VIT = "deit_small_patch16_224"  # TS-CAM's


def split_name(name: str) -> tuple[str, str]:
    """'wildcat:resnet18' -> ('wildcat', 'resnet18'); 'wildcat' -> ('wildcat', DEFAULT_TRUNK)."""
    method, _, trunk = name.partition(":")
    return method, trunk or (DEFAULT_VIT if method == "tscam" else DEFAULT_TRUNK)


def _gap_logits(maps: torch.Tensor) -> torch.Tensor:
    return maps.mean(dim=(2, 3))


class WildcatHead(nn.Module):
    """M maps per class (1x1 conv), averaged per class; a class score is the mean of its k highest
    locations plus alpha times the mean of its k lowest (k = a fraction of the locations)."""

    def __init__(self, in_channels: int, num_classes: int, modalities: int = 4, k: float = 0.1, alpha: float = 0.6):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, num_classes * modalities, 1)
        self.num_classes, self.modalities, self.k, self.alpha = num_classes, modalities, k, alpha

    def maps(self, feats: torch.Tensor) -> torch.Tensor:
        m = self.conv(feats)
        return m.view(m.shape[0], self.num_classes, self.modalities, *m.shape[2:]).mean(dim=2)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        flat = self.maps(feats).flatten(2)
        k = max(1, int(round(self.k * flat.shape[-1])))
        top = flat.topk(k, dim=-1).values.mean(-1)
        low = flat.topk(k, dim=-1, largest=False).values.mean(-1)
        return top + self.alpha * low


class PeakHead(nn.Module):
    """Class response maps (1x1 conv); a class score is the mean of the map's local peaks (3x3 maxima)."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, num_classes, 1)

    def maps(self, feats: torch.Tensor) -> torch.Tensor:
        return self.conv(feats)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        crm = self.maps(feats)
        peaks = (crm == F.max_pool2d(crm, 3, stride=1, padding=1)).to(crm.dtype)
        return (crm * peaks).sum(dim=(2, 3)) / peaks.sum(dim=(2, 3)).clamp_min(1.0)


class ACoLHead(nn.Module):
    """Two classifiers (1x1 conv + GAP): A on the features, B on the features with A's most
    discriminative region of the predicted class erased (normalised map >= delta). Logits are A's;
    `aux_loss` is B's cross-entropy, so B learns the complementary regions; the CAM is max(A, B)."""

    def __init__(self, in_channels: int, num_classes: int, delta: float = 0.6):
        super().__init__()
        self.a = nn.Conv2d(in_channels, num_classes, 1)
        self.b = nn.Conv2d(in_channels, num_classes, 1)
        self.delta = delta
        self._logits_b: torch.Tensor | None = None

    def _erased(self, feats: torch.Tensor, maps_a: torch.Tensor) -> torch.Tensor:
        cls = maps_a.mean(dim=(2, 3)).argmax(dim=1).detach()
        m = maps_a[torch.arange(len(cls)), cls].detach()
        lo, hi = m.flatten(1).amin(1)[:, None, None], m.flatten(1).amax(1)[:, None, None]
        keep = ((m - lo) / (hi - lo).clamp_min(1e-6)) < self.delta
        return feats * keep[:, None].to(feats.dtype)

    def maps(self, feats: torch.Tensor) -> torch.Tensor:
        maps_a = self.a(feats)
        maps_b = self.b(self._erased(feats, maps_a))
        return torch.maximum(_minmax(maps_a), _minmax(maps_b))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        maps_a = self.a(feats)
        self._logits_b = _gap_logits(self.b(self._erased(feats, maps_a)))
        return _gap_logits(maps_a)

    def aux_loss(self, labels: torch.Tensor) -> torch.Tensor:
        if self._logits_b is None:
            raise RuntimeError("aux_loss needs a forward pass first")
        return F.cross_entropy(self._logits_b, labels)


def _minmax(maps: torch.Tensor) -> torch.Tensor:
    flat = maps.flatten(2)
    lo, hi = flat.amin(-1)[..., None, None], flat.amax(-1)[..., None, None]
    return (maps - lo) / (hi - lo).clamp_min(1e-6)


class ADL(nn.Module):
    """Attention-based dropout on a stage's output, in training only: with probability `drop_rate` the
    most attended locations (channel-mean attention >= gamma * its max) are dropped, else the features
    are weighted by the sigmoid of the attention."""

    def __init__(self, drop_rate: float = 0.75, gamma: float = 0.9):
        super().__init__()
        self.drop_rate, self.gamma = drop_rate, gamma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        att = x.mean(dim=1, keepdim=True)
        peak = att.flatten(1).amax(1)[:, None, None, None]
        drop = (att < self.gamma * peak).to(x.dtype)
        importance = torch.sigmoid(att)
        use_drop = (torch.rand(x.shape[0], 1, 1, 1, device=x.device) < self.drop_rate).to(x.dtype)
        return x * (use_drop * drop + (1 - use_drop) * importance)


class CAMHead(nn.Module):
    """The plain CAM head: global average pooling + Linear; maps = the Linear's weights x the features."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_channels, num_classes)

    def maps(self, feats: torch.Tensor) -> torch.Tensor:
        return torch.einsum("kc,bchw->bkhw", self.fc.weight, feats) + self.fc.bias[None, :, None, None]

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.fc(feats.mean(dim=(2, 3)))


class WSOLNet(nn.Module):
    """A timm CNN trunk (its classifier removed) and a method's head; ADL layers on chosen trunk stages;
    `mixing` = (alpha, p) where the training step mixes batches (CutMix)."""

    mixing: tuple[float, float] | None = None

    def __init__(self, trunk: nn.Module, head: nn.Module, adl_stages: Sequence[str] = ()):
        super().__init__()
        self.trunk, self.head = trunk, head
        modules = dict(trunk.named_modules())
        self.adl = nn.ModuleDict({name.replace(".", "_"): ADL() for name in adl_stages})
        for name in adl_stages:
            modules[name].register_forward_hook(self._adl_hook(name.replace(".", "_")))

    def _adl_hook(self, key: str):
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
            return self.adl[key](output)
        return hook

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    @torch.no_grad()
    def class_maps(self, x: torch.Tensor) -> torch.Tensor:
        """The method's own class activation maps (B, C, h, w) at the trunk's last stage."""
        return self.head.maps(self.forward_features(x))

    def aux_loss(self, labels: torch.Tensor) -> torch.Tensor | None:
        """The method's second objective after a forward pass (ACoL), else None."""
        return self.head.aux_loss(labels) if hasattr(self.head, "aux_loss") else None


HEADS = {"wildcat": WildcatHead, "acol": ACoLHead, "prm": PeakHead, "adl": CAMHead, "cutmix": CAMHead}
#: methods whose training step mixes the batch: (Beta alpha, probability of mixing a batch)
MIXING = {"cutmix": (1.0, 0.5)}


def cutmix_batch(images: torch.Tensor, au_maps: torch.Tensor, has_landmarks: torch.Tensor, alpha: float = 1.0,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                      torch.Tensor, float]:
    """CutMix a batch: a box of area share (1 - lam), lam ~ Beta(alpha, alpha), from a shuffled copy is
    pasted into every image, and into its AU map at the map's scale (a pasted face part brings its AU
    evidence). Returns (images, au_maps, has_landmarks, permutation, lam): the loss is
    lam * CE(labels) + (1 - lam) * CE(labels[permutation]), lam corrected to the box's true area."""
    b, _, h, w = images.shape
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(b, generator=generator, device="cpu").to(images.device)
    cut = (1.0 - lam) ** 0.5
    cy, cx = (torch.rand(2, generator=generator) * torch.tensor([h, w])).tolist()
    y0, y1 = int(max(cy - cut * h / 2, 0)), int(min(cy + cut * h / 2, h))
    x0, x1 = int(max(cx - cut * w / 2, 0)), int(min(cx + cut * w / 2, w))
    mixed = images.clone()
    mixed[:, :, y0:y1, x0:x1] = images[perm, :, y0:y1, x0:x1]
    mh, mw = au_maps.shape[-2:]
    maps = au_maps.clone()
    ys, xs = slice(y0 * mh // h, -(-y1 * mh // h)), slice(x0 * mw // w, -(-x1 * mw // w))
    maps[..., ys, xs] = au_maps[perm][..., ys, xs]
    lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    return mixed, maps, has_landmarks & has_landmarks[perm], perm, lam


def _check(name: str) -> tuple[str, str]:
    method, trunk = split_name(name)
    if method not in HEADS:
        raise ConfigError(f"unknown method {method!r}; valid: {', '.join(HEADS)}")
    timm_backbones.check_cnn_trunk(trunk)
    return method, trunk


def _stages(name: str) -> tuple[str, ...]:
    return tuple(f"trunk.{s}" for s in timm_backbones.feature_table(_check(name)[1])[0])


def _plain_trunk(spec: ModelSpec, trunk_name: str) -> TappedModel:
    """The trunk as the timm family builds it for this spec (pretrained weights included), taps without
    the "trunk." prefix; the method's net then holds `.net` as its `trunk`."""
    return timm_backbones.build(ModelSpec(**{**vars(spec), "backbone": trunk_name, "options": {},
                                             "tap_names": [n[len("trunk."):] for n in spec.tap_names]}))


def _tapped(net: nn.Module, plain: TappedModel, spec: ModelSpec) -> TappedModel:
    """The method's net with hooks on the spec's taps; its config is the trunk's under the method's name."""
    return TappedModel(net, spec.tap_names, {**plain.config, "backbone": spec.backbone, "tap_names": list(spec.tap_names)})


def build(spec: ModelSpec) -> TappedModel:
    """Build `method[:trunk]`: the trunk as the timm family builds it (pretrained weights included),
    its classifier replaced by the method's head."""
    method, trunk_name = _check(spec.backbone)
    unknown = sorted(set(spec.options) - {"adl_stages"})
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown} for {method}; valid: adl_stages (adl only)")
    plain = _plain_trunk(spec, trunk_name)
    trunk = plain.net
    trunk.reset_classifier(0)
    in_channels = trunk.num_features
    adl_stages = list(spec.options.get("adl_stages", _stages(spec.backbone)[-2:])) if method == "adl" else []
    net = WSOLNet(trunk, HEADS[method](in_channels, spec.num_classes),
                  adl_stages=[s[len("trunk."):] if s.startswith("trunk.") else s for s in adl_stages])
    net.mixing = MIXING.get(method)
    return _tapped(net, plain, spec)


register_family(ModelFamily(
    name="wsol", build=build, stages=_stages, names=tuple(HEADS),
    accepts=lambda name: isinstance(name, str) and name.partition(":")[0] in HEADS and ":" in name,
    min_image_size=lambda name: timm_backbones.smallest_input(_check(name)[1]),
    normalisation=lambda name: timm_backbones.pretrained_normalisation(_check(name)[1])))


# --------------------------------------------------------------------------- TS-CAM (ViT)
class TSCAMNet(nn.Module):
    """A timm ViT whose patch tokens, as a map, go through a 3x3 conv to one semantic map per class
    (logits: their spatial mean); the CAM couples each class's semantic map with the class token's
    attention to the patches, averaged over heads and blocks."""

    def __init__(self, vit: nn.Module, num_classes: int):
        super().__init__()
        vit.reset_classifier(0)
        self.trunk = vit
        self.head = nn.Conv2d(vit.num_features, num_classes, 3, padding=1)
        self._attention: list[torch.Tensor] | None = None
        for block in vit.blocks:
            block.attn.fused_attn = False  # the softmax attention passes through attn_drop: recorded there
            block.attn.attn_drop.register_forward_hook(self._record)

    @property
    def num_prefix_tokens(self) -> int:  # the token layout TappedModel reads to reshape tapped blocks
        return self.trunk.num_prefix_tokens

    @property
    def patch_embed(self) -> nn.Module:
        return self.trunk.patch_embed

    @property
    def blocks(self) -> nn.Module:
        return self.trunk.blocks

    def _record(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if self._attention is not None:
            self._attention.append(output.detach())

    def _patch_map(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.trunk.forward_features(x)[:, self.trunk.num_prefix_tokens:]
        h, w = self.trunk.patch_embed.grid_size
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self._patch_map(x)).mean(dim=(2, 3))

    @torch.no_grad()
    def class_maps(self, x: torch.Tensor) -> torch.Tensor:
        self._attention = []
        try:
            semantic = self.head(self._patch_map(x)).clamp_min(0)
            prefix = self.trunk.num_prefix_tokens
            att = torch.stack(self._attention).mean(dim=(0, 2))[:, 0, prefix:]  # class token -> patches
        finally:
            self._attention = None
        return semantic * att.reshape(att.shape[0], 1, *semantic.shape[-2:])

    def aux_loss(self, labels: torch.Tensor) -> None:
        return None


def _check_vit(name: str) -> str:
    method, vit = split_name(name)
    if method != "tscam" or not timm_backbones.timm.is_model(vit) or not vit.startswith(("vit", "deit")):
        raise ConfigError(f"{name!r}: TS-CAM takes a timm ViT / DeiT, e.g. tscam:deit_tiny_patch16_224")
    return vit


def build_tscam(spec: ModelSpec) -> TappedModel:
    """Build `tscam[:vit]`: the ViT as the timm family builds it (pretrained weights included) + TS-CAM's head."""
    vit = _check_vit(spec.backbone)
    if spec.options:
        raise ConfigError(f"unknown option(s) {sorted(spec.options)} for tscam; it takes none")
    plain = _plain_trunk(spec, vit)
    return _tapped(TSCAMNet(plain.net, spec.num_classes), plain, spec)


register_family(ModelFamily(
    name="tscam", build=build_tscam, names=("tscam",),
    accepts=lambda name: isinstance(name, str) and name.startswith("tscam:"),
    stages=lambda name: tuple(f"trunk.{s}" for s in timm_backbones.feature_table(_check_vit(name))[0]),
    min_image_size=lambda name: timm_backbones.smallest_input(_check_vit(name)),
    normalisation=lambda name: timm_backbones.pretrained_normalisation(_check_vit(name))))


# --------------------------------------------------------------------------- APViT
class APViTNet(nn.Module):
    """APViT: the CNN trunk's last feature map as patch tokens; attentive patch pooling keeps the `keep`
    share of patches with the largest channel-mean attention; `depth` transformer blocks (timm's Block)
    with a class token, where attentive token pooling keeps the `token_keep` share of tokens that the class
    token attends to most after the middle block; the class token classifies. Its CAM: the class token's
    last attention, put back on the patch grid, times the patch attention."""

    def __init__(self, trunk: nn.Module, num_classes: int, dim: int = 192, depth: int = 4, heads: int = 3,
                 keep: float = 0.8, token_keep: float = 0.7):
        from timm.models.vision_transformer import Block

        super().__init__()
        trunk.reset_classifier(0)
        self.trunk, self.keep, self.token_keep = trunk, keep, token_keep
        self.proj = nn.Linear(trunk.num_features, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, 1024, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        for block in self.blocks:
            block.attn.fused_attn = False  # its softmax attention passes through attn_drop: read there
            block.attn.attn_drop.register_forward_hook(self._record)
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, num_classes)
        self._last_attention: torch.Tensor | None = None

    def _record(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        self._last_attention = output

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk.forward_features(x)

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]]:
        feats = self.forward_features(x)
        b, _, h, w = feats.shape
        patch_att = feats.mean(dim=1).flatten(1)  # (B, h*w)
        if h * w > self.pos.shape[1]:
            raise ConfigError(f"APViT takes at most {self.pos.shape[1]} patches; the trunk gives {h}x{w}")
        k = max(1, int(round(self.keep * h * w)))
        kept = patch_att.topk(k, dim=1).indices  # attentive patch pooling
        tokens = self.proj(feats.flatten(2).transpose(1, 2)) + self.pos[:, : h * w]
        tokens = torch.gather(tokens, 1, kept[..., None].expand(-1, -1, tokens.shape[-1]))
        z = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)
        for i, block in enumerate(self.blocks):
            z = block(z)
            if i == len(self.blocks) // 2 - 1:  # attentive token pooling after the middle block
                att = self._last_attention.mean(dim=1)[:, 0, 1:]  # class token -> tokens
                t = max(1, int(round(self.token_keep * att.shape[1])))
                top = att.topk(t, dim=1).indices
                z = torch.cat([z[:, :1], torch.gather(z[:, 1:], 1, top[..., None].expand(-1, -1, z.shape[-1]))], 1)
                kept = torch.gather(kept, 1, top)
        return self.norm(z[:, 0]), kept, patch_att, (h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self._encode(x)[0])

    @torch.no_grad()
    def class_maps(self, x: torch.Tensor) -> torch.Tensor:
        cls, kept, patch_att, (h, w) = self._encode(x)
        att = self._last_attention.mean(dim=1)[:, 0, 1:]  # the last block's class-token attention
        grid = torch.zeros_like(patch_att).scatter_(1, kept, att) * patch_att.clamp_min(0)
        scores = self.head(cls).softmax(dim=1)  # each class's map: the shared evidence map x its probability
        return scores[:, :, None, None] * grid.view(-1, 1, h, w)

    def aux_loss(self, labels: torch.Tensor) -> None:
        return None


def build_apvit(spec: ModelSpec) -> TappedModel:
    """Build `apvit[:cnn]`: the CNN trunk as the timm family builds it (pretrained weights included), then
    APViT's pooling and transformer; options: dim, depth, heads, keep, token_keep."""
    method, trunk_name = split_name(spec.backbone)
    timm_backbones.check_cnn_trunk(trunk_name)
    allowed = {"dim", "depth", "heads", "keep", "token_keep"}
    if set(spec.options) - allowed:
        raise ConfigError(f"unknown option(s) {sorted(set(spec.options) - allowed)} for apvit; valid: {sorted(allowed)}")
    plain = _plain_trunk(spec, trunk_name)
    return _tapped(APViTNet(plain.net, spec.num_classes, **spec.options), plain, spec)


register_family(ModelFamily(
    name="apvit", build=build_apvit, names=("apvit",),
    accepts=lambda name: isinstance(name, str) and name.startswith("apvit:"),
    stages=lambda name: tuple(f"trunk.{s}" for s in timm_backbones.feature_table(split_name(name)[1])[0]),
    min_image_size=lambda name: timm_backbones.smallest_input(split_name(name)[1]),
    normalisation=lambda name: timm_backbones.pretrained_normalisation(split_name(name)[1])))
