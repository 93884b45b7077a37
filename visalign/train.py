"""Training entry point: `visalign train CONFIG.yaml [overrides]` or, for several processes,
`accelerate launch [accelerate flags] -m visalign.train CONFIG.yaml [overrides]`.

The config's `trainer:` key picks the recipe; the whole config is validated before any model loads.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from visalign.trainers import load_train_config, trainer_class
from visalign.trainers.common import TrainingFault


def run(path: str | None, overrides: Sequence[str] = ()):
    cfg = load_train_config(path, overrides)  # every config error surfaces here, before any model loads
    trainer = trainer_class(cfg.trainer)(cfg)
    history = trainer.train()
    accelerator = trainer.accelerator
    del trainer  # its DDP wrapper holds the process group; end_distributed must be able to free it
    end_distributed(accelerator)
    return history


def end_distributed(accelerator) -> None:
    """Let every rank arrive, then tear the process group down: a rank that exits with gloo's threads still
    live can abort with "terminate called without an active exception" while the others finish. The prepared
    (DDP-wrapped) models keep the process group alive after `destroy_process_group` until they are collected,
    at interpreter exit, so the accelerator drops them first; callers drop their own references before."""
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    accelerator.end_training()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        print(__doc__)
        return 2
    try:
        run(argv[0], argv[1:])
    except ValueError as err:
        print(f"visalign train: error: {err}", file=sys.stderr)
        return 2
    except TrainingFault as err:
        print(f"visalign train: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
