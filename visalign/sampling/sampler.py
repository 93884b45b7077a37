"""The one sampling loop: flow ODE / SDE over the model's sigma schedule, returning the whole trajectory.

Sampling and training compute a transition's log-prob with the same function, `transition`, so a stored
trajectory recomputed under unchanged parameters gives back the sampling log-prob (ratio == 1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from visalign.models.base import Conditioning, FlowModelAdapter
from visalign.sampling.steps import SDE_KINDS, block_project, check_block, sde_mean_std, transition_log_prob


@dataclass(frozen=True)
class SDEOptions:
    """Which stochastic sampler to run.

    kind: "ode" (deterministic Euler), "flow_grpo", "cps" or "dance" (see `visalign.sampling.steps`).
    noise_level: Flow-GRPO's a, CPS's a, or DanceGRPO's eta.
    window: (start, end): the SDE runs only on steps start <= i < end and the ODE elsewhere
        (Flow-GRPO-Fast / MixGRPO); None = every step.
    noise_block: the SDE's noise is constant on noise_block × noise_block tiles of the latent (the projection
        of full noise onto that coarse subspace), and so is its correction of the ODE mean; finer detail
        follows the ODE. A diffusion with covariance std^2 P (P the tile projection) keeps the marginals
        for the same reason the isotropic one does (the correction is half the diffusion matrix times the
        score), and the policy's log-prob lives on fewer dimensions, so a policy gradient through its noise
        is less noisy. 1 = the usual isotropic SDE.
    """

    kind: str = "ode"
    noise_level: float = 0.7
    window: tuple[int, int] | None = None
    noise_block: int = 1

    def __post_init__(self):
        if self.kind not in SDE_KINDS:
            raise ValueError(f"unknown SDE kind {self.kind!r}; allowed: {', '.join(SDE_KINDS)}")
        if self.noise_level < 0:
            raise ValueError(f"noise_level={self.noise_level} must be >= 0")
        if self.window is not None and not (0 <= self.window[0] < self.window[1]):
            raise ValueError(f"window={self.window} must satisfy 0 <= start < end")
        if self.noise_block < 1:
            raise ValueError(f"noise_block={self.noise_block} must be >= 1")

    def stochastic_steps(self, sigmas: Tensor) -> Tensor:
        """Bool [N]: steps that inject noise. A step whose std would be 0 (CPS into sigma'=0) stays ODE."""
        n = len(sigmas) - 1
        mask = torch.zeros(n, dtype=torch.bool)
        if self.kind == "ode" or self.noise_level == 0:
            return mask
        start, end = self.window if self.window is not None else (0, n)
        mask[start:min(end, n)] = True
        if self.kind == "cps":
            mask &= sigmas[1:] > 0
        return mask


ODE = SDEOptions("ode", 0.0)


@dataclass
class Trajectory:
    """Everything a trainer or steering method needs from one batch of sampling (N steps).

    latents:   [B, N+1, *latent]  x at each sigma; latents[:, 0] is the initial noise, latents[:, -1] the sample.
    x0_preds:  [B, N, *latent]    x - sigma v at each step.
    means:     [B, N, *latent]    the transition mean.
    stds:      [B, N]             the transition std (0 on ODE steps).
    log_probs: [B, N]             log-prob of latents[:, i+1] given latents[:, i] (0 on ODE steps).
    sigmas:    [N+1]              the schedule, ending in 0.
    stochastic:[N]                which steps injected noise.
    drifts:    [B, N, *latent]    an extra shift of the mean that does not depend on the parameters (a reward-
                                  gradient drift, Euphonium); None when sampling had none. It is part of `means`
                                  and is added again when a stored step is rescored, so the ratio stays 1.
    """

    latents: Tensor
    x0_preds: Tensor
    means: Tensor
    stds: Tensor
    log_probs: Tensor
    sigmas: Tensor
    stochastic: Tensor
    sde: SDEOptions
    drifts: Tensor | None = None

    @property
    def final(self) -> Tensor:
        return self.latents[:, -1]


@dataclass
class Transition:
    x_next: Tensor
    mean: Tensor
    std: Tensor
    log_prob: Tensor
    velocity: Tensor
    x0_pred: Tensor
    drift: Tensor | None = None


# drift(x0_pred, std [B]) -> a shift of the SDE mean (shape of x), or None for no shift at this step.
DriftFn = Callable[[Tensor, Tensor], "Tensor | None"]


def transition(adapter: FlowModelAdapter, x: Tensor, sigma: Tensor | float, sigma_next: Tensor | float,
               cond: Conditioning, guidance_scale: float, sde: SDEOptions, sigma_guard: float | Tensor,
               stochastic: bool | Tensor = True, x_next: Tensor | None = None,
               noise: Tensor | None = None, drift: Tensor | DriftFn | None = None) -> Transition:
    """One step from x at `sigma` to `sigma_next` (scalars or per-sample [B]).

    Given `x_next` (a stored transition) it is only scored; otherwise it is drawn as mean + std * noise.
    `stochastic` (bool or per-sample bool [B]) says whether this step is an SDE step; ODE steps get
    std 0 and log-prob 0. `sigma_guard` is the schedule's sigmas[1], Flow-GRPO's stand-in for sigma = 1.
    `drift` shifts the mean of SDE steps by a parameter-free amount: a stored tensor when rescoring, or a
    function of this step's x0-prediction and std when sampling (see `visalign.steering.RewardDrift`).
    """
    x = x.float()
    batch = x.shape[0]
    sigma_b = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(batch)
    v = adapter.predict_velocity(x, sigma_b, cond, guidance_scale)
    stoch = torch.as_tensor(stochastic, device=x.device).expand(batch)
    mean_sde, std_sde = sde_mean_std(sde.kind, x, v, sigma_b, sigma_next, sde.noise_level, sigma_guard)
    mean_ode, _ = sde_mean_std("ode", x, v, sigma_b, sigma_next, 0.0)
    block = sde.noise_block
    if block > 1:  # the SDE's correction of the ODE mean lives where its noise does (see SDEOptions)
        mean_sde = mean_ode + block_project(mean_sde - mean_ode, block)
    shape = (batch,) + (1,) * (x.ndim - 1)
    std = torch.where(stoch.view(shape), std_sde.expand(shape), torch.zeros(shape, device=x.device))
    mean = torch.where(stoch.view(shape), mean_sde, mean_ode)
    sigma_col = sigma_b.view(shape)
    x0_pred = x - sigma_col * v
    if callable(drift):
        drift = drift(x0_pred.detach(), std.flatten().detach())
        if drift is not None and block > 1:  # the tilt std^2 P grad r of the coarse Gaussian
            drift = block_project(drift, block)
    if drift is not None:
        drift = torch.where(stoch.view(shape), drift.to(mean), torch.zeros((), device=mean.device)).detach()
        mean = mean + drift
    if x_next is None:
        x_next = mean if noise is None else mean + std * block_project(noise, block)
    safe_std = torch.where(std > 0, std, torch.ones_like(std))
    log_prob = torch.where(stoch, transition_log_prob(sde.kind, x_next, mean, safe_std, block),
                           torch.zeros(batch, device=x.device))
    return Transition(x_next.float(), mean, std.flatten(), log_prob, v, x0_pred, drift)


def sample_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sample: its initial noise and then its SDE noise come from it. Seeds must lie in
    [0, 2^63): torch reduces larger ones modulo 2^63 (2^63 would silently be seed 0) and refuses 2^64."""
    seeds = [int(s) for s in seeds]
    bad = [s for s in seeds if not 0 <= s < 2**63]
    if bad:
        raise ValueError(f"seed {bad[0]} is outside [0, 2**63)")
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def draw_noise(shape: tuple[int, ...], batch: int, generators: list[torch.Generator] | None = None,
               generator: torch.Generator | None = None, device="cpu") -> Tensor:
    """Standard normal noise [batch, *shape]: per-sample generators if given, else one batch draw."""
    if generators is not None:
        if len(generators) != batch:
            raise ValueError(f"got {len(generators)} seeds for a batch of {batch}")
        noise = torch.stack([torch.randn(shape, generator=g) for g in generators])
    else:
        noise = torch.randn((batch, *shape), generator=generator)
    return noise.to(device)


def share_noise(noise: Tensor, noise_groups: Sequence[int]) -> Tensor:
    """Members of a group (same id) share the first member's initial noise (DanceGRPO `init_same_noise`)."""
    if len(noise_groups) != noise.shape[0]:
        raise ValueError(f"got {len(noise_groups)} noise_groups for a batch of {noise.shape[0]}")
    first: dict[int, int] = {}
    source = [first.setdefault(int(g), i) for i, g in enumerate(noise_groups)]
    return noise[torch.tensor(source, device=noise.device)]


def _at_step(drift: Callable, step: int) -> Callable:
    """`drift(x0, std, step)` with this step bound (the form `transition` calls)."""
    return lambda x0, std: drift(x0, std, step)


@torch.no_grad()
def sample(adapter: FlowModelAdapter, cond: Conditioning, *, num_steps: int, height: int, width: int,
           num_frames: int | None = None, guidance_scale: float = 1.0, sde: SDEOptions = ODE,
           seeds: Sequence[int] | None = None, generator: torch.Generator | None = None,
           noise_groups: Sequence[int] | None = None, latents: Tensor | None = None,
           drift: Callable[[Tensor, Tensor, int], Tensor | None] | None = None,
           progress: bool = False) -> Trajectory:
    """Sample a batch (one sample per entry of `cond`) and return its trajectory.

    `drift(x0_pred, std, step_index)` optionally shifts the mean of SDE steps (Euphonium's reward-gradient
    drift, `visalign.steering.RewardDrift.bind`); the shifts are stored in the trajectory.

    Randomness: with `seeds` every sample has its own generator for its initial noise and its SDE noise,
    so a seed reproduces bit-for-bit whatever else is in the batch; with `generator` the batch draws from
    one stream (what a diffusers pipeline does with one generator).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be >= 1")
    if guidance_scale < 0:
        raise ValueError(f"guidance_scale={guidance_scale} must be >= 0")
    batch = len(cond)
    shape = adapter.latent_shape(height, width, num_frames)
    check_block(shape, sde.noise_block)  # before any denoiser call
    sigmas = adapter.sigmas(num_steps, shape)
    stochastic = sde.stochastic_steps(sigmas)
    device = adapter.device
    gens = sample_generators(seeds) if seeds is not None else None
    if latents is not None:
        x = latents.float().to(device)
    else:
        x = draw_noise(shape, batch, gens, generator, device)
        if noise_groups is not None:
            x = share_noise(x, noise_groups)

    xs, x0s, means, stds, lps, drifts = [x], [], [], [], [], []
    for i in tqdm(range(num_steps), desc="sampling", disable=not progress, leave=False):
        noise = None
        if stochastic[i]:
            noise = draw_noise(shape, batch, gens, generator, device)
        step_drift = _at_step(drift, i) if drift is not None and stochastic[i] else None
        step = transition(adapter, x, sigmas[i], sigmas[i + 1], cond, guidance_scale, sde, sigmas[1],
                          stochastic=bool(stochastic[i]), noise=noise, drift=step_drift)
        if drift is not None:
            drifts.append(step.drift if step.drift is not None else torch.zeros_like(x))
        x = step.x_next
        xs.append(x)
        x0s.append(step.x0_pred)
        means.append(step.mean)
        stds.append(step.std)
        lps.append(step.log_prob)
    return Trajectory(latents=torch.stack(xs, 1), x0_preds=torch.stack(x0s, 1), means=torch.stack(means, 1),
                      stds=torch.stack(stds, 1), log_probs=torch.stack(lps, 1), sigmas=sigmas,
                      stochastic=stochastic, sde=sde, drifts=torch.stack(drifts, 1) if drift is not None else None)


def trajectory_log_prob(adapter: FlowModelAdapter, traj: Trajectory, steps: Tensor | int, cond: Conditioning,
                        guidance_scale: float, index: Tensor | None = None) -> Transition:
    """Recompute the log-prob of stored transitions under the adapter's current parameters.

    steps: one step index for all, or per-sample [b]; index: which trajectory rows (default: all), so
    recomputation can run on mini-batches of any size. `cond` must be the conditioning of those rows.
    """
    rows = torch.arange(traj.latents.shape[0]) if index is None else torch.as_tensor(index)
    steps = torch.as_tensor(steps).expand(len(rows))
    sigmas = traj.sigmas.to(traj.latents.device)
    drift = None if traj.drifts is None else traj.drifts[rows, steps]
    return transition(adapter, traj.latents[rows, steps], sigmas[steps], sigmas[steps + 1], cond, guidance_scale,
                      traj.sde, sigmas[1], stochastic=traj.stochastic[steps], x_next=traj.latents[rows, steps + 1],
                      drift=drift)
