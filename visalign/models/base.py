"""The model adapter interface: the one surface samplers, trainers and steering talk to.

Conventions (written once, used everywhere):
    x_sigma = (1 - sigma) * x0 + sigma * noise,   velocity = noise - x0,   sigma runs from 1 to 0.

Latents live in the sampler in the model's *spatial* layout with the batch first: [B, C, h, w] for images and
[B, C, f, h, w] for video. Models that run on another layout (FLUX's packed 2x2 patches) convert inside
`predict_velocity`, so the sampler's elementwise step math never sees the difference.
"""

from __future__ import annotations

import contextlib
import copy as _copy
import os
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn


@dataclass
class Conditioning:
    """Encoded prompts for a batch: tensors keyed by the denoiser's argument name, batch dimension first.

    `uncond` holds the negative / empty-prompt embeddings used by classifier-free guidance, or None when the
    model is not run with CFG.
    """

    cond: dict[str, Tensor]
    uncond: dict[str, Tensor] | None = None
    prompts: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return next(iter(self.cond.values())).shape[0]

    def _map(self, fn) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
        cond = {k: fn(v) for k, v in self.cond.items()}
        return cond, None if self.uncond is None else {k: fn(v) for k, v in self.uncond.items()}

    def index(self, idx: Tensor | list[int] | slice) -> Conditioning:
        """The conditioning of a subset of the batch (used to recompute log-probs on mini-batches)."""
        if isinstance(idx, slice):
            return Conditioning(*self._map(lambda v: v[idx]), self.prompts[idx])
        rows = torch.as_tensor(idx).tolist()
        prompts = [self.prompts[i] for i in rows] if self.prompts else []
        return Conditioning(*self._map(lambda v: v[torch.as_tensor(rows, device=v.device)]), prompts)

    def repeat_interleave(self, n: int) -> Conditioning:
        """Repeat every prompt n times in place (prompt groups of size n)."""
        return Conditioning(*self._map(lambda v: v.repeat_interleave(n, dim=0)),
                            [p for p in self.prompts for _ in range(n)])

    @staticmethod
    def cat(items: list[Conditioning]) -> Conditioning:
        def cat_dicts(ds):
            return {k: torch.cat([d[k] for d in ds]) for k in ds[0]}

        uncond = None if items[0].uncond is None else cat_dicts([c.uncond for c in items])
        return Conditioning(cat_dicts([c.cond for c in items]), uncond, [p for c in items for p in c.prompts])


def _cat_dicts(a: dict[str, Tensor], b: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: torch.cat([a[k], b[k]]) for k in a}


def encode(adapter: FlowModelAdapter, prompts: list[str], *, cfg: bool, images: Tensor | None = None,
           negative_prompts: list[str] | None = None) -> Conditioning:
    """A batch's conditioning: `adapter.encode_prompts`, with each prompt's source image ([B, 3, H, W] in [0, 1])
    for an editing model. ValueError when an editing model gets no images, or another model gets some."""
    if adapter.edits and images is None:
        raise ValueError(f"{adapter.name} edits a source image per prompt: give each prompt one (--source-image, or "
                         "'source_image' in a prompt file)")
    if not adapter.edits and images is not None:
        raise ValueError(f"{adapter.name} is not an editing model: prompts with a 'source_image' need one "
                         "(e.g. flux-kontext, qwen-image-edit)")
    extra = {"images": images} if adapter.edits else {}
    return adapter.encode_prompts(list(prompts), negative_prompts, cfg=cfg, **extra)


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class RequestRules:
    """What sizes a model draws: height and width positive multiples of `multiple` (or exactly `size`), and for
    video a frame count of 4k+1 (or exactly `frames`). Adapters check requests with it, and a model factory's
    `request_rules(path)` gives it before any weights load, so configs are checked when they load."""

    model: str
    multiple: int
    video: bool = False
    size: tuple[int, int] | None = None  # the only (height, width), for fixed-canvas models
    frames: int | None = None  # the only frame count, for fixed-length video models
    edits: bool = False  # an editing model: every prompt needs a source image

    def check(self, height, width, num_frames=None, prefix: str = "") -> None:
        """ValueError naming the field (`prefix` + height / width / num_frames) and what is allowed."""
        m = self.multiple
        for label, v in (("height", height), ("width", width)):
            if not isinstance(v, int) or v <= 0 or v % m:
                raise ValueError(f"{prefix}{label}={v!r} is not allowed for {self.model}: it must be a positive "
                                 f"multiple of {m}")
        if self.size is not None and (height, width) != self.size:
            raise ValueError(f"{prefix}height={height}, {prefix}width={width} not allowed for {self.model}: it "
                             f"draws {self.size[0]}x{self.size[1]} only")
        if self.video:
            if not isinstance(num_frames, int) or num_frames < 1 or (num_frames - 1) % 4:
                raise ValueError(f"{prefix}num_frames={num_frames!r} is not allowed for {self.model}: "
                                 "it must be 4k+1 (1, 5, 9, ...)")
            if self.frames is not None and num_frames != self.frames:
                raise ValueError(f"{prefix}num_frames={num_frames!r} not allowed for {self.model}: it draws "
                                 f"{self.frames} frames")
        elif num_frames not in (None, 1):
            raise ValueError(f"{prefix}num_frames={num_frames!r} given to image model {self.model}: "
                             "allowed values are None or 1")


def read_model_config(path: str | None, filename: str) -> dict | None:
    """A JSON config file of a diffusers model, without its weights: from a local directory, or from the hub
    cache for a hub id (no download). None when it is not at hand."""
    if path is None:
        return None
    local = Path(path) / filename
    if local.is_file():
        found = str(local)
    elif HUB_ID.match(str(path)) and not os.path.exists(path):
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(str(path), filename)
        if not isinstance(found, str):
            return None
    else:
        return None
    import json

    try:
        return json.loads(Path(found).read_text())
    except (OSError, ValueError):
        return None


def resolve_model_path(path: str | os.PathLike) -> str:
    """A local directory, or a hub id of the form `org/name`; anything else is an error, not a download."""
    path = str(path)
    if os.path.exists(path):
        return path
    looks_local = path.startswith(("/", ".", "~")) or path.count("/") != 1
    if looks_local or not HUB_ID.match(path):
        raise ValueError(f"model path {path!r} does not exist (give a local directory or a hub id 'org/name')")
    return path


class FlowModelAdapter(ABC):
    """A flow-matching text-to-image/video model behind one small interface.

    Subclasses set `name`, `guidance` ("cfg": classic classifier-free guidance with a negative prompt;
    "embedded": a distilled guidance embedding such as FLUX.1-dev's; "none") and implement the abstract
    methods. The trainable network is `denoiser`; LoRA attaches to it.
    """

    name: str = "adapter"
    guidance: str = "cfg"
    is_video: bool = False
    default_size: int = 512  # height and width when a request names none
    cfg_batched: bool = True  # run [uncond; cond] in one call (SD3) or two calls (Wan), matching each pipeline
    edits: bool = False  # an editing model: `encode_prompts(..., images=)` takes each prompt's source image
    partial_passes: bool = False  # a pass may leave trained parameters unused (Wan2.2 experts): DDP looks for them
    default_lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")

    denoiser: nn.Module

    # ---- shapes and schedule -------------------------------------------------------------------------
    @property
    @abstractmethod
    def size_multiple(self) -> int:
        """Height and width must be divisible by this (VAE factor × patch size)."""

    @property
    def rules(self) -> RequestRules:
        """The sizes this model draws."""
        return RequestRules(self.name, self.size_multiple, self.is_video, edits=self.edits)

    def check_request(self, height: int, width: int, num_frames: int | None = None) -> None:
        """Raise ValueError naming the allowed values when a request cannot be generated."""
        self.rules.check(height, width, num_frames)

    def check_prompts(self, prompts: list[str]) -> None:
        """Raise ValueError when the text encoder cannot read a prompt, without encoding it (a closed vocabulary
        checks its words); open-vocabulary models read anything."""
        return None

    def with_velocity_hook(self, hook: Callable[[Tensor, float, float], None]) -> FlowModelAdapter:
        """A shallow copy (same modules and weights) whose `predict_velocity` calls `hook(latents, guidance_scale,
        seconds)` after each pass. The adapter itself is never patched, so concurrent users of it (the demo's
        requests) each count only their own passes."""
        inner = self.predict_velocity

        def observed(latents, sigma, cond, guidance_scale=1.0):
            start = time.perf_counter()
            out = inner(latents, sigma, cond, guidance_scale)
            hook(latents, guidance_scale, time.perf_counter() - start)
            return out

        copy = _copy.copy(self)
        copy.predict_velocity = observed
        return copy

    @abstractmethod
    def latent_shape(self, height: int, width: int, num_frames: int | None = None) -> tuple[int, ...]:
        """Shape of one sample's latent (no batch dimension) for a request."""

    @abstractmethod
    def sigmas(self, num_steps: int, latent_shape: tuple[int, ...]) -> Tensor:
        """The N+1 sigmas (float32, ending in 0) the model's pipeline would use, shift included."""

    # ---- text ----------------------------------------------------------------------------------------
    @abstractmethod
    def encode_prompts(self, prompts: list[str], negative_prompts: list[str] | None = None,
                       cfg: bool = True) -> Conditioning:
        """Encode prompts; with cfg=True also the negative prompts (empty string by default)."""

    def _conditioning(self, prompts: list[str], negative_prompts: list[str] | None, cfg: bool,
                      encode_batch: Callable[[list[str]], dict[str, Tensor]]) -> Conditioning:
        """`encode_batch` of the prompts and, with `cfg`, of the negative prompts ("" by default), each distinct
        negative encoded once (for adapters whose pipelines encode the two branches apart)."""
        prompts = list(prompts)
        uncond = None
        if cfg:
            negatives = list(negative_prompts) if negative_prompts is not None else [""] * len(prompts)
            if len(negatives) != len(prompts):
                raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
            unique = list(dict.fromkeys(negatives))
            encoded = encode_batch(unique)
            rows = [unique.index(n) for n in negatives]
            uncond = {k: v[rows] for k, v in encoded.items()}
        return Conditioning(encode_batch(prompts), uncond, prompts)

    def text_encoders(self) -> dict[str, nn.Module]:
        """The text encoders by name, what `free_text_encoders` drops: a diffusers pipeline's text_encoder(_2, _3);
        other adapters override this and `_drop_text_encoder`."""
        pipe = getattr(self, "pipe", None)
        return {} if pipe is None else {name: m for name, m in pipe.components.items()
                                        if name.startswith("text_encoder") and isinstance(m, nn.Module)}

    def _drop_text_encoder(self, name: str) -> None:
        setattr(self.pipe, name, None)

    @torch.no_grad()
    def free_text_encoders(self, prompts: list[str], cfg: bool, batch_size: int = 32) -> None:
        """Encode `prompts` once (and, with `cfg`, the empty negative prompt, which every prompt shares), keep the
        embeddings on the CPU and drop the text encoders; from here on `encode_prompts` looks prompts up and
        refuses any other. For runs over a finite prompt set, where the encoders (SD3's T5-XXL: 4.7 B
        parameters) would otherwise sit in accelerator memory (switch `model.free_text_encoders`)."""
        if self.edits:
            raise ValueError(f"{self.name} edits source images: its conditioning depends on each prompt's image, so "
                             "it cannot be encoded once up front (model.free_text_encoders)")
        prompts = list(dict.fromkeys(prompts))
        if not prompts:
            raise ValueError("free_text_encoders: no prompts to encode")
        on_cpu = lambda c: Conditioning(*c._map(lambda v: v.cpu()), c.prompts)  # noqa: E731
        cached = on_cpu(Conditioning.cat([self.encode_prompts(prompts[i:i + batch_size], cfg=False)
                                          for i in range(0, len(prompts), batch_size)]))
        empty = on_cpu(self.encode_prompts([""], cfg=True)).uncond if cfg else None
        for name in list(self.text_encoders()):
            self._drop_text_encoder(name)
        position = {p: i for i, p in enumerate(prompts)}
        device = self.device

        def encode_cached(prompts, negative_prompts=None, cfg=True):
            prompts = list(prompts)
            missing = sorted({p for p in prompts if p not in position})
            if missing:
                raise ValueError("the text encoders were freed after encoding the run's prompts "
                                 f"(model.free_text_encoders); not among them: {missing[:3]}")
            if negative_prompts is not None or (cfg and empty is None):
                raise ValueError("the text encoders were freed (model.free_text_encoders): only the prompts encoded "
                                 "before, with the empty negative prompt, are available")
            cond = {k: v.to(device) for k, v in cached.index([position[p] for p in prompts]).cond.items()}
            uncond = {k: v.expand(len(prompts), *v.shape[1:]).to(device) for k, v in empty.items()} if cfg else None
            return Conditioning(cond, uncond, prompts)

        self.encode_prompts = encode_cached  # an instance attribute: shallow copies of the adapter share it
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ---- denoiser ------------------------------------------------------------------------------------
    @abstractmethod
    def _velocity(self, latents: Tensor, sigma: Tensor, embeds: dict[str, Tensor], guidance_scale: float) -> Tensor:
        """One denoiser call on a batch, without CFG. `sigma` has shape [B]."""

    def predict_velocity(self, latents: Tensor, sigma: Tensor | float, cond: Conditioning,
                         guidance_scale: float = 1.0) -> Tensor:
        """Velocity (noise - x0) for a batch at per-sample sigmas, with guidance; returned in float32.

        For guidance == "cfg", CFG runs when guidance_scale > 1 (as in diffusers): v_u + w (v_c - v_u).
        For "embedded", guidance_scale is fed to the guidance embedding instead.
        """
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale={guidance_scale} must be >= 0")
        batch = latents.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=latents.device)
        sigma = sigma.expand(batch) if sigma.ndim == 0 else sigma
        if sigma.shape != (batch,):
            raise ValueError(f"sigma has shape {tuple(sigma.shape)}; expected a scalar or ({batch},)")
        x = latents.to(self.dtype)
        if self.guidance == "cfg" and guidance_scale > 1:
            if cond.uncond is None:
                raise ValueError("guidance_scale > 1 needs negative-prompt embeddings: encode_prompts(..., cfg=True)")
            if self.cfg_batched:
                both = self._velocity(torch.cat([x, x]), torch.cat([sigma, sigma]),
                                      _cat_dicts(cond.uncond, cond.cond), guidance_scale)
                v_uncond, v_cond = both.chunk(2)
            else:
                v_cond = self._velocity(x, sigma, cond.cond, guidance_scale)
                v_uncond = self._velocity(x, sigma, cond.uncond, guidance_scale)
            v = self.guide(v_cond, v_uncond, guidance_scale)
        else:
            v = self._velocity(x, sigma, cond.cond, guidance_scale)
        return v.float()

    def guide(self, v_cond: Tensor, v_uncond: Tensor, scale: float) -> Tensor:
        """Classifier-free guidance, v_u + w (v_c - v_u) (Ho & Salimans 2022, eq. 6), on the spatial layout; a
        pipeline that rescales the guided prediction (Qwen-Image's norm rescale) overrides this."""
        return v_uncond + scale * (v_cond - v_uncond)

    # ---- pixels --------------------------------------------------------------------------------------
    @abstractmethod
    def decode(self, latents: Tensor) -> Tensor:
        """Latents → pixels in [0, 1]: [B, 3, H, W] for images, [B, F, 3, H, W] for video."""

    @abstractmethod
    def encode(self, pixels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Pixels in [0, 1] (layout as `decode` returns) → latents; the posterior mean unless a generator is given."""

    # ---- the module that runs forward passes ------------------------------------------------------------
    @property
    def net(self) -> nn.Module:
        """What `_velocity` calls: the denoiser, or its distributed wrapper (DDP/FSDP) during training."""
        return getattr(self, "_net", None) or self.denoiser

    def set_forward_module(self, module: nn.Module | None) -> None:
        """Route forward passes through `module` (e.g. accelerate's prepared denoiser); None restores it."""
        self._net = module

    # ---- device --------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    # ---- LoRA (peft, diffusers' LoRA file format) ----------------------------------------------------
    def add_lora(self, rank: int = 32, alpha: float | None = None, target_modules: list[str] | None = None,
                 init_lora_weights: str | bool = "gaussian", adapter_name: str = "default") -> None:
        """Attach a LoRA adapter to the denoiser and freeze everything else."""
        from peft import LoraConfig  # peft takes seconds to import; only LoRA needs it

        config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank,
                            target_modules=list(target_modules or self.default_lora_targets),
                            init_lora_weights=init_lora_weights)
        self.denoiser.requires_grad_(False)
        self.denoiser.add_adapter(config, adapter_name=adapter_name)

    @property
    def has_lora(self) -> bool:
        return bool(getattr(self.denoiser, "peft_config", None))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.denoiser.parameters() if p.requires_grad]

    def save_lora(self, directory: str | os.PathLike, adapter_name: str = "default") -> Path:
        """Write the adapter as `pytorch_lora_weights.safetensors` in diffusers' format (with its rank/alpha)."""
        from peft.utils import get_peft_model_state_dict  # as above

        state = get_peft_model_state_dict(self.denoiser, adapter_name=adapter_name)
        metadata = self.denoiser.peft_config[adapter_name].to_dict()
        self._lora_io().save_lora_weights(directory, transformer_lora_layers=state,
                                          transformer_lora_adapter_metadata=metadata)
        return Path(directory) / "pytorch_lora_weights.safetensors"

    def load_lora(self, path: str | os.PathLike, adapter_name: str = "default") -> None:
        """Load a diffusers-format LoRA (directory or .safetensors file) into the denoiser."""
        path = Path(path)
        if not path.exists():
            raise ValueError(f"LoRA path {str(path)!r} does not exist")
        self._lora_io().load_lora_weights(str(path), adapter_name=adapter_name)
        self.denoiser.requires_grad_(False)

    def merge_lora(self) -> None:
        """Fold the LoRA weights into the base weights and remove the adapter layers."""
        self.denoiser.fuse_lora()
        self.denoiser.unload_lora()

    @contextlib.contextmanager
    def lora_disabled(self):
        """Run the base model (the reference policy for KL / DPO) while the adapter stays attached."""
        if not self.has_lora:
            yield
            return
        self.denoiser.disable_adapters()
        try:
            yield
        finally:
            self.denoiser.enable_adapters()

    def _lora_io(self):
        if getattr(self, "pipe", None) is None:
            raise NotImplementedError(f"{self.name} has no diffusers LoRA format")
        return self.pipe
