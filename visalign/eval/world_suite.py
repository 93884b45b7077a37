"""The world suite: GenEval-style accuracy of a model on the shapes world, judged by the exact verifier.

For each split (seen / held-out compositions) and template, a fixed set of prompts is sampled with fixed
seeds, and every image is checked by the main judge, the strict judge and the cleanliness score. Accuracy
per template is the whole-prompt pass rate; `overall` averages the templates outside the hard tier
(relations are reported on their own, as GenEval reports position separately).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from visalign.models.base import FlowModelAdapter
from visalign.sampling import sample
from visalign.world.grammar import SPLITS, TEMPLATE_TIERS, TEMPLATES, SceneSpec, sample_specs
from visalign.world.verify import cleanliness, verify


@dataclass
class WorldEvalConfig:
    """`visalign eval --suite world`: which model, how many prompts, how to sample."""

    model: str = field(default="world", metadata={"help": "registered model name or dotted path"})
    model_path: str | None = field(default=None, metadata={"help": "checkpoint (default: the shipped base)"})
    lora: str | None = field(default=None, metadata={"help": "LoRA to load before evaluating"})
    out: str = field(default="outputs/eval_world", metadata={"help": "directory for JSON, markdown and grids"})
    n_per_template: int = field(default=64, metadata={"help": "prompts per template and split"})
    splits: list[str] = field(default_factory=lambda: list(SPLITS), metadata={"help": "seen and/or heldout"})
    steps: int = field(default=20, metadata={"help": "sampling steps"})
    guidance: float = field(default=3.0, metadata={"help": "CFG scale"})
    batch_size: int = field(default=64, metadata={"help": "samples per sampling batch"})
    seed: int = field(default=0, metadata={"help": "prompt selection and noise seeds"})

    def __post_init__(self):
        bad = [s for s in self.splits if s not in SPLITS]
        if bad or not self.splits:
            raise ValueError(f"splits {bad or '[]'} not allowed; choose from {', '.join(SPLITS)}")
        for name in ("n_per_template", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.guidance < 0:
            raise ValueError(f"guidance={self.guidance} must be >= 0")


def suite_prompts(split: str, n_per_template: int, seed: int) -> list[SceneSpec]:
    """The fixed prompt list of a split: n per template, in template order."""
    specs = []
    for i, template in enumerate(TEMPLATES):
        specs += sample_specs(n_per_template, split, (template,), generator=seed * 7919 + i)
    return specs


@torch.no_grad()
def generate_world(adapter: FlowModelAdapter, specs: list[SceneSpec], *, steps: int, guidance: float,
                   seed: int, batch_size: int, progress: bool = True, desc: str = "sampling") -> torch.Tensor:
    """Images [N, 3, 32, 32] for the specs; sample i uses seed + i, so results do not depend on batching."""
    out = []
    for start in tqdm(range(0, len(specs), batch_size), desc=desc, disable=not progress):
        chunk = specs[start:start + batch_size]
        cond = adapter.encode_prompts([s.prompt for s in chunk], cfg=guidance > 1)
        traj = sample(adapter, cond, num_steps=steps, height=32, width=32, guidance_scale=guidance,
                      seeds=[seed + start + i for i in range(len(chunk))])
        out.append(adapter.decode(traj.final))
    return torch.cat(out)


def score_world(images: torch.Tensor, specs: list[SceneSpec]) -> dict:
    """Per-template and per-category accuracies of images against specs (one split)."""
    main, strict = verify(images, specs), verify(images, specs, strict=True)
    clean = cleanliness(images)
    templates = [s.template for s in specs]

    def mean_where(values, keep):
        picked = [float(v) for v, k in zip(values, keep) if k]
        return sum(picked) / len(picked) if picked else float("nan")

    def concept_rate(kind: str) -> float:
        """Fraction satisfied among concepts of one kind; names are "<object>/<kind>" or "<kind>"."""
        hits = [ok for concepts in main.concepts for name, ok in concepts.items() if name.rsplit("/", 1)[-1] == kind]
        return sum(hits) / len(hits) if hits else float("nan")

    per_template = {t: {"whole_prompt": mean_where(main.passed, [x == t for x in templates]),
                        "strict": mean_where(strict.passed, [x == t for x in templates]),
                        "score": mean_where(main.score, [x == t for x in templates])}
                    for t in TEMPLATES if t in templates}
    easy = [t for t in per_template if TEMPLATE_TIERS[t] != "hard"]
    hard = [t for t in per_template if TEMPLATE_TIERS[t] == "hard"]
    return {
        "templates": per_template,
        "overall": sum(per_template[t]["whole_prompt"] for t in easy) / max(1, len(easy)),
        "overall_strict": sum(per_template[t]["strict"] for t in easy) / max(1, len(easy)),
        "hard_tier": {t: per_template[t]["whole_prompt"] for t in hard},
        "categories": {"color": concept_rate("color"), "shape": concept_rate("shape"),
                       "object": concept_rate("object"), "count": concept_rate("count"),
                       "size": concept_rate("size"), "position": concept_rate("position"),
                       "relation": concept_rate("relation"),
                       "single_object": per_template.get("single", {}).get("whole_prompt", float("nan"))},
        "partial_credit": float(main.score.mean()),
        "cleanliness": float(clean.mean()),
        "n": len(specs),
    }


def markdown_table(results: dict[str, dict]) -> str:
    """One column per split: templates, overall, categories, cleanliness."""
    splits = list(results)
    rows = [("| metric | " + " | ".join(splits) + " |"), "|---|" + "---|" * len(splits)]

    def row(label, getter):
        rows.append(f"| {label} | " + " | ".join(f"{getter(results[s]):.3f}" for s in splits) + " |")

    for t in TEMPLATES:
        if all(t in results[s]["templates"] for s in splits):
            tier = " (hard tier)" if TEMPLATE_TIERS[t] == "hard" else ""
            row(f"{t}{tier}", lambda r, t=t: r["templates"][t]["whole_prompt"])
    row("**overall whole-prompt** (excl. hard tier)", lambda r: r["overall"])
    row("overall, strict judge", lambda r: r["overall_strict"])
    for c in ("color", "shape", "single_object", "count", "size", "position", "relation"):
        row(f"{c} accuracy", lambda r, c=c: r["categories"][c])
    row("partial credit", lambda r: r["partial_credit"])
    row("cleanliness", lambda r: r["cleanliness"])
    return "\n".join(rows) + "\n"


def evaluate_world(adapter: FlowModelAdapter, cfg: WorldEvalConfig, progress: bool = True) -> dict[str, dict]:
    """Run the suite; write results.json, results.md and a sample grid per split into cfg.out."""
    from visalign.generate import save_pixels

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for split in cfg.splits:
        specs = suite_prompts(split, cfg.n_per_template, cfg.seed)
        images = generate_world(adapter, specs, steps=cfg.steps, guidance=cfg.guidance, seed=cfg.seed,
                                batch_size=cfg.batch_size, progress=progress, desc=f"eval {split}")
        results[split] = score_world(images, specs)
        picks = torch.cat([images[i * cfg.n_per_template: i * cfg.n_per_template + 8] for i in range(len(TEMPLATES))])
        save_pixels(picks, out / f"grid_{split}.png", scale=3)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown_table(results))
    return results
