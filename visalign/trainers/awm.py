"""Advantage Weighted Matching (`trainer: awm`; Xue et al., ICML 2026; scxue/advantage_weighted_matching
`scripts/train_sd3_awm.py`): the pretraining objective, flow matching on the clean samples of each rollout with
fresh noise, weighted by the samples' group advantages. No log-probabilities of the sampler, so any rollout
sampler works.

    A_i = clip(group-relative advantage, ±train.advantage.clip) / train.advantage.clip       (advantage_max 1)
    L   = mean_i -A_i exp(lp_i - sg(lp_i)) + kl_beta ||v - v_ref||² + old_beta ||v - v_old||²
    lp_i = -sigma [(l_i + 1e-10)^p - (1e-10)^p] / p,     l_i = ||v_theta(x_sigma) - (eps - x0_i)||²

(`visalign.trainers.losses.awm_loss`). The noise levels are one grid level from each of
`timesteps_per_sample` bins (`sigma_sampling: stratified`), the advantages use the global std as the reference
does, v_ref is the frozen base (LoRA disabled) and v_old a fast EMA of the trained weights,
old ← d old + (1 - d) theta with d = min(0.001 step, 0.3) (the reference's "KL-EMA").

    visalign train configs/awm_world.yaml
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from visalign.trainers.config import AdvantageConfig, RecipeConfig, SamplingConfig, batch_std_advantage, ode_sampling
from visalign.trainers.engine import MicroBatch, MicroLoss, StepData
from visalign.trainers.forward import OldPolicyTrainConfig, OldPolicyTrainer, noised
from visalign.trainers.losses import awm_loss


@dataclass
class AWMTrainConfig(OldPolicyTrainConfig):
    power: float = field(default=0.25, metadata={"gt": 0,
        "help": "generalised-Huber power p of the per-sample error (the reference's 'ghuber' weighting); 1 gives "
                "the sigma-weighted flow-matching loss"})
    kl_beta: float = field(default=1e-3, metadata={"ge": 0,
        "help": "weight of ||v - v_ref||² to the base (AWM GenEval: 1e-3)"})
    old_beta: float = field(default=1.0, metadata={"ge": 0,
        "help": "weight of ||v - v_old||² to the fast EMA (ema_beta)"})
    old_decay_max: float = field(default=0.3, metadata={"ge": 0, "lt": 1,
        "help": "upper bound of the EMA decay (AWM: 0.3)"})
    timesteps_per_sample: int = field(default=6, metadata={"ge": 1, "help": "noise levels trained per sample (AWM: 6)"})
    sigma_sampling: Literal["grid", "logit_normal", "stratified"] = field(default="stratified", metadata={
        "help": "noise levels: one grid level per bin of the schedule's first 90% (AWM), the grid, or logit-normal"})
    advantage: AdvantageConfig = field(default_factory=batch_std_advantage, metadata={
        "help": "advantages by the batch std (AWM)"})



@dataclass
class AWMConfig(RecipeConfig):
    """Advantage Weighted Matching: advantage-weighted flow matching on rollouts."""

    trainer: Literal["awm"] = field(default="awm", metadata={"help": "which trainer runs"})
    sampling: SamplingConfig = field(default_factory=ode_sampling)
    train: AWMTrainConfig = field(default_factory=AWMTrainConfig)


class AWMTrainer(OldPolicyTrainer):
    name = "awm"

    def weigh(self, data: StepData) -> None:
        """The advantages scaled to [-1, 1] (clip ±advantage.clip, divided by it); every valid sample is trained."""
        super().weigh(data)
        scale = self.cfg.train.advantage.clip
        data.weights = data.weights / scale
        if data.per_reward is not None:
            data.per_reward = data.per_reward / scale
        data.extra["keep"] = data.mask[data.rs.local].nonzero().flatten()

    def prepare_micro(self, data: StepData, mb: MicroBatch) -> dict:
        """x_sigma with fresh noise, and the base's and the EMA's velocities there (no gradient)."""
        idx, x0, noise = self.noised_sample(data, mb)
        x_t = noised(x0, noise, mb.sigma)
        cond = data.rs.ro.cond.index(idx)
        train = self.cfg.train
        return {"idx": idx, "x_t": x_t, "target": noise - x0, "cond": cond,
                "v_ref": self.reference_velocity(x_t, mb.sigma, cond) if train.kl_beta > 0 else None,
                "v_old": self.old_velocity(x_t, mb.sigma, cond) if train.old_beta > 0 else None}

    def micro_loss(self, data: StepData, mb: MicroBatch, prepared: dict) -> MicroLoss:
        train, p = self.cfg.train, prepared
        v = self.velocity(p["x_t"], mb.sigma, p["cond"])
        v_old = v.detach() if p["v_old"] is None else p["v_old"]  # the EMA still equals the trained weights
        idx = data.extra["keep"][mb.idx]

        def loss(weights):
            return awm_loss(v, p["target"], mb.sigma, weights[idx].to(v.device), power=train.power,
                            v_ref=p["v_ref"], kl_beta=train.kl_beta, v_old=v_old, old_beta=train.old_beta)

        return MicroLoss(loss, v)

    def step_metrics(self, data: StepData) -> dict:
        return {"trained_fraction": len(data.extra["keep"]) / max(1, len(data.weights))}


__all__ = ["AWMConfig", "AWMTrainer"]
