"""`visalign quickstart`: the main job on the built-in world, end to end on a laptop CPU, no downloads.

1. Evaluate the shipped base model with the exact verifier on seen and held-out compositions.
2. Align it with the recipe the comparison measured best for a few minutes of CPU (`QUICKSTART_CONFIG`, shipped
   inside the package; docs/results/quickstart.md says which and why).
3. Evaluate again with the same prompts and seeds; write a before/after table, with the paired 95% interval of
   every change, and side-by-side grids.
"""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path

import torch
from PIL import Image

from visalign.models import load_model
from visalign.prompts import prompt_source
from visalign.trainers import load_train_config, trainer_class
from visalign.world.prompts import WorldPrompts
from visalign.world.suite import WorldEvalConfig, compare_world, evaluate_world

# The quickstart's training config: a train config like any in configs/, shipped inside the package.
QUICKSTART_CONFIG = resources.files("visalign") / "assets" / "quickstart.yaml"


def _interval(ci: dict | None) -> str:
    return "—" if ci is None else f"[{ci['low']:+.3f}, {ci['high']:+.3f}]"


def _delta_table(before: dict, after: dict) -> str:
    """Base, aligned and Δ per template and split, with the paired 95% bootstrap interval of Δ over the prompts
    (same prompts and seeds on both sides; `compare_world`)."""
    deltas = compare_world({"base": before, "aligned": after})["aligned"]
    rows = ["| metric | split | base | aligned | Δ | 95% interval of Δ (paired) |", "|---|---|---|---|---|---|"]
    for split in before:
        b, a, d = before[split], after[split], deltas[split]
        entries = [(f"{t} whole-prompt", b["templates"][t]["whole_prompt"], a["templates"][t]["whole_prompt"], d[t])
                   for t in b["templates"]]
        entries += [("**overall whole-prompt**", b["overall"], a["overall"], d["overall"]),
                    ("overall, strict judge", b["overall_strict"], a["overall_strict"], None),
                    ("cleanliness", b["cleanliness"], a["cleanliness"], d.get("cleanliness"))]
        rows += [f"| {name} | {split} | {x:.3f} | {y:.3f} | {y - x:+.3f} | {_interval(ci)} |"
                 for name, x, y, ci in entries]
    return "\n".join(rows) + "\n"


def _side_by_side(left: Path, right: Path, out: Path) -> None:
    a, b = Image.open(left).convert("RGB"), Image.open(right).convert("RGB")
    canvas = Image.new("RGB", (a.width + b.width + 16, max(a.height, b.height)), "white")
    canvas.paste(a, (0, 0))
    canvas.paste(b, (a.width + 16, 0))
    canvas.save(out)


def quickstart(out: str | Path, steps: int | None = None, n_per_template: int = 48, extra: list[str] = (),
               log=print, resume: bool = False) -> str:
    """Run the main job into `out`; returns the before/after markdown table (with a line saying what ran).

    `steps`: training steps (default: the shipped config's `train.max_steps`); `extra`: config overrides;
    `log`: where stage messages go; `resume`: go on from what an interrupted run with the same settings left in
    `out` (the base evaluation, the training's latest checkpoint: bit-identical, so the same table)."""

    start = time.perf_counter()
    out = Path(out)
    overrides = [f"run.out_dir={out / 'run'}", f"run.resume_from={'latest' if resume else 'null'}",
                 "run.eval_every=0", "run.log_with=none", "run.checkpoint_every=1", "run.checkpoints_total_limit=1",
                 *([f"train.max_steps={steps}"] if steps is not None else []), *extra]
    cfg = load_train_config(QUICKSTART_CONFIG, overrides)  # checked before any model loads
    source = prompt_source(cfg.train.prompts)
    if not isinstance(source, WorldPrompts) or source.split != "seen":
        raise ValueError(f"quickstart: train.prompts={cfg.train.prompts!r} must be the world's seen split "
                         "(world:seen[:TEMPLATES]); the evaluation compares seen with held-out compositions")
    templates = list(source.templates)
    eval_cfg = {"n_per_template": n_per_template, "guidance": cfg.sampling.guidance, "steps": cfg.sampling.steps,
                "templates": templates}
    n_prompts = n_per_template * len(templates)
    saved = out / "base" / "results.json"
    settings = out / "base" / "settings.json"
    if resume and saved.exists() and settings.exists() and json.loads(settings.read_text()) == eval_cfg:
        log(f"[1/3] the base model's evaluation on {n_prompts} + {n_prompts} prompts is in {saved}: reused")
        before = json.loads(saved.read_text())
    else:
        log(f"[1/3] evaluating the base model on {n_prompts} seen and {n_prompts} held-out prompts "
            f"({', '.join(templates)})")
        before = evaluate_world(load_model("world"), WorldEvalConfig(out=str(out / "base"), **eval_cfg), label="base")
        settings.write_text(json.dumps(eval_cfg))
    log(f"[2/3] aligning with {cfg.trainer} for {cfg.train.max_steps} steps "
        f"({cfg.train.prompts_per_step} prompts × {cfg.train.group_size} samples each)")
    trainer = trainer_class(cfg.trainer)(cfg)
    trainer.train()
    if trainer.ema is not None:
        trainer.ema.swap()
    log("[3/3] evaluating the aligned model on the same prompts and seeds")
    with torch.no_grad():
        after = evaluate_world(trainer.adapter, WorldEvalConfig(out=str(out / "aligned"), **eval_cfg),
                               label="aligned")
    minutes = (time.perf_counter() - start) / 60
    table = (f"{cfg.trainer}, {cfg.train.max_steps} steps; evaluated on {n_prompts} prompts per split "
             f"({n_per_template} per template), {cfg.sampling.steps} sampling steps, same seeds before and after; "
             f"{minutes:.1f} min.\n\n" + _delta_table(before, after))
    (out / "table.md").write_text(table)
    for split in before:
        _side_by_side(out / "base" / f"grid_{split}.png", out / "aligned" / f"grid_{split}.png",
                      out / f"before_after_{split}.png")
    return table
