"""Differentiable, tensor-only image preprocessing for the reward models' encoders.

Every function takes images as a float tensor [..., 3, H, W] in [0, 1] (leading dimensions, e.g. video
frames, are kept) and is built from `torch.nn.functional` ops, so gradients reach the pixels. Each one
reproduces a reference pipeline's geometry and constants:

    clip_preprocess     short side -> N (bicubic, antialiased), centre crop N×N, normalise
                        (OpenAI CLIP `clip/clip.py:_transform`, open_clip `image_transform(is_train=False)`,
                        HF `CLIPImageProcessor`)
    hpsv2_preprocess    long side -> N (bicubic), zero-pad to N×N, normalise
                        (tgxs002/HPSv2 `hpsv2/src/open_clip/transform.py:ResizeMaxSize`)
    siglip_preprocess   squash to N×N (bicubic), normalise with mean = std = 0.5 (HF `SiglipImageProcessor`)

Interpolation matches torchvision's tensor `Resize(interpolation=BICUBIC, antialias=True)` exactly (it calls
`F.interpolate(mode="bicubic", align_corners=False, antialias=True)`, whose kernel is PIL's a = -0.5 cubic).
References that resize PIL/uint8 images (OpenAI CLIP, HF processors) resample in two 8-bit passes, clipping
the bicubic overshoot after each; `clamp=True` reproduces the clipping, not the rounding, which leaves at most
about 1/255 per pixel (measured in tests/test_rewards_clip.py).
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

# OpenAI CLIP (clip/clip.py `_transform`); also used by open_clip's LAION ViT-H/L checkpoints and HF CLIP.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# SigLIP (HF `SiglipImageProcessor` defaults, IMAGENET_STANDARD_MEAN/STD).
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

CropRounding = Literal["round", "floor"]


def _flat(images: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    if images.ndim < 3 or images.shape[-3] != 3:
        raise ValueError(f"images must be a float tensor [..., 3, H, W], got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [0, 1], got {images.dtype}")
    lead = tuple(images.shape[:-3])
    flat = images.reshape(-1, *images.shape[-3:])
    # interpolate's bicubic kernels run in float32/float64 (torchvision upcasts the same way).
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    return flat, lead


def _unflat(images: Tensor, lead: tuple[int, ...]) -> Tensor:
    return images.reshape(*lead, *images.shape[-3:])


def resize(images: Tensor, size: tuple[int, int], *, antialias: bool = True, clamp: bool = False) -> Tensor:
    """Bicubic resize to (height, width), as torchvision's tensor `F.resize` (a no-op when the size is equal).

    `clamp=True` resamples width then height and clips each pass to [0, 1], as 8-bit resamplers do."""
    flat, lead = _flat(images)
    height, width = flat.shape[-2:]
    if (height, width) == tuple(size):
        return _unflat(flat, lead)
    if not clamp:
        flat = F.interpolate(flat, size=tuple(size), mode="bicubic", align_corners=False, antialias=antialias)
        return _unflat(flat, lead)
    # 8-bit resamplers (Pillow `ImagingResampleInner`, torch's uint8 antialias kernel) run a horizontal pass,
    # store it clipped to [0, 255], then a vertical pass; clipping between the passes matters at hard edges.
    for pass_size in ((height, size[1]), tuple(size)):
        if tuple(flat.shape[-2:]) != pass_size:
            flat = F.interpolate(flat, size=pass_size, mode="bicubic", align_corners=False,
                                 antialias=antialias)
            flat = flat.clamp(0.0, 1.0)
    return _unflat(flat, lead)


def shortest_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Output (h, w) with the short side = `size`, the long side int(size * long / short) (truncated), as in
    torchvision `_compute_resized_output_size` and HF `get_resize_output_image_size`."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def longest_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Output (h, w) with the long side = `size`, each side round(dim * size / long) (Python's round, half to
    even), in HPSv2 `ResizeMaxSize.forward`'s order of operations."""
    scale = size / float(max(height, width))
    return round(height * scale), round(width * scale)


def center_crop(images: Tensor, size: int | tuple[int, int], *, rounding: CropRounding = "round") -> Tensor:
    """Centre crop to (height, width).

    The offset of an odd margin differs between references by one pixel:
    rounding="round": int(round(margin / 2)), Python's round (half to even) — torchvision `center_crop`
                      (OpenAI CLIP, open_clip, LAION aesthetic, Hessel CLIPScore).
    rounding="floor": margin // 2 — HF `CLIPImageProcessor` (both backends; PickScore, torchmetrics)."""
    crop_h, crop_w = (size, size) if isinstance(size, int) else size
    height, width = images.shape[-2:]
    if crop_h > height or crop_w > width:
        raise ValueError(f"crop {crop_h}×{crop_w} is larger than the image {height}×{width}")
    if rounding == "round":
        top, left = round((height - crop_h) / 2.0), round((width - crop_w) / 2.0)
    elif rounding == "floor":
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
    else:
        raise ValueError(f"rounding must be 'round' or 'floor', got {rounding!r}")
    return images[..., top:top + crop_h, left:left + crop_w]


def normalize(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """(x - mean) / std per channel on [..., 3, H, W]."""
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).view(3, 1, 1)
    return (images - mean_t) / std_t


def _per_image_on_cpu(transform):
    """Run a preprocessing pipeline one image at a time on a CPU: a whole batch's intermediates (resampled,
    normalised) are big enough that allocating them (fresh pages each call) cost more than the arithmetic, about
    1.5x a Pillow pipeline on 16 images of 512x384 against 0.96x per image (bench/reward_throughput.py). Other
    devices take the batch. The result is identical."""
    @functools.wraps(transform)
    def run(images: Tensor, *args, **kwargs) -> Tensor:
        flat, lead = _flat(images)
        if flat.device.type != "cpu" or flat.shape[0] == 1:
            return transform(images, *args, **kwargs)
        out = torch.cat([transform(flat[i:i + 1], *args, **kwargs) for i in range(flat.shape[0])])
        return out.reshape(*lead, *out.shape[1:])
    return run


@_per_image_on_cpu
def clip_preprocess(images: Tensor, size: int = 224, *, mean: tuple[float, ...] = OPENAI_CLIP_MEAN,
                    std: tuple[float, ...] = OPENAI_CLIP_STD, crop_rounding: CropRounding = "round",
                    antialias: bool = True, clamp: bool = False) -> Tensor:
    """CLIP eval transform: short side -> `size` (bicubic), centre crop size×size, normalise.

    With the defaults this equals torchvision `Compose([Resize(size, BICUBIC), CenterCrop(size), Normalize])`
    on a tensor, i.e. open_clip's `image_transform(size, is_train=False)`. For HF `CLIPImageProcessor` pass
    crop_rounding="floor"; for references that resize uint8/PIL images pass clamp=True (see module doc)."""
    height, width = images.shape[-2:]
    resized = resize(images, shortest_side_size(height, width, size), antialias=antialias, clamp=clamp)
    return normalize(center_crop(resized, size, rounding=crop_rounding), mean, std)


def resize_longest_side_and_pad(images: Tensor, size: int, *, fill: float = 0.0,
                                antialias: bool = True) -> Tensor:
    """HPSv2 `ResizeMaxSize(size, fill=0)`: long side -> `size` (bicubic, on the float tensor, so no
    clipping), then pad to size×size with `fill`; left/top get margin // 2, right/bottom the rest.

    One deliberate difference: the reference skips the padding when the long side already equals `size`, which
    would hand a non-square image to a fixed-size ViT and fail; here the padding is always applied."""
    height, width = images.shape[-2:]
    new_h, new_w = longest_side_size(height, width, size)
    resized = resize(images, (new_h, new_w), antialias=antialias)
    pad_h, pad_w = size - new_h, size - new_w
    return F.pad(resized, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=fill)


@_per_image_on_cpu
def hpsv2_preprocess(images: Tensor, size: int = 224, *, antialias: bool = True) -> Tensor:
    """HPSv2 `preprocess_val` (`image_transform(..., resize_longest_max=True)`): ToTensor, ResizeMaxSize(size)
    with fill 0 (black, before normalisation), OpenAI normalisation.

    `antialias=True` is what torchvision >= 0.17 does for the reference's tensor resize; for the torchvision
    of HPSv2's release (antialias=None, i.e. off for tensors) pass antialias=False."""
    return normalize(resize_longest_side_and_pad(images, size, fill=0.0, antialias=antialias),
                     OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)


@_per_image_on_cpu
def siglip_preprocess(images: Tensor, size: int = 384, *, antialias: bool = True,
                      clamp: bool = True) -> Tensor:
    """SigLIP: squash-resize to size×size (bicubic, aspect ratio not kept, no crop), mean = std = 0.5.

    `clamp=True` by default because the reference (HF `SiglipImageProcessor`) resizes uint8 images."""
    return normalize(resize(images, (size, size), antialias=antialias, clamp=clamp), SIGLIP_MEAN, SIGLIP_STD)


__all__ = [
    "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "SIGLIP_MEAN", "SIGLIP_STD", "center_crop", "clip_preprocess",
    "hpsv2_preprocess", "longest_side_size", "normalize", "resize", "resize_longest_side_and_pad",
    "shortest_side_size", "siglip_preprocess",
]


def to_uint8_hwc(images: Tensor) -> list:
    """[B, 3, H, W] in [0, 1] -> list of H×W×3 uint8 numpy arrays, what an 8-bit image file gives a processor."""
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return list(pixels.permute(0, 2, 3, 1).cpu().numpy())
