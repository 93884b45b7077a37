"""Cost of a Flow-GRPO training micro-step against its floor, and the time split of a whole step.

    .venv/bin/python bench/flow_grpo_step.py --batch 32

Floor: a plain forward + backward of the same denoiser on the same batch (with CFG, as training runs it).
Trainer: one micro-step of `FlowGRPOTrainer._update` work — `trajectory_log_prob` on stored transitions,
`grpo_loss`, backward. Time: both arms in one process, interleaved round by round (`bench/paired.py`), the
median of the per-round ratios and their spread. Peak memory (max RSS above the set-up): each arm once more in
its own process, so its peak is its own. Then one full trainer step reports the split between sampling, reward
scoring and training. Printed numbers are ratios measured in this run; `--out` also writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def setup(batch: int):
    """The world model, a batch of SDE rollouts with their log-probs, and the two arms' bodies."""
    from visalign.models import load_model
    from visalign.sampling import SDEOptions, sample, trajectory_log_prob
    from visalign.trainers.losses import grpo_loss
    from visalign.world.grammar import sample_specs

    model = load_model("world")
    model.denoiser.requires_grad_(True)
    prompts = [s.prompt for s in sample_specs(batch, "seen", generator=0)]
    cond = model.encode_prompts(prompts)
    traj = sample(model, cond, num_steps=10, height=32, width=32, guidance_scale=3.0,
                  sde=SDEOptions("flow_grpo", 0.7, (0, 4)), seeds=list(range(batch)))
    adv = torch.randn(batch)

    def floor():
        v = model.predict_velocity(traj.latents[:, 1], traj.sigmas[1], cond, 3.0)
        v.pow(2).mean().backward()
        model.denoiser.zero_grad(set_to_none=True)

    def trainer():
        out = trajectory_log_prob(model, traj, 1, cond, 3.0)
        loss, _ = grpo_loss(out.log_prob, traj.log_probs[:, 1], adv, 1e-4)
        loss.backward()
        model.denoiser.zero_grad(set_to_none=True)

    return {"floor": floor, "trainer": trainer}


def peak_memory(name: str, batch: int) -> dict:
    """One arm alone in this process: max RSS above the set-up after a warm-up and one more call."""
    arms = setup(batch)
    base = _peak_mb()
    arms[name]()
    arms[name]()
    return {"peak_mb_above_setup": _peak_mb() - base}


def step_split(batch: int) -> dict:
    from visalign.trainers import load_train_config
    from visalign.trainers.flow_grpo import FlowGRPOTrainer

    torch.set_num_threads(2)
    cfg = load_train_config("configs/flow_grpo_world.yaml", [
        "run.out_dir=outputs/bench_step/run", "run.resume_from=null", "run.log_with=none", "run.progress=false",
        f"train.prompts_per_step={batch // 8}", "train.group_size=8", f"train.train_batch_size={batch}",
        f"sampling.batch_size={batch}", "eval_rewards=[]"])
    trainer = FlowGRPOTrainer(cfg)
    m = trainer.step(0)
    keys = ("time/sampling", "time/reward_wait", "time/training", "time/step")
    return {k: m[k] for k in keys}


def main() -> None:
    from paired import compare

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    parser.add_argument("--out", default="outputs/bench/flow_grpo_step.json")
    parser.add_argument("--arm", choices=["floor", "trainer", "split"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.arm == "split":
        print(json.dumps(step_split(args.batch)))
        return
    if args.arm:
        print(json.dumps(peak_memory(args.arm, args.batch)))
        return
    report = compare(setup(args.batch), rounds=args.rounds)
    results = {}
    for name in ("floor", "trainer", "split"):
        out = subprocess.run([sys.executable, __file__, "--arm", name, "--batch", str(args.batch)],
                             capture_output=True, text=True, check=True)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    floor, trainer, split = results["floor"], results["trainer"], results["split"]
    print(f"world model, batch {args.batch}, CFG 3.0; micro-step against a plain forward + backward:\n")
    print(report.table())
    mem_t, mem_f = trainer["peak_mb_above_setup"], floor["peak_mb_above_setup"]
    ratio = f"{mem_t / mem_f:.2f}x" if mem_f > 0 else "n/a (neither rose above the set-up's own peak)"
    print(f"\npeak memory above set-up, trainer / floor: {ratio} ({mem_t:.0f} MB vs {mem_f:.0f} MB)")
    total = split["time/step"]
    print(f"one trainer step: sampling {split['time/sampling'] / total:.0%}, waiting for rewards "
          f"{split['time/reward_wait'] / total:.0%}, training {split['time/training'] / total:.0%} of the step")
    print(report.write(args.out, memory=results, batch=args.batch))


if __name__ == "__main__":
    main()
