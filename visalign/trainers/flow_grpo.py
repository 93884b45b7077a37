"""Flow-GRPO (Liu et al. 2025, arXiv 2505.05470) with its fast variants as options, for every adapter.

One step = rollout (prompt groups sampled with an SDE, transitions stored, rewards scored) → group-relative
advantages over the gathered batch → PPO-clipped updates on the stored transitions' log-probs (recomputed
by `visalign.sampling.trajectory_log_prob`, the same code that sampled them) with an optional KL to the
reference policy in SDE-mean space.

Variants: SDE window (Flow-GRPO-Fast / MixGRPO: `sampling.window_size`), CPS and DanceGRPO samplers
(`sampling.sde`), shared initial noise per group and best-of-N selection (DanceGRPO), EMA of the trained
weights (flow_grpo `ema.py`), GRPO-Guard's ratio normalisation and step reweighting (`train.grpo_guard`).

    visalign train configs/flow_grpo_world.yaml
    accelerate launch -m visalign.train configs/flow_grpo_world.yaml train.lr=5e-5
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from visalign.sampling import trajectory_log_prob
from visalign.trainers.common import num_trained_steps, step_generator
from visalign.trainers.config import BaseTrainConfig, RecipeConfig
from visalign.trainers.diagnostics import RATIO_DRIFT, ROLLOUT_DRIFT
from visalign.trainers.engine import MicroBatch, MicroLoss, OnlineTrainer, StepData
from visalign.trainers.losses import grpo_loss, guard_log_ratio


@dataclass
class TrainConfig(BaseTrainConfig):
    timestep_fraction: float = field(default=1.0, metadata={"gt": 0, "le": 1,
        "help": "fraction of SDE steps trained per sample"})
    clip_range: float = field(default=1e-4, metadata={"gt": 0, "help": "PPO ratio clip epsilon (flow_grpo: 1e-4)"})
    kl_beta: float = field(default=0.0, metadata={"ge": 0, "help": "KL weight (flow_grpo GenEval: 0.04)"})
    grpo_guard: bool = field(default=False, metadata={"help": "GRPO-Guard: RatioNorm + 1/|dt| step reweighting "
                                                              "(use a tiny clip_range, e.g. 2e-6)"})

    def __post_init__(self):
        super().__post_init__()
        if self.balance.amortized:
            raise ValueError("balance.amortized needs a loss affine in the reward weight (diffusion_nft); Flow-GRPO's "
                             "clipped loss is not, so it balances explicit per-reward gradients")


@dataclass
class FlowGRPOConfig(RecipeConfig):
    """Flow-GRPO: one recipe for every model adapter."""

    trainer: Literal["flow_grpo"] = field(default="flow_grpo", metadata={"help": "which trainer runs"})
    train: TrainConfig = field(default_factory=TrainConfig)

    def drift_metrics(self) -> tuple[str, ...]:
        return (*ROLLOUT_DRIFT, *RATIO_DRIFT)

    def __post_init__(self):
        super().__post_init__()
        if self.sampling.sde == "ode":
            raise ValueError("sampling.sde=ode: Flow-GRPO needs a stochastic sampler (flow_grpo, cps or dance)")


class FlowGRPOTrainer(OnlineTrainer):
    """The recipe: PPO-clipped updates on the rollout's stored transitions. The engine runs the step."""

    name = "flow-grpo"
    drop_zero_spread_groups = True  # their advantages are 0: nothing to learn, only the KL term (flow_grpo)

    def wants_frozen_reference(self) -> bool:
        return self.cfg.train.kl_beta > 0

    def micro_batches(self, data: StepData, step: int) -> list[MicroBatch]:
        """Samples × trained timesteps: each sample trains a random subset of the stochastic steps."""
        cfg, traj, n = self.cfg, data.rs.ro.traj, len(data.weights)
        # Trainable steps: stochastic ones, never the last step (its Gaussian is the sharpest; flow_grpo).
        candidates = torch.nonzero(traj.stochastic[:-1]).flatten()
        if len(candidates) == 0:
            raise ValueError("no trainable SDE step: widen sampling.window_size or use more steps")
        k = num_trained_steps(len(candidates), cfg.train.timestep_fraction)
        g = step_generator(cfg.run.seed, step, 3 + self.accelerator.process_index)
        # Per-sample random subset of the candidate steps (DanceGRPO `randperm`, flow_grpo's per-sample perms).
        data.extra["steps"] = torch.stack([candidates[torch.randperm(len(candidates), generator=g)[:k]]
                                           for _ in range(n)])
        data.extra["local_mask"] = data.mask[data.rs.local]
        data.extra["trained_timesteps"] = k
        order = torch.randperm(n, generator=g)
        bs = cfg.train.train_batch_size
        return [MicroBatch(order[i:i + bs], j) for i in range(0, n, bs) for j in range(k)]

    def micro_loss(self, data: StepData, mb: MicroBatch, prepared) -> MicroLoss:
        cfg, traj, idx = self.cfg, data.rs.ro.traj, mb.idx
        steps_j = data.extra["steps"][idx, mb.slot]
        cond = data.rs.ro.cond.index(idx)
        out = trajectory_log_prob(self.adapter, traj, steps_j, cond, cfg.sampling.guidance, index=idx)
        ref_mean = self._reference_mean(traj, steps_j, cond, idx) if cfg.train.kl_beta > 0 else None
        old_lp = traj.log_probs[idx, steps_j].to(out.log_prob.device)
        guard = {}
        if cfg.train.grpo_guard:
            sig = traj.sigmas.to(out.log_prob.device)
            guard = {"log_ratio": guard_log_ratio(out.log_prob, old_lp, out.mean,
                                                  traj.means[idx, steps_j].to(out.mean.device), out.std),
                     "step_weight": 1.0 / (sig[steps_j] - sig[steps_j + 1])}
        dev = out.log_prob.device
        mask = data.extra["local_mask"][idx].to(dev)

        def loss(advantages: torch.Tensor):
            return grpo_loss(out.log_prob, old_lp, advantages[idx].to(dev), cfg.train.clip_range, mask=mask,
                             mean=out.mean, ref_mean=ref_mean, std=out.std, kl_beta=cfg.train.kl_beta, **guard)

        return MicroLoss(loss)

    def step_metrics(self, data: StepData) -> dict:
        adv, mask = data.adv, data.mask
        return {"advantages/mean": adv[mask].mean().item() if mask.any() else 0.0,
                "advantages/abs_mean": adv[mask].abs().mean().item() if mask.any() else 0.0,
                "trained_fraction": mask.float().mean().item(),
                "train/first_ratio_max_dev": (self.first_micro_metrics or {}).get("ratio_max_dev"),
                "train/trained_timesteps": data.extra["trained_timesteps"]}

    @torch.no_grad()
    def _reference_mean(self, traj, steps_j, cond, idx):
        """The reference policy's transition mean (LoRA disabled, or the frozen copy of full fine-tuning)."""
        with self.reference_policy():
            return trajectory_log_prob(self.adapter, traj, steps_j, cond, self.cfg.sampling.guidance, index=idx).mean

    def progress_postfix(self, metrics: dict) -> dict:
        return {**super().progress_postfix(metrics), "ratio": f"{metrics.get('drift/ratio_mean', 1):.4f}"}


__all__ = ["FlowGRPOConfig", "FlowGRPOTrainer"]
