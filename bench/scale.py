"""What a training step costs at real size: Flow-GRPO, DiffusionNFT and AWM steps on full-size denoisers built from
their configs with random weights (no download), against a plain forward + backward of the same denoiser on the
same batch.

    .venv/bin/python bench/scale.py --small          # CPU: the same architectures scaled down (a test runs this)
    .venv/bin/python bench/scale.py                  # a GPU: full size, 512 px (video: the Wan config's size)
    .venv/bin/python bench/scale.py --models sd35-medium --finetune lora --batches 1 2

The configs are the checkpoints' transformer/config.json, shipped in bench/scale_configs/. Each step is what the
trainer runs per micro-batch, through the library's own pieces (visalign.sampling.steps, visalign.trainers.losses):

- plain:      v = f(x_t); mean (v - target)^2; backward                      (the floor every ratio divides by)
- flow_grpo:  v = f(x_t) on the stored transition (with CFG where the recipe trains with it), the SDE step's mean,
              Gaussian log-prob of the stored x_next, PPO-clipped GRPO loss; backward; with KL, one no-grad
              reference pass (LoRA disabled / the frozen copy)
- diffusion_nft: a no-grad pass of the old policy and one with grad at a fresh noise level; NFT loss; backward
- awm:        v = f(x_t) at a fresh noise level; advantage-weighted matching loss; backward

then the optimizer step (AdamW; trained weights fp32, the frozen base in --dtype, compute under autocast, as the
trainer does). Printed per model, fine-tuning mode and recipe: time per step and peak memory, each as a ratio to
plain; on a GPU also the absolute peak and, from batch 1 and 2, the batch that fits in 80 GB (fixed + per-sample,
linear). The figures cover the denoiser, its trained copy's gradients and optimizer state and the reference /
old-policy passes, not the text encoders, VAE or reward models (those can be freed or offloaded while training).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

CONFIGS = Path(__file__).resolve().parent / "scale_configs"
RECIPES = ("plain", "flow_grpo", "diffusion_nft", "awm")
GIB = 2**30


@dataclass(frozen=True)
class Family:
    """One denoiser architecture: its config file, how a batch of inputs looks and how it is called."""

    name: str
    config: str
    cls: str
    cfg_in_training: bool  # Flow-GRPO trains with classifier-free guidance (the batch doubles)
    lora_targets: tuple[str, ...]
    small: dict  # config overrides for --small

    def build(self, small: bool, dtype: torch.dtype, device: str) -> torch.nn.Module:
        import diffusers

        config = json.loads((CONFIGS / self.config).read_text())
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        if small:
            config.update(self.small)
        torch.manual_seed(0)
        with torch.device(device):
            model = getattr(diffusers, self.cls).from_config(config)
        model.to(dtype)
        keep = getattr(model, "_keep_in_fp32_modules", None) or []  # as from_pretrained(torch_dtype=...) keeps them
        for name, module in model.named_modules():
            if any(k in name.split(".") for k in keep):
                module.float()
        return model


def _sd3_inputs(model, batch: int, small: bool, device) -> tuple[torch.Tensor, dict]:
    c = model.config
    side = 8 if small else 64  # 512 px through the 8x VAE
    x = torch.randn(batch, c.in_channels, side, side, device=device)
    tokens = 16 if small else 333  # CLIP 77 + T5 256 (flow_grpo's max_sequence_length for SD3)
    cond = {"encoder_hidden_states": torch.randn(batch, tokens, c.joint_attention_dim, device=device),
            "pooled_projections": torch.randn(batch, c.pooled_projection_dim, device=device)}
    return x, cond


def _sd3_call(model, x, sigma, cond):
    return model(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=cond["encoder_hidden_states"],
                 pooled_projections=cond["pooled_projections"], return_dict=False)[0]


def _flux2_inputs(model, batch: int, small: bool, device) -> tuple[torch.Tensor, dict]:
    c = model.config
    side = 4 if small else 32  # 512 px: the 16x VAE + 2x2 packing of FLUX.2 gives 32 x 32 tokens
    tokens = 16 if small else 512
    x = torch.randn(batch, side * side, c.in_channels, device=device)
    ids = torch.zeros(side, side, 4, device=device)
    ids[..., 1] = torch.arange(side, device=device)[:, None]
    ids[..., 2] = torch.arange(side, device=device)[None, :]
    txt = torch.zeros(tokens, 4, device=device)
    txt[:, 3] = torch.arange(tokens, device=device)
    cond = {"encoder_hidden_states": torch.randn(batch, tokens, c.joint_attention_dim, device=device),
            "img_ids": ids.reshape(1, -1, 4).expand(batch, -1, -1), "txt_ids": txt[None].expand(batch, -1, -1)}
    return x, cond


def _flux2_call(model, x, sigma, cond):
    return model(hidden_states=x, timestep=sigma, encoder_hidden_states=cond["encoder_hidden_states"],
                 img_ids=cond["img_ids"], txt_ids=cond["txt_ids"], return_dict=False)[0]


def _wan_inputs(model, batch: int, small: bool, device) -> tuple[torch.Tensor, dict]:
    c = model.config
    # configs/flow_grpo_wan21_1.3b.yaml: 33 frames of 240 x 416 -> latents of 9 x 30 x 52 (4x time, 8x space)
    frames, h, w = (3, 8, 8) if small else (9, 30, 52)
    x = torch.randn(batch, c.in_channels, frames, h, w, device=device)
    tokens = 16 if small else 512
    cond = {"encoder_hidden_states": torch.randn(batch, tokens, c.text_dim, device=device)}
    return x, cond


def _wan_call(model, x, sigma, cond):
    return model(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=cond["encoder_hidden_states"],
                 return_dict=False)[0]


def _qwen_inputs(model, batch: int, small: bool, device) -> tuple[torch.Tensor, dict]:
    c = model.config
    side = 4 if small else 32  # 512 px: the 8x VAE + 2x2 packing gives 32 x 32 tokens of 64 channels
    tokens = 16 if small else 256
    x = torch.randn(batch, side * side, c.in_channels, device=device)
    cond = {"encoder_hidden_states": torch.randn(batch, tokens, c.joint_attention_dim, device=device),
            "encoder_hidden_states_mask": torch.ones(batch, tokens, dtype=torch.long, device=device),
            "side": side}
    return x, cond


def _qwen_call(model, x, sigma, cond):
    side = cond["side"]
    return model(hidden_states=x, timestep=sigma, encoder_hidden_states=cond["encoder_hidden_states"],
                 encoder_hidden_states_mask=cond["encoder_hidden_states_mask"],
                 img_shapes=[[(1, side, side)]] * x.shape[0], return_dict=False)[0]


FAMILIES = {
    "sd35-medium": (Family("sd35-medium", "sd35_medium.json", "SD3Transformer2DModel", True,
                           ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                            "to_add_out"),
                           {"num_layers": 2, "attention_head_dim": 8, "num_attention_heads": 2,
                            "joint_attention_dim": 32, "caption_projection_dim": 16, "pooled_projection_dim": 16,
                            "pos_embed_max_size": 16, "sample_size": 8, "dual_attention_layers": [0]}),
                    _sd3_inputs, _sd3_call),
    "flux2-klein-4b": (Family("flux2-klein-4b", "flux2_klein_4b.json", "Flux2Transformer2DModel", False,
                              ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                               "to_add_out", "to_qkv_mlp_proj"),
                              {"num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
                               "num_attention_heads": 2, "joint_attention_dim": 32, "in_channels": 16,
                               "out_channels": 16, "axes_dims_rope": [4, 4, 4, 4], "timestep_guidance_channels": 32}),
                       _flux2_inputs, _flux2_call),
    "wan21-1.3b": (Family("wan21-1.3b", "wan21_t2v_1_3b.json", "WanTransformer3DModel", True,
                          ("to_q", "to_k", "to_v", "to_out.0"),
                          {"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 8, "ffn_dim": 32,
                           "text_dim": 32, "freq_dim": 16}),
                   _wan_inputs, _wan_call),
    # Not in the default set: no visalign adapter yet, and 20 B parameters (full fine-tuning cannot fit one GPU).
    "qwen-image": (Family("qwen-image", "qwen_image.json", "QwenImageTransformer2DModel", True,
                          ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                           "to_add_out"),
                          {"num_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2,
                           "joint_attention_dim": 32, "in_channels": 16, "out_channels": 4,
                           "axes_dims_rope": [4, 6, 6]}),
                   _qwen_inputs, _qwen_call),
}
DEFAULT_MODELS = ["sd35-medium", "flux2-klein-4b", "wan21-1.3b"]


def _peak_bytes(device: str) -> int:
    """A GPU: peak allocated memory. CPU: peak resident memory (VmHWM, which `_reset_peak` resets)."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _resident_bytes() -> int:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak(device: str) -> int:
    """Start a new peak; returns what is held now (a CPU peak is measured above it)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return 0
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak resident size restarts from the current
    return _resident_bytes()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _doubled(key: str, value):
    """A conditioning entry for the CFG batch [cond, uncond]: zeros stand for the empty prompt's embedding."""
    if not isinstance(value, torch.Tensor):
        return value
    if key.endswith(("_ids", "_mask")):  # positions and masks are the same for both halves
        return torch.cat([value, value])
    return torch.cat([value, torch.zeros_like(value)])


class Arm:
    """One denoiser prepared for training as the trainer prepares it (LoRA or full, fp32 trained weights,
    optional gradient checkpointing), with the recipes' per-micro-batch steps."""

    def __init__(self, family: str, finetune: str, small: bool, dtype: torch.dtype, device: str,
                 checkpointing: bool, lora_rank: int):
        self.family, self.inputs, self.call = FAMILIES[family]
        self.device, self.dtype, self.small = device, dtype, small
        model = self.family.build(small, dtype, device).requires_grad_(False)
        if finetune == "lora":
            from peft import LoraConfig

            model.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian",
                                         target_modules=list(self.family.lora_targets)))
        else:
            model.requires_grad_(True)
        if checkpointing:
            model.enable_gradient_checkpointing()
        self.params = [p for p in model.parameters() if p.requires_grad]
        for p in self.params:  # as the trainer: trained weights stay fp32 under a half-precision base
            p.data = p.data.float()
        self.model, self.finetune = model.train(), finetune
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-6)
        self.n_params = sum(p.numel() for p in model.parameters())
        self.n_trained = sum(p.numel() for p in self.params)

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device, dtype=self.dtype)

    def velocity(self, x, sigma, cond, cfg: bool):
        if cfg:  # cond and uncond batched, as the trainer's CFG pass (guidance 4.5)
            both = self.call(self.model, torch.cat([x, x]), torch.cat([sigma, sigma]),
                             {k: _doubled(k, v) for k, v in cond.items()})
            v_cond, v_uncond = both.float().chunk(2)
            return v_uncond + 4.5 * (v_cond - v_uncond)
        return self.call(self.model, x, sigma, cond).float()

    @contextlib.contextmanager
    def reference(self):
        """The reference / old policy: LoRA switched off (full fine-tuning would use a frozen copy; the pass costs
        the same, the copy's memory is the base weights once more)."""
        if self.finetune == "lora":
            self.model.disable_adapters()
            try:
                yield
            finally:
                self.model.enable_adapters()
        else:
            yield

    def step(self, recipe: str, batch: int) -> None:
        from visalign.sampling.steps import sde_mean_std, transition_log_prob
        from visalign.trainers.losses import awm_loss, grpo_loss, nft_loss, nft_reward_weight

        x0, cond = self.inputs(self.model, batch, self.small, self.device)
        noise = torch.randn_like(x0)
        sigma = torch.full((batch,), 0.7, device=self.device)
        s = sigma.view(-1, *([1] * (x0.ndim - 1)))
        x_t = (1 - s) * x0 + s * noise
        adv = torch.randn(batch, device=self.device)
        with self.autocast():
            if recipe == "plain":
                loss = (self.call(self.model, x_t, sigma, cond).float() - (noise - x0)).pow(2).mean()
            elif recipe == "flow_grpo":
                cfg = self.family.cfg_in_training
                with torch.no_grad(), self.reference():
                    ref_mean, _ = sde_mean_std("flow_grpo", x_t, self.velocity(x_t, sigma, cond, cfg), sigma,
                                               sigma - 0.1, 0.7, sigma_guard=0.9)
                mean, std = sde_mean_std("flow_grpo", x_t, self.velocity(x_t, sigma, cond, cfg), sigma,
                                         sigma - 0.1, 0.7, sigma_guard=0.9)
                x_next = (mean + std * torch.randn_like(mean)).detach()
                lp = transition_log_prob("flow_grpo", x_next, mean, std)
                loss, _ = grpo_loss(lp, lp.detach(), adv, 1e-4, mean=mean, ref_mean=ref_mean, std=std, kl_beta=0.04)
            elif recipe == "diffusion_nft":
                with torch.no_grad(), self.reference():
                    v_old = self.velocity(x_t, sigma, cond, False)
                v = self.velocity(x_t, sigma, cond, False)
                loss, _ = nft_loss(v, v_old, x_t.float(), x0.float(), sigma, nft_reward_weight(adv), beta=1.0)
            elif recipe == "awm":
                loss, _ = awm_loss(self.velocity(x_t, sigma, cond, False), (noise - x0).float(), sigma, adv)
            else:
                raise ValueError(f"unknown recipe {recipe!r}; allowed: {', '.join(RECIPES)}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def peak(self, recipe: str, batch: int) -> int:
        """Peak memory of one step after a warm-up step: on a GPU the absolute peak (weights included: what has to
        fit), on the CPU the peak above what the process held before the step (imports, weights, optimizer)."""
        self.step(recipe, batch)  # warm-up: optimizer state exists from here on, as in training
        held = _reset_peak(self.device)
        self.step(recipe, batch)
        _sync(self.device)
        return _peak_bytes(self.device) - held


def run_arm(family: str, finetune: str, recipes: list[str], batches: list[int], args) -> list[dict]:
    """Per batch: each recipe's peak memory (a recipe that runs out of memory is reported, not timed), then the
    recipes that fit timed interleaved round by round against the plain pass (`bench/paired.py`)."""
    from paired import compare

    device = "cuda" if torch.cuda.is_available() and not args.small else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    arm = Arm(family, finetune, args.small, dtype, device, args.checkpointing, args.lora_rank)
    rows = []
    for batch in batches:
        peaks = {}
        for recipe in recipes:
            try:
                peaks[recipe] = arm.peak(recipe, batch)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
        timed = [r for r in recipes if r in peaks]
        report = None
        if "plain" in timed and len(timed) > 1:
            report = compare({r: (lambda r=r, b=batch: arm.step(r, b)) for r in timed}, rounds=args.repeats, warmup=0,
                             sync=lambda: _sync(device))
        for recipe in recipes:
            row = {"model": family, "finetune": finetune, "recipe": recipe, "batch": batch,
                   "params": arm.n_params, "trained": arm.n_trained}
            if recipe not in peaks:
                rows.append({**row, "seconds": float("nan"), "ratio": float("nan"), "spread": None,
                             "peak": float("nan"), "oom": True})
                continue
            result = next((a for a in report.arms if a.name == recipe), None) if report else None
            rows.append({**row, "peak": peaks[recipe],
                         "seconds": result.median_seconds if result else float("nan"),
                         "ratio": result.median_ratio if result else float("nan"),
                         "spread": list(result.spread) if result else None})
    return rows


def table(rows: list[dict], gpu: bool) -> str:
    plain = {(r["model"], r["finetune"], r["batch"]): r for r in rows if r["recipe"] == "plain"}
    lines = ["| model | fine-tune | recipe | batch | time / plain (median; spread) | peak memory / plain |"
             + (" peak GiB | batch fitting 80 GB |" if gpu else ""),
             "|---|---|---|---|---|---|" + ("---|---|" if gpu else "")]
    for r in rows:
        base = plain[r["model"], r["finetune"], r["batch"]]
        memory = f"{r['peak'] / base['peak']:.2f}" if base["peak"] > 0 else "-"  # tiny CPU arms: no new pages
        time_ratio = "out of memory" if r.get("oom") else (
            f"{r['ratio']:.2f} ({r['spread'][0]:.2f} – {r['spread'][1]:.2f})" if r["spread"] else "n/a")
        line = f"| {r['model']} | {r['finetune']} | {r['recipe']} | {r['batch']} | {time_ratio} | {memory} |"
        if gpu:
            line += f" {r['peak'] / GIB:.1f} | {fits(rows, r)} |"
        lines.append(line)
    return "\n".join(lines)


def fits(rows: list[dict], r: dict, budget: float = 80 * 10**9) -> str:
    """The largest batch whose peak stays within the budget, from the peaks at batch 1 and 2 (linear)."""
    same = {x["batch"]: x["peak"] for x in rows if (x["model"], x["finetune"], x["recipe"]) ==
            (r["model"], r["finetune"], r["recipe"])}
    if 1 not in same or 2 not in same or same[1] != same[1]:
        return "n/a"
    per_sample = max(same[2] - same[1], 1)
    fixed = same[1] - per_sample
    return str(max(0, int((budget - fixed) // per_sample))) if fixed < budget else "none"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="scaled-down architectures on the CPU (a test runs this)")
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=list(FAMILIES))
    ap.add_argument("--finetune", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing of the denoiser")
    ap.add_argument("--lora-rank", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds")
    ap.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    if "plain" not in args.recipes:
        args.recipes = ["plain", *args.recipes]
    gpu = torch.cuda.is_available() and not args.small
    rows = []
    for family in args.models:
        for finetune in args.finetune:
            rows += run_arm(family, finetune, args.recipes, args.batches, args)
            print(f"{family} {finetune}: done", file=sys.stderr, flush=True)
    device = torch.cuda.get_device_name() if gpu else "CPU (scaled-down architectures)"
    print(f"# bench/scale.py on {device}; {args.dtype}, checkpointing {'on' if args.checkpointing else 'off'}, "
          f"LoRA rank {args.lora_rank}; ratios to a plain forward + backward of the same denoiser and batch\n")
    for family in args.models:
        r = next(x for x in rows if x["model"] == family)
        print(f"{family}: {r['params']:,} parameters")
    print()
    print(table(rows, gpu))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
