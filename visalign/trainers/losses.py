"""Policy-gradient losses on per-step transition log-probs. Each returns (loss, metrics)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def guard_log_ratio(log_prob: Tensor, old_log_prob: Tensor, mean: Tensor, old_mean: Tensor, std: Tensor) -> Tensor:
    """GRPO-Guard's RatioNorm (Wang et al. 2025, arXiv 2510.22319; as written in verl-omni's GRPO-Guard
    docs): add back the mean-shift bias b = mean_dims (mu - mu_old)^2 / (2 std^2) that pushes the Gaussian
    log-ratio below 0, then scale by the transition std so every step's ratio has a comparable spread:
    log rho = (lp - lp_old + b) * std, with std = sqrt(-dt) * sigma_t."""
    dims = tuple(range(1, mean.ndim))
    std = std.view(-1)
    bias = (mean - old_mean).pow(2).mean(dim=dims) / (2 * std**2)
    return (log_prob - old_log_prob + bias) * std


def grpo_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float,
              mask: Tensor | None = None, mean: Tensor | None = None, ref_mean: Tensor | None = None,
              std: Tensor | None = None, kl_beta: float = 0.0, log_ratio: Tensor | None = None,
              step_weight: Tensor | None = None) -> tuple[Tensor, dict]:
    """PPO-clipped GRPO loss of one denoising step, plus Flow-GRPO's KL in SDE-mean space.

    ratio = exp(lp - lp_old);  L = mean(max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps))) + beta KL,
    KL = mean_dims (mu_theta - mu_ref)^2 / (2 std^2), with std the transition std (no |dt| factor, as
    flow_grpo `scripts/train_sd3.py` L881-897; issue #78 there discusses the form).
    `mask` (bool [B]) drops samples (invalid reward, zero-variance group, best-of-N rejects) from the mean.
    `log_ratio` replaces lp - lp_old (GRPO-Guard's `guard_log_ratio`); `step_weight` [B] scales each sample's
    policy term (GRPO-Guard's gradient reweighting 1 / |dt|).
    """
    ratio = torch.exp(log_prob - old_log_prob if log_ratio is None else log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    per_sample = torch.maximum(unclipped, clipped)
    if step_weight is not None:
        per_sample = per_sample * step_weight
    kl = torch.zeros_like(per_sample)
    if kl_beta > 0:
        if mean is None or ref_mean is None or std is None:
            raise ValueError("kl_beta > 0 needs mean, ref_mean and std")
        dims = tuple(range(1, mean.ndim))
        kl = (mean - ref_mean).pow(2).mean(dim=dims) / (2 * std.view(-1) ** 2)
        per_sample = per_sample + kl_beta * kl
    weight = mask.float() if mask is not None else torch.ones_like(per_sample)
    n = weight.sum().clamp(min=1)
    loss = (per_sample * weight).sum() / n
    with torch.no_grad():
        keep = weight > 0
        metrics = {
            "policy_loss": ((torch.maximum(unclipped, clipped) * weight).sum() / n).item(),  # unweighted
            "kl": ((kl * weight).sum() / n).item(),
            "ratio_max_dev": (ratio[keep] - 1).abs().max().item() if keep.any() else 0.0,
            # The step's drift diagnostics (visalign.trainers.diagnostics); NaN when no sample trained.
            **ratio_stats(ratio[keep], (ratio[keep] - 1).abs() > clip_range),
        }
    return loss, metrics


def ratio_stats(ratio: Tensor, clipped: Tensor) -> dict[str, float]:
    """Mean, min and max of the trained samples' ratios [n] and the fraction clipped (bool [n]); NaN when n = 0."""
    if not len(ratio):
        return dict.fromkeys(("ratio_mean", "ratio_min", "ratio_max", "clip_fraction"), math.nan)
    return {"ratio_mean": ratio.mean().item(), "ratio_min": ratio.min().item(), "ratio_max": ratio.max().item(),
            "clip_fraction": clipped.float().mean().item()}


# ---- forward-process losses (flow matching on clean samples): Flow-DPO, Flow-RWR, DiffusionNFT -------------


def per_sample_mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over every non-batch dimension: [B]."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def dpo_loss(err_w: Tensor, err_l: Tensor, ref_err_w: Tensor, ref_err_l: Tensor, beta: float,
             weight: Tensor | None = None) -> tuple[Tensor, dict]:
    """Diffusion-DPO (Wallace et al. 2024, Eq. 14; DiffusionDPO `train.py` L1119-1145), and Flow-DPO with
    velocity errors (flow_grpo `scripts/train_sd3_dpo.py`): with per-pair errors at a shared noise and timestep,

        L = -log sigmoid(-beta/2 * [(err_w - ref_err_w) - (err_l - ref_err_l)]),

    log 2 when policy = reference. `weight` [B] scales each pair (GAPO: the reward gap); the mean is weighted.
    """
    inside = -0.5 * beta * ((err_w - ref_err_w) - (err_l - ref_err_l))
    per_pair = -torch.nn.functional.logsigmoid(inside)
    w = torch.ones_like(per_pair) if weight is None else weight.to(per_pair)
    loss = (per_pair * w).sum() / w.sum().clamp(min=1e-12)
    with torch.no_grad():
        metrics = {"dpo_loss": loss.item(), "implicit_accuracy": (inside > 0).float().mean().item(),
                   "implicit_margin": inside.mean().item(), "err_winner": err_w.mean().item(),
                   "err_loser": err_l.mean().item(), "ref_err_winner": ref_err_w.mean().item()}
    return loss, metrics


def dpo_ties_loss(err_w: Tensor, err_l: Tensor, ref_err_w: Tensor, ref_err_l: Tensor, beta: float, tie: Tensor,
                  eta: float, weight: Tensor | None = None) -> tuple[Tensor, dict]:
    """DPO with ties under Rao-Kupper (Rao & Kupper 1967; DPO-RK, Chen et al. 2024, arXiv 2409.17431, Eq. 9-10):
    with the DPO margin d = -beta/2 * [(err_w - ref_err_w) - (err_l - ref_err_l)] and eta = log(nu) > 0,

        P(w > l) = sigmoid(d - eta),   P(tie) = (e^{2 eta} - 1) sigmoid(d - eta) sigmoid(-d - eta),

    so a tied pair pulls its margin towards 0 rather than towards one side. `tie` [B] bool; `weight` as dpo_loss."""
    d = -0.5 * beta * ((err_w - ref_err_w) - (err_l - ref_err_l))
    log_win = torch.nn.functional.logsigmoid(d - eta)
    log_tie = (2 * eta + math.log(-math.expm1(-2 * eta)) + log_win
               + torch.nn.functional.logsigmoid(-d - eta))  # log(e^{2 eta} - 1), stable
    per_pair = -torch.where(tie.to(d.device), log_tie, log_win)
    w = torch.ones_like(per_pair) if weight is None else weight.to(per_pair)
    loss = (per_pair * w).sum() / w.sum().clamp(min=1e-12)
    with torch.no_grad():
        decided = ~tie.to(d.device)
        metrics = {"dpo_loss": loss.item(), "implicit_margin": d.mean().item(),
                   "implicit_accuracy": (d[decided] > 0).float().mean().item() if decided.any() else float("nan"),
                   "tie_fraction": tie.float().mean().item(),
                   "tie_margin_abs": d[~decided].abs().mean().item() if (~decided).any() else float("nan")}
    return loss, metrics


def rwr_weights(advantages: Tensor, groups: Tensor, mask: Tensor, mode: str, temperature: float = 1.0) -> Tensor:
    """Per-sample weights of reward-weighted regression, normalised to mean 1 over the kept samples (0 elsewhere):
    "exp": exp(A / temperature) (Peters & Schaal 2007; Flow-RWR in "Improving Video Generation with Human
    Feedback" weights the flow-matching loss by the reward); "best": only the best sample of each group
    (reward-filtered SFT, flow_grpo `train_sd3_sft.py`'s `sft` mode); "positive": every sample above its group's
    mean (A > 0) alike, as RAFT (Dong et al. 2023, arXiv 2304.06767) fine-tunes on the better-ranked samples
    of each prompt, so that no ranked sample's share depends on how far it beat the others."""
    if mode == "exp":
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be > 0")
        logits = torch.where(mask, advantages.double() / temperature, torch.full_like(advantages.double(), -torch.inf))
        w = torch.softmax(logits, 0) * mask.sum()
    elif mode == "best":
        w = torch.zeros_like(advantages, dtype=torch.float64)
        for g in torch.unique(groups):
            idx = torch.nonzero((groups == g) & mask).flatten()
            if len(idx):
                w[idx[advantages[idx].argmax()]] = 1.0
        w = w * mask.sum() / w.sum().clamp(min=1)
    elif mode == "positive":
        w = ((advantages > 0) & mask).double()
        w = w * mask.sum() / w.sum().clamp(min=1)
    else:
        raise ValueError(f"rwr weighting {mode!r}: allowed 'exp', 'best' or 'positive'")
    return w.float()


def nft_reward_weight(advantages: Tensor, adv_max: float = 5.0) -> Tensor:
    """DiffusionNFT's optimality probability r = clip(A / (2 A_max) + 1/2, 0, 1) (`scripts/train_nft_sd3.py`)."""
    return (advantages / (2 * adv_max) + 0.5).clamp(0.0, 1.0)


def nft_loss(v_theta: Tensor, v_old: Tensor, x_t: Tensor, x0: Tensor, sigma: Tensor, r: Tensor, beta: float,
             adv_max: float = 5.0, v_ref: Tensor | None = None, kl_beta: float = 0.0) -> tuple[Tensor, dict]:
    """DiffusionNFT (Zheng et al. 2025, arXiv 2509.16117; NVlabs/DiffusionNFT `scripts/train_nft_sd3.py`):
    implicit positive and negative policies around the old one,

        v+ = beta v_theta + (1 - beta) v_old,      v- = (1 + beta) v_old - beta v_theta,
        x0± = x_t - sigma v±,    w± = stopgrad(mean |x0± - x0|)   (adaptive per-sample weighting),
        L_i = A_max / beta * [ r_i ||x0+ - x0||² / w+  +  (1 - r_i) ||x0- - x0||² / w- ]
              (+ kl_beta ||v_theta - v_ref||²),

    with ||·||² the mean over dimensions. L_i is affine in the reward weight r_i: L_i = L-_i + r_i (L+_i - L-_i),
    which the multi-reward balancing relies on. The weights are floored at 1e-5 to avoid dividing by zero.
    Returns the batch mean and metrics (including the per-sample L+ and L- for balancing)."""
    s = sigma.view(-1, *([1] * (x_t.ndim - 1))).to(x_t)
    v_pos = beta * v_theta + (1 - beta) * v_old
    v_neg = (1 + beta) * v_old - beta * v_theta
    x0_pos, x0_neg = x_t - s * v_pos, x_t - s * v_neg
    dims = tuple(range(1, x_t.ndim))
    w_pos = (x0_pos - x0).abs().mean(dims).detach().clamp(min=1e-5)
    w_neg = (x0_neg - x0).abs().mean(dims).detach().clamp(min=1e-5)
    l_pos = (x0_pos - x0).pow(2).mean(dims) / w_pos
    l_neg = (x0_neg - x0).pow(2).mean(dims) / w_neg
    per_sample = adv_max / beta * (r * l_pos + (1 - r) * l_neg)
    kl = torch.zeros_like(per_sample)
    if kl_beta > 0:
        if v_ref is None:
            raise ValueError("kl_beta > 0 needs v_ref")
        kl = (v_theta - v_ref).pow(2).mean(dims)
        per_sample = per_sample + kl_beta * kl
    loss = per_sample.mean()
    with torch.no_grad():
        metrics = {"nft_loss": loss.item(), "loss_positive": l_pos.mean().item(),
                   "loss_negative": l_neg.mean().item(), "reward_weight_mean": r.float().mean().item(),
                   "kl": kl.mean().item()}
    return loss, metrics


def awm_loss(v_theta: Tensor, target: Tensor, sigma: Tensor, advantages: Tensor, *, power: float = 0.25,
             v_ref: Tensor | None = None, kl_beta: float = 0.0, v_old: Tensor | None = None,
             old_beta: float = 0.0) -> tuple[Tensor, dict]:
    """Advantage Weighted Matching (Xue et al., ICML 2026; scxue/advantage_weighted_matching
    `scripts/train_sd3_awm.py`: `compute_log_prob_awm` and the policy / KL terms of its training loop).

    The flow-matching error of a rollout sample stands in for its log-likelihood, reweighted by the noise level
    and a generalised Huber power p ('ghuber', the reference default):

        l_i = ||v_theta - (eps - x0)||²,    lp_i = -sigma_i [(l_i + 1e-10)^p - (1e-10)^p] / p,
        L = mean_i -A_i exp(lp_i - sg(lp_i))  (+ kl_beta ||v_theta - v_ref||²  + old_beta ||v_theta - v_old||²),

    on policy, so the ratio is exactly 1 (the reference's PPO clip never acts) and the gradient is
    -A_i grad lp_i: the advantage-weighted flow-matching gradient, damped on samples the model fits badly. The
    error is taken in float64, as the reference does. ||·||² is the mean over dimensions."""
    dims = tuple(range(1, v_theta.ndim))
    err = (v_theta.double() - target.double()).pow(2).mean(dims)
    s = sigma.to(err)
    eps = 1e-10
    lp = -s * ((err + eps) ** power - eps**power) / power
    ratio = torch.exp(lp - lp.detach())
    per_sample = -advantages.to(err) * ratio
    kl = old = torch.zeros_like(per_sample)
    if kl_beta > 0:
        if v_ref is None:
            raise ValueError("kl_beta > 0 needs v_ref")
        kl = (v_theta - v_ref).double().pow(2).mean(dims)
        per_sample = per_sample + kl_beta * kl
    if old_beta > 0:
        if v_old is None:
            raise ValueError("old_beta > 0 needs v_old")
        old = (v_theta - v_old).double().pow(2).mean(dims)
        per_sample = per_sample + old_beta * old
    loss = per_sample.mean().float()
    with torch.no_grad():
        metrics = {"awm_loss": loss.item(), "mse": err.mean().item(), "log_prob": lp.mean().item(),
                   "kl": kl.mean().item(), "kl_old": old.mean().item()}
    return loss, metrics


def dgpo_loss(err: Tensor, err_ref: Tensor, advantages: Tensor, groups: Tensor, beta: float, group_size: int,
              err_old: Tensor | None = None, clip_range: float | None = None) -> tuple[Tensor, dict]:
    """DGPO, group-level preference optimisation (Luo et al., ICLR 2026; Luo-Yihong/DGPO
    `scripts/train_sd3_dgpo.py`, `compute_group_dgpo_loss_allreduce` and its clip), on the per-sample
    flow-matching errors of the trained (`err`) and reference (`err_ref`) velocities at shared noise.

    A group's samples with positive advantage form G+, those with negative G-, each weighted |A_i| / G, and the
    implicit reward is R(x) = -beta (l_theta(x) - l_ref(x)). The loss -log sigmoid(R(G+) - R(G-)) has the gradient
    sigmoid(S_g) (beta / G) sum_i A_i grad l_theta,i with S_g = sum_{i in g} A_i beta (l_theta,i - l_ref,i) / G, so,
    as the reference, this optimises the surrogate

        L = mean_i sg(sigmoid(S_g(i))) A_i l_theta,i

    (the same gradient up to the positive factor beta / G). With `clip_range` c and the old policy's errors, a
    sample whose ratio exp(l_old - l_theta) has left [1 - c, 1 + c] in its advantage's direction contributes no
    gradient (the reference's PPO-style clip). `groups` are the samples' group ids; the micro-batch must hold
    whole groups."""
    a = advantages.to(err)
    ids, inverse = torch.unique(groups.to(err.device), return_inverse=True)
    per_sample = a * beta * (err.detach() - err_ref) / group_size
    s_g = torch.zeros(len(ids), dtype=err.dtype, device=err.device).index_add_(0, inverse, per_sample)
    weight = torch.sigmoid(s_g)[inverse].detach()
    trained = err
    clipped = torch.zeros_like(err, dtype=torch.bool)
    if clip_range is not None:
        if err_old is None:
            raise ValueError("clip_range needs err_old")
        ratio = torch.exp(err_old - err.detach())
        clipped = ((a > 0) & (ratio > 1 + clip_range)) | ((a < 0) & (ratio < 1 - clip_range))
        trained = torch.where(clipped, err.detach(), err)
    loss = (weight * a * trained).mean()
    with torch.no_grad():
        metrics = {"dgpo_loss": loss.item(), "group_score_mean": s_g.mean().item(),
                   "group_weight_mean": weight.mean().item(), "mse": err.mean().item()}
        if clip_range is not None:
            metrics.update(ratio_stats(ratio, clipped))
    return loss, metrics


def reward_backprop_loss(reward: Tensor, margin: float | None = None) -> tuple[Tensor, dict]:
    """Direct reward backprop: ascend a differentiable reward of the generated samples. With no margin the loss is
    -mean(r) (DRaFT, Clark et al. 2023, arXiv 2309.17400); with a margin m it is mean ReLU(m - r), which stops
    pushing a sample once its reward reaches m (ReFL, THUDM/ImageReward `ImageReward/ReFL.py`: m = 2 on
    ImageReward's z-scored scale; SRPO `fastvideo/SRPO.py`: m = 0.7)."""
    loss = (-reward).mean() if margin is None else torch.relu(margin - reward).mean()
    with torch.no_grad():
        metrics = {"reward_loss": loss.item(), "reward": reward.mean().item()}
    return loss, metrics


def ctrl_u_loss(reward: Tensor, reward_2: Tensor, margin: float, weight: float) -> tuple[Tensor, dict]:
    """Ctrl-U's uncertainty-aware reward loss (Zhang et al. 2025, "Ctrl-U: Robust Conditional Image Generation via
    Uncertainty-aware Reward Modeling", ICLR 2025, arXiv 2410.11236; grenoble-zhang/Ctrl-U `train/ctrlu-depth.py`
    L1561-1585), for a scalar reward of two generations of each condition, `reward` [B] and `reward_2` [B]: their
    disagreement U = |r1 - r2| (the reference's L1 discrepancy for continuous predictions) weights the first
    generation's reward loss L^c = ReLU(m - r1), a non-negative consistency loss as the paper's:

        L = mean(L^c exp(-U)) + lambda mean(U)        (the paper's L^c / exp(U) + lambda U)

    so samples the reward judges inconsistently weigh less, and lambda U keeps U from growing instead. Neither U nor
    the weight is detached: both generations carry gradient, as in the reference."""
    uncertainty = (reward - reward_2).abs()
    consistency = torch.relu(margin - reward)
    loss = (consistency * torch.exp(-uncertainty)).mean() + weight * uncertainty.mean()
    with torch.no_grad():
        metrics = {"ctrl_u_loss": loss.item(), "reward_loss": consistency.mean().item(),
                   "uncertainty": uncertainty.mean().item(), "reward": reward.mean().item()}
    return loss, metrics
