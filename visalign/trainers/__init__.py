"""Training recipes on one engine: Flow-GRPO (`flow_grpo`), DiffusionNFT and Flow-RWR (`forward`), Flow-DPO
(`dpo`), Advantage Weighted Matching (`awm`), DGPO (`dgpo`), direct reward backprop (`draft`). A config's
`trainer:` key picks one from `TRAINERS`; see docs/architecture.md for the step each runs.
"""

from __future__ import annotations

from collections.abc import Sequence

from visalign.config import load_config, read_yaml
from visalign.registry import import_target
from visalign.suggest import did_you_mean

# trainer name -> ("module:ConfigClass", "module:TrainerClass"); register a recipe of your own here.
TRAINERS = {
    "flow_grpo": ("visalign.trainers.flow_grpo:FlowGRPOConfig", "visalign.trainers.flow_grpo:FlowGRPOTrainer"),
    "diffusion_nft": ("visalign.trainers.forward:DiffusionNFTConfig", "visalign.trainers.forward:DiffusionNFTTrainer"),
    "flow_rwr": ("visalign.trainers.forward:FlowRWRConfig", "visalign.trainers.forward:FlowRWRTrainer"),
    "flow_dpo": ("visalign.trainers.dpo:FlowDPOConfig", "visalign.trainers.dpo:FlowDPOTrainer"),
    "awm": ("visalign.trainers.awm:AWMConfig", "visalign.trainers.awm:AWMTrainer"),
    "dgpo": ("visalign.trainers.dgpo:DGPOConfig", "visalign.trainers.dgpo:DGPOTrainer"),
    "draft": ("visalign.trainers.draft:DraftConfig", "visalign.trainers.draft:DraftTrainer"),
}


def trainer_name(path: str | None, overrides: Sequence[str]) -> str:
    """The `trainer` of a config file (an override `trainer=...` wins); ValueError names the choices."""
    name = "flow_grpo"
    if path is not None:
        name = read_yaml(path).get("trainer", name)
    for item in overrides:
        if item.startswith("trainer="):
            name = item.split("=", 1)[1]
    if name not in TRAINERS:
        raise ValueError(f"unknown trainer {name!r}{did_you_mean(name, TRAINERS)}; allowed: {', '.join(TRAINERS)}")
    return name


def load_train_config(path: str | None, overrides: Sequence[str] = ()):
    """The recipe's config dataclass filled from the file and overrides, fully validated."""
    config_cls = import_target(TRAINERS[trainer_name(path, overrides)][0])
    return load_config(config_cls, path, overrides)


def trainer_class(name: str):
    """The trainer class registered as `name` (a config's `trainer:`)."""
    if name not in TRAINERS:
        raise ValueError(f"unknown trainer {name!r}{did_you_mean(name, TRAINERS)}; allowed: {', '.join(TRAINERS)}")
    return import_target(TRAINERS[name][1])
