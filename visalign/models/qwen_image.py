"""Qwen-Image (QwenImagePipeline): a 20B MMDiT over 2x2-packed latents of a 16-channel causal video VAE used on
single frames, conditioned on the last hidden states of Qwen2.5-VL (text only, under the pipeline's prompt
template), with "true" CFG whose guided prediction is rescaled to the conditional prediction's norm.

Holds the adapter and its tiny random-weight build. The checkpoints Qwen/Qwen-Image and Qwen/Qwen-Image-2512 share
this layout. The tests check that our ODE sampler reproduces the pipeline's output for the same seeds (<= 1e-4, fp32).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from visalign.models.base import FlowModelAdapter, RequestRules, read_model_config
from visalign.models.diffusers_adapters import _freeze_all_but_denoiser, _load_pipeline, _scheduler_sigmas
from visalign.models.tiny import TOKENIZERS

# diffusers and transformers are imported where a pipeline is built or loaded: they take seconds to import, and
# the model registry imports this module on first use only.


class QwenImageAdapter(FlowModelAdapter):
    """Qwen-Image text-to-image (QwenImagePipeline).

    `guidance_scale` is the pipeline's `true_cfg_scale`: above 1 the conditional and negative branches run in two
    calls and are combined with the norm rescale (`guide`). Text embeddings are padded to `max_sequence_length`
    (the pipeline's default 512) with a boolean `encoder_hidden_states_mask`, which the transformer turns into a
    joint attention mask.
    """

    name = "qwen-image"
    guidance = "cfg"
    cfg_batched = False  # QwenImagePipeline.__call__ runs the two branches in separate transformer calls
    # Attention of both streams and both MLPs, as the Qwen-Image LoRA trainers target (Flow-Factory's
    # QwenImageAdapter.default_target_modules, flow_grpo-style train_qwenimage scripts).
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                            "to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj",
                            "txt_mlp.net.2")

    def __init__(self, pipe, max_sequence_length: int = 512):
        if pipe.transformer.config.guidance_embeds:
            # QwenImageTransformer2DModel builds no guidance embedding: with guidance_embeds=True its forward
            # passes the guidance to QwenTimestepProjEmbeddings, which takes none, and fails (diffusers 0.42).
            raise ValueError("Qwen-Image transformers with guidance_embeds=True are not supported: diffusers' "
                             "QwenImageTransformer2DModel has no guidance embedding to feed")
        if not 1 <= max_sequence_length <= 1024:
            raise ValueError(f"max_sequence_length={max_sequence_length} must be in [1, 1024] "
                             "(QwenImagePipeline.check_inputs)")
        _freeze_all_but_denoiser(pipe)
        self.pipe = pipe
        self.denoiser = pipe.transformer
        self.max_sequence_length = max_sequence_length

    @classmethod
    def from_pretrained(cls, path, torch_dtype=torch.float32, device="cpu", cpu_offload=False, **kwargs):
        from diffusers import QwenImagePipeline

        return cls(_load_pipeline(QwenImagePipeline, path, torch_dtype, device, cpu_offload), **kwargs)

    @classmethod
    def request_rules(cls, path) -> RequestRules | None:
        """From the VAE's config, without weights (QwenImagePipeline: VAE factor 2^len(temperal_downsample), times
        the 2x2 packing); None when it is not at hand."""
        vae = read_model_config(path, "vae/config.json")
        if vae is None:
            return None
        return RequestRules(cls.name, 2 ** len(vae.get("temperal_downsample", [False, True, True])) * 2)

    @property
    def size_multiple(self) -> int:
        return self.pipe.vae_scale_factor * 2

    def latent_shape(self, height, width, num_frames=None):
        self.check_request(height, width, num_frames)
        f = self.pipe.vae_scale_factor
        return (self.denoiser.config.in_channels // 4, height // f, width // f)

    def sigmas(self, num_steps, latent_shape):
        from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

        if num_steps < 1:
            raise ValueError(f"num_steps={num_steps} must be >= 1")
        config = self.pipe.scheduler.config
        # As QwenImagePipeline.__call__: linspace(1, 1/N, N) as sigmas, plus the shift mu of the packed sequence.
        mu = calculate_shift((latent_shape[-2] // 2) * (latent_shape[-1] // 2),
                             config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        return _scheduler_sigmas(self.pipe.scheduler, num_steps, sigmas=np.linspace(1.0, 1 / num_steps, num_steps),
                                 mu=mu)

    # ---- text ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts, negative_prompts=None, cfg=True):
        """The pipeline's `encode_prompt` per branch; the negative prompt defaults to "" (the pipeline takes any
        string, the empty one included; Qwen-Image's model card passes " ")."""
        return self._conditioning(prompts, negative_prompts, cfg, self._encode)

    def _encode(self, prompts: list[str]) -> dict[str, Tensor]:
        """Embeddings and mask padded to max_sequence_length, so batches encoded apart concatenate (`_velocity`
        cuts the padding back to the batch's longest prompt, as the pipeline pads)."""
        embeds, mask = self.pipe.encode_prompt(prompt=prompts, device=self.device,
                                               max_sequence_length=self.max_sequence_length)
        batch, length, _ = embeds.shape
        # encode_prompt returns mask=None when no prompt is padded.
        mask = torch.ones(batch, length, dtype=torch.bool, device=embeds.device) if mask is None else mask.bool()
        pad = self.max_sequence_length - length
        return {"encoder_hidden_states": F.pad(embeds, (0, 0, 0, pad)),
                "encoder_hidden_states_mask": F.pad(mask, (0, pad))}

    # ---- denoiser ------------------------------------------------------------------------------------
    def _pack(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        return self.pipe._pack_latents(x, b, c, h, w)

    def _unpack(self, x: Tensor, h: int, w: int) -> Tensor:
        f = self.pipe.vae_scale_factor
        return self.pipe._unpack_latents(x, h * f, w * f, f)[:, :, 0]

    def _velocity(self, latents, sigma, embeds, guidance_scale):
        b, _, h, w = latents.shape
        # The fixed-length padding past the batch's longest prompt is cut, as the pipeline pads to its longest
        # prompt: those tokens are masked out of attention, and at max_sequence_length=512 they would cost up to
        # half again the compute of a 512 px image's 1024 tokens. (The masks are prefixes of ones.)
        mask = embeds["encoder_hidden_states_mask"]
        length = int(mask.sum(1).max())
        # As the pipeline: the scheduler's t = sigma * num_train_timesteps, cast to the latents' dtype (in bf16 that
        # rounds t), then / 1000. The output is the velocity noise - x0 (the scheduler steps x + (sigma' - sigma) v).
        t = sigma * self.pipe.scheduler.config.num_train_timesteps
        timestep = t.to(latents.dtype) / 1000
        out = self.net(hidden_states=self._pack(latents), timestep=timestep,
                       encoder_hidden_states=embeds["encoder_hidden_states"][:, :length].to(latents.dtype),
                       encoder_hidden_states_mask=mask[:, :length],
                       img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]
        return self._unpack(out, h, w)

    def guide(self, v_cond, v_uncond, scale):
        """True CFG as QwenImagePipeline.__call__: v_u + w (v_c - v_u), rescaled per packed token (2x2 patch x
        channels) to the norm of the conditional prediction."""
        h, w = v_cond.shape[-2:]
        cond, guided = self._pack(v_cond), self._pack(super().guide(v_cond, v_uncond, scale))
        rescaled = guided * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(guided, dim=-1, keepdim=True))
        return self._unpack(rescaled, h, w)

    # ---- pixels --------------------------------------------------------------------------------------
    def _latent_stats(self, z: Tensor) -> tuple[Tensor, Tensor]:
        config = self.pipe.vae.config
        mean = torch.tensor(config.latents_mean, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
        std = torch.tensor(config.latents_std, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
        return mean, std

    def decode(self, latents):
        """As the end of QwenImagePipeline.__call__: un-normalise, decode one frame, [-1, 1] -> [0, 1]."""
        vae = self.pipe.vae
        z = latents.to(vae.dtype)[:, :, None]
        mean, std = self._latent_stats(z)
        image = vae.decode(z * std + mean, return_dict=False)[0][:, :, 0].float()
        return (image / 2 + 0.5).clamp(0, 1)

    def encode(self, pixels, generator=None):
        vae = self.pipe.vae
        dist = vae.encode((pixels.to(vae.dtype) * 2 - 1)[:, :, None]).latent_dist
        z = dist.sample(generator) if generator is not None else dist.mode()
        mean, std = self._latent_stats(z)
        return ((z - mean) / std)[:, :, 0].float()


# ---- the tiny build --------------------------------------------------------------------------------------


def _tiny_text_encoder(tokenizer, seed: int, vision: dict | None = None):
    """Qwen2.5-VL at width 32, 2 layers, with a 1-block vision tower the class requires (unused here: text only;
    Qwen-Image-Edit overrides its settings with `vision`, e.g. a smaller patch)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"])
    config = Qwen2_5_VLConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 37,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "max_position_embeddings": 2048, "rope_parameters": {
                         "rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [1, 1, 2]},
                     "pad_token_id": tokenizer.pad_token_id, "bos_token_id": None,
                     "eos_token_id": tokenizer.eos_token_id},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
                       "out_hidden_size": 32, "fullatt_block_indexes": [0], **(vision or {})},
        image_token_id=ids[0], video_token_id=ids[1], vision_start_token_id=ids[2], vision_end_token_id=ids[3])
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_qwen_image_pipeline(seed: int = 0):
    """A QwenImagePipeline with tiny random components: VAE factor 2 (4 px multiples), 4 latent channels, one
    transformer block, Qwen2.5-VL text encoder of width 32, and Qwen-Image's scheduler settings (dynamic shift
    with base/max shift 0.5/0.9 over 256..8192 tokens, exponential time shift, terminal sigma 0.02).

    The shipped tiny Qwen2 tokenizer splits the template's system turn into 66 tokens, not the real tokenizer's
    34, so the pipeline's drop_idx=34 keeps part of the system turn in the embeddings; harmless for tests, and
    the pipeline does the same with the same tokenizer."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZERS / "qwen2_vl")
    text_encoder = _tiny_text_encoder(tokenizer, seed)
    torch.manual_seed(seed + 1)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=1,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                              axes_dims_rope=(4, 6, 6)).eval()
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLQwenImage(base_dim=4, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[False],
                                 latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.8, 1.2, 2.0]).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                                                base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
                                                time_shift_type="exponential")
    return QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                             transformer=transformer)


def tiny_qwen_image(seed: int = 0, **options):
    return QwenImageAdapter(tiny_qwen_image_pipeline(seed), **{"max_sequence_length": 128, **options})
