"""The shapes world's exact verifier as rewards: partial credit with per-concept sub-scores, the strict
judge, and cleanliness (for artifact measurement: RL in the probe drifted into faint background speckle the
verifier ignores). Prompts must be in the world's grammar; a spec in metadata["spec"] takes precedence."""

from __future__ import annotations

from rewards.base import Reward
from visalign.world.verify import cleanliness, verify


def _specs(prompts, metadata):
    if metadata is not None and all("spec" in m for m in metadata):
        return [m["spec"] for m in metadata]
    return list(prompts)


class WorldVerifierReward(Reward):
    """Fraction of the prompt's concepts satisfied (main judge), with group sub-scores, pass and cleanliness."""

    name = "world-verifier"
    differentiable = False
    value_range = (0.0, 1.0)
    strict = False

    def score(self, *, prompts, images, videos, metadata):
        result = verify(images, _specs(prompts, metadata), strict=self.strict)
        out = {k: v.float() for k, v in result.sub_scores().items()}
        out["cleanliness"] = cleanliness(images).float()
        return out


class WorldStrictReward(WorldVerifierReward):
    """The same with the strict second judge (tighter shape fits, dominant-axis relations)."""

    name = "world-strict"
    strict = True


class WorldCleanlinessReward(Reward):
    """Foreground explained by detected shapes × plain background, in [0, 1]; needs no prompt."""

    name = "world-cleanliness"
    differentiable = False
    value_range = (0.0, 1.0)
    needs_prompts = False

    def score(self, *, prompts, images, videos, metadata):
        return cleanliness(images).float()
