"""Gradient aggregators as weightings of the per-reward gradients: Gram matrix G = J Jᵀ in (K×K), one coefficient
per reward out, so the update is d = Σ_k alpha_k g_k and nothing of size P (the parameter count) is touched here.

- sum:    alpha = 1 (the configured reward weights are applied to the rows before any aggregator).
- mgda:   alpha = argmin_{alpha in simplex} alphaᵀ G alpha, the min-norm point of the convex hull (Désidéri 2012;
          Sener & Koltun 2018), the QP MARBLE solves. Solved exactly with quadprog rather than with torchjd's
          `MGDAWeighting`, whose Frank–Wolfe loop stops at a step-size tolerance and can leave the weights
          1e-3 away from the optimum.
- pcgrad: Yu et al. 2020, through torchjd's `PCGradWeighting` (projections need only inner products); its random
          projection order is drawn from a seeded generator so runs resume bit-identically.
- cagrad: Liu et al. 2021, through torchjd's `CAGradWeighting` (cvxpy / Clarabel): d = g0 + c ||g0|| g_w / ||g_w||,
          g0 the mean gradient, w = argmin_{simplex} g_wᵀ g0 + c ||g0|| ||g_w||.
- upgrad: torchjd's `UPGradWeighting` (Quinton & Rey 2024): each g_k projected onto the dual cone of the rows,
          then averaged, or weighted by a preference vector (any non-negative preference keeps d in the cone).
"""

from __future__ import annotations

import numpy as np
import quadprog
import torch
from torch import Tensor

AGGREGATORS = ("sum", "mgda", "pcgrad", "cagrad", "upgrad")


def min_norm_weights(gram: Tensor) -> Tensor:
    """The exact MGDA weights: argmin alphaᵀ G alpha over the simplex (quadprog; a 1e-10 relative ridge keeps a
    singular G, e.g. two parallel gradients, positive definite). Returns float64 [K]."""

    g = gram.detach().double().cpu().numpy()
    k = g.shape[0]
    if k == 1:
        return torch.ones(1, dtype=torch.float64)
    ridge = 1e-10 * max(float(np.trace(g)) / k, 1e-30)
    # quadprog: min ½ xᵀ P x − qᵀ x  s.t.  Cᵀ x >= b, the first `meq` rows as equalities.
    constraints = np.concatenate([np.ones((k, 1)), np.eye(k)], axis=1)
    bounds = np.concatenate([[1.0], np.zeros(k)])
    alpha = quadprog.solve_qp(g + ridge * np.eye(k), np.zeros(k), constraints, bounds, meq=1)[0]
    alpha = np.clip(alpha, 0.0, None)
    return torch.from_numpy(alpha / alpha.sum())


def aggregator_weights(name: str, gram: Tensor, *, cagrad_c: float = 0.4, seed: int = 0,
                       pref: Tensor | None = None) -> Tensor:
    """Coefficients alpha [K] (float64) of the aggregator `name` for the Gram matrix `gram` [K, K]. `pref` [K]
    (upgrad only; non-negative, summing to 1) weights the projected gradients instead of their mean."""
    gram = gram.detach().double().cpu()
    k = gram.shape[0]
    if name == "sum":
        return torch.ones(k, dtype=torch.float64)
    if name == "mgda":
        return min_norm_weights(gram)
    import torchjd.aggregation as tjd  # seconds to import (its CAGrad solver); only these aggregators need it

    if name == "pcgrad":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return tjd.PCGradWeighting()(gram).double()
    if name == "cagrad":
        return tjd.CAGradWeighting(c=cagrad_c)(gram).double()
    if name == "upgrad":
        return tjd.UPGradWeighting(pref_vector=None if pref is None else pref.double())(gram).double()
    raise ValueError(f"unknown aggregator {name!r}; allowed: {', '.join(AGGREGATORS)}")
