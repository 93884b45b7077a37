"""How well does part of a step estimate the whole step's Gram matrix? (the amortised MARBLE refresh)

    .venv/bin/python bench/balance_gram_estimates.py --steps 2 --style brightness

Runs explicit MGDA steps of the balance bench's DiffusionNFT recipe (bench/balance_world.py, arm mgda) and keeps
every micro-batch's per-reward gradients. For each step it prints the simplex weights (on unit-normalised
gradients, the quantity MGDA chooses) from the Gram matrix of the whole step and of subsets of its micro-batches,
the whole step's pairwise cosines, the cosine between the two halves of the step for each reward (how much of a
reward's gradient is shared signal rather than sampling noise), and each reward's cosine between consecutive steps.
"""

from __future__ import annotations

import argparse

import torch
from balance_world import ARMS, STYLES, build, rewards_override

from visalign.trainers.balance import GradientBuffer, aggregator_weights


def simplex_weights(J: torch.Tensor) -> torch.Tensor:
    """MGDA's weights on the unit-normalised rows of J [K, P]."""
    unit = J / J.norm(dim=1, keepdim=True).clamp(min=1e-30)
    return aggregator_weights("mgda", unit @ unit.T)


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp(min=1e-30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/nft_world.yaml")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--style", default="brightness", choices=STYLES)
    parser.add_argument("--out", default="outputs/bench_balance_gram")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(2)
    trainer = build([rewards_override(args.style), *ARMS["mgda"]], args.out, args)
    names = list(trainer.cfg.rewards)
    calls: list[torch.Tensor] = []
    add = GradientBuffer.add

    def recording_add(self, k, loss, retain_graph):  # the same accumulation, plus a copy of each micro-batch's row
        before = self.J[k].clone()
        add(self, k, loss, retain_graph)
        calls.append(self.J[k] - before)

    GradientBuffer.add = recording_add
    previous = None
    print("reward order:", ", ".join(names))
    for step in range(args.steps):
        calls.clear()
        trainer.step(step)
        trainer.state.step = step + 1
        k = len(names)
        per_micro = torch.stack([torch.stack(calls[i:i + k]) for i in range(0, len(calls), k)]).double()  # [M, K, P]
        m = per_micro.shape[0]
        whole = per_micro.sum(0)
        print(f"step {step} ({m} micro-batches; consecutive micro-batches share samples at different noise levels)")
        print(f"  whole step            weights {simplex_weights(whole).numpy().round(3)}")
        for subset in ([0, 1], [0, 2], list(range(m // 2)), list(range(m // 2, m))):
            print(f"  micro-batches {subset!s:8s} weights {simplex_weights(per_micro[subset].sum(0)).numpy().round(3)}")
        unit = whole / whole.norm(dim=1, keepdim=True)
        print("  whole-step cosines\n" + "\n".join("    " + " ".join(f"{x:+.3f}" for x in row)
                                               for row in (unit @ unit.T).tolist()))
        halves = cosines(per_micro[: m // 2].sum(0), per_micro[m // 2:].sum(0))
        print(f"  first half vs second half, per reward: {halves.numpy().round(3)}")
        if previous is not None:
            print(f"  this step vs the previous, per reward: {cosines(whole, previous).numpy().round(3)}")
        previous = whole


if __name__ == "__main__":
    main()
