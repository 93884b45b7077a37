"""Peak memory and step time of each memory switch, as ratios to the default, on a trainer step.

    .venv/bin/python bench/memory_switches.py                    # tiny-sd3 and the world model, on this machine
    .venv/bin/python bench/memory_switches.py --models world --steps 3

Each arm is one Flow-GRPO full fine-tuning run with KL (so a frozen reference copy exists) in its own process:
a warm-up step, then `--steps` timed steps, then one more whose peak tensor memory is measured
(`paired.peak_memory`: on a GPU the allocator's peak; on the CPU the peak of torch's memory timeline, every
tensor it sees, weights and copies included, deterministic where resident-memory peaks varied by ±40 % between
runs here). Arms run `--rounds` times, their processes interleaved round by round (`bench/paired.py`, its clock
the processes' own step time); the step-time column is the median of the per-round ratios to the default with
their spread. The switches:

- gradient_checkpointing: model.gradient_checkpointing=true (activations recomputed in backward)
- reference_bf16: model.reference_dtype=bfloat16 (the frozen reference copy in half precision)
- decode_batch_1: sampling.decode_batch=1 (rollout latents decoded one at a time)
- bf16: train.mixed_precision=bf16 (rollouts and training passes under bf16 autocast; log-probs stay fp32)
- free_text_encoders: model.free_text_encoders=true (the run's prompts encoded once, the text encoders freed)
- offload_copies: model.offload_copies=true (reference / old-policy copies and the EMA in CPU memory between uses:
  on a CPU-only machine the "device" is that memory, so this arm can only show its cost, not its saving)

Every arm reads the same prompt file (world prompts, 4 per template), which free_text_encoders needs.

On the tiny and world models the weights are a few MB, so the copy and decoding switches move little here; the
same switches at real size are what bench/scale.py and a GPU are for.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ARMS = {
    "default": [],
    "gradient_checkpointing": ["model.gradient_checkpointing=true"],
    "reference_bf16": ["model.reference_dtype=bfloat16"],
    "decode_batch_1": ["sampling.decode_batch=1"],
    "bf16": ["train.mixed_precision=bf16"],
    "free_text_encoders": ["model.free_text_encoders=true"],
    "offload_copies": ["model.offload_copies=true"],
}
MODELS = {
    "tiny-sd3": ["model.name=tiny-sd3", "model.height=64", "model.width=64", "sampling.steps=4"],
    "world": ["model.name=world", "sampling.steps=6"],
}
COMMON = ["model.finetune=full", "train.kl_beta=0.04", "train.prompts_per_step=4", "train.group_size=4",
          "sampling.batch_size=8", "train.train_batch_size=8", "run.eval_every=0", "run.log_with=none",
          "run.progress=false", "rewards={tests.helpers.toy_rewards.MeanBrightness: 1.0}"]


def arm(model: str, name: str, steps: int, out: str, memory: bool = True) -> dict:
    import torch
    from paired import peak_memory

    from visalign.trainers import load_train_config, trainer_class
    from visalign.world.prompts import WorldPrompts

    torch.set_num_threads(1)
    prompts = Path(out) / "prompts.txt"
    prompts.parent.mkdir(parents=True, exist_ok=True)
    prompts.write_text("".join(f"{p.text}\n" for p in WorldPrompts("seen").fixed(4)))
    cfg = load_train_config(None, [f"run.out_dir={out}", *COMMON, *MODELS[model], *ARMS[name],
                                   f"train.prompts={prompts}", f"train.max_steps={steps + 2}"])
    trainer = trainer_class(cfg.trainer)(cfg)
    trainer.step(0)  # warm-up: optimizer state and caches exist from here on
    start = time.perf_counter()
    for step in range(1, steps + 1):
        trainer.step(step)
    seconds = (time.perf_counter() - start) / steps
    if not memory:
        return {"model": model, "arm": name, "seconds": seconds}
    peak = peak_memory(lambda: trainer.step(steps + 1), workdir=out)
    return {"model": model, "arm": name, "seconds": seconds, "peak": peak, "held": held_bytes(trainer)}


def held_bytes(trainer) -> int:
    """Bytes of what the trainer keeps between steps on its device: every module's weights (denoiser, text
    encoders, VAE, frozen reference copy), optimizer state and parameter copies (old policy, EMA), each storage
    once. Offloaded copies are on the CPU: on a CPU-only machine that is the same memory, so they still count."""
    import torch

    device = trainer.accelerator.device
    storages = {}

    def add(t):
        if isinstance(t, torch.Tensor) and t.device.type == device.type:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    adapter = trainer.adapter
    modules = [adapter.denoiser, trainer.ref_denoiser, *adapter.text_encoders().values(),
               *[m for m in getattr(getattr(adapter, "pipe", None), "components", {}).values()
                 if isinstance(m, torch.nn.Module)]]
    for module in filter(None, modules):
        for t in [*module.parameters(), *module.buffers()]:
            add(t)
    for state in trainer.optimizer.state_dict()["state"].values():
        for t in state.values():
            add(t)
    for state in trainer.checkpointed.values():
        for t in getattr(state, "shadow", []):
            add(t)
    return sum(storages.values())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--steps", type=int, default=2, help="timed steps per arm process")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of arm processes")
    ap.add_argument("--out", type=Path, default=Path("outputs/memory_switches"))
    ap.add_argument("--arm", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--no-memory", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.arm:  # a child: one arm in its own process, so its peak is its own
        print(json.dumps(arm(*args.arm, args.steps, str(args.out / "_".join(args.arm)), memory=not args.no_memory)))
        return 0
    from paired import compare

    root = Path(__file__).resolve().parents[1]
    rows = []
    for model in args.models:
        measured: dict[str, dict] = {}
        step_clock = [0.0]  # seconds of timed steps reported by the children so far

        def child(name, model=model, measured=measured, step_clock=step_clock):
            def run():
                cmd = [sys.executable, __file__, "--arm", model, name, "--steps", str(args.steps), "--out",
                       str(args.out), *(["--no-memory"] if name in measured else [])]
                done = subprocess.run(cmd, capture_output=True, text=True, cwd=root,
                                      env={**__import__("os").environ, "PYTHONPATH": str(root)})
                if done.returncode:
                    raise SystemExit(f"{model} {name} failed:\n{done.stderr[-3000:]}")
                result = json.loads(done.stdout.strip().splitlines()[-1])
                measured.setdefault(name, result)  # the first run of an arm also measured its memory
                step_clock[0] += result["seconds"]
                print(f"{model} {name}: {result['seconds']:.2f} s per step", file=sys.stderr, flush=True)
            return run

        names = ["default", *[a for a in args.arms if a != "default"]]
        # Each arm's processes alternate with the others' round by round; the clock is the children's own step
        # time, so process start-up and model loading are not in the ratios.
        report = compare({name: child(name) for name in names}, rounds=args.rounds, warmup=0,
                         clock=lambda step_clock=step_clock: step_clock[0])
        for result in report.arms:
            rows.append({**measured[result.name], "ratio": result.median_ratio, "spread": list(result.spread)})
    print("| model | switch | peak memory / default | step time / default (median; spread) | peak tensor memory, MB "
          "| held, MB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        base = next(x for x in rows if x["model"] == r["model"] and x["arm"] == "default")
        ratio = f"{r['peak'] / base['peak']:.2f}" if base["peak"] > 0 else "-"
        lo, hi = r["spread"]
        print(f"| {r['model']} | {r['arm']} | {ratio} | {r['ratio']:.2f} ({lo:.2f} – {hi:.2f}) | "
              f"{r['peak'] / 2**20:.0f} | {r['held'] / 2**20:.1f} |")
    print(f"\n{args.rounds} interleaved rounds of one process per arm (bench/paired.py; the clock is the processes' "
          f"own step time); context: {report.context}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
