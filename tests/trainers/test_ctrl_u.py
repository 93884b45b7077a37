"""Ctrl-U's uncertainty-aware reward loss: the formula and its gradient by hand on small tensors, its config checks,
and a one-step direct-align run on the world whose loss is the formula applied to the two generations' rewards,
against the same run without it (whose reward loss is the first generation's alone)."""

import math

import pytest
import torch

from visalign.trainers import trainer_class
from visalign.trainers.losses import ctrl_u_loss, reward_backprop_loss


def test_ctrl_u_loss_and_gradient_by_hand():
    r1 = torch.tensor([0.2, 0.9, 0.5, 1.3], requires_grad=True)
    r2 = torch.tensor([0.4, 0.9, 0.1, 1.0], requires_grad=True)
    lam, m = 0.1, 1.0
    loss, metrics = ctrl_u_loss(r1, r2, margin=m, weight=lam)
    u = [0.2, 0.0, 0.4, 0.3]
    lc = [0.8, 0.1, 0.5, 0.0]  # ReLU(m - r1)
    expect = sum(c * math.exp(-v) for c, v in zip(lc, u, strict=True)) / 4 + lam * sum(u) / 4
    assert loss.item() == pytest.approx(expect)
    assert metrics["uncertainty"] == pytest.approx(0.225) and metrics["reward_loss"] == pytest.approx(0.35)
    g1, g2 = torch.autograd.grad(loss, (r1, r2))
    # d/dr1 [ReLU(m - r1) e^-|r1 - r2| + lam |r1 - r2|] / B = [-e^-U - s ReLU(m - r1) e^-U + lam s] / B,
    # s = sign(r1 - r2); r2 gets the U terms with the opposite sign. Sample 1 has U = 0, where |.|' is taken as 0.
    sign = [-1.0, 0.0, 1.0, 1.0]
    hand1 = [(-(r < m) * math.exp(-v) - s * c * math.exp(-v) + lam * s) / 4
             for c, v, s, r in zip(lc, u, sign, [0.2, 0.9, 0.5, 1.3], strict=True)]
    hand2 = [(s * c * math.exp(-v) - lam * s) / 4 for c, v, s in zip(lc, u, sign, strict=True)]
    torch.testing.assert_close(g1, torch.tensor(hand1))
    torch.testing.assert_close(g2, torch.tensor(hand2))
    # agreeing generations (U = 0) give the plain margin loss plus nothing
    same, _ = ctrl_u_loss(r1, r1.detach(), margin=m, weight=lam)
    assert same.item() == pytest.approx(reward_backprop_loss(r1, margin=m)[0].item())


RUN = ("train.mode=direct_align", "train.reward_margin=1.0", "train.align_sigma=[0.2,0.4]", "train.align_step=0.05",
       "sampling.sde=ode", "sampling.guidance=1.0", "train.prompts_per_step=1", "train.group_size=3",
       "sampling.batch_size=3", "train.train_batch_size=3", "train.max_steps=1", "sampling.steps=3",
       "rewards={world-soft: 1.0}")


@pytest.mark.parametrize(("extra", "match"), [
    (["train.ctrl_u_weight=0.1", "train.mode=refl"], "set mode=direct_align and reward_margin"),
    (["train.ctrl_u_weight=0.1", "train.reward_margin=null"], "set mode=direct_align and reward_margin"),
    (["train.ctrl_u_weight=0.1", "train.ctrl_u_offset=0.7"], "must stay below 1"),
    (["train.ctrl_u_weight=-0.1"], "ctrl_u_weight"),
])
def test_ctrl_u_config_errors(tiny_run, extra, match):
    with pytest.raises(ValueError, match=match):
        tiny_run(*RUN, *extra, trainer="draft", model="world")


def _run(tiny_run, out, *extra):
    """One draft step on the world; the totals every reward call returned, and the step's metrics."""
    trainer = trainer_class("draft")(tiny_run(*RUN, *extra, trainer="draft", model="world", out=out))
    totals, reward_total = [], trainer.reward_total

    def recorded(images, items):
        total = reward_total(images, items)
        totals.append(total.detach().clone())
        return total

    trainer.reward_total = recorded
    (row,) = trainer.train()
    return totals, row


def test_a_draft_step_with_ctrl_u_takes_the_formulas_loss(tiny_run, tmp_path):
    lam = 0.5
    (both,), row = _run(tiny_run, tmp_path / "u", f"train.ctrl_u_weight={lam}", "train.ctrl_u_offset=0.05")
    (plain,), base = _run(tiny_run, tmp_path / "plain")
    assert both.shape == (6,)  # three samples, each generated twice (sigma_hi and sigma_hi + 0.05)
    r1, r2 = both.chunk(2)
    torch.testing.assert_close(r1, plain, atol=1e-5, rtol=1e-5)  # the first generation is the plain run's
    u = (r1 - r2).abs()
    assert u.min() > 0
    expect = (torch.relu(1 - r1) * torch.exp(-u)).mean() + lam * u.mean()
    assert row["train/ctrl_u_loss"] == pytest.approx(expect.item(), rel=1e-5)
    assert row["train/uncertainty"] == pytest.approx(u.mean().item(), rel=1e-5)
    assert row["train/reward_loss"] == pytest.approx(base["train/reward_loss"], rel=1e-5)
    assert base["train/reward_loss"] == pytest.approx(torch.relu(1 - plain).mean().item(), rel=1e-5)
    assert "train/ctrl_u_loss" not in base
