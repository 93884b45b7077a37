"""Prompt grammar of the procedural "shapes" world.

A prompt describes a 32x32 image of coloured shapes on a plain background. Every prompt belongs to exactly
one template and has a structured form, a `SceneSpec`, from which the renderer draws and against which the
verifier checks an image:

    template      example prompt
    single        "a red circle"
    size          "a large blue square"
    count         "two green triangles"
    position      "a yellow circle on the left"
    two_objects   "a red circle and a blue square"              (colour attribution)
    relation      "a red circle to the left of a blue square"   (hard tier)

The compositions of each template are split once, deterministically, into `seen` ones (for pretraining and
RL) and `heldout` ones (for measuring compositional generalisation). Only combinations are held out: every
word of a template still appears in its seen prompts.
"""

import colorsys
import hashlib
import random
from dataclasses import dataclass
from functools import cache
from itertools import permutations, product

import torch

# Six hues 60 degrees apart, so a pixel classifier has +-30 degrees of hue tolerance per colour. All share
# saturation 0.85 and value 0.9: the verifier separates them by hue alone.
COLOR_HUES: dict[str, float] = {
    "red": 0.0,
    "yellow": 60.0,
    "green": 120.0,
    "cyan": 180.0,
    "blue": 240.0,
    "magenta": 300.0,
}
COLOR_SATURATION = 0.85
COLOR_VALUE = 0.9
COLORS: dict[str, tuple[float, float, float]] = {
    name: colorsys.hsv_to_rgb(hue / 360.0, COLOR_SATURATION, COLOR_VALUE) for name, hue in COLOR_HUES.items()
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
COUNT_WORDS: dict[int, str] = {1: "a", 2: "two", 3: "three"}
# Object positions are keys; their phrases are the values. Geometry lives in `render.position_holds`.
POSITIONS: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}
# "A <relation> B". Geometry lives in `render.relation_holds`.
RELATIONS: dict[str, str] = {
    "left_of": "to the left of",
    "right_of": "to the right of",
    "above": "above",
    "below": "below",
}
# The mirror image of each relation: "A left of B" says the same as "B right of A".
MIRRORED_RELATIONS = {"left_of": "right_of", "right_of": "left_of", "above": "below", "below": "above"}

TEMPLATES = ("single", "size", "count", "position", "two_objects", "relation")
# Evaluation reports accuracy per tier; relations are the hard tier.
TEMPLATE_TIERS: dict[str, str] = {
    "single": "basic",
    "size": "basic",
    "count": "compositional",
    "position": "compositional",
    "two_objects": "compositional",
    "relation": "hard",
}
SPLITS = ("seen", "heldout")
HELDOUT_FRACTION = 0.22


@dataclass(frozen=True)
class ObjectSpec:
    """One noun phrase: `count` copies of a `color` `shape`, optionally with a size and a position."""

    color: str
    shape: str
    count: int = 1
    size: str | None = None
    position: str | None = None

    def __post_init__(self):
        _check_choice("color", self.color, tuple(COLORS))
        _check_choice("shape", self.shape, SHAPES)
        _check_choice("count", self.count, tuple(COUNT_WORDS))
        _check_choice("size", self.size, (None, *SIZES))
        _check_choice("position", self.position, (None, *POSITIONS))

    @property
    def phrase(self) -> str:
        """The noun phrase without position, e.g. "a large blue square" or "two green triangles"."""
        words = [COUNT_WORDS[self.count]]
        if self.size is not None:
            words.append(self.size)
        words += [self.color, self.shape + ("s" if self.count > 1 else "")]
        return " ".join(words)


@dataclass(frozen=True)
class SceneSpec:
    """A whole prompt: its template, the objects it mentions and, for `relation`, "objects[0] <relation>
    objects[1]"."""

    template: str
    objects: tuple[ObjectSpec, ...]
    relation: str | None = None

    def __post_init__(self):
        _check_choice("template", self.template, TEMPLATES)
        _check_choice("relation", self.relation, (None, *RELATIONS))
        _check_template_form(self)

    @property
    def prompt(self) -> str:
        """The text of the prompt; `parse_prompt(spec.prompt) == spec`."""
        first = self.objects[0]
        if self.template == "position":
            return f"{first.phrase} {POSITIONS[first.position]}"
        if self.template == "two_objects":
            return f"{first.phrase} and {self.objects[1].phrase}"
        if self.template == "relation":
            return f"{first.phrase} {RELATIONS[self.relation]} {self.objects[1].phrase}"
        return first.phrase

    @property
    def tier(self) -> str:
        return TEMPLATE_TIERS[self.template]


def _check_choice(field: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{field}={value!r} is not one of {allowed}")


def _check_template_form(spec: SceneSpec) -> None:
    """Raise ValueError unless the objects and relation have the form the template prescribes."""
    n_objects = 2 if spec.template in ("two_objects", "relation") else 1
    if len(spec.objects) != n_objects:
        raise ValueError(f"template {spec.template!r} takes {n_objects} object(s), got {len(spec.objects)}")
    if (spec.relation is not None) != (spec.template == "relation"):
        raise ValueError(f"relation={spec.relation!r} does not fit template {spec.template!r}")
    # Each template states exactly one kind of attribute beyond colour and shape.
    for obj in spec.objects:
        if (obj.count > 1) != (spec.template == "count"):
            raise ValueError(f"count={obj.count} does not fit template {spec.template!r}")
        if (obj.size is not None) != (spec.template == "size"):
            raise ValueError(f"size={obj.size!r} does not fit template {spec.template!r}")
        if (obj.position is not None) != (spec.template == "position"):
            raise ValueError(f"position={obj.position!r} does not fit template {spec.template!r}")
    if n_objects == 2 and spec.objects[0] == spec.objects[1]:
        raise ValueError(f"template {spec.template!r} needs two different objects, got {spec.objects[0]}")


# ---------------------------------------------------------------------------------------------- parsing

_PLURALS = {shape + "s": shape for shape in SHAPES}
_COUNT_OF_WORD = {word: count for count, word in COUNT_WORDS.items()}
_POSITION_OF_PHRASE = {tuple(phrase.split()): key for key, phrase in POSITIONS.items()}
_RELATION_OF_PHRASE = {tuple(phrase.split()): key for key, phrase in RELATIONS.items()}
VOCABULARY = frozenset(
    [*COUNT_WORDS.values(), *SIZES, *COLORS, *SHAPES, *_PLURALS, "and"]
    + [word for phrase in (*POSITIONS.values(), *RELATIONS.values()) for word in phrase.split()]
)


def parse_prompt(text: str) -> SceneSpec:
    """Parse a prompt of the grammar into its `SceneSpec`.

    Raises ValueError naming the first unknown word, or saying which word breaks the grammar.
    """
    words = text.strip().lower().split()
    if not words:
        raise ValueError("empty prompt")
    for word in words:
        if word not in VOCABULARY:
            raise ValueError(f"unknown word {word!r} in prompt {text!r}")
    first, i = _parse_object(words, 0, text)
    if i == len(words):
        template = "count" if first.count > 1 else "size" if first.size is not None else "single"
        return SceneSpec(template, (first,))
    position = _match_phrase(words, i, _POSITION_OF_PHRASE)
    if position is not None and i + len(POSITIONS[position].split()) == len(words):
        first = ObjectSpec(first.color, first.shape, first.count, first.size, position)
        return SceneSpec("position", (first,))
    relation = _match_phrase(words, i, _RELATION_OF_PHRASE)
    if words[i] == "and" or relation is not None:
        i += 1 if relation is None else len(RELATIONS[relation].split())
        second, i = _parse_object(words, i, text)
        if i == len(words):
            return SceneSpec("two_objects" if relation is None else "relation", (first, second), relation)
    raise ValueError(f"unexpected word {words[i]!r} in prompt {text!r}")


def _parse_object(words: list[str], i: int, text: str) -> tuple[ObjectSpec, int]:
    """Parse "<count> [size] <color> <shape>" from words[i:]; return the object and the next index."""

    def expect(kind: str, allowed) -> str:
        if i >= len(words) or words[i] not in allowed:
            got = repr(words[i]) if i < len(words) else "the end of the prompt"
            raise ValueError(f"expected a {kind} but got {got} in prompt {text!r}")
        return words[i]

    count = _COUNT_OF_WORD[expect("count word", _COUNT_OF_WORD)]
    i += 1
    size = None
    if i < len(words) and words[i] in SIZES:
        size = words[i]
        i += 1
    color = expect("colour", COLORS)
    i += 1
    noun = expect("plural shape" if count > 1 else "shape", _PLURALS if count > 1 else SHAPES)
    shape = _PLURALS.get(noun, noun)
    return ObjectSpec(color, shape, count, size), i + 1


def _match_phrase(words: list[str], i: int, phrases: dict[tuple[str, ...], str]) -> str | None:
    for phrase, key in phrases.items():
        if tuple(words[i : i + len(phrase)]) == phrase:
            return key
    return None


# ------------------------------------------------------------------------------------------ enumeration


@cache
def all_specs(template: str) -> tuple[SceneSpec, ...]:
    """Every spec of a template, in a fixed order."""
    _check_choice("template", template, TEMPLATES)
    pairs = list(product(COLORS, SHAPES))
    if template == "single":
        return tuple(SceneSpec(template, (ObjectSpec(c, s),)) for c, s in pairs)
    if template == "size":
        return tuple(SceneSpec(template, (ObjectSpec(c, s, size=z),)) for z in SIZES for c, s in pairs)
    if template == "count":
        return tuple(SceneSpec(template, (ObjectSpec(c, s, count=n),)) for n in (2, 3) for c, s in pairs)
    if template == "position":
        return tuple(
            SceneSpec(template, (ObjectSpec(c, s, position=p),)) for p in POSITIONS for c, s in pairs
        )
    objects = [ObjectSpec(c, s) for c, s in pairs]
    if template == "two_objects":
        return tuple(SceneSpec(template, (a, b)) for a, b in permutations(objects, 2))
    return tuple(SceneSpec(template, (a, b), r) for r in RELATIONS for a, b in permutations(objects, 2))


def composition_key(spec: SceneSpec) -> tuple:
    """The combination a spec composes; the seen/held-out split is made over these keys.

    Phrasings that say the same thing share a key, so that a held-out combination cannot be seen under
    another wording: "A and B" = "B and A", and "A left of B" = "B right of A".
    """
    a = spec.objects[0]
    if spec.template == "two_objects":
        b = spec.objects[1]
        return tuple(sorted([(a.color, a.shape), (b.color, b.shape)]))
    if spec.template == "relation":
        first, second, relation = spec.objects[0], spec.objects[1], spec.relation
        if relation in ("right_of", "below"):
            first, second, relation = second, first, MIRRORED_RELATIONS[relation]
        return ((first.color, first.shape), relation, (second.color, second.shape))
    return (a.color, a.shape, a.count, a.size, a.position)


@cache
def _heldout_keys(template: str) -> frozenset:
    return choose_heldout(all_specs(template), composition_key, template)


def choose_heldout(specs, key, label: str, fraction: float = HELDOUT_FRACTION) -> frozenset:
    """Hold out about `fraction` of the specs (anything with a `.prompt`), grouped by `key(spec)` and chosen by a
    fixed hash of f"{label}|{key}". Keys are visited in hash order (sha256, stable across processes and Python
    versions) and held out unless that would remove the last seen prompt containing some word, so every word
    stays in seen. Shared by the image and the motion grammar."""
    specs_of_key: dict[tuple, list] = {}
    for spec in specs:
        specs_of_key.setdefault(key(spec), []).append(spec)
    seen_word_counts: dict[str, int] = {}
    for spec in specs:
        for word in set(spec.prompt.split()):
            seen_word_counts[word] = seen_word_counts.get(word, 0) + 1

    target = round(fraction * len(specs))
    n_heldout = 0
    heldout = set()
    for k in sorted(specs_of_key, key=lambda k: hashlib.sha256(f"{label}|{k}".encode()).hexdigest()):
        if n_heldout >= target:
            break
        words = [word for spec in specs_of_key[k] for word in set(spec.prompt.split())]
        if any(seen_word_counts[word] <= words.count(word) for word in words):
            continue
        for word in words:
            seen_word_counts[word] -= 1
        heldout.add(k)
        n_heldout += len(specs_of_key[k])
    return frozenset(heldout)


@cache
def split_specs(template: str, split: str = "seen") -> tuple[SceneSpec, ...]:
    """The specs of a template in one split ("seen" or "heldout"); fixed for all time and processes."""
    _check_choice("split", split, SPLITS)
    heldout = _heldout_keys(template)
    return tuple(
        spec for spec in all_specs(template) if (composition_key(spec) in heldout) == (split == "heldout")
    )


def sample_specs(
    n: int,
    split: str = "seen",
    templates: tuple[str, ...] = TEMPLATES,
    generator: torch.Generator | int = 0,
) -> list[SceneSpec]:
    """Draw `n` specs: a template uniformly from `templates`, then a spec uniformly from its split.

    `generator` is a torch.Generator (one integer is drawn from it) or an integer seed.
    """
    if not templates:
        raise ValueError(f"templates is empty; choose from {TEMPLATES}")
    for template in templates:
        _check_choice("template", template, TEMPLATES)
    rng = random.Random(seed_from(generator))
    pools = [split_specs(template, split) for template in templates]
    return [rng.choice(rng.choice(pools)) for _ in range(n)]


def seed_from(generator: torch.Generator | int) -> int:
    if isinstance(generator, torch.Generator):
        return int(torch.randint(0, 2**62, (1,), generator=generator).item())
    return int(generator)


# ------------------------------------------------------------------------------------ counterfactuals

_OPPOSITE_POSITIONS = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}


def counterfactuals(spec: SceneSpec) -> list[tuple[str, SceneSpec]]:
    """Specs that each change one concept of `spec`, named by the change; no image satisfies both.

    Useful as hard negatives and to test that a verifier rejects wrong prompts. Every spec gets a colour
    and a shape change; counts, sizes, positions and relations get theirs where the template has them.
    """
    first, rest = spec.objects[0], spec.objects[1:]
    second = rest[0] if rest else None

    def change_first(**fields) -> SceneSpec:
        obj = ObjectSpec(**{**first.__dict__, **fields})
        return SceneSpec(spec.template, (obj, *rest), spec.relation)

    changed = []
    # Colour. Swapping the two objects' colours tests attribution, but it only changes the scene when the
    # colours differ and the objects are not then merely listed in the other order.
    if second is not None and first.color != second.color and (first.shape != second.shape or spec.relation):
        objects = (ObjectSpec(second.color, first.shape), ObjectSpec(first.color, second.shape))
        changed.append(("swap colours", SceneSpec(spec.template, objects, spec.relation)))
    else:
        unused = [c for c in COLORS if c not in {obj.color for obj in spec.objects}]
        changed.append(("change colour", change_first(color=unused[0])))
    # Shape, keeping the two objects different.
    taken = {first.shape} | ({second.shape} if second is not None and second.color == first.color else set())
    changed.append(("change shape", change_first(shape=next(s for s in SHAPES if s not in taken))))
    if spec.template in ("single", "count"):
        count = {1: 2, 2: 3, 3: 1}[first.count]
        obj = ObjectSpec(first.color, first.shape, count)
        changed.append(("change count", SceneSpec("single" if count == 1 else "count", (obj,))))
    if first.size is not None:
        changed.append(("change size", change_first(size="large" if first.size == "small" else "small")))
    if first.position is not None:
        changed.append(("change position", change_first(position=_OPPOSITE_POSITIONS[first.position])))
    if spec.relation is not None:
        flipped = SceneSpec(spec.template, spec.objects, MIRRORED_RELATIONS[spec.relation])
        changed.append(("swap relation", flipped))
    return changed
