"""Numerics do not drift: three steps of each recipe, with fixed seeds, end in exactly the trained parameters that
were recorded in `regression/` (bit for bit). Refactors of the trainer core must keep these passing; a deliberate
change of numerics re-records them and says why in its commit:

    HF_HUB_OFFLINE=1 .venv/bin/python tests/trainers/test_regression.py --record [NAME ...]
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from visalign.trainers import load_train_config, trainer_class

FIXTURES = Path(__file__).resolve().parent / "regression"
TOY = "tests.helpers.toy_rewards"
SMALL = ("train.max_steps=3", "train.prompts_per_step=2", "train.group_size=4", "train.train_batch_size=3",
         "sampling.batch_size=4", "sampling.steps=4", "sampling.guidance=3.0", "run.eval_every=0",
         "run.log_with=none", "run.progress=false", "run.checkpoint_every=100", "train.lr=1e-3", "model.lora_rank=4",
         "model.height=32", "model.width=32", f"rewards={{{TOY}.MeanBrightness: 1.0}}")
TWO_REWARDS = f"rewards={{{TOY}.MeanBrightness: 1.0, {TOY}.RedChannel: 0.5}}"
FORWARD = ("sampling.sde=ode", "train.timesteps_per_sample=2")

RUNS = {
    # Flow-GRPO with the CPS sampler on a 2-step SDE window, GRPO-Guard and a KL to the reference.
    "flow_grpo": ("flow_grpo", "sampling.sde=cps", "sampling.noise_level=0.8", "sampling.window_size=2",
                  "train.grpo_guard=true", "train.clip_range=2e-4", "train.kl_beta=0.1",
                  "train.optimizer_steps_per_rollout=2"),
    "flow_grpo_balanced": ("flow_grpo", "train.balance.method=mgda", "train.balance.ema=0.5", TWO_REWARDS),
    "diffusion_nft": ("diffusion_nft", *FORWARD, "train.kl_beta=0.1", "train.old_decay_rate=0.25"),
    "diffusion_nft_marble": ("diffusion_nft", *FORWARD, "train.balance.method=upgrad", "train.balance.amortized=true",
                             "train.balance.gram=output", "train.sample_with_old=false", TWO_REWARDS),
    "flow_rwr": ("flow_rwr", *FORWARD, "train.weighting=exp", "train.temperature=0.5"),
    "flow_dpo_online": ("flow_dpo", *FORWARD, "train.ref_update_every=2", "train.gap_weighting=true"),
    "flow_dpo_offline": ("flow_dpo", *FORWARD, "train.mode=offline", "train.pairs_per_step=2", "rewards={}"),
    "awm": ("awm", *FORWARD, "train.kl_beta=0.1", "train.old_decay_rate=0.25"),
    "dgpo": ("dgpo", *FORWARD, "train.train_batch_size=4", "train.old_decay_rate=0.25"),
    "draft": ("draft", "sampling.sde=ode", "train.truncation_steps=2", "train.kl_beta=0.1"),
}


def pair_file(directory: Path) -> Path:
    """Two preference pairs over three fixed 32×32 images."""
    (directory / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(directory / "img" / f"{name}.png")
    rows = [{"prompt": "a red circle", "chosen": "img/a.png", "rejected": "img/b.png"},
            {"prompt": "two blue squares", "chosen": "img/c.png", "rejected": "img/a.png"}]
    path = directory / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def trained_parameters(name: str, out: Path) -> dict[str, torch.Tensor]:
    trainer, *overrides = RUNS[name]
    if "train.mode=offline" in overrides:
        overrides.append(f"train.pairs={pair_file(out / 'data')}")
    cfg = load_train_config(None, [f"trainer={trainer}", "model.name=tiny-sd3", f"run.out_dir={out / 'run'}", *SMALL,
                                   *overrides])
    t = trainer_class(trainer)(cfg)
    t.train()
    return {f"{i:03d}": p.detach().cpu().contiguous() for i, p in enumerate(t.params)}


@pytest.mark.parametrize("name", list(RUNS))
def test_three_steps_end_in_the_recorded_parameters(name, tmp_path):
    recorded = load_file(str(FIXTURES / f"{name}.safetensors"))
    got = trained_parameters(name, tmp_path)
    assert list(got) == list(recorded)
    changed = [k for k in got if not torch.equal(got[k], recorded[k])]
    assert not changed, f"{name}: {len(changed)} of {len(got)} tensors differ, e.g. {changed[:3]}"


def record(names: list[str]) -> None:
    import tempfile

    sys.path.insert(0, str(FIXTURES.parents[2]))  # the toy rewards' dotted paths start at the repository root
    FIXTURES.mkdir(exist_ok=True)
    torch.set_num_threads(1)  # as the test run (tests/conftest.py)
    for name in names or RUNS:
        with tempfile.TemporaryDirectory() as tmp:
            save_file(trained_parameters(name, Path(tmp)), str(FIXTURES / f"{name}.safetensors"))
        print("recorded", name)


if __name__ == "__main__":
    if sys.argv[1:2] != ["--record"] or not set(sys.argv[2:]) <= set(RUNS):
        sys.exit(__doc__)
    record(sys.argv[2:])
