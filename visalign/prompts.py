"""Prompt sources: where a run's prompts come from.

A source spec is a file (`.txt`: one prompt per line; `.jsonl`: {"prompt": ..., other metadata} per line) or
`NAME:ARGS` with NAME registered in `SOURCES` (or the dotted path of a factory taking ARGS), e.g.
`world:seen:count,position`. Trainers draw from a source at random (`draw`); evaluation takes its fixed list
(`fixed`), where each item also names its `category` for per-category tables.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

import torch

from visalign.registry import lookup


class PromptSource(ABC):
    """Items are dicts {"prompt": str, ...metadata}; the metadata reaches every reward as `metadata`."""

    @abstractmethod
    def draw(self, n: int, generator: torch.Generator) -> list[dict]:
        """n items drawn at random with `generator` (training)."""

    @abstractmethod
    def fixed(self, n_per_category: int) -> list[dict]:
        """A fixed, ordered list of items with a "category" each (evaluation)."""


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
                if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or not item["prompt"].strip():
                    raise ValueError(f"{path}, line {i}: needs a non-empty 'prompt' string")
                self.items.append(item)
        else:
            self.items = [{"prompt": line.strip()} for _, line in lines]
        if not self.items:
            raise ValueError(f"prompt file {str(path)!r} is empty")

    def draw(self, n: int, generator: torch.Generator) -> list[dict]:
        idx = torch.randint(len(self.items), (n,), generator=generator).tolist()
        return [dict(self.items[i]) for i in idx]

    def fixed(self, n_per_category: int) -> list[dict]:
        """Every line in file order (`n_per_category` applies to generated sources only)."""
        return [{"category": "all", **item} for item in self.items]


# NAME -> factory(ARGS) -> PromptSource, or its dotted path. The built-in world registers its grammars here.
SOURCES: dict[str, Callable[[str], PromptSource] | str] = {
    "world": "visalign.world.prompts:WorldPrompts",
    "world-video": "visalign.world.prompts:WorldVideoPrompts",
}


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
