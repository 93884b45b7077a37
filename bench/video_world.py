"""Video gain in the moving-shapes world: align the shipped world-video model on the exact motion verifier.

    .venv/bin/python bench/video_world.py --minutes 20 --out outputs/bench_video

Arms (each from the shipped video base model, the same training compute budget and rollouts per step):
  nft    DiffusionNFT (configs/nft_world_video.yaml)
  grpo   Flow-GRPO (configs/flow_grpo_world_video.yaml)
  dpo    online Flow-DPO (configs/dpo_world_video.yaml)
  rwr    reward-filtered SFT, the best clip of each group (configs/rwr_world_video.yaml)

Every `--eval-every` steps (and at step 0) the current weights sample a fixed set of held-out compositions and
of RL (seen) prompts with fresh seeds; reported: motion-direction accuracy (every object moves the stated way,
or stays still), whole-prompt pass rate, the verifier's temporal-consistency group and VBench temporal
flickering (1 = no frame-to-frame change; a model that stops moving objects scores higher, so it is read with
direction accuracy). Evaluation is at CFG 3 (`--eval-guidance`), whatever CFG the rollouts use
(`sampling.guidance=1.0` gives DiffusionNFT's CFG-free rollouts). Writes curve.png, results.md and results.json,
all measured in this one run.

The budget is compute, not wall time: the arms are built in one process and take their steps interleaved, one
step of each per round (order alternating; bench/flow_grpo_world.py's `run_arms`, through bench/paired.py's
`interleave_budget`), each until its own process CPU time reaches `--minutes` of `--threads` cores, so a busy
machine shortens no arm's budget and favours none; evaluation is not counted. A curve's "minutes" are that CPU
time over the threads ("wall_minutes": the same steps' wall time). With two or more arms the bench prints the
paired table of their seconds per step (process CPU, median and spread of the per-round ratios to the first arm)
and writes it, with the wall-clock one and every step's times, to timing.json (one arm: its median and the
context).
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import torch
from flow_grpo_world import run_arms, timing

from visalign.world.motion_suite import generate_clips, motion_suite_prompts, score_motion

ARMS = {
    "nft": ("configs/nft_world_video.yaml", []),
    "grpo": ("configs/flow_grpo_world_video.yaml", []),
    "dpo": ("configs/dpo_world_video.yaml", []),
    "rwr": ("configs/rwr_world_video.yaml", []),
}
METRICS = ("direction", "whole_prompt", "consistency", "flicker", "cleanliness")


def evaluate(trainer, n: int, seed: int, guidance: float = 3.0) -> dict:
    """Motion metrics on held-out compositions and RL prompts, n per template, fresh seeds, at CFG `guidance`
    (the world-video eval suite's 3.0 by default, whatever CFG the rollouts use)."""
    out = {}
    if trainer.ema is not None:
        trainer.ema.swap()
    try:
        for split in ("heldout", "seen"):
            specs = motion_suite_prompts(split, n, 1234)
            videos = generate_clips(trainer.adapter, [s.prompt for s in specs], steps=20,
                                    guidance=guidance, seed=seed, batch_size=32, progress=False)
            scores = score_motion(videos, specs)
            out[split] = {**{k: scores["overall"][k] for k in METRICS},
                          "direction_by_template": {t: v["direction"] for t, v in scores["templates"].items()}}
    finally:
        if trainer.ema is not None:
            trainer.ema.swap()
    return out


def plot(results: dict[str, list[dict]], path: Path, threads: int = 2) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for arm, curve in results.items():
        x_r = [c["rollouts"] for c in curve]
        x_t = [c["minutes"] for c in curve]
        axes[0].plot(x_r, [c["heldout"]["direction"] for c in curve], "s-", label=f"{arm}: held-out")
        axes[0].plot(x_r, [c["seen"]["direction"] for c in curve], "o--", label=f"{arm}: RL prompts")
        axes[1].plot(x_t, [c["heldout"]["direction"] for c in curve], "s-", label=f"{arm}: direction")
        axes[1].plot(x_t, [c["heldout"]["whole_prompt"] for c in curve], "^:", label=f"{arm}: whole prompt")
        axes[2].plot(x_t, [c["heldout"]["consistency"] for c in curve], "o-", label=f"{arm}: verifier consistency")
        axes[2].plot(x_t, [c["heldout"]["flicker"] for c in curve], "x--", label=f"{arm}: VBench flicker")
    axes[0].set(xlabel="rollouts (clips sampled)", ylabel="motion-direction accuracy", title="direction vs rollouts")
    xlabel = f"training time (min of {threads} cores, CPU)"
    axes[1].set(xlabel=xlabel, ylabel="held-out accuracy", title="held-out vs time")
    axes[2].set(xlabel=xlabel, ylabel="score (1 = consistent)", title="temporal consistency")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(results: dict[str, list[dict]]) -> str:
    rows = [("| arm | minutes | rollouts | held-out direction | Δ | held-out whole prompt | RL-prompt direction | Δ "
             "| consistency (held-out) | flicker (held-out) | cleanliness |"), "|---|" + "---|" * 10]
    for arm, curve in results.items():
        base = curve[0]
        for c in (curve[0], curve[-1]):
            h, s = c["heldout"], c["seen"]
            rows.append(f"| {arm} | {c['minutes']:.1f} | {c['rollouts']} | {h['direction']:.3f} | "
                        f"{h['direction'] - base['heldout']['direction']:+.3f} | {h['whole_prompt']:.3f} | "
                        f"{s['direction']:.3f} | {s['direction'] - base['seen']['direction']:+.3f} | "
                        f"{h['consistency']:.3f} | {h['flicker']:.3f} | {h['cleanliness']:.3f} |")
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=20.0,
                        help="training budget per arm: minutes of --threads cores of process CPU time")
    parser.add_argument("--eval-every", type=int, default=10, help="steps between evaluations")
    parser.add_argument("--n", type=int, default=16, help="evaluation prompts per template and split")
    parser.add_argument("--arms", nargs="+", default=["nft"], choices=list(ARMS))
    parser.add_argument("--eval-guidance", type=float, default=3.0,
                        help="CFG of the evaluation (configs/eval_world_video.yaml's), independent of the rollouts'")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--out", default="outputs/bench_video")
    parser.add_argument("overrides", nargs="*", help="config overrides for every arm")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    evaluate_at = functools.partial(evaluate, guidance=args.eval_guidance)
    results, budgeted = run_arms({arm: ARMS[arm] for arm in args.arms}, args, evaluate=evaluate_at,
                                 threads=args.threads)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(table(results))
    plot(results, out / "curve.png", args.threads)
    print(table(results))
    print(timing(budgeted, out, args.threads))
    print(f"wrote {out}/curve.png, results.md, results.json, timing.json")


if __name__ == "__main__":
    main()
