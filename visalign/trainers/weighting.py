"""One step's advantages, training mask and multi-reward weighting, computed once from the gathered scores.

`train.advantage` configures it. The advantage of the weighted rewards is group-relative (`group_advantages`):
a weighted sum of the rewards, of per-reward advantages (GDPO), CMO or hypervolume weights, or the Lagrangian of
`constraints` (`visalign.trainers.balance.advantages`). With `train.balance` each reward also keeps its own
advantage, for the engine to combine in gradient space. The training mask keeps finite rewards, the Pareto-optimal
samples (`pareto_filter`), each group's extremes (`best_of_n`), and, for a recipe that asks, drops groups without
reward spread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from visalign.rewards import Reward
from visalign.trainers.advantages import best_of_n_mask, combine_advantages, group_advantages
from visalign.trainers.balance import LagrangeThresholds, cmo_advantages, hypervolume_weights, pareto_mask
from visalign.trainers.config import AdvantageConfig


@dataclass
class StepAdvantages:
    adv: Tensor  # the weighted rewards' advantage [N], gathered order
    per_reward: dict[str, Tensor] | None  # each trained reward's own advantage [N] (train.balance), else None
    mask: Tensor  # bool [N]: samples to train on
    metrics: dict


class AdvantageWeighting:
    """Called once per step with the gathered scores; holds the state that spans steps (Lagrange multipliers)."""

    def __init__(self, cfg: AdvantageConfig, weights: dict[str, float], rewards: dict[str, Reward], *, per_reward: bool,
                 drop_zero_spread: bool):
        self.cfg, self.weights, self.names = cfg, dict(weights), list(weights)
        self.keep_per_reward, self.drop_zero_spread = per_reward, drop_zero_spread
        self.lagrange = LagrangeThresholds(dict(cfg.constraints), cfg.constraint_lr) if cfg.constraints else None
        self.hypervolume_reference = None
        if cfg.mode == "hypervolume":
            self.hypervolume_reference = dict(cfg.hypervolume_reference or {})
            for name, reward in rewards.items():
                if name not in self.hypervolume_reference:
                    low = (reward.value_range or (None, None))[0]
                    if low is None or not math.isfinite(low):
                        raise ValueError(f"advantage.mode=hypervolume: {name} has no finite lower bound; set "
                                         "train.advantage.hypervolume_reference")
                    self.hypervolume_reference[name] = float(low)

    def __call__(self, scores: dict[str, Tensor], groups: Tensor, valid: Tensor) -> StepAdvantages:
        adv, metrics = self.advantages(scores, groups, valid)
        per_reward = self.per_reward_advantages(scores, groups, valid, metrics=metrics) if self.keep_per_reward \
            else None
        mask = self.training_mask(scores, valid)
        if self.drop_zero_spread and per_reward is None and metrics["zero_std_fraction"] > 0:
            mask = mask & (adv != 0)  # zero-spread groups carry no signal (flow_grpo drops them); masked, not removed
        if self.cfg.best_of_n is not None:
            mask = mask & best_of_n_mask(adv, groups, self.cfg.best_of_n)
        return StepAdvantages(adv, per_reward, mask, metrics)

    def advantages(self, scores: dict[str, torch.Tensor], groups: torch.Tensor, valid: torch.Tensor):
        """Group-relative advantages of the trained rewards over the gathered batch, and their metrics: weighted
        sum of rewards, of per-reward advantages (GDPO), CMO or hypervolume weights, or the Lagrangian of
        `constraints` (`visalign.trainers.balance.advantages`)."""

        cfg = self.cfg
        weights = dict(self.weights)
        kw = {"eps": cfg.eps, "global_std": cfg.global_std, "clip": cfg.clip, "valid": valid}
        metrics = {}
        if self.lagrange is not None:
            free = [n for n in weights if n not in self.lagrange.names]
            bound = torch.stack([scores[n].double() for n in self.lagrange.names], 1)
            main = sum(weights[n] * scores[n].double() for n in free)
            total = self.lagrange.objective(main, bound)
            metrics.update(self.lagrange.update(bound[valid]))  # after use: this step's objective, next step's lambda
            adv, m = group_advantages(total, groups, **kw)
            return adv, {**m, **metrics}
        if cfg.mode == "sum_then_normalize" or len(weights) == 1:
            total = sum(w * scores[name].double() for name, w in weights.items())
            return group_advantages(total, groups, **kw)
        if cfg.mode == "cmo":
            stacked = torch.stack([scores[n].double() for n in weights], 1)
            adv = torch.zeros(len(groups), dtype=torch.float64)
            adv[valid], w = cmo_advantages(stacked[valid], groups[valid], cfg.cmo_tau, cfg.eps)
            adv = adv.clamp(-cfg.clip, cfg.clip)
            metrics.update({f"cmo/weight/{n}": float(w[:, i].mean()) for i, n in enumerate(weights)})
            return adv, {**metrics, "zero_std_fraction": float((adv == 0).float().mean())}
        if cfg.mode == "hypervolume":
            means = torch.stack([scores[n][valid].double().mean() for n in weights])
            reference = torch.tensor([self.hypervolume_reference[n] for n in weights], dtype=torch.float64)
            dyn = hypervolume_weights(means, reference)
            weights = {n: float(dyn[i]) for i, n in enumerate(weights)}
            metrics.update({f"hypervolume/weight/{n}": w for n, w in weights.items()})
        per_reward = self.per_reward_advantages(scores, groups, valid, weights, metrics)
        adv = combine_advantages(per_reward, weights)
        metrics["zero_std_fraction"] = float((adv == 0).float().mean())
        return adv, metrics

    def per_reward_advantages(self, scores, groups, valid, names=None, metrics: dict | None = None) -> dict:
        """{reward: group-normalised advantage [N]} for each trained reward (unweighted)."""
        cfg = self.cfg
        kw = {"eps": cfg.eps, "global_std": cfg.global_std, "clip": cfg.clip, "valid": valid}
        out = {}
        for name in names or self.names:
            out[name], m = group_advantages(scores[name], groups, **kw)
            if metrics is not None:
                metrics.update({f"{k}/{name}": v for k, v in m.items()})
        return out

    def training_mask(self, scores: dict[str, torch.Tensor], valid: torch.Tensor) -> torch.Tensor:
        """Samples to train on: finite rewards, and with `pareto_filter` only the batch's non-dominated ones."""
        if not self.cfg.pareto_filter:
            return valid

        keep = torch.zeros_like(valid)
        stacked = torch.stack([scores[n].double() for n in self.names], 1)
        keep[valid] = pareto_mask(stacked[valid])
        return keep
