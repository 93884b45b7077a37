"""Model adapters: one interface (`FlowModelAdapter`) over every model family in `FAMILIES` (SD3.5, FLUX.1 and
Kontext, FLUX.2 klein, Qwen-Image and its editor, Z-Image, Wan2.1 / 2.2, HunyuanVideo 1.5), their tiny test
builds, and the built-in world.

`load_model(name, path, **options)` resolves a registered name, or a dotted path `pkg.module.Factory` to a
callable taking (path, **kwargs) and returning an adapter; `options` are the adapter's constructor keywords.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

from visalign.models.base import Conditioning, FlowModelAdapter, RequestRules, resolve_model_path
from visalign.registry import import_target, lookup
from visalign.suggest import did_you_mean

# The dtype names configs accept for model weights.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _from_pretrained(target: str) -> Callable[..., FlowModelAdapter]:
    """A factory for the adapter class at `target` ("visalign.models.module:Class"), imported on first use."""
    def load(path=None, **kwargs):
        if path is None:
            raise ValueError(f"model {target.rpartition(':')[2]} needs --model-path (a local directory or a hub id)")

        return import_target(target).from_pretrained(path, **kwargs)

    load.request_rules = lambda path: import_target(target).request_rules(path)
    load.adapter = target
    return load


def _tiny(target: str, rules: RequestRules, adapter: str) -> Callable[..., FlowModelAdapter]:
    """A factory for the tiny builder at `target` ("module:function(seed, **options)")."""
    def load(path=None, seed: int = 0, **options):
        return import_target(target)(seed, **options)

    load.request_rules = lambda path: rules  # the tiny configs' (tested against the built models)
    load.adapter = adapter
    return load


@dataclass(frozen=True)
class Family:
    """A model family: its registered name (weights from --model-path), its adapter class, the diffusers pipeline
    classes it wraps, example hub ids, what it is and needs, and its tiny random-weight builds for tests
    ({name: (builder, the sizes it draws)})."""

    name: str
    adapter: str
    pipelines: tuple[str, ...]
    hub: tuple[str, ...]
    notes: str
    tiny: dict[str, tuple[str, RequestRules]]


M = "visalign.models."
FAMILIES = (
    Family("sd3", M + "diffusers_adapters:SD3Adapter", ("StableDiffusion3Pipeline",),
           ("stabilityai/stable-diffusion-3.5-medium", "stabilityai/stable-diffusion-3.5-large"),
           "SD3 / SD3.5 text-to-image, CFG; a GPU for real sizes",
           {"tiny-sd3": (M + "tiny:tiny_sd3", RequestRules("sd3", 2))}),
    Family("flux", M + "diffusers_adapters:FluxAdapter", ("FluxPipeline",),
           ("black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.1-schnell"),
           "FLUX.1 text-to-image, embedded (distilled) guidance; a large GPU",
           {"tiny-flux": (M + "tiny:tiny_flux", RequestRules("flux", 4))}),
    Family("flux-kontext", M + "flux_kontext:FluxKontextAdapter", ("FluxKontextPipeline",),
           ("black-forest-labs/FLUX.1-Kontext-dev",),
           "FLUX.1 Kontext image editing: each prompt edits its source image; a large GPU",
           {"tiny-flux-kontext": (M + "flux_kontext:tiny_flux_kontext", RequestRules("flux-kontext", 4, edits=True))}),
    Family("flux2-klein", M + "flux2:Flux2KleinAdapter", ("Flux2KleinPipeline",),
           ("black-forest-labs/FLUX.2-klein-4B", "black-forest-labs/FLUX.2-klein-base-4B"),
           "FLUX.2 klein 4B / 9B: step-distilled (4 steps, no guidance) or base (CFG); 4B + Qwen3-4B: a 24 GB+ GPU "
           "in bf16",
           {"tiny-flux2-klein": (M + "flux2:tiny_flux2_klein", RequestRules("flux2-klein", 4))}),
    Family("qwen-image", M + "qwen_image:QwenImageAdapter", ("QwenImagePipeline",),
           ("Qwen/Qwen-Image", "Qwen/Qwen-Image-2512"),
           "Qwen-Image text-to-image, true CFG with norm rescale; 20B + 7B text encoder: an 80 GB GPU in bf16",
           {"tiny-qwen-image": (M + "qwen_image:tiny_qwen_image", RequestRules("qwen-image", 4))}),
    Family("qwen-image-edit", M + "qwen_image_edit:QwenImageEditAdapter",
           ("QwenImageEditPipeline", "QwenImageEditPlusPipeline"),
           ("Qwen/Qwen-Image-Edit", "Qwen/Qwen-Image-Edit-2509", "Qwen/Qwen-Image-Edit-2511"),
           "Qwen-Image-Edit image editing: each prompt edits its source image (2509 / 2511: one image per prompt); "
           "20B + 7B VL text encoder: an 80 GB GPU in bf16",
           {"tiny-qwen-image-edit": (M + "qwen_image_edit:tiny_qwen_image_edit",
                                     RequestRules("qwen-image-edit", 4, edits=True))}),
    Family("z-image", M + "z_image:ZImageAdapter", ("ZImagePipeline",),
           ("Tongyi-MAI/Z-Image-Turbo", "Tongyi-MAI/Z-Image"),
           "Z-Image-Turbo (8 steps, guidance 1 = none) or base Z-Image (CFG: our scale = the pipeline's + 1); 6B DiT "
           "+ 4B Qwen3: a 24 GB+ GPU in bf16",
           {"tiny-z-image": (M + "z_image:tiny_z_image", RequestRules("z-image", 4))}),
    Family("wan", M + "diffusers_adapters:WanAdapter", ("WanPipeline",), ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers",),
           "Wan2.1 text-to-video, 4k+1 frames; a GPU",
           {"tiny-wan": (M + "tiny:tiny_wan", RequestRules("wan", 16, video=True))}),
    Family("wan22", M + "wan22:Wan22Adapter", ("WanPipeline",),
           ("Wan-AI/Wan2.2-TI2V-5B-Diffusers", "Wan-AI/Wan2.2-T2V-A14B-Diffusers"),
           "Wan2.2 text-to-video, one or two experts from the checkpoint: TI2V-5B (48-channel VAE, sizes multiple "
           "of 32: an 80 GB GPU in bf16) or T2V-A14B (high- and low-noise 14B experts switched by sigma; options "
           "experts, guidance_scale_2: 8 x 80 GB GPUs)",
           {"tiny-wan22-5b": (M + "wan22:tiny_wan22_5b", RequestRules("wan22", 32, video=True)),
            "tiny-wan22-a14b": (M + "wan22:tiny_wan22_a14b", RequestRules("wan22", 16, video=True))}),
    Family("hunyuan-video15", M + "hunyuan_video15:HunyuanVideo15Adapter", ("HunyuanVideo15Pipeline",),
           ("hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v",),
           "HunyuanVideo 1.5 text-to-video, 480p / 720p, base (CFG) or CFG-distilled, 4k+1 frames; 8.3B + 7B "
           "Qwen2.5-VL text encoder: an 80 GB GPU in bf16",
           {"tiny-hunyuan-video15": (M + "hunyuan_video15:tiny_hunyuan_video15",
                                     RequestRules("hunyuan-video15", 4, video=True))}),
)

# name -> factory(path, **options), or the dotted path of one (imported on first use: the built-in world is a
# plug-in, registered by path like any user's model).
MODELS: dict[str, Callable[..., FlowModelAdapter] | str] = {
    "world": "visalign.world.model:load_world",
    "world-video": "visalign.world.model:load_world_video",
    **{f.name: _from_pretrained(f.adapter) for f in FAMILIES},
    **{name: _tiny(builder, rules, f.adapter) for f in FAMILIES for name, (builder, rules) in f.tiny.items()},
}


def request_rules(name: str, path: str | None = None) -> RequestRules | None:
    """The sizes a model draws, known before any weights load: its factory's `request_rules(path)` (a factory
    of your own may define one too), or None when the model cannot tell without loading."""
    rules = getattr(lookup(MODELS, name, "model"), "request_rules", None)
    return None if rules is None else rules(path)


def model_options(name: str) -> list[str] | None:
    """The options (`model.options`) a registered model's adapter takes, from its constructor's keywords, known
    before any weights load; None for a factory of your own (its options are checked when it runs)."""
    adapter = getattr(lookup(MODELS, name, "model"), "adapter", None)
    if adapter is None:
        return None
    params = list(inspect.signature(import_target(adapter).__init__).parameters.values())[2:]  # self, pipe
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def check_model_options(name: str, options: dict, where: str = "model.options") -> None:
    """ValueError naming an option the model does not take, the closest it does, and all of them."""
    takes = model_options(name)
    unknown = [key for key in options if takes is not None and key not in takes]
    if unknown:
        raise ValueError(f"{where}: {name} takes no option {unknown[0]!r}{did_you_mean(unknown[0], takes)}; its "
                         f"options: {', '.join(takes) or '(none)'}")


def adapter_for(pipe, **options) -> FlowModelAdapter:
    """A diffusers pipeline object wrapped in its family's adapter (with its `options`); a WanPipeline with
    Wan2.2's second expert or per-token timesteps in Wan2.2's. ValueError lists the pipelines that can be wrapped."""
    kind = type(pipe).__name__
    matches = [f for f in FAMILIES if kind in f.pipelines]
    if not matches:
        known = sorted({p for f in FAMILIES for p in f.pipelines})
        raise ValueError(f"no adapter for a {kind}: pass a visalign adapter or one of the pipelines {', '.join(known)}")
    wan22 = getattr(pipe, "transformer_2", None) is not None or bool(pipe.config.get("expand_timesteps", False))
    family = next((f for f in matches if f.name == "wan22"), matches[0]) if wan22 else matches[0]
    return import_target(family.adapter)(pipe, **options)


def _tiny_note(family: Family) -> str:
    return f"{family.name}'s classes at tiny sizes with random weights, for tests: draws noise"


# What `visalign models` says of each built-in entry (a model of your own is described by its factory's docstring).
DESCRIPTIONS = {
    "world": "the built-in shapes world's image model, 32x32, shipped in the package: runs on a CPU",
    "world-video": "the built-in moving-shapes video model, 9 frames of 32x32, shipped: runs on a CPU",
    **{f.name: f"{f.notes} (e.g. {f.hub[0]})" for f in FAMILIES},
    **{name: _tiny_note(f) for f in FAMILIES for name in f.tiny},
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
    check_model_options(name, {k: v for k, v in kwargs.items() if k != "seed"}, "options")
    if name.startswith("tiny-"):
        return factory(path, **kwargs)
    return factory(path, torch_dtype=torch_dtype, device=device, cpu_offload=cpu_offload, **kwargs)


__all__ = ["DTYPES", "FAMILIES", "MODELS", "Conditioning", "Family", "FlowModelAdapter", "RequestRules",
           "check_model_options", "describe_model", "list_models", "load_model", "model_options", "request_rules",
           "resolve_model_path"]
