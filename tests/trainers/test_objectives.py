"""The faster objectives (AWM, DGPO, direct reward backprop): their losses against hand values, their noise
levels, that each raises an easy reward (against the same run with the advantages zeroed, or, for reward
backprop, against the base) on tiny-sd3 and on the world, and bit-identical resume."""

import math

import pytest
import torch
from safetensors.torch import load_file

from visalign.trainers import trainer_class
from visalign.trainers.draft import direct_align_x0
from visalign.trainers.forward import sample_sigmas
from visalign.trainers.losses import awm_loss, dgpo_loss, reward_backprop_loss

TOY = "tests.helpers.toy_rewards"
SMALL = ("sampling.sde=ode", "model.lora_rank=4", "model.height=32", "model.width=32", "train.train_batch_size=4")
NOISE_LEVELS = {"awm": ("train.timesteps_per_sample=2",), "dgpo": ("train.timesteps_per_sample=2",), "draft": ()}
RECIPES = ["awm", "dgpo", "draft"]


def test_awm_loss_value_and_gradient_by_hand():
    torch.manual_seed(0)
    v = torch.randn(2, 3, 2, 2, requires_grad=True)
    target, v_ref, v_old = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2)
    sigma, adv, p = torch.tensor([0.8, 0.3]), torch.tensor([0.6, -0.2]), 0.25
    loss, m = awm_loss(v, target, sigma, adv, power=p, v_ref=v_ref, kl_beta=0.1, v_old=v_old, old_beta=2.0)
    d = 12  # dimensions per sample
    err = ((v - target) ** 2).detach().double().flatten(1).mean(1)
    kl = ((v - v_ref) ** 2).detach().double().flatten(1).mean(1)
    old = ((v - v_old) ** 2).detach().double().flatten(1).mean(1)
    # on policy the ratio is 1: the value is -mean(A) plus the two penalties
    assert loss.item() == pytest.approx((-adv.double() + 0.1 * kl + 2.0 * old).mean().item(), rel=1e-6)
    assert m["mse"] == pytest.approx(err.mean().item(), rel=1e-6)
    loss.backward()
    # d/dv of -A exp(lp - sg lp) = -A dlp/dv,  dlp/dl = -sigma (l + 1e-10)^(p - 1),  dl/dv = 2 (v - t) / d
    scale = (adv.double() * sigma.double() * (err + 1e-10) ** (p - 1)).view(2, 1, 1, 1)
    expected = (scale * 2 * (v - target).detach().double() / d
                + 0.1 * 2 * (v - v_ref).detach().double() / d + 2.0 * 2 * (v - v_old).detach().double() / d) / 2
    torch.testing.assert_close(v.grad.double(), expected, rtol=1e-5, atol=1e-8)


def test_awm_loss_is_affine_in_the_advantage_so_marble_blending_applies():
    # sum_k alpha_k L(A_k) = S L(sum_k alpha_k / S A_k), S = sum_k alpha_k: what the amortised balancing needs.
    from visalign.trainers.engine import blend_reward_weights

    torch.manual_seed(1)
    v = torch.randn(3, 4, requires_grad=True)
    target, v_ref = torch.randn(3, 4), torch.randn(3, 4)
    sigma, adv_k, alpha = torch.tensor([0.9, 0.5, 0.2]), torch.randn(2, 3), torch.tensor([0.7, 0.2])

    def loss(a):
        return awm_loss(v, target, sigma, a, v_ref=v_ref, kl_beta=0.3)[0]

    explicit = sum(alpha[k] * loss(adv_k[k]) for k in range(2))
    blended, total = blend_reward_weights(alpha, adv_k)
    amortised = total * loss(blended)
    torch.testing.assert_close(amortised, explicit)
    (g_exp,) = torch.autograd.grad(explicit, v)
    (g_am,) = torch.autograd.grad(amortised, v)
    torch.testing.assert_close(g_am, g_exp)


def test_power_one_is_the_sigma_weighted_flow_matching_gradient():
    v = torch.zeros(1, 4, requires_grad=True)
    target = torch.tensor([[1.0, -1.0, 2.0, 0.0]])
    loss, _ = awm_loss(v, target, torch.tensor([0.5]), torch.tensor([1.0]), power=1.0)
    loss.backward()
    # A sigma d/dv ||v - t||² = 1 * 0.5 * 2 (v - t) / 4
    torch.testing.assert_close(v.grad, 0.5 * 2 * (v - target).detach() / 4)


def test_stratified_levels_take_one_grid_level_per_bin():
    grid = torch.linspace(1, 0, 11)  # 10 steps; indices 1..9 usable, bins [1, 5), [5, 9)
    sigmas = sample_sigmas("stratified", 200, 2, grid, torch.Generator().manual_seed(0))
    first, second = set(sigmas[:, 0].tolist()), set(sigmas[:, 1].tolist())
    assert first <= set(grid[1:5].tolist()) and second <= set(grid[5:9].tolist())
    assert len(first) == 4 and len(second) == 4  # every level of a bin is drawn
    with pytest.raises(ValueError, match="timesteps_per_sample=9 needs at least 9 grid levels"):
        sample_sigmas("stratified", 1, 9, grid, torch.Generator())


def test_dgpo_loss_is_the_group_dpo_gradient():
    torch.manual_seed(0)
    err = torch.rand(6, dtype=torch.float64, requires_grad=True)
    err_ref = torch.rand(6, dtype=torch.float64)
    adv = torch.tensor([1.0, -0.5, -0.5, 0.8, 0.2, -1.0], dtype=torch.float64)
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    beta, g = 3.0, 3
    loss, m = dgpo_loss(err, err_ref, adv, groups, beta, g)
    s = torch.stack([(adv[groups == k] * beta * (err[groups == k] - err_ref[groups == k])).sum() / g for k in (0, 1)])
    weight = torch.sigmoid(s)[groups].detach()
    assert loss.item() == pytest.approx((weight * adv * err).mean().item())
    (grad,) = torch.autograd.grad(loss, err)
    # the DPO loss of the group scores: sum_g -log sigmoid(R(G+) - R(G-)) = sum_g -log sigmoid(-S_g)
    dpo = -torch.nn.functional.logsigmoid(-s).sum()
    (dpo_grad,) = torch.autograd.grad(dpo, err)
    torch.testing.assert_close(grad * beta * len(err) / g, dpo_grad)
    assert m["group_weight_mean"] == pytest.approx(weight.mean().item())


def test_dgpo_clip_stops_the_gradient_of_samples_past_the_range():
    err = torch.tensor([0.5, 0.5, 0.5, 0.5], requires_grad=True)
    err_old = torch.tensor([0.6, 0.5, 0.4, 0.5])  # ratios e^0.1, 1, e^-0.1, 1
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, m = dgpo_loss(err, torch.zeros(4), adv, torch.tensor([0, 0, 0, 0]), 1.0, 4, err_old, clip_range=0.05)
    (grad,) = torch.autograd.grad(loss, err)
    # sample 0 (A > 0, ratio > 1.05) and sample 2 (A < 0, ratio < 0.95) are clipped; the others keep their gradient
    assert grad[0] == 0 and grad[2] == 0 and grad[1] > 0 and grad[3] < 0
    assert m["clip_fraction"] == 0.5  # the ratio statistics the step logs as drift/*
    assert m["ratio_min"] == pytest.approx(math.exp(-0.1)) and m["ratio_max"] == pytest.approx(math.exp(0.1))
    assert m["ratio_mean"] == pytest.approx((math.exp(0.1) + math.exp(-0.1) + 2) / 4)


def test_reward_backprop_loss_by_hand():
    r = torch.tensor([0.5, 2.5, 1.0], requires_grad=True)
    loss, _ = reward_backprop_loss(r)
    assert loss.item() == pytest.approx(-4.0 / 3)
    loss, m = reward_backprop_loss(r, margin=2.0)  # ReFL: ReLU(2 - r); the sample past the margin is left alone
    assert loss.item() == pytest.approx((1.5 + 0.0 + 1.0) / 3)
    (grad,) = torch.autograd.grad(loss, r)
    torch.testing.assert_close(grad, torch.tensor([-1 / 3, 0.0, -1 / 3]))


def test_direct_align_recovers_x0_exactly_from_the_true_velocity():
    torch.manual_seed(0)
    x0, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    hi, lo = 0.9, 0.88
    x_hi = hi * noise + (1 - hi) * x0
    v = (noise - x0).requires_grad_(True)
    out = direct_align_x0(x_hi, v, noise, hi, lo)
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=1e-5)
    (grad,) = torch.autograd.grad(out.sum(), v)  # d x0 / d v = -(hi - lo) / (1 - lo)
    torch.testing.assert_close(grad, torch.full_like(v, -(hi - lo) / (1 - lo)))


# tiny-sd3 at random weights takes a large step; the shipped world base model a LoRA at a moderate rate.
SETTINGS = {"tiny-sd3": ("train.lr=3e-2", "model.finetune=full"),
            "world": ("train.lr=3e-3", "model.finetune=lora")}


def _eval_brightness(tiny_run, trainer: str, model: str, reward: str, out, *extra):
    cfg = tiny_run(*SMALL, *NOISE_LEVELS[trainer], *SETTINGS[model], *extra, "train.max_steps=4",
                   "sampling.guidance=1.0", "run.eval_num_prompts=8", "run.eval_steps=4", f"rewards={{{reward}: 1.0}}",
                   "eval_rewards=[brightness]", trainer=trainer, model=model, out=out)
    t = trainer_class(trainer)(cfg)
    before = t.evaluate(0)["eval/brightness/mean"]
    t.train()
    return before, t.evaluate(4)["eval/brightness/mean"]


@pytest.mark.parametrize("model", list(SETTINGS))
@pytest.mark.parametrize("trainer", ["awm", "dgpo"])
def test_raises_brightness_against_zeroed_advantages(tiny_run, trainer, model, tmp_path):
    base, trained = _eval_brightness(tiny_run, trainer, model, "brightness", tmp_path / "a")
    base_c, control = _eval_brightness(tiny_run, trainer, model, f"{TOY}.Constant", tmp_path / "b")  # all A = 0
    assert base == base_c
    assert trained > control + 0.03, (base, trained, control)


@pytest.mark.parametrize("model", list(SETTINGS))
@pytest.mark.parametrize("mode", ["draft", "refl", "direct_align"])
def test_reward_backprop_raises_brightness(tiny_run, mode, model, tmp_path):
    extra = [f"train.mode={mode}", "train.truncation_steps=2", "train.refl_fraction=0.5"]
    if model == "world":  # the shipped model needs far smaller steps than random weights
        extra.append("train.lr=1e-3")
    base, trained = _eval_brightness(tiny_run, "draft", model, "brightness", tmp_path, *extra)
    assert trained > base + 0.03, (base, trained)


@pytest.mark.parametrize("trainer", RECIPES)
def test_resumes_bit_identically(tiny_run, trainer, tmp_path):
    extra = [*SMALL, *NOISE_LEVELS[trainer], "train.max_steps=3", "train.kl_beta=0.1",
             f"rewards={{{TOY}.MeanBrightness: 1.0}}"]
    if trainer != "draft":
        extra.append("train.old_decay_rate=0.2")
    cls = trainer_class(trainer)
    cls(tiny_run(*extra, trainer=trainer, out=tmp_path / "a")).train()
    cls(tiny_run(*extra, trainer=trainer, out=tmp_path / "b")).train(stop_after=1)
    cls(tiny_run(*extra, trainer=trainer, out=tmp_path / "b")).train()
    a, b = (load_file(str(tmp_path / r / "checkpoints" / "checkpoint-3" / "weights.safetensors")) for r in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("extra", "match"), [
    (["train.train_batch_size=3"], "must be a multiple of group_size=4"),
    (["train.train_batch_size=4", "train.group_noise=false"], "group_noise must stay true"),
    (["train.train_batch_size=4", "train.balance.method=mgda", "train.balance.amortized=true",
      f"rewards={{{TOY}.MeanBrightness: 1.0, {TOY}.RedChannel: 1.0}}"], "DGPO's group weight"),
])
def test_dgpo_config_errors(tiny_run, extra, match):
    with pytest.raises(ValueError, match=match):
        tiny_run(*extra, trainer="dgpo")
