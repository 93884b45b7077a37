"""Every recipe on the world for the same compute, 3 seeds, paired intervals: which objective aligns fastest?

    .venv/bin/python bench/recipes_compared.py --out outputs/recipes_compared            # run (resumable)
    .venv/bin/python bench/recipes_compared.py --out outputs/recipes_compared --report   # tables + curves only

Each job is one (recipe, seed): it trains from the shipped world base model and, at every mark (default 5, 10 and
15 minutes of 2 cores), evaluates the weights with fresh noise seeds on a fixed prompt set of seen (RL) and
held-out compositions: whole-prompt accuracy, the strict judge and cleanliness (1 − background drift), per prompt.
The base model is evaluated once per seed on the same prompts and noise, so every change is paired.

The budget is compute, not wall time: each job runs on one thread and stops at `2 × minutes` of its own process
CPU time (two cores for `minutes`), so jobs can run two at a time (`--jobs 2`, one per core) and a busy machine
does not shorten a recipe's budget. Evaluation time is not counted. A finished job writes `jobs/RECIPE_sSEED.json`
and is skipped on the next call; a job checkpoints each minute, so an interrupted run resumes where it stopped.

Intervals: the mean over seeds of the paired Δ (aligned − base) with a 95% bootstrap interval that resamples
prompts within each seed (the evaluation's noise); the per-seed Δs are listed beside it, so the spread between
training seeds is visible too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

# recipe -> (config, overrides); every config trains on verifier + 0.5 × cleanliness except draft, which needs a
# differentiable reward (world-soft) since the verifier's verdicts have no gradient.
RECIPES = {
    "flow_grpo": ("configs/flow_grpo_world.yaml", ["rewards={world-verifier: 1.0, world-cleanliness: 0.5}"]),
    "diffusion_nft": ("configs/nft_world.yaml", []),
    "flow_rwr": ("configs/rwr_world.yaml", []),
    "flow_dpo": ("configs/dpo_world.yaml", []),
    "awm": ("configs/awm_world.yaml", []),
    "dgpo": ("configs/dgpo_world.yaml", []),
    "draft": ("configs/draft_world.yaml", []),
}
TEMPLATES = ("count", "position", "two_objects")
PROMPTS = "train.prompts=world:seen:" + ",".join(TEMPLATES)
METRICS = ("passed", "strict", "cleanliness")


def evaluate(adapter, n: int, seed: int) -> dict:
    """Per-prompt verdicts on seen and held-out compositions; prompts and noise depend on the seed only."""
    from visalign.world.suite import generate_world, score_world, suite_prompts

    out = {}
    for split in ("seen", "heldout"):
        specs = suite_prompts(split, n, 1000 + seed, TEMPLATES)
        images = generate_world(adapter, specs, steps=20, guidance=3.0, seed=10_000 * (seed + 1), batch_size=64,
                                progress=False)
        out[split] = score_world(images, specs)["per_sample"]
    return out


def run_job(recipe: str, seed: int, args) -> None:
    """Train one (recipe, seed) to each mark of CPU time and evaluate there; write jobs/RECIPE_sSEED.json."""
    from visalign.trainers import load_train_config, trainer_class

    torch.set_num_threads(1)
    out = Path(args.out)
    config, extra = RECIPES[recipe]
    cfg = load_train_config(config, [f"run.out_dir={out / 'runs' / f'{recipe}_s{seed}'}", "run.resume_from=null",
                                     "run.eval_every=0", "run.log_with=none", "run.progress=false",
                                     "train.max_steps=100000", "run.checkpoint_every=100000", f"run.seed={seed}",
                                     PROMPTS, *extra, *args.overrides])
    trainer = trainer_class(cfg.trainer)(cfg)
    first = next(iter(cfg.rewards))
    path = out / "jobs" / f"{recipe}_s{seed}.json"
    partial = path.with_suffix(".partial.json")
    marks = sorted(args.marks)
    points, steps = [], []
    cpu, wall, step = 0.0, 0.0, 0
    if partial.exists():  # a stopped job goes on from its last checkpoint (resume is bit-identical)
        saved = json.loads(partial.read_text())
        trainer.load_checkpoint(Path(saved["checkpoint"]))
        points, steps, cpu, wall, step = (saved[k] for k in ("points", "steps", "cpu", "wall", "step"))
        marks = [m for m in marks if m not in {p["minutes"] for p in points}]
        print(f"[{recipe} s{seed}] resumed at step {step} ({cpu / 120:.2f} min of 2 cores)", flush=True)
    saved_at = cpu
    while marks:
        c, w = time.process_time(), time.perf_counter()
        metrics = trainer.step(step)
        trainer.state.step = step = step + 1
        cpu += time.process_time() - c
        wall += time.perf_counter() - w
        steps.append({"step": step, "core_minutes": cpu / 120, "reward": metrics[f"rewards/{first}/mean"]})
        print(f"[{recipe} s{seed}] step {step}: {first} {steps[-1]['reward']:.3f} ({cpu / 120:.2f} of "
              f"{marks[-1]} min of 2 cores)", flush=True)
        evaluated = cpu / 120 >= marks[0]
        if evaluated:
            if trainer.ema is not None:
                trainer.ema.swap()
            with torch.no_grad():
                points.append({"minutes": marks.pop(0), "step": step, "core_minutes": cpu / 120,
                               "wall_minutes": wall / 60, **evaluate(trainer.adapter, args.n, seed)})
            if trainer.ema is not None:
                trainer.ema.swap()
        if marks and (evaluated or cpu - saved_at >= 120):
            # a checkpoint after each mark and each minute of 2 cores (outside the budget): a stopped job loses
            # at most a minute
            directory = trainer.save_checkpoint(step)
            _write_json(partial, {"checkpoint": str(directory), "points": points, "steps": steps, "cpu": cpu,
                                  "wall": wall, "step": step})
            saved_at = cpu
    _write_json(path, {"recipe": recipe, "seed": seed, "points": points, "steps": steps})
    partial.unlink(missing_ok=True)


def _write_json(path: Path, data: dict) -> None:
    path.with_suffix(".tmp").write_text(json.dumps(data))
    path.with_suffix(".tmp").replace(path)


def run_all(args) -> None:
    """Run the missing jobs, `args.jobs` at a time, each in its own process (one thread each)."""
    (Path(args.out) / "jobs").mkdir(parents=True, exist_ok=True)
    # seed-major, so that every recipe has seed 0 before any has seed 2
    todo = [(r, s) for s in args.seeds for r in args.recipes
            if not (Path(args.out) / "jobs" / f"{r}_s{s}.json").exists()]
    for s in args.seeds:  # base first, so two jobs of a seed do not both evaluate it
        if not (Path(args.out) / "jobs" / f"base_s{s}.json").exists():
            run_job_cmd = [sys.executable, __file__, "--out", args.out, "--n", str(args.n), "--base-only", str(s)]
            subprocess.run(run_job_cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    running: list[tuple[subprocess.Popen, str]] = []
    log_dir = Path(args.out) / "logs"
    log_dir.mkdir(exist_ok=True)
    while todo or running:
        while todo and len(running) < args.jobs:
            recipe, seed = todo.pop(0)
            cmd = [sys.executable, __file__, "--out", args.out, "--n", str(args.n), "--job", recipe, str(seed),
                   "--marks", *map(str, args.marks), "--", *args.overrides]
            log = open(log_dir / f"{recipe}_s{seed}.log", "w")  # noqa: SIM115 - closed when the job ends
            running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                             env={**os.environ, "OMP_NUM_THREADS": "1"}), f"{recipe}_s{seed}"))
            print(f"started {recipe} seed {seed} ({len(todo)} waiting)", flush=True)
        time.sleep(5)
        for proc, name in list(running):
            if proc.poll() is not None:
                running.remove((proc, name))
                print(f"{name}: {'done' if proc.returncode == 0 else f'FAILED rc={proc.returncode}'}", flush=True)


def _stratified_delta(pairs: list[tuple[torch.Tensor, torch.Tensor]], n_boot: int = 2000) -> dict:
    """Mean over seeds of mean(b − a), with a bootstrap interval resampling items within each seed."""
    g = torch.Generator().manual_seed(0)
    deltas = [b.double() - a.double() for a, b in pairs]
    point = sum(float(d.mean()) for d in deltas) / len(deltas)
    boots = torch.zeros(n_boot, dtype=torch.float64)
    for d in deltas:
        idx = torch.randint(len(d), (n_boot, len(d)), generator=g)
        boots += d[idx].mean(1) / len(deltas)
    low, high = torch.quantile(boots, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"delta": point, "low": low, "high": high, "per_seed": [float(d.mean()) for d in deltas]}


def summarise(out: Path) -> dict:
    """recipe -> minutes -> split -> metric -> delta with interval; plus absolute means per seed."""
    jobs = [json.loads(p.read_text()) for p in sorted((out / "jobs").glob("*_s*.json"))
            if not p.name.startswith("base") and not p.name.endswith(".partial.json")]
    base = {int(p.stem.split("_s")[1]): json.loads(p.read_text()) for p in (out / "jobs").glob("base_s*.json")}
    summary: dict = {}
    for recipe in RECIPES:
        runs = sorted((j for j in jobs if j["recipe"] == recipe), key=lambda j: j["seed"])
        if not runs:
            continue
        marks = sorted({p["minutes"] for j in runs for p in j["points"]})
        summary[recipe] = {"seeds": [j["seed"] for j in runs], "marks": {}}
        for m in marks:
            pts = [(j["seed"], next(p for p in j["points"] if p["minutes"] == m)) for j in runs
                   if any(p["minutes"] == m for p in j["points"])]
            row = {"steps": [p["step"] for _, p in pts], "wall_minutes": [p["wall_minutes"] for _, p in pts]}
            for split in ("seen", "heldout"):
                row[split] = {}
                for metric in METRICS:
                    pairs = [(torch.tensor(base[s][split][metric], dtype=torch.float64),
                              torch.tensor(p[split][metric], dtype=torch.float64)) for s, p in pts]
                    row[split][metric] = {"base": sum(float(a.mean()) for a, _ in pairs) / len(pairs),
                                          "after": sum(float(b.mean()) for _, b in pairs) / len(pairs),
                                          **_stratified_delta(pairs)}
            summary[recipe]["marks"][m] = row
    return summary


def _ci(d: dict) -> str:
    return f"{d['delta']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"


def report(out: Path) -> str:
    summary = summarise(out)
    rows = ["| recipe | minutes | steps (per seed) | seen | Δ seen (95% CI) | held-out | Δ held-out (95% CI) "
            "| Δ strict, held-out | cleanliness | Δ cleanliness | Δ held-out per seed |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for recipe, r in summary.items():
        for m, row in r["marks"].items():
            s, h = row["seen"], row["heldout"]
            rows.append(f"| {recipe} | {m:g} | {'/'.join(map(str, row['steps']))} | {s['passed']['after']:.3f} | "
                        f"{_ci(s['passed'])} | {h['passed']['after']:.3f} | {_ci(h['passed'])} | "
                        f"{_ci(h['strict'])} | {s['cleanliness']['after']:.3f} | {_ci(s['cleanliness'])} | "
                        + " / ".join(f"{x:+.3f}" for x in h["passed"]["per_seed"]) + " |")
    first = next(iter(summary.values()))["marks"]
    any_mark = next(iter(first.values()))
    head = (f"Base (mean over seeds): seen {any_mark['seen']['passed']['base']:.3f}, held-out "
            f"{any_mark['heldout']['passed']['base']:.3f}, cleanliness {any_mark['seen']['cleanliness']['base']:.3f}."
            "\n\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    table = head + "\n".join(rows) + "\n"
    (out / "results.md").write_text(table)
    plot(out, summary)
    return table


def plot(out: Path, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    colours = dict(zip(RECIPES, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for recipe, r in summary.items():
        marks = [0, *r["marks"]]
        for ax, (split, metric) in zip(axes[:3], [("seen", "passed"), ("heldout", "passed"),
                                                  ("seen", "cleanliness")], strict=True):
            ys = [0.0, *(r["marks"][m][split][metric]["delta"] for m in r["marks"])]
            lo = [0.0, *(r["marks"][m][split][metric]["low"] for m in r["marks"])]
            hi = [0.0, *(r["marks"][m][split][metric]["high"] for m in r["marks"])]
            ax.plot(marks, ys, "o-", color=colours[recipe], label=recipe)
            ax.fill_between(marks, lo, hi, color=colours[recipe], alpha=0.12)
    for p in sorted((out / "jobs").glob("*_s*.json")):
        if p.name.startswith("base"):
            continue
        job = json.loads(p.read_text())
        xs = [s["core_minutes"] for s in job["steps"]]
        ys = [s["reward"] for s in job["steps"]]
        axes[3].plot(xs, ys, "-", color=colours[job["recipe"]], alpha=0.6,
                     label=job["recipe"] if job["seed"] == min(summary[job["recipe"]]["seeds"]) else None)
    for ax, title in zip(axes, ["Δ whole-prompt, seen (RL) prompts", "Δ whole-prompt, held-out compositions",
                                "Δ cleanliness (seen)", "training reward of the rollouts"], strict=True):
        ax.set(xlabel="minutes of 2 cores (training only)", title=title)
        ax.axhline(0, color="grey", lw=0.8) if ax is not axes[3] else None
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/recipes_compared")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--marks", nargs="+", type=float, default=[5.0, 10.0, 15.0],
                        help="minutes of 2 cores at which to evaluate; the last ends the job")
    parser.add_argument("--n", type=int, default=24, help="evaluation prompts per template and split")
    parser.add_argument("--jobs", type=int, default=2, help="jobs at a time (one thread each)")
    parser.add_argument("--report", action="store_true", help="train nothing: write results.md and curves.png")
    parser.add_argument("--job", nargs=2, metavar=("RECIPE", "SEED"), help=argparse.SUPPRESS)
    parser.add_argument("--base-only", type=int, metavar="SEED", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="config overrides for every recipe")
    args = parser.parse_args()
    if args.base_only is not None:
        from visalign.models import load_model

        torch.set_num_threads(1)
        path = Path(args.out) / "jobs" / f"base_s{args.base_only}.json"
        path.write_text(json.dumps(evaluate(load_model("world"), args.n, args.base_only)))
    elif args.job:
        run_job(args.job[0], int(args.job[1]), args)
    else:
        if not args.report:
            run_all(args)
        print(report(Path(args.out)))
        print(f"wrote {args.out}/results.md, curves.png, summary.json")


if __name__ == "__main__":
    main()
