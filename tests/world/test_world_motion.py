"""The moving-shapes world: grammar and split, renderer, exact motion verifier, video model, reward and suite."""

import math
import random

import pytest
import torch

from visalign.world.grammar import COLORS, SHAPES
from visalign.world.motion import (
    DIRECTIONS,
    MIN_TRAVEL,
    MOTION_TEMPLATES,
    NUM_FRAMES,
    STOP_FRAME,
    MotionSpec,
    MovingObject,
    all_motion_specs,
    misdescribe_direction,
    parse_motion_prompt,
    render_clip,
    render_clips,
    sample_motion_specs,
    split_motion_specs,
    travel_score,
    verify_motion,
)

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def test_every_spec_round_trips_through_its_prompt():
    for template in MOTION_TEMPLATES:
        for spec in all_motion_specs(template)[::7]:
            assert parse_motion_prompt(spec.prompt) == spec


@pytest.mark.parametrize("prompt, message", [
    ("a red circle moving sideways", "unknown word"),
    ("a red circle moving left fast", "unknown word"),
    ("a red circle", "expected 'moving <direction>'"),
    ("a red circle moving left slowly then stopping", "expected 'slowly', 'quickly'"),
    ("a red circle moving left and a blue square moving left", "different directions"),
    ("a red circle moving left and a red circle moving right", "must differ"),
    ("a red circle moving left and a blue square standing still", "different directions"),
])
def test_bad_prompts_are_rejected_with_the_reason(prompt, message):
    with pytest.raises(ValueError, match=message):
        parse_motion_prompt(prompt)


def test_split_is_disjoint_fixed_and_keeps_every_word_seen():
    for template in MOTION_TEMPLATES:
        seen, held = split_motion_specs(template, "seen"), split_motion_specs(template, "heldout")
        assert not set(seen) & set(held) and len(seen) + len(held) == len(all_motion_specs(template))
        assert 0.15 < len(held) / len(all_motion_specs(template)) < 0.3
        seen_words = {w for s in seen for w in s.prompt.split()}
        assert {w for s in held for w in s.prompt.split()} <= seen_words
    # "A and B" and "B and A" are one composition: never one seen and the other held out.
    held = set(split_motion_specs("two_motion", "heldout"))
    for spec in split_motion_specs("two_motion", "seen")[:300]:
        assert MotionSpec("two_motion", spec.objects[::-1]) not in held
    assert sample_motion_specs(5, "heldout", generator=3) == sample_motion_specs(5, "heldout", generator=3)


def test_misdescribed_captions_change_only_directions_and_stay_seen():
    rng = random.Random(0)
    still = split_motion_specs("still", "seen")[0]
    assert misdescribe_direction(still, rng) == still
    for template in ("motion", "speed", "stop", "two_motion"):
        seen = set(split_motion_specs(template, "seen"))
        spec = split_motion_specs(template, "seen")[7]
        draws = [misdescribe_direction(spec, rng) for _ in range(400)]
        assert all(d in seen for d in draws)  # never a held-out composition
        for d in draws:
            assert [(o.color, o.shape, o.speed, o.stops) for o in d.objects] == \
                   [(o.color, o.shape, o.speed, o.stops) for o in spec.objects]
        variants = set(draws)
        assert spec in variants and len(variants) >= 3  # uniform over the variants, the true one included
        share = draws.count(spec) / len(draws)
        assert abs(share - 1 / len(variants)) < 0.1, (template, share, len(variants))


def test_renders_move_as_stated_and_are_deterministic():
    obj = MovingObject("red", "square", "right", speed="quickly")
    clip = render_clip(MotionSpec("speed", (obj,)), 4)
    assert clip.shape == (NUM_FRAMES, 3, 32, 32) and torch.equal(clip, render_clip(MotionSpec("speed", (obj,)), 4))
    red = (clip[:, 0] - clip[:, 1]).clamp(min=0)  # red channel excess: the square's mask per frame
    xs = (red.sum(1) * torch.arange(32)).sum(1) / red.sum((1, 2))
    assert (xs[1:] > xs[:-1]).all() and 14 - 1 <= float(xs[-1] - xs[0]) <= 18 + 1
    stop = render_clip(parse_motion_prompt("a blue circle moving up then stopping"), 2)
    assert torch.equal(stop[STOP_FRAME], stop[-1]) and not torch.equal(stop[0], stop[STOP_FRAME])


@pytest.fixture(scope="module")
def truth():
    specs = [s for t in MOTION_TEMPLATES for s in sample_motion_specs(20, "seen", (t,), generator=1)]
    specs += [s for t in MOTION_TEMPLATES for s in sample_motion_specs(10, "heldout", (t,), generator=2)]
    return specs, render_clips(specs, 0)


def test_verifier_passes_ground_truth_clips(truth):
    specs, clips = truth
    result = verify_motion(clips, specs)
    assert float(result.passed.mean()) >= 0.99 and float(result.direction_correct.mean()) >= 0.99
    assert torch.isnan(result.speed[[s.template != "speed" for s in specs]]).all()


def test_verifier_rejects_wrong_motion(truth):
    specs, clips = truth
    moving = [i for i, s in enumerate(specs) if s.template in ("motion", "speed", "two_motion")]
    # Played backwards, every moving object goes the opposite way.
    backwards = verify_motion(clips[moving].flip(1), [specs[i] for i in moving])
    assert float(backwards.direction_correct.max()) == 0
    # The same clips against the opposite direction, and against standing still.
    flipped = [MotionSpec(specs[i].template, tuple(
        MovingObject(o.color, o.shape, OPPOSITE[o.direction], o.speed, o.stops) for o in specs[i].objects))
        for i in moving]
    assert float(verify_motion(clips[moving], flipped).direction_correct.max()) == 0
    singles = [i for i in moving if specs[i].template != "two_motion"]
    still = [MotionSpec("still", (MovingObject(specs[i].objects[0].color, specs[i].objects[0].shape, "still"),))
             for i in singles]
    assert float(verify_motion(clips[singles], still).direction_correct.max()) == 0


def test_verifier_judges_speed_stop_presence_and_extras():
    slow = parse_motion_prompt("a green triangle moving left slowly")
    fast = parse_motion_prompt("a green triangle moving left quickly")
    clips = render_clips([slow, fast], 5)
    result = verify_motion(clips, [fast, slow])  # swapped: speeds wrong, directions right
    assert result.speed.tolist() == [0.0, 0.0] and result.direction.tolist() == [1.0, 1.0]
    go = parse_motion_prompt("a cyan square moving down")
    stop = parse_motion_prompt("a cyan square moving down then stopping")
    clips = render_clips([go, stop], 6)
    swapped = verify_motion(clips, [stop, go])
    assert swapped.stop[0] == 0  # kept moving
    assert swapped.direction[1] == 1 and swapped.passed[1] == 1  # moved down (stopping is not excluded)
    # The object vanishes in one frame: not present, every concept about it fails.
    clip = render_clips([go], 7)
    clip[0, 3] = torch.tensor([0.9, 0.9, 0.9])[:, None, None]
    gone = verify_motion(clip, [go])
    assert gone.object.item() == 0 and gone.direction.item() == 0 and gone.passed.item() == 0
    # An unmentioned object in every frame breaks scene consistency, not the mentioned object's motion.
    two = render_clips([parse_motion_prompt("a cyan square moving down and a red circle moving up")], 8)
    extra = verify_motion(two, [go])
    assert extra.direction.item() == 1 and extra.concepts[0]["no extra objects"] is False
    assert extra.consistency.item() < 1


def test_verifier_checks_input_shapes():
    with pytest.raises(ValueError, match="videos must be"):
        verify_motion(torch.zeros(1, 9, 3, 16, 16), ["a red circle moving left"])
    with pytest.raises(ValueError, match="1 specs for 2 videos"):
        verify_motion(torch.zeros(2, 9, 3, 32, 32), ["a red circle moving left"])


# ---- model, reward, suite -------------------------------------------------------------------------------------

def test_video_adapter_layout_and_checkpoints(tmp_path):
    from visalign.sampling import sample
    from visalign.world.model import WorldAdapter, WorldVideoAdapter

    adapter = WorldVideoAdapter.random(0)
    clips = render_clips(sample_motion_specs(2, generator=0), 0)
    latents = adapter.encode(clips)
    assert latents.shape == (2, 3, NUM_FRAMES, 32, 32) and torch.allclose(adapter.decode(latents), clips)
    with pytest.raises(ValueError, match="num_frames=5 not allowed for world-video: it draws 9 frames"):
        adapter.latent_shape(32, 32, 5)
    cond = adapter.encode_prompts(["a red circle moving left"] * 2)
    traj = sample(adapter, cond, num_steps=2, height=32, width=32, num_frames=NUM_FRAMES, seeds=[0, 1])
    assert traj.final.shape == (2, 3, NUM_FRAMES, 32, 32)
    path = adapter.save_pretrained(tmp_path / "model.safetensors")
    again = WorldVideoAdapter.from_pretrained(path)
    sigma = torch.full((2,), 0.5)
    with torch.no_grad():
        v1 = adapter.predict_velocity(latents, sigma, cond, 3.0)
        v2 = again.predict_velocity(latents, sigma, cond, 3.0)
    assert torch.equal(v1, v2)
    with pytest.raises(ValueError, match="holds a video model of 9 frames: load it with WorldVideoAdapter"):
        WorldAdapter.from_pretrained(path)
    with pytest.raises(ValueError, match="holds an image model"):
        WorldVideoAdapter.from_pretrained(WorldAdapter.random(0).save_pretrained(tmp_path / "image.safetensors"))
    with pytest.raises(ValueError, match="words outside the world's vocabulary: on, the;"):
        adapter.encode_prompts(["a red circle on the left"])


@pytest.mark.parametrize("kind, lora_module", [("wan", ".ffn.net.0.proj.lora_A"),
                                               ("motion", ".motion_modules.0.transformer_blocks.0.attn1.to_q.lora_A")])
def test_video_denoisers_checkpoint_sample_and_take_lora(tmp_path, kind, lora_module):
    from visalign.world.model import WorldVideoAdapter

    adapter = WorldVideoAdapter.random(0, denoiser=kind)
    assert adapter.denoiser_kind == kind
    latents = adapter.encode(render_clips(sample_motion_specs(2, generator=0), 0))
    cond = adapter.encode_prompts(["a red circle moving left", "a blue square moving up quickly"])
    sigma = torch.full((2,), 0.7)
    with torch.no_grad():
        v = adapter.predict_velocity(latents, sigma, cond, 3.0)
        again = WorldVideoAdapter.from_pretrained(adapter.save_pretrained(tmp_path / f"{kind}.safetensors"))
        assert again.denoiser_kind == kind and torch.equal(v, again.predict_velocity(latents, sigma, cond, 3.0))
        # one clip's prompt does not leak into the other's velocity (the per-frame repeat keeps clips apart)
        alone = adapter.predict_velocity(latents[:1], sigma[:1], adapter.encode_prompts(cond.prompts[:1]), 3.0)
        assert torch.allclose(alone, v[:1], atol=1e-5) and v.shape == latents.shape
    adapter.add_lora(rank=4)
    trainable = [n for n, p in adapter.denoiser.named_parameters() if p.requires_grad]
    assert any(lora_module in n for n in trainable) and all("lora_" in n for n in trainable)


def test_wan_denoiser_ignores_text_padding():
    from visalign.world.model import WorldVideoAdapter

    adapter = WorldVideoAdapter.random(0, denoiser="wan")
    latents = adapter.encode(render_clips(sample_motion_specs(2, generator=1), 1))
    embeds = dict(adapter.encode_prompts(["a red circle moving left", "a green triangle standing still"]).cond)
    # Wan has no text mask: the states at padding positions are zeroed, so whatever they hold cannot matter.
    pad = ~embeds["encoder_attention_mask"].bool()
    assert pad.any()
    noisy = embeds["encoder_hidden_states"].masked_fill(pad[..., None], 5.0)
    sigma = torch.full((2,), 0.4)
    with torch.no_grad():
        v1 = adapter._velocity(latents, sigma, embeds, 1.0)
        v2 = adapter._velocity(latents, sigma, {**embeds, "encoder_hidden_states": noisy}, 1.0)
    assert torch.equal(v1, v2)


def test_motion_reward_and_suite_scores(truth):
    from visalign import rewards
    from visalign.world.motion_suite import markdown_table, score_motion

    specs, clips = truth
    reward = rewards.load("world-motion")
    out = reward(prompts=[s.prompt for s in specs[:6]], videos=clips[:6])
    expected = verify_motion(clips[:6], specs[:6])
    assert torch.equal(out["score"], expected.score) and torch.equal(out["direction_correct"],
                                                                     expected.direction_correct)
    assert (out["cleanliness"] > 0.9).all()
    summary = score_motion(clips, specs)
    assert summary["overall"]["direction"] >= 0.99 and summary["n"] == len(specs)
    assert math.isnan(summary["templates"]["motion"]["speed"]) and summary["templates"]["speed"]["speed"] >= 0.99
    assert "**motion direction (all templates)**" in markdown_table({"seen": summary})


def test_travel_score_by_hand():
    def sig(margin):  # TRAVEL_SCALE = 2 px
        return 1 / (1 + math.exp(-margin / 2.0))

    right = MovingObject("red", "circle", "right")
    # 8 px right, 1 px down: margin = 8 - max(1, MIN_TRAVEL) = 5; a missing middle frame is skipped.
    track = [(10.0, 10.0), None] + [(10.0 + k, 10.0 + k / 8) for k in range(2, 9)]
    assert travel_score(right, track) == pytest.approx(sig(8 - MIN_TRAVEL))
    # Moving the wrong way scores below 0.5 and lower the further it goes.
    back2 = [(10.0 - k / 4, 10.0) for k in range(9)]
    back6 = [(10.0 - 3 * k / 4, 10.0) for k in range(9)]
    assert travel_score(right, back6) < travel_score(right, back2) < 0.5
    # Across-axis travel that dominates sets the margin: along 4, across 6 -> margin -2.
    diagonal = [(10.0 + k / 2, 10.0 + 3 * k / 4) for k in range(9)]
    assert travel_score(right, diagonal) == pytest.approx(sig(-2.0))
    # "then stopping": only frames 0..STOP_FRAME count.
    stop = MovingObject("red", "circle", "right", stops=True)
    stop_track = [(10.0 + 2 * min(k, STOP_FRAME), 10.0) for k in range(9)]
    assert travel_score(stop, stop_track) == pytest.approx(sig(2 * STOP_FRAME - MIN_TRAVEL))
    # still: the largest drift from the first position; one detection is not enough to judge.
    still = MovingObject("red", "circle", "still")
    assert travel_score(still, [(5.0, 5.0), (5.0, 6.0), (8.0, 9.0)] + [None] * 6) == pytest.approx(sig(1.5 - 5.0))
    assert travel_score(still, [(5.0, 5.0)] + [None] * 8) == 0.0


def test_travel_reward_ranks_true_clips_over_reversed(truth):
    from visalign import rewards

    specs, clips = truth
    moving = [i for i, s in enumerate(specs) if s.template in ("motion", "speed", "two_motion")]
    reward = rewards.load("world-motion-travel")
    prompts = [specs[i].prompt for i in moving]
    forward = reward(prompts=prompts, videos=clips[moving])
    backward = reward(prompts=prompts, videos=clips[moving].flip(1))
    assert (forward["score"] > 0.8).all() and (backward["score"] < 0.2).all()
    assert torch.equal(forward["direction_correct"], verify_motion(clips[moving], prompts).direction_correct)
    # Ground truth of every template, standing still and stopping included, scores above the flip point.
    assert (reward(prompts=[s.prompt for s in specs], videos=clips)["score"] > 0.5).all()


def test_directions_and_colours_cover_the_vocabulary():
    words = {w for t in MOTION_TEMPLATES for s in all_motion_specs(t) for w in s.prompt.split()}
    assert set(DIRECTIONS) | set(COLORS) | set(SHAPES) <= words and MIN_TRAVEL < 6


def test_video_rewards_train_the_world_video_model(tmp_path):
    """The three kinds of video reward in one Flow-GRPO run: the exact motion verifier, an image reward on
    frames (segmental sampling, temporal attenuation) and a VBench temporal metric."""
    from visalign.trainers import load_train_config, trainer_class
    from visalign.world.model import WorldVideoAdapter

    ckpt = WorldVideoAdapter.random(0).save_pretrained(tmp_path / "video.safetensors")
    cfg = load_train_config("configs/flow_grpo_world_video.yaml", [
        f"model.path={ckpt}", f"run.out_dir={tmp_path / 'run'}", "train.max_steps=2", "train.prompts_per_step=2",
        "train.group_size=4", "train.train_batch_size=4", "sampling.batch_size=8", "sampling.steps=4",
        "sampling.window_range=[0, 2]", "sampling.window_size=2", "train.lr=1e-3", "train.clip_range=0.2",
        "run.eval_every=0", "run.log_with=none", "run.progress=false", "run.checkpoint_every=100",
        "rewards={world-motion: 1.0, frames/saturation: 0.5, video-flicker: 0.2}"])
    trainer = trainer_class(cfg.trainer)(cfg)
    before = [p.detach().clone() for p in trainer.params]
    history = trainer.train()
    for name in ("world-motion", "frames/saturation", "video-flicker"):
        assert all(math.isfinite(h[f"rewards/{name}/mean"]) for h in history)
    assert "rewards/world-motion/direction_correct/mean" in history[-1] or any(
        "direction_correct" in k for k in history[-1])
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.params, strict=True))
