"""DGPO, group-level preference optimisation on deterministic rollouts (`trainer: dgpo`; Luo et al., ICLR 2026;
Luo-Yihong/DGPO `scripts/train_sd3_dgpo.py`). No log-probabilities: ODE rollouts, then the flow-matching errors
of the trained and the reference velocities on each group's samples at the group's shared noise levels and noise.
A group's samples above its mean reward form G+, those below G-, weighted by |A_i|; the loss is the DPO loss of
the group scores, -log sigmoid(R(G+) - R(G-)) with R(x) = -beta (l_theta(x) - l_ref(x))
(`visalign.trainers.losses.dgpo_loss`), plus a KL to the base, and the reference's clip against a fast EMA of the
trained weights, old ← d old + (1 - d) theta with d = min(0.001 step, 0.3).

    visalign train configs/dgpo_world.yaml
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from visalign.trainers.config import AdvantageConfig, RecipeConfig, SamplingConfig, batch_std_advantage, ode_sampling
from visalign.trainers.diagnostics import RATIO_DRIFT, ROLLOUT_DRIFT
from visalign.trainers.engine import MicroBatch, MicroLoss, StepData
from visalign.trainers.forward import OldPolicyTrainConfig, OldPolicyTrainer, noised
from visalign.trainers.losses import dgpo_loss, per_sample_mse


@dataclass
class DGPOTrainConfig(OldPolicyTrainConfig):
    beta: float = field(default=100.0, metadata={"gt": 0, "help": "DPO beta of the implicit reward (DGPO: 100)"})
    kl_beta: float = field(default=0.02, metadata={"ge": 0,
        "help": "weight of ||v - v_ref||² to the base (DGPO: 0.02)"})
    clip_range: float | None = field(default=1e-2, metadata={"gt": 0,
        "help": "no gradient for a sample whose ratio exp(l_old - l_theta) left [1 - c, 1 + c] in its advantage's "
                "direction (DGPO: 1e-2; null = off, and no old-policy pass)"})
    old_decay_max: float = field(default=0.3, metadata={"ge": 0, "lt": 1,
        "help": "upper bound of the old-policy decay (DGPO: 0.3)"})
    timesteps_per_sample: int = field(default=4, metadata={"ge": 1,
        "help": "noise levels per group and step (DGPO: 4)"})
    min_sigma: float = field(default=0.3, metadata={"ge": 0, "lt": 1,
        "help": "train noise levels >= this (DGPO: the first 60%)"})
    group_noise: bool = field(default=True, metadata={
        "help": "a group's samples share noise levels and noise (required: the group is compared at equal noise)"})
    advantage: AdvantageConfig = field(default_factory=batch_std_advantage, metadata={
        "help": "advantages by the batch std (DGPO)"})

    def __post_init__(self):
        super().__post_init__()
        if not self.group_noise:
            raise ValueError("train.group_noise must stay true: DGPO compares a group's samples at shared noise")
        if self.train_batch_size % self.group_size:
            raise ValueError(f"train_batch_size={self.train_batch_size} must be a multiple of group_size="
                             f"{self.group_size}: a micro-batch holds whole groups")
        if self.balance.amortized:
            raise ValueError("balance.amortized needs a loss affine in the advantage; DGPO's group weight "
                             "sigmoid(S_g) is not, so it balances explicit per-reward gradients")


@dataclass
class DGPOConfig(RecipeConfig):
    """DGPO: group-level preference optimisation on ODE rollouts."""

    trainer: Literal["dgpo"] = field(default="dgpo", metadata={"help": "which trainer runs"})
    sampling: SamplingConfig = field(default_factory=ode_sampling)
    train: DGPOTrainConfig = field(default_factory=DGPOTrainConfig)

    def drift_metrics(self) -> tuple[str, ...]:
        return (*ROLLOUT_DRIFT, *RATIO_DRIFT) if self.train.clip_range is not None else ROLLOUT_DRIFT


class DGPOTrainer(OldPolicyTrainer):
    name = "dgpo"
    whole_groups = True  # the group score S_g sums over a group's samples in one micro-batch

    def wants_frozen_reference(self) -> bool:
        return True  # the implicit reward compares with the base

    def _build(self) -> None:
        if self.cfg.train.prompts_per_step % self.accelerator.num_processes:
            raise ValueError("DGPO keeps each group on one process: prompts_per_step must be divisible by the "
                             "number of processes")
        super()._build()

    def weigh(self, data: StepData) -> None:
        super().weigh(data)
        data.extra["keep"] = torch.arange(len(data.weights))  # whole groups; invalid samples have A = 0

    def prepare_micro(self, data: StepData, mb: MicroBatch) -> dict:
        """x_sigma at the group's noise, and the base's and the old policy's errors there (no gradient)."""
        idx, x0, noise = self.noised_sample(data, mb)
        x_t, target = noised(x0, noise, mb.sigma), noise - x0
        cond = data.rs.ro.cond.index(idx)
        v_ref = self.reference_velocity(x_t, mb.sigma, cond)
        v_old = self.old_velocity(x_t, mb.sigma, cond) if self.cfg.train.clip_range is not None else None
        return {"idx": idx, "x_t": x_t, "target": target, "cond": cond, "v_ref": v_ref,
                "err_ref": per_sample_mse(v_ref, target),
                "err_old": None if v_old is None else per_sample_mse(v_old, target)}

    def micro_loss(self, data: StepData, mb: MicroBatch, prepared: dict) -> MicroLoss:
        train, p = self.cfg.train, prepared
        v = self.velocity(p["x_t"], mb.sigma, p["cond"])
        err = per_sample_mse(v, p["target"])
        err_old = err.detach() if p["err_old"] is None and train.clip_range is not None else p["err_old"]
        groups = data.rs.plan.groups[p["idx"]]
        kl = (v - p["v_ref"]).pow(2).mean(dim=tuple(range(1, v.ndim)))

        def loss(weights: torch.Tensor):
            value, metrics = dgpo_loss(err, p["err_ref"], weights[p["idx"]].to(err.device), groups, train.beta,
                                       train.group_size, err_old, train.clip_range)
            metrics["kl"] = kl.mean().item()
            return value + train.kl_beta * kl.mean(), metrics

        return MicroLoss(loss, v)


__all__ = ["DGPOConfig", "DGPOTrainer"]
