"""Preference and regression trainers: Flow-DPO (online, offline), Flow-RWR, DiffusionNFT. Losses against hand
computations; two steps on tiny SD3 / Wan with LoRA and full fine-tuning; bit-identical resume; image and video
pair files."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from visalign.pairs import PairFileError, load_video, read_pairs
from visalign.trainers.common import EMA
from visalign.trainers.dpo import FlowDPOTrainer, group_pairs
from visalign.trainers.engine import accumulation_schedule
from visalign.trainers.forward import (
    DiffusionNFTTrainer,
    FlowRWRTrainer,
    ForwardTrainConfig,
    ForwardTrainer,
    noised,
    sample_sigmas,
)
from visalign.trainers.losses import dpo_loss, nft_loss, nft_reward_weight, per_sample_mse, rwr_weights
from visalign.world.model import WorldAdapter

TRAINERS = {"diffusion_nft": DiffusionNFTTrainer, "flow_rwr": FlowRWRTrainer, "flow_dpo": FlowDPOTrainer}


# ---- losses ---------------------------------------------------------------------------------------------------

def test_dpo_loss_is_log2_at_init_and_matches_hand_value():
    e = torch.tensor([0.7, 1.3])
    loss, m = dpo_loss(e, e.flip(0), e, e.flip(0), beta=100.0)
    assert loss.item() == pytest.approx(math.log(2)) and m["implicit_accuracy"] == 0.0
    # beta 2: inside = -1 * ((1 - 1.5) - (2 - 1.5)) = 1 -> -log sigmoid(1) = 0.31326
    loss, _ = dpo_loss(torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([1.5]), torch.tensor([1.5]), beta=2.0)
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-1.0))), rel=1e-6)
    # Weighted mean: weights 3 and 1 over per-pair losses log 2 and -log sigmoid(1).
    loss, _ = dpo_loss(torch.tensor([1.5, 1.0]), torch.tensor([1.5, 2.0]), torch.tensor([1.5, 1.5]),
                       torch.tensor([1.5, 1.5]), beta=2.0, weight=torch.tensor([3.0, 1.0]))
    assert loss.item() == pytest.approx((3 * math.log(2) + 0.313262) / 4, rel=1e-5)


def test_dpo_gradient_lowers_winner_error_relative_to_loser():
    err_w = torch.tensor([1.0], requires_grad=True)
    err_l = torch.tensor([1.0], requires_grad=True)
    loss, _ = dpo_loss(err_w, err_l, torch.tensor([1.0]), torch.tensor([1.0]), beta=10.0)
    loss.backward()
    assert err_w.grad.item() > 0 > err_l.grad.item()  # descent: winner error down, loser error up
    assert err_w.grad.item() == pytest.approx(-err_l.grad.item())


def test_rwr_weights_exp_and_best_by_hand():
    adv = torch.tensor([0.0, math.log(2.0), 1.0, -1.0])
    groups = torch.tensor([0, 0, 1, 1])
    mask = torch.tensor([True, True, True, False])
    w = rwr_weights(adv, groups, mask, "exp", temperature=1.0)
    # softmax over the three kept samples of (0, ln 2, 1), times 3 (mean 1); the masked one is 0
    e = torch.tensor([1.0, 2.0, math.e])
    torch.testing.assert_close(w, torch.cat([3 * e / e.sum(), torch.zeros(1)]))
    w = rwr_weights(adv, groups, mask, "best")
    torch.testing.assert_close(w, torch.tensor([0.0, 1.5, 1.5, 0.0]))  # best of each group, mean 1 over kept


def test_rwr_weights_positive_keeps_every_sample_above_its_group_mean_alike():
    adv = torch.tensor([0.5, 2.0, -2.5, 0.0, 1.0, -1.0, 3.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2])
    mask = torch.tensor([True, True, True, True, True, True, False])
    w = rwr_weights(adv, groups, mask, "positive")
    # kept: 0.5, 2.0, 1.0 (A > 0); A = 0 and negatives get 0, the masked 3.0 too; 6 kept samples, mean 1
    torch.testing.assert_close(w, torch.tensor([2.0, 2.0, 0.0, 0.0, 2.0, 0.0, 0.0]))
    assert rwr_weights(torch.zeros(3), torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.bool),
                       "positive").sum() == 0  # a group with no spread teaches nothing


def test_nft_reward_weight_and_loss_by_hand():
    torch.testing.assert_close(nft_reward_weight(torch.tensor([-10.0, -5.0, 0.0, 2.5, 5.0])),
                               torch.tensor([0.0, 0.0, 0.5, 0.75, 1.0]))
    # x_t = 1, x0 = 0.1, sigma = 0.5, v_theta = 1.2, v_old = 2, beta = 1:
    # v+ = 1.2, v- = 2.8; x0+ = 0.4, x0- = -0.4; errors 0.3, -0.5; w+ = 0.3, w- = 0.5;
    # l+ = 0.09 / 0.3 = 0.3, l- = 0.25 / 0.5 = 0.5; r = 0.8: 5 * (0.8 * 0.3 + 0.2 * 0.5) = 1.7
    one = torch.ones(1, 1)
    loss, m = nft_loss(1.2 * one, 2.0 * one, one, 0.1 * one, torch.tensor([0.5]), torch.tensor([0.8]), beta=1.0)
    assert loss.item() == pytest.approx(1.7, rel=1e-5)
    assert m["loss_positive"] == pytest.approx(0.3, rel=1e-5) and m["loss_negative"] == pytest.approx(0.5, rel=1e-5)
    # KL term: + kl_beta * (v_theta - v_ref)^2 = 0.1 * 0.04
    loss, _ = nft_loss(1.2 * one, 2.0 * one, one, 0.1 * one, torch.tensor([0.5]), torch.tensor([0.8]), beta=1.0,
                       v_ref=one, kl_beta=0.1)
    assert loss.item() == pytest.approx(1.7 + 0.004, rel=1e-5)


def test_nft_loss_is_affine_in_the_reward_weight_so_blended_weights_blend_gradients():
    g = torch.Generator().manual_seed(0)
    shape = (3, 2, 4, 4)
    x0, x_t, v_old = (torch.randn(shape, generator=g) for _ in range(3))
    sigma = torch.rand(3, generator=g)
    theta = torch.randn(shape, generator=g)

    def grad(r):
        v = theta.clone().requires_grad_(True)
        loss, _ = nft_loss(v, v_old, x_t, x0, sigma, r, beta=0.7)
        loss.backward()
        return loss.detach(), v.grad

    r1, r2 = torch.rand(3, generator=g), torch.rand(3, generator=g)
    l0, _ = grad(torch.zeros(3))
    l1, _ = grad(torch.ones(3))
    lr, _ = grad(r1)
    # L(r) = L(0) + mean_i r_i (L+_i - L-_i) ... checked through the blend identity below and linearity here
    a = 0.3
    lb, gb = grad(a * r1 + (1 - a) * r2)
    la, ga = grad(r1)
    lc, gc = grad(r2)
    assert lb.item() == pytest.approx(a * la.item() + (1 - a) * lc.item(), rel=1e-5)
    torch.testing.assert_close(gb, a * ga + (1 - a) * gc, atol=1e-6, rtol=1e-5)
    assert l0.item() != l1.item() and lr.item() != l0.item()


def test_sigma_sampling_and_interpolation():
    g = torch.Generator().manual_seed(0)
    grid = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    s = sample_sigmas("grid", 5, 3, grid, g)
    assert s.shape == (5, 3) and all(len(set(row.tolist())) == 3 for row in s)
    assert set(s.flatten().tolist()) <= {1.0, 0.75, 0.5, 0.25}
    with pytest.raises(ValueError, match="exceeds"):
        sample_sigmas("grid", 1, 5, grid, g)
    ln = sample_sigmas("logit_normal", 4000, 1, grid, g)
    assert ln.min() > 0 and ln.max() < 1 and abs(ln.median().item() - 0.5) < 0.03
    # train.min_sigma: only the high-noise levels are trained.
    high = sample_sigmas("grid", 5, 2, grid, g, min_sigma=0.5)
    assert set(high.flatten().tolist()) <= {1.0, 0.75, 0.5}
    with pytest.raises(ValueError, match=">= train.min_sigma=0.6"):
        sample_sigmas("grid", 1, 3, grid, g, min_sigma=0.6)
    ln_high = sample_sigmas("logit_normal", 4000, 1, grid, g, min_sigma=0.6)
    assert ln_high.min() > 0.6 and abs(ln_high.median().item() - 0.8) < 0.02
    x0, eps = torch.zeros(2, 3), torch.ones(2, 3)
    torch.testing.assert_close(noised(x0, eps, torch.tensor([0.25, 1.0])), torch.tensor([[0.25] * 3, [1.0] * 3]))
    assert per_sample_mse(torch.zeros(2, 3), torch.ones(2, 3)).tolist() == [1.0, 1.0]


def test_accumulation_schedule_splits_micro_batches():
    assert accumulation_schedule(5, 2) == [(2, False), (2, True), (3, False), (3, False), (3, True)]
    assert accumulation_schedule(2, 4) == [(1, True), (1, True)]
    # With sizes every sample weighs the same: a short last chunk's mean loss is divided by less.
    assert accumulation_schedule(3, 1, [3, 3, 2]) == [(8 / 3, False), (8 / 3, False), (4.0, True)]
    assert accumulation_schedule(4, 2, [4, 4, 4, 4]) == accumulation_schedule(4, 2)
    with pytest.raises(ValueError, match="sizes"):
        accumulation_schedule(3, 1, [3, 3])


def test_group_pairs_best_and_worst_of_each_group():
    total = torch.tensor([0.1, 0.9, 0.5, 0.5, 0.5, 0.5, 0.2, float("nan")])
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    valid = torch.isfinite(total)
    w, lo, gap = group_pairs(total, groups, valid)
    assert w.tolist() == [1] and lo.tolist() == [0] and gap.tolist() == pytest.approx([0.8])


# ---- trainers -------------------------------------------------------------------------------------------------

# On top of the shared tiny run (conftest.tiny_run): LoRA rank 4, two noise levels per sample, one toy reward.
FORWARD = ("model.lora_rank=4", "train.timesteps_per_sample=2",
           "rewards={tests.helpers.toy_rewards.MeanBrightness: 1.0}")


REQUESTS = {"tiny-sd3": ["model.height=32", "model.width=32"],
            "tiny-wan": ["model.height=16", "model.width=16", "model.num_frames=5"]}


@pytest.mark.parametrize("model", list(REQUESTS))
@pytest.mark.parametrize("finetune", ["lora", "full"])
@pytest.mark.parametrize("trainer", list(TRAINERS))
def test_tiny_models_train_two_steps(tiny_run, trainer, finetune, model, tmp_path):
    extra = ["train.kl_beta=0.1"] if trainer == "diffusion_nft" else []
    cfg = tiny_run(*FORWARD, f"model.finetune={finetune}", *REQUESTS[model], *extra, trainer=trainer, model=model)
    t = TRAINERS[trainer](cfg)
    named = dict(t.adapter.denoiser.named_parameters())
    before = {n: p.detach().clone() for n, p in named.items()}
    trainable = {n for n, p in named.items() if p.requires_grad}
    history = t.train()
    changed = {n for n, p in named.items() if not torch.equal(before[n], p.detach())}
    assert changed and changed <= trainable
    assert all("lora_" in n for n in trainable) if finetune == "lora" else trainable == set(named)
    assert all(math.isfinite(h["train/grad_norm"]) for h in history)
    if trainer == "flow_dpo":
        # The first step's loss is log 2 exactly (policy = reference) for every pair.
        assert history[0]["train/dpo_loss"] == pytest.approx(math.log(2), abs=1e-6)


def _final_weights(run, step):
    return load_file(str(run / "checkpoints" / f"checkpoint-{step}" / "weights.safetensors"))


@pytest.mark.parametrize("model", list(REQUESTS))
@pytest.mark.parametrize("trainer", list(TRAINERS))
def test_resume_is_bit_identical(tiny_run, trainer, model, tmp_path):
    extra = ["train.max_steps=3", "train.ema.decay=0.9", *REQUESTS[model]]
    if trainer == "flow_dpo":
        extra.append("train.ref_update_every=2")
    TRAINERS[trainer](tiny_run(*FORWARD, *extra, trainer=trainer, model=model, out=tmp_path / "a")).train()
    TRAINERS[trainer](tiny_run(*FORWARD, *extra, trainer=trainer, model=model, out=tmp_path / "b")).train(stop_after=1)
    resumed = TRAINERS[trainer](tiny_run(*FORWARD, *extra, trainer=trainer, model=model, out=tmp_path / "b")).train()
    assert [h["step"] for h in resumed] == [1, 2]
    a, b = _final_weights(tmp_path / "a", 3), _final_weights(tmp_path / "b", 3)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The extra state (old policy, reference, EMA) is restored too: the saved custom checkpoints agree.
    for name in sorted(p.name for p in (tmp_path / "a" / "checkpoints" / "checkpoint-3").glob("custom_checkpoint_*")):
        sa = torch.load(tmp_path / "a" / "checkpoints" / "checkpoint-3" / name, weights_only=True)
        sb = torch.load(tmp_path / "b" / "checkpoints" / "checkpoint-3" / name, weights_only=True)
        assert json.dumps(sa, default=lambda t: t.tolist()) == json.dumps(sb, default=lambda t: t.tolist())


def test_nft_old_policy_follows_softly(tiny_run, tmp_path):
    cfg = tiny_run(*FORWARD, "train.max_steps=1", "train.old_decay_rate=0.5", *REQUESTS["tiny-sd3"],
                   trainer="diffusion_nft")
    t = DiffusionNFTTrainer(cfg)
    start = [p.detach().clone() for p in t.params]
    t.train()
    # After step 0 the decay is min(0.5 * 0, 0.5) = 0: the old policy equals the trained weights.
    assert all(torch.equal(s, p) for s, p in zip(t.old.shadow, t.params, strict=True))
    assert any(not torch.equal(s, p) for s, p in zip(start, t.params, strict=True))
    assert t.old_decay(1) == 0.5 and t.old_decay(5) == 0.5


def test_nft_skips_the_old_policy_pass_while_it_equals_the_trained_weights(tiny_run, tmp_path):
    # Rate 1e-30: every blend keeps the trained weights exactly (lerp weight 1 - 3e-30 rounds to 1), but from step 2
    # the decay is not 0, so v_old comes from its own pass; rate 0 reuses the trained pass's velocity throughout.
    runs = {}
    for rate in ("0", "1e-30"):
        cfg = tiny_run(*FORWARD, "train.max_steps=3", f"train.old_decay_rate={rate}", "train.sample_with_old=false",
                       "train.kl_beta=0.1", *REQUESTS["tiny-sd3"], trainer="diffusion_nft", out=tmp_path / rate)
        t = DiffusionNFTTrainer(cfg)
        swaps = []
        swapped = t.old.swapped
        t.old.swapped = lambda swaps=swaps, swapped=swapped: swaps.append(1) or swapped()
        t.train()
        runs[rate] = ([p.detach().clone() for p in t.params], len(swaps))
    (reused, reused_swaps), (separate, separate_swaps) = runs.values()
    assert reused_swaps == 0 < separate_swaps  # the old copy never swapped in at rate 0
    assert all(torch.equal(a, b) for a, b in zip(reused, separate, strict=True))  # and the same update


def test_nft_frozen_reference_runs_in_the_trained_pass_precision(tiny_run, tmp_path, request):
    # Full fine-tuning compares with a frozen copy of the denoiser, which accelerate did not prepare (so its forward
    # is not autocast): under bf16 it must run in the trained pass's autocast, or the KL to the reference is bf16
    # rounding noise before the weights have moved. One optimizer step per rollout: every micro-batch of step 0 sees
    # reference == trained weights, so the KL is exactly 0.
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # the process-wide state keeps the first mixed_precision otherwise
    request.addfinalizer(lambda: AcceleratorState._reset_state(True))
    cfg = tiny_run(*FORWARD, "train.max_steps=1", "model.finetune=full", "train.kl_beta=0.1",
                   "train.mixed_precision=bf16", *REQUESTS["tiny-sd3"], trainer="diffusion_nft")
    t = DiffusionNFTTrainer(cfg)
    assert t.ref_denoiser is not None
    history = t.train()
    assert history[0]["train/kl"] == 0.0 and history[0]["train/grad_norm"] > 0


def test_ema_without_warmup_blends_at_the_fixed_decay():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    ema = EMA([p], 0.9, warmup=False)
    with torch.no_grad():
        p.add_(10.0)
    ema.update(0)  # flow_grpo's warm-up would use min(0.9, 1/10) = 0.1 here
    torch.testing.assert_close(ema.shadow[0], torch.tensor([0.9 * 1 + 0.1 * 11, 0.9 * 2 + 0.1 * 12]))
    warm = EMA([p], 0.9)
    warm.update(0)
    torch.testing.assert_close(warm.shadow[0], p.detach())  # 0.1 * 11 + 0.9 * 11


def test_sample_with_ema_rolls_out_with_the_ema_and_keeps_the_live_weights(tiny_run, tmp_path):
    cfg = tiny_run(*FORWARD, "train.ema.decay=0.9", "train.sample_with_ema=true", *REQUESTS["tiny-sd3"],
                   trainer="flow_rwr")
    t = FlowRWRTrainer(cfg)
    with torch.no_grad():  # the live weights leave the EMA's (which starts at the loaded weights)
        for p in t.params:
            p.add_(0.05 * torch.randn_like(p))
    live = [p.detach().clone() for p in t.params]
    with_ema = t.rollout_step(0).ro.traj.final
    assert all(torch.equal(a, p) for a, p in zip(live, t.params, strict=True))  # restored after the rollout
    t.cfg.train.sample_with_ema = False
    own = t.rollout_step(0).ro.traj.final
    with t.ema.swapped():
        teacher = t.rollout_step(0).ro.traj.final
    assert torch.equal(with_ema, teacher) and not torch.allclose(with_ema, own)


def test_rwr_positive_with_no_spread_trains_nothing(tiny_run, tmp_path):
    # Every group ties: no sample is above its group's mean, so the step keeps none and leaves the weights alone.
    cfg = tiny_run(*FORWARD, "train.max_steps=1", "train.weighting=positive", *REQUESTS["tiny-sd3"],
                   "rewards={tests.helpers.toy_rewards.Constant: 1.0}", trainer="flow_rwr")
    t = FlowRWRTrainer(cfg)
    before = [p.detach().clone() for p in t.params]
    assert t.train()[0]["trained_fraction"] == 0.0
    assert all(torch.equal(b, p) for b, p in zip(before, t.params, strict=True))


def test_sample_with_ema_resumes_bit_identically(tiny_run, tmp_path):
    # The rollouts come from the EMA, so resuming must restore it exactly (fixed decay, no warm-up count to lose).
    extra = ["train.max_steps=3", "train.ema.decay=0.5", "train.ema.warmup=false", "train.sample_with_ema=true",
             "train.weighting=positive", *REQUESTS["tiny-sd3"]]
    FlowRWRTrainer(tiny_run(*FORWARD, *extra, trainer="flow_rwr", out=tmp_path / "a")).train()
    FlowRWRTrainer(tiny_run(*FORWARD, *extra, trainer="flow_rwr", out=tmp_path / "b")).train(stop_after=1)
    FlowRWRTrainer(tiny_run(*FORWARD, *extra, trainer="flow_rwr", out=tmp_path / "b")).train()
    a, b = _final_weights(tmp_path / "a", 3), _final_weights(tmp_path / "b", 3)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("trainer, extra, message", [
    ("flow_rwr", [], "needs train.ema.decay"),
    ("diffusion_nft", ["train.ema.decay=0.9"], "sample_with_old and train.sample_with_ema"),
])
def test_sample_with_ema_needs_one_ema_policy(tiny_run, trainer, extra, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        tiny_run(*FORWARD, "train.sample_with_ema=true", *extra, trainer=trainer)


def _micro(group_noise, batch_size, groups, k=2, step=5):
    cfg = SimpleNamespace(train=ForwardTrainConfig(group_noise=group_noise, timesteps_per_sample=k,
                                                   train_batch_size=batch_size, min_sigma=0.5),
                          run=SimpleNamespace(seed=0))
    t = ForwardTrainer.__new__(ForwardTrainer)
    t.cfg, t.accelerator = cfg, SimpleNamespace(process_index=0)
    micro, draw = t.noise_plan(len(groups), step, torch.linspace(1, 0, 11), groups)
    sigma, noise = {}, {}
    for mb in micro:
        n = draw(mb.idx, mb.slot, (len(mb.idx), 3, 4, 4))
        for p, si, ni in zip(mb.idx.tolist(), mb.sigma, n, strict=True):
            sigma[p, mb.slot], noise[p, mb.slot] = float(si), ni
    return sigma, noise


def test_group_noise_shares_levels_and_noise_within_a_group_only():
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    sigma, noise = _micro(True, 3, groups)
    for j in range(2):
        for a in range(8):
            for b in range(8):
                same = bool(groups[a] == groups[b])
                assert (sigma[a, j] == sigma[b, j] and torch.equal(noise[a, j], noise[b, j])) or not same
                assert not torch.equal(noise[a, j], noise[b, j]) or same
        assert all(s >= 0.5 for s in sigma.values())
    assert not torch.equal(noise[0, 0], noise[0, 1])  # the two slots of a sample differ
    # A pure function of (seed, step, group, slot): another chunking (or process split) draws the same.
    sigma2, noise2 = _micro(True, 5, groups)
    assert sigma2 == sigma and all(torch.equal(noise[key], noise2[key]) for key in noise)
    # Off (the default), every sample has its own noise.
    _, own = _micro(False, 3, groups)
    assert not torch.equal(own[0, 0], own[1, 0])


def test_group_noise_cancels_a_signal_free_nft_gradient(tiny_run, tmp_path):
    # Identical clips in each group (shared initial noise, ODE) scored differently by their batch position: the
    # advantages sum to zero per group, so with the group's noise shared the NFT gradient is zero; with each
    # sample's own noise it is not. 8 samples in micro-batches of 3, 3, 2: it also needs every sample weighed alike.
    norms = {}
    for shared in (False, True):
        cfg = tiny_run(*FORWARD, "train.max_steps=1", "sampling.same_noise_per_group=true",
                       f"train.group_noise={str(shared).lower()}", *REQUESTS["tiny-sd3"],
                       "rewards={tests.helpers.toy_rewards.BatchPosition: 1.0}", trainer="diffusion_nft",
                       out=tmp_path / str(shared))
        norms[shared] = DiffusionNFTTrainer(cfg).train()[0]["train/grad_norm"]
    assert norms[False] > 0 and norms[True] < 1e-4 * norms[False]


def test_dpo_refuses_group_noise(tiny_run, tmp_path):
    with pytest.raises(ValueError, match="group_noise"):
        tiny_run(*FORWARD, "train.group_noise=true", trainer="flow_dpo")


# ---- offline DPO ---------------------------------------------------------------------------------------------------

def _pair_file(tmp_path, rows, size=32):
    (tmp_path / "img").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{name}.png")
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_offline_dpo_trains_from_real_image_files(tiny_run, tmp_path):
    rows = [{"prompt": "a red circle", "chosen": "img/a.png", "rejected": "img/b.png"},
            {"prompt": "two blue squares", "chosen": "img/c.png", "rejected": "img/a.png"}]
    path = _pair_file(tmp_path, rows)
    wc = tmp_path / "w.safetensors"
    WorldAdapter.random(0).save_pretrained(wc)
    cfg = tiny_run(*FORWARD, "train.mode=offline", f"train.pairs={path}", "train.pairs_per_step=2",
                   "model.finetune=full", "model.height=32", "model.width=32", f"model.path={wc}", "rewards={}",
                   trainer="flow_dpo", model="world", out=tmp_path / "run")
    t = FlowDPOTrainer(cfg)
    before = [p.detach().clone() for p in t.params]
    history = t.train()
    assert history[0]["train/dpo_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert any(not torch.equal(b, p) for b, p in zip(before, t.params, strict=True))


def test_dpo_ties_loss_by_hand():
    from visalign.trainers.losses import dpo_ties_loss

    err_w, err_l = torch.tensor([0.2, 0.5]), torch.tensor([0.6, 0.5])
    ref_w, ref_l = torch.tensor([0.4, 0.3]), torch.tensor([0.4, 0.3])
    beta, eta = 10.0, math.log(2)
    # margins: d0 = -5 * ((0.2-0.4) - (0.6-0.4)) = 2.0 (decided); d1 = -5 * (0.2 - 0.2) = 0 (tie)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    win = -math.log(sig(2.0 - eta))
    tie = -math.log((math.exp(2 * eta) - 1) * sig(-eta) * sig(-eta))  # = -log(1/3) at eta = log 2, d = 0
    assert tie == pytest.approx(math.log(3))
    loss, m = dpo_ties_loss(err_w, err_l, ref_w, ref_l, beta, torch.tensor([False, True]), eta)
    assert loss.item() == pytest.approx((win + tie) / 2, rel=1e-6)
    assert m["tie_fraction"] == 0.5 and m["implicit_accuracy"] == 1.0
    # A tie's loss is lowest at margin 0 and symmetric: it pulls towards "equal", not towards either side.
    f = lambda d: dpo_ties_loss(torch.tensor([0.0]), torch.tensor([2 * d / beta]), torch.zeros(1), torch.zeros(1),  # noqa: E731
                                beta, torch.tensor([True]), eta)[0].item()
    assert f(0.0) < f(0.5) == pytest.approx(f(-0.5)) and f(0.5) < f(1.0)


def _tie_run(tiny_run, tmp_path, ties, *extra):
    rows = [{"prompt": "a red circle", "chosen": "img/a.png", "rejected": "img/b.png"},
            {"prompt": "two blue squares", "chosen": "img/c.png", "rejected": "img/a.png", "tie": True}]
    path = _pair_file(tmp_path, rows)
    wc = tmp_path / "w.safetensors"
    WorldAdapter.random(0).save_pretrained(wc)
    return tiny_run(*FORWARD, "train.mode=offline", f"train.pairs={path}", "train.pairs_per_step=2",
                    "model.finetune=full", "model.height=32", "model.width=32", f"model.path={wc}", "rewards={}",
                    "train.max_steps=1", f"train.ties={ties}", *extra, trainer="flow_dpo", model="world",
                    out=tmp_path / f"run-{ties}")


def test_offline_dpo_drops_ties_by_default_and_counts_them(tiny_run, tmp_path, capsys):
    t = FlowDPOTrainer(_tie_run(tiny_run, tmp_path, "drop"))
    assert [p.prompt for p in t.pairs] == ["a red circle"]
    assert "dropped 1 tie pair(s) of 2" in capsys.readouterr().out
    assert t.train()[0]["pairs_ties_dropped"] == 1
    only_ties = tmp_path / "ties"
    only_ties.mkdir()
    path = _pair_file(only_ties, [{"prompt": "p", "chosen": "img/a.png", "rejected": "img/b.png", "tie": True}])
    with pytest.raises(ValueError, match="every pair is a tie"):
        FlowDPOTrainer(_tie_run(tiny_run, tmp_path, "drop", f"train.pairs={path}"))


def test_offline_dpo_trains_ties_with_rao_kupper(tiny_run, tmp_path):
    history = FlowDPOTrainer(_tie_run(tiny_run, tmp_path, "rao_kupper")).train()
    # At step 0 the policy is the reference, so every margin is 0: a decided pair's -log sigmoid(-log 2) and a
    # tie's -log(3 sigmoid(-log 2)^2) are both log 3 (a win, a loss and a tie equally likely).
    assert history[0]["train/dpo_loss"] == pytest.approx(math.log(3), abs=1e-5)
    assert "train/tie_fraction" in history[0]
    with pytest.raises(ValueError, match="tie_eta"):
        _tie_run(tiny_run, tmp_path, "rao_kupper", "train.tie_eta=0")


@pytest.mark.parametrize("row, message", [
    ({"prompt": "p", "chosen": "img/a.png", "rejected": "img/missing.png"}, r"pairs.jsonl:2: 'rejected' image"),
    ({"prompt": "p", "chosen": "img/a.png", "rejected": "img/b.png", "tie": "maybe"}, r"pairs.jsonl:2: 'tie' must"),
])
def test_offline_dpo_stops_on_a_malformed_row_before_any_model_loads(tiny_run, row, message, tmp_path, monkeypatch):
    good = {"prompt": "p", "chosen": "img/a.png", "rejected": "img/b.png"}
    path = _pair_file(tmp_path, [good, row])
    import visalign.models

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the pair file was checked")

    monkeypatch.setattr(visalign.models, "load_model", no_model)
    cfg = tiny_run(*FORWARD, "train.mode=offline", f"train.pairs={path}", "rewards={}", trainer="flow_dpo",
                   out=tmp_path / "run")
    with pytest.raises(PairFileError, match=message):
        FlowDPOTrainer(cfg)


def test_offline_dpo_rejects_images_of_the_wrong_size(tiny_run, tmp_path):
    path = _pair_file(tmp_path, [{"prompt": "p", "chosen": "img/a.png", "rejected": "img/b.png"}], size=16)
    cfg = tiny_run(*FORWARD, "train.mode=offline", f"train.pairs={path}", "rewards={}", *REQUESTS["tiny-sd3"],
                   trainer="flow_dpo", out=tmp_path / "run")
    with pytest.raises(PairFileError, match=r"pairs.jsonl:1: 'chosen' image is 16×16; the model trains at 32×32"):
        FlowDPOTrainer(cfg)


# ---- offline DPO on video pairs ---------------------------------------------------------------------------------

def _frames(n, size=16, seed=0):
    """n distinct frames [n, size, size, 3] of at most 27 colours (a GIF's palette holds them exactly)."""
    rng = np.random.default_rng(seed)
    return rng.choice(np.array([0, 128, 255], dtype=np.uint8), (n, size, size, 3))


def _write_video(path, frames):
    """An animated GIF (path ends in .gif) or a directory of zero-padded PNG frames, written in reverse order."""
    if path.suffix == ".gif":
        ims = [Image.fromarray(f) for f in frames]
        ims[0].save(path, save_all=True, append_images=ims[1:], duration=100, loop=0)
    else:
        path.mkdir(parents=True)
        for i in reversed(range(len(frames))):
            Image.fromarray(frames[i]).save(path / f"{i:05d}.png")
    return path


def _video_pair_file(tmp_path, rows):
    (tmp_path / "vid").mkdir(exist_ok=True)
    _write_video(tmp_path / "vid" / "a.gif", _frames(5, seed=0))
    _write_video(tmp_path / "vid" / "b", _frames(5, seed=1))
    _write_video(tmp_path / "vid" / "c.gif", _frames(5, seed=2))
    _write_video(tmp_path / "vid" / "short.gif", _frames(4, seed=3))
    _write_video(tmp_path / "vid" / "short_dir", _frames(3, seed=4))
    _write_video(tmp_path / "vid" / "small", _frames(5, size=8, seed=5))
    Image.fromarray(_frames(1)[0]).save(tmp_path / "vid" / "still.png")
    (tmp_path / "vid" / "clip.mp4").write_bytes(b"")
    (tmp_path / "vid" / "unpadded").mkdir()
    for i in (8, 9, 10, 11, 12):  # sorted names 10, 11, 12, 8, 9: not the frame order
        Image.fromarray(_frames(1)[0]).save(tmp_path / "vid" / "unpadded" / f"f{i}.png")
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_video_pairs_load_gifs_and_frame_directories_in_order(tmp_path):
    path = _video_pair_file(tmp_path, [{"prompt": "p", "chosen": "vid/a.gif", "rejected": "vid/b"}])
    (pair,) = read_pairs(path, size=(16, 16), num_frames=5)
    for file, seed in ((pair.chosen, 0), (pair.rejected, 1)):
        expected = torch.from_numpy(_frames(5, seed=seed)).permute(0, 3, 1, 2).float() / 255
        torch.testing.assert_close(load_video(file), expected, rtol=0, atol=0)
    with pytest.raises(PairFileError, match=r"pairs.jsonl:1: 'chosen' .*a.gif is a video; images are expected"):
        read_pairs(path)  # an image pair file (rewards eval, image models) refuses videos


def test_offline_dpo_trains_from_video_pairs(tiny_run, tmp_path):
    rows = [{"prompt": "a red circle moving left", "chosen": "vid/a.gif", "rejected": "vid/b"},
            {"prompt": "a blue square", "chosen": "vid/b", "rejected": "vid/c.gif"}]
    path = _video_pair_file(tmp_path, rows)
    cfg = tiny_run(*FORWARD, "train.mode=offline", f"train.pairs={path}", "train.pairs_per_step=2",
                   *REQUESTS["tiny-wan"], "rewards={}", trainer="flow_dpo", model="tiny-wan", out=tmp_path / "run")
    t = FlowDPOTrainer(cfg)
    x_w, x_l, *_ = t._offline_batch(0)
    assert x_w.shape == x_l.shape == (2, *t.adapter.latent_shape(16, 16, 5))  # [B, C, f, h, w]
    before = [p.detach().clone() for p in t.params]
    history = t.train()
    assert history[0]["train/dpo_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert any(not torch.equal(b, p) for b, p in zip(before, t.params, strict=True))


@pytest.mark.parametrize("rejected, message", [
    ("vid/short.gif", r"pairs.jsonl:2: 'rejected' video .*short.gif has 4 frames; the model trains on 5"),
    ("vid/short_dir", r"pairs.jsonl:2: 'rejected' video .*short_dir has 3 frames; the model trains on 5"),
    ("vid/small", r"pairs.jsonl:2: 'rejected' video .*small has frames of 8×8; the model trains at 16×16"),
    ("vid/missing", r"pairs.jsonl:2: 'rejected' video .*missing does not exist"),
    ("vid/still.png", r"pairs.jsonl:2: 'rejected' .*still.png is not a video"),
    ("vid/clip.mp4", r"pairs.jsonl:2: 'rejected' .*clip.mp4: .mp4 videos are not read"),
    ("vid/unpadded", r"pairs.jsonl:2: 'rejected' frame directory .*unpadded: sorted file names are not in"),
], ids=["gif-frames", "directory-frames", "size", "missing", "image", "mp4", "unpadded-names"])
def test_offline_dpo_stops_on_a_bad_video_row_before_any_model_loads(tiny_run, rejected, message, tmp_path,
                                                                     monkeypatch):
    good = {"prompt": "p", "chosen": "vid/a.gif", "rejected": "vid/b"}
    path = _video_pair_file(tmp_path, [good, {**good, "rejected": rejected}])
    import visalign.models

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the pair file was checked")

    monkeypatch.setattr(visalign.models, "load_model", no_model)
    cfg = tiny_run(*FORWARD, "train.mode=offline", f"train.pairs={path}", "rewards={}", *REQUESTS["tiny-wan"],
                   trainer="flow_dpo", model="tiny-wan", out=tmp_path / "run")
    with pytest.raises(PairFileError, match=message):
        FlowDPOTrainer(cfg)
