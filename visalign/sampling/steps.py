"""One transition x_sigma -> x_sigma' of a flow sampler: its Gaussian mean and std, and the log-prob.

Convention: x_sigma = (1 - sigma) x0 + sigma * noise, v = noise - x0, sigma runs 1 -> 0, dt = sigma' - sigma < 0.
All math is float32. Every form reduces to the Euler ODE step x + dt * v when its noise level is 0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SDE_KINDS = ("ode", "flow_grpo", "cps", "dance")


def _col(s: Tensor | float, like: Tensor) -> Tensor:
    """Broadcast a scalar or per-sample [B] value against a batch tensor."""
    s = torch.as_tensor(s, dtype=torch.float32, device=like.device)
    return s.view(-1, *([1] * (like.ndim - 1))) if s.ndim == 1 else s


def ode_step(x: Tensor, v: Tensor, sigma, sigma_next) -> Tensor:
    """Euler step of the probability-flow ODE, x + (sigma' - sigma) v (diffusers' FlowMatchEulerDiscreteScheduler)."""
    return x + (_col(sigma_next, x) - _col(sigma, x)) * v


def flow_grpo_step(x: Tensor, v: Tensor, sigma, sigma_next, noise_level: float, sigma_guard) -> tuple[Tensor, Tensor]:
    """Flow-GRPO's SDE step (Liu et al. 2025, arXiv 2505.05470, Eq. 9; flow_grpo/diffusers_patch/
    sd3_sde_with_logprob.py, sde_type='sde').

    s = a * sqrt(sigma / (1 - sigma~)), sigma~ = sigma_guard where sigma == 1 (the schedule's second sigma,
    avoiding 1/0), else sigma.
    mean = x (1 + s^2 dt / (2 sigma)) + v (1 + s^2 (1 - sigma) / (2 sigma)) dt,  std = s sqrt(-dt).
    """
    sigma, sigma_next, guard = _col(sigma, x), _col(sigma_next, x), _col(sigma_guard, x)
    dt = sigma_next - sigma
    s = noise_level * torch.sqrt(sigma / (1 - torch.where(sigma == 1, guard, sigma)))
    mean = x * (1 + s**2 * dt / (2 * sigma)) + v * (1 + s**2 * (1 - sigma) / (2 * sigma)) * dt
    return mean, s * torch.sqrt(-dt)


def cps_step(x: Tensor, v: Tensor, sigma, sigma_next, noise_level: float) -> tuple[Tensor, Tensor]:
    """Coefficients-preserving sampling (Wang & Yu 2025, "Coefficients-Preserving Sampling for RL with Flow
    Matching"; flow_grpo sd3_sde_with_logprob.py, sde_type='cps').

    std = sigma' sin(a pi / 2); mean = (1 - sigma') x0_hat + sqrt(sigma'^2 - std^2) x1_hat with
    x0_hat = x - sigma v and x1_hat = x + (1 - sigma) v, so the noise coefficient stays sigma' in total.
    """
    sigma, sigma_next = _col(sigma, x), _col(sigma_next, x)
    std = sigma_next * math.sin(noise_level * math.pi / 2)
    x0_hat, x1_hat = x - sigma * v, x + (1 - sigma) * v
    mean = (1 - sigma_next) * x0_hat + torch.sqrt(sigma_next**2 - std**2) * x1_hat
    return mean, std


def dance_step(x: Tensor, v: Tensor, sigma, sigma_next, eta: float) -> tuple[Tensor, Tensor]:
    """DanceGRPO's SDE step (Xue et al. 2025, arXiv 2505.07818; DanceGRPO fastvideo/train_grpo_flux.py
    `flux_step` with sde_solver=True).

    score = -(x - (1 - sigma) x0_hat) / sigma^2 with x0_hat = x - sigma v;
    mean = x + dsigma (v - eta^2 score / 2),  std = eta sqrt(sigma - sigma').
    """
    sigma, sigma_next = _col(sigma, x), _col(sigma_next, x)
    dsigma = sigma_next - sigma
    x0_hat = x - sigma * v
    score = -(x - (1 - sigma) * x0_hat) / sigma**2
    mean = x + dsigma * (v - 0.5 * eta**2 * score)
    return mean, eta * torch.sqrt(-dsigma)


def sde_mean_std(kind: str, x: Tensor, v: Tensor, sigma, sigma_next, noise_level: float,
                 sigma_guard=None) -> tuple[Tensor, Tensor]:
    """Dispatch to the step of `kind` (one of SDE_KINDS). Returns (mean, std), std broadcastable to x."""
    x, v = x.float(), v.float()
    if kind == "ode" or noise_level == 0:
        return ode_step(x, v, sigma, sigma_next), torch.zeros_like(_col(sigma, x))
    if kind == "flow_grpo":
        return flow_grpo_step(x, v, sigma, sigma_next, noise_level, sigma_guard)
    if kind == "cps":
        return cps_step(x, v, sigma, sigma_next, noise_level)
    if kind == "dance":
        return dance_step(x, v, sigma, sigma_next, noise_level)
    raise ValueError(f"unknown SDE kind {kind!r}; allowed: {', '.join(SDE_KINDS)}")


def check_block(shape: tuple[int, ...], block: int) -> None:
    """Raise unless block × block tiles cover the last two dims of `shape` exactly."""
    if block > 1 and (len(shape) < 3 or shape[-2] % block or shape[-1] % block):
        raise ValueError(f"noise_block={block} must divide the latent's height and width; latent shape "
                         f"{tuple(shape)}")


def block_coords(x: Tensor, block: int) -> Tensor:
    """Coordinates of x in the orthonormal basis of images constant on block × block tiles of the last two
    dims (one basis vector per tile: its indicator / block): block * (tile means). block = 1 is x itself."""
    if block == 1:
        return x
    check_block(x.shape, block)
    *lead, h, w = x.shape
    return x.reshape(*lead, h // block, block, w // block, block).mean(dim=(-3, -1)) * block


def block_project(x: Tensor, block: int) -> Tensor:
    """Orthogonal projection onto images constant on block × block tiles of the last two dims (each tile
    replaced by its mean). Projected standard normal noise is standard normal in `block_coords`."""
    if block == 1:
        return x
    coords = block_coords(x, block) / block
    return coords.repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)


def gaussian_log_prob(x_next: Tensor, mean: Tensor, std: Tensor, block: int = 1) -> Tensor:
    """log N(x_next; mean, std^2), averaged (not summed) over all non-batch dims, as Flow-GRPO and DanceGRPO
    do; x_next is detached so gradients flow only through the mean. Returns [B].

    With block > 1 the noise lives in the tile subspace (`block_project`), and this is the density of that
    degenerate Gaussian on its support: over the `block_coords` of x_next - mean, averaged over them."""
    std = torch.as_tensor(std, dtype=torch.float32, device=mean.device)
    z = block_coords(x_next.detach().float() - mean, block)
    lp = -(z**2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return lp.mean(dim=tuple(range(1, lp.ndim)))


def cps_log_prob(x_next: Tensor, mean: Tensor, block: int = 1) -> Tensor:
    """Flow-GRPO's CPS log-prob: -(x' - mean)^2 averaged over dims, all constants (and 1/2std^2) dropped.
    It is not a normalised density: the ratio exp(lp - lp_old) differs from the Gaussian one by a power.
    With block > 1, over the tile coordinates (see `gaussian_log_prob`)."""
    z = block_coords(x_next.detach().float() - mean, block)
    return -(z**2).mean(dim=tuple(range(1, z.ndim)))


def transition_log_prob(kind: str, x_next: Tensor, mean: Tensor, std: Tensor, block: int = 1) -> Tensor:
    """The log-prob each SDE kind's reference code trains with (Gaussian, or CPS's simplified form)."""
    if kind == "cps":
        return cps_log_prob(x_next, mean, block)
    return gaussian_log_prob(x_next, mean, std, block)
