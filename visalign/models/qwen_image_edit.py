"""Qwen-Image-Edit (QwenImageEditPipeline): Qwen-Image that edits a source image.

The source image conditions twice, as the pipeline does: Qwen2.5-VL reads it as vision input under the edit prompt
template (its image tokens stay in the text embeddings), and the VAE encodes it into latents whose packed tokens are
appended to the noisy tokens with their own `img_shapes` entry; only the noisy tokens' outputs are kept. Both travel
in the conditioning, the negative branch's included (true CFG sees the image too).

The same adapter serves Qwen-Image-Edit-2509 / 2511 (QwenImageEditPlusPipeline, chosen from the checkpoint's
model_index.json) with one source image per prompt: there the text encoder sees the image at 384x384 px area under
a "Picture 1:" prefix, the VAE at 1024x1024 px area, and 2511's `zero_cond_t` is handled by the transformer from
`img_shapes`. The tests check that our ODE sampler reproduces both pipelines' output for the same seeds (<= 1e-4).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from visalign.models.base import Conditioning, RequestRules, read_model_config
from visalign.models.diffusers_adapters import _load_pipeline
from visalign.models.qwen_image import QwenImageAdapter, _tiny_text_encoder, tiny_qwen_image_pipeline
from visalign.models.tiny import TOKENIZERS

# The source image's area in pixels, from which both pipelines size it for the aspect ratio it has
# (`calculate_dimensions`): QwenImageEditPipeline.__call__'s 1024 * 1024 (one size for the text encoder and the
# VAE); QwenImageEditPlusPipeline's VAE_IMAGE_SIZE and CONDITION_IMAGE_SIZE.
IMAGE_AREA = 1024 * 1024
PLUS_VISION_AREA = 384 * 384
PIPELINES = ("QwenImageEditPipeline", "QwenImageEditPlusPipeline")


def condition_size(area: int, height: int, width: int) -> tuple[int, int]:
    """(height, width) the pipelines give a height x width source image, as their `calculate_dimensions(area,
    width / height)`: about `area` pixels at the image's aspect ratio, sides rounded to multiples of 32."""
    ratio = width / height
    w = round(math.sqrt(area * ratio) / 32) * 32
    h = round(math.sqrt(area * ratio) / ratio / 32) * 32
    if h <= 0 or w <= 0:
        raise ValueError(f"a source image of area {area} px at aspect ratio {width}:{height} rounds to {w}x{h}: "
                         "give a larger area")
    return h, w


def _padded(embeds: Tensor, mask: Tensor | None, length: int) -> dict[str, Tensor]:
    """Embeddings and boolean mask padded to `length` tokens (encode_prompt returns mask=None when none is padded)."""
    batch, n, _ = embeds.shape
    mask = torch.ones(batch, n, dtype=torch.bool, device=embeds.device) if mask is None else mask.bool()
    return {"encoder_hidden_states": F.pad(embeds, (0, 0, 0, length - n)),
            "encoder_hidden_states_mask": F.pad(mask, (0, length - n))}


class QwenImageEditAdapter(QwenImageAdapter):
    """Qwen-Image-Edit (QwenImageEditPipeline; also QwenImageEditPlusPipeline, 2509 / 2511, one image per prompt).

    Source images come in at the run's height x width (a prompt file's `source_image`, resized) and are sized as
    the pipeline sizes its input: `image_area` pixels at their aspect ratio (1024 x 1024 for a square image;
    `vision_area` for what the Plus pipeline's text encoder sees). The pipeline reads each source file at its own
    aspect ratio; ours has the run's, so choose a run size of the sources' aspect ratio (1024 x 1024 for square
    ones keeps both the same and the source unresized). `max_sequence_length` counts the text tokens (the
    template's tail included) besides the source image's tokens, which Qwen2.5-VL adds; embeddings are padded to
    their sum.
    """

    name = "qwen-image-edit"
    edits = True

    def __init__(self, pipe, max_sequence_length: int = 512, image_area: int | None = None,
                 vision_area: int | None = None):
        if type(pipe).__name__ not in PIPELINES:
            raise ValueError(f"{self.name} runs {' or '.join(PIPELINES)}, not {type(pipe).__name__}")
        super().__init__(pipe, max_sequence_length)
        self.plus = type(pipe).__name__ == "QwenImageEditPlusPipeline"
        self.image_area = image_area or IMAGE_AREA
        # QwenImageEditPipeline gives the text encoder the image the VAE encodes; the Plus pipeline a smaller one.
        self.vision_area = vision_area or (PLUS_VISION_AREA if self.plus else self.image_area)

    @classmethod
    def from_pretrained(cls, path, torch_dtype=torch.float32, device="cpu", cpu_offload=False, **kwargs):
        import diffusers

        index = read_model_config(path, "model_index.json") or {}
        name = index.get("_class_name", PIPELINES[0])
        if name not in PIPELINES:
            raise ValueError(f"{path} holds a {name}; {cls.name} loads {' or '.join(PIPELINES)}")
        return cls(_load_pipeline(getattr(diffusers, name), path, torch_dtype, device, cpu_offload), **kwargs)

    @classmethod
    def request_rules(cls, path) -> RequestRules | None:
        """Qwen-Image's, marked as an editing model's."""
        rules = super().request_rules(path)
        return None if rules is None else replace(rules, edits=True)

    # ---- source images and text ----------------------------------------------------------------------
    def _image_tokens(self, height: int, width: int) -> int:
        """How many tokens Qwen2.5-VL's processor makes of a height x width image (patches / merge_size^2)."""
        processor = self.pipe.processor.image_processor
        return processor.get_number_of_image_patches(height, width, {}) // processor.merge_size ** 2

    @torch.no_grad()
    def encode_prompts(self, prompts, negative_prompts=None, cfg=True, *, images: Tensor):
        """The pipeline's `encode_prompt` with each prompt's source image, per branch (the negative prompt, ""
        by default, sees the image too), plus the image's VAE latents (`_encode_vae_image`: the posterior's mode,
        normalised). Images are sized as `__call__` step 3 does: resized with the pipeline's own
        `image_processor` (Lanczos, on 8-bit images as the pipeline takes PIL ones; ours come from image files,
        so converting them back is exact)."""
        prompts = list(prompts)
        if images.ndim != 4 or images.shape[:2] != (len(prompts), 3):
            raise ValueError(f"{self.name}: images must be [{len(prompts)}, 3, H, W] in [0, 1], one per prompt; "
                             f"got {tuple(images.shape)}")
        negatives = list(negative_prompts) if negative_prompts is not None else [""] * len(prompts)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        processor = self.pipe.image_processor
        sources = processor.numpy_to_pil(processor.pt_to_numpy(images.float().cpu()))
        vision_size = condition_size(self.vision_area, *images.shape[-2:])
        vision_images = [processor.resize(image, *vision_size) for image in sources]
        pixels = processor.preprocess(sources, *condition_size(self.image_area, *images.shape[-2:]))
        vae = self.pipe.vae
        latents = self.pipe._encode_vae_image(pixels[:, :, None].to(self.device, vae.dtype), None)[:, :, 0].float()
        length = self.max_sequence_length + self._image_tokens(*vision_size)
        cond = {**self._encode_with(prompts, vision_images, length), "image_latents": latents}
        uncond = {**self._encode_with(negatives, vision_images, length), "image_latents": latents} if cfg else None
        return Conditioning(cond, uncond, prompts)

    def _encode_with(self, prompts: list[str], images: list, length: int) -> dict[str, Tensor]:
        """Text embeddings of prompts with their images, padded to `length`. The Plus pipeline's template numbers a
        list of images as pictures of one prompt, so there each prompt is encoded alone."""
        if not self.plus:
            return self._encode_with_one(prompts, images, length)
        rows = [self._encode_with_one([p], [im], length) for p, im in zip(prompts, images, strict=True)]
        return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}

    def _encode_with_one(self, prompts: list[str], images: list, length: int) -> dict[str, Tensor]:
        embeds, mask = self.pipe.encode_prompt(prompt=prompts, image=images, device=self.device)
        if embeds.shape[1] > length:
            raise ValueError(f"{self.name}: a prompt takes {embeds.shape[1] - (length - self.max_sequence_length)} "
                             f"text tokens besides its image's; max_sequence_length={self.max_sequence_length}")
        return _padded(embeds, mask, length)

    # ---- denoiser ------------------------------------------------------------------------------------
    def _velocity(self, latents, sigma, embeds, guidance_scale):
        b, _, h, w = latents.shape
        source = embeds["image_latents"].to(latents.dtype)
        hs, ws = source.shape[-2:]
        # The padding past the batch's longest prompt is cut, and the timestep formed, as QwenImageAdapter does.
        mask = embeds["encoder_hidden_states_mask"]
        length = int(mask.sum(1).max())
        timestep = (sigma * self.pipe.scheduler.config.num_train_timesteps).to(latents.dtype) / 1000
        # As QwenImageEditPipeline.__call__: the source's tokens follow the noisy ones, each with its img_shapes
        # entry, and only the noisy tokens' outputs are the prediction.
        tokens = torch.cat([self._pack(latents), self._pack(source)], dim=1)
        out = self.net(hidden_states=tokens, timestep=timestep,
                       encoder_hidden_states=embeds["encoder_hidden_states"][:, :length].to(latents.dtype),
                       encoder_hidden_states_mask=mask[:, :length],
                       img_shapes=[[(1, h // 2, w // 2), (1, hs // 2, ws // 2)]] * b, return_dict=False)[0]
        return self._unpack(out[:, : (h // 2) * (w // 2)], h, w)


# ---- the tiny build --------------------------------------------------------------------------------------

# Qwen2.5-VL's vision patching at tiny size: 4 px patches merged 2x2, so a 32 px square image is 16 tokens.
TINY_VISION = {"patch_size": 4, "temporal_patch_size": 2, "merge_size": 2}
TINY_AREA = 32 * 32  # the tiny adapter's source image area (the smallest calculate_dimensions allows)


def _tiny_processor(tokenizer):
    """Qwen2VLProcessor with the committed tiny Qwen2-VL tokenizer and image / video processors (JSON-only
    configs) patching as the tiny vision tower does; 256..16384 px per image (the real one's 56^2..3584^2)."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    sizes = {**TINY_VISION, "min_pixels": 16 * 16, "max_pixels": 128 * 128}
    return Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**sizes), tokenizer=tokenizer,
                            video_processor=Qwen2VLVideoProcessor(**sizes))


def tiny_qwen_image_edit_pipeline(seed: int = 0, plus: bool = False):
    """A QwenImageEditPipeline (or, with `plus`, a QwenImageEditPlusPipeline) with tiny-qwen-image's transformer,
    VAE and scheduler, and a Qwen2.5-VL text encoder whose 1-block vision tower reads 4 px patches.

    As for tiny-qwen-image, the tiny tokenizer splits the template's system turn into more tokens than the
    real one, so the pipeline's drop_idx=64 keeps part of it in the embeddings; the pipeline does the same."""
    import diffusers
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZERS / "qwen2_vl")
    components = tiny_qwen_image_pipeline(seed).components
    vision = {"patch_size": TINY_VISION["patch_size"], "spatial_merge_size": TINY_VISION["merge_size"],
              "temporal_patch_size": TINY_VISION["temporal_patch_size"], "window_size": 16}
    components.update(text_encoder=_tiny_text_encoder(tokenizer, seed, vision), tokenizer=tokenizer,
                      processor=_tiny_processor(tokenizer))
    return getattr(diffusers, PIPELINES[plus])(**components)


def tiny_qwen_image_edit(seed: int = 0, **options):
    return QwenImageEditAdapter(tiny_qwen_image_edit_pipeline(seed),
                                **{"max_sequence_length": 128, "image_area": TINY_AREA, **options})
