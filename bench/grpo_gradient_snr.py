"""How much of a Flow-GRPO gradient is signal? Agreement of policy gradients from independent rollouts.

    .venv/bin/python bench/grpo_gradient_snr.py --arms 1 4 8 --repeats 3

For each SDE noise block size (`sampling.noise_block`; 1 = the usual isotropic SDE) the shipped world model
samples the same prompt groups twice with different seeds, and the on-policy Flow-GRPO gradient of each
rollout (group advantages of the trained rewards, every trained SDE step, no optimizer step) is computed over
the trainable parameters. If g = s + n_i with a shared signal s and independent noise n_i, the cosine between
two such gradients estimates |s|^2 / (|s|^2 + |n|^2): the fraction of the gradient's energy that both rollouts
agree on. Also printed: the within-group spread of the trained reward (the SDE must still explore) and the
time of one rollout + gradient. Ratios and cosines measured in this one run.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from visalign.sampling import trajectory_log_prob
from visalign.trainers import load_train_config, trainer_class
from visalign.trainers.common import plan_step, rollout
from visalign.trainers.losses import grpo_loss


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
    parser.add_argument("overrides", nargs="*", help="config overrides for every arm")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    for block in args.arms:
        cfg = load_train_config(args.config, ["run.out_dir=outputs/bench_snr", "run.resume_from=null",
                                              "run.log_with=none", "run.progress=false", "eval_rewards=[]",
                                              f"sampling.noise_block={block}", *args.overrides])
        trainer = trainer_class(cfg.trainer)(cfg)
        cosines, spreads, times = [], [], []
        for step in range(args.repeats):
            t = time.perf_counter()
            g1, s1 = policy_gradient(trainer, step, 0)
            times.append(time.perf_counter() - t)
            g2, s2 = policy_gradient(trainer, step, 7_777_777)
            cosines.append(float(torch.nn.functional.cosine_similarity(g1, g2, dim=0)))
            spreads += [s1, s2]
        rows.append((block, sum(cosines) / len(cosines), min(cosines), max(cosines), sum(spreads) / len(spreads),
                     sum(times) / len(times)))
        print(f"block {block}: cosines {[round(c, 3) for c in cosines]}", flush=True)
    base_time = rows[0][5]
    print("\n| noise block | gradient cosine between rollouts (mean, min–max) | within-group reward std "
          "| rollout + gradient time × first arm |")
    print("|---|---|---|---|")
    for block, mean, lo, hi, spread, t in rows:
        print(f"| {block} | {mean:.3f} ({lo:.3f}–{hi:.3f}) | {spread:.3f} | {t / base_time:.2f} |")


if __name__ == "__main__":
    main()
