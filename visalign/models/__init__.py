"""Model adapters: one interface (`FlowModelAdapter`) over SD3/SD3.5, FLUX.1, Wan2.1 and tiny test models.

`load_model(name, path)` resolves a registered name, or a dotted path `pkg.module.Factory` to a callable
taking (path, **kwargs) and returning an adapter.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from visalign.models.base import Conditioning, FlowModelAdapter, RequestRules, resolve_model_path
from visalign.registry import import_target, lookup

# The dtype names configs accept for model weights.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _from_pretrained(target: str) -> Callable[..., FlowModelAdapter]:
    """A factory for the adapter class at `target` ("visalign.models.module:Class"), imported on first use."""
    def load(path=None, **kwargs):
        if path is None:
            raise ValueError(f"model {target.rpartition(':')[2]} needs --model-path (a local directory or a hub id)")

        return import_target(target).from_pretrained(path, **kwargs)

    load.request_rules = lambda path: import_target(target).request_rules(path)
    return load


def _tiny(target: str, rules: RequestRules) -> Callable[..., FlowModelAdapter]:
    """A factory for the tiny builder at `target` ("module:function(seed)")."""
    def load(path=None, seed: int = 0, **_):
        return import_target(target)(seed)

    load.request_rules = lambda path: rules  # the tiny configs' (tested against the built models)
    return load


# name -> factory(path, **kwargs), or the dotted path of one (imported on first use: the built-in world is a
# plug-in, registered by path like any user's model).
MODELS: dict[str, Callable[..., FlowModelAdapter] | str] = {
    "world": "visalign.world.model:load_world",
    "world-video": "visalign.world.model:load_world_video",
    "sd3": _from_pretrained("visalign.models.diffusers_adapters:SD3Adapter"),
    "flux": _from_pretrained("visalign.models.diffusers_adapters:FluxAdapter"),
    "wan": _from_pretrained("visalign.models.diffusers_adapters:WanAdapter"),
    "tiny-sd3": _tiny("visalign.models.tiny:tiny_sd3", RequestRules("sd3", 2)),
    "tiny-flux": _tiny("visalign.models.tiny:tiny_flux", RequestRules("flux", 4)),
    "tiny-wan": _tiny("visalign.models.tiny:tiny_wan", RequestRules("wan", 16, video=True)),
    "flux-kontext": _from_pretrained("visalign.models.flux_kontext:FluxKontextAdapter"),
    "tiny-flux-kontext": _tiny("visalign.models.flux_kontext:tiny_flux_kontext",
                               RequestRules("flux-kontext", 4, edits=True)),
    # model families added since (one module per family, adapter and tiny build together):
    "wan22": _from_pretrained("visalign.models.wan22:Wan22Adapter"),
    "tiny-wan22-5b": _tiny("visalign.models.wan22:tiny_wan22_5b", RequestRules("wan22", 32, video=True)),
    "tiny-wan22-a14b": _tiny("visalign.models.wan22:tiny_wan22_a14b", RequestRules("wan22", 16, video=True)),
    "flux2-klein": _from_pretrained("visalign.models.flux2:Flux2KleinAdapter"),
    "tiny-flux2-klein": _tiny("visalign.models.flux2:tiny_flux2_klein", RequestRules("flux2-klein", 4)),
    "z-image": _from_pretrained("visalign.models.z_image:ZImageAdapter"),
    "tiny-z-image": _tiny("visalign.models.z_image:tiny_z_image", RequestRules("z-image", 4)),
    "qwen-image": _from_pretrained("visalign.models.qwen_image:QwenImageAdapter"),
    "tiny-qwen-image": _tiny("visalign.models.qwen_image:tiny_qwen_image", RequestRules("qwen-image", 4)),
}


def request_rules(name: str, path: str | None = None) -> RequestRules | None:
    """The sizes a model draws, known before any weights load: its factory's `request_rules(path)` (a factory
    of your own may define one too), or None when the model cannot tell without loading."""
    rules = getattr(lookup(MODELS, name, "model"), "request_rules", None)
    return None if rules is None else rules(path)


# What `visalign models` says of each built-in entry (a model of your own is described by its factory's docstring).
DESCRIPTIONS = {
    "wan22": "Wan2.2 text-to-video, one or two experts from the checkpoint: TI2V-5B (48-channel VAE, sizes multiple "
             "of 32; Wan-AI/Wan2.2-TI2V-5B-Diffusers: an 80 GB GPU, bf16) or T2V-A14B (high/low-noise 14B experts; "
             "Wan-AI/Wan2.2-T2V-A14B-Diffusers: 8 x 80 GB GPUs)",
    "tiny-wan22-5b": "Wan2.2 TI2V-5B's layout at tiny size with random weights, for tests: draws noise",
    "tiny-wan22-a14b": "Wan2.2 T2V-A14B's two-expert layout at tiny size with random weights, for tests: draws noise",
    "flux2-klein": "FLUX.2 [klein] 4B / 9B: step-distilled (4 steps, no guidance; e.g. "
                   "black-forest-labs/FLUX.2-klein-4B) or base (CFG; e.g. black-forest-labs/FLUX.2-klein-base-4B); "
                   "4B + Qwen3-4B: a 24 GB+ GPU in bf16",
    "tiny-flux2-klein": "FLUX.2 klein's classes at tiny sizes with random weights, for tests: draws noise",
    "z-image": "Z-Image-Turbo (8 steps, guidance 1 = none) or base Z-Image (CFG: our scale = the pipeline's + 1; "
               "e.g. Tongyi-MAI/Z-Image-Turbo; 6B DiT + 4B Qwen3 text encoder: a 24 GB+ GPU in bf16)",
    "tiny-z-image": "Z-Image's classes at tiny sizes with random weights, for tests: draws noise",
    "sd3": "Stable Diffusion 3 / 3.5 (image; --model-path a diffusers directory or hub id, e.g. "
           "stabilityai/stable-diffusion-3.5-medium; a GPU for real sizes)",
    "flux": "FLUX.1 dev / schnell (image, embedded guidance; e.g. black-forest-labs/FLUX.1-dev; a large GPU)",
    "wan": "Wan2.1 text-to-video (video, 4k+1 frames; e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers; a GPU)",
    "flux-kontext": "FLUX.1 Kontext dev, image editing: each prompt edits its source image (e.g. "
                    "black-forest-labs/FLUX.1-Kontext-dev; a large GPU)",
    "tiny-flux-kontext": "FLUX Kontext's classes at tiny sizes with random weights, for tests: draws noise",
    "tiny-sd3": "SD3's classes at tiny sizes with random weights, for tests: draws noise",
    "tiny-flux": "FLUX's classes at tiny sizes with random weights, for tests: draws noise",
    "tiny-wan": "Wan's classes at tiny sizes with random weights, for tests: draws noise",
    "world": "the built-in shapes world's image model, 32x32, shipped in the package: runs on a CPU",
    "world-video": "the built-in moving-shapes video model, 9 frames of 32x32, shipped: runs on a CPU",
    "qwen-image": "Qwen-Image text-to-image (true CFG with norm rescale; e.g. Qwen/Qwen-Image or "
                  "Qwen/Qwen-Image-2512; 20B + 7B text encoder: an 80 GB GPU, bf16)",
    "tiny-qwen-image": "Qwen-Image's classes at tiny sizes with random weights, for tests: draws noise",
}


def list_models() -> list[str]:
    return sorted(MODELS)


def describe_model(name: str) -> str:
    """One line on what a registered model is and what it needs."""
    if name in DESCRIPTIONS:
        return DESCRIPTIONS[name]
    doc = getattr(lookup(MODELS, name, "model"), "__doc__", None) or ""
    return " ".join(doc.strip().split("\n\n")[0].split()) or "(no description)"


def load_model(name: str, path: str | None = None, *, torch_dtype: torch.dtype = torch.float32,
               device: str = "cpu", cpu_offload: bool = False, **kwargs) -> FlowModelAdapter:
    """Build an adapter by registered name or dotted path. Unknown names raise ValueError listing the choices."""
    factory = lookup(MODELS, name, "model")
    if name.startswith("tiny-"):
        return factory(path, **kwargs)
    return factory(path, torch_dtype=torch_dtype, device=device, cpu_offload=cpu_offload, **kwargs)


__all__ = ["DTYPES", "MODELS", "Conditioning", "FlowModelAdapter", "RequestRules", "describe_model", "list_models",
           "load_model", "request_rules", "resolve_model_path"]
