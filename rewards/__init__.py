"""Reward models behind one contract (`rewards.base.Reward`), a name → class registry with a dotted-path
fallback, and the rewards shipped with visalign.

    >>> import rewards
    >>> r = rewards.load("world-verifier")
    >>> out = r(prompts=["a red circle"], images=images)   # dict of sub-scores plus "score"
"""

from __future__ import annotations

import importlib
import json

from rewards.base import Reward, RewardError, RewardOutput, combined

# name -> "module:Class"; modules import lazily so a reward's heavy dependencies load only when used.
REGISTRY: dict[str, str] = {
    "aesthetic": "rewards.clip_family:LaionAesthetic",
    "pickscore": "rewards.clip_family:PickScore",
    "hpsv2": "rewards.clip_family:HPSv2",
    "hpsv2.1": "rewards.clip_family:HPSv21",
    "clipscore": "rewards.clip_family:CLIPScore",
    "imagereward": "rewards.imagereward:ImageReward",
    "artifact": "rewards.artifact:ArtifactReward",
    "quality-nss": "rewards.quality:NSSQuality",
    "video-flicker": "rewards.video:TemporalFlicker",
    "video-subject-consistency": "rewards.video:SubjectConsistency",
    "video-background-consistency": "rewards.video:BackgroundConsistency",
    "video-dynamic-degree": "rewards.video:DynamicDegree",
    "video-motion-smoothness": "rewards.video:MotionSmoothness",
    "videoalign": "rewards.videoalign:VideoAlignReward",
    "concepts-detector": "rewards.concepts:DetectorConceptReward",
    "concepts-vqa": "rewards.concepts:VQAConceptReward",
    "vlm-judge": "rewards.vqa:VLMJudgeReward",
    "world-verifier": "rewards.world:WorldVerifierReward",
    "world-strict": "rewards.world:WorldStrictReward",
    "world-cleanliness": "rewards.world:WorldCleanlinessReward",
    "world-shape-fidelity": "rewards.world:WorldShapeFidelityReward",
    "world-soft": "rewards.world:WorldSoftReward",
    "world-motion": "rewards.world:WorldMotionReward",
    "world-motion-travel": "rewards.world:WorldMotionTravelReward",
    "saturation": "rewards.style:Saturation",
    "saturation-area": "rewards.style:SaturatedArea",
    "brightness": "rewards.style:Brightness",
}

_CACHE: dict[tuple, Reward] = {}
# "frames/<image reward>": the image reward on video frames with InstructVideo's segmental sampling and
# temporal attenuation (`rewards.video.FrameReward`), e.g. "frames/pickscore" in a video trainer's rewards.
FRAMES_PREFIX = "frames/"


def register(name: str, target: str) -> None:
    """Register `name` → "module:Class" (or "module.Class")."""
    REGISTRY[name] = target


def list_rewards() -> list[str]:
    return sorted(REGISTRY)


def describe(name: str) -> dict:
    """A reward's class attributes (no weights load): class, differentiable, inputs, value range, direction."""
    cls = _resolve(name)
    return {"name": name, "class": f"{cls.__module__}.{cls.__qualname__}", "differentiable": cls.differentiable,
            "inputs": "/".join(cls.inputs), "value_range": cls.value_range, "higher_is_better": cls.higher_is_better,
            "summary": (cls.__doc__ or "").strip().split("\n")[0]}


def _resolve(name: str) -> type[Reward]:
    if name.startswith(FRAMES_PREFIX):  # an image reward scored on video frames
        from rewards.video import FrameReward

        if "images" not in _resolve(name[len(FRAMES_PREFIX):]).inputs:
            raise ValueError(f"reward {name!r}: {name[len(FRAMES_PREFIX):]!r} does not score images")
        return FrameReward
    target = REGISTRY.get(name)
    if target is None and "." not in name:
        raise ValueError(f"unknown reward {name!r}; allowed: {', '.join(list_rewards())} or a dotted path")
    target = target or name
    module, _, attr = target.replace(":", ".").rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import reward {name!r} ({target}): {err}") from err
    if not (isinstance(cls, type) and issubclass(cls, Reward)):
        raise ValueError(f"{target} is not a rewards.Reward subclass")
    return cls


def check_options(name: str, options: dict) -> None:
    """Raise ValueError naming the `options` that reward `name`'s constructor does not take, without building it.

    A constructor's `**kwargs` are taken to go on to its base class's (every shipped reward does so), so the
    allowed names are collected up the class hierarchy; a chain that never lists its parameters accepts anything
    here, and the constructor checks them when the reward loads."""
    import inspect

    cls, allowed = _resolve(name), []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        allowed += [p.name for p in params
                    if p.kind is not inspect.Parameter.VAR_KEYWORD and p.name != "self" and p.name not in allowed]
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            break
    else:
        return
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"reward {name!r}: {cls.__name__} takes no option {unknown}; it takes {allowed}")


def load(name: str, **kwargs) -> Reward:
    """The reward `name` (registered, "frames/<image reward>", or a dotted path to a Reward subclass) built
    with kwargs.

    Instances are cached by (name, kwargs), so weights load once per process and are reused."""
    key = (name, json.dumps(kwargs, sort_keys=True, default=str))
    if key not in _CACHE:
        if name.startswith(FRAMES_PREFIX):
            kwargs = {"image_reward": name[len(FRAMES_PREFIX):], **kwargs}
        _CACHE[key] = _resolve(name)(**kwargs)
    return _CACHE[key]


__all__ = ["REGISTRY", "Reward", "RewardError", "RewardOutput", "check_options", "combined", "describe", "list_rewards",
           "load", "register"]
