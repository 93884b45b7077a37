"""The `visalign` command line. Subcommands arrive with their issues; each reads a config dataclass from an
optional YAML file, then flags, then dotted `key=value` overrides, and validates it before any compute."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

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


def _world_pretrain(args: argparse.Namespace) -> int:
    from visalign.config import load_config, save_config
    from visalign.world.pretrain import PretrainConfig, pretrain

    cfg = load_config(PretrainConfig, args.config, list(args.overrides))
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    save_config(cfg, Path(cfg.out_dir) / "config.yaml")
    start = time.perf_counter()
    path = pretrain(cfg)
    print(f"wrote {path} ({(time.perf_counter() - start) / 60:.1f} min)")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from visalign.config import load_config
    from visalign.eval.world_suite import WorldEvalConfig, evaluate_world, markdown_table
    from visalign.models import load_model

    if args.suite != "world":
        raise ValueError(f"unknown suite {args.suite!r}; allowed: world")
    flags = [f"out={json.dumps(args.out)}"] if args.out else []
    flags += [f"model_path={json.dumps(args.model_path)}"] if args.model_path else []
    cfg = load_config(WorldEvalConfig, args.config, flags + list(args.overrides))
    adapter = load_model(cfg.model, cfg.model_path)
    if cfg.lora:
        adapter.load_lora(cfg.lora)
    results = evaluate_world(adapter, cfg)
    print(markdown_table(results))
    print(f"wrote {cfg.out}/results.json, results.md, grid_*.png")
    return 0


def _quickstart(args: argparse.Namespace) -> int:
    """The main job on the built-in world: evaluate, align with Flow-GRPO, evaluate again."""
    from visalign.quickstart import quickstart

    start = time.perf_counter()
    table = quickstart(args.out, steps=args.steps, n_per_template=args.n, extra=list(args.overrides))
    print(table)
    print(f"wrote {args.out}/table.md, before_after_seen.png, before_after_heldout.png "
          f"({(time.perf_counter() - start) / 60:.1f} min)")
    return 0


def _train(args: argparse.Namespace) -> int:
    from visalign.train import run

    run(args.config, list(args.overrides))
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

    w = sub.add_parser("world", help="the built-in shapes world")
    wsub = w.add_subparsers(dest="world_command", required=True)
    wp = wsub.add_parser("pretrain", help="train the world base model with flow matching (resumable)")
    wp.add_argument("--config", help="YAML file with PretrainConfig fields")
    wp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. steps=200 out_dir=runs/x")
    wp.set_defaults(func=_world_pretrain)

    e = sub.add_parser("eval", help="evaluate a model on a suite")
    e.add_argument("--suite", required=True, help="world")
    e.add_argument("--config", help="YAML file with the suite's config fields")
    e.add_argument("--out", help="output directory")
    e.add_argument("--model-path", dest="model_path", help="checkpoint to evaluate")
    e.add_argument("overrides", nargs="*", help="dotted overrides, e.g. n_per_template=16")
    e.set_defaults(func=_eval)

    t = sub.add_parser("train", help="train with a config (the config's `trainer:` picks the recipe)")
    t.add_argument("config", help="YAML config, e.g. configs/flow_grpo_world.yaml")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=5e-5")
    t.set_defaults(func=_train)

    q = sub.add_parser("quickstart", help="the main job: evaluate, align with Flow-GRPO, evaluate the world model")
    q.add_argument("--out", default="outputs/quickstart", help="output directory")
    q.add_argument("--steps", type=int, default=10, help="Flow-GRPO steps (about 30 s each on 2 cores)")
    q.add_argument("--n", type=int, default=16, help="evaluation prompts per template and split")
    q.add_argument("overrides", nargs="*", help="Flow-GRPO config overrides, e.g. train.lr=5e-5")
    q.set_defaults(func=_quickstart)

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
