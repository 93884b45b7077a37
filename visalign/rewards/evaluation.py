"""Reward-model evaluation on preference pairs, and the Bradley-Terry-with-ties loss for training reward heads.

- Pairwise accuracy without ties: the fraction of untied human pairs whose model score difference has the
  human sign (a zero difference counts as wrong), as MJ-Bench and VideoGen-RewardBench report it.
- Pairwise accuracy with ties (Deutsch et al. 2023, "Ties Matter", arXiv:2305.14324; used by
  VideoGen-RewardBench, KwaiVGI/VideoAlign `calc_accuracy.py`): the model declares a tie when |difference| ≤ ε;
  accuracy = (concordant untied pairs + pairs tied by both) / all pairs, maximised over ε ("tie calibration").
- Bradley-Terry with ties (Rao & Kupper 1967): with d = r_a − r_b and η = log θ ≥ 0,
  P(a ≻ b) = σ(d − η), P(b ≻ a) = σ(−d − η), P(tie) = (e^{2η} − 1) σ(d − η) σ(−d − η); η = 0 is plain BT.
  VideoAlign trains its reward model with a BT-with-ties objective; SoliReward discusses tie handling.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from visalign.pairs import load_image
from visalign.rewards.base import combined

# Default tie parameter θ = 2 (η = log 2): at equal scores a win, a loss and a tie are equally likely (1/3 each).
LOG_2 = math.log(2.0)


def _labels_and_margins(labels: Sequence[int] | Tensor, margins: Sequence[float] | Tensor) -> tuple[Tensor, Tensor]:
    h = torch.as_tensor(labels, dtype=torch.float64).flatten()
    m = torch.as_tensor(margins, dtype=torch.float64).flatten()
    if h.shape != m.shape or h.numel() == 0:
        raise ValueError(f"labels and margins must be non-empty and the same length, got {h.numel()} and {m.numel()}")
    if not bool(torch.isin(h, torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)).all()):
        raise ValueError("labels must be +1 (first preferred), -1 (second preferred) or 0 (tie)")
    if not bool(torch.isfinite(m).all()):
        raise ValueError("margins must be finite")
    return h, m


def accuracy_without_ties(labels, margins) -> float:
    """Fraction of pairs with label ±1 whose margin (score_a − score_b) has the label's sign."""
    h, m = _labels_and_margins(labels, margins)
    decided = h != 0
    if not bool(decided.any()):
        raise ValueError("accuracy without ties needs at least one untied pair")
    return float(((h * m) > 0)[decided].double().mean())


def accuracy_with_ties(labels, margins) -> tuple[float, float]:
    """Tie-calibrated pairwise accuracy and the ε that attains it (Deutsch et al. 2023, Eq. for τ with tie
    calibration): for each candidate ε in {0} ∪ {|m_i|}, pairs with |m| ≤ ε are model ties; count
    concordant untied pairs plus pairs tied by both human and model, over all pairs; take the best ε."""
    h, m = _labels_and_margins(labels, margins)
    candidates = torch.unique(torch.cat([torch.zeros(1, dtype=torch.float64), m.abs()]))  # sorted ascending
    model_tie = m.abs()[None, :] <= candidates[:, None]                       # [E, N]
    concordant = (~model_tie) & (h != 0)[None, :] & ((h * m) > 0)[None, :]
    both_tied = model_tie & (h == 0)[None, :]
    scores = (concordant | both_tied).double().sum(1) / h.numel()
    best = int(scores.argmax())  # first maximum: the smallest ε that attains it
    return float(scores[best]), float(candidates[best])


def bt_ties_loss(score_a: Tensor, score_b: Tensor, outcome: Tensor, eta: Tensor | float = LOG_2
                 ) -> tuple[Tensor, dict[str, float]]:
    """Negative log-likelihood of pair outcomes under Rao-Kupper BT-with-ties, averaged over pairs.

    outcome: +1 (a preferred), −1 (b preferred), 0 (tie). eta = log θ > 0 sets how much probability mass ties
    get (a tensor if it is learned; it must be > 0 when ties occur). Returns (loss, metrics)."""
    eta = torch.as_tensor(eta, dtype=score_a.dtype, device=score_a.device)
    outcome = torch.as_tensor(outcome, device=score_a.device)
    if score_a.shape != score_b.shape or score_a.shape != outcome.shape:
        raise ValueError(f"score_a, score_b and outcome must share one shape, got {tuple(score_a.shape)}, "
                         f"{tuple(score_b.shape)}, {tuple(outcome.shape)}")
    ties = outcome == 0
    if bool(ties.any()) and not bool(eta > 0):
        raise ValueError(f"bt_ties_loss: eta must be > 0 when the batch has ties (got {float(eta)}); "
                         "eta = 0 gives ties zero probability")
    d = score_a - score_b
    log_a = F.logsigmoid(d - eta)
    log_b = F.logsigmoid(-d - eta)
    # log(e^{2η} − 1) = 2η + log(1 − e^{−2η}), stable for small and large η.
    log_tie = 2 * eta + torch.log(-torch.expm1(-2 * eta)) + log_a + log_b if bool(ties.any()) else torch.zeros_like(d)
    log_lik = torch.where(outcome > 0, log_a, torch.where(outcome < 0, log_b, log_tie))
    loss = -log_lik.mean()
    decided = ~ties
    metrics = {"loss": float(loss.detach()), "tie_fraction": float(ties.float().mean())}
    if bool(decided.any()):
        metrics["accuracy"] = float(((d * outcome) > 0)[decided].float().mean())
    return loss, metrics


def _score_images(reward, prompts: list[str], images: list[Tensor], batch_size: int) -> Tensor:
    """Combined scores of images of possibly different sizes: batched within each size."""

    scores = torch.empty(len(images), dtype=torch.float64)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        by_shape.setdefault(tuple(image.shape), []).append(i)
    for indices in by_shape.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            with torch.no_grad():
                out = reward(prompts=[prompts[i] for i in chunk], images=torch.stack([images[i] for i in chunk]))
            scores[chunk] = combined(out).double().cpu()
    return scores


def evaluate_pairs(reward, pairs, batch_size: int = 16, progress: bool = True) -> dict[str, float]:
    """Score both images of every pair (`visalign.pairs.read_pairs`) with `reward` and report pairwise
    accuracy with and without ties. The margin is score(chosen) − score(rejected), or its negation for rewards
    where lower is better."""

    chosen, rejected = [], []
    for start in tqdm(range(0, len(pairs), batch_size), desc=f"scoring pairs with {reward.name}",
                      disable=not progress):
        chunk = pairs[start:start + batch_size]
        prompts = [p.prompt for p in chunk] * 2
        images = [load_image(p.chosen) for p in chunk] + [load_image(p.rejected) for p in chunk]
        scores = _score_images(reward, prompts, images, batch_size)
        chosen.append(scores[:len(chunk)])
        rejected.append(scores[len(chunk):])
    margins = torch.cat(chosen) - torch.cat(rejected)
    if not getattr(reward, "higher_is_better", True):
        margins = -margins
    labels = torch.tensor([0.0 if p.tie else 1.0 for p in pairs])
    result = {"pairs": len(pairs), "ties": int((labels == 0).sum())}
    if result["ties"] < len(pairs):
        result["accuracy_without_ties"] = accuracy_without_ties(labels, margins)
    result["accuracy_with_ties"], result["tie_epsilon"] = accuracy_with_ties(labels, margins)
    return result
