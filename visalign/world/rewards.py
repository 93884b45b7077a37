"""The shapes world's exact verifier as rewards: partial credit with per-concept sub-scores, the strict
judge, and cleanliness (for artifact measurement: RL in the probe drifted into faint background speckle the
verifier ignores); the motion verifier for the video world. Prompts must be in the world's grammar; a spec in
metadata["spec"] takes precedence."""

from __future__ import annotations

import torch

from visalign.rewards.base import Reward
from visalign.world.grammar import COLORS, parse_prompt
from visalign.world.motion import parse_motion_prompt, travel_scores, verify_motion
from visalign.world.verify import cleanliness, shape_fidelity, verify


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


class WorldMotionReward(Reward):
    """The moving-shapes verifier (`visalign.world.motion.verify_motion`) on clips: the fraction of the prompt's
    concepts satisfied (object, direction, speed, stop, temporal consistency), with group sub-scores,
    `direction_correct`, pass, and the mean per-frame cleanliness."""

    name = "world-motion"
    differentiable = False
    value_range = (0.0, 1.0)
    inputs = ("videos",)

    def score(self, *, prompts, images, videos, metadata):
        result = verify_motion(videos, _specs(prompts, metadata))
        out = {k: v.float() for k, v in result.sub_scores().items()}
        out["cleanliness"] = _frame_cleanliness(videos)
        return out


class WorldMotionTravelReward(Reward):
    """The motion verifier's direction concepts, graded (`visalign.world.motion.travel_score`): each object's
    travel along its stated direction (or its stillness) through a sigmoid around the verdict's threshold,
    averaged over the prompt's objects, so that clips which all fail the binary verdict still rank. The
    binary `direction_correct` and pass are returned as sub-scores."""

    name = "world-motion-travel"
    differentiable = False
    value_range = (0.0, 1.0)
    inputs = ("videos",)

    def score(self, *, prompts, images, videos, metadata):
        specs = [parse_motion_prompt(s) if isinstance(s, str) else s for s in _specs(prompts, metadata)]  # once
        result = verify_motion(videos, specs)
        return {"score": travel_scores(result, specs), "direction_correct": result.direction_correct.float(),
                "passed": result.passed.float()}


class WorldStrictReward(WorldVerifierReward):
    """The same with the strict second judge (tighter shape fits, dominant-axis relations)."""

    name = "world-strict"
    strict = True


class WorldCleanlinessReward(Reward):
    """Foreground explained by detected shapes × plain background, in [0, 1]; needs no prompt. On videos, the
    mean over frames."""

    name = "world-cleanliness"
    differentiable = False
    value_range = (0.0, 1.0)
    needs_prompts = False
    inputs = ("images", "videos")

    def score(self, *, prompts, images, videos, metadata):
        if videos is not None:
            return _frame_cleanliness(videos)
        return cleanliness(images).float()


class WorldShapeFidelityReward(Reward):
    """Artifact reward for deformed objects: the mean best shape fit of the detected objects (colourless blobs
    count 0), in [0, 1]; needs no prompt (`visalign.world.verify.shape_fidelity`)."""

    name = "world-shape-fidelity"
    differentiable = False
    value_range = (0.0, 1.0)
    needs_prompts = False

    def score(self, *, prompts, images, videos, metadata):
        return shape_fidelity(images)


def _frame_cleanliness(videos):
    b, f = videos.shape[:2]
    return cleanliness(videos.reshape(b * f, *videos.shape[2:])).view(b, f).mean(1).float()


class WorldSoftReward(Reward):
    """A differentiable proxy of the verifier for gradient steering (guidance, ReNO) in the world; the exact
    verifier stays the judge. Per object of the spec, a soft colour mask m = exp(-||pixel - colour||² / 2 tau²)
    gives its mass (in expected one-shape areas) and centroid; the score averages, over the prompt's concepts,
    presence 1 - exp(-mass / count), and for positions / relations a sigmoid of the centroid offset in the named
    direction (canvas thirds for positions, the other object's centroid for relations). In [0, 1]."""

    name = "world-soft"
    differentiable = True
    value_range = (0.0, 1.0)

    def __init__(self, tau: float = 0.12, sharpness: float = 0.15, **kwargs):
        super().__init__(**kwargs)
        self.tau, self.sharpness = tau, sharpness

    def score(self, *, prompts, images, videos, metadata):
        specs = [s if not isinstance(s, str) else parse_prompt(s) for s in _specs(prompts, metadata)]
        size = images.shape[-1]
        coords = (torch.arange(size, dtype=images.dtype, device=images.device) + 0.5) / size
        area = (0.3 * size) ** 2  # about one medium shape, in pixels
        scores = []
        for image, spec in zip(images, specs, strict=True):
            terms, centres = [], []
            for obj in spec.objects:
                rgb = torch.tensor(COLORS[obj.color], dtype=image.dtype, device=image.device)[:, None, None]
                mask = torch.exp(-(image - rgb).pow(2).sum(0) / (2 * self.tau**2))
                mass = mask.sum()
                terms.append(1 - torch.exp(-mass / (area * obj.count)))
                cx = (mask.sum(0) * coords).sum() / mass.clamp(min=1e-6)
                cy = (mask.sum(1) * coords).sum() / mass.clamp(min=1e-6)
                centres.append((cx, cy))
                if obj.position is not None:
                    offset = {"left": 1 / 3 - cx, "right": cx - 2 / 3, "top": 1 / 3 - cy, "bottom": cy - 2 / 3}
                    terms.append(torch.sigmoid(offset[obj.position] / self.sharpness * 3))
            if spec.relation is not None and len(centres) == 2:
                (ax, ay), (bx, by) = centres
                offset = {"left_of": bx - ax, "right_of": ax - bx, "above": by - ay, "below": ay - by}
                terms.append(torch.sigmoid(offset[spec.relation] / self.sharpness))
            scores.append(torch.stack(terms).mean())
        return torch.stack(scores)
