"""`visalign sample`: generate images or videos with any adapter through the one sampling loop."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from visalign.media import read_image
from visalign.models import DTYPES, FlowModelAdapter, check_model_options, list_models, load_model, request_rules
from visalign.models.base import encode
from visalign.sampling import SDEOptions, sample


@dataclass
class SampleConfig:
    """What to generate and how. Every field can be set in YAML or overridden as `field=value`."""

    model: str = field(default="tiny-sd3", metadata={"help": f"registered model ({', '.join(list_models())}) "
                                                              "or dotted path to a factory"})
    model_path: str | None = field(default=None, metadata={"help": "local directory or hub id of the weights"})
    model_options: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "the adapter's options (`visalign models` lists them), e.g. {max_sequence_length: 256}"})
    lora: str | None = field(default=None, metadata={"help": "diffusers-format LoRA to load before sampling"})
    prompts: list[str] = field(default_factory=lambda: ["a red circle"], metadata={"help": "one sample each"})
    negative_prompt: str | None = field(default=None, metadata={"help": "negative prompt for CFG"})
    source_images: list[str] | None = field(default=None, metadata={
        "help": "editing models: image files the prompts edit, one for all prompts or one per prompt"})
    steps: int = field(default=20, metadata={"ge": 1, "help": "number of denoising steps"})
    guidance: float = field(default=4.5, metadata={"ge": 0, "help": "CFG scale (FLUX: embedded guidance)"})
    seed: int = field(default=0, metadata={"ge": 0, "help": "sample i uses seed + i"})
    height: int = field(default=32, metadata={"ge": 1, "help": "image height in pixels"})
    width: int = field(default=32, metadata={"ge": 1, "help": "image width in pixels"})
    num_frames: int | None = field(default=None, metadata={"ge": 1, "help": "video models: frames, 4k+1"})
    sde: Literal["ode", "flow_grpo", "cps", "dance"] = field(default="ode", metadata={"help": "sampler"})
    noise_level: float = field(default=0.7, metadata={"ge": 0, "help": "SDE noise level (a or eta)"})
    dtype: Literal["float32", "bfloat16", "float16"] = field(default="float32", metadata={"help": "weights dtype"})
    device: str = field(default="cpu", metadata={"help": "torch device"})
    cpu_offload: bool = field(default=False, metadata={"help": "diffusers model CPU offload"})
    out: str = field(default="sample.png", metadata={"help": "output file (.png; .gif for video)"})

    def __post_init__(self):
        if not self.prompts or any(not p.strip() for p in self.prompts):
            raise ValueError("prompts must be a non-empty list of non-empty strings")
        if self.steps < 1:
            raise ValueError(f"steps={self.steps} must be >= 1")
        if self.guidance < 0:
            raise ValueError(f"guidance={self.guidance} must be >= 0")
        if self.source_images is not None:
            if len(self.source_images) not in (1, len(self.prompts)):
                raise ValueError(f"source_images: {len(self.source_images)} images for {len(self.prompts)} prompts; "
                                 "give one for all prompts or one per prompt")
            missing = [p for p in self.source_images if not Path(p).is_file()]
            if missing:
                raise ValueError(f"source_images: {missing[0]!r} does not exist")


def build_model(cfg: SampleConfig) -> FlowModelAdapter:
    adapter = load_model(cfg.model, cfg.model_path, torch_dtype=DTYPES[cfg.dtype], device=cfg.device,
                         cpu_offload=cfg.cpu_offload, **cfg.model_options)
    if cfg.lora:
        adapter.load_lora(cfg.lora)
    return adapter


def generate(cfg: SampleConfig, adapter: FlowModelAdapter | None = None, progress: bool = True) -> Tensor:
    """Pixels in [0, 1]: [B, 3, H, W] (images) or [B, F, 3, H, W] (video)."""
    if adapter is None:
        check_model_options(cfg.model, cfg.model_options, "model_options")
    rules = adapter.rules if adapter is not None else request_rules(cfg.model, cfg.model_path)
    if rules is not None and rules.edits and cfg.source_images is None:  # said before any weights load
        raise ValueError(f"{cfg.model} edits a source image per prompt: give one (--source-image / source_images)")
    if rules is not None and not rules.edits and cfg.source_images is not None:
        raise ValueError(f"source_images given, and {cfg.model} is not an editing model")
    adapter = adapter or build_model(cfg)
    adapter.check_request(cfg.height, cfg.width, cfg.num_frames)
    use_cfg = adapter.guidance == "cfg" and cfg.guidance > 1
    negatives = [cfg.negative_prompt] * len(cfg.prompts) if cfg.negative_prompt else None
    images = None
    if cfg.source_images is not None:
        paths = cfg.source_images * len(cfg.prompts) if len(cfg.source_images) == 1 else cfg.source_images
        images = torch.stack([read_image(p, (cfg.height, cfg.width)) for p in paths])
    cond = encode(adapter, cfg.prompts, cfg=use_cfg, images=images, negative_prompts=negatives)
    traj = sample(adapter, cond, num_steps=cfg.steps, height=cfg.height, width=cfg.width,
                  num_frames=cfg.num_frames, guidance_scale=cfg.guidance, sde=SDEOptions(cfg.sde, cfg.noise_level),
                  seeds=[cfg.seed + i for i in range(len(cfg.prompts))], progress=progress)
    with torch.no_grad():
        return adapter.decode(traj.final)
