"""Flow samplers with log-probs: pure step functions (`steps`) and the one sampling loop (`sampler`)."""

from visalign.sampling.sampler import (
    ODE,
    SDEOptions,
    Trajectory,
    Transition,
    draw_noise,
    sample,
    share_noise,
    trajectory_log_prob,
    transition,
)
from visalign.sampling.steps import SDE_KINDS, gaussian_log_prob, sde_mean_std

__all__ = ["ODE", "SDE_KINDS", "SDEOptions", "Trajectory", "Transition", "draw_noise", "gaussian_log_prob",
           "sample", "sde_mean_std", "share_noise", "trajectory_log_prob", "transition"]
