"""Sampler steps against hand-computed values, and the trajectory contract on a tiny SD3."""

import math

import pytest
import torch

from visalign.sampling import SDEOptions, sample, trajectory_log_prob
from visalign.sampling.steps import (
    cps_log_prob,
    cps_step,
    dance_step,
    flow_grpo_step,
    gaussian_log_prob,
    sde_mean_std,
)

X, V = torch.tensor([[1.0]]), torch.tensor([[0.5]])


def test_flow_grpo_step_by_hand():
    # x=1, v=0.5, sigma=0.6, sigma'=0.4, a=0.7: s^2 = 0.49 * 0.6/0.4 = 0.735, dt = -0.2
    # mean = 1 * (1 - 0.735*0.2/1.2) + 0.5 * (1 + 0.735*0.4/1.2) * (-0.2) = 0.8775 - 0.1245
    mean, std = flow_grpo_step(X, V, 0.6, 0.4, 0.7, sigma_guard=0.9)
    assert mean.item() == pytest.approx(0.753, abs=1e-6)
    assert std.item() == pytest.approx(math.sqrt(0.735 * 0.2), abs=1e-6)


def test_flow_grpo_sigma_one_guard():
    # At sigma = 1 the guard replaces 1 - sigma by 1 - sigmas[1] = 0.2: s^2 = 0.49 / 0.2 = 2.45;
    # mean = x (1 - 2.45*0.2/2) + v * (1 + 0) * (-0.2) = 0.755 - 0.1; std = sqrt(2.45 * 0.2) = 0.7
    mean, std = flow_grpo_step(X, V, 1.0, 0.8, 0.7, sigma_guard=0.8)
    assert mean.item() == pytest.approx(0.655, abs=1e-6)
    assert std.item() == pytest.approx(0.7, abs=1e-6)


def test_cps_step_by_hand():
    # std = 0.4 sin(0.35 pi); x0 = 1 - 0.6*0.5 = 0.7; x1 = 1 + 0.4*0.5 = 1.2;
    # mean = 0.6 * 0.7 + sqrt(0.16 - std^2) * 1.2 = 0.42 + 0.4 cos(0.35 pi) * 1.2
    mean, std = cps_step(X, V, 0.6, 0.4, 0.7)
    assert float(std) == pytest.approx(0.4 * math.sin(0.35 * math.pi), abs=1e-6)
    assert mean.item() == pytest.approx(0.42 + 0.4 * math.cos(0.35 * math.pi) * 1.2, abs=1e-6)


def test_dance_step_by_hand():
    # eta=0.3: x0 = 0.7; score = -(1 - 0.4*0.7)/0.36 = -2; mean = 1 - 0.2 (0.5 - 0.5*0.09*(-2)) = 0.882
    mean, std = dance_step(X, V, 0.6, 0.4, 0.3)
    assert mean.item() == pytest.approx(0.882, abs=1e-6)
    assert float(std) == pytest.approx(0.3 * math.sqrt(0.2), abs=1e-6)


def test_gaussian_log_prob_by_hand():
    mean = torch.tensor([[0.2, -0.1]])
    std = torch.tensor(0.5)
    x_next = mean + std * torch.tensor([[0.5, -1.0]])
    expected = -(0.125 + 0.5) / 2 - math.log(0.5) - 0.5 * math.log(2 * math.pi)
    assert gaussian_log_prob(x_next, mean, std).item() == pytest.approx(expected, abs=1e-6)
    assert cps_log_prob(x_next, mean).item() == pytest.approx(-(0.0625 + 0.25) / 2, abs=1e-7)


@pytest.mark.parametrize("kind", ["flow_grpo", "cps", "dance"])
def test_zero_noise_is_the_ode_step(kind):
    x, v = torch.randn(3, 4), torch.randn(3, 4)
    mean, std = sde_mean_std(kind, x, v, torch.tensor([0.9, 0.5, 0.2]), 0.1, 0.0, sigma_guard=0.95)
    torch.testing.assert_close(mean, x + (0.1 - torch.tensor([0.9, 0.5, 0.2]))[:, None] * v)
    assert float(std.abs().max()) == 0.0
    # and a tiny noise level is continuous with it (no hidden discontinuity in the formula)
    mean_eps, _ = sde_mean_std(kind, x, v, torch.tensor([0.9, 0.5, 0.2]), 0.1, 1e-4, sigma_guard=0.95)
    torch.testing.assert_close(mean_eps, mean, atol=1e-5, rtol=0)


def test_unknown_sde_kind():
    with pytest.raises(ValueError, match="allowed: ode, flow_grpo, cps, dance"):
        SDEOptions("ddim")


REQ = {"height": 32, "width": 32, "num_steps": 4, "guidance_scale": 4.5}


@pytest.mark.parametrize("kind", ["ode", "flow_grpo", "cps", "dance"])
def test_zero_noise_trajectory_equals_ode(tiny_sd3, kind):
    cond = tiny_sd3.encode_prompts(["a red circle", "a blue square"])
    ode = sample(tiny_sd3, cond, seeds=[1, 2], **REQ)
    sde = sample(tiny_sd3, cond, seeds=[1, 2], sde=SDEOptions(kind, 0.0), **REQ)
    torch.testing.assert_close(sde.latents, ode.latents, rtol=0, atol=0)
    assert not ode.stochastic.any() and float(ode.stds.abs().max()) == 0.0


@pytest.mark.parametrize("kind, level", [("flow_grpo", 0.7), ("cps", 0.8), ("dance", 0.3)])
def test_recomputed_log_prob_matches_sampling(tiny_sd3, kind, level):
    prompts = ["a red circle", "a blue square", "two green triangles", "a yellow circle on the left"]
    cond = tiny_sd3.encode_prompts(prompts)
    traj = sample(tiny_sd3, cond, seeds=[0, 1, 2, 3], sde=SDEOptions(kind, level), **REQ)
    assert traj.stochastic.any()
    for step in torch.nonzero(traj.stochastic).flatten().tolist():
        for rows in ([0], [1, 2, 3], [3, 0]):  # mini-batches of other sizes and orders
            with torch.no_grad():
                out = trajectory_log_prob(tiny_sd3, traj, step, cond.index(rows), REQ["guidance_scale"],
                                          index=torch.tensor(rows))
            assert (out.log_prob - traj.log_probs[rows, step]).abs().max() <= 1e-6
            torch.testing.assert_close(out.mean, traj.means[rows, step], atol=1e-5, rtol=0)
    # Per-sample step indices in one batch (DanceGRPO trains a random step subset per sample).
    steps = torch.nonzero(traj.stochastic).flatten()[:2].repeat(2)
    with torch.no_grad():
        mixed = trajectory_log_prob(tiny_sd3, traj, steps, cond, REQ["guidance_scale"])
    assert (mixed.log_prob - traj.log_probs[torch.arange(4), steps]).abs().max() <= 1e-6


def test_log_prob_has_gradient_through_mean(tiny_sd3):
    cond = tiny_sd3.encode_prompts(["a red circle"])
    traj = sample(tiny_sd3, cond, seeds=[0], sde=SDEOptions("flow_grpo", 0.7), **REQ)
    tiny_sd3.add_lora(rank=2)
    out = trajectory_log_prob(tiny_sd3, traj, 1, cond, REQ["guidance_scale"])
    out.log_prob.sum().backward()
    grads = [p.grad for p in tiny_sd3.trainable_parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_sde_window_injects_noise_only_inside(tiny_sd3):
    cond = tiny_sd3.encode_prompts(["a red circle"])
    req = {**REQ, "num_steps": 6}
    ode = sample(tiny_sd3, cond, seeds=[5], **req)
    win = sample(tiny_sd3, cond, seeds=[5], sde=SDEOptions("flow_grpo", 0.7, window=(2, 4)), **req)
    assert win.stochastic.tolist() == [False, False, True, True, False, False]
    assert (win.stds[:, [0, 1, 4, 5]] == 0).all() and (win.stds[:, 2:4] > 0).all()
    assert (win.log_probs[:, [0, 1, 4, 5]] == 0).all()
    # before the window the path is the ODE's; every ODE step lands exactly on its mean
    torch.testing.assert_close(win.latents[:, :3], ode.latents[:, :3], rtol=0, atol=0)
    for i in (0, 1, 4, 5):
        torch.testing.assert_close(win.latents[:, i + 1], win.means[:, i], rtol=0, atol=0)
    for i in (2, 3):
        assert not torch.allclose(win.latents[:, i + 1], win.means[:, i])
    assert not torch.allclose(win.final, ode.final)


def test_shared_noise_groups(tiny_sd3):
    cond = tiny_sd3.encode_prompts(["a red circle"] * 2 + ["a blue square"] * 2)
    traj = sample(tiny_sd3, cond, seeds=[0, 1, 2, 3], noise_groups=[0, 0, 1, 1],
                  sde=SDEOptions("flow_grpo", 0.7), **REQ)
    x_t = traj.latents[:, 0]
    assert torch.equal(x_t[0], x_t[1]) and torch.equal(x_t[2], x_t[3])
    assert not torch.equal(x_t[0], x_t[2])
    assert not torch.equal(traj.final[0], traj.final[1])  # SDE noise stays per sample


def test_seeds_reproduce_bit_for_bit(tiny_sd3):
    cond = tiny_sd3.encode_prompts(["a red circle", "a blue square"])
    sde = SDEOptions("flow_grpo", 0.7)
    a = sample(tiny_sd3, cond, seeds=[7, 8], sde=sde, **REQ)
    b = sample(tiny_sd3, cond, seeds=[7, 8], sde=sde, **REQ)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.log_probs, b.log_probs)
    # A seed's noise does not depend on the rest of the batch.
    alone = sample(tiny_sd3, cond.index([1]), seeds=[8], sde=sde, **REQ)
    assert torch.equal(alone.latents[0, 0], a.latents[1, 0])
    torch.testing.assert_close(alone.final[0], a.final[1], atol=1e-5, rtol=0)
    c = sample(tiny_sd3, cond, seeds=[7, 9], sde=sde, **REQ)
    assert torch.equal(c.latents[0], a.latents[0]) and not torch.equal(c.latents[1], a.latents[1])


def test_trajectory_shapes_and_x0(tiny_sd3):
    cond = tiny_sd3.encode_prompts(["a red circle"])
    traj = sample(tiny_sd3, cond, seeds=[0], sde=SDEOptions("dance", 0.3), **REQ)
    n = REQ["num_steps"]
    assert traj.latents.shape == (1, n + 1, 4, 16, 16) and traj.x0_preds.shape == (1, n, 4, 16, 16)
    assert traj.sigmas.shape == (n + 1,) and traj.sigmas[0] == 1 and traj.sigmas[-1] == 0
    # x0 = x - sigma v, and the ODE mean of each step is x + dt v: both from the same v
    i = 1
    v = (traj.latents[:, i] - traj.x0_preds[:, i]) / traj.sigmas[i]
    cond_v = tiny_sd3.predict_velocity(traj.latents[:, i], traj.sigmas[i], cond, REQ["guidance_scale"])
    torch.testing.assert_close(v, cond_v, atol=1e-4, rtol=1e-4)


# ---- the coarse-subspace SDE (SDEOptions.noise_block) ----------------------------------------------------


def test_block_projection_is_orthogonal_and_keeps_standard_normal_coords():
    from visalign.sampling.steps import block_coords, block_project

    x, y = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.randn(2, 3, 8, 8, dtype=torch.float64)
    px = block_project(x, 4)
    torch.testing.assert_close(block_project(px, 4), px)                      # idempotent
    torch.testing.assert_close((px * y).sum(), (x * block_project(y, 4)).sum())  # self-adjoint
    torch.testing.assert_close(px[0, 0, :4, :4], x[0, 0, :4, :4].mean().expand(4, 4))  # tile means
    # coordinates in the orthonormal tile basis: ||P x|| = ||coords||, and projected N(0, I) is N(0, I) there
    torch.testing.assert_close(px.pow(2).sum(), block_coords(x, 4).pow(2).sum())
    z = block_coords(torch.randn(20000, 1, 4, 4), 2)
    assert z.shape == (20000, 1, 2, 2)
    assert abs(z.var().item() - 1.0) < 0.03 and abs(z.mean().item()) < 0.02
    with pytest.raises(ValueError, match="must divide"):
        block_coords(torch.randn(1, 1, 6, 6), 4)


def test_block_log_prob_by_hand():
    # 1 channel, 2×2 latent, one 2×2 tile: coordinate z = 2 * mean(x' - mean) = 2 * 0.25 = 0.5
    mean = torch.zeros(1, 1, 2, 2)
    x_next = torch.full((1, 1, 2, 2), 0.25)
    std = torch.tensor(0.5)
    expected = -(0.5**2) / (2 * 0.25) - math.log(0.5) - 0.5 * math.log(2 * math.pi)
    assert gaussian_log_prob(x_next, mean, std, block=2).item() == pytest.approx(expected, abs=1e-6)
    assert cps_log_prob(x_next, mean, block=2).item() == pytest.approx(-0.25, abs=1e-7)
    # block 1 is the isotropic density
    assert gaussian_log_prob(x_next, mean, std, block=1).item() == pytest.approx(
        -(0.0625) / 0.5 - math.log(0.5) - 0.5 * math.log(2 * math.pi), abs=1e-6)


@pytest.mark.parametrize("kind, level", [("flow_grpo", 0.7), ("cps", 0.8)])
def test_block_sde_noise_and_correction_live_on_tiles(tiny_sd3, kind, level):
    from visalign.sampling.steps import block_project

    cond = tiny_sd3.encode_prompts(["a red circle", "a blue square"])
    req = dict(REQ, num_steps=3)
    traj = sample(tiny_sd3, cond, seeds=[0, 1], sde=SDEOptions(kind, level, noise_block=2), **req)
    for i in torch.nonzero(traj.stochastic).flatten().tolist():
        residual = traj.latents[:, i + 1] - traj.means[:, i]
        torch.testing.assert_close(block_project(residual, 2), residual, atol=1e-6, rtol=0)
        assert residual.abs().max() > 0
        # the mean differs from the ODE step only by a tile-constant correction
        with torch.no_grad():
            out = trajectory_log_prob(tiny_sd3, traj, i, cond, req["guidance_scale"])
        x, sig = traj.latents[:, i], traj.sigmas
        ode_mean = x + (sig[i + 1] - sig[i]) * out.velocity
        corr = traj.means[:, i] - ode_mean
        torch.testing.assert_close(block_project(corr, 2), corr, atol=1e-5, rtol=0)
        assert (out.log_prob - traj.log_probs[:, i]).abs().max() == 0  # on-policy ratio exactly 1
    with pytest.raises(ValueError, match="must divide"):
        sample(tiny_sd3, cond, seeds=[0, 1], sde=SDEOptions(kind, level, noise_block=3), **req)


def test_block_sde_keeps_the_marginals_of_a_gaussian_flow():
    # Data x0 ~ N(0, s0^2 I), x_sigma = (1 - sigma) x0 + sigma n: the exact velocity is linear in x, so the
    # ODE and every marginal-preserving SDE end at N(0, s0^2). The coarse SDE must too, per tile coordinate
    # and in the fine directions (where it follows the ODE).
    from visalign.sampling.steps import block_coords, block_project, sde_mean_std

    s0, n, steps = 0.5, 20000, 200
    torch.manual_seed(0)
    sigmas = torch.linspace(1, 0, steps + 1)
    x = torch.randn(n, 1, 2, 2)
    for i in range(steps):
        sig, nxt = sigmas[i], sigmas[i + 1]
        var = (1 - sig) ** 2 * s0**2 + sig**2
        x0_hat = (1 - sig) * s0**2 / var * x                     # E[x0 | x_sigma]
        v = (x - (1 - sig) * x0_hat) / sig - x0_hat                # E[noise - x0 | x_sigma]
        mean_sde, std = sde_mean_std("flow_grpo", x, v, sig, nxt, 0.7, sigma_guard=sigmas[1])
        mean_ode = x + (nxt - sig) * v
        mean = mean_ode + block_project(mean_sde - mean_ode, 2)
        x = mean + std * block_project(torch.randn_like(x), 2)
    coarse = block_coords(x, 2).flatten()
    fine = (x - block_project(x, 2)).flatten(1)[:, 0]
    assert abs(coarse.std().item() - s0) < 0.03
    assert abs(fine.std().item() - s0 * math.sqrt(3 / 4)) < 0.03   # one pixel's fine part: 3/4 of its variance
