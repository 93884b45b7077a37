"""Cost of a Flow-GRPO training micro-step against flow_grpo's own and against its floor; the split of a step.

    .venv/bin/python bench/flow_grpo_step.py --batch 8 --rounds 7

Three arms on the same tiny SD3 transformer, stored SDE transitions (flow_grpo's sampler, noise level 0.7, CFG 4.5)
and advantages: a plain forward + backward of the denoiser on the same CFG batch (the floor); flow_grpo's training
micro-step, transcribed below from its `scripts/train_sd3.py` and `sd3_sde_with_logprob.py` (log-prob of the stored
next latent, clipped loss, backward); and visalign's (`trajectory_log_prob`, `grpo_loss`, backward). Time: the arms
interleaved round by round in one process (`bench/paired.py`), medians of per-round ratios with their spread.
Memory: each arm's peak tensor memory (`paired.peak_memory`). The two micro-steps' log-probs are compared at the
same weights. Then one full visalign step on the world model reports the split between sampling, reward scoring
and training. `--out` writes everything as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys

import torch


# ---- flow_grpo's training micro-step, transcribed (not imported: flow_grpo is not a package here) -----------------
# flow_grpo `flow_grpo/diffusers_patch/sd3_sde_with_logprob.py` sde_step_with_logprob (sde_type="sde") and
# `scripts/train_sd3.py` compute_log_prob (train.cfg=True) and its PPO loss (beta = 0: no reference pass), on the
# same tiny SD3 transformer, stored transitions and advantages as visalign's arm.
def reference_step_logprob(scheduler, model_output, timestep, sample, prev_sample, noise_level):
    model_output, sample, prev_sample = model_output.float(), sample.float(), prev_sample.float()
    # one schedule lookup per sample, as the scheduler's index_for_timestep does
    step = [int((scheduler.timesteps == t).nonzero()[0]) for t in timestep]
    shape = (-1, *([1] * (sample.ndim - 1)))
    sigma = scheduler.sigmas[step].view(shape)
    sigma_prev = scheduler.sigmas[[i + 1 for i in step]].view(shape)
    sigma_max = scheduler.sigmas[1].item()
    dt = sigma_prev - sigma
    std = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * noise_level
    mean = sample * (1 + std ** 2 / (2 * sigma) * dt) + model_output * (1 + std ** 2 * (1 - sigma) / (2 * sigma)) * dt
    scale = std * torch.sqrt(-dt)
    log_prob = (-((prev_sample.detach() - mean) ** 2) / (2 * scale ** 2) - torch.log(scale)
                - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi))))
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def reference_micro_step(transformer, scheduler, latents, next_latents, timesteps, embeds, pooled, old_log_prob,
                         advantages, guidance, noise_level, clip_range, adv_clip_max=5.0):
    noise_pred = transformer(hidden_states=torch.cat([latents] * 2), timestep=torch.cat([timesteps] * 2),
                             encoder_hidden_states=embeds, pooled_projections=pooled, return_dict=False)[0]
    uncond, text = noise_pred.chunk(2)
    noise_pred = uncond + guidance * (text - uncond)
    log_prob = reference_step_logprob(scheduler, noise_pred, timesteps, latents, next_latents, noise_level)
    adv = torch.clamp(advantages, -adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_prob - old_log_prob)
    loss = torch.mean(torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)))
    loss.backward()
    return log_prob.detach()


def setup_reference(batch: int, size: int = 64, guidance: float = 4.5, noise_level: float = 0.7,
                    clip_range: float = 1e-4):
    """tiny-sd3 rollouts; arms: a plain forward + backward, flow_grpo's micro-step (transcribed), visalign's;
    plus the largest differences between the two micro-steps' log-probs and gradients at the same weights."""
    from visalign.models import load_model
    from visalign.sampling import SDEOptions, sample, trajectory_log_prob
    from visalign.trainers.losses import grpo_loss

    torch.manual_seed(0)
    model = load_model("tiny-sd3")
    model.denoiser.requires_grad_(True)
    prompts = [f"a photo of object {i % 4}" for i in range(batch)]
    cond = model.encode_prompts(prompts)
    traj = sample(model, cond, num_steps=6, height=size, width=size, guidance_scale=guidance,
                  sde=SDEOptions("flow_grpo", noise_level, (0, 3)), seeds=list(range(batch)))
    scheduler = model.pipe.scheduler  # set to this schedule by the sampler
    if not torch.allclose(scheduler.sigmas.float(), traj.sigmas.float()):
        raise SystemExit("the scheduler's schedule is not the trajectory's")
    j = 1
    adv = torch.randn(batch)
    old = traj.log_probs[:, j]
    embeds = torch.cat([cond.uncond["encoder_hidden_states"], cond.cond["encoder_hidden_states"]])
    pooled = torch.cat([cond.uncond["pooled_projections"], cond.cond["pooled_projections"]])
    x, x_next = traj.latents[:, j], traj.latents[:, j + 1]
    timesteps = scheduler.timesteps[j].expand(batch)

    def floor():
        v = model.predict_velocity(x, traj.sigmas[j], cond, guidance)
        v.pow(2).mean().backward()
        model.denoiser.zero_grad(set_to_none=True)

    def flow_grpo_body():
        return reference_micro_step(model.denoiser, scheduler, x, x_next, timesteps, embeds, pooled, old, adv,
                                    guidance, noise_level, clip_range)

    def visalign_body():
        out = trajectory_log_prob(model, traj, j, cond, guidance)
        loss, _ = grpo_loss(out.log_prob, old, adv, clip_range)
        loss.backward()
        return out.log_prob.detach()

    def arm(body):
        def run():
            body()
            model.denoiser.zero_grad(set_to_none=True)
        return run

    # The two micro-steps at the same weights: log-probs and the gradients their backward passes leave.
    checks, grads = {}, {}
    for name, body in (("flow_grpo", flow_grpo_body), ("visalign", visalign_body)):
        checks[name] = body()
        grads[name] = [p.grad.clone() for p in model.denoiser.parameters() if p.grad is not None]
        model.denoiser.zero_grad(set_to_none=True)
    differences = {"log_prob": float((checks["flow_grpo"] - checks["visalign"]).abs().max()),
                   "gradient": max(float((a - b).abs().max()) for a, b in zip(*grads.values(), strict=True)),
                   "gradient_scale": max(float(a.abs().max()) for a in grads["flow_grpo"])}
    return {"floor": floor, "flow_grpo": arm(flow_grpo_body), "visalign": arm(visalign_body)}, differences


def step_split(batch: int) -> dict:
    """One visalign Flow-GRPO step on the world model: seconds of sampling, waiting for rewards and training."""
    from visalign.trainers import load_train_config
    from visalign.trainers.flow_grpo import FlowGRPOTrainer

    cfg = load_train_config("configs/flow_grpo_world.yaml", [
        "run.out_dir=outputs/bench_step/run", "run.resume_from=null", "run.log_with=none", "run.progress=false",
        f"train.prompts_per_step={batch // 8}", "train.group_size=8", f"train.train_batch_size={batch}",
        f"sampling.batch_size={batch}", "eval_rewards=[]"])
    m = FlowGRPOTrainer(cfg).step(0)
    return {k: m[k] for k in ("time/sampling", "time/reward_wait", "time/training", "time/step")}


def main() -> None:
    from paired import compare, peak_memory

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="samples per micro-batch")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    parser.add_argument("--out", default="outputs/bench/flow_grpo_step.json")
    parser.add_argument("--arm", choices=["split"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.arm == "split":
        print(json.dumps(step_split(args.batch)))
        return
    arms, diff = setup_reference(args.batch)
    report = compare(arms, rounds=args.rounds)
    memory = {name: peak_memory(fn) for name, fn in arms.items()}
    out = subprocess.run([sys.executable, __file__, "--arm", "split", "--batch", str(max(args.batch, 8))],
                         capture_output=True, text=True, check=True)
    split = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"tiny-sd3 at 64 x 64, batch {args.batch}, CFG 4.5; one training micro-step (one stored SDE transition: "
          "log-prob, clipped loss, backward):\n")
    print(report.table())
    mid, lo, hi = report.between("visalign", "flow_grpo")
    print(f"\nvisalign / flow_grpo (transcribed): time {mid:.3f}x (rounds {lo:.3f} – {hi:.3f}), "
          f"peak tensor memory {memory['visalign'] / memory['flow_grpo']:.3f}x "
          f"({memory['visalign'] / 2**20:.1f} MB vs {memory['flow_grpo'] / 2**20:.1f} MB; plain forward + backward "
          f"{memory['floor'] / 2**20:.1f} MB)")
    print(f"largest difference between the two at the same weights: log-prob {diff['log_prob']:.3g}, gradient "
          f"{diff['gradient']:.3g} (largest gradient entry {diff['gradient_scale']:.3g})")
    total = split["time/step"]
    print(f"one visalign Flow-GRPO step on the world model (configs/flow_grpo_world.yaml): sampling "
          f"{split['time/sampling'] / total:.0%}, waiting for rewards {split['time/reward_wait'] / total:.0%}, "
          f"training {split['time/training'] / total:.0%}")
    print(report.write(args.out, visalign_over_flow_grpo=[mid, lo, hi], peak_memory_bytes=memory, differences=diff,
                       batch=args.batch,
                       world_step_split=split))


if __name__ == "__main__":
    main()
