"""Inference-time steering: one entry point for best-of-N, Feynman-Kac particle steering, reward guidance and
noise optimisation, over any adapter (SD3, FLUX, Wan, the world model) or a diffusers pipeline object.

    >>> from visalign.steering import steer
    >>> out = steer(model, ["two red circles"], rewards={"world-verifier": 1.0}, method="fk", k=4, lam=10)
    >>> out.images, out.reward, out.report["nfe"], out.report["lineage"]

`visalign steer CONFIG.yaml` runs the same from a config (`SteerConfig`).
"""

from __future__ import annotations

import dataclasses
import time

from visalign.models import adapter_for
from visalign.models.base import FlowModelAdapter, encode
from visalign.prompts import Prompt, source_images
from visalign.registry import lookup
from visalign.steering.core import Request, SteerResult, metered, resolve_rewards
from visalign.steering.drift import RewardDrift
from visalign.steering.methods import BestOfN, FKSteering, ReNO, RewardGuidance
from visalign.suggest import did_you_mean

# name -> method class (or its dotted path); a dotted path to a user's class works in its place.
METHODS = {"best_of_n": BestOfN, "fk": FKSteering, "guidance": RewardGuidance, "reno": ReNO, "drift": RewardDrift}


def build_method(name: str, options: dict):
    """The steering method `name` built with `options`; an option it does not take is named, with the closest
    one it does and the list of all of them."""
    cls = lookup(METHODS, name, "steering method")
    if dataclasses.is_dataclass(cls):
        takes = [f.name for f in dataclasses.fields(cls) if f.init]
        unknown = [key for key in options if key not in takes]
        if unknown:
            raise ValueError(f"{name} takes no option {unknown[0]!r}{did_you_mean(unknown[0], takes)}; its options: "
                             f"{', '.join(takes)}")
    try:
        return cls(**options)
    except TypeError as err:
        raise ValueError(f"{name}: {err}") from None


def as_adapter(model) -> FlowModelAdapter:
    """An adapter as is, or a diffusers pipeline object wrapped in its family's adapter (`adapter_for`)."""
    return model if isinstance(model, FlowModelAdapter) else adapter_for(model)


def steer(model, prompts: list[str], rewards, method="fk", *, steps: int = 20, guidance: float = 3.0,
          height: int | None = None, width: int | None = None, num_frames: int | None = None, seed: int = 0,
          metadata: list[dict] | None = None, negative_prompts: list[str] | None = None, progress: bool = False,
          **options) -> SteerResult:
    """Generate one output per prompt, steered towards `rewards` (a name, a Reward, a list, or {reward: weight}).

    method: "best_of_n" (n), "fk" (k, potential, lam, every, start, end, ess_threshold, scheme, sde,
    noise_level, select), "guidance" (scale, start, stop, normalize, through_model), "reno" (iterations, lr,
    momentum, reg, grad_clip), "drift" (Euphonium's reward-gradient SDE drift: scale, mode, normalize, start,
    stop, sde, noise_level), a dotted path to a method class, or a method object. The report counts denoiser
    NFE (CFG = 2 per sample), decodes, reward calls, backward passes, wall time and the share of time spent
    outside the denoiser. `progress` shows a bar of denoiser passes as they run."""
    adapter = as_adapter(model)
    if isinstance(prompts, str) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings")
    if isinstance(method, str):
        method = build_method(method, options)
    elif options:
        raise ValueError("options are given to the method object itself when passing one")
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    default = adapter.default_size
    height, width = height or default, width or default
    adapter.check_request(height, width, num_frames)
    if metadata is not None and len(metadata) != len(prompts):
        raise ValueError(f"metadata has {len(metadata)} entries for {len(prompts)} prompts")
    # An editing model edits the image each prompt's metadata names (`source_image`), as in a prompt file.
    items = [Prompt(p, m) for p, m in zip(prompts, metadata or [{}] * len(prompts), strict=True)]
    cond = encode(adapter, list(prompts), cfg=adapter.guidance == "cfg" and guidance > 1,
                  images=source_images(items, (height, width)), negative_prompts=negative_prompts)
    request = Request(adapter, list(prompts), cond, resolve_rewards(rewards), steps, guidance, height, width,
                      num_frames, seed, metadata)
    start = time.perf_counter()
    with metered(request, progress) as stats:
        result = method.run(request)
    wall = time.perf_counter() - start
    result.report.update({**stats, "nfe_per_prompt": stats["nfe"] / len(prompts), "wall_time": wall,
                          "overhead_fraction": max(0.0, 1 - stats["denoiser_time"] / wall) if wall > 0 else 0.0})
    return result


__all__ = ["METHODS", "BestOfN", "FKSteering", "ReNO", "RewardDrift", "RewardGuidance", "SteerResult", "as_adapter",
           "build_method", "steer"]
