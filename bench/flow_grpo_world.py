"""Is the gain real? Align the shipped world base model on the exact verifier and measure it, per trainer.

    .venv/bin/python bench/flow_grpo_world.py --minutes 20 --out outputs/bench_flow_grpo
    .venv/bin/python bench/flow_grpo_world.py --minutes 8 --arms verifier+clean nft rwr dpo --out outputs/bench_trainers
    .venv/bin/python bench/flow_grpo_world.py --merge A/results.json "seed 1=B/results.json" --out outputs/merged

Arms (each trained from the shipped base model for the same compute budget, same prompts per step and group
size, so equal rollouts per step):
  verifier           Flow-GRPO, reward = world-verifier partial credit (`--config`, default flow_grpo_world.yaml)
  verifier+clean     Flow-GRPO, reward = world-verifier + 0.5 × world-cleanliness (holds background drift down)
  nft / rwr / dpo    DiffusionNFT, Flow-RWR, online Flow-DPO with their world configs (configs/*_world.yaml)
  awm / dgpo / draft Advantage Weighted Matching, DGPO, direct reward backprop (DRaFT-1 on world-soft)

Every `--eval-every` steps (and at step 0) the current weights are evaluated with fresh seeds (the same ones at
every point, so the curve's differences are paired) on a fixed set of
RL prompts (seen split) and on held-out compositions: whole-prompt accuracy (main and strict judges) and
cleanliness (1 − background drift). Writes curve.png (accuracy vs rollouts and training time), results.md and
results.json. Numbers are ratios/accuracies measured in this one run, not absolute seconds claims.

The budget is compute, not wall time, and the arms share the machine alike (bench/paired.py's
`interleave_budget`): all arms are built in one process and take their steps interleaved, one step of each per
round (order alternating), each until its own process CPU time reaches `--minutes` of 2 cores (as
bench/recipes_compared.py budgets), so a busy machine shortens no arm's budget; evaluation is not counted. A
curve's "minutes" are that CPU time over the 2 threads ("wall_minutes": the same steps' wall time). With two or
more arms the bench prints the paired table of their seconds per step (process CPU, median and spread of the
per-round ratios to the first arm) and writes it, with the wall-clock one and every step's times, to timing.json.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import paired
import torch

from visalign.trainers import load_train_config, trainer_class
from visalign.world.grammar import TEMPLATES
from visalign.world.suite import generate_world, score_world, suite_prompts

# arm -> (config, overrides); None = the --config file (Flow-GRPO).
ARMS = {
    "verifier": (None, ["rewards={world-verifier: 1.0}"]),
    "verifier+clean": (None, ["rewards={world-verifier: 1.0, world-cleanliness: 0.5}"]),
    "nft": ("configs/nft_world.yaml", []),
    "rwr": ("configs/rwr_world.yaml", []),
    "dpo": ("configs/dpo_world.yaml", []),
    "awm": ("configs/awm_world.yaml", []),
    "dgpo": ("configs/dgpo_world.yaml", []),
    "draft": ("configs/draft_world.yaml", []),
}


def evaluate(trainer, n: int, seed: int) -> dict:
    """Accuracy on the RL prompt set's templates (fresh seeds) for seen and held-out compositions."""
    adapter = trainer.adapter
    templates = getattr(trainer.source, "templates", None) or TEMPLATES
    out = {}
    if trainer.ema is not None:
        trainer.ema.swap()
    try:
        for split in ("seen", "heldout"):
            specs = suite_prompts(split, n, 1234, templates)
            images = generate_world(adapter, specs, steps=20, guidance=trainer.cfg.sampling.guidance, seed=seed,
                                    batch_size=64, progress=False)
            r = score_world(images, specs)
            out[split] = {"whole_prompt": r["overall"], "strict": r["overall_strict"],
                          "relation": r["hard_tier"].get("relation", float("nan")),
                          "cleanliness": r["cleanliness"], "partial_credit": r["partial_credit"]}
    finally:
        if trainer.ema is not None:
            trainer.ema.swap()
    return out


def run_arms(arms: dict[str, tuple[str | None, list[str]]], args, evaluate=evaluate,
             threads: int = 2) -> tuple[dict[str, list[dict]], paired.Budgeted]:
    """Train the arms interleaved (bench/paired.py's `interleave_budget`): one step of each arm per round, the order
    alternating, each arm until its own process CPU time reaches args.minutes of `threads` cores; evaluation
    (`evaluate(trainer, n, seed)`, at step 0, every args.eval_every steps and at the end) is outside the budget.
    Returns each arm's curve ("minutes": its CPU time over `threads`, "wall_minutes": its steps' wall time) and
    the per-step times."""
    trainers = {}
    for name, (config, extra) in arms.items():
        overrides = [f"run.out_dir={args.out}/{name}", "run.resume_from=null", "run.eval_every=0",
                     "run.log_with=none", "run.progress=false", "train.max_steps=100000",
                     "run.checkpoint_every=100000", *extra, *args.overrides]
        cfg = load_train_config(config or args.config, overrides)
        trainers[name] = trainer_class(cfg.trainer)(cfg)
    curves = {}
    for name, trainer in trainers.items():
        curves[name] = [{"step": 0, "rollouts": 0, "minutes": 0.0, "wall_minutes": 0.0,
                         **evaluate(trainer, args.n, seed=777)}]
        print(f"[{name}] step 0: {json.dumps(curves[name][-1])}", flush=True)
    budget, wall = args.minutes * 60 * threads, dict.fromkeys(trainers, 0.0)

    def stepper(name):
        trainer = trainers[name]

        def step(i):
            t = time.perf_counter()
            metrics = trainer.step(i)
            trainer.state.step = i + 1
            wall[name] += time.perf_counter() - t
            return metrics
        return step

    def after(name, step, spent, metrics):
        trainer = trainers[name]
        cfg = trainer.cfg
        first = next(iter(cfg.rewards))
        passed = metrics.get(f"rewards/{first}/passed/mean", float("nan"))
        print(f"[{name}] step {step}: reward {metrics[f'rewards/{first}/mean']:.3f}, rollouts passed {passed:.3f} "
              f"({spent / 60 / threads:.1f} of {args.minutes:g} min of {threads} cores)", flush=True)
        if step % args.eval_every == 0 or spent >= budget or step == cfg.train.max_steps:
            curves[name].append({"step": step, "rollouts": step * cfg.train.prompts_per_step * cfg.train.group_size,
                                 "minutes": spent / 60 / threads, "wall_minutes": wall[name] / 60,
                                 **evaluate(trainer, args.n, seed=777)})
            print(f"[{name}] eval: {json.dumps(curves[name][-1])}", flush=True)
        return step == cfg.train.max_steps

    budgeted = paired.interleave_budget({name: stepper(name) for name in trainers}, budget, after=after)
    return curves, budgeted


def timing(budgeted: paired.Budgeted, out: Path, threads: int) -> str:
    """The paired table of the arms' seconds per training step (process CPU; first arm the baseline), written with
    the wall-clock report and every step's times to timing.json; with one arm, its median and the context."""
    extra = {"steps": budgeted.to_dict(), "threads": threads}
    if len(budgeted.seconds) >= 2 and budgeted.rounds() >= 1:
        report = budgeted.report()
        report.write(out / "timing.json", wall=budgeted.report(wall=True).to_dict(), **extra)
        return ("Seconds per training step, process CPU time (the budget's clock), the arms interleaved step by "
                "step; ratios to the first arm within each round:\n" + report.table())
    context = paired.context()
    (out / "timing.json").write_text(json.dumps({"context": context, **extra}, indent=2) + "\n")
    cells = [f"{name} {statistics.median(v):.2f} s CPU per step (median of {len(v)})" if v else f"{name} no step"
             for name, v in budgeted.seconds.items()]
    return "; ".join(cells) + f"; no other arm to pair with; {paired.context_line(context)}"


def plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for arm, curve in results.items():
        x_r = [c["rollouts"] for c in curve]
        x_t = [c["minutes"] for c in curve]
        axes[0].plot(x_r, [c["seen"]["whole_prompt"] for c in curve], "o-", label=f"{arm}: RL prompts")
        axes[0].plot(x_r, [c["heldout"]["whole_prompt"] for c in curve], "s--", label=f"{arm}: held-out")
        axes[1].plot(x_t, [c["seen"]["whole_prompt"] for c in curve], "o-", label=f"{arm}: main judge")
        axes[1].plot(x_t, [c["seen"]["strict"] for c in curve], "^:", label=f"{arm}: strict judge")
        axes[2].plot(x_t, [c["seen"]["cleanliness"] for c in curve], "o-", label=arm)
    axes[0].set(xlabel="rollouts (images sampled)", ylabel="whole-prompt accuracy", title="accuracy vs rollouts")
    axes[1].set(xlabel="training time (min of 2 cores, CPU)", ylabel="whole-prompt accuracy (RL prompts)",
                title="accuracy vs time")
    axes[2].set(xlabel="training time (min of 2 cores, CPU)", ylabel="cleanliness (1 = no drift)",
                title="background drift")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _cell(x: float) -> str:
    return "—" if math.isnan(x) else f"{x:.3f}"  # NaN: the RL prompt set has no relation prompts


def table(results: dict[str, list[dict]]) -> str:
    rows = [("| arm | minutes | rollouts | RL prompts (seen) | Δ | held-out | Δ | strict (seen) | relation (seen) "
             "| cleanliness |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for arm, curve in results.items():
        base = curve[0]
        for c in curve:  # every evaluation point: the table is the curve
            rows.append(
                f"| {arm} | {c['minutes']:.1f} | {c['rollouts']} | {c['seen']['whole_prompt']:.3f} | "
                f"{c['seen']['whole_prompt'] - base['seen']['whole_prompt']:+.3f} | "
                f"{c['heldout']['whole_prompt']:.3f} | "
                f"{c['heldout']['whole_prompt'] - base['heldout']['whole_prompt']:+.3f} | {c['seen']['strict']:.3f} | "
                f"{_cell(c['seen']['relation'])} | {c['seen']['cleanliness']:.3f} |")
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/flow_grpo_world.yaml")
    parser.add_argument("--minutes", type=float, default=20.0,
                        help="training budget per arm: minutes of 2 cores of process CPU time")
    parser.add_argument("--eval-every", type=int, default=8, help="steps between evaluations")
    parser.add_argument("--n", type=int, default=32, help="evaluation prompts per template and split")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--out", default="outputs/bench_flow_grpo")
    parser.add_argument("--merge", nargs="+", metavar="RESULTS_JSON",
                        help="train nothing: put the arms of earlier runs' results.json files ([LABEL=]PATH; "
                             "a label is appended to that file's arm names) in one table and plot; an arm name seen "
                             "twice is an error")
    parser.add_argument("overrides", nargs="*", help="config overrides for every arm")
    args = parser.parse_args()
    if args.merge and args.overrides:
        parser.error(f"--merge trains nothing, so the overrides {args.overrides} would be ignored")
    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        results = {}
        for entry in args.merge:
            label, _, path = entry.rpartition("=")
            for arm, curve in json.loads(Path(path).read_text()).items():
                arm = f"{arm} ({label})" if label else arm
                if arm in results:
                    raise SystemExit(f"arm {arm!r} is in more than one of --merge {' '.join(args.merge)}")
                results[arm] = curve
    else:
        results, budgeted = run_arms({arm: ARMS[arm] for arm in args.arms}, args)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(table(results))
    plot(results, out / "curve.png")
    print(table(results))
    if args.merge:
        print(f"wrote {out}/curve.png, results.md, results.json")
    else:
        print(timing(budgeted, out, 2))
        print(f"wrote {out}/curve.png, results.md, results.json, timing.json")


if __name__ == "__main__":
    main()
