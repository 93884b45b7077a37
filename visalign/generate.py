"""`visalign sample`: generate images or videos with any adapter through the one sampling loop."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from visalign.models import FlowModelAdapter, list_models, load_model
from visalign.sampling import SDEOptions, sample

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class SampleConfig:
    """What to generate and how. Every field can be set in YAML or overridden as `field=value`."""

    model: str = field(default="tiny-sd3", metadata={"help": f"registered model ({', '.join(list_models())}) "
                                                              "or dotted path to a factory"})
    model_path: str | None = field(default=None, metadata={"help": "local directory or hub id of the weights"})
    lora: str | None = field(default=None, metadata={"help": "diffusers-format LoRA to load before sampling"})
    prompts: list[str] = field(default_factory=lambda: ["a red circle"], metadata={"help": "one sample each"})
    negative_prompt: str | None = field(default=None, metadata={"help": "negative prompt for CFG"})
    steps: int = field(default=20, metadata={"help": "number of denoising steps"})
    guidance: float = field(default=4.5, metadata={"help": "CFG scale (FLUX: embedded guidance)"})
    seed: int = field(default=0, metadata={"help": "sample i uses seed + i"})
    height: int = field(default=32, metadata={"help": "image height in pixels"})
    width: int = field(default=32, metadata={"help": "image width in pixels"})
    num_frames: int | None = field(default=None, metadata={"help": "video models: frames, 4k+1"})
    sde: Literal["ode", "flow_grpo", "cps", "dance"] = field(default="ode", metadata={"help": "sampler"})
    noise_level: float = field(default=0.7, metadata={"help": "SDE noise level (a or eta)"})
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


def build_model(cfg: SampleConfig) -> FlowModelAdapter:
    adapter = load_model(cfg.model, cfg.model_path, torch_dtype=DTYPES[cfg.dtype], device=cfg.device,
                         cpu_offload=cfg.cpu_offload)
    if cfg.lora:
        adapter.load_lora(cfg.lora)
    return adapter


def generate(cfg: SampleConfig, adapter: FlowModelAdapter | None = None, progress: bool = True) -> Tensor:
    """Pixels in [0, 1]: [B, 3, H, W] (images) or [B, F, 3, H, W] (video)."""
    adapter = adapter or build_model(cfg)
    adapter.check_request(cfg.height, cfg.width, cfg.num_frames)
    use_cfg = adapter.guidance == "cfg" and cfg.guidance > 1
    negatives = [cfg.negative_prompt] * len(cfg.prompts) if cfg.negative_prompt else None
    cond = adapter.encode_prompts(cfg.prompts, negatives, cfg=use_cfg)
    traj = sample(adapter, cond, num_steps=cfg.steps, height=cfg.height, width=cfg.width,
                  num_frames=cfg.num_frames, guidance_scale=cfg.guidance, sde=SDEOptions(cfg.sde, cfg.noise_level),
                  seeds=[cfg.seed + i for i in range(len(cfg.prompts))], progress=progress)
    with torch.no_grad():
        return adapter.decode(traj.final)


def to_uint8(pixels: Tensor):
    import numpy as np

    return (pixels.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu().numpy()).astype(np.uint8)


def image_grid(images: Tensor, columns: int | None = None, pad: int = 2) -> Tensor:
    """[B, 3, H, W] → one [3, H', W'] grid with white padding."""
    b, c, h, w = images.shape
    columns = columns or min(b, 8)
    rows = (b + columns - 1) // columns
    grid = torch.ones(c, rows * (h + pad) + pad, columns * (w + pad) + pad)
    for i in range(b):
        r, col = divmod(i, columns)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = images[i]
    return grid


def save_pixels(pixels: Tensor, out: str | Path, scale: int = 1) -> Path:
    """Save a batch as one PNG grid (images) or one animated GIF of frame grids (video)."""
    from PIL import Image

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if pixels.ndim == 4:
        frames = [image_grid(pixels)]
    else:
        frames = [image_grid(pixels[:, f]) for f in range(pixels.shape[1])]
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
