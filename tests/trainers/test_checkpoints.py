"""Checkpoints are data: the trainer's own state is saved as safetensors + JSON and resumed without unpickling; a
pickle planted in a checkpoint (its manifest recomputed, as an attacker would) never runs; damaged manifests are
named."""

import contextlib
import json

import pytest
import torch

from visalign.trainers import trainer_class
from visalign.trainers.common import (
    MANIFEST,
    load_trainer_state,
    save_trainer_state,
    verify_checkpoint,
    write_manifest,
)

TOY = "tests.helpers.toy_rewards"
# DiffusionNFT keeps the most state of its own (old policy, EMA, step): the widest test of what resume restores.
RUN = ("train.max_steps=2", "train.timesteps_per_sample=2", "sampling.sde=ode", "train.ema.decay=0.9",
       f"rewards={{{TOY}.MeanBrightness: 1.0}}", "run.checkpoint_every=1")


class _Planted:
    """Unpickling this creates `path`: what a crafted checkpoint file would do with code of its choosing."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_trainer_state_round_trips_as_data(tmp_path):
    state = {"ema": {"shadow": [torch.arange(3.0), torch.ones(2, 2)], "updates": 4},
             "alarm": {"steps": [1, 2], "trained": [0.5, float("nan")], "heldout": {"r": [1.0, 2.0]}},
             "balancer": {"alpha": None, "refreshes": 0}, "note": {"mode": "x", "flag": True, "pair": (1, 2)}}
    save_trainer_state(state, tmp_path)
    back = load_trainer_state(tmp_path)
    assert torch.equal(back["ema"]["shadow"][1], torch.ones(2, 2)) and back["ema"]["updates"] == 4
    assert back["alarm"]["heldout"] == {"r": [1.0, 2.0]} and back["alarm"]["trained"][1] != back["alarm"]["trained"][1]
    assert back["balancer"] == {"alpha": None, "refreshes": 0} and back["note"]["pair"] == [1, 2]
    assert not list(tmp_path.glob("*.pkl")) and not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(TypeError, match=r"trainer state bad\.x: object is not"):
        save_trainer_state({"bad": {"x": object()}}, tmp_path)


@pytest.mark.parametrize("planted", ["custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin"])
def test_a_planted_pickle_never_runs_on_resume(tiny_run, tmp_path, planted):
    cls = trainer_class("diffusion_nft")
    cls(tiny_run(*RUN, trainer="diffusion_nft", out=tmp_path / "run")).train(stop_after=1)
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-1"
    marker = tmp_path / "pwned"
    torch.save(_Planted(marker), checkpoint / planted)
    write_manifest(checkpoint, 1)  # the attacker recomputes the hashes
    with contextlib.suppress(Exception):  # refusing the file is fine; running it is not
        cls(tiny_run(*RUN, trainer="diffusion_nft", out=tmp_path / "run")).train()
    assert not marker.exists()


def test_a_checkpoint_of_pickles_is_refused_by_name(tiny_run, tmp_path):
    cls = trainer_class("diffusion_nft")
    cls(tiny_run(*RUN, trainer="diffusion_nft", out=tmp_path / "run")).train(stop_after=1)
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-1"
    for name in ("trainer_state.json", "trainer_state.safetensors"):  # as an older visalign wrote it
        (checkpoint / name).unlink()
    torch.save({"step": 1}, checkpoint / "custom_checkpoint_0.pkl")
    write_manifest(checkpoint, 1)
    with pytest.raises(ValueError, match=r"checkpoint-1 cannot be resumed: .*custom_checkpoint_0\.pkl.*not unpickle"):
        cls(tiny_run(*RUN, trainer="diffusion_nft", out=tmp_path / "run")).train()


@pytest.mark.parametrize("text", ["", '{"step": 1, "files": {"a"', '{"step": 1}', "[1, 2]"])
def test_a_damaged_manifest_names_the_checkpoint(tmp_path, text):
    checkpoint = tmp_path / "checkpoint-7"
    checkpoint.mkdir()
    (checkpoint / "w.safetensors").write_bytes(b"x")
    write_manifest(checkpoint, 7)
    assert verify_checkpoint(checkpoint) == 7 and json.loads((checkpoint / MANIFEST).read_text())["step"] == 7
    (checkpoint / MANIFEST).write_text(text)
    with pytest.raises(ValueError, match=r"checkpoint .*checkpoint-7: manifest\.json is damaged"):
        verify_checkpoint(checkpoint)
