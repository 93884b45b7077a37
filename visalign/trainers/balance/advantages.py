"""Advantage-space alternatives to gradient-space balancing, for comparison (each combines K rewards before the
gradient, so one backward suffices). Scores are [N, K] (samples × rewards), groups [N] integer prompt-group ids.

- GDPO (per-reward group normalisation, then the weighted sum): `visalign.trainers.advantages.combine_advantages`, i.e.
  `train.advantage.mode=normalize_then_sum`.
- CMO correlation weighting, Parrot's batch-wise Pareto selection, per-reward thresholds with Lagrange
  multipliers, hypervolume-guided dynamic weights: below.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _z(x: Tensor, eps: float) -> Tensor:
    return (x - x.mean()) / (x.std(unbiased=False) + eps)


def cmo_weights(group_scores: Tensor, tau: float = 0.5, eps: float = 1e-6) -> Tensor:
    """CMO's per-group reward weights (arXiv 2603.18528; TheDarkKnight-21th/CMO `flow_grpo/stat_tracking.py`):
    C = Pearson matrix of the group's K rewards, b_k = (Σ_j C_kj − 1) / (K − 1) (mean correlation with the
    others; 1 for a reward with no spread), w = softmax((1 − b) / tau). Rewards that move with the rest get less
    weight. `group_scores` [G, K] -> w [K]."""
    x = group_scores.double()
    k = x.shape[1]
    std = x.std(0, unbiased=False)
    flat = std < eps
    xc = (x - x.mean(0)) / std.clamp(min=eps)
    corr = (xc.T @ xc) / x.shape[0]
    b = (corr.sum(1) - corr.diagonal()) / max(k - 1, 1)
    b = torch.where(flat, torch.ones_like(b), b)
    return torch.softmax((1 - b) / tau, dim=0)


def cmo_advantages(scores: Tensor, groups: Tensor, tau: float = 0.5, eps: float = 1e-4) -> tuple[Tensor, Tensor]:
    """Σ_k w_k A_k per group with A_k the group-normalised reward k and w from `cmo_weights`, then a batch z-score
    (as CMO does). Returns advantages [N] and the weights [num_groups, K]."""
    scores = scores.double()
    adv = torch.zeros(len(scores), dtype=torch.float64)
    all_w = []
    for g in torch.unique(groups):
        m = groups == g
        s = scores[m]
        a = (s - s.mean(0)) / (s.std(0, unbiased=False) + eps)
        w = cmo_weights(s, tau)
        adv[m] = a @ w
        all_w.append(w)
    return _z(adv, eps), torch.stack(all_w)


def pareto_mask(scores: Tensor) -> Tensor:
    """Bool [N]: samples no other sample of the batch dominates (>= on every reward and > on one). Parrot
    (Lee et al. 2024, arXiv 2401.05675) trains only on the batch's non-dominated samples."""
    s = scores.double()
    ge = (s[:, None, :] >= s[None, :, :]).all(-1)  # ge[j, i]: j >= i everywhere
    gt = (s[:, None, :] > s[None, :, :]).any(-1)
    dominated = (ge & gt).any(0)
    return ~dominated


class LagrangeThresholds:
    """Constrained RLHF (Moskovitz et al. 2024, "Confronting Reward Model Overoptimization with Constrained RLHF"):
    maximise the first reward subject to E[r_k] >= threshold_k for the others. Multipliers follow dual ascent,
    lambda_k <- max(0, lambda_k + lr (threshold_k − mean r_k)); the per-sample objective is r_0 + Σ_k lambda_k r_k.
    Checkpointable (state_dict)."""

    def __init__(self, thresholds: dict[str, float], lr: float = 0.1):
        self.names, self.lr = list(thresholds), lr
        self.thresholds = torch.tensor(list(thresholds.values()), dtype=torch.float64)
        self.lam = torch.zeros(len(thresholds), dtype=torch.float64)

    def objective(self, main: Tensor, constrained: Tensor) -> Tensor:
        """Per-sample r_0 + Σ lambda_k r_k for main [N] and constrained [N, K'] with the current multipliers."""
        return main.double() + constrained.double() @ self.lam

    def update(self, constrained: Tensor) -> dict[str, float]:
        """One dual-ascent step from the batch's constrained rewards [N, K']; returns the multipliers and slacks."""
        means = constrained.double().mean(0)
        self.lam = (self.lam + self.lr * (self.thresholds - means)).clamp(min=0)
        out = {}
        for i, name in enumerate(self.names):
            out[f"lagrange/lambda/{name}"] = float(self.lam[i])
            out[f"lagrange/slack/{name}"] = float(means[i] - self.thresholds[i])
        return out

    def state_dict(self) -> dict:
        return {"lam": self.lam}

    def load_state_dict(self, state: dict) -> None:
        self.lam = state["lam"].double()


def hypervolume_weights(means: Tensor, reference: Tensor, min_gap: float = 1e-3) -> Tensor:
    """Dynamic weights from the hypervolume of the box between a reference point and the batch's mean rewards,
    HV = Π_k (m_k − ref_k): w_k ∝ ∂HV/∂m_k = Π_{j≠k} (m_j − ref_j), normalised to sum 1, so the reward that has
    improved least (smallest gap) gets the largest weight (our reading of hypervolume-guided weight adaptation,
    Lu et al. 2025, arXiv 2509.11452; gaps are floored at `min_gap`)."""
    gaps = (means.double() - reference.double()).clamp(min=min_gap)
    inv = 1.0 / gaps  # Π_{j≠k} gap_j = HV / gap_k
    return inv / inv.sum()
