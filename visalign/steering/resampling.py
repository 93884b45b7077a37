"""Sequential Monte Carlo pieces for particle steering, all in log space and per prompt group.

Weights are [G, k] log-weights: G prompts, k particles each. Resampling draws k ancestors per group from that
group's own particles only, so a prompt's particles never mix with another prompt's; the returned indices are
flat ([G * k], into particles laid out prompt-major) so every per-particle tensor is permuted with one gather.
Schemes (Douc & Cappé 2005): multinomial (FK steering's `torch.multinomial`), stratified (one uniform per
stratum), systematic (one uniform per group; lowest variance, TDS's default).
"""

from __future__ import annotations

import torch
from torch import Tensor

SCHEMES = ("multinomial", "stratified", "systematic")


def normalize_log_weights(log_w: Tensor) -> Tensor:
    """log of normalised weights per group (logsumexp over the last dim is 0). Rows that are all -inf (every
    particle impossible) become uniform rather than NaN: there is nothing to prefer."""
    log_w = log_w.double()
    dead = torch.isneginf(log_w).all(-1, keepdim=True)
    log_w = torch.where(dead, torch.zeros_like(log_w), log_w)
    if torch.isnan(log_w).any():
        raise ValueError("log-weights contain NaN")
    return log_w - torch.logsumexp(log_w, -1, keepdim=True)


def effective_sample_size(log_w: Tensor) -> Tensor:
    """ESS = 1 / sum(w_i^2) of the normalised weights, per group: k for equal weights, 1 for a degenerate set."""
    return torch.exp(-torch.logsumexp(2 * normalize_log_weights(log_w), -1))


def resample(log_w: Tensor, scheme: str = "systematic", generator: torch.Generator | None = None) -> Tensor:
    """Ancestor indices [G * k] (flat, within each group) drawn in proportion to the weights."""
    if scheme not in SCHEMES:
        raise ValueError(f"resampling scheme {scheme!r}: allowed {', '.join(SCHEMES)}")
    groups, k = log_w.shape
    w = normalize_log_weights(log_w).exp()
    if scheme == "multinomial":
        local = torch.multinomial(w.float(), k, replacement=True, generator=generator)
    else:
        if scheme == "systematic":
            u = torch.rand(groups, 1, generator=generator, dtype=torch.float64).expand(groups, k)
        else:
            u = torch.rand(groups, k, generator=generator, dtype=torch.float64)
        positions = (torch.arange(k, dtype=torch.float64) + u) / k
        cdf = w.cumsum(-1)
        cdf[:, -1] = 1.0  # guard against round-off leaving the last bin short of 1
        local = torch.searchsorted(cdf, positions, right=True).clamp(max=k - 1)
    offsets = torch.arange(groups).unsqueeze(1) * k
    return (local + offsets).flatten()


def resample_counts(indices: Tensor, groups: int, k: int) -> Tensor:
    """How many copies of each particle the ancestors keep, [G, k] (for tests and lineage reports)."""
    return torch.bincount(indices, minlength=groups * k).view(groups, k)
