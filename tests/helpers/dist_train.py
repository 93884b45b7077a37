"""Run by tests/test_distributed.py under `accelerate launch` (2 CPU processes, gloo): train two steps and
record, from every rank, the world size, its share of the prompt groups, a checksum of its parameters and the
last step's drift diagnostics."""

import json
import sys

import torch

from visalign.train import end_distributed
from visalign.trainers import load_train_config
from visalign.trainers.common import plan_step
from visalign.trainers.flow_grpo import FlowGRPOTrainer


def main():
    out, *overrides = sys.argv[1:]
    torch.set_num_threads(1)
    cfg = load_train_config(None, [f"run.out_dir={out}", *overrides])
    trainer = FlowGRPOTrainer(cfg)
    acc = trainer.accelerator
    history = trainer.train()
    plan = plan_step(trainer.source, seed=cfg.run.seed, step=0, prompts_per_step=cfg.train.prompts_per_step,
                     group_size=cfg.train.group_size, rank=acc.process_index, world_size=acc.num_processes)
    flat = torch.cat([p.detach().flatten().double() for p in trainer.params])
    record = torch.tensor([acc.num_processes, acc.process_index, plan.start, len(plan.items),
                           float(flat.sum()), float(flat.pow(2).sum())], dtype=torch.float64)
    groups = acc.gather(plan.groups)
    records = acc.gather(record.unsqueeze(0))
    drift = acc.gather(torch.tensor([[history[-1][k] for k in ("drift/brightness", "drift/diversity",
                                                                 "drift/ratio_min", "drift/ratio_max")]],
                                    dtype=torch.float64))
    if acc.is_main_process:
        with open(f"{out}/dist.json", "w") as f:
            json.dump({"records": records.tolist(), "groups": groups.tolist(), "drift": drift.tolist()}, f)
    del trainer  # as visalign.train.run does: the DDP wrapper must be freed before the process group
    end_distributed(acc)


if __name__ == "__main__":
    main()
