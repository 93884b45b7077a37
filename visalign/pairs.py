"""Preference-pair files, shared by reward-model evaluation (`visalign rewards eval`) and offline DPO.

One JSON object per line (JSONL); media paths are absolute or relative to the file's directory:

    {"prompt": "a red dog", "chosen": "img/0001_a.png", "rejected": "img/0001_b.png"}
    {"prompt": "two cats", "chosen": "img/0002_a.png", "rejected": "img/0002_b.png", "tie": true}

`tie` (optional, default false) marks pairs the annotators judged equal; for them the chosen/rejected order
carries no meaning. Every row is checked before any work starts; an error names the row (1-based line).

For video models (`read_pairs(..., num_frames=F)`) `chosen` / `rejected` are videos, either an animated GIF or
a directory of frame images (frame order = sorted file names, so number them with zero padding: 00000.png,
00001.png, ...). Other video files (.mp4, .webm, ...) are not read: their decoders (imageio / av, the `video`
extra) are not installed by default; convert them first, e.g. `ffmpeg -i clip.mp4 clip/%05d.png`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageSequence
from torch import Tensor

from visalign.media import read_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_SUFFIXES = (".gif",)  # plus directories of frames
UNREAD_VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".avi", ".mkv")


@dataclass(frozen=True)
class Pair:
    prompt: str
    chosen: Path
    rejected: Path
    tie: bool = False
    line: int = 0


class PairFileError(ValueError):
    """A preference-pair file or one of its rows is malformed."""


def read_pairs(path: str | Path, size: tuple[int, int] | None = None, num_frames: int | None = None) -> list[Pair]:
    """Read and check a pair file. Without `num_frames` every `chosen` / `rejected` must be an image; with it,
    a video (animated GIF or frame directory) of exactly that many frames. With `size` = (height, width) every
    image or frame must have that size. Errors name the row and the field."""
    path = Path(path)
    if not path.is_file():
        raise PairFileError(f"no pair file at {path}")
    if path.suffix.lower() not in (".jsonl", ".json"):
        raise PairFileError(f"{path}: pair files are JSONL (one object per line), got suffix {path.suffix!r}")
    kind = "image" if num_frames is None else "video"
    pairs = []
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise PairFileError(f"{where}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise PairFileError(f"{where}: each row must be a JSON object, got {type(row).__name__}")
        unknown = set(row) - {"prompt", "chosen", "rejected", "tie"}
        if unknown:
            raise PairFileError(f"{where}: unknown keys {sorted(unknown)}; expected prompt, chosen, rejected, tie")
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise PairFileError(f"{where}: 'prompt' must be a non-empty string, got {prompt!r}")
        tie = row.get("tie", False)
        if not isinstance(tie, bool):
            raise PairFileError(f"{where}: 'tie' must be true or false, got {tie!r}")
        files = []
        for key in ("chosen", "rejected"):
            value = row.get(key)
            if not isinstance(value, str) or not value:
                raise PairFileError(f"{where}: '{key}' must be an {kind} path, got {value!r}")
            file = Path(value) if Path(value).is_absolute() else path.parent / value
            if not file.exists():
                raise PairFileError(f"{where}: '{key}' {kind} {file} does not exist")
            _check_media(file, f"{where}: '{key}'", size, num_frames)
            files.append(file)
        pairs.append(Pair(prompt, files[0], files[1], tie, line_no))
    if not pairs:
        raise PairFileError(f"{path} holds no pairs")
    return pairs


def _check_media(file: Path, where: str, size: tuple[int, int] | None, num_frames: int | None) -> None:
    """Kind, frame count and size of one row's image or video (Pillow opens lazily: images are not decoded)."""

    suffix = file.suffix.lower()
    is_video = file.is_dir() or suffix in VIDEO_SUFFIXES
    if num_frames is None:
        if is_video:
            raise PairFileError(f"{where} {file} is a video; images are expected here (video pairs need a "
                                "video model, model.num_frames)")
        if suffix not in IMAGE_SUFFIXES:
            raise PairFileError(f"{where} {file} is not an image ({'/'.join(IMAGE_SUFFIXES)})")
        frames = [file]
    elif suffix in UNREAD_VIDEO_SUFFIXES:
        raise PairFileError(f"{where} {file}: {suffix} videos are not read (imageio / av are not installed); give "
                            f"an animated GIF or a directory of frames (ffmpeg -i {file.name} DIR/%05d.png)")
    elif not is_video:
        raise PairFileError(f"{where} {file} is not a video; a video model needs an animated GIF or a directory "
                            f"of frame images ({'/'.join(IMAGE_SUFFIXES)})")
    elif file.is_dir():
        frames = frame_files(file)
        names = [f.name for f in frames]
        if names != sorted(names, key=_natural_key):
            raise PairFileError(f"{where} frame directory {file}: sorted file names are not in frame-number order "
                                f"({', '.join(names[:4])}, ...); zero-pad the numbers (00000.png, 00001.png, ...)")
    else:
        frames = [file]
    count = len(frames)
    for frame in frames:
        try:
            with Image.open(frame) as im:
                hw = (im.height, im.width)
                if suffix in VIDEO_SUFFIXES:
                    count = im.n_frames
        except (OSError, ValueError) as err:
            raise PairFileError(f"{where} {frame} is not a readable image: {err}") from None
        if size is not None and hw != tuple(size):
            what = "image is" if num_frames is None else f"video {file} has frames of"
            raise PairFileError(f"{where} {what} {hw[0]}×{hw[1]}; the model trains at {size[0]}×{size[1]}")
    if num_frames is not None and count != num_frames:
        raise PairFileError(f"{where} video {file} has {count} frames; the model trains on {num_frames} "
                            "(model.num_frames)")


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def frame_files(directory: str | Path) -> list[Path]:
    """The frames of a frame directory: its image files, in sorted file-name order (other files are ignored)."""
    return sorted(p for p in Path(directory).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_image(path: str | Path) -> Tensor:
    """An image file as a float tensor [3, H, W] in [0, 1] (RGB; alpha dropped)."""
    try:
        return read_image(path)
    except ValueError as err:
        raise PairFileError(str(err)) from None


def load_video(path: str | Path) -> Tensor:
    """An animated GIF or a directory of frame images as a float tensor [F, 3, H, W] in [0, 1] (RGB)."""

    path = Path(path)
    if path.is_dir():
        return torch.stack([load_image(f) for f in frame_files(path)])
    try:
        with Image.open(path) as image:
            # Pillow composes each GIF frame with the previous ones (disposal), so every frame is a full picture.
            arrays = [np.asarray(frame.convert("RGB"), dtype=np.float32) / 255.0
                      for frame in ImageSequence.Iterator(image)]
    except (OSError, ValueError) as err:
        raise PairFileError(f"cannot read video {path}: {err}") from None
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
