"""Multi-reward balancing in gradient space (MARBLE and friends), with diagnostics.

A trainer with `train.balance.method=<aggregator>` keeps one advantage per reward, takes one gradient per reward on the
shared rollout (`GradientBuffer`, a [K, P] buffer over the trainable parameters), and applies d = Σ_k alpha_k g_k
with alpha from the Gram matrix (`Balancer`: sum, mgda, pcgrad, cagrad, upgrad; EMA-smoothed). DiffusionNFT's loss
is affine in each sample's reward weight, so with `train.balance.amortized` the same update costs one backward
with blended weights and the Gram matrix is refreshed every `train.balance.every` steps (MARBLE), or, with
`train.balance.gram=output`, taken over the whole step in the space of the predicted velocity (MGDA-UB, nearly
free) and applied to the next step. Advantage-space alternatives (GDPO, CMO, Parrot, Lagrange thresholds,
hypervolume weights) live in `visalign.trainers.balance.advantages`.
"""

from visalign.trainers.balance.advantages import (
    LagrangeThresholds,
    cmo_advantages,
    cmo_weights,
    hypervolume_weights,
    pareto_mask,
)
from visalign.trainers.balance.aggregators import AGGREGATORS, aggregator_weights, min_norm_weights
from visalign.trainers.balance.balancer import Balancer, diagnostics
from visalign.trainers.balance.gradients import GradientBuffer, output_space_gram

__all__ = ["AGGREGATORS", "Balancer", "GradientBuffer", "LagrangeThresholds", "aggregator_weights", "cmo_advantages",
           "cmo_weights", "diagnostics", "hypervolume_weights", "min_norm_weights", "output_space_gram", "pareto_mask"]
