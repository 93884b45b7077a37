"""The shapes world's video variant: prompts with motion, rendered clips and an exact motion verifier.

A clip is `NUM_FRAMES` = 9 frames of the 32x32 canvas (tensor [F, 3, 32, 32] in [0, 1]), objects drawn by the
image renderer frame by frame. Templates:

    template     example prompt                                          concepts checked
    motion       "a red circle moving right"                             object, direction
    speed        "a blue square moving up quickly"                       object, direction, speed
    still        "a green triangle standing still"                       object, direction (= still)
    stop         "a cyan circle moving left then stopping"               object, direction, stop
    two_motion   "a red circle moving left and a blue square moving up"  both objects and both directions

Motion is constant velocity from frame 0 ("stop": for the first `STOP_FRAME` frames, then at rest). Speeds are
in pixels per frame: "slowly" 0.75-1 (6-8 px over the clip), "quickly" 1.75-2.25 (14-18 px), unspecified
1-2. The verifier tracks each mentioned object through the frames with the image verifier's detections
(`verify.detect_objects`) and judges:

- object: the object's colour is found in every frame and its shape in at least 2/3 of them;
- direction: the displacement first -> last frame along the stated axis is >= MIN_TRAVEL px and dominates the
  displacement across it; "still": the object never strays more than STILL_RADIUS px from where it started;
- speed: the travel is <= SLOW_MAX ("slowly") or >= FAST_MIN ("quickly");
- stop: it travels >= MIN_TRAVEL by frame STOP_FRAME in the stated direction, then stays within STILL_RADIUS;
- consistency: its area changes by less than CONSISTENCY_AREA (relative) between consecutive frames and no
  frame holds an object that is not mentioned (temporal consistency of subject and scene).

Renders satisfy every rule with margin, so the verifier passes ground-truth clips.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from functools import cache
from itertools import permutations, product

import numpy as np
import torch

from visalign.world.grammar import COLORS, SHAPES, choose_heldout, seed_from
from visalign.world.render import BORDER, CANVAS, PlacedShape, _boxes_apart, _jittered_rgb, draw_layout
from visalign.world.verify import MAIN_JUDGE, Detection, detect_objects

NUM_FRAMES = 9
STOP_FRAME = 4  # "then stopping": moving for frames 0..4, at rest for 4..8
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
SPEED_WORDS = ("slowly", "quickly")
SPEED_RANGES: dict[str | None, tuple[float, float]] = {"slowly": (0.75, 1.0), None: (1.0, 2.0),
                                                       "quickly": (1.75, 2.25)}
STOP_SPEED = (1.75, 2.25)
WIDTH_RANGE = (7.0, 10.0)
MOTION_TEMPLATES = ("motion", "speed", "still", "stop", "two_motion")
# Verifier thresholds (px). Renders travel >= 6 px (slow) / >= 7 px (stop's first half) and at rest move 0.
MIN_TRAVEL = 3.0
STILL_RADIUS = 1.5
SLOW_MAX = 10.5
FAST_MIN = 11.0
CONSISTENCY_AREA = 0.5
SHAPE_FRAMES = 2 / 3
HELDOUT_FRACTION = 0.22
MOTION_VOCABULARY = frozenset(["a", "and", "moving", "standing", "still", "then", "stopping", *COLORS, *SHAPES,
                               *DIRECTIONS, *SPEED_WORDS])


@dataclass(frozen=True)
class MovingObject:
    """One object and its motion: `direction` is a key of DIRECTIONS or "still"; `speed` "slowly" / "quickly" /
    None; `stops` means it moves, then stops at STOP_FRAME."""

    color: str
    shape: str
    direction: str
    speed: str | None = None
    stops: bool = False

    def __post_init__(self):
        _check("color", self.color, tuple(COLORS))
        _check("shape", self.shape, SHAPES)
        _check("direction", self.direction, (*DIRECTIONS, "still"))
        _check("speed", self.speed, (None, *SPEED_WORDS))
        if self.direction == "still" and (self.speed or self.stops):
            raise ValueError("a still object has no speed and does not stop")
        if self.speed and self.stops:
            raise ValueError("the grammar does not combine a speed with stopping")

    @property
    def phrase(self) -> str:
        if self.direction == "still":
            return f"a {self.color} {self.shape} standing still"
        words = f"a {self.color} {self.shape} moving {self.direction}"
        if self.speed:
            words += f" {self.speed}"
        return words + (" then stopping" if self.stops else "")


@dataclass(frozen=True)
class MotionSpec:
    """A motion prompt: its template and its one or two moving objects."""

    template: str
    objects: tuple[MovingObject, ...]

    def __post_init__(self):
        _check("template", self.template, MOTION_TEMPLATES)
        n = 2 if self.template == "two_motion" else 1
        if len(self.objects) != n:
            raise ValueError(f"template {self.template!r} has {n} object(s), got {len(self.objects)}")
        if _template_of(self.objects) != self.template:
            raise ValueError(f"objects {self.objects} do not form template {self.template!r}")

    @property
    def prompt(self) -> str:
        return " and ".join(obj.phrase for obj in self.objects)


def _check(field: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{field}={value!r} is not one of {allowed}")


def _template_of(objects: tuple[MovingObject, ...]) -> str:
    if len(objects) == 2:
        a, b = objects
        ok = (a.direction != b.direction and "still" not in (a.direction, b.direction)
              and not (a.speed or b.speed or a.stops or b.stops) and (a.color, a.shape) != (b.color, b.shape))
        return "two_motion" if ok else "invalid"
    obj = objects[0]
    if obj.direction == "still":
        return "still"
    return "stop" if obj.stops else "speed" if obj.speed else "motion"


def parse_motion_prompt(text: str) -> MotionSpec:
    """Parse a motion prompt into its `MotionSpec`; ValueError naming the problem otherwise."""
    words = text.split()
    unknown = [w for w in words if w not in MOTION_VOCABULARY]
    if unknown:
        raise ValueError(f"unknown word(s) {unknown} in motion prompt {text!r}")
    phrases, current = [], []
    for word in words:
        if word == "and":
            phrases.append(current)
            current = []
        else:
            current.append(word)
    phrases.append(current)
    objects = tuple(_parse_object(p, text) for p in phrases)
    if len(objects) > 2:
        raise ValueError(f"motion prompt {text!r} names more than two objects")
    template = _template_of(objects)
    if template == "invalid":
        raise ValueError(f"motion prompt {text!r}: two objects must differ and move in different directions "
                         "(no speed, stop or standing still)")
    return MotionSpec(template, objects)


def _parse_object(words: list[str], text: str) -> MovingObject:
    if len(words) < 3 or words[0] != "a" or words[1] not in COLORS or words[2] not in SHAPES:
        raise ValueError(f"cannot parse {' '.join(words)!r} in {text!r}: expected 'a <colour> <shape> ...'")
    color, shape, rest = words[1], words[2], words[3:]
    if rest == ["standing", "still"]:
        return MovingObject(color, shape, "still")
    if len(rest) < 2 or rest[0] != "moving" or rest[1] not in DIRECTIONS:
        raise ValueError(f"cannot parse {' '.join(words)!r} in {text!r}: expected 'moving <direction>' "
                         f"({', '.join(DIRECTIONS)}) or 'standing still'")
    tail = rest[2:]
    if tail == []:
        return MovingObject(color, shape, rest[1])
    if tail in (["slowly"], ["quickly"]):
        return MovingObject(color, shape, rest[1], speed=tail[0])
    if tail == ["then", "stopping"]:
        return MovingObject(color, shape, rest[1], stops=True)
    raise ValueError(f"cannot parse {' '.join(tail)!r} in {text!r}: expected 'slowly', 'quickly' or "
                     "'then stopping'")


# ------------------------------------------------------------------------------------- enumeration / split


@cache
def all_motion_specs(template: str) -> tuple[MotionSpec, ...]:
    """Every spec of a motion template, in a fixed order."""
    _check("template", template, MOTION_TEMPLATES)
    pairs = list(product(COLORS, SHAPES))
    if template == "motion":
        objs = [MovingObject(c, s, d) for d in DIRECTIONS for c, s in pairs]
    elif template == "speed":
        objs = [MovingObject(c, s, d, speed=v) for v in SPEED_WORDS for d in DIRECTIONS for c, s in pairs]
    elif template == "still":
        objs = [MovingObject(c, s, "still") for c, s in pairs]
    elif template == "stop":
        objs = [MovingObject(c, s, d, stops=True) for d in DIRECTIONS for c, s in pairs]
    else:
        specs = [MotionSpec(template, (MovingObject(c1, s1, d1), MovingObject(c2, s2, d2)))
                 for (c1, s1), (c2, s2) in permutations(pairs, 2) for d1, d2 in permutations(DIRECTIONS, 2)]
        return tuple(specs)
    return tuple(MotionSpec(template, (o,)) for o in objs)


def motion_key(spec: MotionSpec) -> tuple:
    """The combination a spec composes; "A and B" and "B and A" share a key."""
    keys = sorted((o.color, o.shape, o.direction, o.speed, o.stops) for o in spec.objects)
    return (spec.template, *keys)


@cache
def _heldout_motion_keys(template: str) -> frozenset:
    """About HELDOUT_FRACTION of a template's compositions (`grammar.choose_heldout`, hashed under "video")."""
    return choose_heldout(all_motion_specs(template), motion_key, "video", HELDOUT_FRACTION)


@cache
def split_motion_specs(template: str, split: str = "seen") -> tuple[MotionSpec, ...]:
    """The specs of a motion template in one split ("seen" or "heldout"); fixed for all time and processes."""
    _check("split", split, ("seen", "heldout"))
    held = _heldout_motion_keys(template)
    return tuple(s for s in all_motion_specs(template) if (motion_key(s) in held) == (split == "heldout"))


def sample_motion_specs(n: int, split: str = "seen", templates: tuple[str, ...] = MOTION_TEMPLATES,
                        generator: torch.Generator | int = 0) -> list[MotionSpec]:
    """Draw `n` specs: a template uniformly from `templates`, then a spec uniformly from its split."""
    if not templates:
        raise ValueError(f"templates is empty; choose from {MOTION_TEMPLATES}")
    for template in templates:
        _check("template", template, MOTION_TEMPLATES)
    rng = random.Random(seed_from(generator))
    pools = [split_motion_specs(t, split) for t in templates]
    return [rng.choice(rng.choice(pools)) for _ in range(n)]


def _without_directions(spec: MotionSpec) -> tuple:
    """Everything a spec states but its objects' directions, in object order."""
    return tuple((o.color, o.shape, o.speed, o.stops) for o in spec.objects)


@cache
def _seen_direction_variants(template: str) -> dict[tuple, tuple[MotionSpec, ...]]:
    """The seen specs of a template grouped by `_without_directions`."""
    groups: dict[tuple, list[MotionSpec]] = {}
    for spec in split_motion_specs(template, "seen"):
        groups.setdefault(_without_directions(spec), []).append(spec)
    return {k: tuple(v) for k, v in groups.items()}


def misdescribe_direction(spec: MotionSpec, rng: random.Random) -> MotionSpec:
    """A caption for `spec`'s clip whose directions are drawn uniformly from the seen specs that differ from it
    only in direction (the true one included): web-video captions often misstate motion, and a base pretrained on
    such captions moves objects cleanly but follows the stated direction only partly. "standing still" is kept,
    and the result stays in the seen split, so held-out compositions are never shown."""
    if spec.template == "still":
        return spec
    return rng.choice(_seen_direction_variants(spec.template)[_without_directions(spec)])


# -------------------------------------------------------------------------------------------- rendering


def frame_offset(obj: MovingObject, speed: float, frame: int) -> tuple[float, float]:
    """Displacement (dx, dy) of an object at `frame` from its position at frame 0."""
    if obj.direction == "still":
        return 0.0, 0.0
    steps = min(frame, STOP_FRAME) if obj.stops else frame
    dx, dy = DIRECTIONS[obj.direction]
    return dx * speed * steps, dy * speed * steps


def sample_clip_layout(spec: MotionSpec, rng: random.Random, attempts: int = 2000) -> list[list[PlacedShape]]:
    """Per frame, the placed shapes of the spec's objects: inside the canvas and apart in every frame."""
    for _ in range(attempts):
        tracks = []
        for obj in spec.objects:
            rgb = _jittered_rgb(obj.color, rng)
            width = rng.uniform(*WIDTH_RANGE)
            speed = 0.0 if obj.direction == "still" else rng.uniform(*(STOP_SPEED if obj.stops
                                                                      else SPEED_RANGES[obj.speed]))
            # Start where the whole path stays on the canvas (0.6 w bounds a triangle's centroid offset).
            dx, dy = frame_offset(obj, speed, NUM_FRAMES - 1)
            reach = BORDER + 0.6 * width
            cx = rng.uniform(reach + max(0.0, -dx), CANVAS - reach - max(0.0, dx))
            cy = rng.uniform(reach + max(0.0, -dy), CANVAS - reach - max(0.0, dy))
            tracks.append([PlacedShape(obj.shape, rgb, cx + ox, cy + oy, width)
                           for ox, oy in (frame_offset(obj, speed, f) for f in range(NUM_FRAMES))])
        inside = all(min(s.bbox[:2]) >= BORDER and max(s.bbox[2:]) <= CANVAS - BORDER for t in tracks for s in t)
        apart = len(tracks) == 1 or all(_boxes_apart(a.bbox, b.bbox) for a, b in zip(*tracks, strict=True))
        if inside and apart:
            return [list(frame) for frame in zip(*tracks, strict=True)]
    raise RuntimeError(f"could not place {spec.prompt!r} in {attempts} attempts")


def render_clip(spec: MotionSpec, generator: torch.Generator | int) -> torch.Tensor:
    """Render one spec: a float tensor [F, 3, 32, 32] in [0, 1]. Deterministic for an integer seed."""
    return torch.stack([draw_layout(f) for f in sample_clip_layout(spec, random.Random(seed_from(generator)))])


def render_clips(specs: list[MotionSpec], generator: torch.Generator | int) -> torch.Tensor:
    """Render specs in order with one random stream: [B, F, 3, 32, 32] in [0, 1]."""
    rng = random.Random(seed_from(generator))
    if not specs:
        return torch.empty(0, NUM_FRAMES, 3, CANVAS, CANVAS)
    return torch.stack([torch.stack([draw_layout(f) for f in sample_clip_layout(s, rng)]) for s in specs])


# -------------------------------------------------------------------------------------------- verifying

MOTION_GROUPS = ("object", "direction", "speed", "stop", "consistency")


@dataclass
class MotionResult:
    """Per-clip verdicts, float tensors [B]: each group is the fraction of its concepts satisfied, NaN where
    the prompt states none (speed outside "speed", stop outside "stop"). `direction_correct` is 1 where every
    object's direction (or stillness) is right; `score` the fraction of all concepts; `passed` all of them.
    `concepts` names each clip's concepts and verdicts; `tracks` the tracked centres per object."""

    object: torch.Tensor
    direction: torch.Tensor
    speed: torch.Tensor
    stop: torch.Tensor
    consistency: torch.Tensor
    direction_correct: torch.Tensor
    passed: torch.Tensor
    score: torch.Tensor
    concepts: list[dict[str, bool]]
    tracks: list[list[list[tuple[float, float] | None]]]

    def sub_scores(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in (*MOTION_GROUPS, "direction_correct", "passed", "score")}


def _track(obj: MovingObject, frames: list[list[Detection]]) -> list[Detection | None]:
    """The object's detection per frame: same colour, the right shape preferred, nearest the last position."""
    track, last = [], None
    for dets in frames:
        candidates = [d for d in dets if MAIN_JUDGE.color_of(d) == obj.color]
        if not candidates:
            track.append(None)
            continue
        shaped = [d for d in candidates if MAIN_JUDGE.shape_of(d) == obj.shape] or candidates
        if last is None:
            best = max(shaped, key=lambda d: d.area)
        else:
            best = min(shaped, key=lambda d: (d.cx - last.cx) ** 2 + (d.cy - last.cy) ** 2)
        track.append(best)
        last = best
    return track


def _along_across(direction: str, dx: float, dy: float) -> tuple[float, float]:
    """A displacement's component along the stated direction and its size across it (px)."""
    ux, uy = DIRECTIONS[direction]
    return dx * ux + dy * uy, abs(dx * uy - dy * ux)


def _motion_concepts(obj: MovingObject, track: list[Detection]) -> dict[str, bool]:
    xs = np.array([d.cx for d in track])
    ys = np.array([d.cy for d in track])
    concepts = {}
    if obj.direction == "still":
        concepts["still"] = bool(np.hypot(xs - xs[0], ys - ys[0]).max() <= STILL_RADIUS)
        return concepts
    end = STOP_FRAME if obj.stops else len(track) - 1
    along, across = _along_across(obj.direction, xs[end] - xs[0], ys[end] - ys[0])
    concepts[f"moving {obj.direction}"] = bool(along >= MIN_TRAVEL and along > across)
    if obj.speed == "slowly":
        concepts["slowly"] = bool(along <= SLOW_MAX)
    elif obj.speed == "quickly":
        concepts["quickly"] = bool(along >= FAST_MIN)
    if obj.stops:
        rest = np.hypot(xs[end:] - xs[end], ys[end:] - ys[end])
        concepts["then stopping"] = bool(rest.max() <= STILL_RADIUS)
    return concepts


def verify_motion(videos: torch.Tensor, specs: list[MotionSpec | str]) -> MotionResult:
    """Judge clips [B, F, 3, 32, 32] in [0, 1] against motion specs (or prompts)."""
    if videos.ndim != 5 or videos.shape[2] != 3 or videos.shape[-2:] != (CANVAS, CANVAS):
        raise ValueError(f"videos must be [B, F, 3, {CANVAS}, {CANVAS}], got {tuple(videos.shape)}")
    if videos.shape[1] < STOP_FRAME + 1:
        raise ValueError(f"videos need at least {STOP_FRAME + 1} frames, got {videos.shape[1]}")
    if len(specs) != len(videos):
        raise ValueError(f"{len(specs)} specs for {len(videos)} videos")
    specs = [parse_motion_prompt(s) if isinstance(s, str) else s for s in specs]
    b, f = videos.shape[:2]
    detections = detect_objects(videos.reshape(b * f, 3, CANVAS, CANVAS).float().cpu())
    groups = {g: [] for g in MOTION_GROUPS}
    direction_ok, passed, score, all_concepts, all_tracks = [], [], [], [], []
    for i, spec in enumerate(specs):
        frames = detections[i * f:(i + 1) * f]
        concepts: dict[str, bool] = {}
        per_group: dict[str, list[bool]] = {g: [] for g in MOTION_GROUPS}
        dir_ok, tracks, used = True, [], set()
        for obj in spec.objects:
            track = _track(obj, frames)
            tracks.append([None if d is None else (d.cx, d.cy) for d in track])
            name = f"{obj.color} {obj.shape}"
            present = all(d is not None for d in track)
            shaped = sum(d is not None and MAIN_JUDGE.shape_of(d) == obj.shape for d in track)
            present = present and shaped >= SHAPE_FRAMES * f
            concepts[name] = present
            per_group["object"].append(present)
            motion = _motion_concepts(obj, track) if present else None
            if motion is None:  # an absent object fails every concept stated about it
                motion = {"still": False} if obj.direction == "still" else {f"moving {obj.direction}": False}
                if obj.speed:
                    motion[obj.speed] = False
                if obj.stops:
                    motion["then stopping"] = False
            for key, ok in motion.items():
                concepts[f"{name} {key}"] = ok
                group = "speed" if key in SPEED_WORDS else "stop" if key == "then stopping" else "direction"
                per_group[group].append(ok)
                if group == "direction":
                    dir_ok = dir_ok and ok
            if present:
                areas = np.array([d.area for d in track])
                steady = bool((np.abs(np.diff(areas)) / np.maximum(areas[:-1], 1e-6)).max() < CONSISTENCY_AREA)
                concepts[f"{name} consistent"] = steady
                per_group["consistency"].append(steady)
                used.update((t, id(d)) for t, d in enumerate(track))
            else:
                per_group["consistency"].append(False)
        extra = sum(1 for t, dets in enumerate(frames) for d in dets if (t, id(d)) not in used)
        no_extra = extra == 0 and all(len(dets) == len(spec.objects) for dets in frames)
        concepts["no extra objects"] = no_extra
        per_group["consistency"].append(no_extra)
        for g in MOTION_GROUPS:
            groups[g].append(sum(per_group[g]) / len(per_group[g]) if per_group[g] else math.nan)
        verdicts = list(concepts.values())
        direction_ok.append(float(dir_ok))
        passed.append(float(all(verdicts)))
        score.append(sum(verdicts) / len(verdicts))
        all_concepts.append(concepts)
        all_tracks.append(tracks)
    def floats(values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32)

    return MotionResult(**{g: floats(v) for g, v in groups.items()}, direction_correct=floats(direction_ok),
                        passed=floats(passed), score=floats(score), concepts=all_concepts, tracks=all_tracks)


TRAVEL_SCALE = 2.0  # px: the width of the graded travel score's sigmoid


def travel_score(obj: MovingObject, track: list[tuple[float, float] | None]) -> float:
    """A graded version of the direction verdict, in [0, 1], for a shaped RL reward: the binary verdict
    gives a group no signal when every clip fails, while travel towards the threshold is still progress.

    moving: sigmoid((along - max(across, MIN_TRAVEL)) / TRAVEL_SCALE), 0.5 where the verdict flips;
    still: sigmoid((STILL_RADIUS - max drift) / TRAVEL_SCALE). Displacements are taken between the first
    and last frames of the judged span where the object was detected ("then stopping": span ends at
    STOP_FRAME); an object found in fewer than two frames scores 0."""
    end = STOP_FRAME if obj.stops else len(track) - 1
    seen = [c for c in track[:end + 1] if c is not None]
    if len(seen) < 2:
        return 0.0
    (x0, y0), (x1, y1) = seen[0], seen[-1]
    if obj.direction == "still":
        margin = STILL_RADIUS - max(math.hypot(x - x0, y - y0) for x, y in seen)
    else:
        along, across = _along_across(obj.direction, x1 - x0, y1 - y0)
        margin = along - max(across, MIN_TRAVEL)  # the verdict: along >= MIN_TRAVEL and along > across
    return 1.0 / (1.0 + math.exp(-margin / TRAVEL_SCALE))


def travel_scores(result: MotionResult, specs: list[MotionSpec | str]) -> torch.Tensor:
    """[B]: the mean `travel_score` over each clip's objects, from the tracks `verify_motion` returned."""
    specs = [parse_motion_prompt(s) if isinstance(s, str) else s for s in specs]
    return torch.tensor([sum(travel_score(o, tr)
                             for o, tr in zip(spec.objects, tracks, strict=True)) / len(spec.objects)
                         for spec, tracks in zip(specs, result.tracks, strict=True)], dtype=torch.float32)
