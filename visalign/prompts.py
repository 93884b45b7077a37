"""Prompt sources: where a run's prompts come from.

A source spec is a file (`.txt`: one prompt per line; `.jsonl`: {"prompt": ..., other metadata} per line) or
`NAME:ARGS` with NAME registered in `SOURCES` (or the dotted path of a factory taking ARGS), e.g.
`world:seen:count,position`. Trainers draw from a source at random (`draw`); evaluation takes its fixed list
(`fixed`). Both give `Prompt` records: the text, the metadata every reward receives with it, and a category for
per-category tables.

Editing models edit a source image per prompt: a JSONL line names it as `"source_image": PATH` (relative to the
file), kept in the prompt's metadata under `SOURCE_IMAGE`.

Shipped sets load by name as `NAME:SPLIT[:CATEGORY,...]` (`ShippedSet`): `geneval:train`, `geneval:test`
(GenEval's six tasks with their specs), `ocr:train`, `ocr:test` (text to render, metadata `text`); the files
under visalign/assets/prompts/ are written by `python -m visalign.eval.prompt_sets`.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from visalign.media import read_image
from visalign.registry import lookup
from visalign.suggest import did_you_mean

SOURCE_IMAGE = "source_image"  # the metadata key of the image an editing model edits


@dataclass(frozen=True)
class Prompt:
    """One prompt as trainers, evaluation and rewards see it: its `text`, the `metadata` every reward receives
    with it (the world's scene `spec`, a GenEval-style spec, an id), and the `category` evaluation tables group
    by."""

    text: str
    metadata: Mapping[str, Any] = field(default_factory=dict)
    category: str = "all"

    @classmethod
    def of(cls, item: Prompt | str | Mapping, where: str = "prompt") -> Prompt:
        """A record from a Prompt, a string, or a mapping {"prompt": text, "category"?: ..., **metadata} (a JSONL
        line, what a user's source returns); ValueError names `where` and what is wrong."""
        if isinstance(item, Prompt):
            return item
        if isinstance(item, str):
            item = {"prompt": item}
        if not isinstance(item, Mapping) or not isinstance(item.get("prompt"), str) or not item["prompt"].strip():
            raise ValueError(f"{where}: needs a non-empty 'prompt' string, got {item!r}")
        category = item.get("category", "all")
        if not isinstance(category, str):
            raise ValueError(f"{where}: 'category' must be a string, got {category!r}")
        return cls(item["prompt"], {k: v for k, v in item.items() if k not in ("prompt", "category")}, category)


class PromptSource(ABC):
    """Where a run's prompts come from. Both methods return `Prompt` records (a user's source may return strings
    or {"prompt": ..., **metadata} mappings: `prompts_of` reads them)."""

    @abstractmethod
    def draw(self, n: int, generator: torch.Generator) -> list[Prompt]:
        """n prompts drawn at random with `generator` (training)."""

    @abstractmethod
    def fixed(self, n_per_category: int) -> list[Prompt]:
        """A fixed, ordered list of prompts (evaluation); `n_per_category` applies to generated sources."""

    def all(self) -> list[Prompt] | None:
        """Every prompt `draw` and `fixed` can return, when the source is finite (a file); None for a generated
        source (what `model.free_text_encoders` needs: a prompt set it can encode up front)."""
        return None


def _with_source_path(prompt: Prompt, base: Path, where: str) -> Prompt:
    """The prompt with its source image's path made absolute (relative to `base`), checked to be a file."""
    if SOURCE_IMAGE not in prompt.metadata:
        return prompt
    value = prompt.metadata[SOURCE_IMAGE]
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}: {SOURCE_IMAGE!r} must be an image path, got {value!r}")
    file = (base / value).resolve()
    if not file.is_file():
        raise ValueError(f"{where}: {SOURCE_IMAGE!r} {str(file)!r} does not exist")
    return Prompt(prompt.text, {**prompt.metadata, SOURCE_IMAGE: str(file)}, prompt.category)


def source_image_paths(items: list[Prompt]) -> list[str] | None:
    """Each prompt's source image (metadata `source_image`), or None when no prompt names one; ValueError when
    only some do (an editing run edits every prompt's image)."""
    paths = [it.metadata.get(SOURCE_IMAGE) for it in items]
    if all(p is None for p in paths):
        return None
    missing = [it.text for it, p in zip(items, paths, strict=True) if p is None]
    if missing:
        raise ValueError(f"some prompts name a {SOURCE_IMAGE!r} and some do not, e.g. {missing[0]!r}: an editing "
                         "model edits one source image per prompt")
    return paths


def source_images(items: list[Prompt], size: tuple[int, int]) -> Tensor | None:
    """The prompts' source images as one batch [B, 3, H, W] in [0, 1], each resized to the run's `size`
    (height, width), or None when no prompt names one (see `source_image_paths`)."""
    paths = source_image_paths(items)
    return None if paths is None else torch.stack([read_image(p, size) for p in paths])


def prompts_of(items, where: str) -> list[Prompt]:
    """`Prompt` records from what a source returned (records, strings or mappings), checked one by one."""
    return [Prompt.of(item, f"{where}, item {i}") for i, item in enumerate(items)]


class FilePrompts(PromptSource):
    """A .txt (one prompt per line) or .jsonl ({"prompt": ..., metadata} per line) file, checked line by line."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"prompt file {str(path)!r} does not exist")
        lines = [(i, line) for i, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
        if path.suffix == ".jsonl":
            self.items = []
            for i, line in lines:
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}, line {i}: not JSON ({err})") from None
                self.items.append(_with_source_path(Prompt.of(item, f"{path}, line {i}"), path.parent,
                                                    f"{path}, line {i}"))
        else:
            self.items = [Prompt(line.strip()) for _, line in lines]
        if not self.items:
            raise ValueError(f"prompt file {str(path)!r} is empty")

    def draw(self, n: int, generator: torch.Generator) -> list[Prompt]:
        idx = torch.randint(len(self.items), (n,), generator=generator).tolist()
        return [self.items[i] for i in idx]

    def fixed(self, n_per_category: int) -> list[Prompt]:
        """Every line in file order (`n_per_category` applies to generated sources only)."""
        return list(self.items)

    def all(self) -> list[Prompt]:
        return list(self.items)


SHIPPED_DIR = Path(__file__).parent / "assets" / "prompts"  # written by `python -m visalign.eval.prompt_sets`


class ShippedSet:
    """The factory of a prompt set shipped as files: ARGS = SPLIT[:CATEGORY,...] reads
    visalign/assets/prompts/NAME_SPLIT.jsonl, cut to the categories named (e.g. `geneval:test:counting,position`)."""

    splits = ("train", "test")

    def __init__(self, name: str):
        self.name = name

    def __call__(self, args: str) -> FilePrompts:
        split, _, wanted = args.partition(":")
        if split not in self.splits:
            raise ValueError(f"unknown {self.name} split {split!r}{did_you_mean(split, self.splits)}; allowed: "
                             f"{', '.join(self.splits)}")
        source = FilePrompts(SHIPPED_DIR / f"{self.name}_{split}.jsonl")
        if wanted:
            categories = list(dict.fromkeys(item.category for item in source.items))
            names = wanted.split(",")
            unknown = [c for c in names if c not in categories]
            if unknown:
                hint = did_you_mean(unknown[0], categories) if len(unknown) == 1 else ""
                raise ValueError(f"unknown {self.name} categories {unknown}{hint}; allowed: {', '.join(categories)}")
            source.items = [item for item in source.items if item.category in names]
        return source


# NAME -> factory(ARGS) -> PromptSource, or its dotted path. The built-in world registers its grammars here.
SOURCES: dict[str, Callable[[str], PromptSource] | str] = {
    "world": "visalign.world.prompts:WorldPrompts",
    "world-video": "visalign.world.prompts:WorldVideoPrompts",
    "geneval": ShippedSet("geneval"),
    "ocr": ShippedSet("ocr"),
}


def check_prompt_spec(spec: str, field_name: str, edits: bool | None = None) -> None:
    """The config-time half of `prompt_source`, building nothing but a shipped set (files, cheap to read): a NAME:ARGS
    spec names a registered source or a dotted path (its arguments are checked when it is built; a shipped set's
    split and categories now), anything else is a file that must exist. With
    `edits` known (the model edits source images, or not), a file's lines are read and must name a
    `source_image` each, or none."""
    name, sep, args = spec.partition(":")
    if sep and not Path(spec).exists() and (name in SOURCES or ("." in name and "/" not in name)):
        if isinstance(SOURCES.get(name), ShippedSet):  # files: read now, so a wrong split fails before any model
            try:
                SOURCES[name](args)
            except ValueError as err:
                raise ValueError(f"{field_name}={spec!r}: {err}") from None
            if edits:
                raise ValueError(f"{field_name}={spec!r}: the model edits source images, and the shipped {name} "
                                 "set names none")
        return
    if not Path(spec).is_file():
        raise ValueError(f"{field_name}={spec!r}: no such prompt file; or use NAME:ARGS with NAME in "
                         f"{', '.join(sorted(SOURCES))} (e.g. world:seen) or a dotted path")
    if edits is not None:
        try:
            named = source_image_paths(FilePrompts(spec).items) is not None
        except ValueError as err:
            raise ValueError(f"{field_name}: {err}") from None
        if edits and not named:
            raise ValueError(f"{field_name}={spec!r}: the model edits source images, and no line names one "
                             f"(a JSONL line's {SOURCE_IMAGE!r})")
        if named and not edits:
            raise ValueError(f"{field_name}={spec!r} names source images, and the model is not an editing model")


def prompt_source(spec: str) -> PromptSource:
    """The source a spec names (see the module docstring); ValueError names the spec and what is allowed."""
    name, sep, args = spec.partition(":")
    if sep and not Path(spec).exists() and (name in SOURCES or ("." in name and "/" not in name)):
        factory = lookup(SOURCES, name, "prompt source")
        try:
            return factory(args)
        except ValueError as err:
            raise ValueError(f"prompts={spec!r}: {err}") from None
    if not Path(spec).exists():
        raise ValueError(f"prompt file {spec!r} does not exist; or use NAME:ARGS with NAME in "
                         f"{', '.join(sorted(SOURCES))} (e.g. world:seen) or a dotted path")
    return FilePrompts(spec)
