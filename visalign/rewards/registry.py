"""The reward registry: names → Reward classes (dotted paths, imported on first use so a reward's heavy
dependencies load only when it is used), `load` with cached instances, and option checks without loading."""

from __future__ import annotations

import inspect
import json

from visalign.registry import import_target
from visalign.rewards.base import Reward
from visalign.suggest import did_you_mean

# name -> "module:Class"; modules import lazily so a reward's heavy dependencies load only when used.
REGISTRY: dict[str, str] = {
    "aesthetic": "visalign.rewards.clip_family:LaionAesthetic",
    "pickscore": "visalign.rewards.clip_family:PickScore",
    "hpsv2": "visalign.rewards.clip_family:HPSv2",
    "hpsv2.1": "visalign.rewards.clip_family:HPSv21",
    "clipscore": "visalign.rewards.clip_family:CLIPScore",
    "imagereward": "visalign.rewards.imagereward:ImageReward",
    "artifact": "visalign.rewards.artifact:ArtifactReward",
    "quality-nss": "visalign.rewards.quality:NSSQuality",
    "video-flicker": "visalign.rewards.video:TemporalFlicker",
    "video-subject-consistency": "visalign.rewards.video:SubjectConsistency",
    "video-background-consistency": "visalign.rewards.video:BackgroundConsistency",
    "video-dynamic-degree": "visalign.rewards.video:DynamicDegree",
    "video-motion-smoothness": "visalign.rewards.video:MotionSmoothness",
    "videoalign": "visalign.rewards.videoalign:VideoAlignReward",
    "concepts-detector": "visalign.rewards.concepts:DetectorConceptReward",
    "concepts-vqa": "visalign.rewards.concepts:VQAConceptReward",
    "vlm-judge": "visalign.rewards.vqa:VLMJudgeReward",
    "world-verifier": "visalign.world.rewards:WorldVerifierReward",
    "world-strict": "visalign.world.rewards:WorldStrictReward",
    "world-cleanliness": "visalign.world.rewards:WorldCleanlinessReward",
    "world-shape-fidelity": "visalign.world.rewards:WorldShapeFidelityReward",
    "world-soft": "visalign.world.rewards:WorldSoftReward",
    "world-motion": "visalign.world.rewards:WorldMotionReward",
    "world-motion-travel": "visalign.world.rewards:WorldMotionTravelReward",
    "saturation": "visalign.rewards.style:Saturation",
    "saturation-area": "visalign.rewards.style:SaturatedArea",
    "brightness": "visalign.rewards.style:Brightness",
    "source-l1": "visalign.rewards.edit:SourceL1",
}

_CACHE: dict[tuple, Reward] = {}
# "frames/<image reward>": the image reward on video frames with InstructVideo's segmental sampling and
# temporal attenuation (`visalign.rewards.video.FrameReward`), e.g. "frames/pickscore" in a video trainer's rewards.
FRAMES_PREFIX = "frames/"
FRAME_REWARD = "visalign.rewards.video:FrameReward"


def register(name: str, target: str) -> None:
    """Register `name` → "module:Class" (or "module.Class")."""
    REGISTRY[name] = target


def list_rewards() -> list[str]:
    return sorted(REGISTRY)


def describe(name: str) -> dict:
    """A reward's class attributes (no weights load): class, differentiable, inputs (and whether it judges an edit
    against its source image), value range, direction."""
    cls = _resolve(name)
    inputs = "/".join(cls.inputs) + (" + source images" if cls.uses_source_images else "")
    return {"name": name, "class": f"{cls.__module__}.{cls.__qualname__}", "differentiable": cls.differentiable,
            "inputs": inputs, "uses_source_images": cls.uses_source_images, "value_range": cls.value_range,
            "higher_is_better": cls.higher_is_better,
            "summary": summary(cls.__doc__)}


def summary(doc: str | None, limit: int = 160) -> str:
    """A docstring's first paragraph on one line, whole when short, else cut after its last full sentence (or
    word) that fits: never mid-word, marked with "…" when cut."""
    text = " ".join((doc or "").strip().split("\n\n")[0].split())
    if len(text) <= limit:
        return text
    head = text[:limit]
    end = head.rfind(". ")
    return head[:end + 1] if end > limit // 3 else head[:head.rfind(" ")] + " …"


def _resolve(name: str) -> type[Reward]:
    if name.startswith(FRAMES_PREFIX):  # an image reward scored on video frames
        if "images" not in _resolve(name[len(FRAMES_PREFIX):]).inputs:
            raise ValueError(f"reward {name!r}: {name[len(FRAMES_PREFIX):]!r} does not score images")
        return import_target(FRAME_REWARD)
    target = REGISTRY.get(name)
    if target is None and "." not in name:
        raise ValueError(f"unknown reward {name!r}{did_you_mean(name, list_rewards())}; allowed: "
                         f"{', '.join(list_rewards())} or a dotted path")
    target = target or name
    try:
        cls = import_target(target)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import reward {name!r} ({target}): {err}") from err
    if not (isinstance(cls, type) and issubclass(cls, Reward)):
        raise ValueError(f"{target} is not a visalign.rewards.Reward subclass")
    return cls


def check_options(name: str, options: dict) -> None:
    """Raise ValueError naming the `options` that reward `name`'s constructor does not take, without building it.

    A constructor's `**kwargs` are taken to go on to its base class's (every shipped reward does so), so the
    allowed names are collected up the class hierarchy; a chain that never lists its parameters accepts anything
    here, and the constructor checks them when the reward loads."""
    cls, allowed = _resolve(name), []
    if "dtype" in options:
        _dtype(name, options["dtype"])
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


def _dtype(name: str, value):
    """A `dtype` option as torch's dtype: configs name it ("bfloat16" keeps a reward model in half the memory)."""
    import torch

    from visalign.models import DTYPES  # the names model.dtype takes

    if isinstance(value, torch.dtype):
        return value
    if value not in DTYPES:
        raise ValueError(f"reward {name!r}: dtype={value!r}; allowed: {', '.join(DTYPES)}")
    return DTYPES[value]


def load(name: str, **kwargs) -> Reward:
    """The reward `name` (registered, "frames/<image reward>", or a dotted path to a Reward subclass) built
    with kwargs.

    Instances are cached by (name, kwargs), so weights load once per process and are reused."""
    key = (name, json.dumps(kwargs, sort_keys=True, default=str))
    if key not in _CACHE:
        if name.startswith(FRAMES_PREFIX):
            kwargs = {"image_reward": name[len(FRAMES_PREFIX):], **kwargs}
        if "dtype" in kwargs:
            kwargs = {**kwargs, "dtype": _dtype(name, kwargs["dtype"])}
        _CACHE[key] = _resolve(name)(**kwargs)
    return _CACHE[key]
