"""What does balancing K rewards cost per step? Cycle-average step time against a single-reward step, paired.

    .venv/bin/python bench/balance_cost.py --ks 4 5 --rounds 3

DiffusionNFT on the shapes world (configs/nft_world.yaml, 128 rollouts a step, 8 micro-batches), every arm from the
shipped base. Baseline: the verifier alone. Arms, for each K in `--ks` (rewards: world-verifier,
world-shape-fidelity, brightness, world-cleanliness, quality-nss, the first K):
  marble      configs/marble_world.yaml's form: UPGrad on unit-normalised gradients, EMA 0.9, amortised (one backward
              of blended weights), every 3rd step a refresh from explicit per-reward gradients of all 8 micro-batches
  marble-sub  the same, the refresh from the first 2 micro-batches
  marble-ub   amortised, the Gram matrix of the per-reward gradients of the predicted velocity (gram=output, MGDA-UB)
              over every micro-batch of every step: K backward passes through the loss only
One call of an arm is one refresh cycle (3 steps, whatever its schedule), so its time over the baseline's 3 steps is
the cycle-average step ratio. The arms run interleaved through bench/paired.py, after one untimed step each.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import paired  # noqa: E402
from balance_gram_estimates import REWARDS  # noqa: E402
from balance_world import ARMS, build  # noqa: E402

FORMS = {"marble": ARMS["marble-upgrad"],
         "marble-sub": [*ARMS["marble-upgrad"], "train.balance.refresh_batches=2"],
         "marble-ub": ["train.balance.method=upgrad", "train.balance.normalize=true", "train.balance.ema=0.9",
                       "train.balance.amortized=true", "train.balance.gram=output", "train.balance.safeguard=true"]}
CYCLE = 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/nft_world.yaml")
    parser.add_argument("--ks", type=int, nargs="+", default=[4, 5], choices=[2, 3, 4, 5])
    parser.add_argument("--forms", nargs="+", default=list(FORMS), choices=list(FORMS))
    parser.add_argument("--arms", nargs="+", help="only these arms, named FORM:K (e.g. marble:4 marble-ub:5)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/bench_balance_cost")
    parser.add_argument("overrides", nargs="*", help="config overrides for every arm")
    args = parser.parse_args()
    torch.set_num_threads(2)
    trainers = {"verifier alone": build(["rewards={world-verifier: 1.0}"], f"{args.out}/single", args, single=True)}
    pairs = ([(a.split(":")[0], int(a.split(":")[1])) for a in args.arms] if args.arms else
             [(form, k) for k in args.ks for form in args.forms])
    for form, k in pairs:
        if form not in FORMS or not 2 <= k <= len(REWARDS):
            parser.error(f"arm {form}:{k}: FORM is one of {', '.join(FORMS)} and K is 2-{len(REWARDS)}")
        rewards = "rewards={" + ", ".join(f"{r}: 1.0" for r in REWARDS[:k]) + "}"
        trainers[f"{form} K={k}"] = build([rewards, *FORMS[form]], f"{args.out}/{form}_k{k}", args)

    def cycle(trainer):
        def run():
            for _ in range(CYCLE):
                trainer.step(trainer.state.step)
                trainer.state.step += 1
        return run

    for name, trainer in trainers.items():  # one untimed step each: allocations, thread pools
        trainer.step(0)
        trainer.state.step = 1
        print(f"warmed up: {name}", flush=True)
    report = paired.compare({name: cycle(t) for name, t in trainers.items()}, rounds=args.rounds, warmup=0)
    print(f"\ncycle-average step time ({CYCLE} steps per call) over the verifier alone:\n")
    print(report.table())
    within = {a.name: a.median_ratio <= 1.10 for a in report.arms[1:]}
    print("\nwithin 10 % of a single-reward step: " + ", ".join(f"{n}: {'yes' if w else 'no'}"
                                                               for n, w in within.items()))
    print(report.write(Path(args.out) / "balance_cost.json", cycle=CYCLE, within_10_percent=within,
                       settings=vars(args)))


if __name__ == "__main__":
    main()
