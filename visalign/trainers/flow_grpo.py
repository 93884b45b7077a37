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

import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from visalign.sampling import trajectory_log_prob
from visalign.trainers.advantages import best_of_n_mask
from visalign.trainers.common import checkpoint_dirs, num_trained_steps, step_generator
from visalign.trainers.engine import (
    REWARD_OPTIONS_HELP,
    BaseTrainConfig,
    ModelConfig,
    OnlineTrainer,
    RunConfig,
    SamplingConfig,
    accumulation_schedule,
    check_rewards,
)
from visalign.trainers.losses import grpo_loss, guard_log_ratio


@dataclass
class TrainConfig(BaseTrainConfig):
    timestep_fraction: float = field(default=1.0, metadata={"help": "fraction of SDE steps trained per sample"})
    clip_range: float = field(default=1e-4, metadata={"help": "PPO ratio clip epsilon (flow_grpo: 1e-4)"})
    kl_beta: float = field(default=0.0, metadata={"help": "KL weight (flow_grpo GenEval: 0.04)"})
    grpo_guard: bool = field(default=False, metadata={"help": "GRPO-Guard: RatioNorm + 1/|dt| step reweighting "
                                                              "(use a tiny clip_range, e.g. 2e-6)"})
    best_of_n: int | None = field(default=None, metadata={"help": "train only on the n/2 best and worst per group"})

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.timestep_fraction <= 1:
            raise ValueError(f"timestep_fraction={self.timestep_fraction} must be in (0, 1]")
        if self.best_of_n is not None and not (2 <= self.best_of_n <= self.group_size and self.best_of_n % 2 == 0):
            raise ValueError(f"best_of_n={self.best_of_n} must be even and in [2, group_size]")
        if self.balance_amortized:
            raise ValueError("balance_amortized needs a loss affine in the reward weight (diffusion_nft); Flow-GRPO's "
                             "clipped loss is not, so it balances explicit per-reward gradients")


@dataclass
class FlowGRPOConfig:
    """Flow-GRPO: one recipe for every model adapter."""

    trainer: Literal["flow_grpo"] = field(default="flow_grpo", metadata={"help": "which trainer runs"})
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    rewards: dict[str, float] = field(default_factory=lambda: {"world-verifier": 1.0},
                                      metadata={"help": "trained rewards and their weights"})
    eval_rewards: list[str] = field(default_factory=list, metadata={"help": "held-out rewards, logged only"})
    reward_options: dict[str, dict[str, Any]] = field(default_factory=dict, metadata=REWARD_OPTIONS_HELP)

    def __post_init__(self):
        check_rewards(self.rewards, self.eval_rewards, sampling=self.sampling, train=self.train,
                      options=self.reward_options)
        if self.sampling.sde == "ode":
            raise ValueError("sampling.sde=ode: Flow-GRPO needs a stochastic sampler (flow_grpo, cps or dance)")


class FlowGRPOTrainer(OnlineTrainer):
    """The recipe. `train()` runs to `train.max_steps`, resuming from the latest checkpoint if any."""

    name = "flow-grpo"

    def wants_frozen_reference(self) -> bool:
        return self.cfg.train.kl_beta > 0

    # ---- one step ----------------------------------------------------------------------------------------
    def step(self, step: int) -> dict:
        """Rollout, advantages and updates of one step. Returns the step's metrics."""
        cfg = self.cfg
        t0 = time.perf_counter()
        rs = self.rollout_step(step)
        ro, gathered, groups, valid = rs.ro, rs.gathered, rs.groups, rs.valid
        adv, adv_metrics = self.advantages(gathered, groups, valid)
        mask = self.training_mask(gathered, valid).clone()
        per_reward = None
        if self.balancer is not None:  # one advantage per reward, combined in gradient space
            per = self.per_reward_advantages(gathered, groups, valid, metrics=adv_metrics)
            per_reward = torch.stack([per[n] for n in cfg.rewards])[:, rs.local]
        elif adv_metrics["zero_std_fraction"] > 0:
            mask &= adv != 0  # zero-spread groups carry no signal (flow_grpo drops them); masked, not removed
        if cfg.train.best_of_n is not None:
            mask &= best_of_n_mask(adv, groups, cfg.train.best_of_n)
        local = rs.local
        t_train = time.perf_counter()
        train_metrics = self._update(ro, adv[local], mask[local], step, per_reward)
        train_metrics["time/training"] = time.perf_counter() - t_train

        metrics = {"step": step, **ro.timings, **adv_metrics, **train_metrics,
                   "invalid_rewards": int((~valid).sum()), "time/step": time.perf_counter() - t0}
        metrics.update(self.reward_metrics(gathered))
        metrics["advantages/mean"] = adv[mask].mean().item() if mask.any() else 0.0
        metrics["advantages/abs_mean"] = adv[mask].abs().mean().item() if mask.any() else 0.0
        metrics["trained_fraction"] = mask.float().mean().item()
        return metrics

    def _update(self, ro, adv: torch.Tensor, mask: torch.Tensor, step: int,
                per_reward: torch.Tensor | None = None) -> dict:
        """PPO updates over samples × trained timesteps. With `per_reward` advantages [K, n] (train.balance), each
        micro-batch's K losses share one forward and give K gradients; their balanced combination is applied at
        each optimizer step."""
        cfg, acc = self.cfg, self.accelerator
        traj, n = ro.traj, len(adv)
        # Trainable steps: stochastic ones, never the last step (its Gaussian is the sharpest; flow_grpo).
        candidates = torch.nonzero(traj.stochastic[:-1]).flatten()
        if len(candidates) == 0:
            raise ValueError("no trainable SDE step: widen sampling.window_size or use more steps")
        k = num_trained_steps(len(candidates), cfg.train.timestep_fraction)
        g = step_generator(cfg.run.seed, step, 3 + acc.process_index)
        # Per-sample random subset of the candidate steps (DanceGRPO `randperm`, flow_grpo's per-sample perms).
        steps_per_sample = torch.stack([candidates[torch.randperm(len(candidates), generator=g)[:k]] for _ in range(n)])
        order = torch.randperm(n, generator=g)
        bs = cfg.train.train_batch_size
        chunks = [order[i:i + bs] for i in range(0, n, bs)]
        micro = [(c, j) for c in chunks for j in range(k)]
        # Accumulate over samples × timesteps; each optimizer step averages its micro-steps' losses.
        schedule = accumulation_schedule(len(micro), cfg.train.optimizer_steps_per_rollout, [len(c) for c, _ in micro])
        guidance = cfg.sampling.guidance
        self.model.train()
        logs: dict[str, list[float]] = {}
        first_ratio_dev = None
        balance_logs: dict[str, float] = {}
        for (idx, j), (size, last) in zip(micro, schedule, strict=True):
            steps_j = steps_per_sample[idx, j]
            cond = ro.cond.index(idx)
            with self.micro_context(last) if per_reward is None else self.balance_context():
                out = trajectory_log_prob(self.adapter, traj, steps_j, cond, guidance, index=idx)
                ref_mean = self._reference_mean(traj, steps_j, cond, idx) if cfg.train.kl_beta > 0 else None
                old_lp = traj.log_probs[idx, steps_j].to(out.log_prob.device)
                guard = {}
                if cfg.train.grpo_guard:
                    sig = traj.sigmas.to(out.log_prob.device)
                    guard = {"log_ratio": guard_log_ratio(out.log_prob, old_lp, out.mean,
                                                          traj.means[idx, steps_j].to(out.mean.device), out.std),
                             "step_weight": 1.0 / (sig[steps_j] - sig[steps_j + 1])}
                dev = out.log_prob.device
                # One loss per advantage (with train.balance, one per reward), all on this micro-batch's forward.
                losses = [grpo_loss(out.log_prob, old_lp, a[idx].to(dev), cfg.train.clip_range, mask=mask[idx].to(dev),
                                    mean=out.mean, ref_mean=ref_mean, std=out.std, kl_beta=cfg.train.kl_beta, **guard)
                          for a in ([adv] if per_reward is None else per_reward)]
                if per_reward is None:
                    acc.backward(losses[0][0] / size)
                else:
                    for r, (loss, _) in enumerate(losses):
                        self.grad_buffer.add(r, loss / size, retain_graph=r + 1 < len(losses))
                m = losses[-1][1]  # logged: the last reward's metrics
            if first_ratio_dev is None:
                first_ratio_dev = m["ratio_max_dev"]
            for key, v in m.items():
                logs.setdefault(key, []).append(v)
            if last:
                if per_reward is not None:
                    alpha, balance_logs = self.balance_update()
                    self.grad_buffer.apply(alpha)
                    self.grad_buffer.zero()
                logs.setdefault("grad_norm", []).append(self.optimizer_step())
        if self.ema is not None:
            self.ema.update(step)
        metrics = {f"train/{k}": sum(v) / len(v) for k, v in logs.items()}
        metrics["train/first_ratio_max_dev"] = first_ratio_dev
        metrics["train/trained_timesteps"] = k
        metrics.update(balance_logs)
        return metrics

    @torch.no_grad()
    def _reference_mean(self, traj, steps_j, cond, idx):
        """The reference policy's transition mean: LoRA disabled, or the frozen copy for full fine-tuning."""
        if self.ref_denoiser is None:
            with self.adapter.lora_disabled():
                return trajectory_log_prob(self.adapter, traj, steps_j, cond, self.cfg.sampling.guidance,
                                           index=idx).mean
        self.adapter.set_forward_module(self.ref_denoiser)
        try:
            return trajectory_log_prob(self.adapter, traj, steps_j, cond, self.cfg.sampling.guidance, index=idx).mean
        finally:
            self.adapter.set_forward_module(self.model)

    def progress_postfix(self, metrics: dict) -> dict:
        return {**super().progress_postfix(metrics), "ratio": f"{metrics.get('train/ratio_mean', 1):.4f}"}


__all__ = ["FlowGRPOConfig", "FlowGRPOTrainer", "ModelConfig", "RunConfig", "SamplingConfig", "checkpoint_dirs"]
