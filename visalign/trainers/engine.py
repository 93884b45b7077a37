"""The engine every recipe runs on (Flow-GRPO, Flow-RWR, DiffusionNFT, Flow-DPO): the model (LoRA or full
fine-tuning through the adapter), accelerate (DDP / DeepSpeed / FSDP, mixed precision), the optimizer and its
schedule, rewards, the step (rollout, advantages, micro-batches with accumulation, backward, multi-reward
gradient combination, clipping, optimizer step), EMA, self-verifying checkpoints of data (no pickles) with resume,
evaluation, the hacking alarm, logging and the training loop.

A recipe subclasses `OnlineTrainer` and supplies only what it alone knows (see "what a recipe supplies" below):
how advantages become its per-sample training weights (`weigh`), its micro-batches (`micro_batches`), what it
computes before each one outside the gradient context (`prepare_micro`: an old policy's or a reference's
prediction), its loss as a function of those weights (`micro_loss`), and what it does after an optimizer step
or a whole update (`after_optimizer_step`, `after_update`).

Config sections shared by every recipe live here (`ModelConfig`, `SamplingConfig`, `RunConfig`); each recipe
has its own config dataclass with its own `train:` section.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from collections.abc import Callable
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, ProjectConfiguration
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from visalign.config import save_config, to_dict
from visalign.media import preview_image, save_pixels
from visalign.models import DTYPES, load_model
from visalign.models.base import encode
from visalign.prompts import prompt_source, prompts_of, source_images
from visalign.sampling import SDEOptions, sample
from visalign.steering import RewardDrift
from visalign.trainers.alarms import AlarmMonitor
from visalign.trainers.balance import Balancer, GradientBuffer, diagnostics, output_space_gram
from visalign.trainers.common import (
    EMA,
    NoValidRewards,
    ParamCopy,
    RewardFailed,
    Rollout,
    Scores,
    StepPlan,
    TrainerState,
    TrainingFault,
    atomic_write,
    check_rewards_valid,
    check_writable,
    checkpoint_dirs,
    decode_in_chunks,
    disk_full,
    load_optimizer_state,
    load_rewards,
    load_trainer_state,
    optimizer_state,
    pinned_cpu,
    plan_step,
    prune_checkpoints,
    resolve_resume,
    rng_states,
    rollout,
    save_trainer_state,
    score_rewards,
    set_rng_states,
    step_generator,
    trim_metrics,
    verify_checkpoint,
    write_manifest,
)
from visalign.trainers.config import check_groups_per_process, drift_reward_weights
from visalign.trainers.diagnostics import LOSS_DRIFT, drift_row, loss_drift, reduce_drift, rollout_drift
from visalign.trainers.sharding import (
    check_deepspeed,
    fit_wrapping,
    full,
    is_sharded,
    local,
    make_accelerator,
    unsharded,
)
from visalign.trainers.weighting import AdvantageWeighting


def log_samples(trackers, image, step: int, tag: str = "eval/samples") -> None:
    """An evaluation's sample grid (uint8 [H, W, 3]) to accelerate's trackers at its step: TensorBoard's
    `add_images` (NHWC), wandb's `wandb.Image` (both through the tracker's `log_images`, as diffusers' examples)."""
    for tracker in trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({tag: image[None]}, step=step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({tag: [image]}, step=step)


def lr_factor(step: int, schedule: str, warmup: int, total: int) -> float:
    """Multiplier of the base learning rate at trainer step `step` (0-based) of `total`: linear warm-up over
    `warmup` steps, then constant, linear or half-cosine decay reaching 0 at step `total` (the shapes of
    diffusers.optimization's schedules). A pure function of the step, so a resumed run needs no scheduler state
    and the rate is the same whichever optimizer-step count a recipe takes per rollout."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr_schedule {schedule!r}")


def accumulation_schedule(n_micro: int, optimizer_steps: int,
                          sizes: list[int] | None = None) -> list[tuple[float, bool]]:
    """Split n_micro micro-batches into `optimizer_steps` near-equal consecutive optimizer steps. For each
    micro-batch: (what to divide its mean loss by, whether it ends the step). The divisor is the number of
    micro-batches in its optimizer step, or with `sizes` (samples per micro-batch) the step's samples over the
    micro-batch's, so that every sample weighs the same when the last chunk is short (equal sizes: the same)."""
    n_opt = max(1, min(optimizer_steps, n_micro))
    if sizes is not None and len(sizes) != n_micro:
        raise ValueError(f"{len(sizes)} micro-batch sizes for {n_micro} micro-batches")
    bounds = [round(n_micro * (o + 1) / n_opt) for o in range(n_opt)]
    out, start = [], 0
    for end in bounds:
        total = sum(sizes[start:end]) if sizes is not None else None
        out += [(end - start if sizes is None else total / sizes[i], i + 1 == end) for i in range(start, end)]
        start = end
    return out


@dataclass
class RolloutStep:
    """A step's rollout as every recipe sees it: this process's share (`ro`), the gathered scores of the whole
    batch in global order, each sample's prompt group, and which samples have finite trained rewards."""

    plan: StepPlan
    ro: Rollout
    gathered: Scores
    groups: torch.Tensor
    valid: torch.Tensor

    @property
    def local(self) -> slice:
        return slice(self.plan.start, self.plan.start + len(self.plan.items))


@dataclass
class StepData:
    """What one step trains on. The engine fills the rollout and its advantages (`collect`); the recipe's `weigh`
    turns them into per-sample training weights of this process's samples (`weights`, and `per_reward` [K, n] when
    the rewards are balanced in gradient space) and may keep what its micro-batches need in `extra`."""

    rs: RolloutStep | None = None  # None when the step trains on something else (offline preference pairs)
    adv: torch.Tensor | None = None  # gathered advantages of the weighted rewards [N]
    per_reward_adv: dict[str, torch.Tensor] | None = None  # gathered per-reward advantages (train.balance)
    mask: torch.Tensor | None = None  # gathered: samples to train on (finite rewards, Pareto filter)
    weights: torch.Tensor | None = None  # local per-sample training weights (the recipe's reading of `adv`)
    per_reward: torch.Tensor | None = None  # local per-reward training weights [K, n] (train.balance)
    metrics: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


@dataclass
class MicroBatch:
    """Positions `idx` into the step's trained samples, and, for forward-process recipes, the noise level of each
    and the timestep slot; `size` (len(idx)) weighs it in gradient accumulation."""

    idx: torch.Tensor
    slot: int
    sigma: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return len(self.idx)


@dataclass
class MicroLoss:
    """A micro-batch's forward, done once: `loss(weights)` gives (scalar loss, metrics) for per-sample training
    weights [n] (indexed by the micro-batch inside), so one forward serves every reward when balancing; `output`
    is the prediction the output-space Gram matrix differentiates (train.balance.gram=output)."""

    loss: Callable[[torch.Tensor], tuple[torch.Tensor, dict]]
    output: torch.Tensor | None = None


def blend_reward_weights(alpha: torch.Tensor, r_k: torch.Tensor) -> tuple[torch.Tensor, float]:
    """MARBLE's one backward: a loss affine in the reward weight has Σ_k alpha_k L(r_k) = S · L(r̄) with
    r̄ = Σ_k (alpha_k / S) r_k and S = Σ_k alpha_k. Returns (r̄ [n], S)."""
    total = alpha.sum()
    return ((alpha / total).float()[:, None] * r_k).sum(0), float(total)


class OnlineTrainer:
    """Shared engine. Subclasses set `name` and implement the hooks under "what a recipe supplies". `train()` runs
    to `train.max_steps`, resuming from the latest verified checkpoint; the config needs `model`, `sampling`,
    `train` (with `lr`, `betas`, `weight_decay`, `max_steps`, `prompts`, `prompts_per_step`, `group_size`,
    `ema`, `mixed_precision`), `run`, `rewards` and `eval_rewards` sections."""

    name = "trainer"

    def __init__(self, cfg, accelerator=None):
        self.cfg = cfg
        self.out = Path(cfg.run.out_dir)
        check_writable(self.out, "run.out_dir")  # before the model loads
        log_with = None if cfg.run.log_with == "none" else cfg.run.log_with
        self.accelerator = accelerator or make_accelerator(
            cpu=not torch.cuda.is_available(), mixed_precision=cfg.train.mixed_precision, log_with=log_with,
            project_config=ProjectConfiguration(project_dir=str(self.out), logging_dir=str(self.out / "logs")))
        self._build()

    # ---- setup -------------------------------------------------------------------------------------------
    def wants_frozen_reference(self) -> bool:
        """Full fine-tuning keeps a frozen copy of the denoiser when the recipe needs the reference policy."""
        return False

    def _build(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        check_deepspeed(acc, train_batch_size=cfg.train.train_batch_size, max_grad_norm=cfg.train.max_grad_norm,
                        balance_params=cfg.train.balance.on and cfg.train.balance.gram == "params")
        check_groups_per_process(cfg, acc.num_processes)
        if cfg.model.offload_copies and is_sharded(acc):
            raise ValueError("model.offload_copies moves whole copies to CPU memory; under FSDP / DeepSpeed they are "
                             "shards: use the engine's own offload in the accelerate config instead")
        self.source = prompt_source(cfg.train.prompts)
        self.eval_source = prompt_source(cfg.run.eval_prompts or cfg.train.prompts)
        encode_once = self.prompts_to_encode() if cfg.model.free_text_encoders else None
        adapter = load_model(cfg.model.name, cfg.model.path, torch_dtype=DTYPES[cfg.model.dtype],
                             device=str(acc.device), **cfg.model.options)
        adapter.check_request(cfg.model.height, cfg.model.width, cfg.model.num_frames)
        if encode_once is not None:
            adapter.free_text_encoders(encode_once, cfg=adapter.guidance == "cfg")
        self.ref_denoiser = None
        if cfg.model.finetune == "lora":
            adapter.add_lora(rank=cfg.model.lora_rank, alpha=cfg.model.lora_alpha,
                             target_modules=cfg.model.lora_targets)
        else:
            if self.wants_frozen_reference():
                self.ref_denoiser = copy.deepcopy(adapter.denoiser).requires_grad_(False)
                if cfg.model.reference_dtype != "same":
                    self.ref_denoiser.to(DTYPES[cfg.model.reference_dtype])
            adapter.denoiser.requires_grad_(True)
        if cfg.model.gradient_checkpointing:
            adapter.denoiser.enable_gradient_checkpointing()
        params = adapter.trainable_parameters()
        for p in params:  # trained weights stay fp32 even when the frozen base runs in half precision
            p.data = p.data.float()
        optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, betas=cfg.train.betas,
                                      weight_decay=cfg.train.weight_decay)
        fit_wrapping(acc, adapter.denoiser)
        if adapter.partial_passes:  # DDP waits for every parameter's gradient unless told some may not come
            acc.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=True)
        self.model, self.optimizer = acc.prepare(adapter.denoiser, optimizer)
        adapter.set_forward_module(self.model)
        self.adapter = adapter
        # FSDP replaces each parameter with its shard (a DTensor): everything after this holds those.
        self.params = [p for p in acc.unwrap_model(self.model).parameters() if p.requires_grad]
        params = self.params
        self.rewards = load_rewards(cfg.rewards, cfg.reward_options)
        self.eval_rewards = load_rewards(cfg.eval_rewards, cfg.reward_options)
        self.balancer = self.grad_buffer = None
        # State beyond the model and optimizer, by name: saved as data (save_trainer_state), never pickled.
        self.checkpointed: dict[str, Any] = {}
        tc = cfg.train
        self.weighting = AdvantageWeighting(tc.advantage, cfg.rewards, self.rewards, per_reward=tc.balance.on,
                                            drop_zero_spread=self.drop_zero_spread_groups)
        if tc.balance.on:
            b = tc.balance
            self.balancer = Balancer(b.method, dict(cfg.rewards), ema=b.ema, normalize=b.normalize,
                                     cagrad_c=b.cagrad_c, seed=cfg.run.seed, safeguard=b.safeguard)
            if tc.balance.gram == "params":  # K x P floats; the output-space Gram needs none
                self.grad_buffer = GradientBuffer(params, len(cfg.rewards), acc)
            self.checkpointed["balancer"] = self.balancer
            if tc.balance.track > 0:  # the tracked gradients are state: a resumed run must continue them
                self.checkpointed["grad_buffer"] = self.grad_buffer
        if self.weighting.lagrange is not None:
            self.checkpointed["lagrange"] = self.weighting.lagrange
        self.drift = None
        drift_weights = drift_reward_weights(cfg.sampling, cfg.rewards)
        if drift_weights:
            start, stop = cfg.sampling.drift.window or (0, None)
            self.drift = RewardDrift(cfg.sampling.drift.scale, cfg.sampling.drift.mode, cfg.sampling.drift.normalize,
                                     start, stop)
            # rewards.load caches: the trained rewards are the same objects
            loaded = load_rewards(drift_weights, cfg.reward_options)
            self.drift_rewards = {name: (loaded[name], w) for name, w in drift_weights.items()}
        self.ema = (EMA(params, cfg.train.ema.decay, cfg.train.ema.every, warmup=cfg.train.ema.warmup)
                    if cfg.train.ema.decay else None)
        self.state = TrainerState()
        self.checkpointed["state"] = self.state
        self.alarm = None
        if cfg.run.alarm.tolerance is not None or cfg.run.alarm.watch:
            self.alarm = AlarmMonitor(cfg.run.alarm.tolerance, cfg.run.alarm.rise, cfg.run.alarm.window,
                                      watch=dict(cfg.run.alarm.watch))
            self.checkpointed["alarm"] = self.alarm
        self._rollout_drift: dict[str, float] = {}  # this step's rollout diagnostics (rollout_step)
        self._drift_since_eval: dict[str, list[float]] = {}  # each step's drift/*, averaged for the alarm
        if self.ema is not None:
            self.checkpointed["ema"] = self.ema
        for name, state in self.recipe_state().items():  # checkpointed with the rest, restored on resume
            setattr(self, name, state)
            self.checkpointed[f"recipe.{name}"] = state
        if cfg.model.offload_copies:
            for state in self.checkpointed.values():
                if isinstance(state, ParamCopy):
                    state.offload()
            if self.ref_denoiser is not None:
                for t in (*self.ref_denoiser.parameters(), *self.ref_denoiser.buffers()):
                    t.data = pinned_cpu(t.data)

    def _sde(self, step: int) -> SDEOptions:
        s = self.cfg.sampling
        window = None
        if s.window_size is not None:
            lo, hi = s.window_range or (0, s.steps - 1)
            start = lo + int(torch.randint(hi - lo - s.window_size + 1, (1,), generator=step_generator(
                self.cfg.run.seed, step, 2)))
            window = (start, start + s.window_size)
        return SDEOptions(s.sde, s.noise_level, window, s.noise_block)

    def prompts_to_encode(self) -> list[str]:
        """Every prompt the run will encode, for `model.free_text_encoders` (before any model loads): the training
        and evaluation sources', which must be finite. A recipe that reads prompts elsewhere adds them."""
        cfg = self.cfg
        texts = []
        for source, name, spec in ((self.source, "train.prompts", cfg.train.prompts),
                                   (self.eval_source, "run.eval_prompts" if cfg.run.eval_prompts else "train.prompts",
                                    cfg.run.eval_prompts or cfg.train.prompts)):
            items = source.all()
            if items is None:
                raise ValueError(f"model.free_text_encoders=true encodes the run's prompts once, but {name}="
                                 f"{spec!r} is a generated source with no end: give a prompt file (.txt or .jsonl)")
            texts += [it.text for it in prompts_of(items, name)]
        return texts

    @contextmanager
    def reference_policy(self):
        """The adapter runs the reference policy inside: LoRA disabled, or the frozen copy of full fine-tuning
        (`wants_frozen_reference`)."""
        if self.ref_denoiser is None:
            with self.adapter.lora_disabled():
                yield
            return
        # Offloaded (model.offload_copies): the frozen copy's pinned CPU tensors are copied in for the pass and
        # the device copies dropped after it; frozen, so nothing is copied back.
        on_cpu = None
        if self.cfg.model.offload_copies:
            on_cpu = [(t, t.data) for t in (*self.ref_denoiser.parameters(), *self.ref_denoiser.buffers())]
            for t, data in on_cpu:
                t.data = data.to(self.accelerator.device, non_blocking=True)
        self.adapter.set_forward_module(self.ref_denoiser)
        try:
            # The frozen copy is not accelerate's prepared model, whose forward is autocast: without the context it
            # ran in fp32 against a bf16 trained pass (flow_grpo `scripts/train_sd3.py` runs its reference pass
            # inside the trained pass's autocast). A half-precision copy (model.reference_dtype) runs under its own.
            ref = self.cfg.model.reference_dtype
            with (torch.autocast(self.accelerator.device.type, dtype=DTYPES[ref]) if ref != "same"
                  else self.autocast_context()):
                yield
        finally:
            self.adapter.set_forward_module(self.model)
            for t, data in on_cpu or ():
                t.data = data

    def autocast_context(self):
        """A fresh context of the configured autocast (`train.mixed_precision`; a no-op for "no"): rollouts, each
        micro-batch, and passes of modules accelerate did not prepare (it autocasts the prepared model's forward
        itself)."""

        return self.accelerator.autocast() if self.cfg.train.mixed_precision != "no" else nullcontext()

    # ---- the shared half of a step -------------------------------------------------------------------------
    def rollout_step(self, step: int) -> RolloutStep:
        """Plan the step's prompt groups, sample and score this process's share, score held-out rewards,
        gather every process's scores in rank order (the global batch, whole groups) and check validity."""
        cfg, acc = self.cfg, self.accelerator
        plan = plan_step(self.source, seed=cfg.run.seed, step=step, prompts_per_step=cfg.train.prompts_per_step,
                         group_size=cfg.train.group_size, rank=acc.process_index, world_size=acc.num_processes)
        self.model.eval()
        try:
            ro = rollout(self.adapter, plan, self.rewards, num_steps=cfg.sampling.steps,
                         guidance=cfg.sampling.guidance, sde=self._sde(step), batch_size=cfg.sampling.batch_size,
                         height=cfg.model.height, width=cfg.model.width, num_frames=cfg.model.num_frames,
                         same_noise_per_group=cfg.sampling.same_noise_per_group, autocast=self.autocast_context,
                         drift=None if self.drift is None else (self.drift, self.drift_rewards),
                         decode_batch=cfg.sampling.decode_batch)
        except RewardFailed as err:  # a trained reward: the run cannot go on without it
            raise RewardFailed(err.name, f"step {step}: {err}. The last checkpoint is intact") from err.__cause__
        if self.eval_rewards:
            ro.scores.heldout, sub = self.score_heldout(ro.images, plan.items, f"step {step}", plan.groups)
            ro.scores.sub.update(sub)
        gathered = ro.scores.map(lambda v: acc.gather(v.to(acc.device)).cpu())
        groups = torch.arange(plan.total) // cfg.train.group_size
        valid = check_rewards_valid(gathered.trained, list(self.rewards), step)
        self._rollout_drift = rollout_drift(ro.images, ro.traj.latents, ro.traj.x0_preds, ro.traj.sigmas,
                                            plan.groups)
        return RolloutStep(plan, ro, gathered, groups, valid)

    def score_heldout(self, images: torch.Tensor, items, where: str,
                      groups: torch.Tensor | None = None) -> tuple[dict, dict]:
        """Scores and sub-scores of the held-out rewards (`groups`: the samples' prompt groups, for groupwise
        rewards). One that raises (on any process) is logged and disabled for the rest of the run, resumes included:
        held-out rewards only watch, so they never stop a run."""
        scores, sub, failed = {}, {}, {}
        for name, fn in self.eval_rewards.items():
            try:
                s, b = score_rewards({name: fn}, images, items, groups)
            except RewardFailed as err:
                failed[name] = str(err)
                continue
            scores.update(s)
            sub.update(b)
        acc = self.accelerator
        if acc.num_processes > 1:  # every process disables the same rewards, or their gathers would not match
            flags = torch.tensor([float(n in failed) for n in self.eval_rewards], device=acc.device)
            flags = acc.reduce(flags, reduction="sum").cpu()
            failed.update({n: "raised on another process" for n, f in zip(self.eval_rewards, flags.tolist(),
                                                                           strict=True) if f and n not in failed})
        for name, message in failed.items():
            self.disable_heldout(name, f"{where}: held-out {message}")
            scores.pop(name, None)
            sub = {k: v for k, v in sub.items() if not k.startswith(f"{name}/")}
        return scores, sub

    def disable_heldout(self, name: str, message: str) -> None:
        self.eval_rewards.pop(name, None)
        if name not in self.state.disabled:
            self.state.disabled.append(name)
        if self.accelerator.is_main_process:
            tqdm.write(f"{message}; disabled for the rest of the run")

    def micro_context(self, last: bool):
        """Context for one micro-batch's forward and backward: gradients sync across processes only on the
        last micro-batch of an optimizer step (DDP `no_sync` otherwise), under autocast when configured."""

        stack = ExitStack()
        if not last:
            stack.enter_context(self.accelerator.no_sync(self.model))
        stack.enter_context(self.autocast_context())
        return stack

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Backward of one micro-batch's loss (already weighted to its share of the optimizer step). DeepSpeed
        steps at its engine's accumulation boundary, so the boundary is set here: one optimizer step per
        `optimizer_step` call, however many micro-batches it accumulates."""
        if self.deepspeed:
            self.model.set_gradient_accumulation_boundary(last)
            self.model.backward(loss)  # the engine's accumulation count is 1: it does not rescale
        else:
            self.accelerator.backward(loss)

    # ---- gradient-space balancing ------------------------------------------------------------------------
    def balance_update(self) -> tuple[torch.Tensor | None, dict]:
        """Average the per-reward gradients over processes, refresh the balancer from their Gram matrix. A
        non-finite Gram (a non-finite loss or gradient) leaves the balancer as it was and returns None: the
        optimizer step is skipped."""
        self.grad_buffer.reduce(self.accelerator)
        gram = self.grad_buffer.gram()
        if not torch.isfinite(gram).all():
            return None, {}
        track = self.cfg.train.balance.track
        tracked = self.grad_buffer.track(track) if track > 0 else None
        return self.balancer.update(gram, tracked)

    def balance_context(self):
        """Per-reward gradients are taken with autograd.grad and reduced by hand (no DDP sync); under FSDP each is a
        backward the engine reduce-scatters into the shards (see GradientBuffer); autocast as usual."""
        return self.micro_context(last=self.sharded)

    def scheduled_lr(self, step: int) -> float:
        tc = self.cfg.train
        return tc.lr * lr_factor(step, tc.lr_schedule, tc.lr_warmup_steps, tc.max_steps)

    def optimizer_step(self, skip: bool = False) -> float:
        """Clip gradients, set the scheduled learning rate of the current trainer step, step, zero them;
        returns the gradient norm before clipping. A non-finite norm (from a non-finite loss or gradient; every
        process sees the same reduced norm) or `skip` drops the gradients without stepping: counted, and
        `run.skip_limit` such in a row stop the run."""
        lr = self.scheduled_lr(self.state.step)
        if self.deepspeed:
            # The engine clips (to train.max_grad_norm), steps and zeroes; ZeRO itself skips a step whose gradient
            # norm is not finite (its overflow check).
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.model.step()
            norm = self.model.get_global_grad_norm()
            grad_norm = float("nan") if norm is None else float(norm)
            stepped = not getattr(self.optimizer.optimizer, "overflow", False) and math.isfinite(grad_norm)
        else:
            grad_norm = float(full(self.accelerator.clip_grad_norm_(self.params, self.cfg.train.max_grad_norm)))
            stepped = not skip and math.isfinite(grad_norm)
            if stepped:
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if not stepped:
            self.skip("a non-finite loss or gradient norm", "optimizer step")
        else:
            self.state.in_a_row = 0
        return grad_norm

    def skip(self, why: str, what: str = "step") -> None:
        """Count a skipped step or optimizer step; `run.skip_limit` in a row stop the run, its last checkpoint
        left as it was."""
        st, limit = self.state, self.cfg.run.skip_limit
        st.skipped += 1
        st.in_a_row += 1
        self._skipped_now += 1
        if self.accelerator.is_main_process:
            tqdm.write(f"step {st.step}: {what} skipped ({why}); {st.in_a_row} in a row, limit {limit}")
        if st.in_a_row >= limit:
            last = checkpoint_dirs(self.out)
            raise TrainingFault(f"stopped at step {st.step}: {st.in_a_row} {what}s in a row skipped, the last for "
                                f"{why} (run.skip_limit={limit}). The last checkpoint "
                                f"({last[-1] if last else 'none yet'}) is intact; lower train.lr or "
                                "train.max_grad_norm, or check the rewards, then resume")

    # ---- what a recipe supplies ----------------------------------------------------------------------------
    drop_zero_spread_groups = False  # mask groups whose rewards have no spread (their advantages are all 0)

    def recipe_state(self) -> dict[str, Any]:
        """State only the recipe has (e.g. an old policy's weights), by attribute name: the engine sets each as an
        attribute and checkpoints it with `state_dict` / `load_state_dict`."""
        return {}

    def weigh(self, data: StepData) -> None:
        """Set `data.weights` (and `data.per_reward` when balancing) from the advantages: by default this
        process's share of the advantages themselves."""
        local = data.rs.local
        data.weights = data.adv[local]
        if data.per_reward_adv is not None:
            data.per_reward = torch.stack([data.per_reward_adv[n] for n in self.cfg.rewards])[:, local]

    def micro_batches(self, data: StepData, step: int) -> list[MicroBatch]:
        """The step's micro-batches, in training order."""
        raise NotImplementedError

    def prepare_micro(self, data: StepData, mb: MicroBatch) -> Any:
        """Work for one micro-batch outside its gradient context (an old policy's or a reference's prediction)."""
        return None

    def micro_loss(self, data: StepData, mb: MicroBatch, prepared: Any) -> MicroLoss:
        """The micro-batch's forward, inside its gradient context, and its loss as a function of the weights."""
        raise NotImplementedError

    def after_optimizer_step(self) -> None:
        """Called after each optimizer step."""

    def after_update(self, data: StepData, step: int) -> dict:
        """Called once the step's updates are done, before the EMA; returns extra metrics."""
        return {}

    def step_metrics(self, data: StepData) -> dict:
        """The recipe's own metrics of the step."""
        return {}

    # ---- the step ----------------------------------------------------------------------------------------------
    def collect(self, step: int) -> StepData:
        """The step's rollout, its advantages (`advantages`: the weighted rewards; per reward when balancing in
        gradient space) and its training mask."""
        rs = self.rollout_step(step)
        a = self.weighting(rs.gathered.trained, rs.groups, rs.valid)
        metrics = {**rs.ro.timings, **a.metrics, **rs.gathered.metrics(),
                   "invalid_rewards": int((~rs.valid).sum())}
        return StepData(rs=rs, adv=a.adv, per_reward_adv=a.per_reward, mask=a.mask, metrics=metrics)

    def step(self, step: int) -> dict:
        """One step: collect, weigh, then the micro-batches' updates. Returns the step's metrics. A step whose
        every sample has an invalid reward is skipped (and counted, see `skip`)."""
        t0 = time.perf_counter()
        self._skipped_now = 0
        self._rollout_drift = {}
        try:
            data = self.collect(step)
        except NoValidRewards:
            self.skip(f"every sample has an invalid (NaN/inf) reward from {', '.join(self.rewards)}")
            return {"step": step, **{f"rewards/{name}/mean": math.nan for name in self.cfg.rewards},
                    "skipped": 1, "skipped_total": self.state.skipped, "time/step": time.perf_counter() - t0}
        self.weigh(data)
        t_train = time.perf_counter()
        micro = self.micro_batches(data, step)
        logs, balance_logs = self.update(data, micro, step)
        metrics = {"step": step, **data.metrics,
                   **{f"train/{k}": sum(v) / len(v) for k, v in logs.items() if k not in LOSS_DRIFT},
                   **balance_logs, **self.after_update(data, step)}
        if self.ema is not None:
            self.ema.update(step)
        metrics.update(self.step_metrics(data))
        metrics.update(self.drift_metrics(logs))
        metrics.update({"skipped": self._skipped_now, "skipped_total": self.state.skipped,
                        "time/training": time.perf_counter() - t_train, "time/step": time.perf_counter() - t0})
        return metrics

    def drift_metrics(self, logs: dict[str, list[float]]) -> dict[str, float]:
        """The step's drift diagnostics (visalign.trainers.diagnostics): the rollout's and those among the losses'
        metrics, reduced over processes so that every process feeds its alarm the same values."""
        values = {**loss_drift(logs), **self._rollout_drift}
        acc = self.accelerator
        rows = drift_row(values)
        if acc.num_processes > 1:
            rows = acc.gather(rows.to(acc.device)).cpu()
        out = reduce_drift(rows)
        if self.alarm is not None:
            for name, value in out.items():
                self._drift_since_eval.setdefault(name, []).append(value)
        return out

    def update(self, data: StepData, micro: list[MicroBatch], step: int) -> tuple[dict[str, list], dict]:
        """Forward and backward of every micro-batch, accumulated into `train.optimizer_steps_per_rollout`
        optimizer steps. With several rewards balanced in gradient space (`train.balance`) each micro-batch's
        per-reward losses share its forward: explicit per-reward gradients, combined at each optimizer step; or,
        for a loss affine in the weight (`balance.amortized`), one backward of the blended weights, with the
        Gram matrix refreshed from explicit gradients or from the prediction's (`balance.gram=output`)."""
        tc, acc = self.cfg.train, self.accelerator
        schedule = accumulation_schedule(len(micro), tc.optimizer_steps_per_rollout, [mb.size for mb in micro])
        r_k = data.per_reward
        refresh = tc.balance.amortized and step % tc.balance.every == 0
        n_refresh = min(tc.balance.refresh_batches, len(micro))  # micro-batches that estimate the Gram
        gram = torch.zeros(len(self.cfg.rewards), len(self.cfg.rewards), dtype=torch.float64)  # balance.gram=output
        logs: dict[str, list[float]] = {}
        balance_logs: dict[str, float] = {}
        self.first_micro_metrics = None
        skip_optimizer_step = False  # a non-finite Gram of per-reward gradients
        self.model.train()
        for i, (mb, (size, last)) in enumerate(zip(micro, schedule, strict=True)):
            prepared = self.prepare_micro(data, mb)
            if r_k is None:
                with self.micro_context(last):
                    loss, m = self.micro_loss(data, mb, prepared).loss(data.weights)
                    self.backward(loss / size, last)
            elif tc.balance.gram == "output":
                # MARBLE's blended backward with the coefficients of the previous refresh (the configured weights
                # before the first); meanwhile the Gram matrix of this step's per-reward gradients of the prediction
                # accumulates over every micro-batch (MGDA-UB) and refreshes the balancer at the end.
                alpha = self.balancer.alpha if self.balancer.alpha is not None else self.balancer.w
                r_bar, total = blend_reward_weights(alpha, r_k)
                with self.micro_context(last):
                    ml = self.micro_loss(data, mb, prepared)
                    gram = gram + output_space_gram([ml.loss(r_k[k])[0] / size for k in range(len(r_k))], ml.output)
                    loss, m = ml.loss(r_bar)
                    self.backward(total * loss / size, last)
                if last:
                    gram = acc.reduce(gram.to(acc.device), reduction="sum").cpu() if acc.num_processes > 1 else gram
                    if torch.isfinite(gram).all():  # else the optimizer step below sees a non-finite norm
                        _, balance_logs = self.balancer.update(gram)
                        # The logged weights and cosines are those of the update just applied, not the next one's.
                        balance_logs.update(diagnostics(gram, alpha, list(self.cfg.rewards)))
                    gram = torch.zeros_like(gram)
            elif tc.balance.amortized and not (refresh and i < n_refresh):
                r_bar, total = blend_reward_weights(self.balancer.alpha, r_k)
                with self.micro_context(last):
                    loss, m = self.micro_loss(data, mb, prepared).loss(r_bar)
                    self.backward(total * loss / size, last)
            else:
                # Explicit per-reward gradients (and the amortised form's Gram refresh on its first n_refresh).
                with self.balance_context():
                    ml = self.micro_loss(data, mb, prepared)
                    for k in range(len(r_k)):
                        loss, m = ml.loss(r_k[k])
                        self.grad_buffer.add(k, loss / size, retain_graph=k + 1 < len(r_k))
                if last or (tc.balance.amortized and i == n_refresh - 1):
                    alpha, balance_logs = self.balance_update()
                    if alpha is None:
                        skip_optimizer_step = True
                    else:
                        self.grad_buffer.apply(alpha)
                    self.grad_buffer.zero()
            if self.first_micro_metrics is None:
                self.first_micro_metrics = m
            for key, value in m.items():
                logs.setdefault(key, []).append(value)
            if last:
                logs.setdefault("grad_norm", []).append(self.optimizer_step(skip_optimizer_step))
                skip_optimizer_step = False
                self.after_optimizer_step()
        return logs, balance_logs

    # ---- evaluation, checkpoints, loop ---------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, step: int) -> dict:
        """ODE samples of a fixed prompt set with fixed seeds; trained and held-out rewards; a grid PNG."""

        cfg = self.cfg
        items = prompts_of(self.eval_source.draw(cfg.run.eval_num_prompts, step_generator(cfg.run.seed, -1, 9)),
                           "evaluation prompts")
        if self.ema is not None:
            self.ema.swap()
        try:
            self.model.eval()
            cond = encode(self.adapter, [it.text for it in items],
                          cfg=self.adapter.guidance == "cfg" and cfg.sampling.guidance > 1,
                          images=source_images(items, (cfg.model.height, cfg.model.width)))
            traj = sample(self.adapter, cond, num_steps=cfg.run.eval_steps, height=cfg.model.height,
                          width=cfg.model.width, num_frames=cfg.model.num_frames, guidance_scale=cfg.sampling.guidance,
                          seeds=[10_000 + i for i in range(len(items))])
            images = decode_in_chunks(self.adapter, traj.final, cfg.sampling.decode_batch)
        finally:
            if self.ema is not None:
                self.ema.swap()
        try:
            scores, sub = score_rewards(self.rewards, images, items)
        except RewardFailed as err:
            raise RewardFailed(err.name, f"evaluation at step {step}: {err}") from err.__cause__
        heldout, heldout_sub = self.score_heldout(images, items, f"evaluation at step {step}")
        scores, sub = {**scores, **heldout}, {**sub, **heldout_sub}
        metrics = {f"eval/{k}/mean": v[torch.isfinite(v)].mean().item() for k, v in {**scores, **sub}.items()}
        if self.accelerator.is_main_process:
            shown = images[:32] if images.ndim == 4 else images[:8]
            save_pixels(shown, self.out / "samples" / f"step_{step:06d}.{'png' if images.ndim == 4 else 'gif'}",
                        scale=2)
            if self.accelerator.trackers:
                log_samples(self.accelerator.trackers, preview_image(shown, scale=2), step)
        return metrics

    def save_checkpoint(self, step: int) -> Path:
        acc = self.accelerator
        directory = self.out / "checkpoints" / f"checkpoint-{step}"
        if acc.is_main_process and directory.exists():  # left by a crash (or damaged): never mixed into the new one
            shutil.rmtree(directory)
        acc.wait_for_everyone()
        try:
            # As data only, never pickles: trained weights, optimizer and trainer state as safetensors + JSON. Under
            # FSDP every process writes its own shard of them (`.rankR`), without gathering the model.
            if acc.is_main_process:
                directory.mkdir(parents=True, exist_ok=True)
            acc.wait_for_everyone()
            save_trainer_state({"rng": rng_states()}, directory, f"rng_state_{acc.process_index}")
            if self.sharded or acc.is_main_process:
                shard = self._shard_suffix()
                weights = {n: local(p).detach().cpu().clone() for n, p in self._trained_named()}
                atomic_write(directory / f"weights{shard}.safetensors", lambda path: save_file(weights, str(path)))
                save_trainer_state({"optimizer": optimizer_state(self._stateful_optimizer()),
                                    **({"scaler": acc.scaler.state_dict()} if acc.scaler is not None else {})},
                                   directory, f"optimizer{shard}")
                save_trainer_state({"setup": self._setup(), **{name: obj.state_dict()
                                                               for name, obj in self.checkpointed.items()}},
                                   directory, f"trainer_state{shard}")
            acc.wait_for_everyone()
            if acc.is_main_process:
                if self.cfg.model.finetune == "lora" and not self.sharded:  # a ready adapter (the final one too)
                    self.adapter.save_lora(directory / "lora")
                write_manifest(directory, step)
        except (OSError, RuntimeError) as err:  # the half-written directory goes; the earlier ones stay
            if acc.is_main_process:
                shutil.rmtree(directory, ignore_errors=True)
            if not disk_full(err):
                raise
            previous = checkpoint_dirs(self.out)
            raise TrainingFault(
                f"no space left on the device writing {directory} ({shutil.disk_usage(self.out).free / 2**20:.0f} "
                f"MiB free): the checkpoint was not saved; the previous one ("
                f"{previous[-1] if previous else 'none yet'}) is intact. Free space (or lower "
                "run.checkpoints_total_limit), then resume") from err
        if acc.is_main_process:
            prune_checkpoints(self.out, self.cfg.run.checkpoints_total_limit)
        acc.wait_for_everyone()
        return directory

    def resume(self) -> Path | None:
        """Load `run.resume_from`: a named checkpoint, or with "latest" the newest intact one, saying which damaged
        ones it passed over (a damaged checkpoint fails its checks before any state changes)."""
        resume_from = self.cfg.run.resume_from
        if resume_from != "latest":
            path = resolve_resume(self.out, resume_from)
            if path is not None:
                self.load_checkpoint(path)
            return path
        damaged = []
        for path in reversed(checkpoint_dirs(self.out)):
            try:
                self.load_checkpoint(path)
            except ValueError as err:
                damaged.append(str(err))
                continue
            if damaged:
                tqdm.write(f"resumed from {path.name}, the newest intact checkpoint; passed over: "
                           + "; ".join(damaged))
            return path
        if damaged:
            raise ValueError("no checkpoint this run can resume from: " + "; ".join(damaged))
        return None

    def _keep_changed_config(self) -> None:
        """When out_dir's config.yaml differs from this run's, say which fields changed and keep it beside the new
        one (config.before-step-N.yaml), rather than overwrite it silently."""
        path = self.out / "config.yaml"
        if not path.exists():
            return
        old = _flat(yaml.safe_load(path.read_text()) or {})
        new = _flat(to_dict(self.cfg))
        changed = {k: (old.get(k), new.get(k)) for k in sorted({*old, *new}) if old.get(k) != new.get(k)}
        if not changed:
            return
        kept = self.out / f"config.before-step-{self.state.step}.yaml"
        shutil.copyfile(path, kept)
        tqdm.write(f"{path} had other settings; kept as {kept.name}. Changed: " +
                   ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()))

    @property
    def sharded(self) -> bool:
        return is_sharded(self.accelerator)

    @property
    def deepspeed(self) -> bool:
        return self.accelerator.distributed_type is DistributedType.DEEPSPEED

    def _stateful_optimizer(self):
        """The torch optimizer that holds the state: under DeepSpeed ZeRO the one stepping this process's flat
        partitions (DeepSpeed's own checkpoints are pickles)."""
        return self.optimizer.optimizer.optimizer if self.deepspeed else self.optimizer

    def _shard_suffix(self) -> str:
        """File-name part of this process's shard of the checkpoint: ".rankR" when sharded, "" otherwise."""
        return f".rank{self.accelerator.process_index}" if self.sharded else ""

    def _trained_named(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The trained parameters by name (LoRA or all of the denoiser's)."""
        return [(n, p) for n, p in self.accelerator.unwrap_model(self.model).named_parameters() if p.requires_grad]

    def _setup(self) -> dict:
        """What decides the shape of the saved weights: a checkpoint saved under other values cannot be loaded."""
        m, acc = self.cfg.model, self.accelerator
        return {"model.name": m.name, "model.finetune": m.finetune,
                "model.lora_rank": m.lora_rank if m.finetune == "lora" else None,
                "shards": f"{acc.distributed_type.value.lower()} x {acc.num_processes}" if self.sharded else None}

    def load_checkpoint(self, directory: Path) -> None:
        step = verify_checkpoint(directory)
        shard = self._shard_suffix()
        found = sorted(p.name for p in directory.glob("trainer_state*.json"))
        if found and f"trainer_state{shard}.json" not in found:
            raise ValueError(f"checkpoint {directory} holds {', '.join(found)}, not the trainer_state{shard}.json this "
                             "run reads: it was saved with another sharding or number of processes (this run: "
                             f"{self._setup()['shards'] or 'unsharded'}); resume it as it was launched")
        # Before anything changes: an old or damaged checkpoint fails here.
        states = load_trainer_state(directory, f"trainer_state{shard}")
        saved = states.get("setup", self._setup())
        changed = {k: (saved.get(k), v) for k, v in self._setup().items() if saved.get(k) != v}
        if changed:
            raise ValueError(f"checkpoint {directory} was saved with " + ", ".join(
                f"{k}={old!r}" for k, (old, _) in changed.items()) + "; this run has " + ", ".join(
                f"{k}={new!r}" for k, (_, new) in changed.items()) + ": its weights do not fit (start a new out_dir, "
                "or set run.resume_from=null)")
        missing = [name for name in self.checkpointed if name not in states]
        if missing:
            raise ValueError(f"checkpoint {directory} has no state for {missing} (saved: {sorted(states)}): it was "
                             "written with other settings (e.g. without train.ema or train.balance)")
        self._load_weights_and_optimizer(directory)
        for name, obj in self.checkpointed.items():
            obj.load_state_dict(states[name])
        for name in self.state.disabled:  # held-out rewards that raised earlier in this run stay off
            self.eval_rewards.pop(name, None)
        if self.state.step != step:
            raise ValueError(f"checkpoint {directory}: manifest step {step} != saved trainer step {self.state.step}")

    def _load_weights_and_optimizer(self, directory: Path) -> None:
        """Trained weights, optimizer (and fp16 scaler) state and this process's random states, as data."""
        shard = self._shard_suffix()
        opt = load_trainer_state(directory, f"optimizer{shard}")  # an older checkpoint of pickles is refused here
        rng = directory / f"rng_state_{self.accelerator.process_index}.json"
        if not rng.exists():
            other = list(directory.glob("rng_state_*.json"))
            raise ValueError(f"checkpoint {directory} has no {rng.name}: it was written by "
                             f"{'another number of processes' if other else 'an older visalign'}")
        weights = load_file(str(directory / f"weights{shard}.safetensors"))
        trained = dict(self._trained_named())
        if set(weights) != set(trained):
            raise ValueError(f"checkpoint {directory}: its trained weights ({len(weights)} tensors) are not this "
                             f"run's ({len(trained)}): other LoRA targets or another model")
        with torch.no_grad():
            for name, param in trained.items():
                local(param).copy_(weights[name])
        if self.deepspeed:  # ZeRO's fp32 master partitions from the weights just loaded (exact: they are fp32)
            self.optimizer.optimizer.refresh_fp32_params()
        load_optimizer_state(self._stateful_optimizer(), opt["optimizer"])
        if "scaler" in opt and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(opt["scaler"])
        set_rng_states(load_trainer_state(directory, rng.stem)["rng"])

    def save_final(self) -> Path:
        """LoRA in diffusers format, or the full weights, into out_dir/final (EMA weights when enabled)."""
        final = self.out / "final"
        if self.ema is not None:
            self.ema.swap()
        try:
            with self.whole_denoiser():
                if self.accelerator.is_main_process:
                    final.mkdir(parents=True, exist_ok=True)
                    if self.cfg.model.finetune == "lora":
                        self.adapter.save_lora(final)
                    elif hasattr(self.adapter, "save_pretrained"):
                        self.adapter.save_pretrained(final / "model.safetensors")
                    else:
                        self.adapter.denoiser.save_pretrained(final / "denoiser")
        finally:
            if self.ema is not None:
                self.ema.swap()
        return final

    @contextmanager
    def whole_denoiser(self):
        """Inside, the adapter's denoiser is whole on the main process (under FSDP a gathered CPU copy; every
        process enters), so its usual exports run unchanged."""
        if self.accelerator.distributed_type is not DistributedType.FSDP:  # ZeRO-2 keeps parameters whole
            yield
            return
        denoiser = self.adapter.denoiser
        with unsharded(self.accelerator.unwrap_model(self.model), self.accelerator) as twin:
            if twin is not None:
                self.adapter.denoiser = twin
            try:
                yield
            finally:
                self.adapter.denoiser = denoiser

    def _check_alarm(self, step: int, metrics: dict) -> bool:
        """Feed the evaluation into the hacking alarm: the evaluation's rewards, and each drift diagnostic averaged
        over the steps since the last evaluation (`drift/diversity` as the held-out signal "diversity", the
        `run.alarm.watch` ones as watched signals); log it; True when the run should stop."""
        if self.alarm is None:
            return False
        trained = sum(w * metrics[f"eval/{name}/mean"] for name, w in self.cfg.rewards.items())
        heldout = {name: metrics[f"eval/{name}/mean"] for name in self.eval_rewards}
        drift = {name: sum(v) / len(v) for name, v in self._drift_since_eval.items()}
        self._drift_since_eval = {}
        if "drift/diversity" in drift:
            heldout["diversity"] = metrics["eval/diversity"] = drift["drift/diversity"]
        watched = {name: drift.get(name, math.nan) for name in self.cfg.run.alarm.watch}
        already = self.alarm.fired is not None
        alarm = self.alarm.update(step, trained, heldout, watched)
        metrics["alarm/fired"] = int(alarm is not None)
        if alarm is None or already:
            return False
        metrics["alarm/step"] = alarm.step
        if self.accelerator.is_main_process:
            tqdm.write(alarm.message())
            with (self.out / "alarms.jsonl").open("a") as f:
                f.write(json.dumps({"message": alarm.message(), **alarm.__dict__}) + "\n")
        return self.cfg.run.alarm.action in ("stop", "rollback")

    def rollback(self) -> Path | None:
        """After an alarm: load the checkpoint, among those saved at evaluated steps, where the signal that fell
        was best (a watched one: nearest its first value; the earliest on ties), keeping the alarm's full history.
        None when no such checkpoint exists."""
        values = self.alarm.goodness()
        candidates = [d for d in checkpoint_dirs(self.out) if int(d.name.split("-")[1]) in values]
        message = {"rolled_back_to": None}
        best = None
        if candidates:
            best = max(candidates, key=lambda d: (values[int(d.name.split("-")[1])], -int(d.name.split("-")[1])))
            history = self.alarm.state_dict()
            self.load_checkpoint(best)
            self.alarm.load_state_dict(history)  # the checkpoint holds an older history; keep the one that fired
            message = {"rolled_back_to": str(best), "step": self.state.step}
        if self.accelerator.is_main_process:
            tqdm.write(
                f"rollback: {message['rolled_back_to'] or 'no checkpoint at an evaluated step; keeping the weights'}")
            with (self.out / "alarms.jsonl").open("a") as f:
                f.write(json.dumps(message) + "\n")
        return best

    def progress_postfix(self, metrics: dict) -> dict:
        main_reward = next(iter(self.cfg.rewards))
        return {"reward": f"{metrics[f'rewards/{main_reward}/mean']:.3f}"}

    def train(self, stop_after: int | None = None) -> list[dict]:
        """Run until max_steps (or until `stop_after` more steps, to simulate an interruption). Trackers are
        finished; the process group is left up, so a distributed script keeps `acc = trainer.accelerator`, drops
        the trainer and ends with `visalign.train.end_distributed(acc)` (the CLI does)."""

        cfg, acc = self.cfg, self.accelerator
        self.resume()
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            self._keep_changed_config()
            save_config(cfg, self.out / "config.yaml")
            trim_metrics(self.out / "metrics.jsonl", self.state.step)
        if cfg.run.log_with != "none":
            acc.init_trackers("visalign", config=_flat(asdict(cfg)))
        history = []
        rolled_back = False
        start = self.state.step
        end = cfg.train.max_steps if stop_after is None else min(cfg.train.max_steps, start + stop_after)
        bar = tqdm(range(start, end), initial=start, total=cfg.train.max_steps, desc=self.name,
                   disable=not (cfg.run.progress and acc.is_local_main_process))
        for step in bar:
            metrics = self.step(step)
            metrics["train/lr"] = self.scheduled_lr(step)
            self.state.step = step + 1
            stop_for_alarm = False
            if cfg.run.eval_every and (step + 1) % cfg.run.eval_every == 0:
                metrics.update(self.evaluate(step + 1))
                stop_for_alarm = self._check_alarm(step + 1, metrics)
            if (step + 1) % cfg.run.checkpoint_every == 0 or step + 1 == cfg.train.max_steps:
                self.save_checkpoint(step + 1)
            acc.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step + 1)
            if acc.is_main_process:
                with (self.out / "metrics.jsonl").open("a") as f:
                    f.write(json.dumps(metrics) + "\n")
            bar.set_postfix(self.progress_postfix(metrics))
            history.append(metrics)
            if stop_for_alarm:
                if cfg.run.alarm.action == "rollback":  # no new checkpoint: it could prune the one to restore
                    rolled_back = self.rollback() is not None
                else:
                    self.save_checkpoint(step + 1)
                break
        if self.state.step >= cfg.train.max_steps or rolled_back:
            self.save_final()
        for tracker in acc.trackers:  # not acc.end_training(): the caller may still gather (see visalign.train.run)
            tracker.finish()
        return history


def _flat(d: dict, prefix: str = "") -> dict:
    """Flatten a nested config for trackers (which accept scalars and strings only)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


