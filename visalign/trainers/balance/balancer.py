"""The balancer a trainer holds: reward weights and normalisation around an aggregator, EMA smoothing of the
coefficients (MARBLE's "amortized MGDA + EMA-smoothed alpha"), checkpointable state, and the diagnostics."""

from __future__ import annotations

import torch
from torch import Tensor

from visalign.trainers.balance.aggregators import AGGREGATORS, aggregator_weights

SAFE = ("mgda", "upgrad")  # aggregators whose fresh update has a non-negative inner product with every gradient
PREFERENCE = ("sum", "upgrad")  # aggregators that can take the reward weights as a preference among unit gradients


def check_weights(method: str, reward_weights: dict[str, float], normalize: bool) -> None:
    """With normalised gradients the reward weights are a preference: positive, and only for aggregators that take
    one (config-time check as well as the Balancer's)."""
    if not normalize:
        return
    values = [float(v) for v in reward_weights.values()]
    if method not in PREFERENCE and len(set(values)) > 1:
        raise ValueError(f"balance {method!r} with normalised gradients ignores reward weights, but they differ "
                         f"({dict(reward_weights)}); use equal weights, or {' / '.join(PREFERENCE)}, where they "
                         "are a preference among the unit gradients")
    if any(v <= 0 for v in values):
        raise ValueError(f"with normalised gradients the reward weights are a preference and must be > 0, got "
                         f"{dict(reward_weights)}")


def diagnostics(gram: Tensor, alpha: Tensor, names: list[str]) -> dict[str, float]:
    """Everything from the Gram matrix and the applied coefficients (d = Σ alpha_k g_k), no P-sized work:
    per-reward gradient norms, pairwise cosines, each reward's cosine with the update d (the worst of them is
    MARBLE's "worst-aligned reward"), and the coefficients."""
    gram, alpha = gram.double(), alpha.double()
    norms = gram.diagonal().clamp(min=0).sqrt()
    safe = norms.clamp(min=1e-30)
    cos = gram / (safe[:, None] * safe[None, :])
    g_dot_d = gram @ alpha
    d_norm = (alpha @ gram @ alpha).clamp(min=0).sqrt().clamp(min=1e-30)
    cos_update = g_dot_d / (safe * d_norm)
    out = {"balance/update_norm": float(d_norm), "balance/worst_cos": float(cos_update.min()),
           "balance/worst_cos_negative": float(cos_update.min() < 0)}
    for i, a in enumerate(names):
        out[f"balance/grad_norm/{a}"] = float(norms[i])
        out[f"balance/cos_update/{a}"] = float(cos_update[i])
        out[f"balance/weight/{a}"] = float(alpha[i])
        for j in range(i + 1, len(names)):
            out[f"balance/cos/{a}|{names[j]}"] = float(cos[i, j])
    return out


class Balancer:
    """Coefficients for the per-reward gradients g_k of the trained rewards.

    The configured reward weights w_k scale the rows first (so "sum" is the usual weighted sum); `normalize`
    then rescales each row to unit norm (MARBLE removes reward scale) before the aggregator; the coefficients
    returned apply to the raw g_k. Normalising would cancel the weights, so with `normalize` they become the
    preference among the unit gradients instead: "sum" adds w_k g_k/|g_k|, and "upgrad" weights the projected
    unit gradients by w_k / Σw (torchjd's pref_vector; equal weights give its default mean). MGDA, PCGrad and
    CAGrad have no such preference, so unequal weights with `normalize` are an error for them rather than
    silently ignored. `ema` smooths the coefficients across refreshes: alpha <- ema alpha + (1 - ema) alpha_new.
    `safeguard` (MGDA, UPGrad) keeps the smoothing from ever pointing the update against a reward: when the smoothed
    alpha gives some g_k a negative inner product with d on this Gram matrix, this refresh's own alpha replaces it
    (and the smoothing restarts from it); that alpha cannot conflict, since the min-norm point d* of the hull has
    g_kᵀd* >= |d*|^2 for every k (Désidéri 2012, Sener & Koltun 2018 Thm 1) and UPGrad's d lies in the dual cone.
    """

    def __init__(self, method: str, reward_weights: dict[str, float], *, ema: float = 0.0, normalize: bool = False,
                 cagrad_c: float = 0.4, seed: int = 0, safeguard: bool = False):
        if method not in AGGREGATORS:
            raise ValueError(f"unknown balance method {method!r}; allowed: {', '.join(AGGREGATORS)}")
        if not 0 <= ema < 1:
            raise ValueError(f"balance ema={ema} must be in [0, 1)")
        if safeguard and method not in SAFE:
            raise ValueError("the balance safeguard needs an aggregator whose update never conflicts "
                             f"({', '.join(SAFE)}), not {method!r}")
        check_weights(method, reward_weights, normalize)
        self.method, self.names = method, list(reward_weights)
        self.w = torch.tensor([float(v) for v in reward_weights.values()], dtype=torch.float64)
        self.ema, self.normalize, self.cagrad_c, self.seed, self.safeguard = ema, normalize, cagrad_c, seed, safeguard
        self.alpha: Tensor | None = None
        self.refreshes = 0

    def fresh_weights(self, gram: Tensor) -> Tensor:
        """Coefficients on the raw gradients for this Gram matrix, before smoothing (pure apart from the seed)."""
        gram = gram.detach().double().cpu()
        scaled = self.w[:, None] * gram * self.w[None, :]
        scale, pref = torch.ones_like(self.w), None
        if self.normalize:
            scale = 1.0 / scaled.diagonal().clamp(min=1e-30).sqrt()
            scaled = scale[:, None] * scaled * scale[None, :]
            pref = self.w / self.w.sum()
        if self.normalize and self.method == "sum":
            return self.w * scale * self.w  # coefficient w_k on the unit row g_k w_k scale_k
        coeff = aggregator_weights(self.method, scaled, cagrad_c=self.cagrad_c, seed=self.seed + self.refreshes,
                                   pref=pref if self.method == "upgrad" else None)
        return coeff * scale * self.w

    def update(self, gram: Tensor, weights_gram: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
        """Refresh from a new Gram matrix: the smoothed coefficients [K] and the diagnostics of this update.
        `weights_gram` (of tracked gradients) chooses the coefficients instead of `gram`; the safeguard and the
        diagnostics stay on `gram`, the gradients the coefficients are applied to."""
        fresh = self.fresh_weights(gram if weights_gram is None else weights_gram)
        self.alpha = fresh if self.alpha is None or self.ema == 0 else self.ema * self.alpha + (1 - self.ema) * fresh
        fired = self.safeguard and bool((gram.double() @ self.alpha < 0).any())
        if fired:
            self.alpha = fresh if weights_gram is None else self.fresh_weights(gram)
        self.refreshes += 1
        logs = diagnostics(gram, self.alpha, self.names)
        if self.safeguard:
            logs["balance/safeguard"] = float(fired)
        return self.alpha.clone(), logs

    def state_dict(self) -> dict:
        return {"alpha": self.alpha, "refreshes": self.refreshes}

    def load_state_dict(self, state: dict) -> None:
        self.alpha, self.refreshes = state["alpha"], int(state["refreshes"])
