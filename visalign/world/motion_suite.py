"""The moving-shapes suite (`visalign eval --suite world-video`): motion accuracy of a video model, judged by the
exact motion verifier (`visalign.world.motion.verify_motion`).

For each split (seen / held-out compositions) and motion template, a fixed set of prompts is sampled with fixed
seeds. Reported per template and overall: motion-direction accuracy (every object moves the stated way, or stays
still), whole-prompt pass rate, partial credit, the verifier's temporal-consistency group, VBench's temporal
flickering score (`visalign.rewards.video.temporal_flicker`) and per-frame cleanliness.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from visalign.media import image_grid, save_pixels
from visalign.models.base import FlowModelAdapter
from visalign.rewards.video import temporal_flicker
from visalign.sampling import sample
from visalign.world.motion import MOTION_TEMPLATES, NUM_FRAMES, MotionSpec, verify_motion
from visalign.world.prompts import WorldVideoPrompts
from visalign.world.verify import cleanliness

SPLITS = ("seen", "heldout")


@dataclass
class MotionEvalConfig:
    """`visalign eval --suite world-video`: which model, how many prompts, how to sample."""

    model: str = field(default="world-video", metadata={"help": "registered model name or dotted path"})
    model_path: str | None = field(default=None, metadata={"help": "checkpoint (default: the shipped video base)"})
    lora: str | None = field(default=None, metadata={"help": "LoRA to load before evaluating"})
    out: str = field(default="outputs/eval_world_video", metadata={"help": "directory for JSON, markdown, grids"})
    n_per_template: int = field(default=32, metadata={"ge": 1, "help": "prompts per template and split"})
    splits: list[str] = field(default_factory=lambda: list(SPLITS), metadata={"help": "seen and/or heldout"})
    steps: int = field(default=20, metadata={"ge": 1, "help": "sampling steps"})
    guidance: float = field(default=3.0, metadata={"ge": 0, "help": "CFG scale"})
    batch_size: int = field(default=32, metadata={"ge": 1, "help": "clips per sampling batch"})
    seed: int = field(default=0, metadata={"ge": 0, "help": "prompt selection and noise seeds"})

    def __post_init__(self):
        bad = [s for s in self.splits if s not in SPLITS]
        if bad or not self.splits:
            raise ValueError(f"splits {bad or '[]'} not allowed; choose from {', '.join(SPLITS)}")
        for name in ("n_per_template", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.guidance < 0:
            raise ValueError(f"guidance={self.guidance} must be >= 0")


def motion_suite_prompts(split: str, n_per_template: int, seed: int,
                         templates: tuple[str, ...] = MOTION_TEMPLATES) -> list[MotionSpec]:
    """The fixed prompt list of a split: n per template, in template order."""
    return WorldVideoPrompts.of(split, templates).fixed_specs(n_per_template, seed)


@torch.no_grad()
def generate_clips(adapter: FlowModelAdapter, prompts: list[str], *, steps: int, guidance: float, seed: int,
                   batch_size: int, progress: bool = True, desc: str = "sampling") -> torch.Tensor:
    """Clips [N, F, 3, 32, 32]; clip i uses seed + i, so results do not depend on batching."""
    out = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress):
        chunk = prompts[start:start + batch_size]
        cond = adapter.encode_prompts(chunk, cfg=guidance > 1)
        traj = sample(adapter, cond, num_steps=steps, height=32, width=32, num_frames=NUM_FRAMES,
                      guidance_scale=guidance, seeds=[seed + start + i for i in range(len(chunk))])
        out.append(adapter.decode(traj.final))
    return torch.cat(out)


def score_motion(videos: torch.Tensor, specs: list[MotionSpec]) -> dict:
    """Per-template and overall motion accuracies of clips against specs (one split)."""

    result = verify_motion(videos, specs)
    b, f = videos.shape[:2]
    clean = cleanliness(videos.reshape(b * f, *videos.shape[2:])).view(b, f).mean(1)
    flicker = temporal_flicker(videos)
    templates = [s.template for s in specs]

    def mean_where(values: torch.Tensor, template: str | None = None) -> float:
        keep = torch.tensor([template is None or t == template for t in templates]) & ~values.isnan()
        return float(values[keep].mean()) if keep.any() else float("nan")

    def summary(template: str | None) -> dict:
        return {"direction": mean_where(result.direction_correct, template),
                "whole_prompt": mean_where(result.passed, template),
                "score": mean_where(result.score, template),
                "speed": mean_where(result.speed, template), "stop": mean_where(result.stop, template),
                "consistency": mean_where(result.consistency, template),
                "flicker": mean_where(flicker, template), "cleanliness": mean_where(clean, template)}

    per_template = {t: summary(t) for t in MOTION_TEMPLATES if t in templates}
    return {"templates": per_template, "overall": summary(None), "n": len(specs),
            "per_sample": {"template": templates, "direction": result.direction_correct.tolist(),
                           "passed": result.passed.tolist()}}


def markdown_table(results: dict[str, dict]) -> str:
    """One column per split: direction accuracy per template, then the overall metrics."""
    splits = list(results)
    rows = ["| metric | " + " | ".join(splits) + " |", "|---|" + "---|" * len(splits)]

    def row(label, getter):
        rows.append(f"| {label} | " + " | ".join(f"{getter(results[s]):.3f}" for s in splits) + " |")

    for t in MOTION_TEMPLATES:
        if all(t in results[s]["templates"] for s in splits):
            row(f"{t}: direction", lambda r, t=t: r["templates"][t]["direction"])
    for key in ("direction", "whole_prompt", "score", "speed", "stop", "consistency", "flicker", "cleanliness"):
        label = "**motion direction (all templates)**" if key == "direction" else key
        row(label, lambda r, key=key: r["overall"][key])
    return "\n".join(rows) + "\n"


def filmstrip(videos: torch.Tensor, pad: int = 2) -> torch.Tensor:
    """Clips [B, F, 3, H, W] -> one image [3, H', W'] with a row per clip and a column per frame."""

    b, f = videos.shape[:2]
    return image_grid(videos.reshape(b * f, *videos.shape[2:]), columns=f, pad=pad)


def evaluate_motion(adapter: FlowModelAdapter, cfg: MotionEvalConfig, progress: bool = True) -> dict[str, dict]:
    """Run the suite; write results.json, results.md and a filmstrip PNG per split into cfg.out."""

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for split in cfg.splits:
        specs = motion_suite_prompts(split, cfg.n_per_template, cfg.seed)
        videos = generate_clips(adapter, [s.prompt for s in specs], steps=cfg.steps, guidance=cfg.guidance,
                                seed=cfg.seed, batch_size=cfg.batch_size, progress=progress, desc=f"eval {split}")
        results[split] = score_motion(videos, specs)
        n = cfg.n_per_template
        picks = torch.cat([videos[i * n: i * n + 2] for i in range(len(MOTION_TEMPLATES))])
        save_pixels(filmstrip(picks)[None], out / f"filmstrip_{split}.png", scale=3)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown_table(results))
    return results
