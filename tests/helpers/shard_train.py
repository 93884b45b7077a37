"""Run by tests/trainers/test_sharding.py under `accelerate launch` (2 CPU processes, gloo; FSDP2 or DDP), or
called in-process for the single-process reference: train (`stop_after` steps, or all), then write from the main
process the whole trained weights before and after (start.safetensors, params.safetensors, gathered from the
shards) and the balancer's coefficients (run.json)."""

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from visalign.train import end_distributed
from visalign.trainers import load_train_config, trainer_class
from visalign.trainers.sharding import full


def train_and_record(out: str, stop_after: int, overrides: list[str]) -> None:
    cfg = load_train_config(None, [f"run.out_dir={out}", *overrides])
    trainer = trainer_class(cfg.trainer)(cfg)
    acc = trainer.accelerator
    start = {name: full(p.detach()).cpu().clone() for name, p in trainer._trained_named()}
    trainer.train(stop_after=stop_after or None)
    weights = {name: full(p.detach()).cpu().clone() for name, p in trainer._trained_named()}
    alpha = trainer.balancer.alpha if trainer.balancer is not None else None
    machines = acc.gather(torch.tensor([int(os.environ.get("GROUP_RANK", 0))], device=acc.device)).tolist()
    if acc.is_main_process:
        save_file(start, str(Path(out) / "start.safetensors"))
        save_file(weights, str(Path(out) / "params.safetensors"))
        (Path(out) / "run.json").write_text(json.dumps({
            "alpha": None if alpha is None else alpha.tolist(), "processes": acc.num_processes,
            "engine": acc.distributed_type.value, "machines": machines,
            # DeepSpeed counts the optimizer steps its engine took (one per accumulation boundary)
            "engine_steps": getattr(trainer.model, "global_steps", None)}))
    del trainer  # the prepared model must be freed before the process group
    end_distributed(acc)


if __name__ == "__main__":
    torch.set_num_threads(1)
    train_and_record(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
