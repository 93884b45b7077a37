"""Flow-GRPO end to end on tiny models: on-policy exactness, resume, faults, LoRA / full fine-tuning."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from visalign.config import ConfigError
from visalign.prompts import prompt_source
from visalign.train import main as train_main
from visalign.trainers import load_train_config
from visalign.trainers.common import step_generator
from visalign.trainers.engine import lr_factor
from visalign.trainers.flow_grpo import FlowGRPOTrainer
from visalign.world.model import WorldAdapter


@pytest.fixture(scope="module")
def world_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("world") / "w.safetensors"
    WorldAdapter.random(0).save_pretrained(path)
    return str(path)


def test_first_inner_step_is_on_policy(tiny_run, world_ckpt, tmp_path):
    # sampling batches of 4, training micro-batches of 3: the ratio must still be exactly 1
    history = FlowGRPOTrainer(tiny_run(f"model.path={world_ckpt}", "train.max_steps=1", model="world")).train()
    assert history[0]["train/first_ratio_max_dev"] <= 1e-6
    assert history[0]["train/trained_timesteps"] == 3  # 4 SDE steps, the last never trained


def test_lr_factor_by_hand():
    assert [lr_factor(s, "linear", 0, 4) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert lr_factor(2, "cosine", 0, 4) == pytest.approx(0.5) and lr_factor(1, "cosine", 0, 4) == pytest.approx(
        0.5 * (1 + 2 ** -0.5))
    # warm-up 2 of 6 steps: 1/3, 2/3, then the decay starts from 1 over the remaining 4
    assert [lr_factor(s, "linear", 2, 6) for s in range(6)] == pytest.approx([1 / 3, 2 / 3, 1.0, 0.75, 0.5, 0.25])
    assert lr_factor(9, "constant", 2, 6) == 1.0 and lr_factor(9, "linear", 0, 6) == 0.0


def test_scheduled_lr_reaches_the_optimizer(tiny_run, world_ckpt, tmp_path):
    trainer = FlowGRPOTrainer(tiny_run(f"model.path={world_ckpt}", "train.lr_schedule=linear", model="world"))
    history = trainer.train()
    assert [h["train/lr"] for h in history] == pytest.approx([1e-3, 5e-4])
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)
    with pytest.raises(ValueError, match="lr_warmup_steps=2 must be < max_steps=2"):
        tiny_run("train.lr_warmup_steps=2", model="world")


def _final_weights(run):
    return load_file(str(run / "checkpoints" / "checkpoint-3" / "weights.safetensors"))


def test_reward_options_reach_the_reward_and_bad_ones_fail_at_config_time(tiny_run, world_ckpt, tmp_path):
    from visalign.rewards.artifact import ArtifactReward, save_artifact_model
    from visalign.rewards.quality import dead_leaves, fit_pristine, save_pristine

    pristine = fit_pristine(dead_leaves(16, size=32, seed=5))
    save_pristine(pristine, tmp_path / "pristine.safetensors")
    detector = ArtifactReward.tiny(seed=3).model
    weights = tmp_path / "artifact.safetensors"
    save_artifact_model(detector, weights, {})
    trained = "rewards={world-verifier: 1.0, artifact: 0.5}"
    cfg = tiny_run(f"model.path={world_ckpt}", "train.max_steps=1", trained, "eval_rewards=[quality-nss]",
                   f"reward_options={{artifact: {{weights: {weights}, batch_size: 7}}, "
                   f"quality-nss: {{pristine: {tmp_path / 'pristine.safetensors'}}}}}",
                   model="world", out=tmp_path / "run")
    trainer = FlowGRPOTrainer(cfg)
    reward = trainer.rewards["artifact"]
    assert reward.batch_size == 7  # an option of the Reward base class, passed on through **kwargs
    images = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(reward(images=images)["score"], ArtifactReward(model=detector)(images=images)["score"])
    # Held-out rewards take their options too.
    torch.testing.assert_close(trainer.eval_rewards["quality-nss"].pristine["mean"], pristine["mean"].double())
    # Misspelt reward names and options fail before any model loads, naming what is allowed.
    with pytest.raises(ValueError, match="'artifcat', which this recipe does not use"):
        tiny_run(trained, f"reward_options={{artifcat: {{weights: {weights}}}}}", model="world")
    with pytest.raises(ValueError, match=r"ArtifactReward takes no option \['weight'\]; it takes \['weights', 'model'"):
        tiny_run(trained, f"reward_options={{artifact: {{weight: {weights}}}}}", model="world")
    with pytest.raises(ConfigError, match=r"reward_options.artifact: expected dict\[str, Any\]"):
        tiny_run(trained, "reward_options={artifact: 3}", model="world")


@pytest.mark.parametrize("model, request_overrides", [
    ("tiny-sd3", []),
    ("tiny-wan", ["model.height=16", "model.width=16", "model.num_frames=5",
                  "rewards={tests.helpers.toy_rewards.MeanBrightness: 1.0}"]),  # world-verifier scores images only
], ids=["tiny-sd3", "tiny-wan"])
def test_resume_is_bit_identical(tiny_run, model, request_overrides, tmp_path):
    extra = ["train.max_steps=3", "train.kl_beta=0.01", "train.ema.decay=0.9", "model.lora_rank=4",
             "train.lr_schedule=cosine", "train.lr_warmup_steps=1", *request_overrides]
    FlowGRPOTrainer(tiny_run(*extra, model=model, out=tmp_path / "a")).train()
    FlowGRPOTrainer(tiny_run(*extra, model=model, out=tmp_path / "b")).train(stop_after=1)  # "killed" after step 1
    assert not (tmp_path / "b" / "final").exists()
    resumed = FlowGRPOTrainer(tiny_run(*extra, model=model, out=tmp_path / "b")).train()
    assert [h["step"] for h in resumed] == [1, 2]
    a, b = _final_weights(tmp_path / "a"), _final_weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lora_a = load_file(str(tmp_path / "a" / "final" / "pytorch_lora_weights.safetensors"))
    lora_b = load_file(str(tmp_path / "b" / "final" / "pytorch_lora_weights.safetensors"))
    assert all(torch.equal(lora_a[k], lora_b[k]) for k in lora_a)


def test_corrupted_checkpoint_is_detected_and_previous_stays_usable(tiny_run, world_ckpt, tmp_path):
    FlowGRPOTrainer(tiny_run("train.max_steps=2", "run.checkpoints_total_limit=3", model="tiny-sd3")).train()
    latest = tmp_path / "checkpoints" / "checkpoint-2" / "optimizer.safetensors"
    latest.write_bytes(latest.read_bytes()[:100])  # truncate
    named = tmp_path / "checkpoints" / "checkpoint-2"
    with pytest.raises(ValueError, match="checkpoint-2: file optimizer.safetensors is corrupted or truncated"):
        FlowGRPOTrainer(tiny_run("train.max_steps=3", f"run.resume_from={named}", model="tiny-sd3")).train()
    # `latest` passes over it to the newest intact checkpoint
    history = FlowGRPOTrainer(tiny_run("train.max_steps=3", model="tiny-sd3")).train()
    assert [h["step"] for h in history] == [1, 2]


def test_nan_rewards_are_dropped_and_counted(tiny_run, world_ckpt, tmp_path):
    cfg = tiny_run(f"model.path={world_ckpt}", "train.max_steps=1",
                   "rewards={tests.helpers.toy_rewards.NaNForRedPrompts: 1.0}", model="world")
    trainer = FlowGRPOTrainer(cfg)
    before = [p.detach().clone() for p in trainer.params]
    history = trainer.train()
    red = 4 * sum("red" in it.text for it in trainer.source.draw(2, step_generator(0, 0, 1)))
    assert history[0]["invalid_rewards"] == red
    assert all(torch.isfinite(p).all() for p in trainer.params)
    if red < 8:
        assert any(not torch.equal(a, p) for a, p in zip(before, trainer.params, strict=True))


def test_a_step_with_no_valid_reward_is_skipped_not_trained(tiny_run, world_ckpt, tmp_path):
    cfg = tiny_run(f"model.path={world_ckpt}", "train.max_steps=1",
                   "rewards={tests.helpers.toy_rewards.AlwaysNaN: 1.0}", model="world")
    trainer = FlowGRPOTrainer(cfg)
    before = [p.detach().clone() for p in trainer.params]
    history = trainer.train()
    assert history[0]["skipped"] == 1 and math.isnan(history[0]["rewards/tests.helpers.toy_rewards.AlwaysNaN/mean"])
    assert all(torch.equal(a, p) for a, p in zip(before, trainer.params, strict=True))


def test_config_errors_before_any_model_loads(tmp_path, capsys):
    with pytest.raises(ConfigError, match="train.lrr"):
        load_train_config(None, ["train.lrr=1"])
    with pytest.raises(ValueError, match="unknown reward 'pickscorez'"):
        load_train_config(None, ["rewards={pickscorez: 1.0}"])
    with pytest.raises(ValueError, match="unknown trainer 'ppo'; allowed: flow_grpo"):
        load_train_config(None, ["trainer=ppo"])
    assert train_main(["/no/such.yaml"]) == 2 and "config file not found" in capsys.readouterr().err


@pytest.mark.parametrize("model, request_overrides", [
    ("tiny-sd3", ["model.height=32", "model.width=32"]),
    ("tiny-flux", ["model.height=32", "model.width=32", "sampling.guidance=1.0"]),
    ("tiny-wan", ["model.height=16", "model.width=16", "model.num_frames=5"]),
])
@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_tiny_models_train_two_steps(tiny_run, model, request_overrides, finetune, tmp_path):
    cfg = tiny_run(f"model.finetune={finetune}", "model.lora_rank=4", "train.kl_beta=0.1",
                   "rewards={tests.helpers.toy_rewards.MeanBrightness: 1.0}", *request_overrides, model=model)
    trainer = FlowGRPOTrainer(cfg)
    named = dict(trainer.adapter.denoiser.named_parameters())
    before = {n: p.detach().clone() for n, p in named.items()}
    trainable = {n for n, p in named.items() if p.requires_grad}
    trainer.train()
    changed = {n for n, p in named.items() if not torch.equal(before[n], p.detach())}
    assert changed and changed <= trainable
    if finetune == "lora":
        assert all("lora_" in n for n in trainable)
    else:
        assert trainable == set(named)
    text = [p for p in (getattr(trainer.adapter.pipe, "text_encoder", None) or torch.nn.Linear(1, 1)).parameters()]
    assert not any(p.requires_grad for p in text)


def test_fast_window_cps_shared_noise_best_of_n(tiny_run, world_ckpt, tmp_path):
    cfg = tiny_run(f"model.path={world_ckpt}", "sampling.sde=cps", "sampling.noise_level=0.8", "sampling.window_size=2",
                   "sampling.window_range=[0, 3]", "sampling.same_noise_per_group=true", "train.advantage.best_of_n=2",
                   "train.max_steps=1", model="world")
    trainer = FlowGRPOTrainer(cfg)
    history = trainer.train()
    assert history[0]["train/trained_timesteps"] <= 2
    assert history[0]["trained_fraction"] <= 0.5  # best-of-2 of 4 keeps half at most
    assert history[0]["train/first_ratio_max_dev"] <= 1e-6


def test_metrics_and_outputs(tiny_run, world_ckpt, tmp_path):
    cfg = tiny_run(f"model.path={world_ckpt}", "run.eval_every=2", "run.eval_num_prompts=4", "run.eval_steps=2",
                   "eval_rewards=[world-cleanliness]", "run.log_with=tensorboard", "run.checkpoint_every=2",
                   model="world")
    FlowGRPOTrainer(cfg).train()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    last = lines[-1]
    for key in ("rewards/world-verifier/mean", "heldout/world-cleanliness/mean", "train/kl", "train/grad_norm",
                "drift/clip_fraction", "zero_std_fraction", "time/sampling", "eval/world-verifier/mean"):
        assert key in last
    assert (tmp_path / "samples" / "step_000002.png").exists()
    assert list((tmp_path / "logs").rglob("events.out.tfevents*"))
    assert (tmp_path / "final" / "pytorch_lora_weights.safetensors").exists()
    fresh = WorldAdapter.from_pretrained(world_ckpt)
    fresh.load_lora(tmp_path / "final")  # exported LoRA loads into a fresh model


def test_grpo_guard_option_trains_on_policy(tiny_run, world_ckpt, tmp_path):
    history = FlowGRPOTrainer(tiny_run("train.grpo_guard=true", "train.clip_range=2e-6", "train.max_steps=1",
                                       "rewards={tests.helpers.toy_rewards.MeanBrightness: 1.0}",
                                       model="tiny-sd3")).train()
    assert history[0]["train/first_ratio_max_dev"] <= 1e-6 and history[0]["train/grad_norm"] > 0


def test_world_prompt_source_templates():
    source = prompt_source("world:seen:count,position")
    items = source.draw(50, step_generator(0, 0))
    assert {it.metadata["spec"].template for it in items} == {"count", "position"}
    with pytest.raises(ValueError, match="prompts='world:seen:colour': unknown templates \\['colour'\\]"):
        prompt_source("world:seen:colour")
    with pytest.raises(ValueError, match="allowed world splits are seen, heldout"):
        prompt_source("world:train")


def test_reward_drift_rollouts_stay_on_policy(tiny_run, world_ckpt, tmp_path):
    extra = ["train.max_steps=1", "sampling.drift.scale=50.0", "sampling.drift.rewards={world-soft: 1.0}",
             "sampling.drift.normalize=sample"]
    trainer = FlowGRPOTrainer(tiny_run(f"model.path={world_ckpt}", *extra, model="world"))
    rs = trainer.rollout_step(0)
    drifts = rs.ro.traj.drifts
    # The shift is lam * std^2 * g / ||g||: its per-sample norm is exactly lam * std^2 on every SDE step.
    norms = drifts.flatten(2).norm(dim=2)
    expected = 50.0 * rs.ro.traj.stds**2
    torch.testing.assert_close(norms, expected, atol=1e-4, rtol=1e-4)
    assert norms[:, :3].min() > 0
    history = FlowGRPOTrainer(tiny_run(f"model.path={world_ckpt}", *extra, model="world", out=tmp_path / "b")).train()
    assert history[0]["train/first_ratio_max_dev"] <= 1e-6


@pytest.mark.parametrize("extra, match", [
    (["sampling.drift.scale=1.0"], "world-verifier is not"),  # the trained reward is not differentiable
    (["sampling.drift.scale=1.0", "sampling.drift.rewards={world-soft: 1.0}", "sampling.drift.window=[3, 2]"],
     r"sampling\.drift: window"),
    (["sampling.drift.scale=-1.0"], r"sampling\.drift\.scale=-1\.0 must be >= 0"),
])
def test_reward_drift_config_errors(tiny_run, tmp_path, extra, match):
    with pytest.raises(ConfigError, match=match):
        tiny_run("model.path=/nonexistent/never/loaded.safetensors", *extra, model="world")


def test_coarse_noise_rollouts_stay_on_policy_and_train(tiny_run, world_ckpt, tmp_path):
    from visalign.sampling.steps import block_project

    cfg = tiny_run(f"model.path={world_ckpt}", "sampling.noise_block=8", "sampling.same_noise_per_group=true",
                   "train.max_steps=1", model="world")
    trainer = FlowGRPOTrainer(cfg)
    before = [p.detach().clone() for p in trainer.adapter.trainable_parameters()]
    rs = trainer.rollout_step(0)
    traj = rs.ro.traj
    residual = traj.latents[:, 1:4] - traj.means[:, :3]          # the SDE steps' noise: constant on 8×8 tiles
    torch.testing.assert_close(block_project(residual, 8), residual, atol=1e-6, rtol=0)
    history = trainer.train()
    assert history[0]["train/first_ratio_max_dev"] <= 1e-6
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.adapter.trainable_parameters(), strict=True))


def test_noise_block_config_error(tiny_run, tmp_path):
    with pytest.raises(ConfigError, match="noise_block"):
        tiny_run("model.path=/nonexistent/never/loaded.safetensors", "sampling.noise_block=0", model="world")
