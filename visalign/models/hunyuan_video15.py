"""HunyuanVideo 1.5 text-to-video (HunyuanVideo15Pipeline): an 8.3B dual-stream DiT over the 32-channel causal
video VAE's latents (16x spatial, 4x temporal, patch 1), conditioned on Qwen2.5-VL hidden states under the
pipeline's video-description template and on ByT5 embeddings of the prompt's quoted (glyph) text.

The text-to-video checkpoints share one architecture; what tells them apart here is in their configs (diffusers'
scripts/convert_hunyuan_video1_5_to_diffusers.py): the scheduler's static shift (480p: 5, 720p: 9) and the guider's
scale (6 for the base models, 1 for the CFG-distilled ones, which therefore run without guidance here too). The
transformer has no guidance embedding.

Inside `_velocity` the adapter does what HunyuanVideo15Pipeline.__call__ does for text-to-video: it appends the
all-zero image-condition latents and mask on channels and marks the image tokens absent with all-zero image
embeddings. Holds the adapter and its tiny random-weight build; the tests check that our ODE sampler reproduces the
pipeline's output for the same seeds (<= 1e-4, fp32).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from visalign.models.base import FlowModelAdapter, RequestRules, read_model_config
from visalign.models.diffusers_adapters import _freeze_all_but_denoiser, _load_pipeline, _scheduler_sigmas
from visalign.models.tiny import TOKENIZERS

# diffusers and transformers are imported where a pipeline is built or loaded: they take seconds to import, and
# the model registry imports this module on first use only.

LORA_FILE = "pytorch_lora_weights.safetensors"


class HunyuanVideo15Adapter(FlowModelAdapter):
    """HunyuanVideo 1.5 text-to-video (HunyuanVideo15Pipeline), 480p / 720p, base or CFG-distilled.

    Guidance follows the checkpoint's guider (ClassifierFreeGuidance): CFG with the empty negative prompt, the two
    branches in separate calls, `guidance_scale` meaning what the guider's does (the checkpoint's default is 6.0),
    plus its `guidance_rescale` when set; a guider that never guides (the distilled checkpoints' scale 1.0, or
    `enabled: false`) makes guidance "none". `max_sequence_length` keeps the first Qwen tokens after the template's
    cropped system turn (the pipeline keeps 1000); the ByT5 glyph embeddings keep the pipeline's 256.
    """

    name = "hunyuan-video15"
    guidance = "cfg"  # per checkpoint, set in __init__
    is_video = True
    default_size = 480
    cfg_batched = False  # the pipeline's guider runs the conditional and unconditional batches as separate calls
    # The last dual-stream block's text-stream outputs (to_add_out, ff_context) never reach the video tokens, so
    # their weights (and LoRA) get no gradient: DDP must be told.
    partial_passes = True
    # Every attention projection of the dual-stream blocks (and of the token refiner's self-attention). The release's
    # train.py defaults to every Linear ("all-linear"); attention only keeps the LoRA small, as for the other families.
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                            "to_add_out")

    def __init__(self, pipe, max_sequence_length: int | None = None):
        vae, tr, guider = pipe.vae.config, pipe.transformer.config, pipe.guider
        if max_sequence_length is None:
            max_sequence_length = pipe.tokenizer_max_length
        if not 1 <= max_sequence_length <= pipe.tokenizer_max_length:
            raise ValueError(f"max_sequence_length={max_sequence_length} must be in [1, {pipe.tokenizer_max_length}] "
                             "(the pipeline's tokenizer_max_length)")
        if tr.in_channels != 2 * vae.latent_channels + 1 or tr.out_channels != vae.latent_channels:
            raise ValueError(f"transformer in/out channels {tr.in_channels}/{tr.out_channels} do not fit the "
                             f"text-to-video input of {vae.latent_channels}-channel latents (2 x C + 1 in, C out)")
        if vae.temporal_compression_ratio != 4:
            raise ValueError(f"the VAE's temporal_compression_ratio={vae.temporal_compression_ratio}: frame counts "
                             "4k+1 need 4")
        if tr.use_meanflow:
            raise ValueError("MeanFlow transformers (the super-resolution models) take a second timestep the "
                             "text-to-video pipeline does not give; not supported")
        if type(guider).__name__ != "ClassifierFreeGuidance" or guider.use_original_formulation:
            raise ValueError(f"guider {type(guider).__name__} (use_original_formulation="
                             f"{getattr(guider, 'use_original_formulation', None)}) is not supported: only "
                             "ClassifierFreeGuidance in diffusers' formulation")
        if guider._start != 0.0 or guider._stop != 1.0:
            raise ValueError(f"guider start={guider._start}, stop={guider._stop}: guidance over part of the steps "
                             "is not supported (needs start 0, stop 1)")
        _freeze_all_but_denoiser(pipe)
        self.pipe = pipe
        self.denoiser = pipe.transformer
        self.max_sequence_length = max_sequence_length
        # As ClassifierFreeGuidance._is_cfg_enabled: off when disabled or at scale 1.
        self.guidance = "cfg" if guider._enabled and not math.isclose(guider.guidance_scale, 1.0) else "none"

    @classmethod
    def from_pretrained(cls, path, torch_dtype=torch.float32, device="cpu", cpu_offload=False, **kwargs):
        from diffusers import HunyuanVideo15Pipeline

        pipe = _load_pipeline(HunyuanVideo15Pipeline, path, torch_dtype, device, cpu_offload)
        # Untiled, the VAE's mid-block attention builds a mask over every latent position of the clip (about 10 GB
        # at 480p x 121 frames); the diffusers docs' example enables tiling.
        pipe.vae.enable_tiling()
        return cls(pipe, **kwargs)

    @classmethod
    def request_rules(cls, path) -> RequestRules | None:
        """From the configs, without weights (HunyuanVideo15Pipeline: the VAE's spatial_compression_ratio times the
        transformer's patch size); None when they are not at hand."""
        vae, tr = read_model_config(path, "vae/config.json"), read_model_config(path, "transformer/config.json")
        if vae is None or tr is None:
            return None
        return RequestRules(cls.name, vae.get("spatial_compression_ratio", 16) * tr.get("patch_size", 1), video=True)

    @property
    def size_multiple(self) -> int:
        return self.pipe.vae_scale_factor_spatial * self.denoiser.config.patch_size

    def latent_shape(self, height, width, num_frames=None):
        self.check_request(height, width, num_frames)
        fs, ft = self.pipe.vae_scale_factor_spatial, self.pipe.vae_scale_factor_temporal
        # HunyuanVideo15Pipeline.prepare_latents
        return (self.pipe.num_channels_latents, (num_frames - 1) // ft + 1, height // fs, width // fs)

    def sigmas(self, num_steps, latent_shape):
        if num_steps < 1:
            raise ValueError(f"num_steps={num_steps} must be >= 1")
        # HunyuanVideo15Pipeline.__call__ passes linspace(1, 0, N + 1)[:-1]; the scheduler applies its static shift.
        return _scheduler_sigmas(self.pipe.scheduler, num_steps, sigmas=np.linspace(1.0, 0.0, num_steps + 1)[:-1])

    # ---- text ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts, negative_prompts=None, cfg=True):
        """The pipeline's `encode_prompt` per branch; the negative prompt defaults to "" (the pipeline's default,
        which its template renders as " ")."""
        return self._conditioning(prompts, negative_prompts, cfg and self.guidance == "cfg", self._encode)

    def _encode(self, prompts: list[str]) -> dict[str, Tensor]:
        """Both encoders' embeddings with boolean masks, at fixed lengths (the pipeline pads the Qwen tokens to
        tokenizer_max_length and ByT5's to 256, right-padded), so batches encoded apart concatenate. Keeping the
        first max_sequence_length Qwen positions equals truncating there: the text model is causal."""
        embeds, mask, glyph, glyph_mask = self.pipe.encode_prompt(prompt=prompts, device=self.device,
                                                                  dtype=self.dtype, batch_size=len(prompts))
        n = self.max_sequence_length
        return {"encoder_hidden_states": embeds[:, :n], "encoder_attention_mask": mask[:, :n].bool(),
                "encoder_hidden_states_2": glyph, "encoder_attention_mask_2": glyph_mask.bool()}

    # ---- denoiser ------------------------------------------------------------------------------------
    @staticmethod
    def _trim(embeds: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Cut the padding past the batch's longest prompt (at least one position; the masks are prefixes of ones).
        The transformer moves masked tokens behind the valid ones and masks them out of attention, so they change
        nothing, but at training sizes the 1000 + 256 padded positions can cost as much as the video's tokens."""
        n = max(int(mask.sum(1).max()), 1)
        return embeds[:, :n], mask[:, :n]

    def _velocity(self, latents, sigma, embeds, guidance_scale):
        b, c, f, h, w = latents.shape
        dtype = latents.dtype
        # Text-to-video, as HunyuanVideo15Pipeline.prepare_cond_latents_and_mask: zero condition latents and a zero
        # mask appended on channels.
        x = torch.cat([latents, latents.new_zeros(b, c + 1, f, h, w)], dim=1)
        # All-zero image embeddings tell the transformer there is no image: it masks all of them out of attention, so
        # one token does what the pipeline's 729 (vision_num_semantic_tokens) do.
        image = latents.new_zeros(b, 1, self.denoiser.config.image_embed_dim)
        text, mask = self._trim(embeds["encoder_hidden_states"], embeds["encoder_attention_mask"])
        glyph, glyph_mask = self._trim(embeds["encoder_hidden_states_2"], embeds["encoder_attention_mask_2"])
        # As the pipeline: the scheduler's t = sigma * num_train_timesteps in the latents' dtype. The transformer
        # predicts the velocity noise - x0 (the scheduler steps x + (sigma' - sigma) v).
        timestep = (sigma * self.pipe.scheduler.config.num_train_timesteps).to(dtype)
        return self.net(hidden_states=x, timestep=timestep, encoder_hidden_states=text.to(dtype),
                        encoder_attention_mask=mask, encoder_hidden_states_2=glyph.to(dtype),
                        encoder_attention_mask_2=glyph_mask, image_embeds=image, return_dict=False)[0]

    def guide(self, v_cond, v_uncond, scale):
        """ClassifierFreeGuidance.forward: v_u + w (v_c - v_u), then, with the guider's guidance_rescale > 0, the
        std rescale toward the conditional prediction (diffusers' rescale_noise_cfg, over each whole sample)."""
        from diffusers.guiders.guider_utils import rescale_noise_cfg

        v = super().guide(v_cond, v_uncond, scale)
        rescale = self.pipe.guider.guidance_rescale
        return rescale_noise_cfg(v, v_cond, rescale) if rescale > 0 else v

    # ---- pixels --------------------------------------------------------------------------------------
    # AutoencoderKLHunyuanVideo15 fails on batches of more than one clip (diffusers 0.42: its mid-block attention
    # mask [B, S, S] broadcasts against the heads axis), so clips go through it one at a time.
    def decode(self, latents):
        """As the end of HunyuanVideo15Pipeline.__call__: divide by the scaling factor (no shift), decode,
        [-1, 1] -> [0, 1], frames first."""
        vae = self.pipe.vae
        z = latents.to(vae.dtype) / vae.config.scaling_factor
        video = torch.cat([vae.decode(clip, return_dict=False)[0] for clip in z.split(1)]).float()
        return (video / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)

    def encode(self, pixels, generator=None):
        """The VAE's posterior mean (or a sample) times the scaling factor, as the image-to-video pipeline encodes
        its condition image."""
        vae = self.pipe.vae
        video = pixels.permute(0, 2, 1, 3, 4).to(vae.dtype) * 2 - 1
        dists = [vae.encode(clip).latent_dist for clip in video.split(1)]
        z = torch.cat([d.sample(generator) if generator is not None else d.mode() for d in dists])
        return (z * vae.config.scaling_factor).float()

    # ---- LoRA: the pipeline has no LoRA loader mixin -------------------------------------------------------
    def save_lora(self, directory: str | os.PathLike, adapter_name: str = "default") -> Path:
        """Write the adapter as `pytorch_lora_weights.safetensors` in diffusers' pipeline format ("transformer."
        keys, rank/alpha in the metadata). HunyuanVideo15Pipeline has no `load_lora_weights`; load it with the
        transformer's own loader: `pipe.transformer.load_lora_adapter(directory, weight_name=
        "pytorch_lora_weights.safetensors")` (prefix "transformer" is its default)."""
        from diffusers.loaders import HunyuanVideoLoraLoaderMixin
        from peft.utils import get_peft_model_state_dict  # peft takes seconds to import; only LoRA needs it

        # Any transformer-only LoRA mixin writes this format; HunyuanVideo's is the family's.
        HunyuanVideoLoraLoaderMixin.save_lora_weights(
            directory, transformer_lora_layers=get_peft_model_state_dict(self.denoiser, adapter_name=adapter_name),
            transformer_lora_adapter_metadata=self.denoiser.peft_config[adapter_name].to_dict(),
            weight_name=LORA_FILE)
        return Path(directory) / LORA_FILE

    def load_lora(self, path: str | os.PathLike, adapter_name: str = "default") -> None:
        """Load a diffusers-format LoRA (a directory holding `pytorch_lora_weights.safetensors`, or a .safetensors
        file) with the transformer's `load_lora_adapter`."""
        path = Path(path)
        if not path.exists():
            raise ValueError(f"LoRA path {str(path)!r} does not exist")
        directory, weight_name = (path, LORA_FILE) if path.is_dir() else (path.parent, path.name)
        self.denoiser.load_lora_adapter(str(directory), weight_name=weight_name, prefix="transformer",
                                        adapter_name=adapter_name)
        self.denoiser.requires_grad_(False)


# ---- the tiny build --------------------------------------------------------------------------------------


def _tiny_text_encoder(tokenizer, seed: int):
    """Qwen2.5-VL's text model (what the pipeline loads) at width 16, 2 layers."""
    from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    config = Qwen2_5_VLTextConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                  max_position_embeddings=2048, pad_token_id=tokenizer.pad_token_id,
                                  bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                                   "mrope_section": [1, 1, 2]})
    torch.manual_seed(seed)
    return Qwen2_5_VLTextModel(config).eval()


def _tiny_byt5(seed: int):
    """A 1-layer T5 encoder over ByT5's 384 byte-level ids (the real one is Glyph-SDXL-v2's ByT5-small)."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=384, d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
                      relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


def tiny_hunyuan_video15_pipeline(seed: int = 0, distilled: bool = False):
    """A HunyuanVideo15Pipeline with tiny random components: VAE 4x spatial and 4x temporal with 4 latent channels
    (4 px multiples, 4k+1 frames), one dual-stream block, Qwen2.5-VL text model of width 16 with the committed tiny
    Qwen2 tokenizer, a 1-layer ByT5 encoder with ByT5Tokenizer (byte-level: no vocabulary file), the 480p
    checkpoints' shift 5 and guider scale 6 (1 when `distilled`). The transformer has 4.3M parameters, nearly all
    in the ByT5 projection's fixed 2048-wide hidden layer.

    The tiny tokenizer renders the template's system turn in more tokens than Qwen2.5-VL's, so the pipeline's
    crop_start=108 keeps part of it in the embeddings; the pipeline does the same with this tokenizer."""
    from diffusers import (
        AutoencoderKLHunyuanVideo15,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideo15Pipeline,
        HunyuanVideo15Transformer3DModel,
    )
    from diffusers.guiders import ClassifierFreeGuidance
    from transformers import AutoTokenizer, ByT5Tokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZERS / "qwen2_vl")
    torch.manual_seed(seed)
    transformer = HunyuanVideo15Transformer3DModel(
        in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1, num_refiner_layers=1,
        mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=32, image_embed_dim=12,
        rope_axes_dim=(2, 2, 4), target_size=16, task_type="t2v").eval()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLHunyuanVideo15(latent_channels=4, block_out_channels=(8, 8), layers_per_block=1,
                                      spatial_compression_ratio=4, temporal_compression_ratio=4,
                                      downsample_match_channel=False, upsample_match_channel=False).eval()
    return HunyuanVideo15Pipeline(
        text_encoder=_tiny_text_encoder(tokenizer, seed + 2), tokenizer=tokenizer, transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), text_encoder_2=_tiny_byt5(seed + 3),
        tokenizer_2=ByT5Tokenizer(), guider=ClassifierFreeGuidance(guidance_scale=1.0 if distilled else 6.0))


def tiny_hunyuan_video15(seed: int = 0, distilled: bool = False, **options):
    return HunyuanVideo15Adapter(tiny_hunyuan_video15_pipeline(seed, distilled), **options)
