"""Style statistics as rewards, no weights: colour saturation and brightness. Simple on purpose: a style reward
to balance against the others, and a deliberately hackable proxy (saturated colour area) for alarm tests."""

from __future__ import annotations

import torch

from visalign.rewards.base import Reward


def hsv_saturation(images: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-pixel HSV saturation (max − min) / max of RGB in [0, 1]: [..., 3, H, W] -> [..., H, W]."""
    hi = images.amax(dim=-3)
    lo = images.amin(dim=-3)
    return (hi - lo) / (hi + eps)


def luma(images: torch.Tensor) -> torch.Tensor:
    """Per-pixel luma, Rec. 601 (0.299 R + 0.587 G + 0.114 B), of RGB in [0, 1]: [..., 3, H, W] -> [..., H, W]."""
    w = torch.tensor([0.299, 0.587, 0.114], device=images.device, dtype=images.dtype).view(3, 1, 1)
    return (images * w).sum(dim=-3)


class Saturation(Reward):
    """Colour saturation: the mean HSV saturation of all pixels ("mean"), or the soft fraction of pixels whose
    saturation exceeds `threshold` ("area", sigmoid with width 0.05). In [0, 1]; differentiable."""

    name = "saturation"
    differentiable = True
    needs_prompts = False
    inputs = ("images", "videos")
    value_range = (0.0, 1.0)

    def __init__(self, mode: str = "mean", threshold: float = 0.5, **kwargs):
        if mode not in ("mean", "area"):
            raise ValueError(f"saturation mode {mode!r}: allowed mean, area")
        super().__init__(**kwargs)
        self.mode, self.threshold = mode, threshold

    def score(self, *, prompts, images, videos, metadata):
        x = (images if images is not None else videos).float()
        s = hsv_saturation(x)
        if self.mode == "area":
            s = torch.sigmoid((s - self.threshold) / 0.05)
        return s.mean(dim=tuple(range(1, s.ndim)))


class Brightness(Reward):
    """Mean luma (Rec. 601: 0.299 R + 0.587 G + 0.114 B). In [0, 1]; differentiable."""

    name = "brightness"
    differentiable = True
    needs_prompts = False
    inputs = ("images", "videos")
    value_range = (0.0, 1.0)

    def score(self, *, prompts, images, videos, metadata):
        y = luma((images if images is not None else videos).float())
        return y.mean(dim=tuple(range(1, y.ndim)))


class SaturatedArea(Saturation):
    """The soft fraction of strongly saturated pixels (saturation > 0.5): a deliberately hackable proxy — it pays
    for coloured area however it is made, which the hacking-alarm bench relies on."""

    name = "saturation-area"

    def __init__(self, threshold: float = 0.5, **kwargs):
        super().__init__(mode="area", threshold=threshold, **kwargs)
