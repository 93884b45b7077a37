"""`visalign quickstart`: the main job on the built-in world, end to end on a laptop CPU, no downloads.

1. Evaluate the shipped base model with the exact verifier (seen and held-out compositions).
2. Align it with Flow-GRPO on the verifier (plus a cleanliness term against background drift).
3. Evaluate again with the same prompts and seeds; write a before/after table, with the paired 95% interval of
   every change, and grids.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from visalign.models import load_model
from visalign.trainers import load_train_config
from visalign.trainers.flow_grpo import FlowGRPOTrainer
from visalign.world.suite import TEMPLATES, WorldEvalConfig, compare_world, evaluate_world

# Flow-GRPO on the world (configs/flow_grpo_world.yaml, written out so the installed package needs no files).
TRAIN_OVERRIDES = [
    "model.name=world", "model.finetune=full", "sampling.steps=10", "sampling.guidance=3.0",
    "sampling.sde=flow_grpo", "sampling.noise_level=0.7", "sampling.window_size=4", "sampling.window_range=[0, 4]",
    "sampling.batch_size=64", "train.prompts=world:seen:count,position,two_objects,relation",
    "train.prompts_per_step=16", "train.group_size=8", "train.train_batch_size=32", "train.lr=5e-5",
    "rewards={world-verifier: 1.0, world-cleanliness: 0.5}", "eval_rewards=[world-strict]",
    "run.eval_every=0", "run.log_with=none", "run.resume_from=null",
]


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
                   for t in TEMPLATES if t in b["templates"]]
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


def quickstart(out: str | Path, steps: int = 10, n_per_template: int = 16, extra: list[str] = ()) -> str:
    """Run the main job into `out`; returns the before/after markdown table."""

    out = Path(out)
    cfg = load_train_config(None, [*TRAIN_OVERRIDES, f"train.max_steps={steps}", f"run.out_dir={out / 'run'}",
                                   f"run.checkpoint_every={steps}", *extra])
    eval_cfg = {"n_per_template": n_per_template, "guidance": cfg.sampling.guidance}
    before = evaluate_world(load_model("world"), WorldEvalConfig(out=str(out / "base"), **eval_cfg))
    trainer = FlowGRPOTrainer(cfg)
    trainer.train()
    if trainer.ema is not None:
        trainer.ema.swap()
    with torch.no_grad():
        after = evaluate_world(trainer.adapter, WorldEvalConfig(out=str(out / "aligned"), **eval_cfg))
    table = _delta_table(before, after)
    (out / "table.md").write_text(table)
    for split in before:
        _side_by_side(out / "base" / f"grid_{split}.png", out / "aligned" / f"grid_{split}.png",
                      out / f"before_after_{split}.png")
    return table
