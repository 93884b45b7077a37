"""Model adapters: one interface (`FlowModelAdapter`) over SD3/SD3.5, FLUX.1, Wan2.1 and tiny test models.

`load_model(name, path)` resolves a registered name, or a dotted path `pkg.module.Factory` to a callable
taking (path, **kwargs) and returning an adapter.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

from visalign.models.base import Conditioning, FlowModelAdapter, resolve_model_path


def _from_pretrained(class_name: str) -> Callable[..., FlowModelAdapter]:
    def load(path=None, **kwargs):
        if path is None:
            raise ValueError(f"model {class_name} needs --model-path (a local directory or a hub id)")
        from visalign.models import diffusers_adapters

        return getattr(diffusers_adapters, class_name).from_pretrained(path, **kwargs)

    return load


def _tiny(fn_name: str) -> Callable[..., FlowModelAdapter]:
    def load(path=None, seed: int = 0, **_):
        from visalign.models import tiny

        return getattr(tiny, fn_name)(seed)

    return load


def _world(path=None, torch_dtype=torch.float32, device="cpu", **_):
    from visalign.world.model import WorldAdapter

    return WorldAdapter.from_pretrained(path, device=device, torch_dtype=torch_dtype)


def _world_video(path=None, torch_dtype=torch.float32, device="cpu", **_):
    from visalign.world.model import WorldVideoAdapter

    return WorldVideoAdapter.from_pretrained(path, device=device, torch_dtype=torch_dtype)


MODELS: dict[str, Callable[..., FlowModelAdapter]] = {
    "world": _world,
    "world-video": _world_video,
    "sd3": _from_pretrained("SD3Adapter"),
    "flux": _from_pretrained("FluxAdapter"),
    "wan": _from_pretrained("WanAdapter"),
    "tiny-sd3": _tiny("tiny_sd3"),
    "tiny-flux": _tiny("tiny_flux"),
    "tiny-wan": _tiny("tiny_wan"),
}


def list_models() -> list[str]:
    return sorted(MODELS)


def load_model(name: str, path: str | None = None, *, torch_dtype: torch.dtype = torch.float32,
               device: str = "cpu", cpu_offload: bool = False, **kwargs) -> FlowModelAdapter:
    """Build an adapter by registered name or dotted path. Unknown names raise ValueError listing the choices."""
    if name in MODELS:
        factory = MODELS[name]
    elif "." in name:
        module, attr = name.rsplit(".", 1)
        try:
            factory = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"cannot import model factory {name!r}: {err}") from err
    else:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(list_models())} or a dotted path")
    if name.startswith("tiny-"):
        return factory(path, **kwargs)
    return factory(path, torch_dtype=torch_dtype, device=device, cpu_offload=cpu_offload, **kwargs)


__all__ = ["MODELS", "Conditioning", "FlowModelAdapter", "list_models", "load_model", "resolve_model_path"]
