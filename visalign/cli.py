"""The `visalign` command line. Each subcommand reads a config dataclass from an optional YAML file, then flags,
then dotted `key=value` overrides, and validates it before any compute.

Each handler imports what it runs, so `visalign --help` and a config error answer without loading torch."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from visalign.suggest import did_you_mean

# flag -> config field, for `visalign sample`
SAMPLE_FLAGS = {
    "model": "model", "model_path": "model_path", "lora": "lora", "prompt": "prompts",
    "negative_prompt": "negative_prompt", "steps": "steps", "guidance": "guidance", "seed": "seed",
    "height": "height", "width": "width", "num_frames": "num_frames", "sde": "sde", "noise_level": "noise_level",
    "dtype": "dtype", "device": "device", "out": "out", "source_image": "source_images",
}


def _flags_to_overrides(args: argparse.Namespace, mapping: dict[str, str]) -> list[str]:
    """Turn the flags the user gave into `field=value` overrides (values JSON-quoted, which YAML reads)."""
    return [f"{field}={json.dumps(getattr(args, flag))}" for flag, field in mapping.items()
            if getattr(args, flag, None) is not None]


def _sample(args: argparse.Namespace) -> int:
    from visalign.config import load_config
    from visalign.generate import SampleConfig, generate
    from visalign.media import save_pixels

    cfg = load_config(SampleConfig, args.config, _flags_to_overrides(args, SAMPLE_FLAGS) + list(args.overrides))
    start = time.perf_counter()
    pixels = generate(cfg)
    if cfg.model.startswith("tiny-"):
        print(f"note: {cfg.model} has random weights (a test model): it draws noise", file=sys.stderr)
    out = save_pixels(pixels, cfg.out)
    print(f"wrote {out} ({pixels.shape[0]} sample(s), {time.perf_counter() - start:.1f}s)")
    return 0


def _world_pretrain(args: argparse.Namespace) -> int:
    from visalign.config import load_config, save_config
    from visalign.world.pretrain import PretrainConfig, pretrain

    overrides = list(args.overrides) + (["video=true"] if args.video else [])
    cfg = load_config(PretrainConfig, args.config, overrides)
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    save_config(cfg, Path(cfg.out_dir) / "config.yaml")
    start = time.perf_counter()
    path = pretrain(cfg)
    print(f"wrote {path} ({(time.perf_counter() - start) / 60:.1f} min)")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from visalign.config import load_config
    from visalign.eval.reward_suite import PRESETS
    from visalign.models import load_model
    from visalign.world.suite import WorldEvalConfig, evaluate_world, markdown_table

    if args.suite not in ("world", "world-video", "rewards") and args.suite not in PRESETS:
        suites = ["world", "world-video", "rewards", *PRESETS]
        raise ValueError(f"unknown suite {args.suite!r}{did_you_mean(args.suite, suites)}; allowed: "
                         f"{', '.join(suites)}")
    flags = [f"out={json.dumps(args.out)}"] if args.out else []
    flags += [f"model_path={json.dumps(args.model_path)}"] if args.model_path else []
    if args.suite == "world-video":
        if args.compare:
            raise ValueError("--compare is not supported by the world-video suite; evaluate each checkpoint "
                             "with --model-path and compare results.json")
        return _eval_motion(args.config, flags + list(args.overrides))
    flags += [f"compare={json.dumps(args.compare)}"] if args.compare else []
    if args.suite != "world":
        return _eval_rewards(args.suite, args.config, flags + list(args.overrides))
    cfg = load_config(WorldEvalConfig, args.config, flags + list(args.overrides))
    if cfg.compare:
        return _eval_compare(cfg)
    adapter = load_model(cfg.model, cfg.model_path)
    if cfg.lora:
        adapter.load_lora(cfg.lora)
    results = evaluate_world(adapter, cfg)
    print(markdown_table(results))
    print(f"wrote {cfg.out}/results.json, results.md, grid_*.png")
    return 0


def _eval_motion(config: str | None, overrides: list[str]) -> int:
    """The moving-shapes suite on a video model."""
    from visalign.config import load_config
    from visalign.models import load_model
    from visalign.world.motion_suite import MotionEvalConfig, evaluate_motion, markdown_table

    cfg = load_config(MotionEvalConfig, config, overrides)
    adapter = load_model(cfg.model, cfg.model_path)
    if cfg.lora:
        adapter.load_lora(cfg.lora)
    print(markdown_table(evaluate_motion(adapter, cfg)))
    print(f"wrote {cfg.out}/results.json, results.md, filmstrip_*.png")
    return 0


def _eval_rewards(suite: str, config: str | None, overrides: list[str]) -> int:
    """A reward suite (a prompt file + rewards; presets name the rewards), single model or comparison mode."""
    import dataclasses

    from visalign.config import load_config
    from visalign.eval.reward_suite import (
        PRESETS,
        RewardEvalConfig,
        compare_rewards,
        comparison_table,
        evaluate_rewards,
        markdown_table,
        with_preset,
    )
    from visalign.models import load_model

    cfg = load_config(RewardEvalConfig, config, overrides)
    if not cfg.rewards and suite not in PRESETS:
        raise ValueError("--suite rewards needs rewards=[...] (or use a preset suite: " + ", ".join(PRESETS) + ")")
    cfg = with_preset(cfg, suite)  # the preset's rewards and prompts where the user gave none
    if not cfg.compare:
        adapter = load_model(cfg.model, cfg.model_path)
        if cfg.lora:
            adapter.load_lora(cfg.lora)
        results = evaluate_rewards(adapter, cfg)
        print(markdown_table({k: v for k, v in results.items() if not k.startswith("_")}, cfg.level))
        run = results["_run"]
        print(f"generated {run['generated']} samples, computed {run['scored']} scores (the rest were cached); "
              f"wrote {cfg.out}/results.json, results.md, grid.png")
        return 0
    results = {}
    for i, entry in enumerate(cfg.compare):
        adapter = _compare_entry(cfg.model, cfg.model_path, entry)
        sub = dataclasses.replace(cfg, out=str(Path(cfg.out) / f"entry_{i}"), compare=[],
                                  model_path=None if entry == "base" else entry, lora=None)
        results[entry] = evaluate_rewards(adapter, sub)
    deltas = compare_rewards(results, cfg.level)
    table = comparison_table(results, deltas, cfg.level)
    return _write_comparison(cfg.out, table, deltas)


def _demo(args: argparse.Namespace) -> int:
    try:
        from visalign.demo.app import DemoConfig, launch
    except ImportError as err:
        raise ValueError(f"the demo needs gradio: pip install -e '.[demo]' ({err})") from None

    def pairs(values: list[str], flag: str, prefix: str = "") -> dict[str, str]:
        out = {}
        for value in values:
            label, sep, path = value.partition("=")
            if not sep or not label or not path:
                raise ValueError(f"{flag} expects LABEL=PATH, got {value!r}")
            out[label] = prefix + path
        return out

    if args.concurrency < 1:
        raise ValueError(f"--concurrency={args.concurrency} must be >= 1")
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port={args.port} must be between 1 and 65535")
    checkpoints = {**pairs(args.checkpoint, "--checkpoint"), **pairs(args.lora, "--lora", "lora:")}
    kwargs = {"rewards": args.reward} if args.reward else {}
    limits = {k: getattr(args, k) for k in ("max_upload_mb", "max_pixels", "max_prompt_chars")
              if getattr(args, k) is not None}
    cfg = DemoConfig(model=args.model, model_path=args.model_path, checkpoints=checkpoints, runs_dir=args.runs,
                     **kwargs, **limits)
    try:
        _, url = launch(cfg, args.host, args.port, autorun=args.autorun, concurrency=args.concurrency, block=False)
    except OSError as err:  # gradio: "Cannot find empty port ..." or the bind's own error
        raise ValueError(f"cannot serve on {args.host}:{args.port}: {err}") from None
    print(f"visalign demo on {url} (Ctrl-C to stop)")
    _serve_forever()
    return 0


def _serve_forever() -> None:
    """Block until Ctrl-C (the demo was launched without blocking, so a bind error surfaced as a message)."""
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


def _write_comparison(out: str, table: str, deltas: dict) -> int:
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "comparison.md").write_text(table)
    (Path(out) / "comparison.json").write_text(json.dumps(deltas, indent=1))
    print(table)
    print(f"wrote {out}/comparison.md, comparison.json and entry_*/")
    return 0


def _compare_entry(model: str, model_path: str | None, entry: str):
    """An adapter for a comparison entry: 'base', lora:DIR (on model_path) or a checkpoint path."""
    from visalign.models import load_model

    if entry == "base":
        return load_model(model, None)
    if entry.startswith("lora:"):
        adapter = load_model(model, model_path)
        adapter.load_lora(entry[len("lora:"):])
        return adapter
    if not Path(entry).exists():
        raise ValueError(f"compare entry {entry!r}: no such checkpoint (use 'base', a path or lora:DIR)")
    return load_model(model, entry)


def _eval_compare(cfg) -> int:
    """Comparison mode: every entry on the same prompts and seeds, paired deltas vs the first."""
    import dataclasses

    from visalign.world.suite import compare_world, comparison_table, evaluate_world

    results = {}
    for i, entry in enumerate(cfg.compare):
        adapter = _compare_entry(cfg.model, cfg.model_path, entry)
        sub = dataclasses.replace(cfg, out=str(Path(cfg.out) / f"entry_{i}"), compare=[])
        results[entry] = evaluate_world(adapter, sub)
    deltas = compare_world(results)
    table = comparison_table(results, deltas)
    return _write_comparison(cfg.out, table, deltas)


def _quickstart(args: argparse.Namespace) -> int:
    """The main job on the built-in world: evaluate, align, evaluate again."""
    from visalign.quickstart import quickstart

    for flag, value in (("--steps", args.steps), ("--n", args.n)):
        if value is not None and value < 1:
            raise ValueError(f"{flag}={value} must be >= 1")
    start = time.perf_counter()
    table = quickstart(args.out, steps=args.steps, n_per_template=args.n, extra=list(args.overrides),
                       resume=args.resume)
    print(table)
    print(f"wrote {args.out}/table.md, before_after_seen.png, before_after_heldout.png "
          f"({(time.perf_counter() - start) / 60:.1f} min)")
    return 0


def _train(args: argparse.Namespace) -> int:
    from visalign.train import run

    run(args.config, list(args.overrides))
    return 0


def _world_vocab(args: argparse.Namespace) -> int:
    """What the world's prompts may say: its words by kind and an example of each template, image and video."""
    from visalign.world import grammar
    from visalign.world.motion import MOTION_TEMPLATES, MOTION_VOCABULARY
    from visalign.world.prompts import WorldPrompts, WorldVideoPrompts

    print("The shapes world reads these words only (others are an error naming them):")
    print(f"  colours:   {', '.join(grammar.COLORS)}")
    print(f"  shapes:    {', '.join(grammar.SHAPES)} (plural with s)")
    print(f"  sizes:     {', '.join(grammar.SIZES)}")
    print(f"  counts:    {', '.join(grammar.COUNT_WORDS.values())}")
    print(f"  positions: {'; '.join(grammar.POSITIONS.values())}")
    print(f"  relations: {'; '.join(grammar.RELATIONS.values())}")
    print(f"  video:     {', '.join(sorted(MOTION_VOCABULARY - grammar.VOCABULARY))}")
    print("\nImage templates (model world), one example each (seen split):")
    for template in grammar.TEMPLATES:
        spec = WorldPrompts.of("seen", (template,)).fixed_specs(1, 0)[0]
        print(f"  {template:<12} {spec.prompt}")
    print("\nVideo templates (model world-video):")
    for template in MOTION_TEMPLATES:
        spec = WorldVideoPrompts.of("seen", (template,)).fixed_specs(1, 0)[0]
        print(f"  {template:<12} {spec.prompt}")
    print("\nHeld-out compositions (split heldout) use the same words in combinations training never sees.")
    return 0


def _models(args: argparse.Namespace) -> int:
    from visalign.models import FAMILIES, describe_model, model_options

    for family in FAMILIES:
        print(f"{family.name}  (tiny: {', '.join(family.tiny)})")
        print(f"    {family.notes}")
        print(f"    hub: {', '.join(family.hub)}")
        print(f"    options: {', '.join(model_options(family.name)) or '(none)'}")
    for name in ("world", "world-video"):
        print(f"{name}\n    {describe_model(name)}")
    print("\nAny factory `package.module:function(path, **kwargs) -> FlowModelAdapter` also works as --model / "
          "model.name; options go in model.options (train) or model_options (sample).")
    return 0


def _reward_options(specs: Sequence[str], names: Sequence[str]) -> dict[str, dict]:
    """`NAME.key=value` strings -> {NAME: {key: value}} with YAML-typed values; NAME must be a --reward."""
    import yaml

    options: dict[str, dict] = {name: {} for name in names}
    for spec in specs:
        target, eq, value = spec.partition("=")
        name, dot, key = target.rpartition(".")
        if not eq or not dot or not key:
            raise ValueError(f"--option {spec!r} must look like NAME.key=value, e.g. pickscore.model=/path")
        if name not in options:
            raise ValueError(f"--option {spec!r} names reward {name!r}, which is not among --reward {list(names)}")
        options[name][key] = yaml.safe_load(value)
    return options


def _load_rewards(args: argparse.Namespace) -> dict:
    from visalign import rewards

    options = _reward_options(args.option or [], args.reward)
    for name in args.reward:  # name the unknown option before any model loads, as trainer configs do
        rewards.check_options(name, options[name])
    return {name: rewards.load(name, **options[name]) for name in args.reward}


def _steer(args: argparse.Namespace) -> int:
    from visalign.config import load_config
    from visalign.steering.config import SteerConfig, run

    cfg = load_config(SteerConfig, args.config, list(args.overrides))
    report = run(cfg, progress=True)
    print("| prompt | reward |\n|---|---|")
    for prompt, reward in zip(report["prompts"], report["reward"], strict=True):
        print(f"| {prompt} | {reward:.4f} |")
    print(f"NFE {report['nfe']} ({report['nfe_per_prompt']:.0f} per prompt), {report['wall_time']:.1f} s, "
          f"{100 * report['overhead_fraction']:.0f}% outside the denoiser; wrote {cfg.out}/")
    return 0


def _rewards_list(args: argparse.Namespace) -> int:
    from visalign import rewards

    rows = ["| reward | inputs | differentiable | range | summary |", "|---|---|---|---|---|"]
    for name in rewards.list_rewards():
        d = rewards.describe(name)
        low_high = "unbounded" if d["value_range"] is None else f"{d['value_range'][0]:g}–{d['value_range'][1]:g}"
        rows.append(f"| {name} | {d['inputs']} | {'yes' if d['differentiable'] else 'no'} | {low_high} | "
                    f"{d['summary']} |")
    print("\n".join(rows))
    return 0


def _read_metadata(value: str | None, count: int) -> list[dict] | None:
    """--metadata: one JSON object for every image, or a .jsonl file with one object per image."""
    if value is None:
        return None
    if value.endswith(".jsonl"):
        rows = [json.loads(line) for line in Path(value).read_text().splitlines() if line.strip()]
    else:
        rows = [json.loads(value)] * count
    if len(rows) != count:
        raise ValueError(f"--metadata {value} has {len(rows)} rows for {count} images")
    return rows


def _rewards_score(args: argparse.Namespace) -> int:
    import torch

    from visalign.pairs import load_image
    from visalign.rewards import combined

    prompts = args.prompt or []
    if len(prompts) not in (1, len(args.images)):
        raise ValueError(f"give one --prompt for all images or one per image ({len(args.images)}), got {len(prompts)}")
    prompts = prompts * len(args.images) if len(prompts) == 1 else prompts
    images = [load_image(p) for p in args.images]
    metadata = _read_metadata(args.metadata, len(images))
    table = {str(p): {} for p in args.images}
    for name, reward in _load_rewards(args).items():
        for i, (path, image) in enumerate(zip(args.images, images, strict=True)):  # one by one: sizes may differ
            with torch.no_grad():
                out = reward(prompts=[prompts[i]] if prompts else None, images=image[None],
                             metadata=[metadata[i]] if metadata else None)
            table[str(path)][name] = float(combined(out)[0])
            if isinstance(out, dict):
                table[str(path)].update({f"{name}/{k}": float(v[0]) for k, v in out.items() if k != "score"})
    if args.json:
        print(json.dumps(table, indent=1))
        return 0
    columns = list(args.reward)
    print("| image | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for path, row in table.items():
        print(f"| {path} | " + " | ".join(f"{row[c]:.4f}" for c in columns) + " |")
    return 0


def _rewards_eval(args: argparse.Namespace) -> int:
    from visalign.pairs import read_pairs
    from visalign.rewards.evaluation import evaluate_pairs

    pairs = read_pairs(args.pairs)  # every row checked before any model loads
    results = {name: evaluate_pairs(reward, pairs, batch_size=args.batch_size)
               for name, reward in _load_rewards(args).items()}
    print("| reward | pairs | ties | accuracy without ties | accuracy with ties | tie ε |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        without = f"{r['accuracy_without_ties']:.4f}" if "accuracy_without_ties" in r else "n/a"
        print(f"| {name} | {r['pairs']} | {r['ties']} | {without} | {r['accuracy_with_ties']:.4f} | "
              f"{r['tie_epsilon']:.4g} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
        print(f"wrote {args.out}")
    return 0


def _rewards_train_artifact(args: argparse.Namespace) -> int:
    from visalign.rewards.artifact import train_artifact

    metrics = train_artifact(args.clean, args.artifact, args.out, labels=args.labels, epochs=args.epochs,
                             image_size=args.image_size, seed=args.seed)
    print(json.dumps(metrics, indent=1))
    print(f"wrote {args.out}; use it with: --reward artifact --option artifact.weights={args.out}")
    return 0


def _rewards_make_artifact_set(args: argparse.Namespace) -> int:
    from visalign.world.artifacts import write_artifact_set

    clean, artifact = write_artifact_set(args.out, args.num_clean, args.num_artifact, args.seed)
    print(f"wrote {clean} and {artifact} (labels.json names each artifact image's kinds)")
    return 0


def _serve_rewards(args: argparse.Namespace) -> int:
    try:
        from visalign.rewards.server import address, bind, make_server
    except ImportError as err:
        raise ValueError(str(err)) from None
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port={args.port} must be between 0 (any free port) and 65535")
    if len(set(args.reward)) != len(args.reward):
        raise ValueError(f"--reward names a reward twice: {args.reward}")
    try:  # the address first: a port in use fails before any model loads
        sock = bind(args.host, args.port)
    except OSError as err:
        raise ValueError(f"cannot serve on {args.host}:{args.port}: {err}") from None
    served = _load_rewards(args)
    server = make_server(served, _reward_options(args.option or [], args.reward))
    url = address(sock)
    print(f"visalign reward server on {url} (Ctrl-C to stop); reward names for clients:")
    print("\n".join(f"  remote:{url}/{name}" for name in served), flush=True)
    server.run(sockets=[sock])
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
    p.add_argument("--source-image", dest="source_image", action="append",
                   help="editing models: the image a prompt edits (once for all prompts, or once per prompt)")
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
    wp.add_argument("--video", action="store_true", help="the moving-shapes video model (same as video=true)")
    wp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. steps=200 out_dir=runs/x")
    wp.set_defaults(func=_world_pretrain)

    wv = wsub.add_parser("vocab", help="the words and prompt templates the world models understand")
    wv.set_defaults(func=_world_vocab)

    e = sub.add_parser("eval", help="evaluate a model on a suite")
    e.add_argument("--suite", required=True, help="world, world-video, rewards (a prompt file + rewards), or a preset: "
                                                  "preference, geneval, compbench, vbench, world-rewards "
                                                  "(geneval, compbench: prompts from the shipped geneval:test)")
    e.add_argument("--config", help="YAML file with the suite's config fields")
    e.add_argument("--out", help="output directory")
    e.add_argument("--model-path", dest="model_path", help="checkpoint to evaluate")
    e.add_argument("--compare", action="append", help="a checkpoint to compare ('base', a path, lora:DIR); repeat: "
                                                      "side by side, paired deltas vs the first, 95%% intervals")
    e.add_argument("overrides", nargs="*", help="dotted overrides, e.g. n_per_template=16")
    e.set_defaults(func=_eval)

    d = sub.add_parser("demo", help="the Gradio comparison demo (base / aligned / steered, reward breakdowns)")
    d.add_argument("--model", default="world", help="registered model name (default: the built-in world)")
    d.add_argument("--model-path", dest="model_path", help="base checkpoint")
    d.add_argument("--checkpoint", action="append", default=[], help="LABEL=PATH of an aligned checkpoint; repeat")
    d.add_argument("--lora", action="append", default=[], help="LABEL=DIR of an aligned LoRA; repeat")
    d.add_argument("--reward", action="append", default=[], help="a reward to score with; repeat "
                                                                 "(default: the world's rewards)")
    d.add_argument("--runs", help="directory of training runs for the Training run tab (only files under it "
                                  "are served)")
    d.add_argument("--host", default="127.0.0.1")
    d.add_argument("--port", type=int, default=7860)
    d.add_argument("--concurrency", type=int, default=1, help="jobs running at once (the rest queue)")
    d.add_argument("--max-upload-mb", dest="max_upload_mb", type=float, help="largest upload (default 10)")
    d.add_argument("--max-pixels", dest="max_pixels", type=int, help="largest uploaded image, width x height "
                                                                     "(default 1048576)")
    d.add_argument("--max-prompt-chars", dest="max_prompt_chars", type=int, help="longest prompt (default 500)")
    d.add_argument("--autorun", action="store_true", help="run one comparison when the page loads")
    d.set_defaults(func=_demo)

    t = sub.add_parser("train", help="train with a config (the config's `trainer:` picks the recipe)")
    t.add_argument("config", help="YAML config, e.g. configs/flow_grpo_world.yaml")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=5e-5")
    t.set_defaults(func=_train)

    q = sub.add_parser("quickstart", help="the main job: evaluate, align and evaluate the world model (about 6 "
                       "minutes on 2 cores)")
    q.add_argument("--out", default="outputs/quickstart", help="output directory")
    q.add_argument("--steps", type=int, default=None,
                   help="training steps (default: the shipped config's, about 30 s each on 2 cores)")
    q.add_argument("--n", type=int, default=48, help="evaluation prompts per template and split")
    q.add_argument("--resume", action="store_true", help="go on from an interrupted run in --out (same settings): "
                   "the base evaluation is reused and training resumes from its latest checkpoint")
    q.add_argument("overrides", nargs="*", help="overrides of the shipped training config "
                   "(visalign/assets/quickstart.yaml), e.g. train.lr=5e-5")
    q.set_defaults(func=_quickstart)

    st = sub.add_parser("steer", help="steer a model towards rewards at inference (best-of-N, FK, guidance, ReNO)")
    st.add_argument("config", nargs="?", help="YAML file with SteerConfig fields, e.g. configs/steer_world.yaml")
    st.add_argument("overrides", nargs="*", help="dotted overrides, e.g. method=best_of_n options={n: 4}")
    st.set_defaults(func=_steer)

    r = sub.add_parser("rewards", help="list, score with, evaluate and train reward models")
    rsub = r.add_subparsers(dest="rewards_command", required=True)
    rl = rsub.add_parser("list", help="registered rewards and their properties")
    rl.set_defaults(func=_rewards_list)
    option_help = "constructor argument for a reward, NAME.key=value (YAML value), e.g. pickscore.model=/ckpt"
    rs = rsub.add_parser("score", help="score image files with one or more rewards")
    rs.add_argument("--reward", action="append", required=True, help="registered name or dotted path (repeat)")
    rs.add_argument("--option", action="append", help=option_help)
    rs.add_argument("--prompt", action="append", help="one prompt for all images, or one per image (repeat)")
    rs.add_argument("--metadata", help="JSON spec for every image, or a .jsonl file with one per image")
    rs.add_argument("--json", action="store_true", help="print every sub-score as JSON")
    rs.add_argument("images", nargs="+", help="image files")
    rs.set_defaults(func=_rewards_score)
    re_ = rsub.add_parser("eval", help="pairwise accuracy (with and without ties) on a preference-pair file")
    re_.add_argument("--pairs", required=True, help="JSONL pair file (see visalign/pairs.py)")
    re_.add_argument("--reward", action="append", required=True, help="registered name or dotted path (repeat)")
    re_.add_argument("--option", action="append", help=option_help)
    re_.add_argument("--batch-size", dest="batch_size", type=int, default=16)
    re_.add_argument("--out", help="write the results as JSON here")
    re_.set_defaults(func=_rewards_eval)
    rt = rsub.add_parser("train-artifact", help="train the learned artifact reward on PNG folders")
    rt.add_argument("--clean", required=True, help="folder of artifact-free PNGs")
    rt.add_argument("--artifact", required=True, help="folder of PNGs with artifacts (optional labels.json)")
    rt.add_argument("--out", required=True, help="output .safetensors")
    rt.add_argument("--labels", help="JSON {file: [kinds]} for the multi-label heads")
    rt.add_argument("--epochs", type=int, default=10)
    rt.add_argument("--image-size", dest="image_size", type=int, default=32)
    rt.add_argument("--seed", type=int, default=0)
    rt.set_defaults(func=_rewards_train_artifact)
    rm = rsub.add_parser("make-artifact-set", help="write a clean / artifact PNG set from the shapes world")
    rm.add_argument("--out", required=True)
    rm.add_argument("--num-clean", dest="num_clean", type=int, default=1500)
    rm.add_argument("--num-artifact", dest="num_artifact", type=int, default=1500)
    rm.add_argument("--seed", type=int, default=0)
    rm.set_defaults(func=_rewards_make_artifact_set)

    sr = sub.add_parser("serve-rewards", help="serve rewards over HTTP for `remote:` rewards in other processes",
                        description="Serve rewards over HTTP (FastAPI + uvicorn): trainers, evaluation, steering and "
                                    "`visalign rewards score` in other processes or environments use them as "
                                    "remote:http://HOST:PORT/NAME. GET /health lists them; the request schema is "
                                    "in docs/guide/rewards.md (\"Rewards as services\").")
    sr.add_argument("--reward", action="append", required=True, help="registered name or dotted path (repeat)")
    sr.add_argument("--option", action="append", help=option_help)
    sr.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface; there "
                                                        "is no authentication, so only on a trusted network)")
    sr.add_argument("--port", type=int, default=8000, help="port (0: any free one; the address is printed)")
    sr.set_defaults(func=_serve_rewards)

    m = sub.add_parser("models", help="list registered models")
    m.set_defaults(func=_models)
    return parser


# The config dataclass behind each subcommand: its fields are listed by `--help` (imported only then).
CONFIG_CLASSES = {
    ("sample",): "visalign.generate:SampleConfig",
    ("steer",): "visalign.steering.config:SteerConfig",
    ("world", "pretrain"): "visalign.world.pretrain:PretrainConfig",
    ("eval",): "visalign.world.suite:WorldEvalConfig",
    ("train",): "visalign.trainers.flow_grpo:FlowGRPOConfig",
    ("quickstart",): "visalign.trainers.config:RecipeConfig",
}


def _with_fields_help(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Before `--help` prints: attach the fields of the subcommand's config to its help."""
    from visalign.config import fields_help
    from visalign.registry import import_target

    words = [a for a in argv if not a.startswith("-")]
    for path, target in CONFIG_CLASSES.items():
        if tuple(words[:len(path)]) != path:
            continue
        node = parser
        for word in path:
            node = next(a for a in node._actions if isinstance(a, argparse._SubParsersAction)).choices[word]
        node.formatter_class = argparse.RawDescriptionHelpFormatter
        if path == ("train",):  # the recipe the config names (flow_grpo when none)
            from visalign.trainers import TRAINERS, trainer_name

            config = words[1] if len(words) > 1 and Path(words[1]).is_file() else None
            with contextlib.suppress(ValueError):
                target = TRAINERS[trainer_name(config, [w for w in words[2:] if w.startswith("trainer=")])][0]
        extra = {"train": "\nThese are the fields of the recipe the config names (flow_grpo when none); "
                          "`visalign train CONFIG --help` shows that recipe's.",
                 "eval": "\nThe fields of the world suite; other suites take their own (docs/guide/evaluation.md).",
                 "quickstart": "\nOverrides apply to visalign/assets/quickstart.yaml (a dgpo config)."}.get(path[0], "")
        node.epilog = fields_help(import_target(target)) + extra


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if "-h" in argv or "--help" in argv:
        _with_fields_help(parser, argv)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:  # bad input (config, model, request): a message, not a traceback
        print(f"visalign {args.command}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `visalign rewards list | head`: the reader left; say nothing more
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - the interpreter flushes it at exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
