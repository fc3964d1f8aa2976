"""Image warps for ContraWarping: smooth local displacement fields and global transformations.

Two families of batched, differentiable-free torch transforms (all sampled from a
`torch.Generator`, so a seed reproduces every view):

* **Local warps** (the negatives of ContraWarping): a displacement field d(p) is a sum of
  `n_bumps` Gaussian bumps, each a random vector at a random centre,
  `d(p) = s * magnitude * f(p) / max_q |f(q)|`, `f(p) = w(p) * sum_k v_k exp(-|p - c_k|^2 / 2 sigma^2)`,
  with a per-image strength s ~ U[min_strength, 1]. Hence, exactly,
  `max_p |d(p)| = s * magnitude <= magnitude` (bounded), and d is a smooth (C-infinity when
  w = 1) function whose gradient is of order magnitude / sigma (0.06 / 0.12 = 0.5 at the
  defaults: below 1, so the warp p -> p + d(p) never folds). Displacements are in units of the
  image side ([0, 1] coordinates) and are *backward*: the warped image at p shows the source
  at p + d(p). A zero field returns the input unchanged, bit for bit.
* **AU-aware warps** (new, `au_aware=True`): the warp is concentrated on the action-unit
  regions of the face. Bump centres are drawn at the anchors that AU regions are defined on
  (`fer_lib.faces.au.AU_REGIONS`, with a small jitter), and the field is weighted by
  w(p) = the all-AU heatmap of `fer_lib.faces.au.all_au_heatmap` rendered with a wide sigma
  (`au_sigma`, default 0.10 of the side, so the weight is smooth), before the same
  normalisation to `magnitude`. Faces without landmarks fall back to uniform warps (w = 1,
  centres in the central `region`).
* **Global transformations** (the positives): random affine (rotation, isotropic scale,
  translation, horizontal flip), colour jitter (brightness, contrast, saturation, random
  grayscale) and Gaussian blur. `apply_view(images, params, displacement)` composes a local
  warp (defined in the source image's frame) with the affine in ONE `grid_sample`, then
  applies the colour and blur parameters; so a negative made with the same `params` as a
  positive differs from it only by the local warp.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fer_lib.faces.au import AU_REGIONS, all_au_heatmap
from fer_lib.faces.landmarks import ANCHOR_INDEX
from fer_lib.utils import ConfigError, check_number


# --------------------------------------------------------------------------- configuration
@dataclass
class WarpConfig:
    """Local warp distribution (all lengths in units of the image side)."""

    magnitude: float = 0.06  # maximum displacement
    min_strength: float = 0.5  # per-image strength s ~ U[min_strength, 1] times magnitude
    n_bumps: int = 4  # Gaussian displacement bumps per image
    sigma: float = 0.12  # bump width
    region: tuple[float, float] = (0.2, 0.8)  # uniform centres fall in this central box
    au_aware: bool = False  # concentrate warps on AU regions (needs anchors)
    au_sigma: float = 0.10  # width of the AU weighting map (wide: keeps the field smooth)
    au_jitter: float = 0.03  # std of the jitter of AU-anchored centres
    field_size: int = 32  # resolution the field is built at (then bilinearly upsampled)

    def __post_init__(self) -> None:
        check_number("WarpConfig.magnitude", self.magnitude, minimum=0.0, maximum=0.5)
        check_number("WarpConfig.min_strength", self.min_strength, minimum=0.0, maximum=1.0)
        check_number("WarpConfig.n_bumps", self.n_bumps, integer=True, minimum=1)
        check_number("WarpConfig.sigma", self.sigma, above=0.0, maximum=1.0)
        check_number("WarpConfig.au_sigma", self.au_sigma, above=0.0, maximum=1.0)
        check_number("WarpConfig.au_jitter", self.au_jitter, minimum=0.0, maximum=0.5)
        check_number("WarpConfig.field_size", self.field_size, integer=True, minimum=4, maximum=512)
        lo, hi = self.region
        if not 0.0 <= lo < hi <= 1.0:
            raise ConfigError(f"WarpConfig.region={self.region!r} must satisfy 0 <= lo < hi <= 1")
        self.region = (float(lo), float(hi))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GlobalAugConfig:
    """Global transformation distribution for the positive views."""

    rotation: float = 10.0  # degrees, uniform in [-rotation, rotation]
    scale: tuple[float, float] = (0.9, 1.1)
    translate: float = 0.06  # fraction of the side, uniform in [-translate, translate] per axis
    flip_p: float = 0.5
    brightness: float = 0.4  # factor uniform in [1 - b, 1 + b]
    contrast: float = 0.4
    saturation: float = 0.4
    grayscale_p: float = 0.2
    jitter_p: float = 0.8  # chance that colour jitter is applied at all
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 1.5)  # pixels

    def __post_init__(self) -> None:
        for name in ("flip_p", "grayscale_p", "jitter_p", "blur_p"):  # probabilities
            check_number(f"GlobalAugConfig.{name}", getattr(self, name), minimum=0.0, maximum=1.0)
        for name in ("brightness", "contrast", "saturation"):
            if check_number(f"GlobalAugConfig.{name}", getattr(self, name), minimum=0.0) >= 1.0:
                raise ConfigError(f"GlobalAugConfig.{name} must be in [0, 1), got {getattr(self, name)!r}")
        if not (0 < self.scale[0] <= self.scale[1]):
            raise ConfigError(f"GlobalAugConfig.scale must satisfy 0 < lo <= hi, got {self.scale!r}")
        if not (0 <= self.blur_sigma[0] <= self.blur_sigma[1]):
            raise ConfigError(f"GlobalAugConfig.blur_sigma must satisfy 0 <= lo <= hi, got {self.blur_sigma!r}")
        check_number("GlobalAugConfig.rotation", self.rotation, minimum=0)
        check_number("GlobalAugConfig.translate", self.translate, minimum=0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- helpers
def _uniform(n: int, lo: float, hi: float, generator: torch.Generator | None, device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator).to(device)


def _coords(size: int, device) -> torch.Tensor:
    """Pixel-centre coordinates in [0, 1] of a size x size grid -> (size, size, 2) as (x, y)."""
    t = (torch.arange(size, dtype=torch.float32, device=device) + 0.5) / size
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    return torch.stack([xx, yy], dim=-1)


def au_field_maps(anchors: np.ndarray, size: int = 32, sigma: float = 0.10) -> tuple[np.ndarray, np.ndarray]:
    """All-AU heatmaps (fer_lib.faces.au.all_au_heatmap, wide sigma) for many faces.

    anchors: (N, A, 2) normalised anchors, NaN rows for faces without landmarks.
    Returns (maps (N, size, size) float32 in [0, 1], valid (N,) bool); invalid faces get ones.
    """
    anchors = np.asarray(anchors, dtype=np.float32)
    if anchors.ndim != 3 or anchors.shape[-1] != 2:
        raise ValueError(f"expected anchors of shape (N, A, 2), got {anchors.shape}")
    maps = np.ones((len(anchors), size, size), np.float32)
    valid = np.isfinite(anchors).reshape(len(anchors), -1).all(axis=1)
    for i in np.flatnonzero(valid):
        m = all_au_heatmap(anchors[i], size, sigma=sigma)
        if m.max() > 0:
            maps[i] = m
        else:
            valid[i] = False
    return maps, valid


def au_anchor_points(anchors: np.ndarray) -> np.ndarray:
    """The anchors that AU regions sit on (fer_lib.faces.au.AU_REGIONS), per face: (N, K, 2)."""
    idx = sorted({ANCHOR_INDEX[a] for names in AU_REGIONS.values() for a in names})
    return np.asarray(anchors, np.float32)[:, idx]


# --------------------------------------------------------------------------- local warps
def random_displacement(n: int, config: WarpConfig | None = None, generator: torch.Generator | None = None,
                        au_field: torch.Tensor | None = None, au_points: torch.Tensor | None = None,
                        device: torch.device | str = "cpu") -> torch.Tensor:
    """Sample n smooth, bounded displacement fields (n, 2, F, F) in units of the image side.

    With `config.au_aware`, `au_field` (n, F', F') weights the field (all-AU heatmap) and
    `au_points` (n, K, 2) (anchors of AU regions, NaN for faces without landmarks) give the
    bump centres; faces whose weight or points are missing get a uniform warp.
    """
    cfg = config or WarpConfig()
    size = cfg.field_size
    k = cfg.n_bumps
    lo, hi = cfg.region
    centres = lo + (hi - lo) * torch.rand(n, k, 2, generator=generator)
    angle = 2 * math.pi * torch.rand(n, k, generator=generator)
    length = 0.5 + 0.5 * torch.rand(n, k, generator=generator)
    strength = cfg.min_strength + (1 - cfg.min_strength) * torch.rand(n, generator=generator)
    pick = torch.rand(n, k, generator=generator)
    jitter = torch.randn(n, k, 2, generator=generator) * cfg.au_jitter
    centres, angle, length, strength = (t.to(device) for t in (centres, angle, length, strength))
    weight = torch.ones(n, size, size, device=device)
    if cfg.au_aware:
        if au_points is not None:
            pts = torch.as_tensor(au_points, dtype=torch.float32, device=device)
            if pts.ndim != 3 or pts.shape[0] != n or pts.shape[-1] != 2:
                raise ValueError(f"au_points must be (n={n}, K, 2), got {tuple(pts.shape)}")
            has = torch.isfinite(pts).flatten(1).all(dim=1)
            choice = (pick.to(device) * pts.shape[1]).long().clamp_max(pts.shape[1] - 1)
            chosen = torch.gather(torch.nan_to_num(pts), 1, choice[..., None].expand(-1, -1, 2))
            chosen = (chosen + jitter.to(device)).clamp(0.0, 1.0)
            centres = torch.where(has[:, None, None], chosen, centres)
        if au_field is not None:
            w = torch.as_tensor(au_field, dtype=torch.float32, device=device)
            if w.ndim != 3 or w.shape[0] != n:
                raise ValueError(f"au_field must be (n={n}, h, w), got {tuple(w.shape)}")
            if w.shape[-2:] != (size, size):
                w = F.interpolate(w[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
            weight = w.clamp(0.0, 1.0)
    vectors = torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1) * length[..., None]  # (n, k, 2)
    grid = _coords(size, device)  # (F, F, 2)
    dist2 = ((grid[None, None] - centres[:, :, None, None, :]) ** 2).sum(-1)  # (n, k, F, F)
    bumps = torch.exp(-dist2 / (2 * cfg.sigma ** 2))
    field = torch.einsum("nkhw,nkc->nchw", bumps, vectors) * weight[:, None]
    peak = field.norm(dim=1).flatten(1).amax(dim=1)  # (n,)
    scale = torch.where(peak > 1e-8, cfg.magnitude * strength / peak.clamp_min(1e-8), torch.zeros_like(peak))
    return field * scale[:, None, None, None]


def displacement_at(displacement: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    """Bilinearly resample a (n, 2, F, F) field to (n, 2, H, W) (keeps the bound: convex weights)."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(displacement.shape[-2:]) == tuple(hw):
        return displacement
    return F.interpolate(displacement, size=hw, mode="bilinear", align_corners=False)


def identity_grid(n: int, h: int, w: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """grid_sample's identity grid (n, h, w, 2) in [-1, 1] (align_corners=False: pixel centres)."""
    theta = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], device=device).expand(n, 2, 3)
    return F.affine_grid(theta, (n, 1, h, w), align_corners=False)


def warp_images(images: torch.Tensor, displacement: torch.Tensor, padding_mode: str = "border") -> torch.Tensor:
    """Warp (n, C, H, W) images by backward fields (n, 2, F, F): out(p) = image(p + d(p)).

    Images whose field is exactly zero are returned unchanged (bit for bit).
    """
    if images.ndim != 4 or displacement.ndim != 4 or displacement.shape[1] != 2 or len(images) != len(displacement):
        raise ValueError(f"expected images (n,C,H,W) and displacement (n,2,F,F), got {tuple(images.shape)} "
                         f"and {tuple(displacement.shape)}")
    n, _, h, w = images.shape
    d = displacement_at(displacement.to(images.device, images.dtype), (h, w))
    grid = identity_grid(n, h, w, images.device) + 2.0 * d.permute(0, 2, 3, 1)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)
    zero = displacement.flatten(1).abs().amax(dim=1) == 0
    return torch.where(zero.to(images.device)[:, None, None, None], images, out)


# --------------------------------------------------------------------------- global transformations
def sample_global_params(n: int, config: GlobalAugConfig | None = None,
                         generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Random parameters of n global transformations (affine, flip, colour jitter, blur)."""
    cfg = config or GlobalAugConfig()
    r = lambda: torch.rand(n, generator=generator)  # noqa: E731
    jitter_on = (r() < cfg.jitter_p).float()
    return {
        "angle": (2 * r() - 1) * math.radians(cfg.rotation),
        "scale": cfg.scale[0] + (cfg.scale[1] - cfg.scale[0]) * r(),
        "tx": (2 * r() - 1) * cfg.translate,
        "ty": (2 * r() - 1) * cfg.translate,
        "flip": (r() < cfg.flip_p).float(),
        "brightness": 1 + jitter_on * (2 * r() - 1) * cfg.brightness,
        "contrast": 1 + jitter_on * (2 * r() - 1) * cfg.contrast,
        "saturation": 1 + jitter_on * (2 * r() - 1) * cfg.saturation,
        "grayscale": (r() < cfg.grayscale_p).float(),
        "blur_sigma": torch.where(r() < cfg.blur_p, cfg.blur_sigma[0] + (cfg.blur_sigma[1] - cfg.blur_sigma[0]) * r(),
                                  torch.zeros(n)),
    }


def identity_params(n: int) -> dict[str, torch.Tensor]:
    """Parameters of the identity global transformation (for plots and tests)."""
    z, o = torch.zeros(n), torch.ones(n)
    return {"angle": z, "scale": o, "tx": z, "ty": z, "flip": z, "brightness": o, "contrast": o,
            "saturation": o, "grayscale": z, "blur_sigma": z}


def affine_theta(params: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> torch.Tensor:
    """(n, 2, 3) grid_sample matrices mapping output coordinates to source coordinates."""
    a = params["angle"].to(device)
    s = params["scale"].to(device)
    flip = 1 - 2 * params["flip"].to(device)  # -1 mirrors x
    cos, sin = torch.cos(a) / s, torch.sin(a) / s
    theta = torch.stack([
        torch.stack([cos * flip, -sin, 2 * params["tx"].to(device)], dim=-1),
        torch.stack([sin * flip, cos, 2 * params["ty"].to(device)], dim=-1),
    ], dim=1)
    return theta


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def colour_jitter(images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Brightness, contrast, saturation and random grayscale on [0, 1] RGB images."""
    dev = images.device
    b = params["brightness"].to(dev)[:, None, None, None]
    c = params["contrast"].to(dev)[:, None, None, None]
    s = params["saturation"].to(dev)[:, None, None, None]
    g = params["grayscale"].to(dev)[:, None, None, None]
    x = (images * b).clamp(0, 1)
    mean = _gray(x).mean(dim=(2, 3), keepdim=True)
    x = ((x - mean) * c + mean).clamp(0, 1)
    gray = _gray(x)
    x = ((x - gray) * s + gray).clamp(0, 1)
    return torch.where(g > 0.5, _gray(x).expand_as(x), x)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image Gaussian blur (sigma in pixels, 0 = none), separable, reflect-padded."""
    n, c, h, w = images.shape
    sigma = sigma.to(images.device, images.dtype)
    if not bool((sigma > 0).any()):
        return images
    radius = max(1, int(math.ceil(3 * float(sigma.max()))))
    radius = min(radius, (min(h, w) - 1) // 2) or 1
    t = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kern = torch.exp(-t[None] ** 2 / (2 * sigma.clamp_min(1e-3)[:, None] ** 2))
    kern = kern / kern.sum(dim=1, keepdim=True)  # (n, 2r+1)
    kern = kern.repeat_interleave(c, dim=0)  # (n*c, 2r+1)
    x = images.reshape(1, n * c, h, w)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kern[:, None, None, :], groups=n * c)
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kern[:, None, :, None], groups=n * c)
    x = x.reshape(n, c, h, w)
    return torch.where((sigma > 0)[:, None, None, None], x, images)


def apply_view(images: torch.Tensor, params: dict[str, torch.Tensor],
               displacement: torch.Tensor | None = None) -> torch.Tensor:
    """One view of [0, 1] images: local warp (source frame), then affine/flip, colour, blur.

    The warp and the affine are composed into one grid_sample, so a view with a local warp
    and the same `params` differs from the plain view only by the warp.
    """
    n, _, h, w = images.shape
    grid = F.affine_grid(affine_theta(params, images.device), (n, 1, h, w), align_corners=False)
    if displacement is not None:
        d = displacement.to(images.device, images.dtype)
        # the field lives in the source frame: read it where each output pixel lands
        d_at = F.grid_sample(d, grid, mode="bilinear", padding_mode="border", align_corners=False)
        grid = grid + 2.0 * d_at.permute(0, 2, 3, 1)
    x = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    x = colour_jitter(x, params)
    return gaussian_blur(x, params["blur_sigma"])


def field_gradient(displacement: torch.Tensor) -> torch.Tensor:
    """Max finite-difference gradient norm per field (n,): |dd/dp| in image-side units."""
    n, _, h, w = displacement.shape
    dx = (displacement[..., :, 1:] - displacement[..., :, :-1]) * w
    dy = (displacement[..., 1:, :] - displacement[..., :-1, :]) * h
    return torch.maximum(dx.abs().flatten(1).amax(dim=1), dy.abs().flatten(1).amax(dim=1))
