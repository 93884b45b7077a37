"""Policy-gradient losses on per-step transition log-probs. Each returns (loss, metrics)."""

from __future__ import annotations

import torch
from torch import Tensor


def guard_log_ratio(log_prob: Tensor, old_log_prob: Tensor, mean: Tensor, old_mean: Tensor, std: Tensor) -> Tensor:
    """GRPO-Guard's RatioNorm (Wang et al. 2025, arXiv 2510.22319; as written in verl-omni's GRPO-Guard
    docs): add back the mean-shift bias b = mean_dims (mu - mu_old)^2 / (2 std^2) that pushes the Gaussian
    log-ratio below 0, then scale by the transition std so every step's ratio has a comparable spread:
    log rho = (lp - lp_old + b) * std, with std = sqrt(-dt) * sigma_t."""
    dims = tuple(range(1, mean.ndim))
    std = std.view(-1)
    bias = (mean - old_mean).pow(2).mean(dim=dims) / (2 * std**2)
    return (log_prob - old_log_prob + bias) * std


def grpo_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float,
              mask: Tensor | None = None, mean: Tensor | None = None, ref_mean: Tensor | None = None,
              std: Tensor | None = None, kl_beta: float = 0.0, log_ratio: Tensor | None = None,
              step_weight: Tensor | None = None) -> tuple[Tensor, dict]:
    """PPO-clipped GRPO loss of one denoising step, plus Flow-GRPO's KL in SDE-mean space.

    ratio = exp(lp - lp_old);  L = mean(max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps))) + beta KL,
    KL = mean_dims (mu_theta - mu_ref)^2 / (2 std^2), with std the transition std (no |dt| factor, as
    flow_grpo `scripts/train_sd3.py` L881-897; issue #78 there discusses the form).
    `mask` (bool [B]) drops samples (invalid reward, zero-variance group, best-of-N rejects) from the mean.
    `log_ratio` replaces lp - lp_old (GRPO-Guard's `guard_log_ratio`); `step_weight` [B] scales each sample's
    policy term (GRPO-Guard's gradient reweighting 1 / |dt|).
    """
    ratio = torch.exp(log_prob - old_log_prob if log_ratio is None else log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    per_sample = torch.maximum(unclipped, clipped)
    if step_weight is not None:
        per_sample = per_sample * step_weight
    kl = torch.zeros_like(per_sample)
    if kl_beta > 0:
        if mean is None or ref_mean is None or std is None:
            raise ValueError("kl_beta > 0 needs mean, ref_mean and std")
        dims = tuple(range(1, mean.ndim))
        kl = (mean - ref_mean).pow(2).mean(dim=dims) / (2 * std.view(-1) ** 2)
        per_sample = per_sample + kl_beta * kl
    weight = mask.float() if mask is not None else torch.ones_like(per_sample)
    n = weight.sum().clamp(min=1)
    loss = (per_sample * weight).sum() / n
    with torch.no_grad():
        keep = weight > 0
        metrics = {
            "policy_loss": ((torch.maximum(unclipped, clipped) * weight).sum() / n).item(),  # unweighted
            "kl": ((kl * weight).sum() / n).item(),
            "ratio_mean": ratio[keep].mean().item() if keep.any() else 1.0,
            "ratio_max_dev": (ratio[keep] - 1).abs().max().item() if keep.any() else 0.0,
            "clip_fraction": ((ratio[keep] - 1).abs() > clip_range).float().mean().item() if keep.any() else 0.0,
        }
    return loss, metrics
