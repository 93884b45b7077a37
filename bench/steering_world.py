"""Inference-time steering on the shipped world model, compared at equal denoiser NFE, in one run.

    .venv/bin/python bench/steering_world.py --n 16 --out outputs/bench_steering

For each method, every prompt of a fixed set (all six templates, seen compositions) gets one output; the exact
verifier judges it. Reported: whole-prompt accuracy (main judge), mean verifier reward (partial credit), denoiser
NFE per prompt (CFG counts 2), wall time, and the share of wall time spent outside the denoiser (decodes,
rewards, resampling). Best-of-N and FK use the verifier itself as the steering reward; FK is run at k = 2, 4, 8
against best-of-k, which spends the same NFE. Guidance and ReNO need a differentiable reward, so they steer with
`world-soft` (a differentiable proxy of the verifier); the verifier still judges them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from visalign.models import load_model
from visalign.steering import steer
from visalign.world.suite import score_world, suite_prompts


def run(adapter, specs, method: str, options: dict, args, reward: str = "world-verifier") -> dict:
    prompts = [s.prompt for s in specs]
    metadata = [{"spec": s} for s in specs]
    start = time.perf_counter()
    out = steer(adapter, prompts, {reward: 1.0}, method, steps=args.steps, guidance=args.guidance,
                seed=args.seed, metadata=metadata, **options)
    wall = time.perf_counter() - start
    scored = score_world(out.images, specs)
    return {"accuracy": scored["overall"], "reward": scored["partial_credit"],
            "nfe_per_prompt": out.report["nfe_per_prompt"], "wall_time": wall,
            "overhead": out.report["overhead_fraction"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=16, help="prompts per template")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--lam", type=float, default=10.0)
    parser.add_argument("--every", type=int, default=4, help="FK resampling interval (steps)")
    parser.add_argument("--guidance-scale", dest="guidance_scale", type=float, default=1.0)
    parser.add_argument("--reno-lr", dest="reno_lr", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/bench_steering")
    args = parser.parse_args()
    torch.set_num_threads(2)
    adapter = load_model("world")
    specs = suite_prompts("seen", args.n, 4321)
    arms = {"base (1 sample)": ("best_of_n", {"n": 1}, "world-verifier")}
    for k in args.ks:
        arms[f"best-of-{k}"] = ("best_of_n", {"n": k}, "world-verifier")
        arms[f"FK k={k}"] = ("fk", {"k": k, "lam": args.lam, "every": args.every, "potential": "max",
                                    "start": args.steps // 4}, "world-verifier")
    arms["guidance (world-soft)"] = ("guidance", {"scale": args.guidance_scale, "stop": args.steps * 3 // 4},
                                     "world-soft")
    arms["ReNO, 3 iterations (world-soft)"] = ("reno", {"iterations": 3, "lr": args.reno_lr}, "world-soft")
    results = {}
    for name, (method, options, reward) in arms.items():
        results[name] = run(adapter, specs, method, options, args, reward)
        print(name, json.dumps(results[name]), flush=True)
    rows = [("| method | NFE / prompt | whole-prompt accuracy | verifier partial credit | wall time (s) | "
             "outside denoiser |"),
            "|---|---|---|---|---|---|"]
    for name, r in results.items():
        rows.append(f"| {name} | {r['nfe_per_prompt']:.0f} | {r['accuracy']:.3f} | {r['reward']:.3f} | "
                    f"{r['wall_time']:.1f} | {100 * r['overhead']:.0f}% |")
    table = "\n".join(rows) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
