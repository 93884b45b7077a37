"""Video quality metrics after VBench (Huang et al. 2024, `Vchitect/VBench`, `vbench/*.py`), and image rewards
applied to video frames with InstructVideo's segmental sampling and temporal attenuation.

Videos are float tensors [B, F, 3, H, W] in [0, 1]. VBench works on 8-bit frames and reports
(255 - MAE) / 255, which on [0, 1] frames is 1 - MAE; the 8-bit quantisation is left out.

    metric (registry name)          definition                                          weights
    temporal flicker                1 - mean_t |f_t - f_{t+1}|                          none
    (video-flicker)                 `vbench/temporal_flickering.py`
    subject / background            mean over t >= 1 of (max(0, cos(e_t, e_{t-1})) +    none by default
    consistency                     max(0, cos(e_t, e_0))) / 2 on per-frame features   (DINO / CLIP
    (video-subject-consistency,     e_t; `vbench/subject_consistency.py` (DINO ViT-B/16) optional)
    video-background-consistency)   and `background_consistency.py` (CLIP ViT-B/32)
    dynamic degree                  moving iff >= round(4 n / 16) frame pairs have a     none (Farneback)
    (video-dynamic-degree)          mean top-5% flow magnitude > 6 min(H, W) / 256       or RAFT
                                    `vbench/dynamic_degree.py`
    motion smoothness               1 - MAE between each odd frame and its prediction    none (linear
    (video-motion-smoothness)       from the two even neighbours (VBench: AMT-S)         interpolation)
                                    `vbench/motion_smoothness.py`

The no-weights defaults stand in for VBench's networks and give different numbers from VBench's:
- consistency: `ThumbnailFeatures`, each frame area-downsampled to 16×16 and ImageNet-normalised, flattened;
  the cosine of two frames is then a correlation of their coarse layouts. `DinoFeatures` and `ClipFeatures`
  load VBench's backbones from local files.
- motion smoothness: the odd frame is predicted as the mean of its neighbours (linear interpolation in pixel
  space); any `interpolator(frame0, frame1) -> middle frame` (e.g. AMT) can be passed instead.
- dynamic degree: OpenCV's Farneback flow (needs `opencv-python-headless`) instead of RAFT; torchvision RAFT
  runs with local weights (`flow="raft"`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visalign.rewards.base import Reward, RewardError, combined
from visalign.rewards.preprocess import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    center_crop,
    normalize,
    shortest_side_size,
    to_uint8_hwc,
)
from visalign.rewards.registry import load
from visalign.rewards.weights import load_checkpoint, load_state_dict_checked

# The backbones' libraries (timm, open_clip, torchvision's RAFT, OpenCV) are imported where a backbone is
# built: each takes seconds to import, and the weight-free metrics need none of them.

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # VBench `dino_transform` (vbench/utils.py)
IMAGENET_STD = (0.229, 0.224, 0.225)

FeatureFn = Callable[[Tensor], Tensor]  # frames [N, 3, H, W] in [0, 1] -> features [N, D]


def _check_frames(videos: Tensor, minimum: int, label: str) -> None:
    if videos.ndim != 5 or videos.shape[1] < minimum:
        raise RewardError(f"{label} needs videos [B, F, 3, H, W] with at least {minimum} frames, "
                          f"got {tuple(videos.shape)}")


# ------------------------------------------------------------------------------------ pure metrics


def temporal_flicker(videos: Tensor) -> Tensor:
    """VBench temporal flickering: (255 - mean |f_t - f_{t+1}|) / 255 on 8-bit frames, i.e. 1 - MAE on [0, 1]
    frames, averaged over consecutive pairs (`vbench/temporal_flickering.py`). [B, F, 3, H, W] -> [B]."""
    _check_frames(videos, 2, "temporal_flicker")
    # One pair of frames at a time: on a CPU a whole-clip difference is big enough that allocating it (fresh pages
    # each call) costs more than the arithmetic; pair-sized temporaries are reused (bench/reward_throughput.py).
    pairs = videos.shape[1] - 1
    return 1.0 - sum((videos[:, t + 1] - videos[:, t]).abs().mean(dim=(1, 2, 3)) for t in range(pairs)) / pairs


def feature_consistency(features: Tensor) -> Tensor:
    """VBench subject/background consistency from per-frame features [B, F, D] -> [B]: for each frame t >= 1
    the mean of max(0, cos) to the previous and to the first frame, averaged over t
    (`vbench/subject_consistency.py`, `vbench/background_consistency.py`). One frame scores 1."""
    if features.shape[1] < 2:
        return features.new_ones(features.shape[0])
    unit = F.normalize(features, dim=-1)
    to_previous = (unit[:, 1:] * unit[:, :-1]).sum(dim=-1).clamp_min(0.0)
    to_first = (unit[:, 1:] * unit[:, :1]).sum(dim=-1).clamp_min(0.0)
    return ((to_previous + to_first) / 2).mean(dim=1)


def linear_interpolation(frame0: Tensor, frame1: Tensor) -> Tensor:
    """The no-weights frame interpolator: the pixel-wise mean of the two neighbours."""
    return (frame0 + frame1) / 2


def interpolation_error(videos: Tensor, interpolator: Callable[[Tensor, Tensor], Tensor] = linear_interpolation
                        ) -> Tensor:
    """VBench motion smoothness' error: keep the even frames 0, 2, 4, ..., predict each odd frame 2k+1 from
    frames 2k and 2k+2, and return the mean absolute error over the predicted frames, [B] in [0, 1]
    (`vbench/motion_smoothness.py`: `extract_frame(start_from=0)`, one interpolation pass, `vfi_score`)."""
    _check_frames(videos, 3, "interpolation_error")
    even = videos[:, 0::2]
    pairs = even.shape[1] - 1
    frame0 = even[:, :-1].reshape(-1, *videos.shape[2:])
    frame1 = even[:, 1:].reshape(-1, *videos.shape[2:])
    predicted = interpolator(frame0, frame1).reshape(videos.shape[0], pairs, *videos.shape[2:])
    target = videos[:, 1::2][:, :pairs]  # with an even F the last odd frame has no right neighbour
    return (predicted - target).abs().mean(dim=(1, 2, 3, 4))


def dynamic_thresholds(height: int, width: int, num_frames: int, fps: float = 8.0) -> tuple[float, int]:
    """VBench `DynamicDegree.set_params`: (magnitude threshold in pixels, number of moving pairs required).

    threshold = max(1, 8 / fps) * 6 * min(H, W) / 256 and count = round(4 * num_frames / 16) with Python's
    round. One deviation: the count is at least 1 (VBench's rounds to 0 for <= 2 frames, which calls even a
    static clip moving)."""
    factor = max(1.0, 8.0 / fps)
    return factor * 6.0 * (min(height, width) / 256.0), max(1, round(4 * (num_frames / 16.0)))


def top_flow_magnitude(flow: Tensor) -> Tensor:
    """VBench `DynamicDegree.get_score`: mean of the largest 5% of per-pixel flow magnitudes. [N, 2, H, W] ->
    [N] (at least one pixel, where VBench's int(0.05 H W) would be empty)."""
    magnitude = flow.float().pow(2).sum(dim=1).sqrt().flatten(1)
    count = max(1, int(magnitude.shape[1] * 0.05))
    return magnitude.topk(count, dim=1).values.mean(dim=1)


def sample_segments(batch: int, num_frames: int, num_segments: int, generator: torch.Generator | None = None,
                    random: bool = True) -> Tensor:
    """InstructVideo's segmental sampling (`ali-vilab/VGen`, `utils/reward/reward.py`, selection_method="TSN"):
    split the frames into `num_segments` spans of F // S frames and draw one frame uniformly from each span;
    `random=False` takes each span's first frame ("fixed_first"). Returns frame indices [B, S]."""
    if not 1 <= num_segments <= num_frames:
        raise ValueError(f"num_segments={num_segments} must be in [1, num_frames={num_frames}]")
    span = num_frames // num_segments
    starts = torch.arange(num_segments) * span
    if not random:
        return starts.expand(batch, -1).clone()
    return starts + torch.randint(span, (batch, num_segments), generator=generator)


def attenuation_weights(indices: Tensor, num_frames: int, attenuation: float) -> Tensor:
    """InstructVideo's temporally attenuated reward (TAR): exp(-lambda_TAR * |i - F // 2|) for frame index i
    (`utils/reward/reward.py`, `TSN_coef`); lambda_TAR = 0 weighs all frames equally."""
    return torch.exp(-(indices - num_frames // 2).abs().float() * attenuation)


def aggregate_frames(image_reward: Reward, videos: Tensor, prompts: Sequence[str] | None = None,
                     num_segments: int = 4, attenuation: float = 1.0, *, metadata: Sequence[dict] | None = None,
                     generator: torch.Generator | None = None, random: bool = True,
                     normalize_weights: bool = False) -> Tensor:
    """An image reward over video frames, InstructVideo style (Yuan et al. 2024, "InstructVideo: Instructing
    Video Diffusion Models with Human Feedback", CVPR; `ali-vilab/VGen`, `utils/reward/reward.py`).

    One frame per segment (`sample_segments`), each scored with the video's prompt, weighted by
    `attenuation_weights` and averaged over the segments: r = 1/S sum_s w_s r(frame_s). As in the reference the
    weights are not renormalised, so with attenuation > 0 the result is smaller than the frames' rewards;
    `normalize_weights=True` divides by sum_s w_s / S instead (a weighted mean on the image reward's scale).
    The released InstructVideo config uses 4 segments of 16 frames; its lambda_TAR value is not in that config
    file, and the default here, 1, is an assumption. Returns [B]."""
    _check_frames(videos, 1, "aggregate_frames")
    batch, num_frames = videos.shape[:2]
    indices = sample_segments(batch, num_frames, num_segments, generator, random).to(videos.device)
    frames = videos[torch.arange(batch, device=videos.device)[:, None], indices]  # [B, S, 3, H, W]

    def repeat(items):
        return None if items is None else [x for x in items for _ in range(num_segments)]

    out = image_reward(prompts=repeat(prompts), images=frames.flatten(0, 1), metadata=repeat(metadata))
    scores = combined(out).reshape(batch, num_segments)
    weights = attenuation_weights(indices, num_frames, attenuation).to(scores)
    total = (weights * scores).mean(dim=1)
    return total / weights.mean(dim=1) if normalize_weights else total


# ------------------------------------------------------------------------------------ feature backbones


def _load_state_dict(module: nn.Module, path: str | Path, label: str) -> None:
    """Load a backbone checkpoint (DINO / CLIP / RAFT layouts unwrap 'state_dict', 'model' or 'teacher')."""
    load_state_dict_checked(module, load_checkpoint(path, ("state_dict", "model", "teacher")), f"{label}: {path}")


class ThumbnailFeatures:
    """The built-in, weight-free frame feature: area-downsample to size×size, ImageNet-normalise, flatten.

    Deterministic and differentiable. Cosines between thumbnails measure whether the coarse layout and colours
    persist, not semantic identity as DINO/CLIP features do."""

    def __init__(self, size: int = 16):
        self.size = size

    def __call__(self, frames: Tensor) -> Tensor:
        thumbs = F.adaptive_avg_pool2d(frames.float(), self.size)
        return normalize(thumbs, IMAGENET_MEAN, IMAGENET_STD).flatten(1)


class DinoFeatures(nn.Module):
    """DINO ViT (Caron et al. 2021; VBench subject consistency: `facebookresearch/dino` `dino_vitb16`) as
    frame features: the final-norm [CLS] token.

    Built from timm's ViT modules, whose key layout equals the released `dino_vitbase16_pretrain.pth`
    (`cls_token`, `pos_embed`, `patch_embed.proj.*`, `blocks.N.*`, `norm.*`). The forward follows DINO's
    `vision_transformer.py`, including its bicubic position-embedding interpolation (scale factor
    (h // p + 0.1) / sqrt(N)) for non-square inputs. Preprocessing follows VBench `dino_transform`: short side
    -> 224 (bilinear, antialias=False), no crop, ImageNet normalisation."""

    def __init__(self, embed_dim: int = 768, depth: int = 12, num_heads: int = 12, patch_size: int = 16,
                 image_size: int = 224):
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        self.vit = VisionTransformer(img_size=image_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                                     num_heads=num_heads, num_classes=0)
        self.patch_size, self.image_size = patch_size, image_size
        self.requires_grad_(False).eval()

    @classmethod
    def from_checkpoint(cls, path: str | Path, **arch) -> DinoFeatures:
        model = cls(**arch)
        _load_state_dict(model.vit, path, "DinoFeatures")
        return model

    @classmethod
    def tiny(cls, seed: int = 0) -> DinoFeatures:
        """Random weights at test size (2 blocks, width 32, 8-px patches, 32-px input)."""
        torch.manual_seed(seed)
        return cls(embed_dim=32, depth=2, num_heads=2, patch_size=8, image_size=32)

    def preprocess(self, frames: Tensor) -> Tensor:
        size = shortest_side_size(*frames.shape[-2:], self.image_size)
        resized = F.interpolate(frames.float(), size=size, mode="bilinear", align_corners=False, antialias=False)
        return normalize(resized, IMAGENET_MEAN, IMAGENET_STD)

    def _position_embedding(self, rows: int, cols: int) -> Tensor:
        pos = self.vit.pos_embed
        side = int(math.sqrt(pos.shape[1] - 1))
        if rows == cols == side:
            return pos
        grid = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((rows + 0.1) / side, (cols + 0.1) / side), mode="bicubic")
        return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)], dim=1)

    def forward(self, frames: Tensor) -> Tensor:
        x = self.preprocess(frames)
        tokens = self.vit.patch_embed.proj(x)  # [N, D, h, w]
        rows, cols = tokens.shape[-2:]
        tokens = tokens.flatten(2).transpose(1, 2)
        cls = self.vit.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self._position_embedding(rows, cols)
        return self.vit.norm(self.vit.blocks(tokens))[:, 0]


class ClipFeatures(nn.Module):
    """CLIP image embeddings (VBench background consistency: OpenAI CLIP ViT-B/32 `encode_image`) from an
    open_clip model. Preprocessing follows VBench `clip_transform`: short side -> 224 (bicubic,
    antialias=False, clipped to [0, 1] as on 8-bit frames), centre crop 224, OpenAI normalisation."""

    def __init__(self, model: nn.Module, image_size: int = 224):
        super().__init__()
        self.model, self.image_size = model, image_size
        self.requires_grad_(False).eval()

    @classmethod
    def from_checkpoint(cls, path: str | Path, model_name: str = "ViT-B-32") -> ClipFeatures:
        """An open_clip architecture with a local state dict in open_clip/OpenAI key layout (`visual.*`, ...)."""
        import open_clip

        model = open_clip.create_model(model_name, pretrained=None)
        _load_state_dict(model, path, "ClipFeatures")
        return cls(model, image_size=model.visual.image_size[0])

    def preprocess(self, frames: Tensor) -> Tensor:
        size = shortest_side_size(*frames.shape[-2:], self.image_size)
        resized = F.interpolate(frames.float(), size=size, mode="bicubic", align_corners=False, antialias=False)
        return normalize(center_crop(resized.clamp(0.0, 1.0), self.image_size), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)

    def forward(self, frames: Tensor) -> Tensor:
        return self.model.encode_image(self.preprocess(frames))


# ------------------------------------------------------------------------------------ rewards


class _VideoReward(Reward):
    inputs = ("videos",)
    needs_prompts = False
    value_range = (0.0, 1.0)


class TemporalFlicker(_VideoReward):
    """VBench temporal flickering, 1 - mean |f_t - f_{t+1}|: 1 for a static video. Meant for static scenes, where
    any frame difference is flicker."""

    name = "video-flicker"
    differentiable = True

    def score(self, *, prompts, images, videos, metadata):
        return temporal_flicker(videos)


CPU_FRAMES_PER_PASS = 16


class _Consistency(_VideoReward):
    differentiable = True
    backbones: tuple[str, ...] = ("thumbnail",)

    def __init__(self, backbone: str | FeatureFn = "thumbnail", checkpoint: str | Path | None = None, **kwargs):
        super().__init__(**kwargs)
        if callable(backbone):
            self.features = backbone
        elif backbone == "thumbnail":
            self.features = ThumbnailFeatures()
        elif backbone in self.backbones:
            if checkpoint is None:
                raise ValueError(f"{self.name}: backbone={backbone!r} needs checkpoint=PATH (a local file)")
            self.features = self._load_backbone(backbone, checkpoint)
        else:
            raise ValueError(f"{self.name}: backbone={backbone!r} is not one of {self.backbones} or a callable")

    def _load_backbone(self, backbone: str, checkpoint: str | Path) -> FeatureFn:
        raise NotImplementedError

    def score(self, *, prompts, images, videos, metadata):
        _check_frames(videos, 1, self.name)
        frames = videos.flatten(0, 1).to(self.device)
        # On a CPU the backbone runs 16 frames a pass: larger passes were ~10 % slower per frame there (fresh pages
        # for their activations each call; bench/reward_throughput.py); other devices take the whole batch.
        chunk = CPU_FRAMES_PER_PASS if frames.device.type == "cpu" else len(frames)
        features = torch.cat([self.features(frames[i:i + chunk]) for i in range(0, len(frames), chunk)])
        return feature_consistency(features.reshape(*videos.shape[:2], -1).float())


class SubjectConsistency(_Consistency):
    """VBench subject consistency; backbone "thumbnail" (default, no weights), "dino" (a local DINO ViT-B/16
    state dict, e.g. `dino_vitbase16_pretrain.pth`), or any callable frames -> features."""

    name = "video-subject-consistency"
    backbones = ("thumbnail", "dino")

    def _load_backbone(self, backbone, checkpoint):
        return DinoFeatures.from_checkpoint(checkpoint).to(self.device)


class BackgroundConsistency(_Consistency):
    """VBench background consistency; backbone "thumbnail" (default, no weights), "clip" (a local open_clip
    ViT-B-32 state dict), or any callable frames -> features."""

    name = "video-background-consistency"
    backbones = ("thumbnail", "clip")

    def _load_backbone(self, backbone, checkpoint):
        return ClipFeatures.from_checkpoint(checkpoint).to(self.device)


def farneback_flow(frame0: np.ndarray, frame1: np.ndarray) -> np.ndarray:
    """Dense flow [H, W, 2] between two uint8 RGB frames [H, W, 3] with OpenCV's Farneback method at the
    parameters of OpenCV's optical-flow tutorial (pyramid scale 0.5, 3 levels, window 15, 3 iterations,
    poly_n 5, poly_sigma 1.2)."""
    try:
        import cv2
    except ImportError as err:
        raise ImportError("the Farneback flow needs OpenCV: pip install opencv-python-headless") from err
    gray0, gray1 = (cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in (frame0, frame1))
    return cv2.calcOpticalFlowFarneback(gray0, gray1, None, 0.5, 3, 15, 3, 5, 1.2, 0)


class DynamicDegree(_VideoReward):
    """VBench dynamic degree: 1 if the video moves, else 0, with the raw flow statistics as sub-scores.

    Frames are first subsampled to about 8 fps (every round(fps / 8)-th frame); per consecutive pair the flow
    magnitude statistic is the mean of the top 5% (`top_flow_magnitude`); thresholds from
    `dynamic_thresholds`. Sub-scores: "flow_magnitude" (mean over pairs of that statistic, pixels) and
    "moving_pairs" (fraction of pairs above the threshold). Not differentiable.

    flow="farneback" needs no weights; flow="raft" runs torchvision's RAFT (`raft_large` or, with
    raft_small=True, `raft_small`) from a local torchvision state dict, on frames scaled to [-1, 1] and
    replicate-padded to a multiple of 8 as VBench's `InputPadder`, with 20 flow updates as VBench. The original
    `raft-things.pth` that VBench loads has another key layout and is not accepted."""

    name = "video-dynamic-degree"
    differentiable = False
    flows = ("farneback", "raft")

    def __init__(self, flow: str = "farneback", checkpoint: str | Path | None = None, fps: float = 8.0,
                 raft_small: bool = False, raft_iters: int = 20, **kwargs):
        super().__init__(**kwargs)
        if flow not in self.flows:
            raise ValueError(f"{self.name}: flow={flow!r} is not one of {self.flows}")
        if fps <= 0:
            raise ValueError(f"{self.name}: fps={fps} must be > 0")
        self.flow, self.fps, self.raft_iters = flow, fps, raft_iters
        self.raft = None
        if flow == "raft":
            if checkpoint is None:
                raise ValueError(f"{self.name}: flow='raft' needs checkpoint=PATH (a torchvision RAFT state dict)")
            self.raft = self.build_raft(raft_small)
            _load_state_dict(self.raft, checkpoint, self.name)
            self.raft.to(self.device)

    @staticmethod
    def build_raft(small: bool = False) -> nn.Module:
        from torchvision.models.optical_flow import raft_large, raft_small

        return (raft_small if small else raft_large)(weights=None).requires_grad_(False).eval()

    @torch.no_grad()
    def pair_flows(self, frames: Tensor) -> Tensor:
        """Flow of each consecutive pair of frames [F, 3, H, W] in [0, 1] -> [F - 1, 2, H', W'] in pixels."""
        if self.raft is None:
            uint8 = to_uint8_hwc(frames)
            flows = [farneback_flow(a, b) for a, b in itertools.pairwise(uint8)]
            return torch.from_numpy(np.stack(flows)).permute(0, 3, 1, 2)
        height, width = frames.shape[-2:]
        pad_h, pad_w = (-height) % 8, (-width) % 8  # VBench InputPadder, mode "sintel": centred padding
        scaled = F.pad(frames.float() * 2 - 1, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2),
                       mode="replicate").to(self.device)
        return self.raft(scaled[:-1], scaled[1:], num_flow_updates=self.raft_iters)[-1].cpu()

    def score(self, *, prompts, images, videos, metadata):
        _check_frames(videos, 2, self.name)
        frames = videos[:, ::max(1, round(self.fps / 8))]  # VBench get_frames: interval = round(fps / 8)
        if frames.shape[1] < 2:
            raise RewardError(f"{self.name}: fewer than 2 frames left after sampling {videos.shape[1]} frames "
                              f"at fps={self.fps} down to 8 fps")
        threshold, count = dynamic_thresholds(*videos.shape[-2:], frames.shape[1], self.fps)
        scores, magnitudes, moving = [], [], []
        for video in frames:
            per_pair = top_flow_magnitude(self.pair_flows(video))
            above = per_pair > threshold
            scores.append(float(above.sum() >= count))
            magnitudes.append(float(per_pair.mean()))
            moving.append(float(above.float().mean()))
        return {key: torch.tensor(values, dtype=torch.float32) for key, values in
                (("score", scores), ("flow_magnitude", magnitudes), ("moving_pairs", moving))}


class MotionSmoothness(_VideoReward):
    """VBench motion smoothness, 1 - MAE between each odd frame and its interpolation from the even frames around
    it (`interpolation_error`). Default interpolator: linear (the neighbours' mean), no weights; pass
    `interpolator(frame0, frame1) -> frame` (e.g. an AMT wrapper) to follow VBench. Differentiable when the
    interpolator is; needs at least 3 frames."""

    name = "video-motion-smoothness"
    differentiable = True

    def __init__(self, interpolator: Callable[[Tensor, Tensor], Tensor] = linear_interpolation, **kwargs):
        super().__init__(**kwargs)
        self.interpolator = interpolator

    def score(self, *, prompts, images, videos, metadata):
        return 1.0 - interpolation_error(videos, self.interpolator)


class FrameReward(Reward):
    """An image reward as a video reward with `aggregate_frames` (InstructVideo's segmental sampling and
    temporal attenuation). Frames are drawn from `seed` (a fixed stream, so repeated calls differ but a run is
    reproducible); `random=False` scores each segment's first frame."""

    inputs = ("videos",)

    def __init__(self, image_reward: str | Reward, num_segments: int = 4, attenuation: float = 1.0,
                 normalize_weights: bool = False, random: bool = True, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        if isinstance(image_reward, str):
            image_reward = load(image_reward)
        if "images" not in image_reward.inputs:
            raise ValueError(f"FrameReward: {image_reward.name} does not score images")
        self.image_reward = image_reward
        self.name = f"frames/{image_reward.name}"
        self.differentiable, self.needs_prompts = image_reward.differentiable, image_reward.needs_prompts
        self.higher_is_better = image_reward.higher_is_better
        self.value_range = None if attenuation and not normalize_weights else image_reward.value_range
        self.num_segments, self.attenuation = num_segments, attenuation
        self.normalize_weights, self.random = normalize_weights, random
        self.generator = torch.Generator().manual_seed(seed)

    def score(self, *, prompts, images, videos, metadata):
        return aggregate_frames(self.image_reward, videos, prompts, self.num_segments, self.attenuation,
                                metadata=metadata, generator=self.generator, random=self.random,
                                normalize_weights=self.normalize_weights)


__all__ = [
    "BackgroundConsistency", "ClipFeatures", "DinoFeatures", "DynamicDegree", "FrameReward", "MotionSmoothness",
    "SubjectConsistency", "TemporalFlicker", "ThumbnailFeatures", "aggregate_frames", "attenuation_weights",
    "dynamic_thresholds", "farneback_flow", "feature_consistency", "interpolation_error", "linear_interpolation",
    "sample_segments", "temporal_flicker", "top_flow_magnitude",
]
