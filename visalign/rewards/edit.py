"""Rewards that judge an edit against the image it started from (`uses_source_images`)."""

from __future__ import annotations

import torch.nn.functional as F

from visalign.rewards.base import Reward


class SourceL1(Reward):
    """How much of the source an edit keeps: 1 − mean |edit − source| over pixels in [0, 1], MagicBrush's L1
    metric turned into a reward (Zhang et al. 2023, "MagicBrush", §4: L1 between edited and source image). A
    source of another size is resized to the edit's (bilinear). In [0, 1]; differentiable. Balance it against an
    instruction-following reward: alone it pays for not editing at all."""

    name = "source-l1"
    differentiable = True
    needs_prompts = False
    uses_source_images = True
    value_range = (0.0, 1.0)

    def score(self, *, prompts, images, videos, metadata, source_images):
        source = source_images.to(images.device, images.dtype)
        if source.shape[-2:] != images.shape[-2:]:
            source = F.interpolate(source, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return 1 - (images - source).abs().mean(dim=(1, 2, 3))
