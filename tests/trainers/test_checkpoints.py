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


def test_resume_reaches_no_pickle_loader_and_is_bit_identical(tiny_run, tmp_path, monkeypatch):
    import pickle

    cls = trainer_class("diffusion_nft")
    straight = cls(tiny_run(*RUN, trainer="diffusion_nft", out=tmp_path / "a"))
    straight.train()
    cls(tiny_run(*RUN, trainer="diffusion_nft", out=tmp_path / "b")).train(stop_after=1)
    checkpoint = tmp_path / "b" / "checkpoints" / "checkpoint-1"
    assert sorted(p.name for p in checkpoint.iterdir() if p.is_file()) == [
        "manifest.json", "optimizer.json", "optimizer.safetensors", "rng_state_0.json", "rng_state_0.safetensors",
        "trainer_state.json", "trainer_state.safetensors", "weights.safetensors"]

    def refuse(*args, **kwargs):
        raise AssertionError("a pickle loader was called on resume")

    for target, name in [(torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")]:
        monkeypatch.setattr(target, name, refuse)
    resumed = cls(tiny_run(*RUN, trainer="diffusion_nft", out=tmp_path / "b"))
    resumed.train()
    monkeypatch.undo()
    for a, b in zip(straight.params, resumed.params, strict=True):
        assert torch.equal(a, b)


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
    # The next layout had the trainer's state as data but accelerate's optimizer.bin and random_states_0.pkl.
    cls(tiny_run(*RUN, trainer="diffusion_nft", out=tmp_path / "mid")).train(stop_after=1)
    checkpoint = tmp_path / "mid" / "checkpoints" / "checkpoint-1"
    for name in ("optimizer.json", "optimizer.safetensors", "rng_state_0.json", "rng_state_0.safetensors"):
        (checkpoint / name).unlink()
    torch.save({"state": {}}, checkpoint / "optimizer.bin")
    torch.save({"step": 1}, checkpoint / "random_states_0.pkl")
    write_manifest(checkpoint, 1)
    with pytest.raises(ValueError, match=r"cannot be resumed: .*optimizer\.bin.*random_states_0\.pkl.*not unpickle"):
        cls(tiny_run(*RUN, trainer="diffusion_nft", out=tmp_path / "mid")).train()


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


def _steps_logged(run):
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_latest_falls_back_to_the_newest_intact_checkpoint_and_logs_each_step_once(tiny_run, tmp_path, capsys):
    """A crash can leave the newest checkpoint damaged and metrics logged past the last checkpoint: the resumed
    run starts from the newest intact checkpoint, says which it passed over, redoes the lost steps once, and ends
    with the weights of an uninterrupted run."""
    from safetensors.torch import load_file

    cls = trainer_class("diffusion_nft")
    run = (*RUN[1:], "train.max_steps=3")
    cls(tiny_run(*run, trainer="diffusion_nft", out=tmp_path / "a")).train()
    cls(tiny_run(*run, trainer="diffusion_nft", out=tmp_path / "b")).train(stop_after=2)
    damaged = tmp_path / "b" / "checkpoints" / "checkpoint-2" / "weights.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:100])  # truncated by the crash
    with (tmp_path / "b" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 2, "rewards/x/mean": 0.5}\n{"step": 3, "rew')  # logged past it, the last line cut short
    cls(tiny_run(*run, trainer="diffusion_nft", out=tmp_path / "b")).train()
    assert "resumed from checkpoint-1, the newest intact checkpoint; passed over:" in capsys.readouterr().out
    assert _steps_logged(tmp_path / "b") == [0, 1, 2]
    a, b = (load_file(str(tmp_path / r / "checkpoints" / "checkpoint-3" / "weights.safetensors")) for r in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_no_intact_checkpoint_is_an_error_naming_each(tiny_run, tmp_path):
    cls = trainer_class("diffusion_nft")
    cls(tiny_run(*RUN, trainer="diffusion_nft", out=tmp_path / "run")).train(stop_after=1)
    (tmp_path / "run" / "checkpoints" / "checkpoint-1" / MANIFEST).write_text("{")
    with pytest.raises(ValueError, match=r"no checkpoint this run can resume from: .*checkpoint-1: manifest"):
        cls(tiny_run(*RUN, trainer="diffusion_nft", out=tmp_path / "run")).train()


def test_a_partial_directory_is_cleared_before_a_checkpoint_is_written(tiny_run, tmp_path):
    stale = tmp_path / "run" / "checkpoints" / "checkpoint-1" / ".model.safetensors.tmp123"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"left by a crash")
    trainer_class("diffusion_nft")(tiny_run(*RUN, trainer="diffusion_nft", out=tmp_path / "run")).train(stop_after=1)
    assert not stale.exists()
    assert verify_checkpoint(stale.parent) == 1


def test_resuming_with_another_finetune_mode_is_a_clear_error(tiny_run, tmp_path):
    cls = trainer_class("diffusion_nft")
    cls(tiny_run(*RUN, "model.finetune=full", trainer="diffusion_nft", out=tmp_path / "run")).train(stop_after=1)
    with pytest.raises(ValueError, match=r"saved with model\.finetune='full'.*this run has model\.finetune='lora'"):
        cls(tiny_run(*RUN, "model.finetune=lora", "run.resume_from=" + str(tmp_path / "run" / "checkpoints" /
                     "checkpoint-1"), trainer="diffusion_nft", out=tmp_path / "run")).train()


def test_resuming_with_changed_settings_says_which_and_keeps_the_earlier_config(tiny_run, tmp_path, capsys):
    cls = trainer_class("diffusion_nft")
    run = (*RUN[1:], "train.max_steps=2")
    cls(tiny_run(*run, trainer="diffusion_nft", out=tmp_path / "run")).train(stop_after=1)
    earlier = (tmp_path / "run" / "config.yaml").read_text()
    cls(tiny_run(*run, trainer="diffusion_nft", out=tmp_path / "run")).train(stop_after=0)  # same settings: quiet
    assert "had other settings" not in capsys.readouterr().out
    cls(tiny_run(*run, "train.lr=0.002", trainer="diffusion_nft", out=tmp_path / "run")).train()
    out = capsys.readouterr().out
    assert "kept as config.before-step-1.yaml. Changed: train.lr: 0.001 -> 0.002" in out
    assert (tmp_path / "run" / "config.before-step-1.yaml").read_text() == earlier
    assert "lr: 0.002" in (tmp_path / "run" / "config.yaml").read_text()
