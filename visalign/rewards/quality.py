"""A no-weights image quality score from natural scene statistics (NSS).

Features are BRISQUE's (Mittal, Moorthy & Bovik 2012, "No-Reference Image Quality Assessment in the Spatial
Domain", IEEE TIP; reference MATLAB `brisque_feature.m`), computed on the luminance at 2 scales, 18 per scale:

1. MSCN coefficients I' = (I - mu) / (sigma + 1), with mu and sigma^2 the local mean and variance under a 7×7
   Gaussian window (sigma_w = 7/6, zero padding), on the 0-255 scale (paper Eq. 1-3).
2. A generalised Gaussian (GGD) fit of I' by moment matching: shape alpha and variance (Eq. 4), 2 features.
3. An asymmetric GGD (AGGD) fit of the products of I' with its horizontal, vertical and two diagonal
   neighbours (circular shift, as the reference): shape, mean, left and right variances (Eq. 5-8), 16 features.
4. The image is halved (antialiased bicubic) and steps 1-3 repeat.

The score follows NIQE (Mittal, Soundararajan & Bovik 2013, "Making a 'Completely Blind' Image Quality
Analyzer", IEEE SPL): a multivariate Gaussian (MVG) of the features of pristine images, and the distance
D = sqrt((f - mu_p)^T Sigma_p^+ (f - mu_p)) of an image's features to it (NIQE's Eq. 10 with the test image's
covariance dropped, because each image gives one whole-image feature vector as in BRISQUE, not NIQE's 96×96
patches, which the 32×32 world renders cannot supply). The reward is -D: 0 at the pristine mean, lower is
worse; "distance" is a sub-score.

Pristine statistics: no natural-image set ships with visalign, so the default model is fitted, once per
process and deterministically, to grey-level "dead leaves" images (Lee, Mumford & Huang 2001, "Occlusion
Models for Natural Images"): occluding discs with power-law radii, which reproduce the scale invariance and
heavy-tailed statistics of natural images. `fit_pristine(images)` fits a model to any clean set (e.g. real
photos, or world renders) and `save_pristine` / `NSSQuality(pristine=PATH)` store and reuse it.

Differentiable: the GGD/AGGD shapes are found by linear interpolation in the reference's lookup table
(alpha = 0.2:0.001:10) instead of its nearest entry, so they move smoothly with the pixels.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor

from visalign.rewards.base import Reward

# BRISQUE's constants (brisque_feature.m): Gaussian window 7×7 with sigma 7/6, stabiliser C = 1 on 0-255.
WINDOW_SIZE = 7
WINDOW_SIGMA = 7 / 6
STABILISER = 1.0
NUM_SCALES = 2
# Neighbour shifts (rows, cols) of circshift in brisque_feature.m: horizontal, vertical, main and anti diagonal.
SHIFTS = ((0, 1), (1, 0), (1, 1), (-1, 1))
FEATURE_NAMES = tuple(
    f"s{scale}/{name}"
    for scale in range(NUM_SCALES)
    for name in ("mscn_alpha", "mscn_var", *(f"{d}/{p}" for d in ("h", "v", "d1", "d2")
                                            for p in ("alpha", "mean", "left_var", "right_var")))
)
SHRINKAGE = 0.1  # of the pristine covariance toward its diagonal (see `fit_pristine`)
# Rec. 601 luma, as MATLAB rgb2gray.
LUMA = (0.298936021293775, 0.587043074451121, 0.114020904255103)


@functools.cache
def _shape_table() -> tuple[Tensor, Tensor, Tensor]:
    """(alpha grid, GGD ratio Gamma(1/a)Gamma(3/a)/Gamma(2/a)^2, AGGD ratio Gamma(2/a)^2/(Gamma(1/a)Gamma(3/a))),
    the grid of estimateggdparam.m / estimateaggdparam.m, in float64."""
    alpha = torch.arange(0.2, 10.0 + 1e-9, 0.001, dtype=torch.float64)
    log_ratio = torch.lgamma(1 / alpha) + torch.lgamma(3 / alpha) - 2 * torch.lgamma(2 / alpha)
    return alpha, log_ratio.exp(), (-log_ratio).exp()


def _invert(value: Tensor, grid: Tensor, alpha: Tensor) -> Tensor:
    """alpha at which the monotone `grid` (decreasing or increasing in alpha) equals `value`, by linear
    interpolation between the table's entries, clamped to [0.2, 10]."""
    ascending = grid[-1] > grid[0]
    table, shapes = (grid, alpha) if ascending else (grid.flip(0), alpha.flip(0))
    value = value.to(table.dtype).clamp(table[0], table[-1])
    right = torch.searchsorted(table, value.detach().contiguous()).clamp(1, len(table) - 1)
    left = right - 1
    t = (value - table[left]) / (table[right] - table[left])
    return shapes[left] + t * (shapes[right] - shapes[left])


def ggd_fit(x: Tensor) -> tuple[Tensor, Tensor]:
    """Moment-matching GGD fit (estimateggdparam.m) over the last dim: (alpha, variance E[x^2])."""
    alpha, ggd_ratio, _ = _shape_table()
    variance = x.pow(2).mean(dim=-1)
    rho = variance / x.abs().mean(dim=-1).pow(2).clamp_min(1e-30)
    return _invert(rho, ggd_ratio, alpha), variance


def aggd_fit(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Moment-matching AGGD fit (estimateaggdparam.m, BRISQUE Eq. 5-8) over the last dim:
    (alpha, mean eta, left variance, right variance)."""
    alpha_grid, _, aggd_ratio = _shape_table()
    negative, positive = (x < 0).to(x.dtype), (x > 0).to(x.dtype)
    left_var = (x.pow(2) * negative).sum(-1) / negative.sum(-1).clamp_min(1)
    right_var = (x.pow(2) * positive).sum(-1) / positive.sum(-1).clamp_min(1)
    left_std, right_std = left_var.clamp_min(1e-30).sqrt(), right_var.clamp_min(1e-30).sqrt()
    gamma_hat = left_std / right_std
    r_hat = x.abs().mean(-1).pow(2) / x.pow(2).mean(-1).clamp_min(1e-30)
    r_norm = r_hat * (gamma_hat.pow(3) + 1) * (gamma_hat + 1) / (gamma_hat.pow(2) + 1).pow(2)
    alpha = _invert(r_norm, aggd_ratio, alpha_grid)
    lg1, lg2, lg3 = torch.lgamma(1 / alpha), torch.lgamma(2 / alpha), torch.lgamma(3 / alpha)
    # eta = (beta_r - beta_l) Gamma(2/a) / Gamma(1/a), beta = std sqrt(Gamma(1/a) / Gamma(3/a)).
    mean = (right_std - left_std) * torch.exp(lg2 - lg1 + 0.5 * (lg1 - lg3))
    return alpha, mean, left_var, right_var


def _gaussian_window(dtype: torch.dtype, device: torch.device) -> Tensor:
    coords = torch.arange(WINDOW_SIZE, dtype=dtype, device=device) - (WINDOW_SIZE - 1) / 2
    g = torch.exp(-coords.pow(2) / (2 * WINDOW_SIGMA**2))
    window = g[:, None] * g[None, :]
    return (window / window.sum())[None, None]


def mscn(luma: Tensor) -> Tensor:
    """Mean-subtracted contrast-normalised coefficients of luminance [B, 1, H, W] on the 0-255 scale
    (BRISQUE Eq. 1-3; filter2(..., 'same') zero-pads)."""
    window = _gaussian_window(luma.dtype, luma.device)
    pad = WINDOW_SIZE // 2
    mu = F.conv2d(luma, window, padding=pad)
    variance = (F.conv2d(luma * luma, window, padding=pad) - mu * mu).abs()
    # The small offset keeps sqrt's slope finite on flat regions (variance exactly 0); it shifts sigma by 1e-6.
    return (luma - mu) / ((variance + 1e-12).sqrt() + STABILISER)


def to_luma(images: Tensor) -> Tensor:
    """[B, 3, H, W] in [0, 1] -> luminance [B, 1, H, W] on 0-255, float64."""
    weights = torch.tensor(LUMA, dtype=torch.float64, device=images.device).view(1, 3, 1, 1)
    return (images.double() * weights).sum(dim=1, keepdim=True) * 255.0


def brisque_features(images: Tensor) -> Tensor:
    """The 36 BRISQUE features (`FEATURE_NAMES`) of images [B, 3, H, W] in [0, 1]: [B, 36] float64.

    The reference halves the image with MATLAB imresize(0.5) (antialiased bicubic, a = -0.5); here
    torch's antialiased bicubic (PIL's kernel, a = -0.5), which differs only at the borders."""
    if images.shape[-1] < 2 * WINDOW_SIZE or images.shape[-2] < 2 * WINDOW_SIZE:
        raise ValueError(f"images must be at least {2 * WINDOW_SIZE}×{2 * WINDOW_SIZE}, got "
                         f"{tuple(images.shape[-2:])}")
    luma, features = to_luma(images), []
    for scale in range(NUM_SCALES):
        coeffs = mscn(luma)
        alpha, variance = ggd_fit(coeffs.flatten(1))
        features += [alpha, variance]
        for shift in SHIFTS:
            pair = (coeffs * torch.roll(coeffs, shifts=shift, dims=(-2, -1))).flatten(1)
            features += list(aggd_fit(pair))
        if scale + 1 < NUM_SCALES:
            size = ((luma.shape[-2] + 1) // 2, (luma.shape[-1] + 1) // 2)  # imresize's ceil(0.5 * dim)
            luma = F.interpolate(luma, size=size, mode="bicubic", align_corners=False, antialias=True)
    return torch.stack(features, dim=1)


# ------------------------------------------------------------------------------------ pristine model


def dead_leaves(n: int, size: int = 96, seed: int = 0, min_radius: float = 1.0, max_radius: float = 48.0,
                discs: int = 1500) -> Tensor:
    """Grey-level dead-leaves images [n, 3, size, size] in [0, 1]: `discs` discs, front to back, radius density
    proportional to r^-3 on [min_radius, max_radius] (scale invariance), uniform grey levels; each pixel
    takes the first disc that covers it. Anti-aliased by 4×4 supersampling."""
    rng = np.random.default_rng(seed)
    images, ss = [], 4
    axis = (np.arange(size * ss) + 0.5) / ss
    for _ in range(n):
        # Inverse-CDF sampling of p(r) ~ r^-3.
        u = rng.random(discs)
        radius = (min_radius**-2 - u * (min_radius**-2 - max_radius**-2)) ** -0.5
        cx, cy = rng.uniform(-max_radius / 4, size + max_radius / 4, (2, discs))
        grey = rng.random(discs)
        canvas = np.full((size * ss, size * ss), rng.random())
        covered = np.zeros_like(canvas, dtype=bool)
        for i, (r, x, y, g) in enumerate(zip(radius, cx, cy, grey, strict=True)):
            x0, x1 = np.searchsorted(axis, [x - r, x + r])
            y0, y1 = np.searchsorted(axis, [y - r, y + r])
            if x1 <= x0 or y1 <= y0:
                continue
            inside = (axis[y0:y1, None] - y) ** 2 + (axis[None, x0:x1] - x) ** 2 <= r * r
            new = inside & ~covered[y0:y1, x0:x1]
            canvas[y0:y1, x0:x1][new] = g
            covered[y0:y1, x0:x1] |= inside
            if i % 100 == 99 and covered.all():
                break
        image = canvas.reshape(size, ss, size, ss).mean(axis=(1, 3))
        images.append(np.repeat(image[None], 3, axis=0))
    return torch.tensor(np.stack(images), dtype=torch.float32)


def fit_pristine(images: Tensor, shrinkage: float = SHRINKAGE, batch_size: int = 16) -> dict[str, Tensor]:
    """The MVG of clean images' BRISQUE features: {"mean": [36], "covariance": [36, 36]} (float64).

    The sample covariance is shrunk toward its diagonal, (1 - shrinkage) S + shrinkage diag(S): BRISQUE's
    features are nearly collinear (condition number ~1e8 on dead leaves), and with one feature vector per test
    image there is no test covariance to regularise pinv as NIQE's (Sigma_p + Sigma_test) / 2 does."""
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"shrinkage={shrinkage} must be in [0, 1]")
    features = torch.cat([brisque_features(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
    if len(features) < 2:
        raise ValueError("fit_pristine needs at least 2 images")
    sample = torch.cov(features.T)
    covariance = (1 - shrinkage) * sample + shrinkage * torch.diag(torch.diag(sample))
    return {"mean": features.mean(dim=0), "covariance": covariance}


def save_pristine(model: dict[str, Tensor], path: str | Path) -> None:
    save_file({k: v.contiguous() for k, v in model.items()}, str(path))


@functools.cache
def default_pristine() -> dict[str, Tensor]:
    """The built-in pristine model: 64 dead-leaves images of 96×96 (seed 0), fitted once per process (~1 s)."""
    return fit_pristine(dead_leaves(64, size=96, seed=0))


def nss_distance(features: Tensor, model: dict[str, Tensor]) -> Tensor:
    """NIQE-style distance sqrt((f - mu)^T pinv(Sigma) (f - mu)) of features [B, 36] to a pristine MVG -> [B]."""
    delta = features - model["mean"].to(features)
    precision = torch.linalg.pinv(model["covariance"].to(features), hermitian=True)
    return ((delta @ precision) * delta).sum(dim=-1).clamp_min(1e-18).sqrt()


class NSSQuality(Reward):
    """No-weights natural-scene-statistics quality: minus the NIQE-style distance of an image's BRISQUE
    features to a pristine model (see the module doc). Higher is better, 0 at best; differentiable.

    pristine: None for the built-in dead-leaves model, a path to a `save_pristine` file, or a
    {"mean", "covariance"} dict from `fit_pristine`. Images must be at least 14×14."""

    name = "quality-nss"
    differentiable = True
    needs_prompts = False
    value_range = None  # (-inf, 0]

    def __init__(self, pristine: str | Path | dict[str, Tensor] | None = None, **kwargs):
        super().__init__(**kwargs)
        if pristine is None:
            pristine = default_pristine()
        elif not isinstance(pristine, dict):
            path = Path(pristine)
            if not path.is_file():
                raise FileNotFoundError(f"{self.name}: no pristine model at {path}")
            pristine = load_file(str(path))
        missing = {"mean", "covariance"} - set(pristine)
        if missing:
            raise KeyError(f"{self.name}: pristine model lacks {sorted(missing)}")
        dim = len(FEATURE_NAMES)
        if pristine["mean"].shape != (dim,) or pristine["covariance"].shape != (dim, dim):
            raise ValueError(f"{self.name}: pristine mean/covariance must be [{dim}] and [{dim}, {dim}], got "
                             f"{tuple(pristine['mean'].shape)} and {tuple(pristine['covariance'].shape)}")
        self.pristine = {k: v.double() for k, v in pristine.items()}

    def score(self, *, prompts, images, videos, metadata):
        distance = nss_distance(brisque_features(images), self.pristine)
        return {"score": (-distance).float(), "distance": distance.float()}


__all__ = [
    "FEATURE_NAMES", "NSSQuality", "aggd_fit", "brisque_features", "dead_leaves", "default_pristine",
    "fit_pristine", "ggd_fit", "mscn", "nss_distance", "save_pristine", "to_luma",
]
