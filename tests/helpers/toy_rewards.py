"""Small rewards for trainer tests: cheap, deterministic, for images and videos."""

import torch

from visalign.rewards.base import Reward


class MeanBrightness(Reward):
    """Mean pixel value: a reward any model can move."""

    name = "test-brightness"
    differentiable = True
    needs_prompts = False
    inputs = ("images", "videos")
    value_range = (0.0, 1.0)

    def score(self, *, prompts, images, videos, metadata):
        x = images if images is not None else videos
        return x.float().mean(dim=tuple(range(1, x.ndim)))


class NaNForRedPrompts(Reward):
    """Brightness, but NaN for every prompt that mentions red (a reward failing on some samples)."""

    name = "test-nan-red"
    needs_prompts = True

    def score(self, *, prompts, images, videos, metadata):
        score = images.mean(dim=(1, 2, 3))
        bad = torch.tensor(["red" in p for p in prompts])
        return torch.where(bad, torch.full_like(score, float("nan")), score)


class AlwaysNaN(Reward):
    name = "test-all-nan"
    needs_prompts = False

    def score(self, *, prompts, images, videos, metadata):
        return torch.full((images.shape[0],), float("nan"))


class Darkness(Reward):
    """1 - mean pixel value: exactly what MeanBrightness trades away (a held-out signal for alarm tests)."""

    name = "test-darkness"
    needs_prompts = False
    inputs = ("images", "videos")
    value_range = (0.0, 1.0)

    def score(self, *, prompts, images, videos, metadata):
        x = images if images is not None else videos
        return 1 - x.float().mean(dim=tuple(range(1, x.ndim)))


class RedChannel(Reward):
    """Mean of the red channel: partly aligned with MeanBrightness (a second reward for balancing tests)."""

    name = "test-red"
    differentiable = True
    needs_prompts = False
    inputs = ("images", "videos")
    value_range = (0.0, 1.0)

    def score(self, *, prompts, images, videos, metadata):
        x = images if images is not None else videos
        return x.float().select(-3, 0).mean(dim=tuple(range(1, x.ndim - 1)))


class BatchPosition(Reward):
    """The sample's position in its scoring batch: different rewards for identical samples (a pure-noise signal)."""

    name = "test-batch-position"
    needs_prompts = False
    inputs = ("images", "videos")

    def score(self, *, prompts, images, videos, metadata):
        x = images if images is not None else videos
        return torch.arange(x.shape[0], dtype=torch.float32)


class Constant(Reward):
    """0.5 for every sample: no group has any spread, so no advantage is non-zero."""

    name = "test-constant"
    differentiable = False
    needs_prompts = False
    inputs = ("images", "videos")
    value_range = (0.0, 1.0)

    def score(self, *, prompts, images, videos, metadata):
        x = images if images is not None else videos
        return torch.full((x.shape[0],), 0.5)


class NaNOnSecondCall(Reward):
    """Brightness, except that its second call returns NaN for every sample (one step with no valid reward)."""

    name = "test-nan-second"
    needs_prompts = False

    def __init__(self):
        super().__init__()
        self.calls = 0

    def score(self, *, prompts, images, videos, metadata):
        self.calls += 1
        score = images.mean(dim=(1, 2, 3))
        return torch.full_like(score, float("nan")) if self.calls == 2 else score


class Broken(Reward):
    """A reward whose code fails (a held-out or trained reward with a bug)."""

    name = "test-broken"
    needs_prompts = False

    def score(self, *, prompts, images, videos, metadata):
        raise KeyError("model_head")


class RecordingSourceL1(Reward):
    """`source-l1`'s score, recording the source images each call received (class-level, for trainer tests)."""

    name = "test-source-l1"
    differentiable = True
    needs_prompts = False
    uses_source_images = True
    seen: list = []

    def score(self, *, prompts, images, videos, metadata, source_images):
        RecordingSourceL1.seen.append((source_images.clone(), [m.get("source_image") for m in metadata]))
        return 1 - (images - source_images).abs().mean(dim=(1, 2, 3))
