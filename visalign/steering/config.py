"""`visalign steer CONFIG.yaml [overrides]`: steer a model from a config and write the images and a report."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from visalign import rewards as rewards_lib
from visalign.media import save_pixels
from visalign.models import DTYPES, load_model, request_rules, resolve_model_path
from visalign.steering import build_method, steer


@dataclass
class SteerConfig:
    """What to steer and how. Every field can be set in YAML or overridden as `field=value`."""

    model: str = field(default="world", metadata={"help": "registered model or dotted path to a factory"})
    model_path: str | None = field(default=None, metadata={"help": "local directory or hub id of the weights"})
    lora: str | None = field(default=None, metadata={"help": "diffusers-format LoRA to load first"})
    prompts: list[str] = field(default_factory=lambda: ["two red circles"], metadata={"help": "one output each"})
    rewards: dict[str, float] = field(default_factory=lambda: {"world-verifier": 1.0},
                                      metadata={"help": "rewards and their weights"})
    method: Literal["best_of_n", "fk", "guidance", "reno"] = field(default="fk", metadata={"help": "method"})
    options: dict[str, bool | int | float | str | None] = field(
        default_factory=lambda: {"k": 4, "lam": 10.0}, metadata={"help": "the method's options, e.g. k, lam"})
    steps: int = field(default=20, metadata={"ge": 1, "help": "denoising steps"})
    guidance: float = field(default=3.0, metadata={"ge": 0, "help": "CFG scale (FLUX: embedded guidance)"})
    height: int | None = field(default=None, metadata={"ge": 1, "help": "image height (default: the model's)"})
    width: int | None = field(default=None, metadata={"ge": 1, "help": "image width (default: the model's)"})
    num_frames: int | None = field(default=None, metadata={"ge": 1, "help": "video models: 4k+1 frames"})
    seed: int = field(default=0, metadata={"ge": 0, "help": "seeds every particle and noise draw"})
    dtype: Literal["float32", "bfloat16", "float16"] = field(default="float32", metadata={"help": "weights dtype"})
    device: str = field(default="cpu", metadata={"help": "torch device"})
    out: str = field(default="outputs/steer", metadata={"help": "output directory"})

    def __post_init__(self):
        if not self.prompts or any(not p.strip() for p in self.prompts):
            raise ValueError("prompts must be a non-empty list of non-empty strings")
        if not self.rewards:
            raise ValueError("rewards must name at least one reward")
        for name in self.rewards:  # before the model loads
            if rewards_lib.describe(name)["groupwise"]:
                raise ValueError(f"rewards: {name} scores groups of samples as sets (groupwise), and steering scores "
                                 "each particle on its own: train with it instead")

        try:
            build_method(self.method, self.options)
        except ValueError as err:
            raise ValueError(f"options: {err}") from None
        # paths and sizes, before any weights load
        if self.model_path is not None:
            resolve_model_path(self.model_path)
        if self.lora is not None and not Path(self.lora).exists():
            raise ValueError(f"lora={self.lora!r}: no such file or directory")
        rules = request_rules(self.model, self.model_path)
        if rules is not None and self.height is not None and self.width is not None:
            rules.check(self.height, self.width, self.num_frames)


def run(cfg: SteerConfig, progress: bool = False) -> dict:
    adapter = load_model(cfg.model, cfg.model_path, torch_dtype=DTYPES[cfg.dtype], device=cfg.device)
    if cfg.lora:
        adapter.load_lora(cfg.lora)
    out = steer(adapter, cfg.prompts, cfg.rewards, cfg.method, steps=cfg.steps, guidance=cfg.guidance,
                height=cfg.height, width=cfg.width, num_frames=cfg.num_frames, seed=cfg.seed, progress=progress,
                **cfg.options)
    directory = Path(cfg.out)
    directory.mkdir(parents=True, exist_ok=True)
    suffix = "gif" if out.images.ndim == 5 else "png"
    for i, image in enumerate(out.images):
        save_pixels(image[None], directory / f"{i:03d}.{suffix}")
    report = {"prompts": cfg.prompts, "reward": out.reward.tolist(),
              "rewards": {k: v.tolist() for k, v in out.rewards.items()}, **out.report}
    (directory / "report.json").write_text(json.dumps(report, indent=1, default=str))
    return report
