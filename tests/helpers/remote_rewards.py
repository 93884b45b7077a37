"""Rewards for the reward-server tests, importable by dotted path from a server or worker process."""

import time

import torch

from visalign.rewards.base import Reward
from visalign.rewards.clip_family import PickScore, tiny_hf_clip, tiny_hf_tokenizer


class TinyPickScore(PickScore):
    """PickScore on the tiny random CLIP (`PickScore.tiny`), buildable by name: a model reward with prompts."""

    def __init__(self, seed: int = 0, **kwargs):
        super().__init__(model=tiny_hf_clip(seed), tokenizer=tiny_hf_tokenizer(), **kwargs)


class SubScores(Reward):
    """Sub-scores plus "score": the red channel's mean, a sub-score that is NaN for odd samples (not applicable),
    and their combination."""

    name = "test-sub-scores"
    needs_prompts = False
    value_range = (0.0, 1.0)

    def score(self, *, prompts, images, videos, metadata):
        red = images[:, 0].mean(dim=(1, 2))
        green = images[:, 1].mean(dim=(1, 2))
        odd = torch.arange(len(images)) % 2 == 1
        return {"red": red, "green_even": torch.where(odd, torch.full_like(green, float("nan")), green),
                "score": (red + green) / 2}


class Slow(Reward):
    """Brightness after a pause: a request that is still running when the server is killed."""

    name = "test-slow"
    needs_prompts = False

    def score(self, *, prompts, images, videos, metadata):
        time.sleep(2.0)
        return images.mean(dim=(1, 2, 3))
