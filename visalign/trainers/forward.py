"""Online trainers on the forward process: flow matching on the clean samples of each rollout, weighted by their
rewards. No log-probabilities, so any sampler works (`sampling.sde: ode` is the usual choice).

- Flow-RWR / reward-filtered SFT (`trainer: flow_rwr`): L = mean_i w_i ||v_theta(x_t) - (eps - x0_i)||², with
  w = exp(A / temperature) or "best of each group" (flow_grpo `scripts/train_sd3_sft.py`; "Improving Video
  Generation with Human Feedback", Flow-RWR).
- DiffusionNFT (`trainer: diffusion_nft`): positive / negative implicit policies around an old policy that
  follows the trained one softly (`visalign.trainers.losses.nft_loss`; NVlabs/DiffusionNFT `scripts/train_nft_sd3.py`).

Both share the engine (`visalign.trainers.engine.OnlineTrainer`): rollouts, rewards, advantages, checkpoints, logging.

    visalign train configs/nft_world.yaml
    visalign train configs/rwr_world.yaml train.weighting=best
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import torch
from torch import Tensor

from visalign.trainers.common import ParamCopy, step_generator
from visalign.trainers.config import BaseTrainConfig, RecipeConfig, SamplingConfig, ode_sampling
from visalign.trainers.engine import MicroBatch, MicroLoss, OnlineTrainer, StepData
from visalign.trainers.losses import nft_loss, nft_reward_weight, per_sample_mse, rwr_weights


def sample_sigmas(kind: str, n: int, k: int, grid: Tensor, generator: torch.Generator,
                  min_sigma: float = 0.0) -> Tensor:
    """Training noise levels [n, k]: "grid" draws k distinct levels per sample from the sampler's grid levels in
    [min_sigma, 1] (without the final 0; DiffusionNFT trains on its sampling timesteps), "logit_normal" draws
    sigmoid(N(0, 1)) (SD3's timestep density, Flow-DPO) mapped affinely onto [min_sigma, 1]."""
    if kind == "grid":
        levels = grid[(grid > 0) & (grid >= min_sigma)]
        if k > len(levels):
            raise ValueError(f"timesteps_per_sample={k} exceeds the {len(levels)} non-zero sampler noise levels "
                             f">= train.min_sigma={min_sigma}")
        draws = [levels[torch.randperm(len(levels), generator=generator)[:k]] for _ in range(n)]
        return torch.stack(draws).float() if draws else grid.new_zeros(0, k).float()  # n = 0: nothing kept
    if kind == "logit_normal":
        return min_sigma + (1 - min_sigma) * torch.sigmoid(torch.randn(n, k, generator=generator))
    if kind == "stratified":
        # AWM's "discrete_wo_init" (scxue/advantage_weighted_matching `scripts/train_sd3_awm.py`): the grid indices
        # 1 .. int(0.9 N) (never sigma = 1, nor the last, sharpest tenth) split into k bins, one index drawn from
        # each, per sample here (the reference draws one per micro-batch).
        last = int(0.9 * (len(grid) - 1))
        bounds = torch.linspace(1, last, k + 1).long()
        if (bounds[1:] <= bounds[:-1]).any() or grid[last] < min_sigma:
            raise ValueError(f"timesteps_per_sample={k} needs at least {k} grid levels in [1, {last}] of the "
                             f"{len(grid) - 1}-step schedule at or above train.min_sigma={min_sigma}")
        lo, width = bounds[:-1], bounds[1:] - bounds[:-1]
        idx = lo + (torch.rand(n, k, generator=generator) * width).long()
        return grid[idx].float().clamp(min=min_sigma)
    raise ValueError(f"sigma_sampling {kind!r}: allowed 'grid', 'logit_normal' or 'stratified'")


_GROUP_SALT = 1_000_003  # generator salts of group-shared noise, away from the per-process ones (3 + rank)


def noised(x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
    """Rectified-flow interpolation x_t = (1 - sigma) x0 + sigma eps (velocity target eps - x0)."""
    s = sigma.view(-1, *([1] * (x0.ndim - 1))).to(x0)
    return (1 - s) * x0 + s * noise


@dataclass
class ForwardTrainConfig(BaseTrainConfig):
    timesteps_per_sample: int = field(default=4, metadata={"ge": 1,
        "help": "noised copies of each sample trained per step"})
    sigma_sampling: Literal["grid", "logit_normal", "stratified"] = field(default="grid", metadata={
        "help": "noise levels: the sampler's grid (DiffusionNFT), logit-normal (SD3 / Flow-DPO), or one grid level "
                "from each of timesteps_per_sample bins of its first 90% (AWM)"})
    train_guidance: float = field(default=1.0, metadata={"ge": 0,
        "help": "CFG scale of the trained prediction: 1 = the conditional velocity only (CFG-free, as DiffusionNFT "
                "and Flow-DPO train); > 1 regresses the guided combination, which collapsed Flow-RWR on the world"})
    min_sigma: float = field(default=0.0, metadata={"ge": 0, "lt": 1,
        "help": "train only noise levels >= this: the high-noise steps decide layout and motion, while the low-noise "
                "steps of self-generated samples teach their residual speckle back to the model"})
    sample_with_ema: bool = field(default=False, metadata={
        "help": "roll out with the EMA of the trained weights (train.ema.decay), a slow teacher whose samples the "
                "live weights learn from, as DiffusionNFT rolls out with its old policy; the live weights' own "
                "samples can degrade faster than the update learns from them"})
    group_noise: bool = field(default=False, metadata={
        "help": "every sample of a prompt group is noised with the same levels and noise (common random numbers): "
                "the advantages sum to zero in a group, so the noise's share of the gradient cancels"})

    def __post_init__(self):
        super().__post_init__()
        if self.sample_with_ema and not self.ema.decay:
            raise ValueError("train.sample_with_ema needs train.ema.decay (the EMA to roll out with)")

    def check_with_sampling(self, sampling: SamplingConfig) -> None:
        """The grid samplers draw timesteps_per_sample distinct levels of the rollout's sampling.steps (see
        `sample_sigmas`): more than there are fails here, not at the first step. (train.min_sigma can leave fewer;
        that needs the model's schedule and is checked when the levels are drawn.)"""
        k, n = self.timesteps_per_sample, sampling.steps
        if self.sigma_sampling == "grid" and k > n:
            raise ValueError(f"train.timesteps_per_sample={k} exceeds the {n} noise levels of sampling.steps={n} "
                             "that sigma_sampling=grid draws from (lower it, or raise sampling.steps)")
        last = int(0.9 * n)
        if self.sigma_sampling == "stratified" and k > last - 1:
            raise ValueError(f"train.timesteps_per_sample={k} needs {k} bins of grid levels 1..{last} (the first 90% "
                             f"of sampling.steps={n}) for sigma_sampling=stratified: at most {max(last - 1, 0)}")


class ForwardTrainer(OnlineTrainer):
    """Shared by the forward-process recipes: micro-batches of (sample, noise level, noise) and the velocity."""

    whole_groups = False  # micro-batches hold whole prompt groups (a loss over a group's samples)

    def noise_plan(self, n: int, step: int, grid: Tensor, groups: Tensor | None = None, whole_groups: bool = False):
        """Micro-batches (sample positions, sigma [b], timestep slot j) over samples × timesteps in a fixed order, and
        `noise(pos, j, shape)` that draws the matching noise. With `train.group_noise` and `groups` (the prompt
        group of each of the n samples) a group shares its levels and, per slot, its noise; both are then pure
        functions of (seed, step, group, slot), so a group split across processes agrees. `whole_groups` keeps
        each group's samples together in the micro-batches (train_batch_size a multiple of the group size)."""
        cfg = self.cfg.train
        g = step_generator(self.cfg.run.seed, step, 3 + self.accelerator.process_index)
        shared = cfg.group_noise and groups is not None
        k = cfg.timesteps_per_sample
        if shared:
            ids, inverse = torch.unique(groups, return_inverse=True)
            per_group = torch.stack([sample_sigmas(cfg.sigma_sampling, 1, k, grid,
                                                   step_generator(self.cfg.run.seed, step,
                                                                  _GROUP_SALT + int(i) * (k + 1)),
                                                   cfg.min_sigma)[0]
                                     for i in ids]) if len(ids) else grid.new_zeros(0, k)
            sigmas = per_group[inverse]
        else:
            sigmas = sample_sigmas(cfg.sigma_sampling, n, k, grid, g, cfg.min_sigma)
        order = torch.randperm(n, generator=g)
        if whole_groups:  # the groups in random order, each group's samples together
            ids = torch.unique(groups)
            order = torch.cat([torch.nonzero(groups == ids[i]).flatten() for i in torch.randperm(len(ids), generator=g)]
                              ) if len(ids) else order
        chunks = [order[i:i + cfg.train_batch_size] for i in range(0, n, cfg.train_batch_size)]
        micro = [MicroBatch(idx, j, sigmas[idx, j]) for idx in chunks for j in range(k)]
        if not shared:
            return micro, lambda pos, j, shape: torch.randn(shape, generator=g)
        bank: dict[tuple[int, int], Tensor] = {}

        def noise(pos: Tensor, j: int, shape) -> Tensor:
            out = []
            for gid in groups[pos].tolist():
                if (gid, j) not in bank:  # slot j of group gid: its own stream, independent of the chunking
                    gen = step_generator(self.cfg.run.seed, step, _GROUP_SALT + gid * (k + 1) + 1 + j)
                    bank[gid, j] = torch.randn(tuple(shape[1:]), generator=gen)
                out.append(bank[gid, j])
            return torch.stack(out) if out else torch.zeros(tuple(shape))

        return micro, noise

    def rollout_weights(self):
        """The weights copy to roll out with (swapped in around the rollout), or None for the trained weights."""
        return self.ema if self.cfg.train.sample_with_ema else None

    def rollout_step(self, step: int):
        weights = self.rollout_weights()
        if weights is None:
            return super().rollout_step(step)
        with weights.swapped():
            return super().rollout_step(step)

    def micro_batches(self, data: StepData, step: int) -> list[MicroBatch]:
        """The kept rollout samples (`data.extra["keep"]`, positions among this process's) × noise levels."""
        keep = data.extra["keep"]
        micro, data.extra["draw"] = self.noise_plan(len(keep), step, data.rs.ro.traj.sigmas, data.rs.plan.groups[keep],
                                                    whole_groups=self.whole_groups)
        return micro

    def noised_sample(self, data: StepData, mb: MicroBatch) -> tuple[Tensor, Tensor, Tensor]:
        """(indices into the rollout, clean samples x0, fresh noise) of a micro-batch."""
        idx = data.extra["keep"][mb.idx]
        x0 = data.rs.ro.traj.final[idx]
        return idx, x0, data.extra["draw"](mb.idx, mb.slot, x0.shape).to(x0.device)

    def velocity(self, x_t: Tensor, sigma: Tensor, cond) -> Tensor:
        return self.adapter.predict_velocity(x_t, sigma.to(x_t.device), cond, self.cfg.train.train_guidance)

    @torch.no_grad()
    def reference_velocity(self, x_t: Tensor, sigma: Tensor, cond) -> Tensor:
        """The reference policy's velocity: LoRA disabled, or the frozen copy of full fine-tuning."""
        with self.reference_policy():
            return self.velocity(x_t, sigma, cond)


@dataclass
class OldPolicyTrainConfig(ForwardTrainConfig):
    """The `train:` fields of a recipe with an old policy (`OldPolicyTrainer`) and a KL to the base."""

    kl_beta: float = field(default=0.0, metadata={"ge": 0, "help": "weight of ||v_theta - v_ref||² to the base"})
    old_decay_rate: float = field(default=0.001, metadata={"ge": 0,
        "help": "old-policy decay d = min(rate × step, max); 0 keeps the old policy equal to the trained weights "
                "(on-policy v_old, taken from the trained pass, whose own pass is then skipped)"})
    old_decay_max: float = field(default=0.5, metadata={"ge": 0, "lt": 1,
        "help": "upper bound of the old-policy decay"})


class OldPolicyTrainer(ForwardTrainer):
    """A forward-process recipe with an old policy: a copy of the trained weights that follows them softly,
    old ← d old + (1 - d) theta after every step with d = min(train.old_decay_rate × step, train.old_decay_max)
    (DiffusionNFT's old policy; AWM's "EMA" adapter)."""

    def wants_frozen_reference(self) -> bool:
        return self.cfg.train.kl_beta > 0  # the KL to the reference policy (full fine-tuning keeps a frozen copy)

    def recipe_state(self) -> dict:
        return {"old": ParamCopy(self.params)}

    def old_decay(self, step: int) -> float:
        """The decay d applied after step `step`."""
        return min(self.cfg.train.old_decay_rate * step, self.cfg.train.old_decay_max)

    def micro_batches(self, data: StepData, step: int) -> list[MicroBatch]:
        # The old copy is the trained weights themselves until this step's first optimizer step when the last soft
        # update copied them whole (decay 0: the first step, or train.old_decay_rate=0): v_old is then the trained
        # pass's own velocity, detached, and the old-policy pass is skipped.
        self.old_is_live = step == 0 or self.old_decay(step - 1) == 0
        return super().micro_batches(data, step)

    def old_velocity(self, x_t: Tensor, sigma: Tensor, cond) -> Tensor | None:
        """The old policy's velocity (no gradient), or None while it equals the trained weights."""
        if self.old_is_live:
            return None
        with torch.no_grad(), self.old.swapped():
            return self.velocity(x_t, sigma, cond)

    def after_optimizer_step(self) -> None:
        self.old_is_live = False

    def after_update(self, data: StepData, step: int) -> dict:
        decay = self.old_decay(step)
        self.old.blend(decay)
        return {"train/old_decay": decay}


# ---------------------------------------------------------------------------------------------- Flow-RWR


@dataclass
class RWRTrainConfig(ForwardTrainConfig):
    weighting: Literal["exp", "best", "positive"] = field(default="exp", metadata={
        "help": "exp(A / temperature), best of group, or every sample above its group's mean alike (RAFT)"})
    temperature: float = field(default=1.0, metadata={"gt": 0, "help": "of the exponential weighting"})

    def __post_init__(self):
        super().__post_init__()
        if self.balance.on:
            raise ValueError("train.balance needs one loss per reward; Flow-RWR's weights are normalised over the "
                             "batch, so it combines rewards in advantage space (train.advantage.mode)")


@dataclass
class FlowRWRConfig(RecipeConfig):
    """Flow-RWR / reward-filtered SFT: reward-weighted flow matching on rollouts."""

    trainer: Literal["flow_rwr"] = field(default="flow_rwr", metadata={"help": "which trainer runs"})
    sampling: SamplingConfig = field(default_factory=ode_sampling)
    train: RWRTrainConfig = field(default_factory=RWRTrainConfig)


class FlowRWRTrainer(ForwardTrainer):
    name = "flow-rwr"

    def weigh(self, data: StepData) -> None:
        cfg = self.cfg.train
        data.weights = rwr_weights(data.adv, data.rs.groups, data.mask, cfg.weighting, cfg.temperature)[data.rs.local]
        data.extra["keep"] = torch.nonzero(data.weights > 0).flatten()  # zero-weight samples contribute nothing

    def prepare_micro(self, data: StepData, mb: MicroBatch):
        idx, x0, noise = self.noised_sample(data, mb)
        return idx, x0, noise, noise - x0

    def micro_loss(self, data: StepData, mb: MicroBatch, prepared) -> MicroLoss:
        idx, x0, noise, target = prepared
        v = self.velocity(noised(x0, noise, mb.sigma), mb.sigma, data.rs.ro.cond.index(idx))
        err = per_sample_mse(v, target)

        def loss(weights: Tensor):
            value = (weights[idx].to(err.device) * err).mean()
            return value, {"rwr_loss": value.item(), "mse": err.mean().item()}

        return MicroLoss(loss, v)

    def step_metrics(self, data: StepData) -> dict:
        weights = data.weights
        return {"train/weight_max": float(weights.max()) if len(weights) else 0.0,
                "trained_fraction": len(data.extra["keep"]) / max(1, len(weights))}


# ---------------------------------------------------------------------------------------------- DiffusionNFT


@dataclass
class NFTTrainConfig(OldPolicyTrainConfig):
    nft_beta: float = field(default=1.0, metadata={"gt": 0, "help": "beta of the implicit policies v± (DiffusionNFT)"})
    kl_beta: float = field(default=1e-4, metadata={"ge": 0,
        "help": "weight of ||v_theta - v_ref||² (DiffusionNFT: 1e-4)"})
    sample_with_old: bool = field(default=True, metadata={"help": "roll out with the old policy (DiffusionNFT)"})

    def __post_init__(self):
        super().__post_init__()
        if self.sample_with_old and self.sample_with_ema:
            raise ValueError("train.sample_with_old and train.sample_with_ema both pick the rollout policy; "
                             "set one of them false")


@dataclass
class DiffusionNFTConfig(RecipeConfig):
    """DiffusionNFT: negative-aware fine-tuning on the forward process."""

    trainer: Literal["diffusion_nft"] = field(default="diffusion_nft", metadata={"help": "which trainer runs"})
    sampling: SamplingConfig = field(default_factory=ode_sampling)
    train: NFTTrainConfig = field(default_factory=NFTTrainConfig)


class DiffusionNFTTrainer(OldPolicyTrainer):
    name = "diffusion-nft"

    def rollout_weights(self):
        return self.old if self.cfg.train.sample_with_old else super().rollout_weights()

    def weigh(self, data: StepData) -> None:
        """r = clip(A / 2A_max + 1/2) per sample (and per reward when balancing); untrained samples are dropped."""
        clip, local = self.cfg.train.advantage.clip, data.rs.local
        data.weights = nft_reward_weight(data.adv, clip)[local]
        if data.per_reward_adv is not None:
            data.per_reward = torch.stack([nft_reward_weight(data.per_reward_adv[n], clip)[local]
                                           for n in self.cfg.rewards])
        data.extra["keep"] = torch.nonzero(data.mask[local]).flatten()  # others: not trained

    def prepare_micro(self, data: StepData, mb: MicroBatch) -> dict:
        """x_t, and the old policy's and the reference's velocities there (no gradient)."""
        idx, x0, noise = self.noised_sample(data, mb)
        x_t = noised(x0, noise, mb.sigma)
        cond = data.rs.ro.cond.index(idx)
        v_ref = self.reference_velocity(x_t, mb.sigma, cond) if self.cfg.train.kl_beta > 0 else None
        return {"x_t": x_t, "x0": x0, "cond": cond, "v_old": self.old_velocity(x_t, mb.sigma, cond), "v_ref": v_ref}

    def micro_loss(self, data: StepData, mb: MicroBatch, prepared: dict) -> MicroLoss:
        v = self.velocity(prepared["x_t"], mb.sigma, prepared["cond"])
        loss = partial(self._nft_loss, v, v_old=prepared["v_old"], x_t=prepared["x_t"], x0=prepared["x0"],
                       sigma=mb.sigma, idx=data.extra["keep"][mb.idx], v_ref=prepared["v_ref"])
        return MicroLoss(loss, v)

    def step_metrics(self, data: StepData) -> dict:
        return {"trained_fraction": len(data.extra["keep"]) / max(1, len(data.weights))}

    def _nft_loss(self, v: Tensor, weights: Tensor, *, v_old: Tensor | None, x_t: Tensor, x0: Tensor, sigma: Tensor,
                  idx: Tensor, v_ref: Tensor | None) -> tuple[Tensor, dict]:
        """DiffusionNFT's loss of the live velocity `v` on one micro-batch; v_old None: the old policy is the live
        weights themselves (its velocity is v, detached)."""
        train = self.cfg.train
        return nft_loss(v, v.detach() if v_old is None else v_old, x_t, x0, sigma, weights[idx].to(v.device),
                        train.nft_beta, train.advantage.clip, v_ref=v_ref, kl_beta=train.kl_beta)

__all__ = ["DiffusionNFTConfig", "DiffusionNFTTrainer", "FlowRWRConfig", "FlowRWRTrainer", "noised", "sample_sigmas"]
