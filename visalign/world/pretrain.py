"""`visalign world pretrain`: train the world's base model with flow matching on rendered (prompt, image) pairs.

Rectified-flow objective (Liu et al. 2022; Esser et al. 2024, SD3 §3): x_sigma = (1 - sigma) x0 + sigma eps,
target velocity eps - x0, sigma ~ logit-normal(0, 1). Prompts come only from the *seen* split, so held-out
compositions measure generalisation. Every step's data and noise derive from (seed, step), so a resumed run
sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from visalign.trainers.common import load_optimizer_state, load_trainer_state, optimizer_state, save_trainer_state
from visalign.world.grammar import TEMPLATES, sample_specs
from visalign.world.model import WorldAdapter, WorldVideoAdapter, check_denoiser
from visalign.world.motion import MOTION_TEMPLATES, misdescribe_direction, render_clips, sample_motion_specs
from visalign.world.render import render_batch


@dataclass
class PretrainConfig:
    """Flow-matching pretraining of the world base model."""

    out_dir: str = field(default="runs/world_pretrain", metadata={"help": "checkpoints and final model"})
    steps: int = field(default=1600, metadata={"ge": 1, "help": "optimizer steps"})
    batch_size: int = field(default=64, metadata={"ge": 1, "help": "images per step"})
    lr: float = field(default=1e-3, metadata={"gt": 0, "help": "AdamW peak learning rate"})
    warmup_steps: int = field(default=100, metadata={"ge": 0, "help": "linear warm-up"})
    weight_decay: float = field(default=0.0, metadata={"ge": 0, "help": "AdamW weight decay"})
    ema_decay: float = field(default=0.998, metadata={"ge": 0, "lt": 1,
        "help": "EMA of weights; the EMA is what is saved"})
    cond_dropout: float = field(default=0.1, metadata={"ge": 0, "lt": 1, "help": "fraction of empty prompts (for CFG)"})
    logit_normal_std: float = field(default=1.0, metadata={"gt": 0, "help": "sigma ~ sigmoid(N(0, std))"})
    token_embedding_std: float | None = field(default=None, metadata={"gt": 0,
        "help": "initial scale of the text encoder's word embeddings (None: CLIP's 0.02); see build_networks"})
    bf16: bool = field(default=True, metadata={"help": "bfloat16 autocast (about 1.3x faster on CPU)"})
    video: bool = field(default=False, metadata={"help": "train the moving-shapes video model (world-video)"})
    denoiser: str = field(default="unet", metadata={
        "help": "video: unet (frames stacked on channels, the shipped model), wan (a tiny WanTransformer3DModel) or "
                "motion (a per-frame UNet with temporal attention, diffusers UNetMotionModel)"})
    caption_noise: float = field(default=0.0, metadata={"ge": 0, "le": 1,
        "help": "video: fraction of clips captioned with directions drawn at random (motion.misdescribe_direction)"})
    templates: list[str] = field(default_factory=list, metadata={
        "help": "prompt templates; empty: all of the world's (image or motion templates)"})
    seed: int = field(default=0, metadata={"ge": 0, "help": "seeds weights, data and noise"})
    checkpoint_every: int = field(default=200, metadata={"ge": 1, "help": "steps between resumable checkpoints"})
    resume: bool = field(default=True, metadata={"help": "continue from out_dir/state.* if present"})
    threads: int = field(default=2, metadata={"ge": 1, "help": "torch CPU threads"})

    def __post_init__(self):
        for name in ("steps", "batch_size", "checkpoint_every", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if not 0 <= self.cond_dropout < 1:
            raise ValueError(f"cond_dropout={self.cond_dropout} must be in [0, 1)")
        if not 0 <= self.caption_noise <= 1:
            raise ValueError(f"caption_noise={self.caption_noise} must be in [0, 1]")
        check_denoiser(self.denoiser, self.video)
        if self.caption_noise and not self.video:
            raise ValueError("caption_noise applies to the video world only (video: true)")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay={self.ema_decay} must be in [0, 1)")
        allowed = MOTION_TEMPLATES if self.video else TEMPLATES
        unknown = [t for t in self.templates if t not in allowed]
        if unknown:
            raise ValueError(f"templates {unknown} not allowed; choose from {', '.join(allowed)}")

    @property
    def template_names(self) -> tuple[str, ...]:
        return tuple(self.templates) or (MOTION_TEMPLATES if self.video else TEMPLATES)


def flow_matching_loss(velocity_fn, x0, noise, sigma):
    """Rectified-flow loss: mean ||v(x_sigma, sigma) - (noise - x0)||^2. Returns (loss, metrics)."""
    s = sigma.view(-1, *([1] * (x0.ndim - 1)))
    x_sigma = (1 - s) * x0 + s * noise
    v = velocity_fn(x_sigma, sigma)
    loss = (v.float() - (noise - x0)).pow(2).mean()
    return loss, {"loss": loss.item()}


def flow_matching_step(velocity_fn, x0, noise, sigma, opt, params, bf16: bool = False, max_norm: float = 1.0) -> dict:
    """One AdamW step of `flow_matching_loss` (bfloat16 autocast for the forward if asked, gradient norm clipped
    at max_norm), the step pretraining and the ground-truth control of bench/video_diagnostics.py share."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss, metrics = flow_matching_loss(velocity_fn, x0, noise, sigma)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    opt.step()
    return metrics


def batch_for_step(cfg: PretrainConfig, step: int):
    """The (prompts, x0, noise, sigma) of one step, a pure function of (seed, step)."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    if cfg.video:
        specs = sample_motion_specs(cfg.batch_size, "seen", cfg.template_names, generator=g)
        x0 = render_clips(specs, g).transpose(1, 2) * 2 - 1  # [B, 3, F, H, W], the adapter's latent layout
        if cfg.caption_noise:  # own stream, so caption_noise=0 draws exactly the batches it always did
            rng = random.Random(f"caption-noise/{cfg.seed}/{step}")
            specs = [misdescribe_direction(s, rng) if rng.random() < cfg.caption_noise else s for s in specs]
    else:
        specs = sample_specs(cfg.batch_size, "seen", cfg.template_names, generator=g)
        x0 = render_batch(specs, g) * 2 - 1
    drop = torch.rand(cfg.batch_size, generator=g) < cfg.cond_dropout
    prompts = ["" if d else s.prompt for s, d in zip(specs, drop.tolist(), strict=True)]
    noise = torch.randn(x0.shape, generator=g)
    sigma = torch.sigmoid(torch.randn(cfg.batch_size, generator=g) * cfg.logit_normal_std)
    return prompts, x0, noise, sigma


def _lr(cfg: PretrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


STATE = "state"  # out_dir/state.safetensors + state.json: the resumable training state, as data


class _Trainable(torch.nn.Module):
    """UNet + text encoder as one module so optimizer, EMA and checkpoints treat them together."""

    def __init__(self, adapter: WorldAdapter):
        super().__init__()
        self.unet, self.text_encoder = adapter.denoiser, adapter.text_encoder


def pretrain(cfg: PretrainConfig, progress: bool = True) -> Path:
    """Train and write out_dir/model.safetensors (EMA weights). Returns its path."""
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    adapter_cls = WorldVideoAdapter if cfg.video else WorldAdapter
    adapter = adapter_cls.random(cfg.seed, token_embedding_std=cfg.token_embedding_std, denoiser=cfg.denoiser)
    adapter.text_encoder.requires_grad_(True)
    net = _Trainable(adapter).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = 0
    if cfg.resume and (out / f"{STATE}.json").exists():  # data only: safetensors + JSON, nothing unpickled
        state = load_trainer_state(out, STATE)
        if int(state["saved_step"]) != state["step"]:  # the tensors' own copy of the step: one save, or a crash
            raise ValueError(f"{out}: {STATE}.json and {STATE}.safetensors are from different saves (a crash while "
                             "saving); set resume=false to start again")
        net.load_state_dict(state["net"])
        ema.load_state_dict(state["ema"])
        load_optimizer_state(opt, state["opt"])
        start = int(state["step"])
    elif cfg.resume and (out / "state.pt").exists():
        raise ValueError(f"{out}/state.pt is a pickle of an older visalign, which resume does not load; set "
                         "resume=false (or another out_dir) to start again")

    def velocity(x, sigma, prompts):
        cond = adapter.text_features(prompts)
        return adapter._velocity(x, sigma, cond, 1.0)

    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="pretrain", disable=not progress)
    began, loss_avg = time.perf_counter(), None
    for step in bar:
        prompts, x0, noise, sigma = batch_for_step(cfg, step)
        for group in opt.param_groups:
            group["lr"] = _lr(cfg, step)
        metrics = flow_matching_step(lambda x, s, p=prompts: velocity(x, s, p), x0, noise, sigma, opt, net.parameters(),
                                     bf16=cfg.bf16)
        with torch.no_grad():
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))  # warm-up so early EMA is not the init
            for p_ema, p in zip(ema.parameters(), net.parameters(), strict=True):
                p_ema.lerp_(p, 1 - decay)
        loss_avg = metrics["loss"] if loss_avg is None else 0.98 * loss_avg + 0.02 * metrics["loss"]
        bar.set_postfix(loss=f"{loss_avg:.4f}", lr=f"{_lr(cfg, step):.1e}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            save_trainer_state({"net": net.state_dict(), "ema": ema.state_dict(), "opt": optimizer_state(opt),
                                "step": step + 1, "saved_step": torch.tensor(step + 1)}, out, STATE)
    final = adapter_cls(ema.unet, ema.text_encoder, adapter.vocab)
    minutes = (time.perf_counter() - began) / 60
    # The video model is stored in float16 (10 MB instead of 20 MB shipped); loading casts back to float32.
    path = final.save_pretrained(out / "model.safetensors",
                                 {"steps": str(cfg.steps), "seed": str(cfg.seed), "minutes": f"{minutes:.1f}"},
                                 dtype=torch.float16 if cfg.video else None)
    return path
