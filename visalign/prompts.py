"""Prompt sources: where a run's prompts come from.

A source spec is a file (`.txt`: one prompt per line; `.jsonl`: {"prompt": ..., other metadata} per line) or
`NAME:ARGS` with NAME registered in `SOURCES` (or the dotted path of a factory taking ARGS), e.g.
`world:seen:count,position`. Trainers draw from a source at random (`draw`); evaluation takes its fixed list
(`fixed`). Both give `Prompt` records: the text, the metadata every reward receives with it, and a category for
per-category tables.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from visalign.registry import lookup


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
                self.items.append(Prompt.of(item, f"{path}, line {i}"))
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


# NAME -> factory(ARGS) -> PromptSource, or its dotted path. The built-in world registers its grammars here.
SOURCES: dict[str, Callable[[str], PromptSource] | str] = {
    "world": "visalign.world.prompts:WorldPrompts",
    "world-video": "visalign.world.prompts:WorldVideoPrompts",
}


def check_prompt_spec(spec: str, field_name: str) -> None:
    """The config-time half of `prompt_source`, building nothing: a NAME:ARGS spec names a registered source or a
    dotted path (its arguments are checked when it is built), anything else is a file that must exist."""
    name, sep, _ = spec.partition(":")
    if sep and not Path(spec).exists() and (name in SOURCES or ("." in name and "/" not in name)):
        return
    if not Path(spec).is_file():
        raise ValueError(f"{field_name}={spec!r}: no such prompt file; or use NAME:ARGS with NAME in "
                         f"{', '.join(sorted(SOURCES))} (e.g. world:seen) or a dotted path")


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
