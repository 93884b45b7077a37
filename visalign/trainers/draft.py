"""Direct reward backprop (`trainer: draft`) for differentiable rewards: the gradient of the reward of a generated
sample flows back through the last sampling step(s) into the weights. Three forms, all on ODE rollouts, whose
stored latents supply the no-gradient part of the chain:

- `mode: draft` — DRaFT-K (Clark et al. 2023, arXiv 2309.17400): the last `truncation_steps` Euler steps are
  re-run with gradient from the rollout's x at step N - K (each step checkpointed, so memory grows with one
  step's activations, not K), then decoded and scored.
- `mode: refl` — ReFL (Xu et al. 2023; THUDM/ImageReward `ImageReward/ReFL.py`): one step at a random late step
  of the rollout, its x0-prediction x - sigma v decoded and scored.
- `mode: direct_align` — SRPO's Direct-Align (Tencent-Hunyuan/SRPO `fastvideo/SRPO.py`): the rollout's sample is
  re-noised with the very noise that generated it to a random sigma_hi, one Euler step to sigma_lo = sigma_hi - Δ
  is taken with gradient, and x0 is recovered exactly, x0 = (x' - sigma_lo eps) / (1 - sigma_lo).

Loss: -mean(sum_k w_k r_k) or, with `reward_margin` m, mean ReLU(m - r) (`reward_backprop_loss`), plus an
optional KL to the base, kl_beta ||v - v_ref||² on the trained steps (DRaFT+). The rewards are combined as their
weighted sum inside the loss, so gradient-space balancing does not apply (a config-time error).

With `ctrl_u_weight` λ (Ctrl-U, `ctrl_u_loss`; direct_align with a margin) each sample is also re-noised with the
same noise at sigma_hi + `ctrl_u_offset`, the reference's two timesteps t and t + 1, and decoded and scored a second
time; the disagreement U = |r1 - r2| of the two generations weights the reward loss: mean(ReLU(m - r1) exp(-U)) +
λ mean(U). This is the one place visalign backpropagates a reward's loss per sample, so it is where Ctrl-U applies.

    visalign train configs/draft_world.yaml
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from visalign.prompts import Prompt
from visalign.rewards.base import combined
from visalign.rewards.registry import describe
from visalign.sampling.steps import ode_step
from visalign.trainers.common import step_generator
from visalign.trainers.config import BaseTrainConfig, RecipeConfig, SamplingConfig, ode_sampling
from visalign.trainers.engine import MicroBatch, MicroLoss, OnlineTrainer, StepData
from visalign.trainers.losses import ctrl_u_loss, reward_backprop_loss


@dataclass
class DraftTrainConfig(BaseTrainConfig):
    mode: Literal["draft", "refl", "direct_align"] = field(default="draft", metadata={
        "help": "draft: backprop through the last truncation_steps sampling steps; refl: one x0-prediction at a "
                "random late step; direct_align: SRPO's re-noising with the known noise and exact x0 recovery"})
    truncation_steps: int = field(default=1, metadata={"ge": 1,
        "help": "draft: the K last steps with gradient (DRaFT-K)"})
    refl_fraction: float = field(default=0.25, metadata={"gt": 0, "le": 1,
        "help": "refl: the step is drawn from the last fraction of the schedule (ReFL: steps 30-39 of 40)"})
    align_sigma: tuple[float, float] = field(default=(0.75, 0.96), metadata={"gt": 0, "lt": 1,
        "help": "direct_align: range of sigma_hi (SRPO: the early-to-middle steps, [0.75, 0.96])"})
    align_step: float = field(default=0.02, metadata={"gt": 0,
        "help": "direct_align: Δsigma of the one step (SRPO: ~0.02)"})
    reward_margin: float | None = field(default=None, metadata={"gt": 0,
        "help": "loss mean ReLU(margin - r) instead of -mean r (ReFL: 2 on ImageReward's scale; SRPO: 0.7)"})
    kl_beta: float = field(default=0.0, metadata={"ge": 0,
        "help": "weight of ||v - v_ref||² on the trained steps (DRaFT+)"})
    train_guidance: float = field(default=1.0, metadata={"ge": 0,
        "help": "CFG scale of the trained prediction (the rollout's `sampling.guidance` for draft, to continue the "
                "same ODE)"})
    ctrl_u_weight: float | None = field(default=None, metadata={"ge": 0,
        "help": "Ctrl-U's λ: weigh each sample's reward loss by exp(-U), U = |r1 - r2| over a second generation "
                "at sigma_hi + ctrl_u_offset, plus λ mean(U) (direct_align with reward_margin; reference: 0.1 for "
                "depth and edges; None = off)"})
    ctrl_u_offset: float = field(default=0.001, metadata={"gt": 0,
        "help": "Ctrl-U: Δsigma of the second generation (the reference's one timestep of 1000)"})

    def __post_init__(self):
        super().__post_init__()
        lo, hi = self.align_sigma
        if not 0 < self.align_step < lo <= hi < 1:
            raise ValueError(f"align_sigma={self.align_sigma} and align_step={self.align_step} must satisfy "
                             "0 < align_step < low <= high < 1")
        if self.ctrl_u_weight is not None:
            if self.mode != "direct_align" or self.reward_margin is None:
                raise ValueError("ctrl_u_weight (Ctrl-U) re-noises each sample with its own noise at two sigmas and "
                                 "weighs a non-negative reward loss: set mode=direct_align and reward_margin")
            if hi + self.ctrl_u_offset >= 1:
                raise ValueError(f"ctrl_u_offset={self.ctrl_u_offset}: the second generation's sigma align_sigma "
                                 f"high + offset = {hi + self.ctrl_u_offset} must stay below 1")
        if self.balance.on or self.advantage.mode != "sum_then_normalize" or self.advantage.constraints:
            raise ValueError("draft backpropagates the weighted sum of the rewards itself: train.balance, "
                             "advantage.mode and advantage.constraints do not apply")



@dataclass
class DraftConfig(RecipeConfig):
    """Direct reward backprop (DRaFT-K, ReFL, Direct-Align) for differentiable rewards."""

    trainer: Literal["draft"] = field(default="draft", metadata={"help": "which trainer runs"})
    sampling: SamplingConfig = field(default_factory=ode_sampling)
    train: DraftTrainConfig = field(default_factory=DraftTrainConfig)
    rewards: dict[str, float] = field(default_factory=lambda: {"world-soft": 1.0},
                                      metadata={"help": "differentiable rewards and their weights"})

    def __post_init__(self):
        super().__post_init__()
        for name in self.rewards:
            if not describe(name)["differentiable"]:
                raise ValueError(f"draft backpropagates through the rewards; {name} is not differentiable (e.g. "
                                 "world-soft, brightness, saturation, aesthetic, pickscore are)")
        if self.sampling.sde != "ode":
            raise ValueError("draft continues the rollout's own ODE from its stored latents: set sampling.sde=ode")
        if self.train.mode == "draft" and self.train.truncation_steps > self.sampling.steps:
            raise ValueError(f"truncation_steps={self.train.truncation_steps} exceeds sampling.steps="
                             f"{self.sampling.steps}")


def direct_align_x0(x_hi: Tensor, v: Tensor, noise: Tensor, sigma_hi: float, sigma_lo: float) -> Tensor:
    """SRPO's Direct-Align recovery (Tencent-Hunyuan/SRPO `fastvideo/SRPO.py`): one Euler step from x_hi, noised with
    the known `noise`, to sigma_lo, then x0 = (x' - sigma_lo noise) / (1 - sigma_lo). Exactly x0 when v is the true
    velocity noise - x0; the gradient passes through the one prediction, scaled by Δsigma / (1 - sigma_lo)."""
    x_lo = ode_step(x_hi, v, sigma_hi, sigma_lo)
    return (x_lo - sigma_lo * noise) / (1 - sigma_lo)


class DraftTrainer(OnlineTrainer):
    name = "draft"

    def wants_frozen_reference(self) -> bool:
        return self.cfg.train.kl_beta > 0

    def weigh(self, data: StepData) -> None:
        """Every sample is trained, with weight 1: the rewards' own gradient is the signal."""
        data.weights = torch.ones(len(data.rs.plan.items))

    def micro_batches(self, data: StepData, step: int) -> list[MicroBatch]:
        n, bs = len(data.weights), self.cfg.train.train_batch_size
        g = step_generator(self.cfg.run.seed, step, 3 + self.accelerator.process_index)
        order = torch.randperm(n, generator=g)
        micro = [MicroBatch(order[i:i + bs], 0) for i in range(0, n, bs)]
        data.extra["generator"] = g
        return micro

    def prepare_micro(self, data: StepData, mb: MicroBatch) -> dict:
        """Where the chain with gradient starts, drawn for this micro-batch (no gradient)."""
        train, n_steps = self.cfg.train, len(data.rs.ro.traj.sigmas) - 1
        g = data.extra["generator"]
        if train.mode == "draft":
            return {"start": n_steps - train.truncation_steps}
        if train.mode == "refl":
            first = n_steps - max(1, round(train.refl_fraction * n_steps))
            return {"start": int(torch.randint(first, n_steps, (1,), generator=g))}
        lo, hi = train.align_sigma
        return {"sigma_hi": float(lo + (hi - lo) * torch.rand((), generator=g))}

    def _velocity(self, x: Tensor, sigma: float, cond, v_ref_terms: list) -> Tensor:
        s = torch.full((len(x),), sigma, device=x.device)
        v = self.adapter.predict_velocity(x, s, cond, self.cfg.train.train_guidance)
        if self.cfg.train.kl_beta > 0:
            with torch.no_grad(), self.reference_policy():
                v_ref_terms.append((v, self.adapter.predict_velocity(x.detach(), s, cond,
                                                                     self.cfg.train.train_guidance)))
        return v

    def micro_loss(self, data: StepData, mb: MicroBatch, prepared: dict) -> MicroLoss:
        train, traj, idx = self.cfg.train, data.rs.ro.traj, mb.idx
        cond = data.rs.ro.cond.index(idx)
        sigmas = [float(s) for s in traj.sigmas]
        pairs: list = []  # (v, v_ref) of every trained step, for the KL
        if train.mode in ("draft", "refl"):
            x = traj.latents[idx, prepared["start"]].detach().to(self.adapter.device).float()
            if train.mode == "refl":
                i = prepared["start"]
                x0 = x - sigmas[i] * self._velocity(x, sigmas[i], cond, pairs)
            else:
                for i in range(prepared["start"], len(sigmas) - 1):
                    def euler(x_in, i=i):
                        return ode_step(x_in, self._velocity(x_in, sigmas[i], cond, pairs), sigmas[i], sigmas[i + 1])
                    # Checkpointed, each step's activations are recomputed in the backward; with the KL the step
                    # also records (v, v_ref), which a recomputation would record again, so it is not.
                    x = checkpoint(euler, x, use_reentrant=False) if train.kl_beta == 0 else euler(x)
                x0 = x
        else:
            noise = traj.latents[idx, 0].detach().to(self.adapter.device).float()  # the rollout's own noise
            x0_roll = traj.final[idx].detach().to(self.adapter.device).float()
            x0 = self._direct_align(x0_roll, noise, prepared["sigma_hi"], cond, pairs)
            if train.ctrl_u_weight is not None:  # Ctrl-U's second generation of the same condition and noise
                second = self._direct_align(x0_roll, noise, prepared["sigma_hi"] + train.ctrl_u_offset, cond, pairs)
                x0 = torch.cat([x0, second])
        images = self.adapter.decode(x0)
        items = [data.rs.plan.items[i] for i in idx.tolist()]
        total = self.reward_total(images, items * (len(images) // len(items)))
        kl = torch.stack([(v - v_ref).pow(2).mean() for v, v_ref in pairs]).mean() if pairs else None

        def loss(weights: Tensor):
            w = weights[idx].to(total.device)
            if train.ctrl_u_weight is None:
                value, metrics = reward_backprop_loss(total * w, train.reward_margin)
            else:
                first, second = total.chunk(2)
                value, metrics = ctrl_u_loss(first * w, second * w, train.reward_margin, train.ctrl_u_weight)
            if kl is not None:
                value = value + train.kl_beta * kl
                metrics["kl"] = kl.item()
            return value, metrics

        return MicroLoss(loss, x0)

    def _direct_align(self, x0_roll: Tensor, noise: Tensor, sigma_hi: float, cond, pairs: list) -> Tensor:
        """The rollout's samples re-noised with their own noise to sigma_hi, one step with gradient, x0 recovered."""
        sigma_lo = sigma_hi - self.cfg.train.align_step
        x_hi = sigma_hi * noise + (1 - sigma_hi) * x0_roll
        return direct_align_x0(x_hi, self._velocity(x_hi, sigma_hi, cond, pairs), noise, sigma_hi, sigma_lo)

    def reward_total(self, images: Tensor, items: list[Prompt]) -> Tensor:
        """The weighted sum of the trained rewards, with their gradient."""
        prompts = [it.text for it in items]
        metadata = [dict(it.metadata) for it in items]
        media = {"videos": images} if images.ndim == 5 else {"images": images}
        return sum(w * combined(self.rewards[name](prompts=prompts, metadata=metadata, **media)).float()
                   for name, w in self.cfg.rewards.items())


__all__ = ["DraftConfig", "DraftTrainer"]
