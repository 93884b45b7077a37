"""GRPO advantages and loss against hand-computed values."""

import math

import pytest
import torch

from visalign.trainers.advantages import best_of_n_mask, combine_advantages, group_advantages
from visalign.trainers.losses import grpo_loss


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 3.0, 2.0, 2.0, 0.0, 4.0])
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    adv, m = group_advantages(rewards, groups, eps=0.0, clip=None)
    # group 0: mean 2, population std 1 -> (-1, 1); group 1 has no spread -> 0 even with eps = 0
    assert adv[:2].tolist() == pytest.approx([-1.0, 1.0])
    assert adv[4:].tolist() == pytest.approx([-1.0, 1.0])
    assert adv[2:4].tolist() == [0.0, 0.0]
    assert m["zero_std_fraction"] == pytest.approx(1 / 3)
    adv_eps, _ = group_advantages(rewards, groups, eps=1e-4, clip=None)
    assert adv_eps[2:4].tolist() == [0.0, 0.0]
    assert adv_eps[0].item() == pytest.approx(-1 / (1 + 1e-4), rel=1e-6)


def test_global_std_and_clip():
    rewards = torch.tensor([0.0, 2.0, 10.0, 10.0])
    groups = torch.tensor([0, 0, 1, 1])
    # centred: -1, 1, 0, 0; global (population) std over all = sqrt(2/4)
    adv, _ = group_advantages(rewards, groups, eps=0.0, global_std=True, clip=None)
    assert adv.tolist() == pytest.approx([-math.sqrt(2), math.sqrt(2), 0, 0], rel=1e-6)
    clipped, _ = group_advantages(rewards, groups, eps=0.0, global_std=True, clip=1.0)
    assert clipped.tolist() == pytest.approx([-1.0, 1.0, 0.0, 0.0])


def test_invalid_rewards_are_left_out():
    rewards = torch.tensor([1.0, float("nan"), 3.0, 5.0])
    adv, _ = group_advantages(rewards, torch.zeros(4, dtype=torch.long), eps=0.0, clip=None)
    # valid: 1, 3, 5 -> mean 3, std sqrt(8/3)
    s = math.sqrt(8 / 3)
    assert adv.tolist() == pytest.approx([-2 / s, 0.0, 0.0, 2 / s], rel=1e-6)


def test_best_of_n_and_combine():
    adv = torch.tensor([0.5, -1.0, 2.0, 0.1, 3.0, -3.0, 0.0, 1.0])
    mask = best_of_n_mask(adv, torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), keep=2)
    assert mask.tolist() == [False, True, True, False, True, True, False, False]
    out = combine_advantages({"a": torch.tensor([1.0, -1.0]), "b": torch.tensor([2.0, 0.0])}, {"a": 0.5, "b": 2.0})
    assert out.tolist() == [4.5, -0.5]


def test_grpo_loss_branches_and_kl_by_hand():
    eps = 0.2
    # ratio 1.5 (log 1.5) with A=+1: clipped branch wins -> -A * 1.2 = -1.2
    # ratio 0.5 with A=+1: unclipped -0.5 > clipped -0.8 -> -0.5
    # ratio 1.5 with A=-2: unclipped 3.0 > clipped 2.4 -> 3.0
    lp = torch.log(torch.tensor([1.5, 0.5, 1.5]))
    old = torch.zeros(3)
    adv = torch.tensor([1.0, 1.0, -2.0])
    loss, m = grpo_loss(lp, old, adv, eps)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 3.0) / 3, rel=1e-6)
    assert m["clip_fraction"] == pytest.approx(1.0)
    assert (m["ratio_min"], m["ratio_max"]) == pytest.approx((0.5, 1.5)) and m["ratio_mean"] == pytest.approx(3.5 / 3)
    # KL: mean_dims (mu - mu_ref)^2 / (2 std^2): sample 0 diff 0.1 everywhere, std 0.5 -> 0.01/0.5 = 0.02
    mean = torch.zeros(3, 2, 2)
    mean[0] += 0.1
    loss_kl, m_kl = grpo_loss(lp, old, adv, eps, mean=mean, ref_mean=torch.zeros(3, 2, 2),
                              std=torch.tensor([0.5, 0.5, 0.5]), kl_beta=0.5)
    assert m_kl["kl"] == pytest.approx(0.02 / 3, rel=1e-5)
    assert loss_kl.item() == pytest.approx(loss.item() + 0.5 * 0.02 / 3, rel=1e-5)
    # mask drops samples from the mean
    masked, _ = grpo_loss(lp, old, adv, eps, mask=torch.tensor([True, False, False]))
    assert masked.item() == pytest.approx(-1.2)


def test_grpo_loss_gradient_sign():
    lp = torch.zeros(2, requires_grad=True)
    loss, _ = grpo_loss(lp, torch.zeros(2), torch.tensor([1.0, -1.0]), 0.2)
    loss.backward()
    assert lp.grad.tolist() == pytest.approx([-0.5, 0.5])  # raise the good sample, lower the bad


def test_grpo_guard_ratio_by_hand():
    from visalign.trainers.losses import guard_log_ratio

    # mu - mu_old = 0.2 everywhere, std 0.5: b = 0.04 / 0.5 = 0.08; lp - lp_old = -0.05
    # log rho = (-0.05 + 0.08) * 0.5 = 0.015
    mean, old_mean = torch.full((1, 3), 0.2), torch.zeros(1, 3)
    lr = guard_log_ratio(torch.tensor([-0.05]), torch.tensor([0.0]), mean, old_mean, torch.tensor([0.5]))
    assert lr.item() == pytest.approx(0.015, abs=1e-7)
    # on-policy: identical means and log-probs give ratio exactly 1
    on = guard_log_ratio(torch.tensor([-1.3]), torch.tensor([-1.3]), old_mean, old_mean, torch.tensor([0.5]))
    assert on.item() == 0.0
    # step weight 1/|dt| multiplies the policy term: A=1, ratio 1, dt = 0.25 -> loss -4
    loss, _ = grpo_loss(torch.zeros(1), torch.zeros(1), torch.ones(1), 0.2, log_ratio=torch.zeros(1),
                        step_weight=torch.tensor([4.0]))
    assert loss.item() == pytest.approx(-4.0)


def test_step_scores_keep_trained_sub_and_heldout_apart():
    """Trained rewards feed the advantages; sub-scores and held-out rewards are logged under their own names, also
    for reward names that hold a '/' (frames/...)."""
    from visalign.trainers.common import Scores

    nan = float("nan")
    s = Scores(trained={"frames/pickscore": torch.tensor([1.0, 3.0]), "a": torch.tensor([0.0, nan])},
               sub={"a/passed": torch.tensor([1.0, 0.0]), "frames/hps/x": torch.tensor([2.0, 2.0])},
               heldout={"frames/hps": torch.tensor([4.0, 6.0])})
    m = s.metrics()
    assert m["rewards/frames/pickscore/mean"] == 2.0 and m["rewards/a/mean"] == 0.0  # NaN dropped
    assert m["rewards/a/passed/mean"] == 0.5 and m["heldout/frames/hps/x/mean"] == 2.0
    assert m["heldout/frames/hps/mean"] == 5.0 and "rewards/frames/hps/mean" not in m
    both = Scores.cat([s, s.map(lambda v: v + 1)])
    assert both.trained["frames/pickscore"].tolist() == [1.0, 3.0, 2.0, 4.0]
    assert both.heldout["frames/hps"].tolist() == [4.0, 6.0, 5.0, 7.0]
