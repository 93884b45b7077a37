"""Wan2.2 text-to-video (diffusers `WanPipeline`): TI2V-5B and T2V-A14B, one adapter for both layouts.

- TI2V-5B: one transformer over the 48-channel high-compression VAE (16x spatial, 4x temporal; size multiple 32
  with the 2x2 patch), with `expand_timesteps`: the transformer takes one timestep per patch token.
- T2V-A14B: two experts, `transformer` for high noise and `transformer_2` for low noise, switched where the
  timestep crosses `boundary_ratio * num_train_timesteps`; the low-noise expert has its own CFG scale
  (`guidance_scale_2`).

The trainers see one denoiser: for A14B a `WanExperts` module holding both experts whose forward sends each sample
to the expert WanPipeline.__call__ picks for its timestep, so one batch may mix them. `experts` says which experts
train (LoRA or full weights); the others stay frozen. Text encoding (umT5) and the VAE are the pipeline's own.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from visalign.models.base import Conditioning
from visalign.models.diffusers_adapters import WanAdapter, _freeze_all_but_denoiser

# diffusers is imported where a pipeline is built (seconds to import; the model registry imports this module).

EXPERTS = {"high": ("transformer",), "low": ("transformer_2",), "both": ("transformer", "transformer_2")}
# One diffusers LoRA file per expert, each in WanLoraLoaderMixin's format ("transformer." keys): diffusers loads the
# second with `pipe.load_lora_weights(dir, weight_name=..., load_into_transformer_2=True)`.
LORA_FILES = {"transformer": "pytorch_lora_weights.safetensors",
              "transformer_2": "pytorch_lora_weights_transformer_2.safetensors"}


def high_noise(timestep: Tensor, boundary_timestep: float) -> Tensor:
    """Which samples the high-noise expert denoises, as WanPipeline.__call__ decides: t >= boundary_timestep.
    `timestep` is [B], or [B, tokens] with per-token timesteps (the sample's step timestep is their maximum)."""
    t = timestep if timestep.ndim == 1 else timestep.flatten(1).amax(1)
    return t >= boundary_timestep


class WanExperts(nn.Module):
    """Wan2.2's two experts as one module, so trainers handle one denoiser (its parameters, accelerate's prepare,
    FSDP wrapping, gradient checkpointing). `trained` names the experts that may take gradients."""

    def __init__(self, transformer: nn.Module, transformer_2: nn.Module, boundary_timestep: float,
                 trained: tuple[str, ...] = EXPERTS["both"]):
        super().__init__()
        self.transformer = transformer
        self.transformer_2 = transformer_2
        self.boundary_timestep = boundary_timestep
        self.trained = trained

    @property
    def config(self):
        """The experts' shared architecture (patch size, channels), as WanAdapter reads it."""
        return self.transformer.config

    def experts(self) -> dict[str, nn.Module]:
        return {"transformer": self.transformer, "transformer_2": self.transformer_2}

    def forward(self, hidden_states: Tensor, timestep: Tensor, encoder_hidden_states: Tensor,
                return_dict: bool = False) -> tuple[Tensor]:
        high = high_noise(timestep, self.boundary_timestep)
        groups = [(e, rows) for e, rows in ((self.transformer, torch.nonzero(high).flatten()),
                                            (self.transformer_2, torch.nonzero(~high).flatten())) if len(rows)]
        if len(groups) == 1:  # the whole batch on one expert: exactly the pipeline's call
            out = groups[0][0](hidden_states=hidden_states, timestep=timestep,
                               encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
        else:
            outs = [e(hidden_states=hidden_states[r], timestep=timestep[r],
                      encoder_hidden_states=encoder_hidden_states[r], return_dict=False)[0] for e, r in groups]
            order = torch.cat([r for _, r in groups])
            out = torch.cat(outs)[torch.argsort(order)]
        if torch.is_grad_enabled() and not out.requires_grad and any(p.requires_grad for p in self.parameters()):
            # Only frozen experts ran: the output does not depend on the trained weights, whose gradient is 0. Marked
            # so that a trainer's backward of a loss on it runs (and leaves their gradients untouched).
            out.requires_grad_()
        return (out,)

    def requires_grad_(self, requires_grad: bool = True) -> WanExperts:
        """Only the trained experts ever take gradients (full fine-tuning of one expert); the others stay frozen."""
        for name, expert in self.experts().items():
            expert.requires_grad_(requires_grad and name in self.trained)
        return self

    def enable_gradient_checkpointing(self) -> None:
        for name in self.trained:
            self.experts()[name].enable_gradient_checkpointing()

    def save_pretrained(self, directory: str | os.PathLike, **kwargs) -> None:
        """The trained experts in diffusers' pipeline layout (`directory/transformer`, `directory/transformer_2`)."""
        for name in self.trained:
            self.experts()[name].save_pretrained(Path(directory) / name, **kwargs)


class Wan22Adapter(WanAdapter):
    """Wan2.2 text-to-video (WanPipeline): TI2V-5B (one expert, 48-channel VAE, per-token timesteps) or T2V-A14B
    (high- and low-noise experts switched at `boundary_ratio`).

    Options: `experts` ("both", "high", "low") says which experts train, LoRA or full (one-expert layouts: "both"
    or "high"). `guidance_scale_2` is the low-noise expert's CFG scale; None uses the `guidance_scale` of each call,
    as WanPipeline does when it is not given. As in WanPipeline, CFG runs only when `guidance_scale` > 1: then
    high-noise samples are guided with `guidance_scale` and low-noise ones with `guidance_scale_2`.
    """

    name = "wan22"

    def __init__(self, pipe, max_sequence_length: int = 512, experts: str = "both",
                 guidance_scale_2: float | None = None):
        if experts not in EXPERTS:
            raise ValueError(f"experts={experts!r}: expected one of {', '.join(EXPERTS)}")
        ratio = pipe.config.boundary_ratio
        if ratio is None:
            if pipe.transformer_2 is not None:
                raise ValueError("this Wan2.2 pipeline has a transformer_2 but no boundary_ratio: WanPipeline "
                                 "never runs it")
            if experts == "low":
                raise ValueError("experts='low' needs a two-expert checkpoint (T2V-A14B); this one has one "
                                 "transformer: use 'both'")
            if guidance_scale_2 is not None:  # WanPipeline.check_inputs refuses it too
                raise ValueError("guidance_scale_2 needs a two-expert checkpoint (boundary_ratio set)")
        elif pipe.transformer is None or pipe.transformer_2 is None:
            raise ValueError("boundary_ratio is set but an expert is missing: Wan2.2 A14B needs transformer and "
                             "transformer_2")
        if guidance_scale_2 is not None and guidance_scale_2 < 0:
            raise ValueError(f"guidance_scale_2={guidance_scale_2} must be >= 0")
        _freeze_all_but_denoiser(pipe)
        self.pipe = pipe
        self.max_sequence_length = max_sequence_length
        self.guidance_scale_2 = guidance_scale_2
        self.boundary_timestep = None if ratio is None else ratio * pipe.scheduler.config.num_train_timesteps
        if ratio is None:
            self.denoiser = pipe.transformer
        else:
            self.denoiser = WanExperts(pipe.transformer, pipe.transformer_2, self.boundary_timestep, EXPERTS[experts])
            self.partial_passes = True  # each pass runs one expert
            self.denoiser.requires_grad_(True)  # as a lone transformer starts: the trained experts, not the others
        self.trained = EXPERTS[experts] if ratio is not None else ("transformer",)

    def _velocity(self, latents, sigma, embeds, guidance_scale):
        timestep = sigma * self.pipe.scheduler.config.num_train_timesteps
        if self.pipe.config.expand_timesteps:
            # WanPipeline.__call__ (TI2V-5B): one timestep per patch token; in text-to-video its first-frame mask is
            # all ones, so every token of a sample gets the sample's timestep.
            f, h, w = latents.shape[2:]
            _, ph, pw = self.denoiser.config.patch_size
            timestep = timestep[:, None].expand(-1, f * (h // ph) * (w // pw))
        return self.net(hidden_states=latents, timestep=timestep,
                        encoder_hidden_states=embeds["encoder_hidden_states"].to(latents.dtype),
                        return_dict=False)[0]

    def predict_velocity(self, latents: Tensor, sigma: Tensor | float, cond: Conditioning,
                         guidance_scale: float = 1.0) -> Tensor:
        low_scale = self.guidance_scale_2
        if low_scale is None or low_scale == guidance_scale or guidance_scale <= 1:
            # One scale for every sample (WanPipeline: guidance_scale_2 defaults to guidance_scale, and it runs CFG
            # only when guidance_scale > 1, whatever guidance_scale_2 is).
            return super().predict_velocity(latents, sigma, cond, guidance_scale)
        if cond.uncond is None:
            raise ValueError("guidance_scale > 1 needs negative-prompt embeddings: encode_prompts(..., cfg=True)")
        batch = latents.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=latents.device)
        sigma = sigma.expand(batch) if sigma.ndim == 0 else sigma
        if sigma.shape != (batch,):
            raise ValueError(f"sigma has shape {tuple(sigma.shape)}; expected a scalar or ({batch},)")
        x = latents.to(self.dtype)
        v_cond = self._velocity(x, sigma, cond.cond, guidance_scale)
        v_uncond = self._velocity(x, sigma, cond.uncond, guidance_scale)
        # WanPipeline.__call__: noise_uncond + current_guidance_scale * (noise_pred - noise_uncond), per expert
        high = high_noise(sigma * self.pipe.scheduler.config.num_train_timesteps, self.boundary_timestep)
        v = torch.where(high.view(-1, *[1] * (x.ndim - 1)), self.guide(v_cond, v_uncond, guidance_scale),
                        self.guide(v_cond, v_uncond, low_scale))
        return v.float()

    # ---- LoRA: one diffusers file per trained expert -------------------------------------------------------
    def _experts(self) -> dict[str, nn.Module]:
        """The experts by pipeline component name, read from `denoiser` (which a trainer may swap for a gathered
        copy while it exports)."""
        d = self.denoiser
        return d.experts() if isinstance(d, WanExperts) else {"transformer": d}

    def _with_lora(self, adapter_name: str | None = None) -> dict[str, nn.Module]:
        return {n: e for n, e in self._experts().items()
                if getattr(e, "peft_config", None) and (adapter_name is None or adapter_name in e.peft_config)}

    def add_lora(self, rank: int = 32, alpha: float | None = None, target_modules: list[str] | None = None,
                 init_lora_weights: str | bool = "gaussian", adapter_name: str = "default") -> None:
        """Attach a LoRA adapter to each trained expert (`experts`) and freeze everything else."""
        from peft import LoraConfig  # peft takes seconds to import; only LoRA needs it

        config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank,
                            target_modules=list(target_modules or self.default_lora_targets),
                            init_lora_weights=init_lora_weights)
        self.denoiser.requires_grad_(False)
        for name in self.trained:
            self._experts()[name].add_adapter(config, adapter_name=adapter_name)

    @property
    def has_lora(self) -> bool:
        return bool(self._with_lora())

    def save_lora(self, directory: str | os.PathLike, adapter_name: str = "default") -> Path:
        """Each expert's adapter as its own diffusers-format file (`LORA_FILES`); returns the directory."""
        from peft.utils import get_peft_model_state_dict  # as above

        experts = self._with_lora(adapter_name)
        if not experts:
            raise ValueError(f"no LoRA adapter {adapter_name!r} to save")
        for name, expert in experts.items():
            self.pipe.save_lora_weights(directory, transformer_lora_layers=get_peft_model_state_dict(
                expert, adapter_name=adapter_name), transformer_lora_adapter_metadata=expert.peft_config[
                adapter_name].to_dict(), weight_name=LORA_FILES[name])
        return Path(directory)

    def load_lora(self, path: str | os.PathLike, adapter_name: str = "default") -> None:
        """Load diffusers-format LoRA: a directory with one file per expert (`LORA_FILES`), or one file, which goes
        to `transformer_2` when named as its file and to `transformer` otherwise."""
        path = Path(path)
        if not path.exists():
            raise ValueError(f"LoRA path {str(path)!r} does not exist")
        if path.is_dir():
            files = {n: path / f for n, f in LORA_FILES.items() if (path / f).is_file()}
            if not files:
                raise ValueError(f"LoRA directory {str(path)!r} holds none of {', '.join(LORA_FILES.values())}")
        else:
            files = {"transformer_2" if path.name == LORA_FILES["transformer_2"] else "transformer": path}
        if "transformer_2" in files and "transformer_2" not in self._experts():
            raise ValueError(f"{files['transformer_2']} is a low-noise expert's LoRA; this checkpoint has one expert")
        for name, file in files.items():
            self.pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=adapter_name,
                                        load_into_transformer_2=name == "transformer_2")
        self.denoiser.requires_grad_(False)

    def merge_lora(self) -> None:
        for expert in self._with_lora().values():
            expert.fuse_lora()
            expert.unload_lora()

    @contextlib.contextmanager
    def lora_disabled(self):
        """The base experts (the reference policy) while the adapters stay attached."""
        experts = list(self._with_lora().values())
        for expert in experts:
            expert.disable_adapters()
        try:
            yield
        finally:
            for expert in experts:
                expert.enable_adapters()


# ---- tiny random-weight builds (tests, and anyone without weights) -------------------------------------------
def _tiny_transformer(in_channels: int, seed: int):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                 in_channels=in_channels, out_channels=in_channels, text_dim=32, freq_dim=256,
                                 ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                 rope_max_seq_len=32).eval()


def tiny_wan22_5b_pipeline(seed: int = 0):
    """A WanPipeline in TI2V-5B's layout at tiny size: the 48-channel residual VAE with 2x2 patchify (16x spatial,
    4x temporal; size multiple 32), one transformer, `expand_timesteps`, shift 5 (the 5B's)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

    from visalign.models.tiny import _t5, _t5_tokenizer

    torch.manual_seed(seed)
    # Not the identity statistics: a test then sees whether latents are scaled by them.
    vae = AutoencoderKLWan(base_dim=3, z_dim=48, in_channels=12, out_channels=12, is_residual=True, patch_size=2,
                           latents_mean=[round(-0.5 + i / 47, 4) for i in range(48)],
                           latents_std=[round(0.5 + 1.5 * i / 47, 4) for i in range(48)], dim_mult=[1, 1, 1, 1],
                           num_res_blocks=1, scale_factor_spatial=16, scale_factor_temporal=4,
                           temperal_downsample=[False, True, True]).eval()
    torch.manual_seed(seed + 1)
    text_encoder = _t5(32)
    return WanPipeline(tokenizer=_t5_tokenizer(), text_encoder=text_encoder, vae=vae,
                       transformer=_tiny_transformer(48, seed + 2),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), expand_timesteps=True)


def tiny_wan22_a14b_pipeline(seed: int = 0):
    """A WanPipeline in T2V-A14B's layout at tiny size: two experts switched at boundary_ratio 0.875 (A14B's), the
    Wan2.1 VAE (8x spatial; size multiple 16), shift 3, so a 3-step schedule runs step 0 on the high-noise expert
    and the rest on the low-noise one."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

    from visalign.models.tiny import _t5, _t5_tokenizer

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    torch.manual_seed(seed + 1)
    text_encoder = _t5(32)
    return WanPipeline(tokenizer=_t5_tokenizer(), text_encoder=text_encoder, vae=vae,
                       transformer=_tiny_transformer(16, seed + 2), transformer_2=_tiny_transformer(16, seed + 3),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), boundary_ratio=0.875)


def tiny_wan22_5b(seed: int = 0, **options):
    return Wan22Adapter(tiny_wan22_5b_pipeline(seed), **{"max_sequence_length": 32, **options})


def tiny_wan22_a14b(seed: int = 0, **options):
    return Wan22Adapter(tiny_wan22_a14b_pipeline(seed), **{"max_sequence_length": 32, **options})
