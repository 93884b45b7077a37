"""Drift diagnostics (`drift/*`): their values against a direct computation on the rollout and the losses, the
alarm's watch on them (synthetic curves, config checks, a run that trains brightness up), and the evaluation
images in TensorBoard."""

import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from visalign.config import ConfigError
from visalign.media import preview_image
from visalign.trainers import flow_grpo, load_train_config
from visalign.trainers.alarms import AlarmMonitor, DriftAlarm, check_drift
from visalign.trainers.diagnostics import loss_drift, reduce_drift
from visalign.trainers.dpo import FlowDPOTrainer
from visalign.trainers.engine import log_samples
from visalign.trainers.flow_grpo import FlowGRPOTrainer
from visalign.world.model import WorldAdapter

FAST = ("run.eval_num_prompts=2", "run.eval_steps=2", "sampling.guidance=1.0")


def _rms(x: torch.Tensor) -> torch.Tensor:
    """Per-row RMS of [..., D]."""
    return x.double().pow(2).mean(-1).sqrt()


def _by_hand(images, latents, x0_preds, sigmas, groups) -> dict[str, float]:
    """The rollout diagnostics written out: RMS norms per sample and step, Rec. 601 luma, HSV (max - min) / max,
    the mean over ordered pairs i != j of a group of the RMS pixel distance."""
    b, n = x0_preds.shape[:2]
    x0 = x0_preds.reshape(b, n, -1)
    v = (latents[:, :-1].reshape(b, n, -1) - x0) / sigmas[:-1].view(1, n, 1)
    rgb = images.double()
    luma = 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]
    hi, lo = rgb.max(dim=1).values, rgb.min(dim=1).values
    per_group = []
    for g in groups.unique():
        x = rgb[groups == g].flatten(1)
        pairs = [_rms(x[i] - x[j]) for i in range(len(x)) for j in range(len(x)) if i != j]
        per_group.append(sum(pairs) / len(pairs))
    return {"drift/x0_norm": _rms(x0).mean().item(), "drift/velocity_norm": _rms(v).mean().item(),
            "drift/brightness": luma.mean().item(), "drift/saturation": ((hi - lo) / (hi + 1e-6)).mean().item(),
            "drift/diversity": (sum(per_group) / len(per_group)).item()}


def test_metrics_hold_the_drift_diagnostics_of_the_rollout_and_the_ratio(tiny_run, tmp_path, monkeypatch):
    # Two optimizer steps per rollout at a high lr: the second half's ratios leave 1 and some are clipped.
    cfg = tiny_run("train.optimizer_steps_per_rollout=2", "train.lr=3e-2", "model.finetune=full",
                   "train.clip_range=0.05", "rewards={brightness: 1.0}")
    trainer = FlowGRPOTrainer(cfg)
    rollouts, ratios = [], []
    rollout_step = trainer.rollout_step
    monkeypatch.setattr(trainer, "rollout_step", lambda step: rollouts.append(rollout_step(step)) or rollouts[-1])
    grpo_loss = flow_grpo.grpo_loss

    def recording(log_prob, old_log_prob, *args, mask=None, **kwargs):
        ratios.append((trainer.state.step, torch.exp(log_prob - old_log_prob).detach()[mask]))
        return grpo_loss(log_prob, old_log_prob, *args, mask=mask, **kwargs)

    monkeypatch.setattr(flow_grpo, "grpo_loss", recording)
    trainer.train()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == len(rollouts) == 2
    for step, (line, rs) in enumerate(zip(lines, rollouts, strict=True)):
        traj = rs.ro.traj
        want = _by_hand(rs.ro.images, traj.latents, traj.x0_preds, traj.sigmas, rs.plan.groups)
        for name, value in want.items():
            assert line[name] == pytest.approx(value, rel=1e-5), name
        kept = [r for s, r in ratios if s == step and len(r)]
        assert line["drift/ratio_min"] == pytest.approx(min(r.min().item() for r in kept))
        assert line["drift/ratio_max"] == pytest.approx(max(r.max().item() for r in kept))
        assert line["drift/ratio_mean"] == pytest.approx(sum(r.mean().item() for r in kept) / len(kept))
        assert line["drift/clip_fraction"] == pytest.approx(
            sum(((r - 1).abs() > 0.05).float().mean().item() for r in kept) / len(kept))
        assert "train/ratio_mean" not in line and "train/clip_fraction" not in line  # one name per statistic
    # Full fine-tuning at this lr moves the policy within a step: ratios off 1, some clipped.
    assert lines[0]["drift/ratio_min"] < 1 - 0.05 and lines[0]["drift/clip_fraction"] > 0
    assert lines[1]["drift/brightness"] != lines[0]["drift/brightness"]


def test_offline_dpo_logs_the_velocity_norm_of_its_training_pass(tiny_run, tmp_path, monkeypatch):
    (tmp_path / "img").mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{name}.png")
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"prompt": "a red circle", "chosen": "img/a.png",
                                                      "rejected": "img/b.png"}) + "\n")
    wc = tmp_path / "w.safetensors"
    WorldAdapter.random(0).save_pretrained(wc)
    cfg = tiny_run("sampling.sde=ode", "train.timesteps_per_sample=2", "train.mode=offline",
                   f"train.pairs={tmp_path / 'pairs.jsonl'}", "train.pairs_per_step=1", "train.max_steps=1",
                   f"model.path={wc}", "rewards={}", trainer="flow_dpo", model="world", out=tmp_path / "run")
    trainer = FlowDPOTrainer(cfg)
    trained: list[torch.Tensor] = []  # the live weights' velocities (the reference's run without gradient)
    errors = trainer.errors

    def recording(*args):
        err, v = errors(*args)
        if torch.is_grad_enabled():
            trained.append(v.detach())
        return err, v

    monkeypatch.setattr(trainer, "errors", recording)
    metrics = trainer.train()[0]
    per_micro = [_rms(torch.cat([v_w, v_l]).flatten(1)).mean().item()
                 for v_w, v_l in zip(trained[::2], trained[1::2], strict=True)]
    assert len(per_micro) == 2  # one pair x two noise levels
    assert metrics["drift/velocity_norm"] == pytest.approx(sum(per_micro) / 2, rel=1e-5)
    assert not any(k.startswith("drift/") and k != "drift/velocity_norm" for k in metrics)  # no rollout


def test_loss_and_process_reductions_by_hand():
    logs = {"ratio_mean": [1.0, 0.9, math.nan], "ratio_min": [0.8, 0.5, math.nan], "ratio_max": [1.2, 1.1, math.nan],
            "clip_fraction": [0.0, 0.5, math.nan], "policy_loss": [0.3, 0.1, 0.2]}
    assert loss_drift(logs) == pytest.approx({"drift/ratio_mean": 0.95, "drift/ratio_min": 0.5,
                                              "drift/ratio_max": 1.2, "drift/clip_fraction": 0.25})
    names = ("drift/brightness", "drift/ratio_min", "drift/ratio_max", "drift/x0_norm")
    rows = torch.tensor([[0.4, 0.9, 1.1, math.nan], [0.6, 0.7, 1.3, math.nan]])
    assert reduce_drift(rows, names) == pytest.approx({"drift/brightness": 0.5, "drift/ratio_min": 0.7,
                                                       "drift/ratio_max": 1.3})


def test_watch_fires_on_drift_either_way_with_window_and_gaps():
    steps = [10, 20, 30, 40]
    alarm = check_drift(steps, {"drift/brightness": [0.50, 0.55, 0.62, 0.70]}, {"drift/brightness": 0.1})
    assert alarm == DriftAlarm(30, "drift/brightness", 0.50, 0.62, 0.1)
    assert "moved +0.120" in alarm.message()
    down = check_drift(steps, {"drift/saturation": [0.5, 0.45, 0.38, 0.3]}, {"drift/saturation": 0.1})
    assert down.step == 30 and down.value == pytest.approx(0.38)
    # A moving average over 2 evaluations: 0.5, 0.525, 0.585 -> fires at 40 (0.66, 0.16 above 0.5).
    assert check_drift(steps, {"b": [0.50, 0.55, 0.62, 0.70]}, {"b": 0.1}, window=2).step == 40
    # A NaN point (nothing measured since the last evaluation) is left out; the first value is the first finite.
    assert check_drift(steps, {"b": [math.nan, 0.5, math.nan, 0.65]}, {"b": 0.1}) == DriftAlarm(40, "b", 0.5, 0.65,
                                                                                                 0.1)
    assert check_drift(steps, {"b": [0.5, 0.55, 0.58, 0.59]}, {"b": 0.1}) is None
    with pytest.raises(ValueError, match="one value per evaluation"):
        check_drift(steps, {"b": [0.5]}, {"b": 0.1})


def test_monitor_watches_without_the_hacking_check_and_restores():
    m = AlarmMonitor(tolerance=None, watch={"drift/brightness": 0.05})
    assert m.update(1, 0.5, {"diversity": 0.2}, {"drift/brightness": 0.40}) is None
    assert m.update(2, 0.4, {"diversity": 0.0}, {"drift/brightness": 0.42}) is None  # no tolerance: no hacking alarm
    fired = m.update(3, 0.6, {"diversity": 0.0}, {"drift/brightness": 0.47})
    assert fired.signal == "drift/brightness" and fired.step == 3
    # Rollback prefers the evaluation nearest the first value (the earliest on ties).
    assert m.goodness() == pytest.approx({1: 0.0, 2: -0.02, 3: -0.07})
    again = AlarmMonitor(tolerance=None, watch={"drift/brightness": 0.05})
    again.load_state_dict(m.state_dict())
    assert again.fired == fired
    # A checkpoint from before the watch (no "watched" curves) restores with NaN history, never a false alarm.
    old = {k: v for k, v in m.state_dict().items() if k != "watched"}
    again.load_state_dict(old)
    assert again.fired is None and again.update(4, 0.6, {"diversity": 0.0}, {"drift/brightness": 0.9}) is None


def test_watch_is_checked_at_config_time(tiny_run):
    with pytest.raises((ConfigError, ValueError), match=r"unknown metric 'drift/brightnes'.*drift/brightness.*"
                                                        r"allowed: drift/x0_norm"):
        tiny_run("run.eval_every=1", "run.alarm.watch={drift/brightnes: 0.1}")
    with pytest.raises((ConfigError, ValueError), match="limit must be a finite number > 0"):
        tiny_run("run.eval_every=1", "run.alarm.watch={drift/brightness: 0}")
    with pytest.raises((ConfigError, ValueError), match="need evaluations: set run.eval_every"):
        tiny_run("run.alarm.watch={drift/brightness: 0.1}")
    with pytest.raises((ConfigError, ValueError), match="drift/ratio_mean is not logged by trainer=diffusion_nft"):
        tiny_run("run.eval_every=1", "sampling.sde=ode", "run.alarm.watch={drift/ratio_mean: 0.1}",
                 trainer="diffusion_nft")
    cfg = tiny_run("run.eval_every=1", "run.alarm.watch={drift/ratio_max: 0.5, drift/x0_norm: 2}")
    assert cfg.run.alarm.watch == {"drift/ratio_max": 0.5, "drift/x0_norm": 2}


def _brightness_run(tmp_path, limit: float, max_steps: int):
    over = [f"run.out_dir={tmp_path}", "model.name=tiny-sd3", f"train.max_steps={max_steps}",
            "train.prompts_per_step=2", "train.group_size=4", "train.train_batch_size=4", "sampling.batch_size=8",
            "sampling.steps=4", "run.log_with=none", "run.progress=false", "run.checkpoint_every=100",
            "model.finetune=full", "train.lr=1e-2", "run.eval_every=2", *FAST, "rewards={brightness: 1.0}",
            f"run.alarm.watch={{drift/brightness: {limit}}}", "run.alarm.action=stop"]
    return FlowGRPOTrainer(load_train_config(None, over)).train()


def test_training_on_brightness_fires_the_watch_on_drift_brightness(tmp_path):
    history = _brightness_run(tmp_path / "fires", 0.03, 8)
    bright = [h["drift/brightness"] for h in history]
    # The watched value at an evaluation: the mean over the steps since the previous one (eval_every = 2).
    watched = [(bright[i] + bright[i + 1]) / 2 for i in range(0, len(bright) - 1, 2)]
    first = next(i for i, v in enumerate(watched) if abs(v - watched[0]) > 0.03)
    assert watched[first] > watched[0]  # brighter: the reward it trains
    assert len(history) == 2 * (first + 1) < 8  # stopped at that evaluation
    assert [h["alarm/fired"] for h in history if "alarm/fired" in h] == [0] * first + [1]
    record = json.loads((tmp_path / "fires" / "alarms.jsonl").read_text().splitlines()[0])
    assert record["signal"] == "drift/brightness" and record["step"] == 2 * (first + 1)
    assert record["value"] - record["first"] == pytest.approx(watched[first] - watched[0])
    # A limit above the drift: the same run (same seeds) goes on without an alarm.
    quiet = _brightness_run(tmp_path / "quiet", 0.3, len(history))
    assert [h["drift/brightness"] for h in quiet] == bright
    assert not any(h.get("alarm/fired") for h in quiet) and not (tmp_path / "quiet" / "alarms.jsonl").exists()


def test_tensorboard_holds_the_evaluation_images_at_their_steps(tiny_run, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, SCALARS, EventAccumulator

    FlowGRPOTrainer(tiny_run("run.log_with=tensorboard", "run.eval_every=1", *FAST)).train()
    (run_dir,) = {p.parent for p in (tmp_path / "logs").rglob("events.out.tfevents*")
                  if p.parent.name == "visalign"}
    events = EventAccumulator(str(run_dir), size_guidance={IMAGES: 0, SCALARS: 0})
    events.Reload()
    images = events.Images("eval/samples")
    assert [e.step for e in images] == [1, 2]
    for e in images:  # the grid the run wrote as a PNG, pixel for pixel
        logged = np.asarray(Image.open(io.BytesIO(e.encoded_image_string)).convert("RGB"))
        saved = np.asarray(Image.open(tmp_path / "samples" / f"step_{e.step:06d}.png").convert("RGB"))
        assert logged.shape == saved.shape and (logged == saved).all()
    metrics = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    scalars = events.Scalars("drift/brightness")
    assert [(s.step, s.value) for s in scalars] == [(i + 1, pytest.approx(m["drift/brightness"]))
                                                    for i, m in enumerate(metrics)]


def test_video_preview_is_a_frame_strip_per_sample_and_trackers_get_it_at_the_step():
    video = torch.zeros(2, 9, 3, 4, 4)
    for f in range(9):
        video[:, f] = f / 8
    video[1] = 1 - video[1]
    strip = preview_image(video, max_frames=3)  # frames 0, 4, 8 in columns, a sample per row
    assert strip.shape == (2 + 2 * 6, 2 + 3 * 6, 3)
    row0, row1 = strip[2:6], strip[8:12]
    assert [row0[0, 2 + 6 * c, 0] for c in range(3)] == [0, 128, 255]
    assert [row1[0, 2 + 6 * c, 0] for c in range(3)] == [255, 128, 0]
    assert preview_image(video[:, 0], scale=2).shape == (2 * (6 + 2), 2 * (2 * 6 + 2), 3)

    class Tracker:
        def __init__(self, name):
            self.name, self.calls = name, []

        def log_images(self, values, step=None, **kwargs):
            self.calls.append((values, step, kwargs))

    tb, wandb = Tracker("tensorboard"), Tracker("wandb")
    log_samples([tb, wandb], strip, 7)
    ((values, step, kwargs),) = tb.calls
    assert step == 7 and kwargs == {"dataformats": "NHWC"} and values["eval/samples"].shape == (1, *strip.shape)
    ((values, step, kwargs),) = wandb.calls  # accelerate wraps each image in wandb.Image
    assert step == 7 and kwargs == {} and values["eval/samples"][0] is strip
