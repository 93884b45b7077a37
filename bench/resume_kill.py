"""Resume after `kill -9`: the final weights must be bit-identical to an uninterrupted run.

    .venv/bin/python bench/resume_kill.py --steps 6 --kill-after 3

Runs `visalign train` three times on a tiny SD3 (no downloads): once uninterrupted; once killed with SIGKILL
from outside as soon as checkpoint `--kill-after` is complete (a step or two later may be half-done); and
once more with the same command, which resumes from the latest verified checkpoint. Prints whether every
tensor of the two final LoRA files is equal, and writes results.json to `--out` (the verdict, the checkpoints on
disk at the kill, and `context`: threads, load, CPUs, device, commit from bench/paired.py).

The arms (uninterrupted; killed and resumed) are compared on their outcome after the same work (`--steps` steps,
bit for bit), not on time: nothing is timed, and they run one after the other, as the kill needs a run of its own
to watch.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import paired
import torch
from safetensors.torch import load_file


def command(out: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "visalign.train", "configs/flow_grpo_world.yaml", "model.name=tiny-sd3",
            "model.finetune=lora", "model.lora_rank=4", f"run.out_dir={out}", f"train.max_steps={steps}",
            "train.prompts_per_step=2", "train.group_size=4", "train.train_batch_size=4", "sampling.batch_size=8",
            "sampling.steps=4", "sampling.window_size=null", "sampling.window_range=null", "train.lr=1e-3",
            "run.checkpoint_every=1", "run.checkpoints_total_limit=3", "run.eval_every=0", "run.log_with=none",
            "run.progress=false", "eval_rewards=[]", "rewards={world-cleanliness: 1.0}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--kill-after", type=int, default=3, help="kill once this checkpoint is complete")
    parser.add_argument("--out", default="outputs/bench_resume_kill")
    args = parser.parse_args()
    root = Path(args.out)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight, killed = root / "straight", root / "killed"
    for d in (straight, killed):
        subprocess.run(["rm", "-rf", str(d)], check=True)

    subprocess.run(command(straight, args.steps), check=True, env=env, capture_output=True)

    proc = subprocess.Popen(command(killed, args.steps), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    marker = killed / "checkpoints" / f"checkpoint-{args.kill_after}" / "manifest.json"
    while not marker.exists():
        if proc.poll() is not None:
            raise SystemExit("the run finished before it could be killed; lower --kill-after")
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    on_disk = sorted(p.name for p in (killed / "checkpoints").iterdir())
    print(f"killed -9 after checkpoint-{args.kill_after}; checkpoints on disk: {on_disk}")

    subprocess.run(command(killed, args.steps), check=True, env=env, capture_output=True)
    a = load_file(str(straight / "final" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(killed / "final" / "pytorch_lora_weights.safetensors"))
    equal = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    print(f"final LoRA tensors: {len(a)}; bit-identical to the uninterrupted run: {equal}")
    context = {**paired.context(), "torch_threads": int(env["OMP_NUM_THREADS"])}  # the runs', not this watcher's
    (root / "results.json").write_text(json.dumps(
        {"steps": args.steps, "kill_after": args.kill_after, "checkpoints_at_kill": on_disk, "tensors": len(a),
         "bit_identical": equal, "context": context}, indent=1) + "\n")
    print(paired.equal_work(f"{args.steps} steps each, compared bit for bit", context))
    if not equal:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
