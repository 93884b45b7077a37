"""Uncertainty for evaluation tables: bootstrap confidence intervals of a mean and of a paired difference.

Paired: two checkpoints (or steering settings) judged on the same prompts with the same seeds, so the
difference is computed per prompt and resampled by prompt (Efron & Tibshirani 1993, percentile bootstrap).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def bootstrap_mean_ci(values: Sequence[float] | torch.Tensor, *, level: float = 0.95, n_boot: int = 2000,
                      seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the percentile bootstrap interval of the mean at `level`."""
    x = torch.as_tensor(values, dtype=torch.float64).flatten()
    if x.numel() == 0:
        raise ValueError("no values to summarise")
    if not 0 < level < 1:
        raise ValueError(f"level={level} must be in (0, 1)")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(x.numel(), (n_boot, x.numel()), generator=g)
    means = x[idx].mean(1)
    alpha = (1 - level) / 2
    low, high = torch.quantile(means, torch.tensor([alpha, 1 - alpha], dtype=torch.float64)).tolist()
    return float(x.mean()), low, high


def paired_delta(a: Sequence[float] | torch.Tensor, b: Sequence[float] | torch.Tensor, *, level: float = 0.95,
                 n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """Mean of b - a over paired items with its bootstrap interval, and the share of items where b wins/loses."""
    a = torch.as_tensor(a, dtype=torch.float64).flatten()
    b = torch.as_tensor(b, dtype=torch.float64).flatten()
    if a.shape != b.shape:
        raise ValueError(f"paired results must have one value per item on both sides, got {a.numel()} and {b.numel()}")
    delta = b - a
    mean, low, high = bootstrap_mean_ci(delta, level=level, n_boot=n_boot, seed=seed)
    return {"delta": mean, "low": low, "high": high, "wins": float((delta > 0).double().mean()),
            "losses": float((delta < 0).double().mean()), "n": int(delta.numel())}
