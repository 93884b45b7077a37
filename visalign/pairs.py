"""Preference-pair files, shared by reward-model evaluation (`visalign rewards eval`) and offline DPO.

One JSON object per line (JSONL); image paths are absolute or relative to the file's directory:

    {"prompt": "a red dog", "chosen": "img/0001_a.png", "rejected": "img/0001_b.png"}
    {"prompt": "two cats", "chosen": "img/0002_a.png", "rejected": "img/0002_b.png", "tie": true}

`tie` (optional, default false) marks pairs the annotators judged equal; for them the chosen/rejected order
carries no meaning. Every row is checked before any work starts; an error names the row (1-based line).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class Pair:
    prompt: str
    chosen: Path
    rejected: Path
    tie: bool = False
    line: int = 0


class PairFileError(ValueError):
    """A preference-pair file or one of its rows is malformed."""


def read_pairs(path: str | Path) -> list[Pair]:
    path = Path(path)
    if not path.is_file():
        raise PairFileError(f"no pair file at {path}")
    if path.suffix.lower() not in (".jsonl", ".json"):
        raise PairFileError(f"{path}: pair files are JSONL (one object per line), got suffix {path.suffix!r}")
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
                raise PairFileError(f"{where}: '{key}' must be an image path, got {value!r}")
            file = Path(value) if Path(value).is_absolute() else path.parent / value
            if not file.is_file():
                raise PairFileError(f"{where}: '{key}' image {file} does not exist")
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                raise PairFileError(f"{where}: '{key}' {file} is not an image ({'/'.join(IMAGE_SUFFIXES)})")
            files.append(file)
        pairs.append(Pair(prompt, files[0], files[1], tie, line_no))
    if not pairs:
        raise PairFileError(f"{path} holds no pairs")
    return pairs


def load_image(path: str | Path) -> Tensor:
    """An image file as a float tensor [3, H, W] in [0, 1] (RGB; alpha dropped)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    except (OSError, ValueError) as err:
        raise PairFileError(f"cannot read image {path}: {err}") from None
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
