"""Pixels to files and back: 8-bit conversion, image grids, PNG / GIF output, image files read (and resized) as
pixels. Pixels are floats in [0, 1], [B, 3, H, W] (images) or [B, F, 3, H, W] (video)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def to_uint8(pixels: Tensor) -> np.ndarray:
    """Round to 8 bits, as a saved PNG holds them."""
    return (pixels.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu().numpy()).astype(np.uint8)


def read_image(path: str | Path, size: tuple[int, int] | None = None) -> Tensor:
    """An image file as a float tensor [3, H, W] in [0, 1] (RGB; alpha dropped); with `size` (height, width),
    resized with Lanczos as diffusers' `VaeImageProcessor.resize` does. ValueError names an unreadable file."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if size is not None and image.size != (size[1], size[0]):
                image = image.resize((size[1], size[0]), resample=Image.Resampling.LANCZOS)
            array = np.asarray(image, dtype=np.float32) / 255.0
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from None
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def image_grid(images: Tensor, columns: int | None = None, pad: int = 2) -> Tensor:
    """[B, 3, H, W] → one [3, H', W'] grid with white padding."""
    b, c, h, w = images.shape
    columns = columns or min(b, 8)
    rows = (b + columns - 1) // columns
    grid = torch.ones(c, rows * (h + pad) + pad, columns * (w + pad) + pad)
    for i in range(b):
        r, col = divmod(i, columns)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h,
             pad + col * (w + pad): pad + col * (w + pad) + w] = images[i]
    return grid


def save_pixels(pixels: Tensor, out: str | Path, scale: int = 1) -> Path:
    """Save a batch as one PNG grid (images) or one animated GIF of frame grids (video)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    frames = [image_grid(pixels)] if pixels.ndim == 4 else [image_grid(pixels[:, f]) for f in range(pixels.shape[1])]
    pil = [Image.fromarray(to_uint8(f.permute(1, 2, 0))) for f in frames]
    if scale > 1:
        pil = [im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in pil]
    if len(pil) == 1 and out.suffix.lower() != ".gif":
        pil[0].save(out)
    else:
        if out.suffix.lower() != ".gif":
            raise ValueError(f"video output needs a .gif path, got {str(out)!r}")
        pil[0].save(out, save_all=True, append_images=pil[1:], duration=120, loop=0)
    return out


def preview_image(pixels: Tensor, scale: int = 1, max_frames: int = 8) -> np.ndarray:
    """One still 8-bit RGB image [H', W', 3] of a batch, for experiment trackers: the grid `save_pixels` writes
    for images; for video, a row per sample of up to `max_frames` evenly spaced frames (a frame strip, read left
    to right), since trackers show stills. `scale` enlarges by pixel repetition, as `save_pixels` does."""
    if pixels.ndim == 5:
        n = pixels.shape[1]
        frames = torch.linspace(0, n - 1, min(n, max_frames)).round().long()
        grid = image_grid(pixels[:, frames].flatten(0, 1), columns=len(frames))
    else:
        grid = image_grid(pixels)
    image = to_uint8(grid.permute(1, 2, 0))
    return image.repeat(scale, axis=0).repeat(scale, axis=1) if scale > 1 else image
