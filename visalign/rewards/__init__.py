"""Reward models behind one contract (`visalign.rewards.base.Reward`), a name → class registry with a dotted-path
fallback, and the rewards shipped with visalign.

    >>> from visalign import rewards
    >>> r = rewards.load("world-verifier")
    >>> out = r(prompts=["a red circle"], images=images)   # dict of sub-scores plus "score"
"""

from visalign.rewards.base import Reward, RewardError, RewardOutput, combined
from visalign.rewards.registry import REGISTRY, check_options, describe, list_rewards, load, register

__all__ = ["REGISTRY", "Reward", "RewardError", "RewardOutput", "check_options", "combined", "describe", "list_rewards",
           "load", "register"]
