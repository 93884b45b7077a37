"""Z-Image (ZImagePipeline): Tongyi-MAI/Z-Image-Turbo (distilled, 8 steps, no CFG) and the base Z-Image.

A single-stream DiT over 2x2 patches of a FLUX.1-style 16-channel VAE's latents, conditioned on the
second-to-last hidden state of a Qwen3 text encoder. The pipeline hands the transformer ragged lists (one latent
[C, 1, h, w] and one unpadded text embedding [L_i, D] per sample), feeds it the reversed time (1000 - t) / 1000
and negates what it returns; the adapter keeps fixed-shape tensors (embeddings padded to `max_sequence_length`
plus a mask) and does those conversions inside `_velocity`, so `predict_velocity` returns noise - x0 at sigma.

Guidance: the pipeline's CFG is pos + w (pos - neg), on for w > 0. Here `guidance_scale` keeps the meaning it
has for every adapter (1 = no guidance), so scale = the pipeline's w + 1: Turbo's guidance_scale=0.0 is 1 here,
the base model's 4.0 is 5.
"""

from __future__ import annotations

import torch
from torch import Tensor

from visalign.models.base import Conditioning, FlowModelAdapter, RequestRules, read_model_config
from visalign.models.diffusers_adapters import _freeze_all_but_denoiser, _load_pipeline, _scheduler_sigmas
from visalign.models.tiny import TOKENIZERS, _kl_vae

# diffusers and transformers are imported where a pipeline is built: they take seconds to import, and the model
# registry imports this module's factory lazily.

# ZImagePipeline calls the transformer with its forward's defaults, patch_size=2 and f_patch_size=1, and checks
# sizes against vae_scale_factor * 2.
PATCH = 2


class ZImageAdapter(FlowModelAdapter):
    """Z-Image / Z-Image-Turbo (ZImagePipeline): Qwen3 text, single-stream DiT, FLUX.1-style 16-channel VAE.

    `cfg_normalization` (c > 0: cap each sample's guided prediction at c times the norm of its conditional one)
    and `cfg_truncation` (no guidance once the normalised time 1 - sigma exceeds it) are the pipeline's
    arguments of the same names, with its defaults (off).
    """

    name = "z-image"
    guidance = "cfg"
    cfg_batched = True  # ZImagePipeline runs both branches in one transformer call
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")  # every ZImageTransformerBlock's `attention`

    def __init__(self, pipe, max_sequence_length: int = 512, cfg_normalization: float = 0.0,
                 cfg_truncation: float = 1.0):
        config = pipe.transformer.config
        if PATCH not in config.all_patch_size or 1 not in config.all_f_patch_size:
            raise ValueError(f"ZImagePipeline runs the transformer with patch_size={PATCH}, f_patch_size=1; this "
                             f"one has all_patch_size={config.all_patch_size}, "
                             f"all_f_patch_size={config.all_f_patch_size}")
        _freeze_all_but_denoiser(pipe)
        self.pipe = pipe
        self.denoiser = pipe.transformer
        self.max_sequence_length = max_sequence_length
        self.cfg_normalization = float(cfg_normalization)
        self.cfg_truncation = float(cfg_truncation)

    @classmethod
    def from_pretrained(cls, path, torch_dtype=torch.float32, device="cpu", cpu_offload=False, **kwargs):
        from diffusers import ZImagePipeline

        return cls(_load_pipeline(ZImagePipeline, path, torch_dtype, device, cpu_offload), **kwargs)

    @classmethod
    def request_rules(cls, path) -> RequestRules | None:
        """From the VAE's config, without weights (ZImagePipeline: sizes are multiples of vae_scale_factor * 2,
        the VAE factor being 2^(levels-1)); None when it is not at hand."""
        vae = read_model_config(path, "vae/config.json")
        return None if vae is None else RequestRules(cls.name, 2 ** (len(vae["block_out_channels"]) - 1) * PATCH)

    @property
    def size_multiple(self) -> int:
        return self.pipe.vae_scale_factor * PATCH

    def latent_shape(self, height, width, num_frames=None):
        self.check_request(height, width, num_frames)
        f = self.pipe.vae_scale_factor
        return (self.denoiser.config.in_channels, height // f, width // f)

    def sigmas(self, num_steps, latent_shape):
        from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift, get_default_z_image_sigmas

        if num_steps < 1:
            raise ValueError(f"num_steps={num_steps} must be >= 1")
        config = self.pipe.scheduler.config
        # As ZImagePipeline.__call__: linspace(1, 1/N, N) sigmas and mu from the patch count (mu only moves them
        # with use_dynamic_shifting; the released schedulers use a static shift).
        mu = calculate_shift((latent_shape[-2] // PATCH) * (latent_shape[-1] // PATCH),
                             config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        return _scheduler_sigmas(self.pipe.scheduler, num_steps, sigmas=get_default_z_image_sigmas(num_steps), mu=mu)

    # ---- text ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts, negative_prompts=None, cfg=True):
        prompts = list(prompts)
        negative = None if negative_prompts is None else list(negative_prompts)
        # encode_prompt rewrites the lists it is given into chat-template strings: it gets copies.
        embeds, neg = self.pipe.encode_prompt(prompt=list(prompts), negative_prompt=negative,
                                              do_classifier_free_guidance=cfg, device=self.device,
                                              max_sequence_length=self.max_sequence_length)
        return Conditioning(self._padded(embeds), self._padded(neg) if cfg else None, prompts)

    def _padded(self, embeds: list[Tensor]) -> dict[str, Tensor]:
        """The pipeline's per-prompt embeddings (its tokens under the attention mask, at most max_sequence_length)
        as fixed-shape tensors, so batches encoded apart concatenate; `_velocity` unpads them again."""
        n, dim = self.max_sequence_length, embeds[0].shape[-1]
        padded = embeds[0].new_zeros(len(embeds), n, dim)
        mask = torch.zeros(len(embeds), n, dtype=torch.bool, device=embeds[0].device)
        for i, e in enumerate(embeds):
            padded[i, :len(e)] = e
            mask[i, :len(e)] = True
        return {"prompt_embeds": padded, "prompt_mask": mask}

    # ---- denoiser ------------------------------------------------------------------------------------
    def _normalised_time(self, sigma: Tensor) -> Tensor:
        """ZImagePipeline.__call__'s `(1000 - t) / 1000` for the scheduler's t = sigma * num_train_timesteps: the
        transformer's reversed time (0 at noise, 1 at data), which `cfg_truncation` is compared with too."""
        t = sigma * self.pipe.scheduler.config.num_train_timesteps
        return (1000 - t) / 1000

    def _velocity(self, latents, sigma, embeds, guidance_scale):
        text = embeds["prompt_embeds"].to(latents.dtype)
        captions = [e[m] for e, m in zip(text, embeds["prompt_mask"], strict=True)]  # ragged, as the pipeline's
        images = list(latents.unsqueeze(2).unbind(0))  # [C, 1, h, w] each
        out = self.net(images, self._normalised_time(sigma), captions, return_dict=False)[0]
        # ZImagePipeline.__call__ steps with noise_pred = -out: the network predicts x0 - noise.
        return -torch.stack(out).squeeze(2)

    def predict_velocity(self, latents, sigma, cond, guidance_scale=1.0):
        """The base class's, with ZImagePipeline's `cfg_truncation`: a sample whose normalised time exceeds it
        runs without guidance. The pipeline decides per step; this decides per sample, so training batches that
        mix sigmas follow the same rule."""
        batch = latents.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=latents.device)
        sigma = sigma.expand(batch) if sigma.ndim == 0 else sigma
        if guidance_scale <= 1 or self.cfg_truncation >= 1:  # the pipeline truncates only for cfg_truncation < 1
            return super().predict_velocity(latents, sigma, cond, guidance_scale)
        unguided = self._normalised_time(sigma).double() > self.cfg_truncation
        if unguided.all() or not unguided.any():  # one rule for the whole batch, as at the pipeline's steps
            return super().predict_velocity(latents, sigma, cond, 1.0 if unguided.all() else guidance_scale)
        v = torch.empty(latents.shape, dtype=torch.float32, device=latents.device)
        for rows, scale in ((unguided, 1.0), (~unguided, guidance_scale)):
            idx = rows.nonzero().flatten()
            v[idx] = super().predict_velocity(latents[idx], sigma[idx], cond.index(idx), scale)
        return v

    def guide(self, v_cond, v_uncond, scale):
        """ZImagePipeline.__call__'s CFG in float32, pos + w (pos - neg) with w = scale - 1; with
        `cfg_normalization` c > 0, a sample's guided prediction longer than c ||pos|| is scaled down to that
        norm (norms over the whole sample)."""
        pos, neg = v_cond.float(), v_uncond.float()
        v = pos + (scale - 1) * (pos - neg)
        if self.cfg_normalization > 0:
            dims = tuple(range(1, v.ndim))
            norm = torch.linalg.vector_norm(v, dim=dims, keepdim=True)
            cap = torch.linalg.vector_norm(pos, dim=dims, keepdim=True) * self.cfg_normalization
            v = torch.where(norm > cap, v * (cap / norm), v)
        return v

    # ---- pixels --------------------------------------------------------------------------------------
    def decode(self, latents):
        vae = self.pipe.vae
        z = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        return (vae.decode(z, return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1)

    def encode(self, pixels, generator=None):
        vae = self.pipe.vae
        dist = vae.encode(pixels.to(vae.dtype) * 2 - 1).latent_dist
        z = dist.sample(generator) if generator is not None else dist.mode()
        return ((z - vae.config.shift_factor) * vae.config.scaling_factor).float()


def _qwen3(hidden: int = 32, vocab_size: int = 1008):
    from transformers import Qwen3Config, Qwen3Model

    config = Qwen3Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256)
    return Qwen3Model(config).eval()


def tiny_z_image_pipeline(seed: int = 0):
    """A ZImagePipeline with tiny random components (VAE factor 2, 4 px multiples; Qwen3 text encoder with the
    committed tiny Qwen2 tokenizer, whose chat template prepends a system turn that Qwen3's does not)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import AutoTokenizer

    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32,
                                           n_layers=1, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
                                           axes_dims=[4, 6, 6], axes_lens=[128, 32, 32]).eval()
    torch.manual_seed(seed + 1)
    text_encoder = _qwen3(32)
    vae = _kl_vae(4, seed + 2)
    return ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=text_encoder,
                          tokenizer=AutoTokenizer.from_pretrained(TOKENIZERS / "qwen2_vl"), transformer=transformer)


def tiny_z_image(seed: int = 0, **options):
    return ZImageAdapter(tiny_z_image_pipeline(seed), **{"max_sequence_length": 64, **options})
