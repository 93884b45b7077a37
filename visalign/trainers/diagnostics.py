"""Drift diagnostics of a training step, logged as `drift/*` and watched by `run.alarm.watch`.

Hacking shows first as drift a user can see: images getting brighter or more saturated, samples of one prompt
collapsing onto each other, the predictions' norm growing (DiffusionNFT issue #47: brighter images as the x0 norm
grows; NormGuard, arXiv 2606.27771: RL inflates the velocity norm under NFT, AWM and DPO alike), and the policy
ratio leaving 1 (GRPO-Guard, arXiv 2510.22319). Each is cheap from what a step already holds:

- the rollout (every online recipe): `drift/x0_norm` and `drift/velocity_norm`, the RMS over latent dimensions
  of each sampling step's x0-prediction and velocity (v = (x - x0_pred) / sigma), averaged over steps and
  samples; `drift/brightness` and `drift/saturation`, the mean Rec. 601 luma and HSV saturation of the decoded
  samples; `drift/diversity`, the mean pairwise RMS pixel distance within prompt groups;
- the losses' metrics: `drift/ratio_mean|min|max` and `drift/clip_fraction` (Flow-GRPO; DGPO with
  `train.clip_range`), and offline Flow-DPO's `drift/velocity_norm` of its training pass (it has no rollout).
"""

from __future__ import annotations

import math

import torch

from visalign.rewards.style import hsv_saturation, luma

ROLLOUT_DRIFT = ("drift/x0_norm", "drift/velocity_norm", "drift/brightness", "drift/saturation", "drift/diversity")
RATIO_DRIFT = ("drift/ratio_mean", "drift/ratio_min", "drift/ratio_max", "drift/clip_fraction")
DRIFT_METRICS = (*ROLLOUT_DRIFT, *RATIO_DRIFT)

# A loss metric (per micro-batch) that is a drift diagnostic: its drift name and how a step reduces it.
LOSS_DRIFT = {"ratio_mean": ("drift/ratio_mean", "mean"), "ratio_min": ("drift/ratio_min", "min"),
              "ratio_max": ("drift/ratio_max", "max"), "clip_fraction": ("drift/clip_fraction", "mean"),
              "velocity_norm": ("drift/velocity_norm", "mean")}
_REDUCTION = {"drift/ratio_min": "min", "drift/ratio_max": "max"}  # the rest: mean


def within_group_diversity(images: torch.Tensor, groups: torch.Tensor) -> float:
    """Mean pairwise RMS pixel distance between samples of the same prompt group (collapse drives it to 0)."""
    flat = images.detach().float().flatten(1)
    values = []
    for g in torch.unique(groups):
        x = flat[groups == g]
        if len(x) > 1:
            d = torch.cdist(x, x) / flat.shape[1] ** 0.5
            values.append(d.sum() / (len(x) * (len(x) - 1)))
    return float(torch.stack(values).mean()) if values else 0.0


def rms(x: torch.Tensor, dims: int) -> torch.Tensor:
    """Root mean square over the last `dims` dimensions, in float32 whatever x's dtype."""
    flat = x.detach().flatten(-dims)
    return torch.linalg.vector_norm(flat, dim=-1, dtype=torch.float32) / flat.shape[-1] ** 0.5


def rollout_drift(images: torch.Tensor, latents: torch.Tensor, x0_preds: torch.Tensor, sigmas: torch.Tensor,
                  groups: torch.Tensor) -> dict[str, float]:
    """The rollout's diagnostics from decoded samples [B, 3, H, W] (or [B, F, 3, H, W]) in [0, 1], the trajectory's
    latents [B, N+1, ...] and x0-predictions [B, N, ...], its sigmas [N+1] (> 0 but the last) and each sample's
    prompt group [B]. One sampling step, and one sample's pixels, at a time: a video rollout's float copies would
    otherwise be gigabytes."""
    dims = x0_preds.ndim - 2
    x0_norm, v_norm = [], []
    for i in range(x0_preds.shape[1]):
        x0 = x0_preds[:, i].detach().float()
        x0_norm.append(rms(x0, dims))
        v_norm.append(rms((latents[:, i].detach().float() - x0) / float(sigmas[i]), dims))
    pixels = images.detach()
    return {"drift/x0_norm": torch.stack(x0_norm).mean().item(),
            "drift/velocity_norm": torch.stack(v_norm).mean().item(),
            "drift/brightness": torch.stack([luma(x.float()).mean() for x in pixels]).mean().item(),
            "drift/saturation": torch.stack([hsv_saturation(x.float()).mean() for x in pixels]).mean().item(),
            "drift/diversity": within_group_diversity(pixels, groups)}


def loss_drift(logs: dict[str, list[float]]) -> dict[str, float]:
    """The drift diagnostics among a step's per-micro-batch loss metrics (`LOSS_DRIFT`), reduced over the step:
    the mean of the micro-batches' means and fractions, the min of their minima, the max of their maxima. A
    micro-batch that trained no sample reports NaN and is left out."""
    out = {}
    for key, (name, how) in LOSS_DRIFT.items():
        values = [v for v in logs.get(key, []) if not math.isnan(v)]
        if values:
            out[name] = {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}[how]
    return out


def reduce_drift(rows: torch.Tensor, names: tuple[str, ...] = DRIFT_METRICS) -> dict[str, float]:
    """One value per diagnostic from every process's row [P, len(names)] (NaN: not measured there): the min of
    `drift/ratio_min`, the max of `drift/ratio_max`, the mean of the rest (each process holds an equal share of
    the step's samples). A diagnostic no process measured is left out."""
    out = {}
    for j, name in enumerate(names):
        col = rows[:, j].double()
        col = col[~torch.isnan(col)]
        if len(col):
            how = _REDUCTION.get(name, "mean")
            out[name] = float(col.min() if how == "min" else col.max() if how == "max" else col.mean())
    return out


def drift_row(values: dict[str, float], names: tuple[str, ...] = DRIFT_METRICS) -> torch.Tensor:
    """This process's diagnostics as a row [1, len(names)] for gathering, NaN where it measured none."""
    return torch.tensor([[values.get(n, math.nan) for n in names]], dtype=torch.float64)
