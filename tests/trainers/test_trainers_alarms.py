"""Reward-hacking alarm on synthetic curves and in a training run; bootstrap intervals and paired deltas."""

import json

import pytest
import torch

from visalign.eval.stats import bootstrap_mean_ci, paired_delta
from visalign.trainers.alarms import AlarmMonitor, check_alarm


def test_alarm_fires_when_trained_rises_and_heldout_falls():
    steps = [0, 10, 20, 30, 40]
    trained = [0.50, 0.55, 0.62, 0.70, 0.75]
    heldout = {"strict": [0.50, 0.51, 0.49, 0.44, 0.40], "diversity": [0.30, 0.30, 0.29, 0.30, 0.30]}
    alarm = check_alarm(steps, trained, heldout, tolerance=0.05)
    assert alarm.step == 30 and alarm.signal == "strict"
    assert alarm.trained_rise == pytest.approx(0.20) and alarm.signal_drop == pytest.approx(0.06)
    assert "strict fell 0.060" in alarm.message()


def test_alarm_stays_quiet_when_signals_move_together_or_the_reward_does_not_rise():
    steps = [0, 10, 20, 30]
    assert check_alarm(steps, [0.5, 0.6, 0.7, 0.8], {"strict": [0.5, 0.58, 0.66, 0.75]}, tolerance=0.02) is None
    # Held-out falling but the trained reward flat: degradation, not hacking.
    assert check_alarm(steps, [0.5, 0.5, 0.49, 0.5], {"strict": [0.5, 0.4, 0.3, 0.2]}, tolerance=0.02) is None
    # A minimum rise is required when asked.
    assert check_alarm(steps, [0.5, 0.52, 0.53, 0.54], {"s": [0.5, 0.4, 0.3, 0.2]}, tolerance=0.02, rise=0.1) is None


def test_alarm_window_ignores_one_noisy_point_and_directions_flip_signals():
    steps = list(range(6))
    trained = [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    noisy = {"strict": [0.5, 0.5, 0.3, 0.5, 0.5, 0.5]}
    assert check_alarm(steps, trained, noisy, tolerance=0.1) is not None
    assert check_alarm(steps, trained, noisy, tolerance=0.1, window=3) is None
    # An artifact rate where lower is better: rising means worse.
    artifacts = {"artifact_rate": [0.1, 0.1, 0.15, 0.2, 0.3, 0.4]}
    alarm = check_alarm(steps, trained, artifacts, tolerance=0.05, directions={"artifact_rate": -1})
    assert alarm.step == 3 and alarm.signal_drop == pytest.approx(0.1)
    with pytest.raises(ValueError, match="one value per evaluation"):
        check_alarm([0, 1], [0.1], {}, tolerance=0.1)


def test_alarm_monitor_accumulates_and_restores():
    m = AlarmMonitor(tolerance=0.05)
    assert m.update(0, 0.5, {"strict": 0.5}) is None
    assert m.update(10, 0.7, {"strict": 0.48}) is None
    alarm = m.update(20, 0.8, {"strict": 0.40})
    assert alarm is not None and alarm.step == 20
    again = AlarmMonitor(tolerance=0.05)
    again.load_state_dict(m.state_dict())
    assert again.fired.step == 20
    with pytest.raises(ValueError, match="held-out signals changed"):
        m.update(30, 0.9, {"other": 0.1})


def test_bootstrap_interval_and_paired_delta():
    mean, low, high = bootstrap_mean_ci([1.0] * 10)
    assert (mean, low, high) == (1.0, 1.0, 1.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, generator=g)
    mean, low, high = bootstrap_mean_ci(x, seed=1)
    assert low < mean < high and high - low == pytest.approx(2 * 1.96 / 20, rel=0.2)
    a = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    b = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0])
    d = paired_delta(a, b)
    assert d["delta"] == pytest.approx(3 / 8) and d["wins"] == pytest.approx(3 / 8) and d["losses"] == 0.0
    assert d["low"] >= 0.0 and d["high"] <= 0.75 and d["n"] == 8
    with pytest.raises(ValueError, match="one value per item"):
        paired_delta([1.0], [1.0, 2.0])


def test_training_run_fires_the_alarm_and_stops(tmp_path):
    from visalign.trainers import load_train_config
    from visalign.trainers.flow_grpo import FlowGRPOTrainer

    over = [f"run.out_dir={tmp_path}", "model.name=tiny-sd3", "model.height=32", "model.width=32",
            "train.max_steps=6", "train.prompts_per_step=2", "train.group_size=4", "train.train_batch_size=4",
            "sampling.batch_size=8", "sampling.steps=4", "sampling.guidance=1.0", "run.log_with=none",
            "run.progress=false", "run.checkpoint_every=100", "train.lr=3e-2", "model.finetune=full",
            "run.eval_every=1", "run.eval_num_prompts=4", "run.eval_steps=4",
            "rewards={tests.helpers.toy_rewards.MeanBrightness: 1.0}",
            "eval_rewards=[tests.helpers.toy_rewards.Darkness]", "run.alarm.tolerance=0.0",
            "run.alarm.action=stop"]
    history = FlowGRPOTrainer(load_train_config(None, over)).train()
    brightness = [h["eval/tests.helpers.toy_rewards.MeanBrightness/mean"] for h in history]
    # Darkness is 1 - brightness: the alarm fires at the first evaluation where brightness is above its start.
    first_rise = next(i for i, v in enumerate(brightness) if v > brightness[0])
    assert history[first_rise]["alarm/fired"] == 1 and len(history) == first_rise + 1 < 6
    assert (tmp_path / "alarms.jsonl").is_file()


def test_alarm_rollback_restores_the_best_checkpoint(tmp_path):
    from safetensors.torch import load_file

    from visalign.trainers import load_train_config
    from visalign.trainers.flow_grpo import FlowGRPOTrainer

    over = [f"run.out_dir={tmp_path}", "model.name=tiny-sd3", "model.height=32", "model.width=32",
            "train.max_steps=8", "train.prompts_per_step=2", "train.group_size=4", "train.train_batch_size=4",
            "sampling.batch_size=8", "sampling.steps=4", "sampling.guidance=1.0", "run.log_with=none",
            "run.progress=false", "run.checkpoint_every=1", "run.checkpoints_total_limit=null", "train.lr=3e-2",
            "model.finetune=full", "run.eval_every=1", "run.eval_num_prompts=4", "run.eval_steps=4",
            "rewards={tests.helpers.toy_rewards.MeanBrightness: 1.0}",
            "eval_rewards=[tests.helpers.toy_rewards.Darkness]", "run.alarm.tolerance=0.0",
            "run.alarm.action=rollback"]
    trainer = FlowGRPOTrainer(load_train_config(None, over))
    history = trainer.train()
    dark = [h["eval/tests.helpers.toy_rewards.Darkness/mean"] for h in history]
    fired = len(history)
    assert history[-1]["alarm/fired"] == 1 and fired < 8
    # Restored: the evaluated checkpoint with the most darkness (the signal that fell), earliest on ties.
    best_step = max(range(fired), key=lambda i: (dark[i], -i)) + 1
    assert trainer.state.step == best_step
    record = [json.loads(line) for line in (tmp_path / "alarms.jsonl").read_text().splitlines()]
    assert record[-1]["rolled_back_to"].endswith(f"checkpoint-{best_step}")
    saved = load_file(str(tmp_path / "checkpoints" / f"checkpoint-{best_step}" / "weights.safetensors"))
    final = load_file(str(tmp_path / "final" / "denoiser" / "diffusion_pytorch_model.safetensors"))
    live = trainer.adapter.denoiser.state_dict()
    assert saved.keys() <= final.keys() and len(saved) > 0  # checkpoints hold the trained weights (no buffers)
    assert all(torch.equal(saved[k], live[k].cpu()) and torch.equal(final[k], saved[k]) for k in saved)
