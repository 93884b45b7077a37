"""Reward-gradient drift for SDE sampling (Euphonium, arXiv 2602.04928; zerzerzerz/Euphonium
`euphonium/grpo/grpo_sampling/flux_step.py`): each SDE step's mean is shifted up the reward,

    mean' = mean + d,   d = lam * std² * g  ("tilt")   or   d = scale * g  ("fixed", Euphonium's constant c),
    g = grad_{x0} sum_k w_k r_k(decode(x0)),  x0 = x - sigma v  (the step's x0-prediction, held constant),

so GRPO rollouts explore towards higher reward. "tilt" is the first-order optimal proposal for a Gaussian step
N(mean, std²) tilted by exp(lam r): N(mean + lam std² grad r, std²) (the DAS / TDS twisted proposal); it vanishes
with the step's noise. The shift never depends on the trained parameters, so a trainer stores it with the
trajectory and adds it back when rescoring (the on-policy ratio stays exactly 1; the policy gradient flows only
through the model's own mean). Our rewards are not noise-aware, so the gradient is taken on the decoded
x0-prediction rather than on x_t as Euphonium's latent process reward model does; the denoiser is not
backpropagated through (one decoder + reward backward per step).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from visalign.models.base import FlowModelAdapter
from visalign.sampling import SDEOptions, sample
from visalign.steering.core import Request, SteerResult, steer_result, weighted_score

NORMALIZE = ("none", "sample", "batch")
MODES = ("tilt", "fixed")


@dataclass
class RewardDrift:
    """Euphonium's reward-gradient drift as a steering method (one SDE sample per prompt) and, through `bind`, as
    the drift of any `visalign.sampling.sample` call, e.g. a GRPO trainer's rollouts.

    mode "tilt": d = scale * std² * g (scale plays lambda, the tilt exp(lambda r)); "fixed": d = scale * g.
    normalize: "none", "sample" (each sample's g to unit norm) or "batch" (g divided by the whole batch's norm,
    as Euphonium's normaliser does). Steps [start, stop) only; SDE steps only (an ODE step has no noise to steer).
    """

    scale: float = 1.0
    mode: str = "tilt"
    normalize: str = "none"
    start: int = 0
    stop: int | None = None
    sde: str = "flow_grpo"
    noise_level: float = 0.7

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"drift mode {self.mode!r}: allowed {', '.join(MODES)}")
        if self.normalize not in NORMALIZE:
            raise ValueError(f"drift normalize {self.normalize!r}: allowed {', '.join(NORMALIZE)}")
        if self.start < 0 or (self.stop is not None and self.stop <= self.start):
            raise ValueError(f"drift window [{self.start}, {self.stop}) is empty or negative")

    def shift(self, grad: Tensor, std: Tensor) -> Tensor:
        """The mean shift d for reward gradients `grad` [B, ...] and step stds `std` [B] (pure; see class doc)."""
        grad = grad.float()
        shape = (-1,) + (1,) * (grad.ndim - 1)
        if self.normalize == "sample":
            grad = grad / grad.flatten(1).norm(dim=1).clamp(min=1e-12).view(shape)
        elif self.normalize == "batch":
            grad = grad / grad.norm().clamp(min=1e-12)
        if self.mode == "tilt":
            return self.scale * std.float().view(shape) ** 2 * grad
        return self.scale * grad

    def bind(self, adapter: FlowModelAdapter, rewards: dict, prompts: list[str], metadata: list[dict] | None = None,
             stats: dict | None = None) -> Callable[[Tensor, Tensor, int], Tensor | None]:
        """The drift function `sample(..., drift=...)` takes, for this batch's prompts. `rewards` maps a name to
        (Reward, weight) (`visalign.steering.core.resolve_rewards`); all must be differentiable."""
        for name, (reward, _) in rewards.items():
            if not reward.differentiable:
                raise ValueError(f"reward drift needs differentiable rewards; {name} is not differentiable")

        def drift(x0: Tensor, std: Tensor, step: int) -> Tensor | None:
            if step < self.start or (self.stop is not None and step >= self.stop) or self.scale == 0:
                return None
            with torch.enable_grad():
                x0 = x0.detach().requires_grad_(True)
                total, _ = weighted_score(rewards, adapter.decode(x0).float(), prompts, metadata, True, stats)
                (grad,) = torch.autograd.grad(total.sum(), x0)
            if stats is not None:
                stats["backward_passes"] += len(x0)
                stats["decodes"] += len(x0)
            return self.shift(grad, std)

        return drift

    def run(self, request: Request) -> SteerResult:
        fn = self.bind(request.adapter, request.rewards, request.prompts, request.metadata, request.stats)
        traj = sample(request.adapter, request.cond, num_steps=request.steps, height=request.height,
                      width=request.width, num_frames=request.num_frames, guidance_scale=request.guidance,
                      sde=SDEOptions(self.sde, self.noise_level), seeds=request.seeds(1), drift=fn)
        norms = traj.drifts.flatten(2).norm(dim=2).mean(0).tolist()
        return steer_result(request, traj.final, {"method": "drift", "mode": self.mode, "scale": self.scale,
                                                  "mean_drift_norm_per_step": norms})
