"""The artifact detector's training set, generated from the shapes world (`visalign.rewards.artifact` trains
and serves the detector): clean renders, and renders with one or two corruptions from ARTIFACT_KINDS (blur,
noise, broken shapes, extra blobs, faint background speckle), with a `labels.json` naming each artifact
image's kinds.

    write_artifact_set(out_dir)   # out_dir/clean/*.png, out_dir/artifact/*.png + labels.json
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from torch import Tensor

from visalign.rewards.artifact import ARTIFACT_KINDS
from visalign.world.grammar import sample_specs
from visalign.world.render import BACKGROUND, render_batch


def _background(image: np.ndarray) -> np.ndarray:
    """The plain background colour, [3, 1, 1]: the world's BACKGROUND."""
    return np.asarray(BACKGROUND, dtype=np.float32)[:, None, None]


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    return np.stack([ndimage.gaussian_filter(c, sigma, mode="nearest") for c in image])


def corrupt_blur(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gaussian blur, sigma 0.8-1.6 px (a 32×32 render's edges are one anti-aliased pixel wide)."""
    return _gaussian_blur(image, rng.uniform(0.8, 1.6))


def corrupt_noise(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Dense Gaussian noise, std 0.03-0.08 per pixel and channel."""
    return image + rng.normal(0.0, rng.uniform(0.03, 0.08), image.shape).astype(np.float32)


def corrupt_speckle(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Faint sparse speckle: 10-30% of the pixels shifted by +-0.03-0.08 (grey, all channels alike)."""
    mask = rng.random(image.shape[1:]) < rng.uniform(0.1, 0.3)
    amplitude = rng.uniform(0.03, 0.08) * rng.choice([-1.0, 1.0], size=image.shape[1:])
    return image + (mask * amplitude).astype(np.float32)[None]


def _foreground(image: np.ndarray) -> np.ndarray:
    """Pixels further than 0.15 (max over channels) from the background, as the verifier's cleanliness."""
    return np.abs(image - _background(image)).max(axis=0) > 0.15


def corrupt_broken_shape(image: np.ndarray, rng: np.random.Generator, attempts: int = 20) -> np.ndarray:
    """Cut part of an object out (filled with the background): a 2-3 px gap across it, or a notch of 40-60% of
    its box at a corner. A cut must remove at least 15% of the object's pixels (a notch in the empty corner of
    a triangle's box would change nothing); falls back to an extra blob when the image has no object."""
    foreground = _foreground(image)
    labels, _ = ndimage.label(foreground, structure=np.ones((3, 3)))
    boxes = [(i + 1, box) for i, box in enumerate(ndimage.find_objects(labels)) if box is not None]
    if not boxes:
        return corrupt_extra_blob(image, rng)
    for _ in range(attempts):
        index, (rows, cols) = boxes[rng.integers(len(boxes))]
        height, width = rows.stop - rows.start, cols.stop - cols.start
        cut = np.zeros(foreground.shape, dtype=bool)
        if rng.random() < 0.5:
            gap = int(rng.integers(2, 4))
            if rng.random() < 0.5:  # a horizontal gap through the object's middle third
                top = rows.start + int(rng.integers(height // 3, max(height // 3 + 1, 2 * height // 3 - gap + 1)))
                cut[top:top + gap, cols] = True
            else:
                left = cols.start + int(rng.integers(width // 3, max(width // 3 + 1, 2 * width // 3 - gap + 1)))
                cut[rows, left:left + gap] = True
        else:
            cut_h = max(2, round(height * rng.uniform(0.4, 0.6)))
            cut_w = max(2, round(width * rng.uniform(0.4, 0.6)))
            top = rows.start if rng.random() < 0.5 else rows.stop - cut_h
            left = cols.start if rng.random() < 0.5 else cols.stop - cut_w
            cut[top:top + cut_h, left:left + cut_w] = True
        obj = labels == index
        if (cut & obj).sum() >= 0.15 * obj.sum():
            break
    out = image.copy()
    out[:, cut] = _background(image)[:, :, 0]
    return out


def corrupt_extra_blob(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An irregular blob (2-3 overlapping discs of radius 1-2.5 px, anti-aliased) off the objects where possible,
    in a random colour at least 0.3 from the background (or a dark grey mark)."""
    size = image.shape[-1]
    occupied = ndimage.binary_dilation(np.abs(image - _background(image)).max(axis=0) > 0.05, iterations=2)
    for _ in range(20):
        cy, cx = rng.uniform(3, size - 3, 2)
        if not occupied[int(cy), int(cx)]:
            break
    ss = 4
    axis = (np.arange(size * ss) + 0.5) / ss
    inside = np.zeros((size * ss, size * ss), dtype=bool)
    for _ in range(int(rng.integers(2, 4))):
        dy, dx = rng.normal(0, 1.0, 2)
        radius = rng.uniform(1.0, 2.5)
        inside |= (axis[:, None] - cy - dy) ** 2 + (axis[None, :] - cx - dx) ** 2 <= radius**2
    alpha = inside.reshape(size, ss, size, ss).mean(axis=(1, 3)).astype(np.float32)
    background = _background(image)[:, 0, 0]
    colour = np.full(3, rng.uniform(0.0, 0.5), dtype=np.float32)  # a dark grey mark
    if rng.random() < 0.7:
        for _ in range(20):
            colour = rng.uniform(0.0, 1.0, 3).astype(np.float32)
            if np.abs(colour - background).max() >= 0.3:
                break
    return image * (1 - alpha) + colour[:, None, None] * alpha


CORRUPTIONS = {
    "blur": corrupt_blur,
    "noise": corrupt_noise,
    "broken_shape": corrupt_broken_shape,
    "extra_blob": corrupt_extra_blob,
    "speckle": corrupt_speckle,
}


def corrupt(image: Tensor, kinds: tuple[str, ...], rng: np.random.Generator) -> Tensor:
    """Apply the named corruptions in order to one image [3, H, W] in [0, 1]; the result is clipped to [0, 1]."""
    out = image.numpy().astype(np.float32)
    for kind in kinds:
        if kind not in CORRUPTIONS:
            raise ValueError(f"artifact kind {kind!r} is not one of {tuple(CORRUPTIONS)}")
        out = CORRUPTIONS[kind](out, rng)
    return torch.from_numpy(np.clip(out, 0.0, 1.0))


def make_artifact_set(num_clean: int, num_artifact: int, seed: int = 0, kinds: tuple[str, ...] = ARTIFACT_KINDS,
                      two_kinds_fraction: float = 0.25) -> tuple[Tensor, Tensor, Tensor]:
    """A labelled set from the shapes world: (images [N, 3, 32, 32], is_artifact [N], kind labels [N, K]).

    The first `num_clean` images are clean renders of prompts drawn from all templates; the rest are other
    renders with one corruption (a second, different one with probability `two_kinds_fraction`). The kind
    labels follow `kinds`' order."""
    total = num_clean + num_artifact
    renders = render_batch(sample_specs(total, generator=seed), seed)
    rng = np.random.default_rng(seed)
    labels = torch.zeros(total, len(kinds))
    images = [renders[i] for i in range(num_clean)]
    for i in range(num_clean, total):
        chosen = [int(rng.integers(len(kinds)))]
        if rng.random() < two_kinds_fraction and len(kinds) > 1:
            chosen.append(int(rng.choice([k for k in range(len(kinds)) if k != chosen[0]])))
        labels[i, chosen] = 1.0
        images.append(corrupt(renders[i], tuple(kinds[k] for k in chosen), rng))
    is_artifact = torch.cat([torch.zeros(num_clean), torch.ones(num_artifact)])
    return torch.stack(images), is_artifact, labels


def _save_png(image: Tensor, path: Path) -> None:
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(array).save(path)


def write_artifact_set(out_dir: str | Path, num_clean: int = 1500, num_artifact: int = 1500, seed: int = 0,
                       kinds: tuple[str, ...] = ARTIFACT_KINDS) -> tuple[Path, Path]:
    """Write `make_artifact_set` as PNGs: out_dir/clean/*.png, out_dir/artifact/*.png and
    out_dir/artifact/labels.json ({file name: [kinds]}). Returns (clean_dir, artifact_dir)."""
    images, is_artifact, labels = make_artifact_set(num_clean, num_artifact, seed, kinds)
    clean_dir, artifact_dir = Path(out_dir) / "clean", Path(out_dir) / "artifact"
    clean_dir.mkdir(parents=True, exist_ok=True)
    artifact_dir.mkdir(parents=True, exist_ok=True)
    names = {}
    for i, image in enumerate(images):
        if is_artifact[i]:
            name = f"{i:06d}.png"
            _save_png(image, artifact_dir / name)
            names[name] = [kinds[k] for k in labels[i].nonzero().flatten().tolist()]
        else:
            _save_png(image, clean_dir / f"{i:06d}.png")
    (artifact_dir / "labels.json").write_text(json.dumps(names, indent=1))
    return clean_dir, artifact_dir
