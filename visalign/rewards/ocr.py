"""Text rendering accuracy: Flow-GRPO's OCR reward on RapidOCR's bundled ONNX models.

Flow-GRPO scores its OCR task by reading each image with PaddleOCR and comparing the text to the quoted text of
the prompt (yifan123/flow_grpo, `flow_grpo/ocr.py`, `OcrScorer.__call__`): both strings lose their spaces and are
lower-cased, the distance is 0 when the target occurs in the recognised text and the Levenshtein distance
otherwise, capped at the target's length, and the reward is 1 − distance / len(target), in [0, 1]; an image
where nothing is read scores 0.

Here the reader is `rapidocr` (the PP-OCR detection and recognition networks as ONNX files inside its wheel, run
by onnxruntime on CPU), built from those files by path so it never downloads anything. It runs as PaddleOCR 2.x
ran for Flow-GRPO: no angle classifier (`use_angle_cls=False`), the image's longer side capped at 960 pixels for
detection (`det_limit_type=max`, `det_limit_side_len=960`) and lines read with less than 0.5 confidence dropped
(`drop_score=0.5`; PaddleOCR `doc/doc_en/inference_args_en.md`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from rapidfuzz.distance import Levenshtein

from visalign.rewards.base import Reward, RewardError

TEXT_KEY = "text"  # a prompt's metadata key for its target text; wins over the prompt's quoted text
QUOTED = re.compile(r'"([^"]*)"')


def target_text(prompt: str | None, metadata: Mapping | None) -> str:
    """The text a prompt asks to be rendered: metadata["text"] when given, else the first double-quoted span of the
    prompt (`a sign that says "HELLO"` → HELLO), as Flow-GRPO's `prompt.split('"')[1]`."""
    if isinstance(metadata, Mapping) and TEXT_KEY in metadata:
        text = metadata[TEXT_KEY]
        if not isinstance(text, str) or not normalise(text):
            raise RewardError(f"ocr: metadata[{TEXT_KEY!r}]={text!r} must be a non-empty string")
        return text
    match = QUOTED.search(prompt or "")
    if match is None or not normalise(match.group(1)):
        raise RewardError(f"ocr: prompt {prompt!r} has no text to render: put it in double quotes "
                          f'(a sign that says "HELLO") or give metadata[{TEXT_KEY!r}]')
    return match.group(1)


def normalise(text: str) -> str:
    """Flow-GRPO's comparison form: spaces removed, lower case."""
    return text.replace(" ", "").lower()


def ocr_accuracy(recognised: str, target: str) -> float:
    """1 − d / len(target) with d the Levenshtein distance of the normalised strings, 0 when the target occurs in the
    recognised text, capped at len(target) (flow_grpo/ocr.py `OcrScorer.__call__`)."""
    recognised, target = normalise(recognised), normalise(target)
    distance = 0 if target in recognised else Levenshtein.distance(recognised, target)
    return 1 - min(distance, len(target)) / len(target)


def to_bgr_uint8(images: torch.Tensor) -> list[np.ndarray]:
    """[B, 3, H, W] in [0, 1] → B arrays H×W×3 uint8 in BGR, the channel order RapidOCR takes arrays in (rounded
    as Flow-GRPO's `ocr_score`: `(images * 255).round().clamp(0, 255)`)."""
    pixels = (images.detach().float().cpu() * 255).round().clamp(0, 255).to(torch.uint8)
    return [np.ascontiguousarray(image.permute(1, 2, 0).numpy()[..., ::-1]) for image in pixels]


def bundled_engine(text_score: float = 0.5, threads: int = 0):
    """A RapidOCR engine on the detection and recognition models inside the rapidocr package, given by path so no
    model or dictionary is ever downloaded (the recognition model carries its character set)."""
    import rapidocr  # imported here: onnxruntime loads only when the OCR reward is used

    models = Path(rapidocr.__file__).parent / "models"
    paths = {"Det": models / "PP-OCRv6_det_small.onnx", "Rec": models / "PP-OCRv6_rec_small.onnx"}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise RuntimeError(f"ocr: rapidocr's bundled models are missing ({', '.join(missing)}); reinstall with "
                           "pip install -c constraints.txt rapidocr")
    params = {"Global.use_cls": False, "Global.text_score": text_score, "Global.log_level": "error",
              "Det.limit_type": "max", "Det.limit_side_len": 960,
              **{f"{task}.model_path": str(path) for task, path in paths.items()}}
    if threads:
        params["EngineConfig.onnxruntime.intra_op_num_threads"] = threads
    return rapidocr.RapidOCR(params=params)


class OCRAccuracy(Reward):
    """Flow-GRPO's OCR reward: 1 − the normalised edit distance between the text the prompt asks for (its quoted
    text, or metadata["text"]) and the text RapidOCR reads in the image. In [0, 1]; CPU; not differentiable.

    Options: `text_score`, the confidence below which a read line is dropped (PaddleOCR's drop_score, 0.5), and
    `threads`, onnxruntime's threads per image (0: its default, all cores)."""

    name = "ocr"
    differentiable = False
    value_range = (0.0, 1.0)

    def __init__(self, text_score: float = 0.5, threads: int = 0, **kwargs):
        if not 0 <= text_score < 1:
            raise ValueError(f"ocr: text_score={text_score} must be in [0, 1)")
        if threads < 0:
            raise ValueError(f"ocr: threads={threads} must be >= 0 (0: onnxruntime's default)")
        super().__init__(**kwargs)
        self.engine = bundled_engine(text_score, threads)  # built once; its sessions load on the first image

    def read(self, image: np.ndarray) -> str:
        """The text RapidOCR reads in one BGR image, its lines joined in reading order ("" when none)."""
        return "".join(self.engine(image).txts or ())

    def score(self, *, prompts, images, videos, metadata):
        targets = [target_text(p, m) for p, m in zip(prompts, metadata or [None] * len(prompts), strict=True)]
        # RapidOCR reads one image per call.
        scores = [ocr_accuracy(self.read(image), target) for image, target in zip(to_bgr_uint8(images), targets,
                                                                                  strict=True)]
        return torch.tensor(scores, dtype=torch.float32)
