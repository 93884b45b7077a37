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
    "vlm-rm": "visalign.rewards.clip_family:VLMRM",
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
    "dragon-mmd": "visalign.rewards.dragon:DistributionReward",
    "ocr": "visalign.rewards.ocr:OCRAccuracy",
}

_CACHE: dict[tuple, Reward] = {}
# "frames/<image reward>": the image reward on video frames with InstructVideo's segmental sampling and
# temporal attenuation (`visalign.rewards.video.FrameReward`), e.g. "frames/pickscore" in a video trainer's rewards.
FRAMES_PREFIX = "frames/"
FRAME_REWARD = "visalign.rewards.video:FrameReward"
# "remote:http://HOST:PORT/NAME": NAME on a `visalign serve-rewards` server; "worker:PYTHON:NAME": NAME served by a
# worker process of another interpreter (`visalign.rewards.remote`). Their properties are the served reward's.
SERVICES = {"remote:": "visalign.rewards.remote:RemoteReward", "worker:": "visalign.rewards.remote:WorkerReward"}
# "<transform>(<member>,...)": a reward built from others (`visalign.rewards.compose`), e.g. "ensemble(pickscore,hpsv2)"
# or nested "par(weighted-sum(aesthetic,artifact))"; its options (e.g. `ref`, `mode`) come from the class's
# `named_args`, its members' options from `member_options`.
COMPOSITES: dict[str, str] = {
    "weighted-sum": "visalign.rewards.compose:WeightedSum",
    "log-sigmoid": "visalign.rewards.compose:LogSigmoidSum",
    "par": "visalign.rewards.compose:PARSigmoid",
    "ensemble": "visalign.rewards.compose:Ensemble",
}


def register(name: str, target: str) -> None:
    """Register `name` → "module:Class" (or "module.Class")."""
    REGISTRY[name] = target


def list_rewards() -> list[str]:
    return sorted(REGISTRY)


def composite_parts(name: str) -> tuple[str, list[str]] | None:
    """("ensemble", ["pickscore", "hpsv2"]) for "ensemble(pickscore,hpsv2)" (members split at top-level commas, so
    they may be composites themselves); None for a name without parentheses."""
    head, paren, rest = name.partition("(")
    if not paren or not head.replace("-", "").isalnum():  # frames/..., dotted paths and URLs are not transforms
        return None
    if head not in COMPOSITES:
        raise ValueError(f"reward {name!r}: unknown transform {head!r}{did_you_mean(head, list(COMPOSITES))}; "
                         f"allowed: {', '.join(COMPOSITES)}")
    members, depth, start = [], 0, 0
    for i, char in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth < 0 or (depth == 0 and char == ","):
            members.append(rest[start:i].strip())
            start = i + 1
            if depth < 0:
                break
    if depth >= 0 or rest[start:] or not all(members) or len(set(members)) != len(members):
        raise ValueError(f"reward {name!r}: write {head}(reward,...) with distinct member names, each a reward "
                         "name, dotted path or transform; parentheses must balance")
    return head, members


def describe(name: str) -> dict:
    """A reward's class attributes (no weights load): class, differentiable, inputs (and whether it judges an edit
    against its source image), value range, direction."""
    cls, attrs = _attributes(name)
    inputs = "/".join(attrs["inputs"]) + (" + source images" if attrs["uses_source_images"] else "")
    return {"name": name, "class": f"{cls.__module__}.{cls.__qualname__}", **attrs, "inputs": inputs,
            "summary": summary(cls.__doc__)}


def _attributes(name: str) -> tuple[type[Reward], dict]:
    """A reward's class and the attributes `describe` reports, without building it; a transform's come from its
    members: differentiable if all are, the input kinds they share, source images if any judges an edit."""
    cls = _resolve(name)
    if (prefix := _service(name)) is not None:  # a served reward: its server says (a worker's once it runs)
        return cls, cls.describe_spec(name[len(prefix):])
    keys = ("differentiable", "inputs", "uses_source_images", "value_range", "higher_is_better", "groupwise",
            "min_group_size")
    attrs = {key: getattr(cls, key) for key in keys}
    parts = composite_parts(name)
    if parts is not None:
        members = {member: _attributes(member)[1] for member in parts[1]}
        attrs.update(differentiable=all(m["differentiable"] for m in members.values()),
                     inputs=tuple(k for k in ("images", "videos") if all(k in m["inputs"] for m in members.values())),
                     uses_source_images=any(m["uses_source_images"] for m in members.values()))
        if not attrs["inputs"]:
            kinds = {member: m["inputs"] for member, m in members.items()}
            raise ValueError(f"reward {name!r}: its members share no input kind: {kinds}")
        grouped = [member for member, m in members.items() if m["groupwise"]]
        if grouped:
            raise ValueError(f"reward {name!r}: a transform combines per-sample scores; {grouped} score groups")
    return cls, attrs


def summary(doc: str | None, limit: int = 160) -> str:
    """A docstring's first paragraph on one line, whole when short, else cut after its last full sentence (or
    word) that fits: never mid-word, marked with "…" when cut."""
    text = " ".join((doc or "").strip().split("\n\n")[0].split())
    if len(text) <= limit:
        return text
    head = text[:limit]
    end = head.rfind(". ")
    return head[:end + 1] if end > limit // 3 else head[:head.rfind(" ")] + " …"


def _service(name: str) -> str | None:
    """The `SERVICES` prefix `name` starts with, if any."""
    return next((prefix for prefix in SERVICES if name.startswith(prefix)), None)


def _resolve(name: str) -> type[Reward]:
    if (prefix := _service(name)) is not None:  # a reward served by another process
        cls = import_target(SERVICES[prefix])
        cls.parse_spec(name[len(prefix):])  # a malformed address or a missing interpreter fails here
        return cls
    if name.startswith(FRAMES_PREFIX):  # an image reward scored on video frames
        if "images" not in _attributes(name[len(FRAMES_PREFIX):])[1]["inputs"]:
            raise ValueError(f"reward {name!r}: {name[len(FRAMES_PREFIX):]!r} does not score images")
        return import_target(FRAME_REWARD)
    parts = composite_parts(name)
    if parts is not None:
        return import_target(COMPOSITES[parts[0]])
    target = REGISTRY.get(name)
    if target is None and "." not in name:
        raise ValueError(f"unknown reward {name!r}{did_you_mean(name, list_rewards())}; allowed: "
                         f"{', '.join(list_rewards())}, a dotted path or a transform {'/'.join(COMPOSITES)}"
                         "(reward,...)")
    target = target or name
    try:
        cls = import_target(target)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import reward {name!r} ({target}): {err}") from err
    if not (isinstance(cls, type) and issubclass(cls, Reward)):
        raise ValueError(f"{target} is not a visalign.rewards.Reward subclass")
    return cls


def check_options(name: str, options: dict) -> None:
    """Raise ValueError naming the `options` that reward `name`'s constructor does not take, or whose values its
    `validate_options` refuses, without building it.

    A constructor's `**kwargs` are taken to go on to its base class's (every shipped reward does so), so the
    allowed names are collected up the class hierarchy; a chain that never lists its parameters accepts anything
    here, and the constructor checks them when the reward loads. A transform's options are its class's
    `named_args` keywords, checked with their values (and each member's `member_options`, recursively)."""
    if composite_parts(name) is not None:
        return _check_composite_options(name, options)
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
    cls.validate_options(options)


def _check_composite_options(name: str, options: dict) -> None:
    head, members = composite_parts(name)
    cls = _attributes(name)[0]  # every member exists and they share an input kind
    params = [p for p in inspect.signature(cls.named_args).parameters.values() if p.kind is p.KEYWORD_ONLY]
    allowed = [p.name for p in params]
    missing = [p.name for p in params if p.default is p.empty and p.name not in options]
    unknown = sorted(set(options) - set(allowed))
    if unknown or missing:
        raise ValueError(f"reward {name!r}: {head} takes options {allowed}"
                         f"{f', needs {missing}' if missing else ''}{f'; got {unknown}' if unknown else ''}")
    cls.named_args(name, members, **options)  # the values, before any member loads
    member_options = options.get("member_options") or {}
    if not isinstance(member_options, dict) or any(k not in members for k in member_options):
        raise ValueError(f"reward {name!r}: member_options must be {{member: {{option: value}}}} over its members "
                         f"{members}, got {member_options!r}")
    for member, member_opts in member_options.items():
        check_options(member, member_opts)


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
    """The reward `name` (registered, "frames/<image reward>", a transform "<name>(<member>,...)" or a dotted path
    to a Reward subclass) built with kwargs.

    Instances are cached by (name, kwargs), so weights load once per process and are reused."""
    key = (name, json.dumps(kwargs, sort_keys=True, default=str))
    if key not in _CACHE:
        parts = composite_parts(name)
        if parts is not None:
            check_options(name, kwargs)
            kwargs = {"name": name, **_resolve(name).named_args(name, parts[1], **kwargs)}
        if name.startswith(FRAMES_PREFIX):
            kwargs = {"image_reward": name[len(FRAMES_PREFIX):], **kwargs}
        if (prefix := _service(name)) is not None:
            kwargs = {**kwargs, **_resolve(name).parse_spec(name[len(prefix):])}  # the name says where
        if "dtype" in kwargs:
            kwargs = {**kwargs, "dtype": _dtype(name, kwargs["dtype"])}
        _CACHE[key] = _resolve(name)(**kwargs)
    return _CACHE[key]
