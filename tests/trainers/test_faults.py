"""Runtime faults: skipped steps (invalid rewards, non-finite loss), rewards that raise, unwritable out_dir,
a full disk. Each is named, counted, and leaves the last checkpoint intact."""

import errno
import json

import pytest
import torch

from visalign.train import main as train_main
from visalign.trainers.common import RewardFailed, TrainingFault, checkpoint_dirs
from visalign.trainers.flow_grpo import FlowGRPOTrainer


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_invalid_rewards_and_a_nonfinite_loss_skip_their_steps(tiny_run, tmp_path, monkeypatch):
    # Step 1 (second call of the reward): every reward NaN. Step 2: the loss is forced non-finite.
    cfg = tiny_run("train.max_steps=4", "sampling.batch_size=8",  # one reward call per step
                   "rewards={tests.helpers.toy_rewards.NaNOnSecondCall: 1.0}")
    trainer = FlowGRPOTrainer(cfg)
    backward = trainer.accelerator.backward
    monkeypatch.setattr(trainer.accelerator, "backward",
                        lambda loss: backward(loss * float("nan") if trainer.state.step == 2 else loss))
    steps_taken = []
    opt_step = trainer.optimizer.step
    monkeypatch.setattr(trainer.optimizer, "step", lambda: (steps_taken.append(trainer.state.step), opt_step()))
    trainer.train()
    rows = _metrics(tmp_path)
    assert [r["skipped"] for r in rows] == [0, 1, 1, 0]
    assert rows[-1]["skipped_total"] == 2
    assert 1 not in steps_taken and 2 not in steps_taken and 0 in steps_taken and 3 in steps_taken
    assert all(torch.isfinite(p).all() for p in trainer.params)
    assert trainer.state.in_a_row == 0  # a good step resets the run of skips


def test_skips_in_a_row_stop_the_run_with_the_checkpoint_intact(tiny_run, tmp_path, capsys):
    cfg = ["train.max_steps=5", "run.skip_limit=2", "rewards={tests.helpers.toy_rewards.AlwaysNaN: 1.0}"]
    with pytest.raises(TrainingFault, match=r"stopped at step 1: 2 steps in a row skipped.*invalid.*skip_limit=2"):
        FlowGRPOTrainer(tiny_run(*cfg)).train()
    assert checkpoint_dirs(tmp_path)[-1].name == "checkpoint-1"  # the skipped first step was checkpointed as usual
    assert train_main(["configs/flow_grpo_world.yaml", *TINY_CLI, f"run.out_dir={tmp_path / 'cli'}", *cfg]) == 1
    assert "visalign train: stopped at step 1" in capsys.readouterr().err


def test_a_trained_reward_that_raises_is_named_with_its_batch(tiny_run, tmp_path):
    cfg = tiny_run("rewards={tests.helpers.toy_rewards.Broken: 1.0}")
    with pytest.raises(RewardFailed, match=r"step 0: reward 'tests.helpers.toy_rewards.Broken' raised KeyError: "
                                           r"'model_head' \(on a batch of 4 samples; prompts '") as err:
        FlowGRPOTrainer(cfg).train()
    assert isinstance(err.value.__cause__, KeyError)


def test_a_heldout_reward_that_raises_is_disabled_and_stays_off_on_resume(tiny_run, tmp_path, capsys):
    cfg = ["rewards={tests.helpers.toy_rewards.MeanBrightness: 1.0}",
           "eval_rewards=[tests.helpers.toy_rewards.Broken, tests.helpers.toy_rewards.Darkness]",
           "run.eval_every=1", "run.eval_num_prompts=2", "run.eval_steps=2"]
    trainer = FlowGRPOTrainer(tiny_run(*cfg))
    trainer.train()
    assert "step 0: held-out reward 'tests.helpers.toy_rewards.Broken' raised KeyError" in capsys.readouterr().out
    assert trainer.state.disabled == ["tests.helpers.toy_rewards.Broken"]
    rows = _metrics(tmp_path)
    assert all("eval/tests.helpers.toy_rewards.Darkness/mean" in r for r in rows)
    assert not any(k.startswith("heldout/tests.helpers.toy_rewards.Broken") for r in rows for k in r)
    resumed = FlowGRPOTrainer(tiny_run(*cfg, "train.max_steps=3"))
    resumed.train()
    assert list(resumed.eval_rewards) == ["tests.helpers.toy_rewards.Darkness"]
    assert "Broken" not in capsys.readouterr().out  # not tried again


def test_an_unwritable_out_dir_fails_before_the_model_loads(tiny_run, tmp_path, monkeypatch):
    import visalign.trainers.engine as engine

    monkeypatch.setattr(engine, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match=r"run.out_dir='.*file/run' is not writable"):
        FlowGRPOTrainer(tiny_run(out=blocker / "run"))


def test_a_full_disk_is_named_and_the_previous_checkpoint_stays(tiny_run, tmp_path, monkeypatch):
    trainer = FlowGRPOTrainer(tiny_run("train.max_steps=3"))
    trainer.train(stop_after=1)
    import visalign.trainers.engine as engine

    save = engine.save_file

    def full(tensors, path):
        save(tensors, path)  # some files written, then the device fills up
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 3245248 vs 3245136")

    monkeypatch.setattr(engine, "save_file", full)
    with pytest.raises(TrainingFault, match=r"no space left on the device writing .*checkpoint-2.*the previous one "
                                            r"\(.*checkpoint-1\) is intact"):
        trainer.train(stop_after=1)
    assert [d.name for d in checkpoint_dirs(tmp_path)] == ["checkpoint-1"]
    assert not (tmp_path / "checkpoints" / "checkpoint-2").exists()
    monkeypatch.setattr(engine, "save_file",
                        lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(TrainingFault, match="no space left"):
        trainer.save_checkpoint(9)
    monkeypatch.setattr(engine, "save_file",
                        lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EACCES, "Permission denied")))
    with pytest.raises(PermissionError):  # other faults are not disguised as a full disk
        trainer.save_checkpoint(9)


TINY_CLI = ["model.name=tiny-sd3", "train.prompts_per_step=2", "train.group_size=4", "train.train_batch_size=3",
            "sampling.batch_size=4", "sampling.steps=4", "run.eval_every=0", "run.log_with=none",
            "run.progress=false", "run.checkpoint_every=1", "model.finetune=lora"]
