"""The reward-hacking alarm in the shapes world: optimising a hackable proxy fires it, the exact verifier does not.

    .venv/bin/python bench/alarm_world.py --steps 12 --out outputs/bench_alarm

Two DiffusionNFT runs from the shipped base model (configs/nft_world.yaml), same prompts, same held-out signals
(the strict world judge, not trained on, and within-group rollout diversity), alarm on
(`run.alarm.tolerance`, evaluated every `--eval-every` steps on fixed prompts and seeds):
  proxy     rewards = saturation-area (pays for strongly coloured pixels however they are made)
  verifier  rewards = world-verifier + 0.5 world-cleanliness
Prints, per run, the trained reward and each held-out signal at the first and last evaluation and whether / when
the alarm fired; writes results.json (`arms`, and `context`: threads, load, CPUs, device, commit from
bench/paired.py) and results.md (the table and the same context).

The runs are compared on outcomes after the same work (`--steps` training steps each, the same evaluations), not
on time: both trainers are built first and take their steps interleaved (one step of each per round, through
`trainer.train(stop_after=1)`, which evaluates and feeds the alarm as a whole run does), so neither meets a
different machine; nothing here is timed. Interleaving changes no outcome: at `--steps 2` results.json's arms are
equal to those of the runs one after the other.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import paired
import torch

from visalign.trainers import load_train_config, trainer_class

ARMS = {"proxy": "rewards={saturation-area: 1.0}",
        "verifier": "rewards={world-verifier: 1.0, world-cleanliness: 0.5}"}


def build(name: str, rewards: str, args):
    out = Path(args.out) / name
    overrides = [rewards, f"run.out_dir={out}", "run.resume_from=null", f"train.max_steps={args.steps}",
                 f"run.eval_every={args.eval_every}", "eval_rewards=[world-strict]", "run.log_with=none",
                 f"run.alarm.tolerance={args.tolerance}", f"run.alarm.window={args.window}", "run.alarm.action=log",
                 f"run.checkpoint_every={args.steps}", "run.progress=false", f"run.eval_num_prompts={args.n}",
                 *args.overrides]
    cfg = load_train_config(args.config, overrides)
    return trainer_class(cfg.trainer)(cfg)


def train_interleaved(trainers: dict) -> None:
    """One step of each trainer per round, the order alternating (A B, B A, ...), until each reaches its
    train.max_steps, or until its alarm stops it (run.alarm.action stop or rollback, as `train()` would).
    `train(stop_after=1)` runs a step as a whole run does: evaluation and the alarm at every run.eval_every-th step,
    checkpoints, the final save."""
    active, r = list(trainers.values()), 0
    while active:
        for trainer in (list(active) if r % 2 == 0 else active[::-1]):
            trainer.train(stop_after=1)
            stopped = (trainer.alarm is not None and trainer.alarm.fired is not None
                       and trainer.cfg.run.alarm.action in ("stop", "rollback"))
            if stopped or trainer.state.step >= trainer.cfg.train.max_steps:
                active.remove(trainer)
        r += 1


def outcome(trainer) -> dict:
    alarm = trainer.alarm
    fired = alarm.fired
    return {"steps": alarm.steps, "trained": alarm.trained, "heldout": alarm.heldout,
            "alarm": None if fired is None else {**fired.__dict__, "message": fired.message()}}


def table(results: dict) -> str:
    rows = ["| run | trained reward | held-out strict judge | rollout diversity | alarm |", "|---|---|---|---|---|"]
    for name, r in results.items():
        def span(values):
            return f"{values[0]:.3f} → {values[-1]:.3f}"

        alarm = "no" if r["alarm"] is None else f"step {r['alarm']['step']} ({r['alarm']['signal']})"
        rows.append(f"| {name} | {span(r['trained'])} | {span(r['heldout']['world-strict'])} | "
                    f"{span(r['heldout'].get('diversity', [float('nan')]))} | {alarm} |")
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/nft_world.yaml")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--eval-every", type=int, default=3)
    parser.add_argument("--n", type=int, default=64, help="evaluation prompts (fixed seeds)")
    parser.add_argument("--tolerance", type=float, default=0.05)
    parser.add_argument("--window", type=int, default=1)
    parser.add_argument("--out", default="outputs/bench_alarm")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(2)
    trainers = {name: build(name, rewards, args) for name, rewards in ARMS.items()}
    train_interleaved(trainers)
    results = {name: outcome(trainer) for name, trainer in trainers.items()}
    context = paired.context()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"arms": results, "context": context}, indent=1))
    line = paired.equal_work(f"{args.steps} training steps each, interleaved", context)
    (out / "results.md").write_text(table(results) + "\n" + line + "\n")
    print(table(results))
    print(line)


if __name__ == "__main__":
    main()
