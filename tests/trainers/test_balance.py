"""Multi-reward balancing: aggregators against analytic / hand-computed updates, diagnostics, the per-reward
gradient buffer, the advantage-space alternatives, and MARBLE's amortised NFT update equal to the explicit one."""

import math

import pytest
import torch

from visalign.trainers.balance import (
    Balancer,
    GradientBuffer,
    LagrangeThresholds,
    aggregator_weights,
    cmo_advantages,
    cmo_weights,
    diagnostics,
    hypervolume_weights,
    min_norm_weights,
    output_space_gram,
    pareto_mask,
)


def gram(*rows):
    J = torch.tensor(rows, dtype=torch.float64)
    return J, J @ J.T


# ---- aggregators ----------------------------------------------------------------------------------------------


def test_mgda_two_gradients_matches_the_closed_form():
    # min over a in [0,1] of ||a g1 + (1-a) g2||²: a = clip((g2 - g1)·g2 / ||g1 - g2||², 0, 1)
    J, G = gram([1.0, 0.0], [-0.5, 2.0])
    g1, g2 = J
    a = float(((g2 - g1) @ g2) / (g1 - g2).pow(2).sum())
    torch.testing.assert_close(min_norm_weights(G), torch.tensor([a, 1 - a], dtype=torch.float64), atol=1e-7, rtol=0)
    d = min_norm_weights(G) @ J
    assert abs(float(d @ g1) - float(d @ g2)) < 1e-6  # at an interior optimum the update is equally aligned


def test_mgda_single_gradient_is_the_answer():
    # g1 lies inside the hull's min-norm side: g1·g2 >= ||g1||² and g1·g3 >= ||g1||², so alpha = e1
    _, G = gram([1.0, 0.0, 0.0], [1.0, 3.0, 0.0], [2.0, -1.0, 1.0])
    torch.testing.assert_close(min_norm_weights(G), torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64),
                               atol=1e-7, rtol=0)


def test_mgda_three_gradients_min_norm_point_is_orthogonal_to_the_face():
    # Three gradients whose min-norm point is interior: the closest point of the triangle (1,0,1), (0,1,1),
    # (-1,-1,1) to the origin is (0, 0, 1) with alpha = (1/3, 1/3, 1/3).
    _, G = gram([1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [-1.0, -1.0, 1.0])
    torch.testing.assert_close(min_norm_weights(G), torch.full((3,), 1 / 3, dtype=torch.float64), atol=1e-7, rtol=0)
    # And a case with one zero weight: the min-norm point lies on the edge between g1 and g2.
    _, G = gram([1.0, 0.0], [0.0, 1.0], [3.0, 3.0])
    torch.testing.assert_close(min_norm_weights(G), torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64),
                               atol=1e-7, rtol=0)


def test_pcgrad_matches_the_hand_computed_projection():
    # g1 = (1, 0), g2 = (-1, 1) conflict (g1·g2 = -1): g1' = g1 + ½ g2 = (0.5, 0.5), g2' = g2 + g1 = (0, 1)
    J, G = gram([1.0, 0.0], [-1.0, 1.0])
    d = aggregator_weights("pcgrad", G) @ J
    torch.testing.assert_close(d, torch.tensor([0.5, 1.5], dtype=torch.float64))
    # No conflict: PCGrad is the plain sum.
    J, G = gram([1.0, 0.0], [1.0, 1.0])
    torch.testing.assert_close(aggregator_weights("pcgrad", G) @ J, torch.tensor([2.0, 1.0], dtype=torch.float64))


def test_cagrad_matches_the_hand_computed_update():
    # Orthogonal unit gradients: g0 = (½, ½), the worst-case direction is g0 itself by symmetry, so
    # d = g0 + c ||g0|| g0 / ||g0|| = (1 + c) g0.
    c = 0.5
    J, G = gram([1.0, 0.0], [0.0, 1.0])
    torch.testing.assert_close(aggregator_weights("cagrad", G, cagrad_c=c) @ J,
                               torch.tensor([0.75, 0.75], dtype=torch.float64), atol=1e-5, rtol=0)
    # c = 0 is the mean gradient.
    J, G = gram([2.0, 0.0], [-1.0, 1.0])
    torch.testing.assert_close(aggregator_weights("cagrad", G, cagrad_c=0.0) @ J, J.mean(0), atol=1e-5, rtol=0)


def test_upgrad_update_never_conflicts_with_any_gradient():
    # Pairwise conflicting gradients that still share a common ascent direction (0, 0, 1).
    J, G = gram([1.0, 0.0, 0.1], [-1.0, 0.2, 0.1], [0.3, -1.0, 0.1])
    assert (J @ J.sum(0) < 0).any()  # the plain sum conflicts with one of them
    d = aggregator_weights("upgrad", G) @ J
    assert (J @ d >= -1e-9).all() and d.norm() > 0.01


def test_unknown_aggregator_is_an_error():
    with pytest.raises(ValueError, match="allowed"):
        aggregator_weights("nash", torch.eye(2))
    with pytest.raises(ValueError, match="allowed"):
        Balancer("nope", {"a": 1.0, "b": 1.0})


# ---- balancer and diagnostics ----------------------------------------------------------------------------------


def test_diagnostics_from_the_gram_matrix_equal_direct_computation():
    J, G = gram([1.0, 0.0, 0.0], [-1.0, 1.0, 0.0], [0.0, 2.0, 1.0])
    alpha = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    d = alpha @ J
    out = diagnostics(G, alpha, ["a", "b", "c"])
    for i, name in enumerate("abc"):
        assert out[f"balance/grad_norm/{name}"] == pytest.approx(float(J[i].norm()))
        cos = float(J[i] @ d / (J[i].norm() * d.norm()))
        assert out[f"balance/cos_update/{name}"] == pytest.approx(cos)
    assert out["balance/cos/a|b"] == pytest.approx(-1 / math.sqrt(2))
    assert out["balance/worst_cos"] == pytest.approx(min(out[f"balance/cos_update/{n}"] for n in "abc"))
    assert out["balance/update_norm"] == pytest.approx(float(d.norm()))


def test_balancer_weights_normalisation_and_ema():
    J, G = gram([10.0, 0.0], [0.0, 1.0])
    # Weighted sum: the configured weights are the coefficients.
    torch.testing.assert_close(Balancer("sum", {"a": 2.0, "b": 0.5}).fresh_weights(G),
                               torch.tensor([2.0, 0.5], dtype=torch.float64))
    # MGDA without normalisation favours the small gradient; with it, both unit rows count equally.
    raw = Balancer("mgda", {"a": 1.0, "b": 1.0}).fresh_weights(G) @ J
    norm = Balancer("mgda", {"a": 1.0, "b": 1.0}, normalize=True).fresh_weights(G) @ J
    torch.testing.assert_close(raw, torch.tensor([10 / 101, 100 / 101], dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(norm / norm.norm(), torch.tensor([1.0, 1.0], dtype=torch.float64) / math.sqrt(2))
    # EMA: alpha <- 0.5 alpha + 0.5 fresh.
    b = Balancer("mgda", {"a": 1.0, "b": 1.0}, ema=0.5)
    first, _ = b.update(gram([1.0, 0.0], [0.0, 1.0])[1])  # (½, ½)
    second, _ = b.update(gram([1.0, 0.0], [1.0, 0.0])[1] + torch.diag(torch.tensor([0.0, 3.0], dtype=torch.float64)))
    fresh = Balancer("mgda", {"a": 1.0, "b": 1.0}).fresh_weights(
        gram([1.0, 0.0], [1.0, 0.0])[1] + torch.diag(torch.tensor([0.0, 3.0], dtype=torch.float64)))
    torch.testing.assert_close(second, 0.5 * first + 0.5 * fresh)
    state = b.state_dict()
    c = Balancer("mgda", {"a": 1.0, "b": 1.0}, ema=0.5)
    c.load_state_dict(state)
    assert torch.equal(c.alpha, b.alpha) and c.refreshes == 2


def test_normalised_weights_are_a_preference_among_unit_gradients():
    # Unit rows u1 = (1, 0), u2 = (-0.6, 0.8) (u1·u2 = -0.6), given at scales 5 and 0.5. UPGrad projects each onto
    # the dual cone: u1 -> u1 + 0.6 u2 = (0.64, 0.48), u2 -> u2 + 0.6 u1 = (0, 0.8). Preference (3, 1) / 4 gives
    # d = 0.75 (0.64, 0.48) + 0.25 (0, 0.8) = (0.48, 0.56); equal weights give the mean (0.32, 0.64).
    J, G = gram([5.0, 0.0], [-0.3, 0.4])
    d = Balancer("upgrad", {"a": 3.0, "b": 1.0}, normalize=True).fresh_weights(G) @ J
    # (torchjd's dual-cone QP solves to about 1e-4)
    torch.testing.assert_close(d, torch.tensor([0.48, 0.56], dtype=torch.float64), atol=2e-4, rtol=0)
    assert float((J @ d).min()) >= 0  # a preference keeps the update in the dual cone
    d = Balancer("upgrad", {"a": 2.0, "b": 2.0}, normalize=True).fresh_weights(G) @ J
    torch.testing.assert_close(d, torch.tensor([0.32, 0.64], dtype=torch.float64), atol=2e-4, rtol=0)
    # The weighted sum of unit gradients: 3 u1 + 1 u2.
    d = Balancer("sum", {"a": 3.0, "b": 1.0}, normalize=True).fresh_weights(G) @ J
    torch.testing.assert_close(d, torch.tensor([2.4, 0.8], dtype=torch.float64))
    # The min-norm point has no preference: unequal weights would be silently ignored, so they are refused.
    for method in ("mgda", "pcgrad", "cagrad"):
        with pytest.raises(ValueError, match="ignores reward weights"):
            Balancer(method, {"a": 3.0, "b": 1.0}, normalize=True)
    Balancer("mgda", {"a": 3.0, "b": 1.0})  # without normalisation the weights scale the rows: allowed
    with pytest.raises(ValueError, match="must be > 0"):
        Balancer("upgrad", {"a": 1.0, "b": 0.0}, normalize=True)


def test_safeguard_replaces_conflicting_smoothed_weights_by_the_fresh_min_norm_ones():
    b = Balancer("mgda", {"a": 1.0, "b": 1.0}, ema=0.9, safeguard=True)
    first, logs = b.update(gram([1.0, 0.0], [0.0, 1.0])[1])  # fresh (½, ½), nothing to guard yet
    assert logs["balance/safeguard"] == 0.0
    # Next refresh: g_a = (1, 0), g_b = (-0.9, 0.1). Smoothed alpha = 0.9 (½, ½) + 0.1 fresh is still about
    # (½, ½), whose d = (0.05, 0.05) has g_b·d = -0.04 < 0, so the fresh min-norm weights are used instead.
    J, G = gram([1.0, 0.0], [-0.9, 0.1])
    fresh = Balancer("mgda", {"a": 1.0, "b": 1.0}).fresh_weights(G)
    smoothed = 0.9 * first + 0.1 * fresh
    assert float((G @ smoothed).min()) < 0  # the EMA alone would conflict
    alpha, logs = b.update(G)
    assert logs["balance/safeguard"] == 1.0 and logs["balance/worst_cos"] >= 0
    torch.testing.assert_close(alpha, fresh)
    d = alpha @ J  # the min-norm point: g_k·d >= |d|² for both rewards
    assert float((J @ d).min()) >= float(d @ d) - 1e-7
    # A third refresh smooths from the fresh weights again (no conflict: the guard stays off).
    third, logs = b.update(G)
    assert logs["balance/safeguard"] == 0.0
    torch.testing.assert_close(third, fresh)
    with pytest.raises(ValueError, match="never conflicts"):
        Balancer("sum", {"a": 1.0, "b": 1.0}, safeguard=True)


def test_gradient_buffer_collects_per_reward_gradients_and_applies_the_combination():
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    params = list(lin.parameters())
    x = torch.randn(5, 3)
    out = lin(x)
    losses = [out[:, 0].pow(2).mean(), (out[:, 1] - out[:, 0]).mean()]
    buf = GradientBuffer(params, 2)
    for k, loss in enumerate(losses):
        buf.add(k, loss, retain_graph=True)
    for k, loss in enumerate(losses):
        expected = torch.cat([g.flatten() for g in torch.autograd.grad(loss, params, retain_graph=True)])
        torch.testing.assert_close(buf.J[k], expected)
    alpha = torch.tensor([0.3, 0.7], dtype=torch.float64)
    buf.apply(alpha)
    (0.3 * losses[0] + 0.7 * losses[1]).backward()
    # .grad now holds apply's d plus the direct backward: twice the combination
    for p in params:
        torch.testing.assert_close(p.grad, 2 * torch.autograd.grad(0.3 * lin(x)[:, 0].pow(2).mean()
                                                                  + 0.7 * (lin(x)[:, 1] - lin(x)[:, 0]).mean(), p)[0])


def test_tracked_gradients_follow_moco_and_choose_the_weights():
    lin = torch.nn.Linear(2, 1, bias=False)
    buf = GradientBuffer(list(lin.parameters()), 2)
    buf.J.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    torch.testing.assert_close(buf.track(0.75), gram([1.0, 0.0], [0.0, 1.0])[1])  # the first call starts at J
    buf.J.copy_(torch.tensor([[1.0, 2.0], [0.4, -1.0]]))
    y = 0.75 * torch.tensor([[1.0, 0.0], [0.0, 1.0]]) + 0.25 * buf.J  # y <- decay y + (1 - decay) g
    torch.testing.assert_close(buf.track(0.75), (y.double() @ y.double().T))
    torch.testing.assert_close(buf.tracked, y)
    state = buf.state_dict()
    other = GradientBuffer(list(lin.parameters()), 2)
    other.load_state_dict(state)
    assert torch.equal(other.tracked, buf.tracked)
    # The coefficients come from the tracked Gram matrix; the diagnostics describe the step's own gradients.
    _, G = gram([1.0, 2.0], [0.4, -1.0])
    Y = y.double() @ y.double().T
    alpha, logs = Balancer("mgda", {"a": 1.0, "b": 1.0}).update(G, Y)
    torch.testing.assert_close(alpha, Balancer("mgda", {"a": 1.0, "b": 1.0}).fresh_weights(Y))
    assert not torch.allclose(alpha, Balancer("mgda", {"a": 1.0, "b": 1.0}).fresh_weights(G))
    assert logs == diagnostics(G, alpha, ["a", "b"])
    # Here those weights conflict with b's step gradient: the safeguard falls back to the step's min-norm ones.
    assert float((G @ alpha).min()) < 0
    guarded, logs = Balancer("mgda", {"a": 1.0, "b": 1.0}, safeguard=True).update(G, Y)
    assert logs["balance/safeguard"] == 1.0
    torch.testing.assert_close(guarded, Balancer("mgda", {"a": 1.0, "b": 1.0}).fresh_weights(G))


# ---- advantage-space alternatives ----------------------------------------------------------------------------


def test_output_space_gram_by_hand():
    # L1 = <c, z> and L2 = |z - t|^2 / 2 have output gradients c and z - t; the graph survives for a backward.
    w = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, 1.0]], requires_grad=True)
    z = 2 * w
    c = torch.tensor([[1.0, 0.0, 2.0], [-1.0, 1.0, 0.0]])
    t = torch.tensor([[0.5, 1.0, 0.0], [2.0, 0.0, -1.0]])
    losses = [(c * z).sum(), 0.5 * (z - t).pow(2).sum()]
    u = torch.stack([c.flatten(), (z - t).detach().flatten()]).double()
    torch.testing.assert_close(output_space_gram(losses, z), u @ u.T)
    losses[1].backward()
    torch.testing.assert_close(w.grad, 2 * (z - t).detach())


def test_cmo_weights_by_hand():
    # r1 and r2 perfectly correlated, r3 anti-correlated with both: b = (0, 0, -1)... computed by hand:
    s = torch.tensor([[0.0, 1.0, 1.0], [1.0, 3.0, 0.0], [2.0, 5.0, -1.0]])
    # C = [[1, 1, -1], [1, 1, -1], [-1, -1, 1]] -> b = ((1 - 1)/2, (1 - 1)/2, (-2)/2) = (0, 0, -1)
    w = cmo_weights(s, tau=0.5)
    e = torch.exp(torch.tensor([2.0, 2.0, 4.0], dtype=torch.float64))
    torch.testing.assert_close(w, e / e.sum())
    # A reward with no spread gets b = 1, the smallest weight.
    s2 = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    w2 = cmo_weights(s2)
    assert w2[1] < w2[0]
    adv, ws = cmo_advantages(torch.cat([s, s + 1]), torch.tensor([0, 0, 0, 1, 1, 1]))
    assert ws.shape == (2, 3) and abs(float(adv.mean())) < 1e-9 and abs(float(adv.std(unbiased=False)) - 1) < 1e-3


def test_pareto_mask():
    s = torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.5, 0.5], [1.0, 1.0], [0.0, 2.0], [2.0, 0.0]])
    assert pareto_mask(s).tolist() == [True, True, False, True, True, True]  # ties are not dominated


def test_lagrange_multipliers_follow_dual_ascent():
    lt = LagrangeThresholds({"clean": 0.9, "bright": 0.5}, lr=1.0)
    m = lt.update(torch.tensor([[0.7, 0.6], [0.9, 0.6]]))  # means 0.8 (violated by 0.1), 0.6 (satisfied)
    torch.testing.assert_close(lt.lam, torch.tensor([0.1, 0.0], dtype=torch.float64))
    assert m["lagrange/slack/clean"] == pytest.approx(-0.1)
    torch.testing.assert_close(lt.objective(torch.tensor([1.0]), torch.tensor([[0.5, 2.0]])),
                               torch.tensor([1.05], dtype=torch.float64))
    lt.update(torch.tensor([[1.0, 0.6]]))  # satisfied by 0.1: lambda back to 0, never negative
    torch.testing.assert_close(lt.lam, torch.tensor([0.0, 0.0], dtype=torch.float64))


def test_hypervolume_weights_favour_the_lagging_reward():
    w = hypervolume_weights(torch.tensor([0.5, 0.2, 0.9]), torch.tensor([0.0, 0.0, 0.8]))
    # gaps (0.5, 0.2, 0.1): w ∝ (2, 5, 10)
    torch.testing.assert_close(w, torch.tensor([2.0, 5.0, 10.0], dtype=torch.float64) / 17)


# ---- in the trainers -------------------------------------------------------------------------------------------

TWO = "rewards={tests.helpers.toy_rewards.MeanBrightness: 1.0, tests.helpers.toy_rewards.RedChannel: 0.5}"


def balance_overrides(trainer):
    """Overrides of the shared tiny run (conftest.tiny_run) for the balancing tests: one step of 8-sample
    micro-batches, no CFG, two toy rewards."""
    over = ["train.max_steps=1", "train.train_batch_size=8", "sampling.batch_size=8", "sampling.guidance=1.0",
            "model.lora_rank=4", "model.height=32", "model.width=32", TWO]
    if trainer == "diffusion_nft":
        over += ["train.timesteps_per_sample=1", "train.kl_beta=0.01", "train.sample_with_old=false"]
    return over


def applied_gradients(trainer):
    """Run one step and return the gradient the optimizer applied (flattened) and the step's metrics."""
    from visalign.trainers import trainer_class

    t = trainer_class(trainer.trainer)(trainer)
    seen = []
    original = t.optimizer_step

    def record(*args):
        seen.append(torch.cat([p.grad.flatten().clone() for p in t.params]))
        return original(*args)

    t.optimizer_step = record
    metrics = t.step(0)
    assert len(seen) == 1
    return seen[0], metrics


def test_marble_amortised_nft_update_equals_the_explicit_combination(tiny_run, tmp_path):
    explicit, m_exp = applied_gradients(tiny_run(*balance_overrides("diffusion_nft"), "train.balance.method=mgda",
                                                 trainer="diffusion_nft", out=tmp_path / "a"))
    amortised, m_am = applied_gradients(tiny_run(*balance_overrides("diffusion_nft"), "train.balance.method=mgda",
                                                 "train.balance.amortized=true", trainer="diffusion_nft",
                                                 out=tmp_path / "b"))
    assert explicit.norm() > 0
    torch.testing.assert_close(amortised, explicit, atol=1e-5 * float(explicit.abs().max()), rtol=1e-5)
    assert m_exp["balance/weight/tests.helpers.toy_rewards.MeanBrightness"] == pytest.approx(
        m_am["balance/weight/tests.helpers.toy_rewards.MeanBrightness"], abs=1e-6)


def test_amortised_refresh_over_every_micro_batch_is_the_explicit_update(tiny_run, tmp_path):
    # Three micro-batches; a refresh that estimates the Gram matrix on all of them is the explicit form exactly.
    explicit, _ = applied_gradients(tiny_run(*balance_overrides("diffusion_nft"), "train.balance.method=mgda",
                                             "train.train_batch_size=3", trainer="diffusion_nft", out=tmp_path / "a"))
    amortised, _ = applied_gradients(tiny_run(*balance_overrides("diffusion_nft"), "train.balance.method=mgda",
                                              "train.train_batch_size=3", "train.balance.amortized=true",
                                              "train.balance.refresh_batches=8", trainer="diffusion_nft",
                                              out=tmp_path / "b"))
    torch.testing.assert_close(amortised, explicit, atol=1e-5 * float(explicit.abs().max()), rtol=1e-5)


def test_output_space_gram_applies_the_previous_steps_coefficients(tiny_run, tmp_path):
    from visalign.trainers import trainer_class

    # Step 0 has no Gram matrix yet: it applies the configured weights, i.e. the explicit weighted sum.
    first, m0 = applied_gradients(tiny_run(*balance_overrides("diffusion_nft"), "train.balance.method=mgda",
                                           "train.balance.amortized=true", "train.balance.gram=output",
                                           "train.train_batch_size=3", trainer="diffusion_nft", out=tmp_path / "a"))
    weighted, _ = applied_gradients(tiny_run(*balance_overrides("diffusion_nft"), "train.balance.method=sum",
                                             "train.train_batch_size=3", trainer="diffusion_nft", out=tmp_path / "b"))
    torch.testing.assert_close(first, weighted, atol=1e-5 * float(weighted.abs().max()), rtol=1e-5)
    assert m0["balance/weight/tests.helpers.toy_rewards.RedChannel"] == 0.5
    # Its Gram matrix (over all three micro-batches) sets the min-norm coefficients the next step applies.
    t = trainer_class("diffusion_nft")(tiny_run(*balance_overrides("diffusion_nft"), "train.balance.method=mgda",
                                                "train.balance.amortized=true", "train.balance.gram=output",
                                                "train.train_batch_size=3", "train.max_steps=2",
                                                trainer="diffusion_nft", out=tmp_path / "c"))
    t.step(0)
    after_first = t.balancer.alpha.clone()
    assert not torch.allclose(after_first, torch.tensor([1.0, 0.5], dtype=torch.float64))
    assert float((after_first / torch.tensor([1.0, 0.5], dtype=torch.float64)).sum()) == pytest.approx(1.0)
    m1 = t.step(1)
    assert m1["balance/weight/tests.helpers.toy_rewards.MeanBrightness"] == pytest.approx(float(after_first[0]))
    assert m1["balance/weight/tests.helpers.toy_rewards.RedChannel"] == pytest.approx(float(after_first[1]))
    assert t.grad_buffer is None  # no K x P buffer in this form


def test_grpo_balanced_sum_equals_normalize_then_sum(tiny_run, tmp_path):
    # On-policy the GRPO loss is linear in the advantage, so Σ_k w_k ∇L(A_k) = ∇L(Σ_k w_k A_k): the per-reward
    # gradient path with the weighted-sum aggregator must reproduce GDPO's single backward.
    balanced, m = applied_gradients(tiny_run(*balance_overrides("flow_grpo"), "train.balance.method=sum",
                                             trainer="flow_grpo", out=tmp_path / "a"))
    gdpo, m_gdpo = applied_gradients(tiny_run(*balance_overrides("flow_grpo"),
                                              "train.advantage.mode=normalize_then_sum", trainer="flow_grpo",
                                              out=tmp_path / "b"))
    torch.testing.assert_close(balanced, gdpo, atol=1e-6 * float(gdpo.abs().max()), rtol=1e-5)
    # 4 SDE steps, the last never trained: 3 per sample, whether or not the rewards are balanced
    assert m["train/trained_timesteps"] == m_gdpo["train/trained_timesteps"] == 3
    for key in ("balance/worst_cos", "balance/cos_update/tests.helpers.toy_rewards.RedChannel",
                "balance/cos/tests.helpers.toy_rewards.MeanBrightness|tests.helpers.toy_rewards.RedChannel"):
        assert -1 <= m[key] <= 1
    assert m["balance/weight/tests.helpers.toy_rewards.RedChannel"] == 0.5


def test_grpo_mgda_update_is_the_min_norm_combination(tiny_run, tmp_path):
    cfg = tiny_run(*balance_overrides("flow_grpo"), "train.balance.method=mgda", trainer="flow_grpo")
    _, m = applied_gradients(cfg)
    w = [m[f"balance/weight/tests.helpers.toy_rewards.{n}"] for n in ("MeanBrightness", "RedChannel")]
    # Coefficients on the raw gradients = simplex weights × the configured reward weights (1, 0.5).
    assert w[0] / 1.0 + w[1] / 0.5 == pytest.approx(1.0) and min(w) >= 0
    # The min-norm point of the hull is never worse aligned than 0 with any reward (its cosines are >= 0).
    assert m["balance/worst_cos"] >= -1e-6


@pytest.mark.parametrize("gram", [["train.balance.every=2"], ["train.balance.gram=output"],
                                  ["train.balance.every=2", "train.balance.track=0.5"]],
                         ids=["params", "output", "tracked"])
def test_balanced_nft_resumes_bit_identically(tiny_run, tmp_path, gram):
    from visalign.trainers.forward import DiffusionNFTTrainer

    extra = ["train.max_steps=3", "train.balance.method=mgda", "train.balance.amortized=true",
             "train.balance.ema=0.5", *gram]
    DiffusionNFTTrainer(tiny_run(*balance_overrides("diffusion_nft"), *extra, trainer="diffusion_nft",
                                 out=tmp_path / "a")).train()
    DiffusionNFTTrainer(tiny_run(*balance_overrides("diffusion_nft"), *extra, trainer="diffusion_nft",
                                 out=tmp_path / "b")).train(stop_after=2)
    DiffusionNFTTrainer(tiny_run(*balance_overrides("diffusion_nft"), *extra, trainer="diffusion_nft",
                                 out=tmp_path / "b")).train()
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "a" / "final" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "b" / "final" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("extra, key", [
    (["train.advantage.mode=cmo"], "cmo/weight/tests.helpers.toy_rewards.RedChannel"),
    (["train.advantage.mode=hypervolume"], "hypervolume/weight/tests.helpers.toy_rewards.RedChannel"),
    (["train.advantage.constraints={tests.helpers.toy_rewards.RedChannel: 0.9}", "train.advantage.constraint_lr=1.0"],
     "lagrange/lambda/tests.helpers.toy_rewards.RedChannel"),
    (["train.advantage.pareto_filter=true"], "trained_fraction"),
])
def test_advantage_space_alternatives_in_a_trainer_step(tiny_run, tmp_path, extra, key):
    grad, m = applied_gradients(tiny_run(*balance_overrides("flow_grpo"), *extra, trainer="flow_grpo"))
    assert grad.norm() > 0 and key in m
    if "constraints" in extra[0]:
        # The red channel of a random tiny model is far below 0.9: the multiplier rises by lr × the violation.
        red = m["rewards/tests.helpers.toy_rewards.RedChannel/mean"]
        assert m[key] == pytest.approx(0.9 - red, abs=1e-5)
    if key == "trained_fraction":
        assert 0 < m[key] < 1


@pytest.mark.parametrize("trainer, extra, match", [
    ("flow_grpo", ["train.balance.method=mgda", "rewards={tests.helpers.toy_rewards.MeanBrightness: 1.0}"],
     "two trained"),
    ("flow_grpo", ["train.balance.method=mgda", "train.balance.amortized=true"], "affine"),
    ("flow_rwr", ["train.balance.method=mgda", "sampling.sde=ode"], "advantage space"),
    ("flow_grpo", ["train.balance.method=mgda", "train.advantage.mode=cmo"], "excludes"),
    ("diffusion_nft", ["train.balance.method=pcgrad", "train.balance.safeguard=true"], "never conflicts"),
    ("diffusion_nft", ["train.balance.method=mgda", "train.balance.amortized=true", "train.balance.gram=output",
                       "train.balance.track=0.5"], "gram=params"),
    ("diffusion_nft", ["train.balance.method=mgda", "train.balance.track=1.0"], "track=1.0 must be >= 0 and < 1"),
    ("diffusion_nft", ["train.balance.method=mgda", "train.balance.gram=output"], "amortised"),
    ("diffusion_nft", ["train.balance.method=mgda", "train.balance.amortized=true", "train.balance.gram=output",
                       "train.balance.refresh_batches=2"], "every micro-batch"),
    ("flow_grpo", [("train.advantage.constraints={tests.helpers.toy_rewards.MeanBrightness: 0.5, "
                    "tests.helpers.toy_rewards.RedChannel: 0.5}")], "some, not all"),
    ("diffusion_nft", ["train.balance.method=mgda", "train.balance.normalize=true",
                       ("rewards={tests.helpers.toy_rewards.MeanBrightness: 2.0, "
                        "tests.helpers.toy_rewards.RedChannel: 1.0}")],
     "ignores reward weights"),
])
def test_balance_config_errors(tiny_run, tmp_path, trainer, extra, match):
    from visalign.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        tiny_run(*balance_overrides(trainer), *extra, trainer=trainer)
