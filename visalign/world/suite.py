"""The world suite: GenEval-style accuracy of a model on the shapes world, judged by the exact verifier.

For each split (seen / held-out compositions) and template, a fixed set of prompts is sampled with fixed
seeds, and every image is checked by the main judge, the strict judge and the cleanliness score. Accuracy
per template is the whole-prompt pass rate; `overall` averages all templates, as GenEval's overall averages
all its tasks, and the hard tier (relations) is also reported on its own, with `overall_easy` the average
without it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from visalign.eval.stats import paired_delta
from visalign.models.base import FlowModelAdapter
from visalign.sampling import sample
from visalign.world.grammar import SPLITS, TEMPLATE_TIERS, TEMPLATES, SceneSpec
from visalign.world.prompts import WorldPrompts
from visalign.world.verify import cleanliness, verify

SINGLE_PHRASE = ("single", "size", "count", "position")  # templates with one noun phrase


@dataclass
class WorldEvalConfig:
    """`visalign eval --suite world`: which model, how many prompts, how to sample."""

    model: str = field(default="world", metadata={"help": "registered model name or dotted path"})
    model_path: str | None = field(default=None, metadata={"help": "checkpoint (default: the shipped base)"})
    lora: str | None = field(default=None, metadata={"help": "LoRA to load before evaluating"})
    out: str = field(default="outputs/eval_world", metadata={"help": "directory for JSON, markdown and grids"})
    n_per_template: int = field(default=64, metadata={"ge": 1, "help": "prompts per template and split"})
    splits: list[str] = field(default_factory=lambda: list(SPLITS), metadata={"help": "seen and/or heldout"})
    templates: list[str] = field(default_factory=lambda: list(TEMPLATES), metadata={
        "help": f"templates to evaluate ({', '.join(TEMPLATES)})"})
    steps: int = field(default=20, metadata={"ge": 1, "help": "sampling steps"})
    guidance: float = field(default=3.0, metadata={"ge": 0, "help": "CFG scale"})
    batch_size: int = field(default=64, metadata={"ge": 1, "help": "samples per sampling batch"})
    seed: int = field(default=0, metadata={"ge": 0, "help": "prompt selection and noise seeds"})
    compare: list[str] = field(default_factory=list, metadata={
        "help": "comparison mode: checkpoints to evaluate side by side on the same prompts and seeds "
                "('base' = the shipped model, a .safetensors checkpoint, or lora:DIR); deltas vs the first"})

    def __post_init__(self):
        bad = [s for s in self.splits if s not in SPLITS]
        if bad or not self.splits:
            raise ValueError(f"splits {bad or '[]'} not allowed; choose from {', '.join(SPLITS)}")
        bad = [t for t in self.templates if t not in TEMPLATES]
        if bad or not self.templates or len(set(self.templates)) != len(self.templates):
            raise ValueError(f"templates {self.templates} must be distinct and from {', '.join(TEMPLATES)}")
        for name in ("n_per_template", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.guidance < 0:
            raise ValueError(f"guidance={self.guidance} must be >= 0")
        if len(set(self.compare)) != len(self.compare):
            raise ValueError(f"compare entries must be distinct, got {self.compare}")


def suite_prompts(split: str, n_per_template: int, seed: int,
                  templates: tuple[str, ...] = TEMPLATES) -> list[SceneSpec]:
    """The fixed prompt list of a split: n per template, in template order."""
    return WorldPrompts.of(split, templates).fixed_specs(n_per_template, seed)


@torch.no_grad()
def generate_world(adapter: FlowModelAdapter, specs: list[SceneSpec], *, steps: int, guidance: float,
                   seed: int, batch_size: int, progress: bool = True, desc: str = "sampling") -> torch.Tensor:
    """Images [N, 3, 32, 32] for the specs; sample i uses seed + i, so results do not depend on batching. The
    progress bar counts denoising steps of samples, so it moves with every step of a batch, not once a batch."""
    out = []
    bar = tqdm(total=len(specs) * steps, desc=desc, unit=" sample-steps", disable=not progress)
    stepped = adapter.with_velocity_hook(lambda latents, *_: bar.update(latents.shape[0]))
    try:
        for start in range(0, len(specs), batch_size):
            chunk = specs[start:start + batch_size]
            cond = adapter.encode_prompts([s.prompt for s in chunk], cfg=guidance > 1)
            traj = sample(stepped, cond, num_steps=steps, height=32, width=32, guidance_scale=guidance,
                          seeds=[seed + start + i for i in range(len(chunk))])
            out.append(adapter.decode(traj.final))
    finally:
        bar.close()
    return torch.cat(out)


def score_world(images: torch.Tensor, specs: list[SceneSpec]) -> dict:
    """Per-template and per-category accuracies of images against specs (one split)."""
    main, strict = verify(images, specs), verify(images, specs, strict=True)
    clean = cleanliness(images)
    templates = [s.template for s in specs]

    def mean_where(values, keep):
        picked = [float(v) for v, k in zip(values, keep, strict=True) if k]
        return sum(picked) / len(picked) if picked else float("nan")

    def concept_rate(kind: str, only: tuple[str, ...] | None = None) -> float:
        """Fraction satisfied among concepts of one kind (names "<object>/<kind>" or "<kind>"), optionally
        only in some templates."""
        hits = [ok for spec, concepts in zip(specs, main.concepts, strict=True) if only is None or spec.template in only
                for name, ok in concepts.items() if name.rsplit("/", 1)[-1] == kind]
        return sum(hits) / len(hits) if hits else float("nan")

    per_template = {t: {"whole_prompt": mean_where(main.passed, [x == t for x in templates]),
                        "strict": mean_where(strict.passed, [x == t for x in templates]),
                        "score": mean_where(main.score, [x == t for x in templates])}
                    for t in TEMPLATES if t in templates}
    easy = [t for t in per_template if TEMPLATE_TIERS[t] != "hard"]
    hard = [t for t in per_template if TEMPLATE_TIERS[t] == "hard"]
    return {
        "templates": per_template,
        "overall": sum(v["whole_prompt"] for v in per_template.values()) / len(per_template),
        "overall_strict": sum(v["strict"] for v in per_template.values()) / len(per_template),
        "overall_easy": sum(per_template[t]["whole_prompt"] for t in easy) / max(1, len(easy)),
        "hard_tier": {t: per_template[t]["whole_prompt"] for t in hard},
        # GenEval's task names: "colors" judges the colour of a prompt's single noun phrase; attribution of
        # colours to two objects is its own task ("color_attr", our two_objects template).
        "categories": {"single_object": per_template.get("single", {}).get("whole_prompt", float("nan")),
                       "colors": concept_rate("color", SINGLE_PHRASE),
                       "counting": per_template.get("count", {}).get("whole_prompt", float("nan")),
                       "position": per_template.get("position", {}).get("whole_prompt", float("nan")),
                       "color_attr": per_template.get("two_objects", {}).get("whole_prompt", float("nan")),
                       "size": concept_rate("size"),
                       "color (all concepts)": concept_rate("color"), "shape (all concepts)": concept_rate("shape"),
                       "relation concept": concept_rate("relation")},
        "partial_credit": float(main.score.mean()),
        "cleanliness": float(clean.mean()),
        "n": len(specs),
        # per prompt, in suite order: what comparison mode pairs across checkpoints
        "per_sample": {"template": templates, "prompt": [s.prompt for s in specs],
                       "passed": [bool(v) for v in main.passed],
                       "strict": [bool(v) for v in strict.passed], "cleanliness": [float(v) for v in clean]},
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
    row("**overall whole-prompt** (all templates)", lambda r: r["overall"])
    row("overall, strict judge", lambda r: r["overall_strict"])
    row("overall without the hard tier", lambda r: r["overall_easy"])
    for c in ("single_object", "colors", "counting", "position", "color_attr", "size", "color (all concepts)",
              "shape (all concepts)", "relation concept"):
        row(f"{c}", lambda r, c=c: r["categories"][c])
    row("partial credit", lambda r: r["partial_credit"])
    row("cleanliness", lambda r: r["cleanliness"])
    return "\n".join(rows) + "\n"


def labelled_grid(images: torch.Tensor, per_sample: dict, n_per_template: int, templates: list[str], title: str,
                  columns: int = 8, scale: int = 3):
    """The first `columns` samples of each template (no tile repeated, whatever n is): a title, the template on
    each row, the verifier's verdict on each tile (green ✓ / red ✗ in its corner, drawn: the default font has no
    such glyphs), a number on each tile and a legend of the numbered prompts below."""
    from PIL import Image, ImageDraw

    from visalign.media import to_uint8

    tile, pad, left, top, line = 32 * scale, 4, 110, 22, 12
    shown = min(columns, n_per_template)
    picks = [(t, i * n_per_template + j) for i, t in enumerate(templates) for j in range(shown)]
    legend = [f"{k + 1}. {per_sample['prompt'][idx]}" for k, (_, idx) in enumerate(picks)] \
        if "prompt" in per_sample else []
    width = left + shown * (tile + pad)
    height = top + len(templates) * (tile + pad) + line * (len(legend) + 1)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), title, fill="black")
    for k, (template, idx) in enumerate(picks):
        row, col = divmod(k, shown)
        x, y = left + col * (tile + pad), top + row * (tile + pad)
        if col == 0:
            draw.text((4, y + tile // 2 - 6), template, fill="black")
        img = Image.fromarray(to_uint8(images[idx].permute(1, 2, 0))).resize((tile, tile), Image.NEAREST)
        canvas.paste(img, (x, y))
        ok = bool(per_sample["passed"][idx])
        colour = (0, 150, 0) if ok else (200, 0, 0)
        cx, cy = x + tile - 14, y + 2
        draw.rectangle((cx, cy, cx + 12, cy + 12), fill="white", outline=colour)
        if ok:
            draw.line((cx + 2, cy + 6, cx + 5, cy + 10, cx + 10, cy + 2), fill=colour, width=2)
        else:
            draw.line((cx + 2, cy + 2, cx + 10, cy + 10), fill=colour, width=2)
            draw.line((cx + 2, cy + 10, cx + 10, cy + 2), fill=colour, width=2)
        draw.rectangle((x, y, x + 7 * len(str(k + 1)) + 3, y + 12), fill="white")
        draw.text((x + 2, y + 1), str(k + 1), fill="black")
    for k, text in enumerate(legend):
        draw.text((4, top + len(templates) * (tile + pad) + line * k), text, fill="black")
    return canvas


def evaluate_world(adapter: FlowModelAdapter, cfg: WorldEvalConfig, progress: bool = True,
                   label: str | None = None) -> dict[str, dict]:
    """Run the suite; write results.json, results.md and a labelled sample grid per split into cfg.out
    (`label`, e.g. "base", heads the grids)."""

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for split in cfg.splits:
        specs = suite_prompts(split, cfg.n_per_template, cfg.seed, tuple(cfg.templates))
        images = generate_world(adapter, specs, steps=cfg.steps, guidance=cfg.guidance, seed=cfg.seed,
                                batch_size=cfg.batch_size, progress=progress, desc=f"eval {split}")
        results[split] = score_world(images, specs)
        labelled_grid(images, results[split]["per_sample"], cfg.n_per_template, list(cfg.templates),
                      f"{label + ' · ' if label else ''}{split} compositions").save(out / f"grid_{split}.png")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown_table(results))
    return results


def compare_world(results: dict[str, dict[str, dict]], level: float = 0.95, seed: int = 0) -> dict:
    """Paired deltas of every entry against the first, per split and template and overall, with bootstrap
    intervals over prompts (same prompts and seeds on every side)."""

    names = list(results)
    base = results[names[0]]
    out = {}
    for name in names[1:]:
        out[name] = {}
        for split, r in results[name].items():
            a, b = base[split]["per_sample"], r["per_sample"]
            if a["template"] != b["template"] or a.get("prompt", b.get("prompt")) != b.get("prompt", a.get("prompt")):
                raise ValueError(f"{name} and {names[0]} were not evaluated on the same prompts")
            passed_a = torch.tensor(a["passed"], dtype=torch.float64)
            passed_b = torch.tensor(b["passed"], dtype=torch.float64)
            rows = {"overall": paired_delta(passed_a, passed_b, level=level, seed=seed)}
            for t in dict.fromkeys(a["template"]):
                keep = torch.tensor([x == t for x in a["template"]])
                rows[t] = paired_delta(passed_a[keep], passed_b[keep], level=level, seed=seed)
            if "cleanliness" in a and "cleanliness" in b:  # results written before it was recorded lack it
                rows["cleanliness"] = paired_delta(a["cleanliness"], b["cleanliness"], level=level, seed=seed)
            out[name][split] = rows
    return out


def comparison_table(results: dict[str, dict[str, dict]], deltas: dict) -> str:
    """Markdown: accuracy of each entry per split and template, and the paired delta vs the first with its
    95% interval."""
    names = list(results)
    rows = ["| split | template | " + " | ".join(names) + " | " +
            " | ".join(f"Δ {n} (95% CI)" for n in names[1:]) + " |",
            "|---|---|" + "---|" * (len(names) + len(names) - 1)]
    for split in results[names[0]]:
        for t in ["overall", *results[names[0]][split]["templates"]]:
            accs = [results[n][split]["overall"] if t == "overall"
                    else results[n][split]["templates"][t]["whole_prompt"] for n in names]
            ds = [deltas[n][split][t] for n in names[1:]]
            rows.append(f"| {split} | {t} | " + " | ".join(f"{a:.3f}" for a in accs) + " | " +
                        " | ".join(f"{d['delta']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]" for d in ds) + " |")
    return "\n".join(rows) + "\n"
