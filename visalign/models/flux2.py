"""FLUX.2 [klein] (Flux2KleinPipeline): a Qwen3 text encoder, the FLUX.2 transformer and the FLUX.2 VAE.

Latent layout: the pipeline's own, [B, 4 * 32, H / 16, W / 16]: the VAE's latents patchified 2x2 into channels
and normalised by the VAE's batch-norm statistics (`Flux2KleinPipeline.prepare_latents` draws its noise in this
shape, and diffusers' klein LoRA script trains `noise - x0` in it). Tokens are these pixels in raster order, so
packing is a reshape inside `_velocity`; `to_vae_latents` gives what `output_type="latent"` returns.

Guidance follows the checkpoint: the step-distilled klein (`is_distilled` in model_index.json, e.g.
FLUX.2-klein-4B) runs without guidance, as the pipeline ignores guidance_scale for it; the klein base models run
classifier-free guidance with the empty negative prompt, the two branches in separate calls.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from visalign.models.base import Conditioning, FlowModelAdapter, RequestRules, read_model_config
from visalign.models.diffusers_adapters import _freeze_all_but_denoiser, _load_pipeline, _scheduler_sigmas
from visalign.models.tiny import TOKENIZERS

# Flux2KleinPipeline.__call__'s default: the Qwen3 hidden states stacked into the text embedding.
TEXT_LAYERS = (9, 18, 27)


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's schedule shift mu (diffusers' `compute_empirical_mu` in pipeline_flux2.py / pipeline_flux2_klein.py):
    two lines in the image token count, fitted at 10 and 200 steps; mu interpolates linearly in the step count
    between them, and large images (over 4300 tokens) take the 200-step line whatever the steps."""
    mu_200 = 0.00016927 * image_seq_len + 0.45666666
    if image_seq_len > 4300:
        return float(mu_200)
    mu_10 = 8.73809524e-05 * image_seq_len + 1.89833333
    slope = (mu_200 - mu_10) / 190.0
    return float(slope * num_steps + (mu_200 - 200.0 * slope))


class Flux2KleinAdapter(FlowModelAdapter):
    """FLUX.2 [klein] 4B / 9B and their base models (Flux2KleinPipeline), text-to-image."""

    name = "flux2-klein"
    guidance = "cfg"  # per checkpoint, set in __init__
    cfg_batched = False  # Flux2KleinPipeline.__call__ runs the negative branch in its own call

    def __init__(self, pipe, max_sequence_length: int = 512, text_encoder_out_layers: tuple[int, ...] = TEXT_LAYERS):
        layers = tuple(text_encoder_out_layers)
        text_config = pipe.text_encoder.config
        if max(layers) > text_config.num_hidden_layers or min(layers) < 0:
            raise ValueError(f"text_encoder_out_layers={layers}: the text encoder has hidden states 0 to "
                             f"{text_config.num_hidden_layers}")
        if len(layers) * text_config.hidden_size != pipe.transformer.config.joint_attention_dim:
            raise ValueError(f"text_encoder_out_layers={layers}: {len(layers)} layers of {text_config.hidden_size} "
                             f"features do not give the transformer's joint_attention_dim="
                             f"{pipe.transformer.config.joint_attention_dim}")
        _freeze_all_but_denoiser(pipe)
        self.pipe = pipe
        self.denoiser = pipe.transformer
        self.max_sequence_length = max_sequence_length
        self.text_encoder_out_layers = layers
        self.guidance = "none" if pipe.config.get("is_distilled", False) else "cfg"

    @classmethod
    def from_pretrained(cls, path, torch_dtype=torch.float32, device="cpu", cpu_offload=False, **kwargs):
        from diffusers import Flux2KleinPipeline

        return cls(_load_pipeline(Flux2KleinPipeline, path, torch_dtype, device, cpu_offload), **kwargs)

    @classmethod
    def request_rules(cls, path) -> RequestRules | None:
        """From the VAE's config, without weights (Flux2KleinPipeline: 2x2 patches over a 2^(levels-1) VAE
        factor)."""
        vae = read_model_config(path, "vae/config.json")
        return None if vae is None else RequestRules(cls.name, 2 ** (len(vae["block_out_channels"]) - 1) * 2)

    @property
    def default_lora_targets(self) -> tuple[str, ...]:
        """Every attention projection. A single-stream block's fused output projection `attn.to_out` is a Linear
        whose name would also match the double-stream blocks' `to_out` ModuleList (which peft cannot wrap), so it is
        named per block, as diffusers' train_dreambooth_lora_flux2_klein.py does."""
        singles = range(self.denoiser.config.num_single_layers)
        return ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "to_qkv_mlp_proj", *(f"single_transformer_blocks.{i}.attn.to_out" for i in singles))

    @property
    def size_multiple(self) -> int:
        return self.pipe.vae_scale_factor * 2

    def latent_shape(self, height, width, num_frames=None):
        self.check_request(height, width, num_frames)
        f = self.size_multiple
        return (self.denoiser.config.in_channels // 4 * 4, height // f, width // f)

    def sigmas(self, num_steps, latent_shape):
        if num_steps < 1:
            raise ValueError(f"num_steps={num_steps} must be >= 1")
        # Flux2KleinPipeline passes linspace(1, 1/N, N) as sigmas and FLUX.2's empirical mu.
        use_flow_sigmas = self.pipe.scheduler.config.get("use_flow_sigmas", False)
        sigmas = None if use_flow_sigmas else np.linspace(1.0, 1 / num_steps, num_steps)
        mu = empirical_mu(latent_shape[-2] * latent_shape[-1], num_steps)
        return _scheduler_sigmas(self.pipe.scheduler, num_steps, sigmas=sigmas, mu=mu)

    def _embed(self, prompts: list[str]) -> Tensor:
        # The pipeline pads every prompt to max_sequence_length and the transformer takes no mask, so the padding
        # is part of the conditioning and a fixed length gives the pipeline's own embeddings.
        embeds, _ = self.pipe.encode_prompt(prompt=prompts, device=self.device,
                                            max_sequence_length=self.max_sequence_length,
                                            text_encoder_out_layers=self.text_encoder_out_layers)
        return embeds

    @torch.no_grad()
    def encode_prompts(self, prompts, negative_prompts=None, cfg=True):
        prompts = list(prompts)
        cond = {"encoder_hidden_states": self._embed(prompts)}
        if not (cfg and self.guidance == "cfg"):
            return Conditioning(cond, None, prompts)
        negative = list(negative_prompts) if negative_prompts is not None else [""] * len(prompts)
        if len(negative) != len(prompts):
            raise ValueError(f"{len(negative)} negative prompts for {len(prompts)} prompts")
        return Conditioning(cond, {"encoder_hidden_states": self._embed(negative)}, prompts)

    def _velocity(self, latents, sigma, embeds, guidance_scale):
        b, c, h, w = latents.shape
        text = embeds["encoder_hidden_states"].to(latents.dtype)
        tokens = latents.reshape(b, c, h * w).permute(0, 2, 1)  # Flux2KleinPipeline._pack_latents
        # The pipeline feeds timestep t / 1000 = sigma and no guidance embedding, for every klein variant.
        out = self.net(hidden_states=tokens, timestep=sigma.to(latents.dtype), guidance=None,
                       encoder_hidden_states=text, txt_ids=self.pipe._prepare_text_ids(text).to(latents.device),
                       img_ids=self.pipe._prepare_latent_ids(latents).to(latents.device), return_dict=False)[0]
        return out[:, :h * w].permute(0, 2, 1).reshape(b, c, h, w)

    def _batch_norm_stats(self, z: Tensor) -> tuple[Tensor, Tensor]:
        vae = self.pipe.vae
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(z.device, z.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(z.device, z.dtype)
        return mean, std

    def to_vae_latents(self, latents: Tensor) -> Tensor:
        """Our latents → the VAE's [B, 32, H / 8, W / 8] (what the pipeline returns for output_type="latent")."""
        z = latents.to(self.pipe.vae.dtype)
        mean, std = self._batch_norm_stats(z)
        return self.pipe._unpatchify_latents(z * std + mean)

    def from_vae_latents(self, z: Tensor) -> Tensor:
        """The VAE's latents → ours (Flux2KleinPipeline._encode_vae_image)."""
        z = self.pipe._patchify_latents(z)
        mean, std = self._batch_norm_stats(z)
        return ((z - mean) / std).float()

    def decode(self, latents):
        image = self.pipe.vae.decode(self.to_vae_latents(latents), return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    def encode(self, pixels, generator=None):
        vae = self.pipe.vae
        dist = vae.encode(pixels.to(vae.dtype) * 2 - 1).latent_dist
        return self.from_vae_latents(dist.sample(generator) if generator is not None else dist.mode())


# Qwen3's chat template for plain user turns (what the pipeline renders with enable_thinking=False).
QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def tiny_flux2_klein_pipeline(seed: int = 0, is_distilled: bool = False):
    """A Flux2KleinPipeline with tiny random components: a 3-layer Qwen3 (all three layers stacked), VAE factor 2
    with 2 latent channels (so 8 after patchifying, 4 px multiples) and non-trivial batch-norm statistics; the
    base model's CFG unless `is_distilled`."""
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen2TokenizerFast, Qwen3Config, Qwen3ForCausalLM

    tokenizer = Qwen2TokenizerFast.from_pretrained(TOKENIZERS / "qwen2_vl")
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
                                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
                                          timestep_guidance_channels=32, axes_dims_rope=[4, 4, 4, 4],
                                          guidance_embeds=False).eval()
    torch.manual_seed(seed + 1)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=128,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id)
    text_encoder = Qwen3ForCausalLM(config).eval()
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLFlux2(sample_size=32, block_out_channels=(4, 8), layers_per_block=1, latent_channels=2,
                             norm_num_groups=1, down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2).eval()
    generator = torch.Generator().manual_seed(seed + 3)
    vae.bn.running_mean.copy_(0.5 * torch.randn(vae.bn.num_features, generator=generator))
    vae.bn.running_var.copy_(0.5 + torch.rand(vae.bn.num_features, generator=generator))
    # FLUX.2-klein's scheduler: dynamic shifting with the exponential time shift.
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
    return Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer, is_distilled=is_distilled)


def tiny_flux2_klein(seed: int = 0, is_distilled: bool = False, **options):
    return Flux2KleinAdapter(tiny_flux2_klein_pipeline(seed, is_distilled),
                             **{"max_sequence_length": 48, "text_encoder_out_layers": (1, 2, 3), **options})
