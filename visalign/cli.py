"""The `visalign` command line. Subcommands arrive with their issues; each reads a config dataclass from an
optional YAML file, then flags, then dotted `key=value` overrides, and validates it before any compute."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

# flag -> config field, for `visalign sample`
SAMPLE_FLAGS = {
    "model": "model", "model_path": "model_path", "lora": "lora", "prompt": "prompts",
    "negative_prompt": "negative_prompt", "steps": "steps", "guidance": "guidance", "seed": "seed",
    "height": "height", "width": "width", "num_frames": "num_frames", "sde": "sde", "noise_level": "noise_level",
    "dtype": "dtype", "device": "device", "out": "out",
}


def _flags_to_overrides(args: argparse.Namespace, mapping: dict[str, str]) -> list[str]:
    """Turn the flags the user gave into `field=value` overrides (values JSON-quoted, which YAML reads)."""
    return [f"{field}={json.dumps(getattr(args, flag))}" for flag, field in mapping.items()
            if getattr(args, flag, None) is not None]


def _sample(args: argparse.Namespace) -> int:
    from visalign.config import load_config
    from visalign.generate import SampleConfig, generate, save_pixels

    cfg = load_config(SampleConfig, args.config, _flags_to_overrides(args, SAMPLE_FLAGS) + list(args.overrides))
    start = time.perf_counter()
    pixels = generate(cfg)
    out = save_pixels(pixels, cfg.out)
    print(f"wrote {out} ({pixels.shape[0]} sample(s), {time.perf_counter() - start:.1f}s)")
    return 0


def _models(args: argparse.Namespace) -> int:
    from visalign.models import list_models

    print("\n".join(list_models()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visalign", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sample", help="generate images or videos with a model",
                       description="Generate with any registered model; flags override the YAML config.")
    p.add_argument("--config", help="YAML file with SampleConfig fields")
    p.add_argument("--model", help="registered model name (see `visalign models`) or dotted path")
    p.add_argument("--model-path", dest="model_path", help="local directory or hub id")
    p.add_argument("--lora", help="diffusers-format LoRA directory or file")
    p.add_argument("--prompt", action="append", help="prompt (repeat for several samples)")
    p.add_argument("--negative-prompt", dest="negative_prompt")
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--num-frames", dest="num_frames", type=int)
    p.add_argument("--sde", help="ode | flow_grpo | cps | dance")
    p.add_argument("--noise-level", dest="noise_level", type=float)
    p.add_argument("--dtype", help="float32 | bfloat16 | float16")
    p.add_argument("--device")
    p.add_argument("--out", help="output .png (or .gif for video)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. steps=30")
    p.set_defaults(func=_sample)

    m = sub.add_parser("models", help="list registered models")
    m.set_defaults(func=_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:  # bad input (config, model, request): a message, not a traceback
        print(f"visalign {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
