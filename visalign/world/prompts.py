"""The world's prompt sources, registered in `visalign.prompts.SOURCES` as `world:SPLIT[:TEMPLATE,...]` (still
images) and `world-video:SPLIT[:TEMPLATE,...]` (moving shapes). Each item carries its structured spec, which
the world's rewards read instead of parsing the prompt again."""

from __future__ import annotations

import torch

from visalign.prompts import Prompt, PromptSource
from visalign.suggest import did_you_mean
from visalign.world.grammar import SPLITS, TEMPLATES, sample_specs
from visalign.world.motion import MOTION_TEMPLATES, sample_motion_specs


class WorldPrompts(PromptSource):
    """`ARGS` = SPLIT[:TEMPLATE,...], e.g. "seen" or "seen:count,position" (default: every template)."""

    all_templates = TEMPLATES

    def __init__(self, args: str):
        parts = args.split(":")
        self.split = parts[0]
        if self.split not in SPLITS:
            raise ValueError(f"allowed world splits are {', '.join(SPLITS)}")
        self.templates = tuple(parts[1].split(",")) if len(parts) > 1 else self.all_templates
        unknown = [t for t in self.templates if t not in self.all_templates]
        if unknown or len(parts) > 2:
            hint = did_you_mean(unknown[0], self.all_templates) if len(unknown) == 1 else ""
            raise ValueError(f"unknown templates {unknown}{hint}; allowed: {', '.join(self.all_templates)}")

    @classmethod
    def of(cls, split: str, templates: tuple[str, ...] | None = None) -> WorldPrompts:
        return cls(f"{split}:{','.join(templates)}" if templates else split)

    def sample_specs(self, n: int, templates: tuple[str, ...], generator: torch.Generator | int) -> list:
        return sample_specs(n, self.split, templates, generator=generator)

    def draw(self, n: int, generator: torch.Generator) -> list[Prompt]:
        return [Prompt(s.prompt, {"spec": s}, s.template) for s in self.sample_specs(n, self.templates, generator)]

    def fixed_specs(self, n_per_template: int, seed: int = 0) -> list:
        """The evaluation suites' fixed list: n per template, in template order; template t draws from generator
        seed * 7919 + t's index, so a template's prompts do not depend on which others are asked for."""
        specs = []
        for template in self.templates:
            g = seed * 7919 + self.all_templates.index(template)
            specs += self.sample_specs(n_per_template, (template,), g)
        return specs

    def fixed(self, n_per_category: int, seed: int = 0) -> list[Prompt]:
        """`fixed_specs` as prompts; category = template."""
        return [Prompt(s.prompt, {"spec": s}, s.template) for s in self.fixed_specs(n_per_category, seed)]


class WorldVideoPrompts(WorldPrompts):
    """The moving-shapes grammar (`visalign.world.motion`)."""

    all_templates = MOTION_TEMPLATES

    def sample_specs(self, n: int, templates: tuple[str, ...], generator: torch.Generator | int) -> list:
        return sample_motion_specs(n, self.split, templates, generator=generator)
