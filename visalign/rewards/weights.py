"""Reading reward checkpoints safely and loading them strictly, shared by every reward model."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn


def load_checkpoint(path: str | Path, wrappers: tuple[str, ...] = ("state_dict",)) -> dict[str, Tensor]:
    """A state dict from `.safetensors` or a torch pickle (weights_only=True); the first wrapper key found
    (e.g. {'state_dict': ...} in the released HPSv2 files) is unwrapped and a DDP 'module.' prefix dropped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in wrappers:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_state_dict_checked(module: nn.Module, state_dict: dict[str, Tensor], source: str) -> None:
    """Load strictly, with an error that names every missing, unexpected and mis-shaped key."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [f"{k} (checkpoint {tuple(state_dict[k].shape)}, model {tuple(v.shape)})"
                  for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    problems = [f"{label}: {', '.join(keys[:10])}{f' … (+{len(keys) - 10})' if len(keys) > 10 else ''}"
                for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                    ("shape mismatch", mismatched)) if keys]
    if problems:
        raise ValueError(f"{source} does not fit {type(module).__name__}: " + "; ".join(problems))
    module.load_state_dict(state_dict)


def hf_pretrained(cls, source: str | Path, dtype: torch.dtype):
    """`cls.from_pretrained`, refusing to silently random-initialise weights the checkpoint lacks."""
    model, info = cls.from_pretrained(str(source), dtype=dtype, output_loading_info=True)
    missing = sorted(info.get("missing_keys", ()))
    mismatched = sorted(str(k[0]) if isinstance(k, tuple) else str(k)
                        for k in info.get("mismatched_keys", ()))
    if missing or mismatched:
        raise ValueError(f"{source} does not fit {cls.__name__}: missing keys {missing[:10]}, "
                         f"shape mismatch {mismatched[:10]}")
    return model


def hf_model_and_processor(model, processor, model_cls, processor_cls, *, dtype: torch.dtype,
                           device: str | torch.device, label: str):
    """A frozen transformers model and its processor (or tokenizer), each given as an object, a local directory
    or a hub id; the processor defaults to the model's own directory. Loading is strict (`hf_pretrained`) and
    never runs remote code."""
    if isinstance(model, (str, Path)):
        processor = model if processor is None else processor
        model = hf_pretrained(model_cls, model, dtype)
    if processor is None:
        raise ValueError(f"{label}: pass the processor / tokenizer (an object, local dir or hub id) "
                         "with a model object")
    if isinstance(processor, (str, Path)):
        processor = processor_cls.from_pretrained(str(processor))
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False), processor
