"""Steering: resampling and potentials by hand, FK converging to a closed-form tilted distribution, guidance
moving a known reward, and every method through the world model and tiny SD3 / FLUX / Wan."""

import math

import pytest
import torch

from tests.helpers.toy_flow import GaussianFlow, LinearReward
from tests.helpers.toy_rewards import MeanBrightness
from visalign.steering import steer
from visalign.steering.core import Potentials
from visalign.steering.resampling import (
    effective_sample_size,
    normalize_log_weights,
    resample,
    resample_counts,
)

# ---- resampling ------------------------------------------------------------------------------------------------


def test_log_weights_with_extreme_values_and_ess():
    log_w = torch.tensor([[1000.0, 1000.0, -1000.0, -math.inf], [0.0, 0.0, 0.0, 0.0], [-math.inf] * 4])
    w = normalize_log_weights(log_w).exp()
    torch.testing.assert_close(w, torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.25] * 4, [0.25] * 4], dtype=torch.float64))
    ess = effective_sample_size(log_w)
    torch.testing.assert_close(ess, torch.tensor([2.0, 4.0, 4.0], dtype=torch.float64))
    assert effective_sample_size(torch.tensor([[5000.0, 0.0, 0.0]])).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="NaN"):
        normalize_log_weights(torch.tensor([[0.0, math.nan]]))


def test_systematic_resampling_counts_are_floor_or_ceil_of_expected():
    g = torch.Generator().manual_seed(0)
    w = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]])
    for _ in range(50):
        idx = resample(w.log(), "systematic", g)
        counts = resample_counts(idx, 2, 4)
        expected = 4 * w
        assert ((counts >= expected.floor()) & (counts <= expected.ceil())).all()
        # every ancestor index stays inside its own prompt's particles
        assert (idx.view(2, 4) // 4 == torch.arange(2).unsqueeze(1)).all()


@pytest.mark.parametrize("scheme", ["multinomial", "stratified", "systematic"])
def test_resampling_is_unbiased_and_keeps_groups(scheme):
    g = torch.Generator().manual_seed(1)
    w = torch.tensor([[0.05, 0.15, 0.3, 0.5], [0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]])
    total = torch.zeros(3, 4)
    for _ in range(2000):
        idx = resample(w.log(), scheme, g)
        assert (idx.view(3, 4) // 4 == torch.arange(3).unsqueeze(1)).all()
        total += resample_counts(idx, 3, 4)
    torch.testing.assert_close(total / 2000, 4 * w, atol=0.06, rtol=0)
    # a degenerate weight set copies its one particle everywhere
    assert resample(torch.tensor([[0.0, -math.inf, -math.inf]]), scheme, g).tolist() == [0, 0, 0]


def test_fk_potentials_by_hand_and_final_correction():
    rs = [torch.tensor([0.2, 0.5]), torch.tensor([0.1, 0.9]), torch.tensor([0.4, 0.3])]
    for kind in ("max", "sum", "rt", "diff"):
        p = Potentials(kind, lam=2.0, n=2)
        logs = [p.log_potential(r, final=(i == 2)) for i, r in enumerate(rs)]
        # Every lineage's product of potentials is exp(lam * final reward).
        torch.testing.assert_close(sum(logs), 2.0 * rs[-1].double())
    p = Potentials("max", lam=2.0, n=2)
    p.log_potential(rs[0], False)
    torch.testing.assert_close(p.log_potential(rs[1], False), 2.0 * torch.tensor([0.2, 0.9], dtype=torch.float64))
    p = Potentials("sum", lam=1.0, n=2)
    p.log_potential(rs[0], False)
    torch.testing.assert_close(p.log_potential(rs[1], False), torch.tensor([0.3, 1.4], dtype=torch.float64))
    # States follow resampled ancestors.
    p.permute(torch.tensor([1, 1]))
    torch.testing.assert_close(p.running_sum, torch.tensor([1.4, 1.4], dtype=torch.float64))


# ---- closed-form toy -------------------------------------------------------------------------------------------


def _toy(method, n_prompts=400, **options):
    return steer(GaussianFlow(0.0, 1.0), ["p"] * n_prompts, LinearReward(), method, steps=40, guidance=1.0,
                 height=1, width=1, seed=3, **options)


def test_plain_toy_flow_samples_its_data_distribution():
    out = _toy("best_of_n", n=1)
    x = out.latents.flatten()
    assert abs(x.mean().item()) < 0.12 and abs(x.std().item() - 1.0) < 0.1


def test_fk_converges_to_the_tilted_distribution_as_particles_grow():
    # Target: N(0, 1) tilted by exp(1 * x0) = N(1, 1). FK's weighted output approaches it as k grows.
    errors = {}
    for k in (1, 4, 16):
        out = _toy("fk", k=k, lam=1.0, potential="diff", select="weighted", sde="flow_grpo", noise_level=0.7)
        x = out.latents.flatten()
        errors[k] = abs(x.mean().item() - 1.0)
        if k == 16:
            assert abs(x.std().item() - 1.0) < 0.15
    assert errors[1] > 0.8  # no particles to select from: the untilted N(0, 1)
    assert errors[16] < errors[4] < errors[1]
    assert errors[16] < 0.15


def test_fk_defaults_sample_the_tilted_distribution_at_256_particles():
    # N(0, 1) tilted by exp(x0) is N(1, 1): with the default potential and schedule (resampling every step), the
    # weighted output's mean and variance are within 3 standard errors of it. ("max" every step gave mean 4.6.)
    n = 200
    out = steer(GaussianFlow(0.0, 1.0), ["p"] * n, LinearReward(), "fk", steps=20, guidance=1.0, height=1, width=1,
                seed=5, k=256, lam=1.0, select="weighted")
    assert out.report["potential"] == "diff"
    x = out.latents.flatten().double()
    assert abs(x.mean().item() - 1.0) < 3 * math.sqrt(1.0 / n)
    assert abs(x.var().item() - 1.0) < 3 * math.sqrt(2.0 / (n - 1))


def test_fk_report_lineage_stays_within_prompt_groups():
    out = _toy("fk", n_prompts=3, k=4, lam=2.0, every=5)
    assert out.report["nfe"] == 3 * 4 * 40
    for event in out.report["lineage"]:
        for p, ancestors in enumerate(event["ancestors"]):
            assert all(p * 4 <= a < (p + 1) * 4 for a in ancestors)
    assert [e["step"] for e in out.report["lineage"]] == [0, 5, 10, 15, 20, 25, 30, 35, 39]


def test_guidance_moves_a_known_reward_up():
    base = _toy("guidance", n_prompts=200, scale=0.0)
    guided = _toy("guidance", n_prompts=200, scale=0.5)
    shift = (guided.reward - base.reward).mean().item()
    assert shift > 0.25  # d r / d x = 1 everywhere: every step moves x up
    assert guided.report["backward_passes"] == 200 * 40
    assert all(abs(n - 1.0) < 1e-3 for row in guided.report["gradient_norms"] for n in row)  # |d logit(sigmoid x)/dx|


def test_reno_improves_the_reward_and_keeps_the_best_iterate():
    out = _toy("reno", n_prompts=8, iterations=5, lr=1.0)
    history = torch.tensor(out.report["reward_history"])
    assert (history[-1] > history[0]).all()
    torch.testing.assert_close(out.reward, history.max(0).values, atol=1e-4, rtol=0)


# ---- real adapters ---------------------------------------------------------------------------------------------------


def test_methods_through_the_world_model():
    from visalign.models import load_model

    world = load_model("world")
    prompts = ["two red circles", "a blue square on the left"]
    nfe = {}
    for method, opts in (("best_of_n", {"n": 2}), ("fk", {"k": 2, "lam": 5.0, "every": 2})):
        out = steer(world, prompts, {"world-verifier": 1.0}, method, steps=4, guidance=3.0, **opts)
        assert out.images.shape == (2, 3, 32, 32) and out.reward.shape == (2,)
        assert 0 <= out.report["overhead_fraction"] < 1
        nfe[method] = out.report["nfe"]
    assert nfe["best_of_n"] == nfe["fk"] == 2 * 2 * 4 * 2  # prompts × particles × steps × CFG: equal NFE
    out = steer(world, prompts, MeanBrightness(), "guidance", steps=4, guidance=3.0, scale=0.5)
    assert out.images.shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="not differentiable"):
        steer(world, prompts, "world-verifier", "guidance", steps=2)


@pytest.mark.parametrize("model, size, frames", [("tiny-sd3", 32, None), ("tiny-flux", 32, None), ("tiny-wan", 16, 5)])
def test_methods_through_tiny_diffusers_adapters(model, size, frames):
    from visalign.models import load_model

    adapter = load_model(model)
    guidance = 1.0 if model == "tiny-flux" else 2.0
    for method, opts in (("best_of_n", {"n": 2}), ("fk", {"k": 2, "lam": 10.0}), ("guidance", {"scale": 0.3}),
                         ("reno", {"iterations": 1})):
        out = steer(adapter, ["a cat"], MeanBrightness(), method, steps=2, guidance=guidance, height=size,
                    width=size, num_frames=frames, **opts)
        assert out.reward.shape == (1,) and torch.isfinite(out.latents).all()


def test_steer_accepts_a_diffusers_pipeline_and_rejects_bad_input():
    from visalign.models.tiny import tiny_sd3_pipeline

    pipe = tiny_sd3_pipeline()
    out = steer(pipe, ["a cat"], MeanBrightness(), "best_of_n", steps=2, guidance=1.0, height=32, width=32, n=2)
    assert out.images.shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="unknown steering method"):
        steer(pipe, ["a"], MeanBrightness(), "magic")
    with pytest.raises(ValueError, match="no adapter for a object: pass a visalign adapter or one of the pipelines"):
        steer(object(), ["a"], MeanBrightness())
    with pytest.raises(ValueError, match="fk"):
        steer(pipe, ["a"], MeanBrightness(), "fk", height=32, width=32, particles=3)


def test_cli_steer_writes_images_and_report(tmp_path, capsys):
    import json

    from visalign.cli import main

    code = main(["steer", "configs/steer_world.yaml", f"out={tmp_path}", "steps=4", "prompts=[two red circles]",
                 "options={k: 2, lam: 5.0, every: 2}"])
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["nfe"] == 2 * 4 * 2 and len(report["reward"]) == 1 and (tmp_path / "000.png").is_file()
    printed = capsys.readouterr()
    assert "NFE 16" in printed.out and "steering: 16 NFE" in printed.err  # a progress bar of denoiser passes
    assert main(["steer", "configs/steer_world.yaml", "options={particles: 3}"]) == 2
    assert "options: fk takes no option 'particles'; its options: k, potential, lam," in capsys.readouterr().err
    assert main(["steer", "configs/steer_world.yaml", "method=best_of_n", "options={k: 3}"]) == 2
    assert "best_of_n takes no option 'k'; its options: n, " in capsys.readouterr().err
    assert main(["steer", "configs/steer_world.yaml", "options={lamb: 3}"]) == 2
    assert "no option 'lamb' (did you mean 'lam'?)" in capsys.readouterr().err


def test_fk_gradient_proposal_keeps_the_tilted_target():
    # A gradient-shifted proposal with its importance correction still targets N(1, 1), and moves particles up.
    out = _toy("fk", k=16, lam=1.0, potential="diff", select="weighted", proposal_scale=1.0)
    x = out.latents.flatten()
    assert abs(x.mean().item() - 1.0) < 0.15
    assert out.report["backward_passes"] > 0


def test_reno_chunking_and_checkpointing_do_not_change_the_result():
    a = _toy("reno", n_prompts=6, iterations=3, lr=1.0, chunk=6, checkpoint=False)
    b = _toy("reno", n_prompts=6, iterations=3, lr=1.0, chunk=2, checkpoint=True)
    torch.testing.assert_close(a.latents, b.latents, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(a.report["reward_history"]), torch.tensor(b.report["reward_history"]),
                               atol=1e-5, rtol=1e-5)


# ---- reward-gradient SDE drift (Euphonium) ------------------------------------------------------------------------


def test_drift_shift_by_hand():
    from visalign.steering import RewardDrift

    g = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    std = torch.tensor([0.5, 2.0])
    torch.testing.assert_close(RewardDrift(scale=2.0).shift(g, std), torch.tensor([[1.5, 2.0], [0.0, 8.0]]))
    torch.testing.assert_close(RewardDrift(scale=2.0, mode="fixed").shift(g, std), 2.0 * g)
    torch.testing.assert_close(RewardDrift(scale=1.0, mode="fixed", normalize="sample").shift(g, std),
                               torch.tensor([[0.6, 0.8], [0.0, 1.0]]))
    norm = math.sqrt(9 + 16 + 1)
    torch.testing.assert_close(RewardDrift(scale=1.0, mode="fixed", normalize="batch").shift(g, std), g / norm)
    with pytest.raises(ValueError, match="mode"):
        RewardDrift(mode="up")
    with pytest.raises(ValueError, match="window"):
        RewardDrift(start=3, stop=3)


def test_drift_moves_the_reward_up_and_rescoring_keeps_the_ratio_at_one():
    from visalign.sampling import SDEOptions, sample, trajectory_log_prob
    from visalign.steering import RewardDrift
    from visalign.steering.core import resolve_rewards

    model, n = GaussianFlow(0.0, 1.0), 300
    cond = model.encode_prompts(["p"] * n)
    drift = RewardDrift(scale=1.0, start=5, stop=30)
    fn = drift.bind(model, resolve_rewards(LinearReward()), ["p"] * n)
    kw = {"num_steps": 40, "height": 1, "width": 1, "sde": SDEOptions("flow_grpo", 0.7),
          "seeds": list(range(n))}
    plain, drifted = sample(model, cond, **kw), sample(model, cond, **kw, drift=fn)
    # d r / d x0 = 1 for this reward, so each shift is exactly lam * std^2 inside the window and 0 outside.
    expected = torch.zeros(n, 40)
    expected[:, 5:30] = drifted.stds[:, 5:30] ** 2
    torch.testing.assert_close(drifted.drifts.flatten(2).squeeze(2), expected, atol=1e-5, rtol=1e-5)
    assert drifted.final.mean() - plain.final.mean() > 0.3
    # Rescoring the stored steps (the drift is added back) gives the sampling log-probs: ratio 1.
    for step in (4, 10, 29):
        out = trajectory_log_prob(model, drifted, step, cond, 1.0)
        torch.testing.assert_close(out.log_prob, drifted.log_probs[:, step], atol=1e-6, rtol=0)
    without = trajectory_log_prob(model, drifted.__class__(**{**drifted.__dict__, "drifts": None}), 10, cond, 1.0)
    assert (without.log_prob - drifted.log_probs[:, 10]).abs().max() > 1e-3


def test_drift_as_a_steering_method_and_its_reward_check():
    out = _toy("drift", n_prompts=200, scale=1.0, start=5)
    base = _toy("drift", n_prompts=200, scale=0.0)
    assert (out.reward - base.reward).mean() > 0.3
    assert out.report["backward_passes"] == 200 * 35 and base.report["backward_passes"] == 0
    with pytest.raises(ValueError, match="not differentiable"):
        steer(GaussianFlow(), ["p"], "world-verifier", "drift", steps=4, height=1, width=1)
