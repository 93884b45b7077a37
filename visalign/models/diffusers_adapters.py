"""Adapters over diffusers pipelines: SD3/SD3.5, FLUX.1 and Wan2.1.

Each adapter holds the pipeline object and reuses its own `encode_prompt` and VAE, so text encoding and
decoding are exactly what diffusers does; only the denoising loop moves into `visalign.sampling`. The tests
check that our ODE sampler reproduces each pipeline's output for the same seed (≤ 1e-4 in fp32).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor

from visalign.models.base import Conditioning, FlowModelAdapter, RequestRules, read_model_config, resolve_model_path

# diffusers' pipelines are imported where a pipeline is loaded: they take seconds to import, and the model
# registry imports this module.


def _calculate_shift(seq_len: int, config) -> float:
    """Resolution-dependent shift mu, as diffusers' `calculate_shift` (FLUX / SD3.5 dynamic shifting):
    a line through (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift)."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    m = (max_shift - base_shift) / (max_len - base_len)
    return seq_len * m + (base_shift - m * base_len)


def _scheduler_sigmas(scheduler, num_steps: int, **kwargs) -> Tensor:
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be >= 1")
    scheduler.set_timesteps(num_steps, device="cpu", **kwargs)
    return scheduler.sigmas.detach().to(torch.float32).clone()


def _freeze_all_but_denoiser(pipe) -> None:
    """Text encoders and VAE are never trained here; only the denoiser (or its LoRA) is."""
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module) and name != "transformer":
            component.requires_grad_(False)


def _load_pipeline(cls, path: str | os.PathLike, torch_dtype: torch.dtype, device: str | torch.device,
                   cpu_offload: bool):
    pipe = cls.from_pretrained(resolve_model_path(path), torch_dtype=torch_dtype)
    if cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    return pipe


class SD3Adapter(FlowModelAdapter):
    """Stable Diffusion 3 / 3.5 (StableDiffusion3Pipeline): MMDiT, CLIP-L + CLIP-G + T5, 16-channel VAE."""

    name = "sd3"
    guidance = "cfg"
    cfg_batched = True
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                            "to_add_out")

    def __init__(self, pipe, max_sequence_length: int = 256):
        _freeze_all_but_denoiser(pipe)
        self.pipe = pipe
        self.denoiser = pipe.transformer
        self.max_sequence_length = max_sequence_length

    @classmethod
    def from_pretrained(cls, path, torch_dtype=torch.float32, device="cpu", cpu_offload=False, **kwargs):
        from diffusers import StableDiffusion3Pipeline

        return cls(_load_pipeline(StableDiffusion3Pipeline, path, torch_dtype, device, cpu_offload), **kwargs)

    @classmethod
    def request_rules(cls, path) -> RequestRules | None:
        """From the checkpoint's configs, without weights (StableDiffusion3Pipeline: VAE factor 2^(levels-1),
        times the transformer's patch size); None when they are not at hand."""
        vae, tr = read_model_config(path, "vae/config.json"), read_model_config(path, "transformer/config.json")
        if vae is None or tr is None:
            return None
        return RequestRules(cls.name, 2 ** (len(vae["block_out_channels"]) - 1) * tr.get("patch_size", 2))

    @property
    def size_multiple(self) -> int:
        return self.pipe.vae_scale_factor * self.denoiser.config.patch_size

    def latent_shape(self, height, width, num_frames=None):
        self.check_request(height, width, num_frames)
        f = self.pipe.vae_scale_factor
        return (self.denoiser.config.in_channels, height // f, width // f)

    def sigmas(self, num_steps, latent_shape):
        config = self.pipe.scheduler.config
        kwargs = {}
        if config.get("use_dynamic_shifting", False):
            p = self.denoiser.config.patch_size
            kwargs["mu"] = _calculate_shift((latent_shape[-2] // p) * (latent_shape[-1] // p),
                                            {"max_shift": 1.16, **config})
        return _scheduler_sigmas(self.pipe.scheduler, num_steps, **kwargs)

    @torch.no_grad()
    def encode_prompts(self, prompts, negative_prompts=None, cfg=True):
        prompts = list(prompts)
        embeds, neg, pooled, neg_pooled = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device, do_classifier_free_guidance=cfg,
            negative_prompt=negative_prompts, max_sequence_length=self.max_sequence_length)
        cond = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        uncond = {"encoder_hidden_states": neg, "pooled_projections": neg_pooled} if cfg else None
        return Conditioning(cond, uncond, prompts)

    def _velocity(self, latents, sigma, embeds, guidance_scale):
        timestep = sigma * self.pipe.scheduler.config.num_train_timesteps
        return self.net(hidden_states=latents, timestep=timestep.to(latents.dtype),
                             encoder_hidden_states=embeds["encoder_hidden_states"].to(latents.dtype),
                             pooled_projections=embeds["pooled_projections"].to(latents.dtype),
                             return_dict=False)[0]

    def decode(self, latents):
        vae = self.pipe.vae
        z = latents.to(vae.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        return (vae.decode(z, return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1)

    def encode(self, pixels, generator=None):
        vae = self.pipe.vae
        dist = vae.encode(pixels.to(vae.dtype) * 2 - 1).latent_dist
        z = dist.sample(generator) if generator is not None else dist.mode()
        return ((z - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor).float()


class FluxAdapter(FlowModelAdapter):
    """FLUX.1 (FluxPipeline): 2x2-packed latents, CLIP pooled + T5 sequence, distilled guidance embedding.

    `guidance_scale` feeds FLUX.1-dev's guidance embedding (ignored by models without one, e.g. schnell);
    FLUX is not run with two-branch CFG here.
    """

    name = "flux"
    guidance = "embedded"
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                            "to_add_out")

    def __init__(self, pipe, max_sequence_length: int = 512):
        _freeze_all_but_denoiser(pipe)
        self.pipe = pipe
        self.denoiser = pipe.transformer
        self.max_sequence_length = max_sequence_length

    @classmethod
    def from_pretrained(cls, path, torch_dtype=torch.float32, device="cpu", cpu_offload=False, **kwargs):
        from diffusers import FluxPipeline

        return cls(_load_pipeline(FluxPipeline, path, torch_dtype, device, cpu_offload), **kwargs)

    @classmethod
    def request_rules(cls, path) -> RequestRules | None:
        """From the VAE's config (FluxPipeline: 2x2 packing over a 2^(levels-1) VAE factor), without weights."""
        vae = read_model_config(path, "vae/config.json")
        return None if vae is None else RequestRules(cls.name, 2 ** (len(vae["block_out_channels"]) - 1) * 2)

    @property
    def size_multiple(self) -> int:
        return self.pipe.vae_scale_factor * 2

    def latent_shape(self, height, width, num_frames=None):
        self.check_request(height, width, num_frames)
        f = self.pipe.vae_scale_factor
        return (self.denoiser.config.in_channels // 4, 2 * (height // (f * 2)), 2 * (width // (f * 2)))

    def sigmas(self, num_steps, latent_shape):
        if num_steps < 1:
            raise ValueError(f"num_steps={num_steps} must be >= 1")
        config = self.pipe.scheduler.config
        seq_len = (latent_shape[-2] // 2) * (latent_shape[-1] // 2)
        # FluxPipeline passes linspace(1, 1/N, N) as sigmas plus the dynamic shift mu.
        sigmas = None if config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / num_steps, num_steps)
        return _scheduler_sigmas(self.pipe.scheduler, num_steps, sigmas=sigmas, mu=_calculate_shift(seq_len, config))

    @torch.no_grad()
    def encode_prompts(self, prompts, negative_prompts=None, cfg=True):
        prompts = list(prompts)
        embeds, pooled, _ = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, device=self.device,
                                                    max_sequence_length=self.max_sequence_length)
        return Conditioning({"encoder_hidden_states": embeds, "pooled_projections": pooled}, None, prompts)

    @staticmethod
    def _pack(x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)

    @staticmethod
    def _unpack(x: Tensor, h: int, w: int) -> Tensor:
        b, _, c4 = x.shape
        return x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)

    def _velocity(self, latents, sigma, embeds, guidance_scale):
        b, _, h, w = latents.shape
        dtype, device = latents.dtype, latents.device
        img_ids = torch.zeros(h // 2, w // 2, 3, device=device, dtype=dtype)
        img_ids[..., 1] += torch.arange(h // 2, device=device, dtype=dtype)[:, None]
        img_ids[..., 2] += torch.arange(w // 2, device=device, dtype=dtype)[None, :]
        text = embeds["encoder_hidden_states"].to(dtype)
        guidance = None
        if self.denoiser.config.guidance_embeds:
            guidance = torch.full((b,), float(guidance_scale), device=device, dtype=torch.float32)
        out = self.net(hidden_states=self._pack(latents), timestep=sigma.to(dtype), guidance=guidance,
                            pooled_projections=embeds["pooled_projections"].to(dtype), encoder_hidden_states=text,
                            txt_ids=torch.zeros(text.shape[1], 3, device=device, dtype=dtype),
                            img_ids=img_ids.reshape(-1, 3), return_dict=False)[0]
        return self._unpack(out, h, w)

    def decode(self, latents):
        vae = self.pipe.vae
        z = latents.to(vae.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        return (vae.decode(z, return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1)

    def encode(self, pixels, generator=None):
        vae = self.pipe.vae
        dist = vae.encode(pixels.to(vae.dtype) * 2 - 1).latent_dist
        z = dist.sample(generator) if generator is not None else dist.mode()
        return ((z - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor).float()


class WanAdapter(FlowModelAdapter):
    """Wan2.1 text-to-video (WanPipeline): 3D DiT over [B, 16, f, h, w] latents, umT5 text, causal video VAE.

    CFG runs the conditional and unconditional branches in two calls, as WanPipeline does.
    """

    name = "wan"
    guidance = "cfg"
    is_video = True
    cfg_batched = False
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")

    def __init__(self, pipe, max_sequence_length: int = 512):
        if getattr(pipe, "transformer_2", None) is not None:
            raise ValueError("Wan2.2 two-expert pipelines are not supported yet; use a Wan2.1 checkpoint")
        _freeze_all_but_denoiser(pipe)
        self.pipe = pipe
        self.denoiser = pipe.transformer
        self.max_sequence_length = max_sequence_length

    @classmethod
    def from_pretrained(cls, path, torch_dtype=torch.float32, device="cpu", cpu_offload=False, **kwargs):
        from diffusers import AutoencoderKLWan, WanPipeline

        path = resolve_model_path(path)
        # The Wan VAE is kept in fp32, as the model card recommends.
        vae = AutoencoderKLWan.from_pretrained(path, subfolder="vae", torch_dtype=torch.float32)
        pipe = WanPipeline.from_pretrained(path, vae=vae, torch_dtype=torch_dtype)
        pipe.enable_model_cpu_offload(device=device) if cpu_offload else pipe.to(device)
        return cls(pipe, **kwargs)

    @classmethod
    def request_rules(cls, path) -> RequestRules | None:
        """From the configs, without weights (WanPipeline: the VAE's spatial factor times the patch width)."""
        vae, tr = read_model_config(path, "vae/config.json"), read_model_config(path, "transformer/config.json")
        if vae is None or tr is None:
            return None
        return RequestRules(cls.name, vae.get("scale_factor_spatial", 8) * tr.get("patch_size", [1, 2, 2])[1],
                            video=True)

    @property
    def size_multiple(self) -> int:
        return self.pipe.vae_scale_factor_spatial * self.denoiser.config.patch_size[1]

    def latent_shape(self, height, width, num_frames=None):
        self.check_request(height, width, num_frames)
        fs, ft = self.pipe.vae_scale_factor_spatial, self.pipe.vae_scale_factor_temporal
        return (self.denoiser.config.in_channels, (num_frames - 1) // ft + 1, height // fs, width // fs)

    def sigmas(self, num_steps, latent_shape):
        return _scheduler_sigmas(self.pipe.scheduler, num_steps)

    @torch.no_grad()
    def encode_prompts(self, prompts, negative_prompts=None, cfg=True):
        prompts = list(prompts)
        embeds, neg = self.pipe.encode_prompt(prompt=prompts, negative_prompt=negative_prompts,
                                              do_classifier_free_guidance=cfg, device=self.device,
                                              max_sequence_length=self.max_sequence_length)
        return Conditioning({"encoder_hidden_states": embeds},
                            {"encoder_hidden_states": neg} if cfg else None, prompts)

    def _velocity(self, latents, sigma, embeds, guidance_scale):
        timestep = sigma * self.pipe.scheduler.config.num_train_timesteps
        return self.net(hidden_states=latents, timestep=timestep,
                             encoder_hidden_states=embeds["encoder_hidden_states"].to(latents.dtype),
                             return_dict=False)[0]

    def _latent_stats(self, z: Tensor) -> tuple[Tensor, Tensor]:
        config = self.pipe.vae.config
        mean = torch.tensor(config.latents_mean, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
        std = torch.tensor(config.latents_std, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
        return mean, std

    def decode(self, latents):
        vae = self.pipe.vae
        z = latents.to(vae.dtype)
        mean, std = self._latent_stats(z)
        video = vae.decode(z * std + mean, return_dict=False)[0].float()  # [B, 3, F, H, W] in [-1, 1]
        return (video / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)

    def encode(self, pixels, generator=None):
        vae = self.pipe.vae
        video = pixels.permute(0, 2, 1, 3, 4).to(vae.dtype) * 2 - 1
        dist = vae.encode(video).latent_dist
        z = dist.sample(generator) if generator is not None else dist.mode()
        mean, std = self._latent_stats(z)
        return ((z - mean) / std).float()
