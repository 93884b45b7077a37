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
import statistics
import subprocess
import sys
import time

import torch


# ---- flow_grpo's training micro-step, transcribed (not imported: flow_grpo is not a package here) -----------------
# flow_grpo `flow_grpo/diffusers_patch/sd3_sde_with_logprob.py` sde_step_with_logprob (sde_type="sde") and
# `scripts/train_sd3.py` compute_log_prob (train.cfg=True) and its PPO loss (beta = 0: no reference pass), on the
# same tiny SD3 transformer, stored transitions and advantages as visalign's arm.
def reference_sde_step(scheduler, model_output, timestep, sample, noise_level, prev_sample=None, generator=None):
    """sde_step_with_logprob: the next latent (drawn unless given) and its log-prob, averaged over non-batch dims."""
    model_output, sample = model_output.float(), sample.float()
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
    if prev_sample is None:
        prev_sample = mean + scale * torch.randn(model_output.shape, generator=generator)
    prev_sample = prev_sample.float()
    log_prob = (-((prev_sample.detach() - mean) ** 2) / (2 * scale ** 2) - torch.log(scale)
                - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi))))
    return prev_sample, log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def reference_step_logprob(scheduler, model_output, timestep, sample, prev_sample, noise_level):
    return reference_sde_step(scheduler, model_output, timestep, sample, noise_level, prev_sample)[1]


def reference_micro_step(transformer, scheduler, latents, next_latents, timesteps, embeds, pooled, old_log_prob,
                         advantages, guidance, noise_level, clip_range, adv_clip_max=5.0, loss_scale=1.0):
    noise_pred = transformer(hidden_states=torch.cat([latents] * 2), timestep=torch.cat([timesteps] * 2),
                             encoder_hidden_states=embeds, pooled_projections=pooled, return_dict=False)[0]
    uncond, text = noise_pred.chunk(2)
    noise_pred = uncond + guidance * (text - uncond)
    log_prob = reference_step_logprob(scheduler, noise_pred, timesteps, latents, next_latents, noise_level)
    adv = torch.clamp(advantages, -adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_prob - old_log_prob)
    loss = torch.mean(torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)))
    (loss * loss_scale).backward()  # accelerator.accumulate divides by the accumulation steps
    return log_prob.detach()


class ReferenceStep:
    """flow_grpo's whole step (one epoch of `scripts/train_sd3.py`), transcribed: per sampling batch the prompts are
    encoded (compute_text_embeddings; the empty negative prompt once, before training), sampled with
    `pipeline_with_logprob` (CFG forward + sde_step_with_logprob at every step, then the VAE decode to [0, 1]) and
    scored; advantages per prompt (PerPromptStatTracker: (r - mean) / (std + 1e-4)); then samples shuffled,
    rebatched, and every trained timestep of every batch a micro-step under gradient accumulation (loss divided by
    the accumulation steps, clip_grad_norm_ 1.0 and AdamW at the sync). Each call records its phases' seconds."""

    def __init__(self, model, reward, prompts: list[str], group: int, steps: int, size: int, guidance: float,
                 noise_level: float, clip_range: float, timestep_fraction: float, lr: float, sample_batch: int,
                 optimizer_steps: int = 1):
        self.model, self.pipe, self.reward = model, model.pipe, reward
        self.transformer = model.denoiser
        self.prompts, self.group, self.steps, self.size = prompts, group, steps, size
        self.guidance, self.noise_level, self.clip_range = guidance, noise_level, clip_range
        self.num_train_timesteps = int(steps * timestep_fraction)
        self.sample_batch, self.optimizer_steps = sample_batch, optimizer_steps
        self.optimizer = torch.optim.AdamW([p for p in self.transformer.parameters() if p.requires_grad], lr=lr,
                                           betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
        self.neg, self.neg_pooled = self.encode([""])
        self.generator = torch.Generator().manual_seed(0)
        self.phases: list[dict] = []

    @torch.no_grad()
    def encode(self, prompts):
        embeds, _, pooled, _ = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None,
                                                       do_classifier_free_guidance=False,
                                                       max_sequence_length=self.model.max_sequence_length)
        return embeds, pooled

    @torch.no_grad()
    def sample(self, embeds, pooled):
        n = embeds.shape[0]
        scheduler, vae = self.pipe.scheduler, self.pipe.vae
        scheduler.set_timesteps(self.steps)
        channels, down = self.transformer.config.in_channels, self.pipe.vae_scale_factor
        latents = torch.randn(n, channels, self.size // down, self.size // down, generator=self.generator)
        both = torch.cat([self.neg.expand(n, -1, -1), embeds]), torch.cat([self.neg_pooled.expand(n, -1), pooled])
        all_latents, all_log_probs = [latents], []
        for t in scheduler.timesteps:
            noise_pred = self.transformer(hidden_states=torch.cat([latents] * 2), timestep=t.expand(2 * n),
                                          encoder_hidden_states=both[0], pooled_projections=both[1],
                                          return_dict=False)[0]
            uncond, text = noise_pred.chunk(2)
            noise_pred = uncond + self.guidance * (text - uncond)
            latents, log_prob = reference_sde_step(scheduler, noise_pred.float(), t.unsqueeze(0), latents.float(),
                                                   self.noise_level, generator=self.generator)
            all_latents.append(latents)
            all_log_probs.append(log_prob)
        z = latents / vae.config.scaling_factor + vae.config.shift_factor
        images = (vae.decode(z, return_dict=False)[0] / 2 + 0.5).clamp(0, 1)
        return images, torch.stack(all_latents, 1), torch.stack(all_log_probs, 1)

    def __call__(self):
        t0 = time.perf_counter()
        prompts = [p for p in self.prompts for _ in range(self.group)]
        samples = []
        for i in range(0, len(prompts), self.sample_batch):
            batch = prompts[i:i + self.sample_batch]
            embeds, pooled = self.encode(batch)
            images, latents, log_probs = self.sample(embeds, pooled)
            rewards = self.reward(prompts=batch, images=images).float()
            timesteps = self.pipe.scheduler.timesteps.repeat(len(batch), 1)
            samples.append({"embeds": embeds, "pooled": pooled, "timesteps": timesteps, "latents": latents[:, :-1],
                            "next_latents": latents[:, 1:], "log_probs": log_probs, "rewards": rewards})
        samples = {k: torch.cat([s[k] for s in samples]) for k in samples[0]}
        # PerPromptStatTracker (global_std off): each prompt's rewards standardised within its group
        rewards = samples.pop("rewards")
        adv = torch.empty_like(rewards)
        for prompt in set(prompts):
            idx = torch.tensor([j for j, q in enumerate(prompts) if q == prompt])
            r = rewards[idx]
            adv[idx] = (r - r.mean()) / (r.std(unbiased=False) + 1e-4)
        samples["advantages"] = adv
        t1 = time.perf_counter()
        total = len(prompts)
        perm = torch.randperm(total, generator=self.generator)
        samples = {k: v[perm] for k, v in samples.items()}
        batches = total // self.sample_batch
        accumulation = batches // self.optimizer_steps * self.num_train_timesteps
        self.transformer.train()
        done = 0
        for b in range(batches):
            sl = slice(b * self.sample_batch, (b + 1) * self.sample_batch)
            n = sl.stop - sl.start
            embeds = torch.cat([self.neg.expand(n, -1, -1), samples["embeds"][sl]])
            pooled = torch.cat([self.neg_pooled.expand(n, -1), samples["pooled"][sl]])
            for j in range(self.num_train_timesteps):
                reference_micro_step(self.transformer, self.pipe.scheduler, samples["latents"][sl, j],
                                     samples["next_latents"][sl, j], samples["timesteps"][sl, j], embeds, pooled,
                                     samples["log_probs"][sl, j], samples["advantages"][sl], self.guidance,
                                     self.noise_level, self.clip_range, loss_scale=1.0 / accumulation)
                done += 1
                if done % accumulation == 0:
                    torch.nn.utils.clip_grad_norm_(self.transformer.parameters(), 1.0)
                    self.optimizer.step()
                    self.optimizer.zero_grad()
        self.transformer.eval()
        t2 = time.perf_counter()
        self.phases.append({"sampling": t1 - t0, "training": t2 - t1, "step": t2 - t0})


VARIANTS = {"visalign": []}  # a lever toward the floor is measured as another visalign arm with its overrides


def whole_step_arms(prompts_per_step: int = 2, group: int = 4, steps: int = 6, size: int = 64,
                    guidance: float = 4.5, noise_level: float = 0.7, lr: float = 1e-5, variants: dict = VARIANTS):
    """flow_grpo's whole step and visalign's Flow-GRPO trainer step on tiny-sd3 (full fine-tuning, the same reward,
    prompts, group size, SDE, trained timesteps, batches and optimizer steps), each on its own copy of the weights;
    `variants`: visalign arms by their config overrides. Returns the arms and each arm's per-call phase
    seconds."""
    import tempfile

    from visalign.models import load_model
    from visalign.rewards import registry
    from visalign.trainers import load_train_config
    from visalign.trainers.flow_grpo import FlowGRPOTrainer

    n = prompts_per_step * group
    base = [
        "trainer=flow_grpo", "model.name=tiny-sd3", f"model.height={size}", f"model.width={size}",
        "model.finetune=full", f"sampling.steps={steps}", f"sampling.guidance={guidance}", "sampling.sde=flow_grpo",
        f"sampling.noise_level={noise_level}", f"sampling.batch_size={n}", f"train.prompts_per_step={prompts_per_step}",
        f"train.group_size={group}", f"train.train_batch_size={n}", "train.timestep_fraction=0.99",
        f"train.lr={lr}", "train.kl_beta=0", "train.clip_range=1e-4", "rewards={brightness: 1.0}", "eval_rewards=[]",
        "run.resume_from=null", "run.log_with=none", "run.progress=false", "run.eval_every=0"]
    prompts = [f"a photo of object {i}" for i in range(prompts_per_step)]
    model = load_model("tiny-sd3")
    model.denoiser.requires_grad_(True)
    reference = ReferenceStep(model, registry.load("brightness"), prompts, group, steps, size, guidance, noise_level,
                              1e-4, 0.99, lr, sample_batch=n)
    arms, phases = {"flow_grpo": reference}, {"flow_grpo": reference.phases}
    for name, extra in variants.items():
        trainer = FlowGRPOTrainer(load_train_config(None, [*base, f"run.out_dir={tempfile.mkdtemp()}", *extra]))
        phases[name] = []

        def step(trainer=trainer, record=phases[name]):
            m = trainer.step(trainer.state.step)
            trainer.state.step += 1
            record.append({"sampling": m["time/step"] - m["time/training"], "training": m["time/training"],
                           "step": m["time/step"]})

        step.trainer = trainer
        arms[name] = step
    return arms, phases


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
    parser.add_argument("--prompts", type=int, default=2, help="whole step: prompts per step")
    parser.add_argument("--group", type=int, default=4, help="whole step: samples per prompt")
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
    print(f"tiny-sd3 at 64 x 64, batch {args.batch}, CFG 4.5; one training micro-step (one stored SDE transition: "
          "log-prob, clipped loss, backward):\n")
    print(report.table())
    mid, lo, hi = report.between("visalign", "flow_grpo")
    print(f"\nmicro-step, visalign / flow_grpo (transcribed): time {mid:.3f}x (rounds {lo:.3f} – {hi:.3f}), "
          f"peak tensor memory {memory['visalign'] / memory['flow_grpo']:.3f}x "
          f"({memory['visalign'] / 2**20:.1f} MB vs {memory['flow_grpo'] / 2**20:.1f} MB; plain forward + backward "
          f"{memory['floor'] / 2**20:.1f} MB)")
    print(f"largest difference between the two at the same weights: log-prob {diff['log_prob']:.3g}, gradient "
          f"{diff['gradient']:.3g} (largest gradient entry {diff['gradient_scale']:.3g})")

    whole, phases = whole_step_arms(args.prompts, args.group)
    for name, fn in whole.items():  # the first step of each builds optimizer state: untimed
        fn()
        phases[name].clear()
    whole_report = compare(whole, rounds=args.rounds, warmup=0)
    whole_memory = {name: peak_memory(fn) for name, fn in whole.items()}
    for name in phases:
        del phases[name][args.rounds:]  # the memory probe's calls

    def phase_ratio(name, phase):
        r = [v[phase] / f[phase] for v, f in zip(phases[name], phases["flow_grpo"], strict=True)]
        return statistics.median(r), min(r), max(r)

    print(f"\nwhole step ({args.prompts} prompts x {args.group}, 6 SDE steps, 5 trained timesteps, full fine-tuning, "
          "reward: brightness), arms interleaved:\n")
    print(whole_report.table())
    summary = {}
    for arm in whole_report.arms[1:]:
        name = arm.name
        summary[name] = {"step": [arm.median_ratio, *arm.spread], "rollout": phase_ratio(name, "sampling"),
                         "training": phase_ratio(name, "training"),
                         "memory": whole_memory[name] / whole_memory["flow_grpo"]}
        (st, slo, shi), (ro, rlo, rhi), (tr, tlo, thi) = (summary[name][k] for k in ("step", "rollout", "training"))
        print(f"\n{name} / flow_grpo: step {st:.3f}x ({slo:.3f} – {shi:.3f}); rollout (sampling, decode, reward, "
              f"advantages) {ro:.3f}x ({rlo:.3f} – {rhi:.3f}); training {tr:.3f}x ({tlo:.3f} – {thi:.3f}); peak "
              f"tensor memory {summary[name]['memory']:.3f}x ({whole_memory[name] / 2**20:.1f} MB vs "
              f"{whole_memory['flow_grpo'] / 2**20:.1f} MB); aim <= 0.8x: distance {st - 0.8:+.3f}")
    out = subprocess.run([sys.executable, __file__, "--arm", "split", "--batch", str(max(args.batch, 8))],
                         capture_output=True, text=True, check=True)
    split = json.loads(out.stdout.strip().splitlines()[-1])
    total = split["time/step"]
    print(f"one visalign Flow-GRPO step on the world model (configs/flow_grpo_world.yaml): sampling "
          f"{split['time/sampling'] / total:.0%}, waiting for rewards {split['time/reward_wait'] / total:.0%}, "
          f"training {split['time/training'] / total:.0%}")
    print(report.write(args.out, visalign_over_flow_grpo=[mid, lo, hi], peak_memory_bytes=memory, differences=diff,
                       batch=args.batch, world_step_split=split,
                       whole_step={**whole_report.to_dict(), "phases": phases, "peak_memory_bytes": whole_memory,
                                   "over_flow_grpo": summary}))


if __name__ == "__main__":
    main()
