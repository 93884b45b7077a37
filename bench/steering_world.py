"""Inference-time steering on the shipped world model: FK against best-of-N at equal denoiser NFE, with intervals.

    .venv/bin/python bench/steering_world.py --n 8 --seeds 4 --out outputs/bench_steering
    .venv/bin/python bench/steering_world.py --n 8 --seeds 1 --gradient     # also guidance and ReNO

A draw is one prompt under one seed. The prompts are fixed (all six templates, seen compositions, `--n` each);
every seed is one round of `bench/paired.py`, which runs the arms interleaved:
  samples     `--ks`'s largest k independent base samples per prompt (ODE, CFG 3). best-of-k for every k is the one
              of the first k with the highest verifier reward: nested subsets of i.i.d. samples are as good a
              best-of-k draw as a fresh one, and cost the largest k once.
  FK k=…      Feynman-Kac steering (max potential, lambda 10, resampling every 4 steps from step 5), the verifier
              as the steering reward; k particles spend the NFE of best-of-k.
  guidance / ReNO (with `--gradient`) steer with `world-soft`, a differentiable proxy of the verifier.
The exact verifier judges every output: whole-prompt accuracy (main judge) and its partial credit. For each k the
FK − best-of-k difference is averaged over draws with a 95 % bootstrap interval that resamples prompts (a prompt's
seeds are not independent draws); the verdict says whether the interval excludes 0. Also reported: NFE per prompt
(CFG counts 2), the share of time outside the denoiser, and each arm's time per round against the samples arm.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import paired  # noqa: E402

from visalign.models import load_model  # noqa: E402
from visalign.steering import steer  # noqa: E402
from visalign.world.suite import suite_prompts  # noqa: E402
from visalign.world.verify import verify  # noqa: E402


def judged(images, specs) -> tuple[list[float], list[float]]:
    result = verify(images, specs)
    return [float(x) for x in result.passed], [float(x) for x in result.score]


def best_of(accuracy: list[float], score: list[float], prompts: int, n: int, k: int) -> tuple[list, list]:
    """best-of-k from the first k of each prompt's n samples (prompt-major): the highest verifier score, the first
    on ties (as `_pick`'s argmax does)."""
    acc, sc = [], []
    for p in range(prompts):
        cands = range(p * n, p * n + k)
        best = max(cands, key=lambda i: (score[i], -i))
        acc.append(accuracy[best])
        sc.append(score[best])
    return acc, sc


def verdict(mean: float, lo: float, hi: float) -> str:
    if lo > 0:
        return "FK higher"
    if hi < 0:
        return "best-of-N higher"
    return "no difference resolved"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=8, help="prompts per template")
    parser.add_argument("--seeds", type=int, default=4, help="draws per prompt (rounds)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--lam", type=float, default=10.0)
    parser.add_argument("--every", type=int, default=4, help="FK resampling interval (steps)")
    parser.add_argument("--gradient", action="store_true", help="also guidance and ReNO through world-soft")
    parser.add_argument("--guidance-scale", dest="guidance_scale", type=float, default=1.0)
    parser.add_argument("--reno-lr", dest="reno_lr", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="outputs/bench_steering")
    args = parser.parse_args()
    if min(args.ks) < 1 or args.n < 1 or args.seeds < 1:
        parser.error("--ks, --n and --seeds must be >= 1")
    torch.set_num_threads(args.threads)
    adapter = load_model("world")
    specs = suite_prompts("seen", args.n, 4321)
    prompts, n_max = [s.prompt for s in specs], max(args.ks)
    draws: dict[str, list[dict]] = {}  # arm -> one record per round (seed)

    def arm(name: str, method: str, options: dict, reward: str = "world-verifier", repeat: int = 1):
        def run():
            seed = len(draws.setdefault(name, []))
            rep_specs = [s for s in specs for _ in range(repeat)]
            out = steer(adapter, [s.prompt for s in rep_specs], {reward: 1.0}, method, steps=args.steps,
                        guidance=args.guidance, seed=seed, metadata=[{"spec": s} for s in rep_specs], **options)
            accuracy, score = judged(out.images, rep_specs)
            draws[name].append({"accuracy": accuracy, "score": score, "nfe_per_prompt":
                                out.report["nfe_per_prompt"] * repeat, "overhead": out.report["overhead_fraction"]})
            # progress, and every finished draw on disk: a run cut short keeps its rounds
            print(f"seed {seed}: {name} done ({sum(accuracy) / len(accuracy):.3f} of samples pass)", flush=True)
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "draws.partial.json").write_text(json.dumps({"prompts": prompts, "draws": draws}))
        return run

    arms = {"samples": arm("samples", "best_of_n", {"n": 1}, repeat=n_max)}
    for k in args.ks:
        arms[f"FK k={k}"] = arm(f"FK k={k}", "fk", {"k": k, "lam": args.lam, "every": args.every,
                                                   "potential": "max", "start": args.steps // 4})
    if args.gradient:
        arms["guidance (world-soft)"] = arm("guidance (world-soft)", "guidance",
                                            {"scale": args.guidance_scale, "stop": args.steps * 3 // 4}, "world-soft")
        arms["ReNO, 3 iterations (world-soft)"] = arm("ReNO, 3 iterations (world-soft)", "reno",
                                                      {"iterations": 3, "lr": args.reno_lr}, "world-soft")
    report = paired.compare(arms, rounds=args.seeds, warmup=0)

    # per arm and k: per-prompt lists of the draws' accuracy / score (groups for the bootstrap)
    P = len(specs)

    def per_prompt(values_by_round: list[list[float]]) -> list[list[float]]:
        return [[values[p] for values in values_by_round] for p in range(P)]

    rows, summary = [], {}
    samples = draws["samples"]
    per_sample_nfe = samples[0]["nfe_per_prompt"] / n_max
    methods = {"base (1 sample)": [best_of(d["accuracy"], d["score"], P, n_max, 1) for d in samples]}
    for k in args.ks:
        methods[f"best-of-{k}"] = [best_of(d["accuracy"], d["score"], P, n_max, k) for d in samples]
        methods[f"FK k={k}"] = [(d["accuracy"], d["score"]) for d in draws[f"FK k={k}"]]
    for name in arms:
        if name != "samples" and not name.startswith("FK"):
            methods[name] = [(d["accuracy"], d["score"]) for d in draws[name]]
    for name, per_round in methods.items():
        acc = paired.mean_interval(per_prompt([a for a, _ in per_round]))
        sc = paired.mean_interval(per_prompt([s for _, s in per_round]))
        if name.startswith("base") or name.startswith("best-of"):
            k = 1 if name.startswith("base") else int(name.split("-")[-1])
            nfe, overhead, time_ratio = per_sample_nfe * k, None, k / n_max
        else:
            nfe = draws[name][0]["nfe_per_prompt"]
            overhead = sum(d["overhead"] for d in draws[name]) / len(draws[name])
            time_ratio = report.ratio(name)
        summary[name] = {"accuracy": acc, "score": sc, "nfe_per_prompt": nfe,
                         "overhead": overhead, "time_vs_samples": time_ratio}
        rows.append(f"| {name} | {nfe:.0f} | {fmt(acc)} | {fmt(sc)} | "
                    f"{'-' if overhead is None else f'{100 * overhead:.0f}%'} | {time_ratio * n_max:.2f} |")
    diffs, diff_rows = {}, []
    for k in args.ks:
        fk, bon = methods[f"FK k={k}"], methods[f"best-of-{k}"]
        entry = {}
        for i, metric in enumerate(("accuracy", "score")):
            d = [[f - b for f, b in zip(fr[i], br[i], strict=True)] for fr, br in zip(fk, bon, strict=True)]
            entry[metric] = paired.mean_interval(per_prompt(d))
        diffs[k] = entry
        diff_rows.append(f"| {k} | {fmt(entry['accuracy'], signed=True)} | {verdict(*entry['accuracy'])} | "
                         f"{fmt(entry['score'], signed=True)} | {verdict(*entry['score'])} |")
    table = "\n".join([
        f"{P} prompts × {args.seeds} seeds = {P * args.seeds} draws; means with 95 % bootstrap intervals over prompts",
        "",
        "| method | NFE / prompt | whole-prompt accuracy | verifier partial credit | outside denoiser | "
        "time (one base sample = 1) |",
        "|---|---|---|---|---|---|", *rows, "",
        "| k | FK − best-of-k, accuracy | verdict | FK − best-of-k, partial credit | verdict |",
        "|---|---|---|---|---|", *diff_rows, "", report.table()])
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table + "\n")
    report.write(out / "results.json", summary=summary, differences={str(k): v for k, v in diffs.items()},
                 draws=draws, prompts=prompts, settings=vars(args))


def fmt(t, signed: bool = False) -> str:
    mean, lo, hi = t
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(mean)} [{f.format(lo)}, {f.format(hi)}]"


if __name__ == "__main__":
    main()
