"""What every steering method shares: the request, reward scoring (weighted, optionally differentiable), NFE and
time accounting, FK potentials, and the result with its report."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from visalign import rewards as rewards_lib
from visalign.models.base import Conditioning, FlowModelAdapter
from visalign.rewards.base import Reward, combined

# ---- rewards -------------------------------------------------------------------------------------------------


def resolve_rewards(rewards) -> dict[str, tuple[Reward, float]]:
    """`rewards` as given to `steer`: a name / Reward, a list of them (weight 1 each) or {name or Reward: weight}.
    Weights are chosen at call time; names load through `visalign.rewards.load`."""

    if isinstance(rewards, (str, Reward)):
        rewards = {rewards: 1.0}
    elif isinstance(rewards, Sequence):
        rewards = dict.fromkeys(rewards, 1.0)
    if not isinstance(rewards, Mapping) or not rewards:
        raise ValueError("rewards must name at least one reward: a name, a Reward, a list, or {reward: weight}")
    out = {}
    for key, weight in rewards.items():
        reward = rewards_lib.load(key) if isinstance(key, str) else key
        if not isinstance(reward, Reward):
            raise ValueError(f"reward {key!r} is not a visalign.rewards.Reward")
        if reward.groupwise:  # a particle's potential must not depend on which particles share its batch
            raise ValueError(f"reward {key!r} scores groups of samples as sets (groupwise), and steering scores "
                             "each particle on its own: train with it instead (flow_grpo, diffusion_nft, awm, dgpo, "
                             "flow-dpo online)")
        out[key if isinstance(key, str) else reward.name] = (reward, float(weight))
    return out


@dataclass
class Request:
    """One steering call: the model, prompts (one output per prompt), conditioning and sampling settings."""

    adapter: FlowModelAdapter
    prompts: list[str]
    cond: Conditioning
    rewards: dict[str, tuple[Reward, float]]
    steps: int
    guidance: float
    height: int
    width: int
    num_frames: int | None
    seed: int
    metadata: list[dict] | None
    stats: dict = field(default_factory=lambda: {"nfe": 0, "decodes": 0, "reward_calls": 0, "backward_passes": 0,
                                                 "denoiser_time": 0.0})

    @property
    def shape(self) -> tuple[int, ...]:
        return self.adapter.latent_shape(self.height, self.width, self.num_frames)

    def seeds(self, n_per_prompt: int, salt: int = 0) -> list[int]:
        """Distinct seeds for n samples of each prompt, prompt-major (below 2^63: torch's seed range)."""
        return [((self.seed * 1_000_003 + salt) * 10_007 + i) % 2**63 for i in range(len(self.prompts) * n_per_prompt)]

    def decode(self, latents: Tensor) -> Tensor:
        self.stats["decodes"] += latents.shape[0]
        return self.adapter.decode(latents).float()

    def score(self, latents: Tensor, repeat: int = 1, grad: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        """Weighted total reward [B] and each reward's score of decoded latents; B = prompts × repeat, prompt-major.
        With grad=True the scores keep their graph (differentiable rewards only)."""
        return self.score_images(self.decode(latents), repeat, grad)

    def score_images(self, images: Tensor, repeat: int = 1, grad: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        """`score` for images already decoded."""
        prompts = [p for p in self.prompts for _ in range(repeat)]
        metadata = None if self.metadata is None else [m for m in self.metadata for _ in range(repeat)]
        return weighted_score(self.rewards, images, prompts, metadata, grad, self.stats)


def weighted_score(rewards: dict[str, tuple[Reward, float]], images: Tensor, prompts: list[str],
                   metadata: list[dict] | None = None, grad: bool = False,
                   stats: dict | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """sum_k w_k r_k(images) [B] and each reward's score. With grad=True the scores keep their graph (every reward
    must be differentiable); `stats["reward_calls"]` counts the calls when given."""
    media = {"videos": images} if images.ndim == 5 else {"images": images}
    parts, total = {}, 0.0
    with torch.enable_grad() if grad else torch.no_grad():
        for name, (reward, weight) in rewards.items():
            if grad and not reward.differentiable:
                raise ValueError(f"reward {name} is not differentiable; gradient steering needs differentiable "
                                 "rewards (use best-of-N or FK for this one)")
            score = combined(reward(prompts=prompts, metadata=metadata, **media)).float()
            if stats is not None:
                stats["reward_calls"] += 1
            parts[name] = score
            total = total + weight * score
    return total, parts


@contextmanager
def metered(request: Request, progress: bool = False):
    """Count denoiser evaluations (NFE; CFG's two branches count 2 per sample, as FK steering counts them) and the
    time spent in them. Inside the block `request.adapter` is a shallow copy of the adapter (same modules and
    weights) whose `predict_velocity` counts into this request only: the shared adapter is never patched, so
    concurrent requests on one model (the demo's --concurrency) keep their own counts. `progress`: a bar of
    denoiser passes (NFE), which moves with every call."""
    shared = request.adapter
    bar = tqdm(desc="steering", unit=" NFE", disable=not progress)
    stats = request.stats

    def count(latents, guidance_scale, seconds):
        stats["denoiser_time"] += seconds
        nfe = latents.shape[0] * (2 if shared.guidance == "cfg" and guidance_scale > 1 else 1)
        stats["nfe"] += nfe
        bar.update(nfe)

    request.adapter = shared.with_velocity_hook(count)
    try:
        yield stats
    finally:
        request.adapter = shared
        bar.close()


@dataclass
class SteerResult:
    """Images [P, ...] (one per prompt), their latents, the weighted reward and each reward per prompt, and a
    report: NFE (total and per prompt), decodes, reward calls, backward passes, wall time, the share of time
    outside the denoiser, and method details (FK: ancestor indices per resampling, ESS, log-weights)."""

    images: Tensor
    latents: Tensor
    reward: Tensor
    rewards: dict[str, Tensor]
    report: dict


# ---- FK potentials ---------------------------------------------------------------------------------------------

POTENTIALS = ("max", "diff", "sum", "rt")


class Potentials:
    """FK steering's potentials in log space (Singhal et al. 2025; Fk-Diffusion-Steering `fkd_class.py`), one
    state per particle: log G_t = lambda * {max: max(r_t, running max); diff: r_t - r_prev; sum: r_t + running
    sum; rt: r_t}. At the final step max / sum / rt use lambda r(x0) - sum of earlier log G along the lineage,
    so every lineage's product of potentials is exp(lambda r(x0)) (diff telescopes by itself from r_prev = 0)."""

    def __init__(self, kind: str, lam: float, n: int, device="cpu"):
        if kind not in POTENTIALS:
            raise ValueError(f"potential {kind!r}: allowed {', '.join(POTENTIALS)}")
        self.kind, self.lam = kind, lam
        zeros = torch.zeros(n, dtype=torch.float64, device=device)
        self.prev, self.running_max, self.running_sum, self.log_product = zeros, None, zeros.clone(), zeros.clone()

    def log_potential(self, r: Tensor, final: bool) -> Tensor:
        r = r.double()
        if final and self.kind != "diff":
            log_g = self.lam * r - self.log_product
        elif self.kind == "diff":
            log_g = self.lam * (r - self.prev)
        elif self.kind == "max":
            self.running_max = r if self.running_max is None else torch.maximum(self.running_max, r)
            log_g = self.lam * self.running_max
        elif self.kind == "sum":
            self.running_sum = self.running_sum + r
            log_g = self.lam * self.running_sum
        else:
            log_g = self.lam * r
        self.prev = r
        self.log_product = self.log_product + log_g
        return log_g

    def permute(self, idx: Tensor) -> None:
        """Follow resampled ancestors: every per-particle state moves with its particle."""
        self.prev, self.running_sum, self.log_product = self.prev[idx], self.running_sum[idx], self.log_product[idx]
        if self.running_max is not None:
            self.running_max = self.running_max[idx]


def steer_result(request: Request, latents: Tensor, report: dict) -> SteerResult:
    """Decode the chosen latents once and score them: the same images are scored and returned."""
    images = request.decode(latents)
    total, parts = request.score_images(images)
    return SteerResult(images, latents, total, parts, report)
