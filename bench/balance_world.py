"""Multi-reward balancing in the shapes world: weighted sum vs MGDA vs MARBLE (amortised) vs PCGrad.

    .venv/bin/python bench/balance_world.py --minutes 4 --out outputs/bench_balance

Three partly conflicting rewards are trained together with DiffusionNFT (configs/nft_world.yaml): the world verifier
(compositional), a quality reward, `--quality`: world-cleanliness (artifacts / background drift),
world-shape-fidelity (deformed, merged or smeared objects), quality-nss (natural-scene statistics, no weights) or
artifact (the learned detector, trained at the start of the run on the default world artifact set, ~15 s, unless
`--artifact-weights` names one), and a style reward, `--style`: saturation (it pays for coloured pixels, which the
clean white background is not) or brightness (it pays for white, so for small, pale objects). Cleanliness is
measured held-out whichever quality reward is trained. Each arm trains from the shipped base model for the same
wall-time budget; every `--eval-every` steps all three rewards are measured on held-out compositions with fresh
seeds (the same at every point, so differences are paired). Per step the trainer logs the per-reward gradient
cosines; the table reports the fraction of steps in which the worst-aligned reward's gradient has a negative cosine
with the applied update, and the step time relative to single-reward NFT (verifier only): one baseline step follows
every arm step, outside the arm's budget, so both run under the same machine load; each whole refresh cycle after
the first (which holds the process warm-up) is one round of bench/paired.py, and the table gives the median of the
per-cycle ratios with their spread. Each arm's folder gets grids of its first and last
held-out samples (samples_start.png, samples_end.png), and results.json also records the median pixel level
("background"; 0.90 on renders), which tells a shifted background from speckle when cleanliness falls.

Arms (all per-reward gradients, so the weighted sum's cosines are measured too; its update equals GDPO's):
  sum      train.balance.method=sum (weights 1, 1, 1)
  mgda     train.balance.method=mgda, unit-normalised gradients, EMA 0.9, explicit K backwards every micro-batch
  marble   the same weights amortised (MARBLE): one backward with blended reward weights; every 3rd step the Gram
           matrix comes from the explicit per-reward gradients of all of that step's micro-batches (the whole step's,
           as in mgda), the EMA-smoothed weights carry over in between, and the safeguard replaces EMA weights that
           would conflict on a refresh's Gram matrix by its fresh min-norm weights
  upgrad   the mgda arm with UPGrad's weights (explicit: K backwards every micro-batch)
  marble-upgrad  the marble arm with UPGrad's weights instead of the min-norm point: each reward's gradient
           projected onto the dual cone and averaged, so a reward whose gradient conflicts with no other keeps about
           1/K of the update where MGDA can give it far less (configs/marble_world.yaml)
  marble-sub  amortised, refreshed every step from 2 of the step's 8 micro-batches, with the safeguard
  marble-ub  amortised with the Gram matrix of the per-reward gradients of the predicted velocity over all of the
           step's micro-batches (MGDA-UB, `train.balance.gram=output`, no extra backward through the network),
           applied to the next step, with the safeguard; its cosines are measured in that output space
  marble4  the earlier amortised arm: Gram from one micro-batch every 4 steps, no safeguard
  pcgrad   train.balance.method=pcgrad
  alone-verifier, alone-quality, alone-style  that reward trained alone (no balancing): how far each can rise in
           the budget on its own, and what it does to the other two
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import paired
import torch

from visalign import rewards as rewards_lib
from visalign.trainers import load_train_config, trainer_class
from visalign.world.grammar import TEMPLATES
from visalign.world.suite import generate_world, score_world, suite_prompts

STYLES = ("saturation", "brightness")  # the third reward (`--style`)
QUALITIES = ("world-cleanliness", "world-shape-fidelity", "quality-nss", "artifact")  # the second reward (`--quality`)


def rewards_override(style: str, weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
                     quality: str = "world-cleanliness") -> str:
    v, q, s = weights
    return f"rewards={{world-verifier: {v}, {quality}: {q}, {style}: {s}}}"


# Held-out columns the world's own verifier gives: partial credit (the trained verifier reward), whole-prompt
# accuracy and cleanliness.
WORLD_COLUMNS = ("partial_credit", "verifier", "cleanliness")


def reward_columns(args) -> list[str]:
    """The held-out columns a reward model scores: the trained quality reward when it is not cleanliness, and the
    style reward."""
    return ([] if args.quality == "world-cleanliness" else [args.quality]) + [args.style]


def metric_keys(args) -> list[str]:
    return [*WORLD_COLUMNS, *reward_columns(args)]


def artifact_weights(args) -> Path:
    """`--artifact-weights`, else a detector trained (seed 0) on the default world artifact set in the run's folder."""
    if args.artifact_weights:
        return Path(args.artifact_weights)
    path = Path(args.out) / "artifact.safetensors"
    if not path.is_file():
        from visalign.rewards.artifact import train_artifact
        from visalign.world.artifacts import write_artifact_set

        clean, artifact = write_artifact_set(Path(args.out) / "artifact_set")
        train_artifact(clean, artifact, path, progress=False)
    return path


def reward_options(args, used: tuple[str, ...]) -> dict:
    """The config's `reward_options` for the rewards in `used`: the artifact detector's weights."""
    use = args.quality == "artifact" and "artifact" in used
    return {"artifact": {"weights": str(artifact_weights(args))}} if use else {}


def score_mean(reward: str, images, options: dict) -> float:
    return rewards_lib.combined(rewards_lib.load(reward, **options.get(reward, {}))(images=images)).mean().item()


SMOOTHED = ["train.balance.normalize=true", "train.balance.ema=0.9"]  # every arm but sum and pcgrad
AMORTISED = [*SMOOTHED, "train.balance.amortized=true"]
MARBLE = [*AMORTISED, "train.balance.every=3", "train.balance.refresh_batches=8", "train.balance.safeguard=true"]
ARMS = {
    "sum": ["train.balance.method=sum"],
    "mgda": ["train.balance.method=mgda", *SMOOTHED],
    "marble": ["train.balance.method=mgda", *MARBLE],
    "upgrad": ["train.balance.method=upgrad", *SMOOTHED],
    "marble-upgrad": ["train.balance.method=upgrad", *MARBLE],
    "marble-sub": ["train.balance.method=mgda", *AMORTISED, "train.balance.every=1", "train.balance.refresh_batches=2",
                   "train.balance.safeguard=true"],
    "marble-ub": ["train.balance.method=mgda", *AMORTISED, "train.balance.gram=output", "train.balance.safeguard=true"],
    "marble4": ["train.balance.method=mgda", *AMORTISED, "train.balance.every=4"],
    "pcgrad": ["train.balance.method=pcgrad"],
}
SINGLE = ["rewards={world-verifier: 1.0}"]
ALONE = ("alone-verifier", "alone-quality", "alone-style")  # one of the three rewards trained alone: its ceiling


def arm_overrides(name: str, args) -> list[str]:
    """The config overrides of arm `name` (before the command line's): its rewards, their options, its balancing."""
    rewards = rewards_override(args.style, args.weights, args.quality)
    used: tuple[str, ...] = (args.quality,)
    extra = ARMS.get(name, [])
    if name in ALONE:  # one reward, no balancing
        reward = {"verifier": "world-verifier", "quality": args.quality, "style": args.style}[name.split("-", 1)[1]]
        rewards, used = f"rewards={{{reward}: 1.0}}", (reward,)
    return [rewards, f"reward_options={json.dumps(reward_options(args, used))}", *extra]


def evaluate(trainer, n: int, seed: int, args, save: Path | None = None) -> dict:
    """Held-out metrics; `save` writes a grid of the first 64 samples there."""
    specs = suite_prompts("heldout", n, 4321, getattr(trainer.source, "templates", None) or TEMPLATES)
    images = generate_world(trainer.adapter, specs, steps=20, guidance=trainer.cfg.sampling.guidance, seed=seed,
                            batch_size=64, progress=False)
    if save is not None:
        from torchvision.utils import save_image

        save_image(images[:64], save, nrow=16, padding=1)
    r = score_world(images, specs)
    # "background": the mean over images of the median pixel level (most pixels are background; renders give 0.90),
    # logged to results.json to tell a shifted background from speckle when cleanliness falls.
    out = {"verifier": r["overall"], "partial_credit": r["partial_credit"], "cleanliness": r["cleanliness"],
           "background": images.mean(dim=1).flatten(1).median(dim=1).values.mean().item()}
    for reward in reward_columns(args):
        out[reward] = score_mean(reward, images, reward_options(args, (reward,)))
    return out


def build(extra: list[str], out: str, args, single: bool = False):
    # The single-reward baseline has nothing to balance: it takes every override but the train.balance* ones.
    given = [o for o in args.overrides if not (single and o.startswith("train.balance"))]
    overrides = [f"run.out_dir={out}", "run.resume_from=null", "run.eval_every=0", "run.log_with=none",
                 "run.progress=false", "train.max_steps=100000", "run.checkpoint_every=100000", f"run.seed={args.seed}",
                 *extra, *given]
    cfg = load_train_config(args.config, overrides)
    return trainer_class(cfg.trainer)(cfg)


def run_arm(name: str, args, single) -> dict:
    """Train one arm for the wall-time budget. One step of `single` (the single-reward trainer) follows every step
    of the arm, outside the arm's budget, so both are timed under the same machine load."""
    # An arm training one reward alone has nothing to balance: it takes no train.balance* overrides.
    trainer = build(arm_overrides(name, args), f"{args.out}/{name}", args, single=name in ALONE)
    per_step = trainer.cfg.train.prompts_per_step * trainer.cfg.train.group_size
    folder = Path(args.out) / name
    folder.mkdir(parents=True, exist_ok=True)
    curve = [{"step": 0, "rollouts": 0, "minutes": 0.0,
              **evaluate(trainer, args.n, 777, args, folder / "samples_start.png")}]
    print(f"[{name}] step 0: {json.dumps(curve[-1])}", flush=True)
    steps, total, step = [], 0.0, 0
    while total < args.minutes * 60:
        t = time.perf_counter()
        m = trainer.step(step)
        trainer.state.step = step + 1
        total += time.perf_counter() - t
        step += 1
        steps.append({"time": m["time/step"], "training": m["time/training"],
                      "worst_cos": m.get("balance/worst_cos"), "safeguard": m.get("balance/safeguard"),
                      "weights": {k.split("/", 2)[2]: v for k, v in m.items() if k.startswith("balance/weight/")},
                      "cos": {k.split("/", 2)[2]: v for k, v in m.items() if k.startswith("balance/cos/")}})
        s = single.step(single.state.step)
        single.state.step += 1
        steps[-1].update(single_time=s["time/step"], single_training=s["time/training"])
        print(f"[{name}] step {step}: worst cos {m.get('balance/worst_cos', float('nan')):+.3f} "
              f"({total / 60:.1f} min)", flush=True)
        last = total >= args.minutes * 60  # the loop's own end condition: this step is the arm's last
        if step % args.eval_every == 0 or last:
            curve.append({"step": step, "rollouts": step * per_step, "minutes": total / 60,
                          **evaluate(trainer, args.n, 777, args, folder / "samples_end.png" if last else None)})
            print(f"[{name}] eval: {json.dumps(curve[-1])}", flush=True)
    # Refresh steps only carry cosines in the amortised arm.
    cos = [s["worst_cos"] for s in steps if s["worst_cos"] is not None]
    train = trainer.cfg.train
    cycle = train.balance.every if train.balance.amortized else 1
    timed = timed_steps(steps, cycle)
    if not timed:  # the run is kept; only its time ratio is unknown
        print(f"[{name}] {len(steps)} steps hold no whole refresh cycle after the first: no time ratio "
              "(train longer)", flush=True)
    def per_cycle(field):
        return [sum(s[field] for s in timed[i:i + cycle]) for i in range(0, len(timed), cycle)]

    timing = {}
    for key, label in (("time", "step"), ("training", "training")) if timed else ():
        a = paired.from_rounds({"single": per_cycle(f"single_{key}"), name: per_cycle(key)}).arms[1]
        timing[label] = {"median": a.median_ratio, "spread": list(a.spread), "cycles": len(a.ratios)}

    pairs = [s["cos"] for s in steps if s["cos"]]  # per-reward gradient cosines, on the steps that measure them
    out = {"curve": curve, "steps": steps, "negative_fraction": sum(c < 0 for c in cos) / max(1, len(cos)),
           "pair_cos": {k: sum(p[k] for p in pairs) / len(pairs) for k in pairs[0]} if pairs else {},
           "cos_measured": len(cos), "timed_steps": len(timed), "time_ratio": timing}
    return out


def timed_steps(steps: list, cycle: int) -> list:
    """The steps an arm's time ratio averages: whole refresh cycles after the first one. The first cycle holds the
    process's warm-up step (the single-reward timing skips its own), and a part cycle would over- or under-count
    the expensive refresh steps of an amortised arm."""
    whole = max(0, (len(steps) - cycle) // cycle * cycle)
    return steps[cycle:cycle + whole]


def single_reward_trainer(args):
    return build(SINGLE, f"{args.out}/single", args, single=True)


def warm_up(trainer) -> None:
    """One untimed step: the process's first allocations and thread pools."""
    trainer.step(trainer.state.step)
    trainer.state.step += 1


def table(results: dict, keys: list[str]) -> str:
    # The trained verifier reward is partial credit (the fraction of concepts satisfied); whole-prompt accuracy is
    # the all-or-nothing verdict. Both are shown, held-out.
    names = {"partial_credit": "verifier partial credit", "verifier": "whole-prompt"}
    head = " | ".join(f"{names.get(k, k)} | Δ" for k in keys)
    rows = [f"| arm | minutes | {head} | worst cos < 0 | step time × single (median, spread over cycles) | "
            "training time × single |",
            "|---|---|" + "---|---|" * len(keys) + "---|---|---|"]
    for arm, r in results.items():
        a, b = r["curve"][0], r["curve"][-1]
        cells = [f"{b[k]:.3f} | {b[k] - a[k]:+.3f}" for k in keys]
        negative = f"{r['negative_fraction']:.2f} ({r['cos_measured']} steps)" if r["cos_measured"] else "—"
        ratio = [f"{t['median']:.2f} ({t['spread'][0]:.2f}–{t['spread'][1]:.2f})" if t else "—"
                 for t in (r["time_ratio"].get("step"), r["time_ratio"].get("training"))]
        rows.append(f"| {arm} | {b['minutes']:.1f} | {' | '.join(cells)} | {negative} | {ratio[0]} | {ratio[1]} |")
    pairs = sorted({k for r in results.values() for k in r.get("pair_cos", {})})
    if pairs:  # how much the rewards conflict: the mean cosine of each pair's gradients over the measured steps
        rows += ["", "| arm | " + " | ".join(f"cos {k}" for k in pairs) + " |", "|---|" + "---|" * len(pairs)]
        rows += [f"| {arm} | " + " | ".join(f"{r['pair_cos'][k]:+.2f}" if k in r.get("pair_cos", {}) else "—"
                                          for k in pairs) + " |" for arm, r in results.items()]
    return "\n".join(rows) + "\n"


def plot(results: dict, path: Path, keys: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if k != "verifier"]  # whole-prompt accuracy is in the table
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4))
    for ax, key in zip(axes, keys, strict=True):
        for arm, r in results.items():
            ax.plot([c["minutes"] for c in r["curve"]], [c[key] for c in r["curve"]], "o-", label=arm)
        ax.set(xlabel="training wall time (min)", ylabel=key, title=f"held-out {key}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/nft_world.yaml")
    parser.add_argument("--minutes", type=float, default=4.0, help="training wall-time budget per arm")
    parser.add_argument("--eval-every", type=int, default=6)
    parser.add_argument("--n", type=int, default=32, help="held-out prompts per template")
    parser.add_argument("--arms", nargs="+", default=["sum", "mgda", "marble", "marble-upgrad", "pcgrad"],
                        choices=[*ARMS, *ALONE])
    parser.add_argument("--style", default="saturation", choices=STYLES, help="the third, style reward")
    parser.add_argument("--quality", default="world-cleanliness", choices=QUALITIES,
                        help="the second, quality reward")
    parser.add_argument("--artifact-weights", help="with --quality artifact: a detector from `rewards train-artifact`")
    parser.add_argument("--weights", nargs=3, type=float, default=[1.0, 1.0, 1.0],
                        metavar=("VERIFIER", "QUALITY", "STYLE"),
                        help="reward weights; with normalised gradients (every arm but sum and pcgrad) a preference "
                             "among the unit gradients, which only upgrad and sum can take")
    parser.add_argument("--seed", type=int, default=0,
                        help="run.seed of every arm (prompts, rollout noise, shuffles): a run is deterministic for a "
                             "given number of steps, so repeat runs need different seeds")
    parser.add_argument("--out", default="outputs/bench_balance")
    parser.add_argument("overrides", nargs="*", help="config overrides for every arm")
    args = parser.parse_args()
    if args.artifact_weights and args.quality != "artifact":
        parser.error("--artifact-weights applies to --quality artifact only")
    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    baseline = single_reward_trainer(args)
    warm_up(baseline)
    results = {arm: run_arm(arm, args, baseline) for arm in args.arms}
    (out / "results.json").write_text(json.dumps({"arms": results, "context": paired.context()}, indent=1))
    keys = metric_keys(args)
    (out / "results.md").write_text(table(results, keys))
    plot(results, out / "curve.png", keys)
    print(table(results, keys))
    print(f"wrote {out}/curve.png, results.md, results.json")


if __name__ == "__main__":
    main()
