"""Group-relative advantages (GRPO), shared by every online trainer.

A(i) = (r_i - mean_g) / (std + eps), the mean over the prompt group g of sample i and the std over the group
(or over the whole gathered batch with `global_std`, Flow-GRPO's default): Shao et al. 2024 (DeepSeekMath,
Eq. 3 ff.); flow_grpo `flow_grpo/stat_tracking.py` (eps 1e-4) and `scripts/train_sd3.py`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def group_advantages(rewards: Tensor, groups: Tensor, *, eps: float = 1e-4, global_std: bool = False,
                     clip: float | None = 5.0, valid: Tensor | None = None) -> tuple[Tensor, dict]:
    """Advantages [N] for rewards [N] with integer group ids [N].

    `valid` (bool [N]) marks samples whose reward is usable; invalid ones get advantage 0 and are left out of
    their group's statistics. Returns (advantages, metrics) with the fraction of groups whose rewards have
    zero spread (they carry no signal; callers mask them).
    """
    rewards = rewards.double()
    valid = torch.isfinite(rewards) if valid is None else valid & torch.isfinite(rewards)
    r = torch.where(valid, rewards, torch.zeros_like(rewards))
    ids, inverse = torch.unique(groups, return_inverse=True)
    count = torch.zeros(len(ids), dtype=torch.float64).index_add_(0, inverse, valid.double())
    total = torch.zeros(len(ids), dtype=torch.float64).index_add_(0, inverse, r)
    mean = total / count.clamp(min=1)
    centred = torch.where(valid, r - mean[inverse], torch.zeros_like(r))
    sq = torch.zeros(len(ids), dtype=torch.float64).index_add_(0, inverse, centred**2)
    group_std = (sq / count.clamp(min=1)).sqrt()  # population std, as numpy's default in stat_tracking
    if global_std:
        std = centred[valid].pow(2).mean().sqrt() if valid.any() else torch.zeros((), dtype=torch.float64)
        denom = std.expand_as(r)
    else:
        denom = group_std[inverse]
    scale = denom + eps
    adv = torch.where(scale > 0, centred / scale.clamp(min=1e-30), torch.zeros_like(centred))  # 0/0 -> 0
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    adv = torch.where(valid, adv, torch.zeros_like(adv))
    zero_std = (group_std[count > 0] == 0).double().mean().item() if (count > 0).any() else 1.0
    return adv.float(), {"zero_std_fraction": zero_std, "group_std_mean": group_std.mean().item()}


def combine_advantages(per_reward: dict[str, Tensor], weights: dict[str, float]) -> Tensor:
    """Weighted sum of per-reward advantages (GDPO-style "normalize then sum"); the multi-reward
    balancing module replaces this with gradient-space aggregation."""
    return sum(weights[name] * adv for name, adv in per_reward.items())


def best_of_n_mask(advantages: Tensor, groups: Tensor, keep: int) -> Tensor:
    """DanceGRPO's best-of-N selection (`train_grpo_hunyuan.py`): keep the keep/2 highest and keep/2 lowest
    advantages of each group. Returns a bool mask [N]."""
    mask = torch.zeros_like(advantages, dtype=torch.bool)
    half = keep // 2
    for g in torch.unique(groups):
        idx = torch.nonzero(groups == g).flatten()
        order = idx[torch.argsort(advantages[idx], stable=True)]
        mask[order[:half]] = True
        mask[order[len(order) - half:]] = True
    return mask
