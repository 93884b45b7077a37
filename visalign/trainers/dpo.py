"""Flow-DPO / Diffusion-DPO, offline from a preference-pair file or online from rollout groups (`trainer: flow_dpo`).

Loss: `visalign.trainers.losses.dpo_loss` on per-pair errors at a shared noise level and noise for winner and loser
(Diffusion-DPO, Wallace et al. 2024; Flow-DPO in flow_grpo `scripts/train_sd3_dpo.py`: velocity target
eps - x0, sigma ~ logit-normal(0, 1), beta = 100). `train.target: epsilon` uses the noise target of
ε-prediction diffusion models instead (Diffusion-DPO's original form, beta = 5000), converting the flow
model's velocity to its implied noise eps = x_t + (1 - sigma) v.

The reference is a copy of the trainable weights taken at the start (LoRA: the base model), swapped in for its
predictions; online DPO refreshes it every `train.ref_update_every` steps (flow_grpo's OnlineDPO).

- offline: `train.pairs` is a JSONL pair file (`visalign.pairs`) of images, or for video models
  (`model.num_frames`) of videos (animated GIFs or frame directories, `model.num_frames` frames each); every row
  is checked, and every image or frame must have the model's height × width, before any model loads. Each step
  draws `train.pairs_per_step` pairs and encodes them with the adapter's VAE. Rows marked `"tie": true` are
  dropped and counted (`train.ties: drop`), or trained as ties with the Rao-Kupper likelihood (`rao_kupper`,
  `losses.dpo_ties_loss`), never as preferences.
- online: each rollout group gives one pair, its best and worst sample by reward (groups whose rewards are all
  equal are skipped); `train.gap_weighting` scales each pair by its reward gap (GAPO).

    visalign train configs/dpo_world.yaml                               # online, on the shapes world
    visalign train configs/dpo_world.yaml train.mode=offline train.pairs=data/pairs.jsonl
    visalign train configs/dpo_wan21_1.3b.yaml train.pairs=data/video_pairs.jsonl   # offline, video pairs
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from visalign.pairs import load_image, load_video, read_pairs
from visalign.trainers.common import ParamCopy, step_generator
from visalign.trainers.config import RecipeConfig, SamplingConfig, ode_sampling
from visalign.trainers.diagnostics import ROLLOUT_DRIFT, rms
from visalign.trainers.engine import MicroBatch, MicroLoss, StepData
from visalign.trainers.forward import ForwardTrainConfig, ForwardTrainer, noised
from visalign.trainers.losses import dpo_loss, dpo_ties_loss, per_sample_mse


@dataclass
class DPOTrainConfig(ForwardTrainConfig):
    mode: Literal["online", "offline"] = field(default="online", metadata={"help": "rollout pairs or a pair file"})
    pairs: str | None = field(default=None, metadata={"help": "offline: JSONL pair file (see visalign/pairs.py)"})
    pairs_per_step: int = field(default=16, metadata={"ge": 1, "help": "offline: pairs per step (all processes)"})
    beta: float = field(default=100.0, metadata={"gt": 0, "help": "DPO beta (Flow-DPO: 100; Diffusion-DPO: 5000)"})
    target: Literal["velocity", "epsilon"] = field(default="velocity", metadata={
        "help": "error on the velocity (flow models) or the implied noise (eps-prediction form)"})
    ref_update_every: int = field(default=0, metadata={"ge": 0, "help": "online: copy the policy into the reference "
                                                                "every N steps (0 = never)"})
    gap_weighting: bool = field(default=False, metadata={"help": "online: weight pairs by their reward gap (GAPO)"})
    sigma_sampling: Literal["grid", "logit_normal"] = field(default="logit_normal", metadata={
        "help": "noise levels: logit-normal (Flow-DPO) or the sampler's grid"})
    timesteps_per_sample: int = field(default=1, metadata={"ge": 1, "help": "noise levels trained per pair per step"})
    ties: Literal["drop", "rao_kupper"] = field(default="drop", metadata={
        "help": "offline: pairs marked tie are dropped (and counted) or trained as ties (Rao-Kupper, DPO-RK)"})
    tie_eta: float = field(default=math.log(2.0), metadata={
        "gt": 0, "help": "rao_kupper: eta = log(nu); at equal policy and reference a win, a loss and a tie are "
                         "equally likely at log 2"})

    def __post_init__(self):
        super().__post_init__()
        if self.mode == "offline":
            if not self.pairs:
                raise ValueError("train.mode=offline needs train.pairs (a JSONL pair file)")
            if not Path(self.pairs).is_file():
                raise ValueError(f"train.pairs={self.pairs!r}: no such pair file")
            if self.gap_weighting:
                raise ValueError("train.gap_weighting needs rewards: it applies to online DPO only")
        if self.group_noise:
            raise ValueError("train.group_noise is for NFT and RWR: DPO already noises a pair's winner and loser "
                             "alike")



@dataclass
class FlowDPOConfig(RecipeConfig):
    """Flow-DPO: preference optimisation of a flow model against a reference, offline or online."""

    trainer: Literal["flow_dpo"] = field(default="flow_dpo", metadata={"help": "which trainer runs"})
    sampling: SamplingConfig = field(default_factory=ode_sampling)
    train: DPOTrainConfig = field(default_factory=DPOTrainConfig)
    rewards: dict[str, float] = field(default_factory=lambda: {"world-verifier": 1.0},
                                      metadata={"help": "online: rewards that rank each group (weighted sum)"})

    def rewards_required(self) -> bool:
        return self.train.mode == "online"

    def drift_metrics(self) -> tuple[str, ...]:
        return ROLLOUT_DRIFT if self.train.mode == "online" else ("drift/velocity_norm",)


def group_pairs(total: Tensor, groups: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(winner index, loser index, reward gap) per group: its highest and lowest valid reward; groups with fewer
    than two valid samples or no spread are skipped (flow_grpo `stat_tracking` type "dpo": argmax / argmin)."""
    winners, losers, gaps = [], [], []
    for g in torch.unique(groups):
        idx = torch.nonzero((groups == g) & valid).flatten()
        if len(idx) < 2:
            continue
        r = total[idx]
        hi, lo = idx[int(r.argmax())], idx[int(r.argmin())]
        if total[hi] > total[lo]:
            winners.append(hi)
            losers.append(lo)
            gaps.append(total[hi] - total[lo])
    if not winners:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0)
    return torch.stack(winners), torch.stack(losers), torch.stack(gaps).float()


class FlowDPOTrainer(ForwardTrainer):
    name = "flow-dpo"

    def _build(self) -> None:
        cfg = self.cfg
        if cfg.train.mode == "online" and (cfg.train.prompts_per_step * cfg.train.group_size) % (
                self.accelerator.num_processes * cfg.train.group_size):
            raise ValueError("online DPO pairs samples of a group on one process: prompts_per_step must be "
                             "divisible by the number of processes")
        if cfg.train.mode == "offline" and cfg.train.pairs_per_step % self.accelerator.num_processes:
            raise ValueError("pairs_per_step must be divisible by the number of processes")
        if cfg.train.mode == "offline":
            # Every row, size and (video) frame count is checked before any model loads; errors name the row.

            pairs = read_pairs(cfg.train.pairs, size=(cfg.model.height, cfg.model.width),
                               num_frames=cfg.model.num_frames)
            self.ties_dropped = 0
            if cfg.train.ties == "drop":  # a tie's chosen / rejected order means nothing: never a preference
                self.ties_dropped = sum(p.tie for p in pairs)
                pairs = [p for p in pairs if not p.tie]
                if not pairs:
                    raise ValueError(f"train.pairs={cfg.train.pairs}: every pair is a tie, and train.ties=drop "
                                     "drops ties; set train.ties=rao_kupper to train on them")
                if self.ties_dropped and self.accelerator.is_main_process:
                    print(f"offline DPO: dropped {self.ties_dropped} tie pair(s) of {len(pairs) + self.ties_dropped}"
                          " (train.ties=drop; rao_kupper trains them as ties)")
            self.pairs = pairs
        super()._build()
        if cfg.train.mode == "offline" and not self.adapter.is_video and cfg.model.num_frames is not None:
            raise ValueError(f"model.num_frames={cfg.model.num_frames} makes offline DPO read video pairs, but "
                             f"{cfg.model.name} is an image model: drop model.num_frames")

    def prompts_to_encode(self) -> list[str]:
        pairs = [p.prompt for p in self.pairs] if self.cfg.train.mode == "offline" else []
        return super().prompts_to_encode() + pairs

    def recipe_state(self) -> dict:
        # The reference: at step 0 the base model (LoRA B = 0) or the initial weights.
        return {"reference": ParamCopy(self.params)}

    def errors(self, x0: Tensor, noise: Tensor, sigma: Tensor, cond) -> tuple[Tensor, Tensor]:
        """Per-sample error of the live weights' prediction at x_t (velocity or implied-noise target), and the
        predicted velocity."""
        x_t = noised(x0, noise, sigma)
        v = self.velocity(x_t, sigma, cond)
        if self.cfg.train.target == "velocity":
            return per_sample_mse(v, noise - x0), v
        s = sigma.view(-1, *([1] * (x0.ndim - 1))).to(x_t)
        return per_sample_mse(x_t + (1 - s) * v, noise), v  # eps implied by v = eps - x0 and x_t

    def _offline_batch(self, step: int):
        cfg, acc = self.cfg, self.accelerator
        g = step_generator(cfg.run.seed, step, 1)
        chosen = torch.randint(len(self.pairs), (cfg.train.pairs_per_step,), generator=g).tolist()
        n = cfg.train.pairs_per_step // acc.num_processes
        mine = [self.pairs[i] for i in chosen[acc.process_index * n:(acc.process_index + 1) * n]]

        load = load_image if cfg.model.num_frames is None else load_video  # [3, H, W] or [F, 3, H, W]

        @torch.no_grad()
        def encode(paths: list) -> Tensor:
            # In train-batch-sized chunks: a video VAE's activations grow with the batch.
            k = cfg.train.train_batch_size
            chunks = [torch.stack([load(p) for p in paths[i:i + k]]) for i in range(0, len(paths), k)]
            return torch.cat([self.adapter.encode(c.to(self.adapter.device)).float() for c in chunks])

        x_w, x_l = encode([p.chosen for p in mine]), encode([p.rejected for p in mine])
        cond = self.adapter.encode_prompts([p.prompt for p in mine],
                                           cfg=self.adapter.guidance == "cfg" and cfg.train.train_guidance > 1)
        ties = torch.tensor([p.tie for p in mine], dtype=torch.bool)
        return x_w, x_l, cond, torch.ones(len(mine)), ties, {"pairs_ties_dropped": self.ties_dropped}

    def _online_batch(self, step: int):
        rs = self.rollout_step(step)
        weights = self.cfg.rewards
        total = sum(w * rs.gathered.trained[name].double() for name, w in weights.items())
        winners, losers, gaps = group_pairs(total, rs.groups, rs.valid)
        local = rs.local
        mine = (winners >= local.start) & (winners < local.stop)
        w_idx, l_idx = winners[mine] - local.start, losers[mine] - local.start
        pair_weight = torch.ones(len(w_idx))
        if self.cfg.train.gap_weighting and len(gaps):
            pair_weight = gaps[mine] / gaps.mean().clamp(min=1e-12)  # GAPO: gap-proportional, mean 1 globally
        x0 = rs.ro.traj.final.float()
        metrics = {**rs.ro.timings, **rs.gathered.metrics(), "pairs": len(winners),
                   "pair_gap_mean": float(gaps.mean()) if len(gaps) else 0.0, "invalid_rewards": int((~rs.valid).sum())}
        return x0[w_idx], x0[l_idx], rs.ro.cond.index(w_idx), pair_weight, torch.zeros(len(w_idx), dtype=torch.bool), \
            metrics

    def collect(self, step: int) -> StepData:
        """A batch of preference pairs: drawn from the pair file (offline) or each rollout group's best and worst
        sample (online); the weights are the pairs' (1, or their reward gap with GAPO)."""
        batch = self._offline_batch(step) if self.cfg.train.mode == "offline" else self._online_batch(step)
        x_w, x_l, cond, pair_weight, ties, metrics = batch
        return StepData(weights=pair_weight, metrics=metrics, extra={"x_w": x_w, "x_l": x_l, "cond": cond,
                                                                     "ties": ties})

    def weigh(self, data: StepData) -> None:
        """The pair weights are set by `collect`."""

    def micro_batches(self, data: StepData, step: int) -> list[MicroBatch]:
        x_w = data.extra["x_w"]
        if not len(x_w):
            return []
        grid = self.adapter.sigmas(self.cfg.sampling.steps, tuple(x_w.shape[1:]))
        micro, data.extra["draw"] = self.noise_plan(len(x_w), step, grid)
        return micro

    def prepare_micro(self, data: StepData, mb: MicroBatch):
        """The pair's shared noise, and the reference's errors on winner and loser (no gradient)."""
        idx, x_w, x_l = mb.idx, data.extra["x_w"], data.extra["x_l"]
        noise = data.extra["draw"](idx, mb.slot, x_w[idx].shape).to(x_w.device)  # shared by winner and loser
        cond = data.extra["cond"].index(idx)
        with torch.no_grad(), self.reference.swapped():
            ref_w = self.errors(x_w[idx], noise, mb.sigma, cond)[0]
            ref_l = self.errors(x_l[idx], noise, mb.sigma, cond)[0]
        return noise, cond, ref_w, ref_l

    def micro_loss(self, data: StepData, mb: MicroBatch, prepared) -> MicroLoss:
        noise, cond, ref_w, ref_l = prepared
        idx, sigma = mb.idx, mb.sigma
        err_w, v_w = self.errors(data.extra["x_w"][idx], noise, sigma, cond)
        err_l, v_l = self.errors(data.extra["x_l"][idx], noise, sigma, cond)
        train = self.cfg.train
        drift = {}
        if train.mode == "offline":  # no rollout: the training pass's velocity norm is the drift diagnostic
            drift["velocity_norm"] = rms(torch.cat([v_w, v_l]), v_w.ndim - 1).mean().item()

        def loss(weights: Tensor):
            if train.mode == "offline" and train.ties == "rao_kupper":
                value, metrics = dpo_ties_loss(err_w, err_l, ref_w, ref_l, train.beta, data.extra["ties"][idx],
                                               train.tie_eta, weights[idx])
            else:
                value, metrics = dpo_loss(err_w, err_l, ref_w, ref_l, train.beta, weights[idx])
            return value, {**metrics, **drift}

        return MicroLoss(loss)

    def after_update(self, data: StepData, step: int) -> dict:
        train = self.cfg.train
        if train.mode == "online" and train.ref_update_every and (step + 1) % train.ref_update_every == 0:
            self.reference.blend(0.0)  # OnlineDPO: the reference becomes the current policy
        return {}

    def progress_postfix(self, metrics: dict) -> dict:
        out = {"loss": f"{metrics.get('train/dpo_loss', float('nan')):.4f}"}
        if self.cfg.train.mode == "online":
            out.update(super().progress_postfix(metrics))
        return out


__all__ = ["FlowDPOConfig", "FlowDPOTrainer", "group_pairs"]
