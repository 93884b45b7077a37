"""Which settings should the quickstart ship? Short runs of candidate settings, each evaluated against the base on
the same prompts and noise (paired 95% intervals), with the training time each took.

    .venv/bin/python bench/quickstart_settings.py --out outputs/quickstart_settings
    .venv/bin/python bench/quickstart_settings.py --variants dgpo dgpo_lr1e-4_clean1 --n 48 --eval-steps 10

The base model is evaluated once (cached in --out); every variant then trains from the shipped base for its steps
and is evaluated on the quickstart's templates, seen and held-out compositions. Training and evaluation times are
wall-clock on this machine: run it on idle cores.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from visalign.models import load_model
from visalign.trainers import load_train_config, trainer_class
from visalign.world.suite import WorldEvalConfig, compare_world, evaluate_world

DGPO, NFT = "configs/dgpo_world.yaml", "configs/nft_world.yaml"
CLEAN1 = "rewards={world-verifier: 1.0, world-cleanliness: 1.0}"
# name -> (config, steps, overrides)
VARIANTS = {
    "dgpo": (DGPO, 8, []),
    "nft": (NFT, 8, []),
    "dgpo_lr2e-4": (DGPO, 8, ["train.lr=2e-4"]),
    "dgpo_lr2e-4_noclip": (DGPO, 8, ["train.lr=2e-4", "train.clip_range=null"]),
    "dgpo_t4_lr1e-4": (DGPO, 8, ["train.lr=1e-4", "train.timesteps_per_sample=4"]),
    "dgpo_pp8_16steps": (DGPO, 16, ["train.prompts_per_step=8"]),
    "dgpo_lr1e-4_clean1": (DGPO, 8, ["train.lr=1e-4", CLEAN1]),
    "dgpo_lr1e-4_clean1.5": (DGPO, 8, ["train.lr=1e-4", "rewards={world-verifier: 1.0, world-cleanliness: 1.5}"]),
    "dgpo_lr1e-4_clean1_kl0.05": (DGPO, 8, ["train.lr=1e-4", "train.kl_beta=0.05", CLEAN1]),
}
TEMPLATES = ["count", "position", "two_objects"]


def _ci(d: dict) -> str:
    return f"{d['delta']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--n", type=int, default=48, help="evaluation prompts per template and split")
    parser.add_argument("--eval-steps", type=int, default=10, help="sampling steps of the evaluation")
    parser.add_argument("--out", default="outputs/quickstart_settings")
    args = parser.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ev = {"n_per_template": args.n, "steps": args.eval_steps, "templates": TEMPLATES, "guidance": 3.0}
    base_path = out / f"base_n{args.n}_steps{args.eval_steps}.json"
    if base_path.exists():
        before = json.loads(base_path.read_text())
    else:
        before = evaluate_world(load_model("world"), WorldEvalConfig(out=str(out / "base"), **ev), progress=False)
        base_path.write_text(json.dumps(before))
    rows = ["| variant | steps | train min | eval min | Δ seen (95% CI) | Δ held-out (95% CI) | Δ cleanliness seen "
            "| Δ cleanliness held-out |", "|---|---|---|---|---|---|---|---|"]
    for name in args.variants:
        config, steps, extra = VARIANTS[name]
        cfg = load_train_config(config, [f"run.out_dir={out / name}", "run.resume_from=null", "run.eval_every=0",
                                         "run.log_with=none", "run.progress=false", "train.max_steps=1000",
                                         "run.checkpoint_every=1000", *extra])
        trainer = trainer_class(cfg.trainer)(cfg)
        start = time.perf_counter()
        for step in range(steps):
            trainer.step(step)
            trainer.state.step = step + 1
        train_min = (time.perf_counter() - start) / 60
        if trainer.ema is not None:
            trainer.ema.swap()
        start = time.perf_counter()
        with torch.no_grad():
            after = evaluate_world(trainer.adapter, WorldEvalConfig(out=str(out / name / "eval"), **ev), progress=False)
        eval_min = (time.perf_counter() - start) / 60
        d = compare_world({"base": before, name: after})[name]
        rows.append(f"| {name} | {steps} | {train_min:.2f} | {eval_min:.2f} | {_ci(d['seen']['overall'])} | "
                    f"{_ci(d['heldout']['overall'])} | {_ci(d['seen']['cleanliness'])} | "
                    f"{_ci(d['heldout']['cleanliness'])} |")
        print(rows[-1], flush=True)
    table = (f"Base: seen {before['seen']['overall']:.3f}, held-out {before['heldout']['overall']:.3f}, cleanliness "
             f"{before['seen']['cleanliness']:.3f} ({args.n} prompts per template, {args.eval_steps} steps).\n\n"
             + "\n".join(rows) + "\n")
    (out / "results.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
