"""How well do cheap refreshes estimate a step's exact Gram matrix? (the amortised MARBLE refresh)

    .venv/bin/python bench/balance_gram_estimates.py --steps 3 --k 4

Runs explicit steps of the balance bench's DiffusionNFT recipe (bench/balance_world.py, arm mgda) with K rewards
(`--k` 3-5: world-verifier, world-shape-fidelity, brightness, world-cleanliness, quality-nss) and keeps every
micro-batch's per-reward gradients. The exact Gram matrix is that of the whole step's per-reward parameter gradients
(what `refresh_batches` = all micro-batches computes). Estimates, each with what it costs beyond a single-reward step:
  first n micro-batches   refresh_batches = n: K-1 extra backward passes through the network on n micro-batches
  output space            gram=output (MGDA-UB): gradients of the loss w.r.t. the predicted velocity, every
                          micro-batch; K backward passes through the loss only
  head parameters         only the parameters nearest the output (up_blocks.2, conv_norm_out, conv_out: 2 % of them);
                          K-1 extra backward passes through the last block only
  CountSketch d           the exact gradients hashed to d signed buckets (Charikar et al. 2002): K × d numbers
                          instead of K × P; it saves memory, not backward passes
  previous step           the exact Gram of the step before: what the amortised steps between refreshes use
For each estimate, averaged over the steps: the relative Frobenius error of the cosine matrix (the unit-normalised
Gram, which UPGrad and MGDA see with `normalize`), and the L1 distance of the UPGrad and MGDA weights from the exact
Gram's. Also printed per step: the whole step's pairwise cosines and each reward's agreement between the two halves
of the step (how much of its gradient is shared signal rather than sampling noise). Writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from balance_world import ARMS, build  # noqa: E402
from paired import context  # noqa: E402

from visalign.trainers.balance import GradientBuffer, aggregator_weights  # noqa: E402
from visalign.trainers.balance.gradients import output_space_gram  # noqa: E402

REWARDS = ("world-verifier", "world-shape-fidelity", "brightness", "world-cleanliness", "quality-nss")
HEAD = ("up_blocks.2.", "conv_norm_out.", "conv_out.")


def cosine_matrix(gram: torch.Tensor) -> torch.Tensor:
    d = gram.diagonal().clamp(min=1e-300).sqrt()
    return gram / d[:, None] / d[None, :]


def gram_of(rows: torch.Tensor) -> torch.Tensor:
    rows = rows.double()
    return rows @ rows.T


def count_sketch(J: torch.Tensor, d: int, seed: int = 0) -> torch.Tensor:
    """[K, P] -> [K, d]: each coordinate added with a random sign into a random bucket; <Sa, Sb> is an unbiased
    estimate of <a, b>."""
    g = torch.Generator().manual_seed(seed)
    bucket = torch.randint(d, (J.shape[1],), generator=g)
    sign = torch.randint(2, (J.shape[1],), generator=g).double() * 2 - 1
    out = torch.zeros(J.shape[0], d, dtype=torch.float64)
    return out.index_add_(1, bucket, J.double() * sign)


def errors(estimate: torch.Tensor, exact: torch.Tensor) -> dict:
    """Relative Frobenius error of the cosine matrix; L1 distance of UPGrad's and MGDA's weights."""
    c_est, c = cosine_matrix(estimate), cosine_matrix(exact)
    out = {"cosine_error": float((c_est - c).norm() / c.norm())}
    for method in ("upgrad", "mgda"):
        out[f"{method}_l1"] = float((aggregator_weights(method, c_est) - aggregator_weights(method, c)).abs().sum())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/nft_world.yaml")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--k", type=int, default=4, choices=[3, 4, 5], help="rewards balanced")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/bench_balance_gram")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rewards = "rewards={" + ", ".join(f"{r}: 1.0" for r in REWARDS[:args.k]) + "}"
    trainer = build([rewards, *ARMS["mgda"]], args.out, args)
    names = list(trainer.cfg.rewards)
    params = trainer.grad_buffer.params
    by_id = {id(p): n for n, p in trainer.adapter.denoiser.named_parameters()}
    head_mask = torch.cat([torch.full((p.numel(),), by_id.get(id(p), "").startswith(HEAD)) for p in params])
    calls: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []  # per micro-batch output-space Gram
    add, micro_loss = GradientBuffer.add, trainer.micro_loss

    def recording_add(self, k, loss, retain_graph):  # the same accumulation, plus a copy of each micro-batch's row
        before = self.J[k].clone()
        add(self, k, loss, retain_graph)
        calls.append(self.J[k] - before)

    def recording_micro_loss(data, mb, prepared):
        ml = micro_loss(data, mb, prepared)
        outputs.append(output_space_gram([ml.loss(data.per_reward[k])[0] for k in range(len(names))], ml.output))
        return ml

    GradientBuffer.add = recording_add
    trainer.micro_loss = recording_micro_loss
    sketches = (256, 4096)
    rows: dict[str, list[dict]] = {}
    previous = None
    print(f"rewards: {', '.join(names)}; head parameters: {int(head_mask.sum())} of {head_mask.numel()}")
    for step in range(args.steps):
        calls.clear()
        outputs.clear()
        trainer.step(step)
        trainer.state.step = step + 1
        k = len(names)
        per_micro = torch.stack([torch.stack(calls[i:i + k]) for i in range(0, len(calls), k)]).double()  # [M, K, P]
        m = per_micro.shape[0]
        whole = per_micro.sum(0)
        exact = gram_of(whole)
        estimates = {f"first {n} of {m} micro-batches": gram_of(per_micro[:n].sum(0))
                     for n in sorted({1, 2, m // 2}) if n < m}
        estimates[f"output space, all {m} micro-batches"] = sum(outputs)
        estimates["head parameters (2 %)"] = gram_of(whole[:, head_mask])
        for d in sketches:
            estimates[f"CountSketch d={d}"] = gram_of(count_sketch(whole, d, seed=step))
        if previous is not None:
            estimates["previous step (exact)"] = previous
        previous = exact
        for name, estimate in estimates.items():
            rows.setdefault(name, []).append(errors(estimate, exact))
        cos = cosine_matrix(exact)
        halves = (lambda a, b: (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)))(per_micro[: m // 2].sum(0),
                                                                                  per_micro[m // 2:].sum(0))
        print(f"step {step}: {m} micro-batches; whole-step cosines:\n" + "\n".join(
            "    " + " ".join(f"{x:+.3f}" for x in row) for row in cos.tolist()))
        print(f"  first half vs second half, per reward: {halves.numpy().round(3)}")
    table = ["| estimate | steps | cosine matrix, relative error | UPGrad weights, L1 | MGDA weights, L1 |",
             "|---|---|---|---|---|"]
    summary = {}
    for name, per_step in rows.items():
        mean = {key: sum(r[key] for r in per_step) / len(per_step) for key in per_step[0]}
        summary[name] = {**mean, "per_step": per_step}
        table.append(f"| {name} | {len(per_step)} | {mean['cosine_error']:.3f} | {mean['upgrad_l1']:.3f} | "
                     f"{mean['mgda_l1']:.3f} |")
    print("\n".join(table))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"gram_estimates_k{args.k}.json").write_text(json.dumps(
        {"rewards": names, "estimates": summary, "settings": vars(args), "context": context()}, indent=1))
    (out / f"gram_estimates_k{args.k}.md").write_text("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
