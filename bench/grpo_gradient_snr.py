"""How much of a Flow-GRPO gradient is signal? Agreement of policy gradients from independent rollouts.

    .venv/bin/python bench/grpo_gradient_snr.py --arms 1 4 8 --repeats 3

For each SDE noise block size (`sampling.noise_block`; 1 = the usual isotropic SDE) the shipped world model
samples the same prompt groups twice with different seeds, and the on-policy Flow-GRPO gradient of each
rollout (group advantages of the trained rewards, every trained SDE step, no optimizer step) is computed over
the trainable parameters. If g = s + n_i with a shared signal s and independent noise n_i, the cosine between
two such gradients estimates |s|^2 / (|s|^2 + |n|^2): the fraction of the gradient's energy that both rollouts
agree on. Also printed: the within-group spread of the trained reward (the SDE must still explore) and the
time of two rollouts + gradients against the first arm's: the arms run interleaved, one prompt set per round
(bench/paired.py), median and spread of the per-round ratios. `--out` writes it all as JSON.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import paired  # noqa: E402

from visalign.sampling import trajectory_log_prob  # noqa: E402
from visalign.trainers import load_train_config, trainer_class  # noqa: E402
from visalign.trainers.common import plan_step, rollout  # noqa: E402
from visalign.trainers.losses import grpo_loss  # noqa: E402


def policy_gradient(trainer, step: int, seed_offset: int) -> tuple[torch.Tensor, float]:
    """Flattened on-policy gradient of one rollout of step `step`'s prompt groups, and the mean within-group std
    of the trained reward."""
    cfg = trainer.cfg
    plan = plan_step(trainer.source, seed=cfg.run.seed, step=step, prompts_per_step=cfg.train.prompts_per_step,
                     group_size=cfg.train.group_size, rank=0, world_size=1)
    plan = replace(plan, seeds=[s + seed_offset for s in plan.seeds])
    trainer.model.eval()
    ro = rollout(trainer.adapter, plan, trainer.rewards, num_steps=cfg.sampling.steps, guidance=cfg.sampling.guidance,
                 sde=trainer._sde(step), batch_size=cfg.sampling.batch_size, height=cfg.model.height,
                 width=cfg.model.width, num_frames=cfg.model.num_frames,
                 same_noise_per_group=cfg.sampling.same_noise_per_group)
    groups = plan.groups
    valid = torch.ones(len(groups), dtype=torch.bool)
    adv = trainer.weighting(ro.scores.trained, groups, valid).adv
    total = sum(w * ro.scores.trained[n].double() for n, w in cfg.rewards.items())
    spread = float(torch.stack([total[groups == g].std() for g in torch.unique(groups)]).mean())
    params = trainer.adapter.trainable_parameters()
    for p in params:
        p.grad = None
    traj = ro.traj
    steps = torch.nonzero(traj.stochastic[:-1]).flatten()
    bs = cfg.train.train_batch_size
    for j in steps.tolist():
        for s in range(0, len(groups), bs):
            idx = torch.arange(s, min(s + bs, len(groups)))
            out = trajectory_log_prob(trainer.adapter, traj, j, ro.cond.index(idx), cfg.sampling.guidance, index=idx)
            loss, _ = grpo_loss(out.log_prob, traj.log_probs[idx, j], adv[idx].float(), cfg.train.clip_range)
            (loss * len(idx) / len(groups) / len(steps)).backward()
    grad = torch.cat([p.grad.flatten() for p in params if p.grad is not None])
    for p in params:
        p.grad = None
    return grad, spread


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/flow_grpo_world.yaml")
    parser.add_argument("--arms", nargs="+", type=int, default=[1, 4, 8], help="noise block sizes")
    parser.add_argument("--repeats", type=int, default=3, help="prompt sets (steps) per arm")
    parser.add_argument("--out", default="outputs/bench_snr/grpo_gradient_snr.json")
    parser.add_argument("overrides", nargs="*", help="config overrides for every arm")
    args = parser.parse_args()
    torch.set_num_threads(2)
    trainers, cosines, spreads = {}, {}, {}
    for block in args.arms:
        cfg = load_train_config(args.config, ["run.out_dir=outputs/bench_snr", "run.resume_from=null",
                                              "run.log_with=none", "run.progress=false", "eval_rewards=[]",
                                              f"sampling.noise_block={block}", *args.overrides])
        trainers[f"block {block}"] = trainer_class(cfg.trainer)(cfg)

    def arm(name):
        def run():  # one prompt set: two independent rollouts' gradients
            step = len(cosines.setdefault(name, []))
            g1, s1 = policy_gradient(trainers[name], step, 0)
            g2, s2 = policy_gradient(trainers[name], step, 7_777_777)
            cosines[name].append(float(torch.nn.functional.cosine_similarity(g1, g2, dim=0)))
            spreads.setdefault(name, []).extend([s1, s2])
            print(f"{name}: cosines {[round(c, 3) for c in cosines[name]]}", flush=True)
        return run

    # the arms interleaved, one prompt set per round: their time ratios are paired (bench/paired.py)
    report = paired.compare({name: arm(name) for name in trainers}, rounds=args.repeats, warmup=0)
    print(f"\n| noise block | gradient cosine between rollouts (mean, min–max) | within-group reward std "
          f"| rollout + gradient time × {report.baseline} (median, spread) |")
    print("|---|---|---|---|")
    for a in report.arms:
        c, lo, hi = cosines[a.name], *a.spread
        print(f"| {a.name.split()[1]} | {sum(c) / len(c):.3f} ({min(c):.3f}–{max(c):.3f}) | "
              f"{sum(spreads[a.name]) / len(spreads[a.name]):.3f} | {a.median_ratio:.2f} ({lo:.2f}–{hi:.2f}) |")
    print(report.context)
    print(report.write(args.out, cosines=cosines, spreads=spreads))


if __name__ == "__main__":
    main()
