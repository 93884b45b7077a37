"""FLUX.1 Kontext: FLUX.1 that edits a source image (FluxKontextPipeline).

The source image is encoded by the VAE once per prompt and travels in the conditioning (`image_latents`, in our
spatial layout); each denoiser pass appends its packed tokens to the noisy latents' tokens, with position ids
whose first coordinate is 1, and keeps only the outputs of the noisy tokens, as the pipeline's loop does.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from visalign.models.base import Conditioning, RequestRules
from visalign.models.diffusers_adapters import FluxAdapter, _load_pipeline


def _image_ids(h: int, w: int, first: float, device, dtype) -> Tensor:
    """Position ids of an h×w grid of packed tokens, [h*w, 3]: (first, row, column), as
    FluxKontextPipeline._prepare_latent_image_ids, with first = 1 for the source image's tokens."""
    ids = torch.zeros(h, w, 3, device=device, dtype=dtype)
    ids[..., 0] = first
    ids[..., 1] += torch.arange(h, device=device, dtype=dtype)[:, None]
    ids[..., 2] += torch.arange(w, device=device, dtype=dtype)[None, :]
    return ids.reshape(-1, 3)


class FluxKontextAdapter(FluxAdapter):
    """FLUX.1 Kontext dev (FluxKontextPipeline): FLUX.1 with the source image's latent tokens in the sequence.

    Source images come in at the run's height × width (a prompt file's `source_image`, resized); choose one of
    Kontext's preferred resolutions (e.g. 1024×1024), since unlike the pipeline the adapter does not pick one.
    """

    name = "flux-kontext"
    edits = True

    @classmethod
    def from_pretrained(cls, path, torch_dtype=torch.float32, device="cpu", cpu_offload=False, **kwargs):
        from diffusers import FluxKontextPipeline

        return cls(_load_pipeline(FluxKontextPipeline, path, torch_dtype, device, cpu_offload), **kwargs)

    @classmethod
    def request_rules(cls, path) -> RequestRules | None:
        """FLUX.1's, marked as an editing model's."""
        rules = super().request_rules(path)
        return None if rules is None else replace(rules, edits=True)

    @torch.no_grad()
    def encode_prompts(self, prompts, negative_prompts=None, cfg=True, *, images: Tensor):
        """Text as FLUX.1, plus the source images' latents: the VAE posterior's mode, shifted and scaled
        (FluxKontextPipeline._encode_vae_image), each image first floored to a multiple of 16 px as the
        pipeline's preprocessing does."""
        prompts = list(prompts)
        if images.ndim != 4 or images.shape[:2] != (len(prompts), 3):
            raise ValueError(f"{self.name}: images must be [{len(prompts)}, 3, H, W] in [0, 1], one per prompt; "
                             f"got {tuple(images.shape)}")
        m = self.size_multiple
        h, w = images.shape[-2] // m * m, images.shape[-1] // m * m
        if (h, w) != tuple(images.shape[-2:]):
            images = torch.nn.functional.interpolate(images, size=(h, w), mode="bilinear", antialias=True)
        text = super().encode_prompts(prompts, cfg=cfg)
        latents = self.encode(images.to(self.device))
        return Conditioning({**text.cond, "image_latents": latents}, None, prompts)

    def _velocity(self, latents, sigma, embeds, guidance_scale):
        b, _, h, w = latents.shape
        dtype, device = latents.dtype, latents.device
        source = embeds["image_latents"].to(dtype)
        hs, ws = source.shape[-2:]
        tokens = torch.cat([self._pack(latents), self._pack(source)], dim=1)
        ids = torch.cat([_image_ids(h // 2, w // 2, 0, device, dtype), _image_ids(hs // 2, ws // 2, 1, device, dtype)])
        text = embeds["encoder_hidden_states"].to(dtype)
        guidance = None
        if self.denoiser.config.guidance_embeds:
            guidance = torch.full((b,), float(guidance_scale), device=device, dtype=torch.float32)
        out = self.net(hidden_states=tokens, timestep=sigma.to(dtype), guidance=guidance,
                       pooled_projections=embeds["pooled_projections"].to(dtype), encoder_hidden_states=text,
                       txt_ids=torch.zeros(text.shape[1], 3, device=device, dtype=dtype), img_ids=ids,
                       return_dict=False)[0]
        return self._unpack(out[:, : (h // 2) * (w // 2)], h, w)


def tiny_flux_kontext_pipeline(seed: int = 0):
    """A FluxKontextPipeline with the tiny FLUX components (guidance embedding on, as Kontext dev)."""
    from diffusers import FluxKontextPipeline

    from visalign.models.tiny import tiny_flux_pipeline

    return FluxKontextPipeline(**tiny_flux_pipeline(seed).components)


def tiny_flux_kontext(seed: int = 0, **options):
    return FluxKontextAdapter(tiny_flux_kontext_pipeline(seed), **{"max_sequence_length": 32, **options})
