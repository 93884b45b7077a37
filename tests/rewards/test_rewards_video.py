"""Video metrics against VBench's definitions, InstructVideo's frame aggregation, and the optional backbones."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T

from visalign import rewards
from visalign.rewards import Reward, RewardError
from visalign.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from visalign.rewards.video import (
    BackgroundConsistency,
    ClipFeatures,
    DinoFeatures,
    DynamicDegree,
    FrameReward,
    MotionSmoothness,
    SubjectConsistency,
    TemporalFlicker,
    aggregate_frames,
    dynamic_thresholds,
    feature_consistency,
    interpolation_error,
    temporal_flicker,
)
from visalign.world.render import PlacedShape, draw_layout


def moving_video(frames: int = 8, step: float = 1.5) -> torch.Tensor:
    """A world scene whose circle moves right and square moves up: [1, F, 3, 32, 32]."""
    return torch.stack([
        draw_layout([PlacedShape("circle", (0.9, 0.1, 0.1), 8 + step * t, 12, 8),
                     PlacedShape("square", (0.1, 0.1, 0.9), 20, 22 - step * t / 2, 7)])
        for t in range(frames)
    ])[None]


SHUFFLE = torch.tensor([0, 5, 2, 7, 1, 4, 6, 3])

try:
    import cv2
except ImportError:
    cv2 = None
# The no-weights dynamic degree uses OpenCV's Farneback flow (opencv-python-headless).
needs_cv2 = pytest.mark.skipif(cv2 is None, reason="DynamicDegree(flow='farneback') needs opencv-python-headless")


def test_registry_names_resolve():
    for name, cls in [("video-flicker", TemporalFlicker), ("video-subject-consistency", SubjectConsistency),
                      ("video-background-consistency", BackgroundConsistency),
                      ("video-dynamic-degree", DynamicDegree), ("video-motion-smoothness", MotionSmoothness)]:
        assert type(rewards.load(name)) is cls


def static_video() -> torch.Tensor:
    return moving_video()[:, :1].expand(-1, 8, -1, -1, -1).contiguous()


def test_static_video_is_perfect():
    static = static_video()
    assert TemporalFlicker()(videos=static).item() == 1.0
    assert MotionSmoothness()(videos=static).item() == 1.0
    torch.testing.assert_close(SubjectConsistency()(videos=static), torch.ones(1))
    torch.testing.assert_close(BackgroundConsistency()(videos=static), torch.ones(1))


@needs_cv2
def test_static_video_is_not_dynamic_and_moving_one_is():
    out = DynamicDegree()(videos=static_video())
    assert out["score"].item() == 0.0 and out["moving_pairs"].item() == 0.0
    assert out["flow_magnitude"].item() < 1e-3
    out = DynamicDegree()(videos=moving_video())
    assert out["score"].item() == 1.0 and out["moving_pairs"].item() == 1.0
    assert 1.0 < out["flow_magnitude"].item() < 3.0  # the circle moves 1.5 px per frame


def test_flashing_frame_lowers_flicker_by_the_hand_value():
    video = torch.full((1, 6, 3, 8, 8), 0.4)
    flashed = video.clone()
    flashed[:, 3] += 0.3
    # Two of the five consecutive pairs differ by 0.3 everywhere: 1 - 2 * 0.3 / 5.
    torch.testing.assert_close(TemporalFlicker()(videos=flashed), torch.tensor([1 - 2 * 0.3 / 5]))
    assert TemporalFlicker()(videos=video).item() == 1.0


def test_shuffled_frames_score_lower_than_ordered():
    ordered = moving_video()
    shuffled = ordered[:, SHUFFLE]
    for reward in (MotionSmoothness(), SubjectConsistency(), BackgroundConsistency(), TemporalFlicker()):
        assert reward(videos=shuffled).item() < reward(videos=ordered).item() - 0.01, reward.name


def test_flicker_matches_vbench_on_8bit_frames():
    # vbench/temporal_flickering.py: (255 - mean_t mean |f_t - f_{t+1}|) / 255 on uint8 frames cast to float32.
    frames = torch.randint(0, 256, (2, 5, 3, 9, 7), dtype=torch.uint8)
    expected = []
    for video in frames.permute(0, 1, 3, 4, 2).numpy():
        maes = [np.mean(np.abs(video[i].astype(np.float32) - video[i + 1].astype(np.float32))) for i in range(4)]
        expected.append((255.0 - np.mean(maes)) / 255.0)
    torch.testing.assert_close(temporal_flicker(frames.float() / 255), torch.tensor(expected, dtype=torch.float32))


def test_feature_consistency_matches_vbench_loop():
    features = torch.randn(3, 6, 10)
    expected = []
    for video in features:
        total = 0.0
        for i in range(1, len(video)):
            cos_prev = F.cosine_similarity(video[i - 1:i], video[i:i + 1]).item()
            cos_first = F.cosine_similarity(video[:1], video[i:i + 1]).item()
            total += (max(0.0, cos_prev) + max(0.0, cos_first)) / 2
        expected.append(total / (len(video) - 1))
    torch.testing.assert_close(feature_consistency(features), torch.tensor(expected), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(feature_consistency(features[:, :1]), torch.ones(3))


@pytest.mark.parametrize("num_frames", [7, 8])
def test_interpolation_error_follows_vbench_frame_selection(num_frames):
    # vbench/motion_smoothness.py: interpolate between frames 0,2,4,..., compare with frames 1,3,5,...
    videos = torch.rand(2, num_frames, 3, 5, 6)
    expected = []
    for video in videos:
        even, odd = video[0::2], video[1::2]
        predicted = [(even[i] + even[i + 1]) / 2 for i in range(len(even) - 1)]
        # an even frame count leaves its last odd frame without a pair
        expected.append(np.mean([(p - o).abs().mean().item() for p, o in zip(predicted, odd, strict=False)]))
    torch.testing.assert_close(interpolation_error(videos), torch.tensor(expected, dtype=torch.float32))
    torch.testing.assert_close(MotionSmoothness()(videos=videos), 1 - torch.tensor(expected, dtype=torch.float32))


def test_dynamic_thresholds_hand_values():
    assert dynamic_thresholds(32, 48, 16, fps=8.0) == (0.75, 4)
    assert dynamic_thresholds(512, 256, 16, fps=4.0) == (12.0, 4)  # factor max(1, 8 / 4) = 2
    assert dynamic_thresholds(256, 256, 10)[1] == 2  # round(2.5) = 2, Python's round as VBench
    assert dynamic_thresholds(256, 256, 2)[1] == 1  # VBench's 0, clamped


@needs_cv2
def test_dynamic_degree_subsamples_high_fps_to_8fps():
    video = moving_video(frames=16, step=0.5)
    # At fps=16 every second frame is kept, so the per-pair motion doubles to 1 px (threshold 0.75 px).
    slow = DynamicDegree(fps=16.0)(videos=video)
    assert slow["score"].item() == 1.0 and 0.7 < slow["flow_magnitude"].item() < 1.5
    plain = DynamicDegree(fps=8.0)(videos=video)
    assert plain["flow_magnitude"].item() < slow["flow_magnitude"].item()
    with pytest.raises(ValueError, match="flow='pwc' is not one of"):
        DynamicDegree(flow="pwc")
    with pytest.raises(ValueError, match="needs checkpoint=PATH"):
        DynamicDegree(flow="raft")


def test_raft_flow_loads_a_torchvision_state_dict(tmp_path):
    torch.manual_seed(0)
    raft = DynamicDegree.build_raft(small=True)
    torch.save(raft.state_dict(), tmp_path / "raft_small.pth")
    reward = DynamicDegree(flow="raft", checkpoint=tmp_path / "raft_small.pth", raft_small=True, raft_iters=2)
    video = torch.rand(1, 3, 3, 130, 140)
    flows = reward.pair_flows(video[0])
    assert flows.shape == (2, 2, 136, 144)  # replicate-padded to multiples of 8, as VBench's InputPadder
    out = reward(videos=video)
    assert set(out) == {"score", "flow_magnitude", "moving_pairs"} and torch.isfinite(out["flow_magnitude"]).all()
    state = raft.state_dict()
    state.pop("update_block.flow_head.conv2.weight")
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="missing keys.*update_block.flow_head.conv2.weight"):
        DynamicDegree(flow="raft", checkpoint=tmp_path / "broken.pth", raft_small=True)


def test_gradients_reach_pixels():
    video = moving_video(6).clone().requires_grad_(True)
    for reward in (TemporalFlicker(), MotionSmoothness(), SubjectConsistency(), BackgroundConsistency()):
        video.grad = None
        reward(videos=video).sum().backward()
        assert torch.isfinite(video.grad).all() and video.grad.abs().sum() > 0, reward.name
    with pytest.raises(RewardError, match="not differentiable"):
        DynamicDegree()(videos=video)


def test_dino_features_load_released_layout_and_match_timm(tmp_path):
    dino = DinoFeatures.tiny()
    # The released dino_vitbase16_pretrain.pth is a flat state dict in exactly this layout.
    torch.save(dino.vit.state_dict(), tmp_path / "dino.pth")
    arch = {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8, "image_size": 32}
    loaded = DinoFeatures.from_checkpoint(tmp_path / "dino.pth", **arch)
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.1.attn.qkv.weight", "norm.bias"} <= set(
        loaded.vit.state_dict())
    square = torch.rand(2, 3, 32, 32)
    reference = dino.vit(T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))(square))  # timm: final-norm CLS
    torch.testing.assert_close(loaded(square), reference, atol=1e-5, rtol=1e-5)
    state = dino.vit.state_dict()
    state["norm.weight"] = torch.ones(7)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="shape mismatch: norm.weight"):
        DinoFeatures.from_checkpoint(tmp_path / "bad.pth", **arch)


def test_dino_non_square_geometry_matches_vbench_transform():
    dino = DinoFeatures.tiny()
    frames = torch.rand(2, 3, 20, 50)
    # VBench dino_transform: Resize(224, antialias=False) (short side, bilinear), no crop, ImageNet norm.
    reference = T.Compose([T.Resize(32, antialias=False), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    expected = reference(frames)
    assert expected.shape[-2:] == (32, 80)
    torch.testing.assert_close(dino.preprocess(frames), expected)
    features = dino(frames)  # 4 x 10 patches: the 4 x 4 position grid is interpolated as DINO does
    assert features.shape == (2, 32) and torch.isfinite(features).all()
    consistency = SubjectConsistency(backbone=dino)
    assert 0.0 <= consistency(videos=frames[None]).item() <= 1.0


def test_clip_features_match_open_clip_with_vbench_geometry(tmp_path):
    import open_clip

    torch.manual_seed(0)
    vision = {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16}
    text = {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}
    model = open_clip.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text).eval()
    features = ClipFeatures(model, image_size=32)
    frames = torch.rand(3, 3, 40, 24)
    # VBench clip_transform on uint8 frames: Resize(224, BICUBIC, antialias=False) (8-bit, so clipped),
    # CenterCrop(224), OpenAI normalisation.
    reference = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC, antialias=False),
                           T.Lambda(lambda x: x.clamp(0, 1)), T.CenterCrop(32),
                           T.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)])
    with torch.no_grad():
        torch.testing.assert_close(features(frames), model.encode_image(reference(frames)), atol=1e-5, rtol=1e-5)
    reward = BackgroundConsistency(backbone=features)
    assert 0.0 <= reward(videos=frames[None]).item() <= 1.0
    with pytest.raises(ValueError, match="needs checkpoint=PATH"):
        BackgroundConsistency(backbone="clip")
    with pytest.raises(ValueError, match="backbone='dino' is not one of"):
        BackgroundConsistency(backbone="dino")


class FrameBrightness(Reward):
    name = "brightness"
    differentiable = True
    needs_prompts = False

    def score(self, *, prompts, images, videos, metadata):
        return images.mean(dim=(1, 2, 3))


def indexed_video(batch: int = 2, frames: int = 16) -> torch.Tensor:
    """Frame i of video b has brightness (i + b) / 40."""
    values = (torch.arange(frames)[None] + torch.arange(batch)[:, None]).float() / 40
    return values[:, :, None, None, None].expand(-1, -1, 3, 4, 4).contiguous()


def test_aggregate_frames_fixed_first_hand_values():
    video = indexed_video()
    out = aggregate_frames(FrameBrightness(), video, num_segments=4, attenuation=1.0, random=False)
    # Frames 0, 4, 8, 12; weights exp(-|i - 8|).
    weights = [math.exp(-8), math.exp(-4), 1.0, math.exp(-4)]
    expected = [sum(w * (i + b) / 40 for w, i in zip(weights, (0, 4, 8, 12), strict=True)) / 4 for b in range(2)]
    torch.testing.assert_close(out, torch.tensor(expected))
    normalized = aggregate_frames(FrameBrightness(), video, num_segments=4, attenuation=1.0, random=False,
                                  normalize_weights=True)
    torch.testing.assert_close(normalized, torch.tensor(expected) / (sum(weights) / 4))
    plain = aggregate_frames(FrameBrightness(), video, num_segments=4, attenuation=0.0, random=False)
    torch.testing.assert_close(plain, torch.tensor([(0 + 4 + 8 + 12 + 4 * b) / 160 for b in range(2)]))


def test_aggregate_frames_tsn_sampling_and_prompts():
    video = indexed_video(frames=12)
    generator = torch.Generator().manual_seed(3)
    out = aggregate_frames(FrameBrightness(), video, num_segments=3, attenuation=0.5, generator=generator)
    local = torch.randint(4, (2, 3), generator=torch.Generator().manual_seed(3))  # one frame in each span of 4
    indices = local + torch.tensor([0, 4, 8])
    expected = [sum(math.exp(-0.5 * abs(i - 6)) * (i + b) / 40 for i in indices[b].tolist()) / 3 for b in range(2)]
    torch.testing.assert_close(out, torch.tensor(expected))

    seen = []

    class PromptEcho(FrameBrightness):
        needs_prompts = True

        def score(self, *, prompts, images, videos, metadata):
            seen.extend(prompts)
            return super().score(prompts=prompts, images=images, videos=videos, metadata=metadata)

    aggregate_frames(PromptEcho(), video, ["a", "b"], num_segments=3)
    assert seen == ["a"] * 3 + ["b"] * 3
    with pytest.raises(ValueError, match="num_segments=13 must be in"):
        aggregate_frames(FrameBrightness(), video, num_segments=13)


def test_frame_reward_is_a_differentiable_video_reward():
    reward = FrameReward(FrameBrightness(), num_segments=4, attenuation=0.0, random=False)
    assert reward.inputs == ("videos",) and reward.differentiable and reward.name == "frames/brightness"
    video = indexed_video().requires_grad_(True)
    out = reward(videos=video)
    torch.testing.assert_close(out, torch.tensor([(0 + 4 + 8 + 12 + 4 * b) / 160 for b in range(2)]))
    out.sum().backward()
    assert video.grad[:, [0, 4, 8, 12]].abs().sum() > 0 and video.grad[:, 1].abs().sum() == 0


def test_frames_prefix_loads_any_image_reward_on_video_frames():

    reward = rewards.load("frames/brightness", num_segments=3, attenuation=0.0, random=False)
    assert isinstance(reward, FrameReward) and reward.name == "frames/brightness"
    video = torch.rand(2, 9, 3, 8, 8)
    # Segments of 3 frames, first frame of each, equal weights: the mean of frames 0, 3, 6's brightness.
    expected = rewards.load("brightness")(images=video[:, [0, 3, 6]].reshape(6, 3, 8, 8)).view(2, 3).mean(1)
    torch.testing.assert_close(reward(videos=video), expected)
    assert rewards.describe("frames/saturation")["inputs"] == "videos"
    with pytest.raises(ValueError, match="'video-flicker' does not score images"):
        rewards.load("frames/video-flicker")
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        rewards.load("frames/nope")


def test_world_cleanliness_on_videos_is_the_mean_over_frames():
    from visalign.world.verify import cleanliness

    video = torch.rand(2, 3, 3, 32, 32) * 0.2 + 0.8
    expected = cleanliness(video.reshape(6, 3, 32, 32)).view(2, 3).mean(1)
    torch.testing.assert_close(rewards.load("world-cleanliness")(videos=video), expected)


def test_consistency_runs_the_backbone_16_frames_a_pass_on_cpu_with_the_same_scores():
    torch.manual_seed(0)
    proj = torch.randn(3 * 8 * 8, 5)
    passes = []

    def backbone(frames):  # any callable frames -> features
        passes.append(len(frames))
        return frames.flatten(1) @ proj

    videos = torch.rand(2, 12, 3, 8, 8)
    scores = SubjectConsistency(backbone=backbone, batch_size=2)(videos=videos)
    assert passes == [16, 8]
    torch.testing.assert_close(scores, feature_consistency(videos.flatten(2) @ proj))
