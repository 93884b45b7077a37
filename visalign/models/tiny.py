"""Tiny random-weight SD3 / FLUX / Wan pipelines, built offline from the real diffusers/transformers classes.

For tests and for anyone without weights: every component is the class the real checkpoint uses, at a few
thousand parameters, seeded, with the small tokenizers shipped in `visalign/assets/tiny_tokenizers`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from visalign.models.diffusers_adapters import FluxAdapter, SD3Adapter, WanAdapter

# diffusers and transformers are imported where a tiny model is built: they take seconds to import, and the
# rewards read this module's TOKENIZERS path.

TOKENIZERS = Path(__file__).resolve().parents[1] / "assets" / "tiny_tokenizers"


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(TOKENIZERS / "clip")


def _t5_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZERS / "t5")


def _clip_text(with_projection: bool, hidden: int = 32, projection: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(bos_token_id=512, eos_token_id=513, pad_token_id=513, hidden_size=hidden,
                            intermediate_size=37, layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2,
                            vocab_size=514, hidden_act="gelu", projection_dim=projection, max_position_embeddings=77)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config).eval()


def _t5(d_model: int = 64):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=98, d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5EncoderModel(config).eval()


def _kl_vae(latent_channels: int, seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4, 8),
                         layers_per_block=1, latent_channels=latent_channels, norm_num_groups=1,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                         scaling_factor=1.5035).eval()


def tiny_sd3_pipeline(seed: int = 0):
    """A StableDiffusion3Pipeline with tiny random components (VAE factor 2, 16 px multiples)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=1, in_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=64, pooled_projection_dim=64, out_channels=4).eval()
    torch.manual_seed(seed + 1)
    text_encoder = _clip_text(True)
    torch.manual_seed(seed + 2)
    text_encoder_2 = _clip_text(True)
    torch.manual_seed(seed + 3)
    text_encoder_3 = _t5(64)
    vae = _kl_vae(4, seed + 4)
    return StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=transformer, vae=vae,
        text_encoder=text_encoder, tokenizer=_clip_tokenizer(), text_encoder_2=text_encoder_2,
        tokenizer_2=_clip_tokenizer(), text_encoder_3=text_encoder_3, tokenizer_3=_t5_tokenizer())


def tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True):
    """A FluxPipeline with tiny random components (guidance embedding on, as FLUX.1-dev)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
                                         guidance_embeds=guidance_embeds).eval()
    torch.manual_seed(seed + 1)
    text_encoder = _clip_text(False)
    torch.manual_seed(seed + 2)
    text_encoder_2 = _t5(32)
    vae = _kl_vae(1, seed + 3)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(scheduler=scheduler, transformer=transformer, vae=vae, text_encoder=text_encoder,
                        tokenizer=_clip_tokenizer(), text_encoder_2=text_encoder_2, tokenizer_2=_t5_tokenizer())


def tiny_wan_pipeline(seed: int = 0):
    """A WanPipeline (Wan2.1 layout) with tiny random components (VAE 8x spatial, 4x temporal)."""
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    torch.manual_seed(seed + 1)
    text_encoder = _t5(32)
    torch.manual_seed(seed + 2)
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                        in_channels=16, out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32,
                                        num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        rope_max_seq_len=32).eval()
    return WanPipeline(tokenizer=_t5_tokenizer(), text_encoder=text_encoder, vae=vae, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))


def tiny_sd3(seed: int = 0, **options):
    return SD3Adapter(tiny_sd3_pipeline(seed), **{"max_sequence_length": 32, **options})


def tiny_flux(seed: int = 0, **options):
    return FluxAdapter(tiny_flux_pipeline(seed), **{"max_sequence_length": 32, **options})


def tiny_wan(seed: int = 0, **options):
    return WanAdapter(tiny_wan_pipeline(seed), **{"max_sequence_length": 32, **options})
