"""FSDP2 and DeepSpeed ZeRO-2 through accelerate on two CPU processes (gloo): the trained weights equal a
single-process run's with the same global batch and seeds, DeepSpeed steps once per accumulated optimizer step,
sharded checkpoints are data and resume bit-identically, and multi-reward balancing assembles its Gram matrix from
every shard.

One prompt group of 8 is split over the processes, so each encodes the same prompt batch and the rollouts are
bit-identical to the single process's (with two prompts, one process encodes both at once and two each
alone: last-bit differences that group-normalised advantages then amplify ~300x on this tiny model's near-equal
rewards). What remains are fp32 sums in another order (per-process gradients, then reduce-scatter), and Adam's
g / sqrt(v) turns a last-bit difference of a near-zero gradient into a visible one, so parameters are compared
relative to the update: |θ_2 - θ_1| <= 1e-4 |θ_1 - θ_0|."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.shard_train import train_and_record

ROOT = Path(__file__).resolve().parents[2]
TOY = "tests.helpers.toy_rewards"
REL_TOL = 1e-4  # measured 4e-6 to 1.7e-5 (FSDP, ZeRO-2; LoRA and full)

pytestmark = pytest.mark.distributed

COMMON = ["model.name=tiny-sd3", "train.max_steps=2", "train.prompts_per_step=1", "train.group_size=8",
          "sampling.batch_size=4", "sampling.steps=3", "run.eval_every=0", "run.log_with=none", "run.progress=false",
          "run.checkpoint_every=1", f"rewards={{{TOY}.MeanBrightness: 1.0}}"]
# DiffusionNFT's noise levels and noise are per process unless shared per prompt group (train.group_noise):
# with them shared the draws are functions of (seed, step, group), the same whatever the number of processes.
RECIPES = {
    "flow_grpo": ["trainer=flow_grpo"],
    "diffusion_nft": ["trainer=diffusion_nft", "train.timesteps_per_sample=2", "train.group_noise=true"],
}
MODES = {"lora": ["model.finetune=lora", "model.lora_rank=4"], "full": ["model.finetune=full"]}


def launch_command(out: Path, overrides: list[str], stop_after: int = 0, config: str = "cpu_fsdp.yaml",
                   launch_args: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "configs/accelerate" / config), *launch_args, str(ROOT / "tests/helpers/shard_train.py"),
            str(out), str(stop_after), *overrides]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def launch(out: Path, overrides: list[str], stop_after: int = 0, config: str = "cpu_fsdp.yaml") -> None:
    proc = subprocess.run(launch_command(out, overrides, stop_after, config), cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]


def run_info(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


def relative_difference(a: dict, b: dict, start: dict) -> float:
    diff = torch.cat([(a[k] - b[k]).flatten() for k in a]).norm()
    update = torch.cat([(a[k] - start[k]).flatten() for k in a]).norm()
    assert update > 0, "training changed nothing: the comparison would be empty"
    return float(diff / update)


ENGINES = {"FSDP": "cpu_fsdp.yaml", "DEEPSPEED": "cpu_deepspeed_zero2.yaml"}


def check_matches_one_process(tmp_path, engine: str, recipe: str, mode: str, resume: bool) -> None:
    # One optimizer step per rollout accumulates two micro-batches (x timesteps) on each process. (With several
    # steps per rollout each process splits its own share, so a step holds other samples than one process's.)
    overrides = [*COMMON, *RECIPES[recipe], *MODES[mode]]
    one, two = tmp_path / "one", tmp_path / "two"
    train_and_record(str(one), 0, [*overrides, "train.train_batch_size=4"])
    launch(two, [*overrides, "train.train_batch_size=2"], config=ENGINES[engine])  # the same global batch
    info = run_info(two)
    assert (info["alpha"], info["processes"], info["engine"], info["machines"]) == (None, 2, engine, [0, 0])
    if engine == "DEEPSPEED":  # one engine step per optimizer step, not one per micro-batch
        assert info["engine_steps"] == 2
    a, b = load_file(str(one / "params.safetensors")), load_file(str(two / "params.safetensors"))
    assert set(a) == set(b)
    assert torch.equal(load_file(str(one / "start.safetensors"))[next(iter(a))],
                       load_file(str(two / "start.safetensors"))[next(iter(a))])
    assert relative_difference(a, b, load_file(str(one / "start.safetensors"))) <= REL_TOL

    # Each process wrote its own shard, as data: nothing a resume could unpickle.
    ckpt = two / "checkpoints" / "checkpoint-1"
    names = {p.name for p in ckpt.iterdir()}
    assert {f"weights.rank{r}.safetensors" for r in (0, 1)} <= names
    assert {f"trainer_state.rank{r}.json" for r in (0, 1)} <= names
    assert all(n.endswith((".safetensors", ".json")) for n in names), names
    final = two / "final"
    if mode == "lora":  # the exported adapter holds the whole (gathered) LoRA weights
        exported = load_file(str(final / "pytorch_lora_weights.safetensors"))
        assert len(exported) == len(b)
        assert sorted(v.numel() for v in exported.values()) == sorted(v.numel() for v in b.values())
    else:
        assert any(final.rglob("*.safetensors"))

    if engine == "FSDP" and mode == "lora":  # shards fit only the sharding they were written with
        from visalign.trainers import load_train_config, trainer_class

        cfg = load_train_config(None, [f"run.out_dir={tmp_path / 'unsharded'}", *overrides])
        with pytest.raises(ValueError, match=r"trainer_state.rank0.json.*another sharding or number of processes"):
            trainer_class(cfg.trainer)(cfg).load_checkpoint(ckpt)

    if resume:  # from checkpoint-1 in a fresh out_dir: the same weights, bit for bit, as the uninterrupted run
        again = tmp_path / "resumed"
        (again / "checkpoints").mkdir(parents=True)
        shutil.copytree(ckpt, again / "checkpoints" / "checkpoint-1")
        launch(again, [*overrides, "train.train_batch_size=2", "run.resume_from=latest"], config=ENGINES[engine])
        c = load_file(str(again / "params.safetensors"))
        assert all(torch.equal(b[k], c[k]) for k in b)


DEFAULT = [("FSDP", "flow_grpo", "lora"), ("DEEPSPEED", "diffusion_nft", "full")]
OTHERS = [(e, r, m) for e in ENGINES for r in RECIPES for m in MODES if (e, r, m) not in DEFAULT]


@pytest.mark.parametrize(("engine", "recipe", "mode"), DEFAULT)
def test_sharded_training_matches_one_process(tmp_path, engine, recipe, mode):
    # The default run resumes under FSDP; the slow cases below resume under both engines.
    check_matches_one_process(tmp_path, engine, recipe, mode, resume=engine == "FSDP")


@pytest.mark.slow  # the rest of the engine x recipe x fine-tuning matrix: pytest -m distributed
@pytest.mark.parametrize(("engine", "recipe", "mode"), OTHERS)
def test_sharded_training_matches_one_process_other_cases(tmp_path, engine, recipe, mode):
    check_matches_one_process(tmp_path, engine, recipe, mode, resume=True)


def test_balancing_under_fsdp_sees_the_whole_gradients(tmp_path):
    # MGDA's coefficients come from the Gram matrix of the per-reward gradients; under FSDP each process holds a
    # shard of them, and the Gram matrix is the sum of the shards' partial dot products.
    overrides = [*COMMON, "train.max_steps=1", "model.lora_rank=4", "train.balance.method=mgda",
                 f"rewards={{{TOY}.MeanBrightness: 1.0, {TOY}.RedChannel: 0.5}}"]
    train_and_record(str(tmp_path / "one"), 0, [*overrides, "train.train_batch_size=2"])
    launch(tmp_path / "fsdp", [*overrides, "train.train_batch_size=2"])
    one, two = run_info(tmp_path / "one"), run_info(tmp_path / "fsdp")
    assert two["engine"] == "FSDP" and one["processes"] == 1
    assert one["alpha"] is not None and max(one["alpha"]) > 0
    assert torch.allclose(torch.tensor(two["alpha"]), torch.tensor(one["alpha"]), atol=1e-5, rtol=0)


class _StubAccelerator:
    """What check_deepspeed reads of an accelerator set up for DeepSpeed."""

    def __init__(self, stage: int):
        from accelerate.utils import DistributedType

        self.distributed_type = DistributedType.DEEPSPEED
        self.num_processes = 2
        config = {"zero_optimization": {"stage": stage}, "gradient_accumulation_steps": 4, "gradient_clipping": 9.0,
                  "train_micro_batch_size_per_gpu": "auto"}
        self.state = type("State", (), {"deepspeed_plugin": type("Plugin", (), {"deepspeed_config": config})()})()


def test_deepspeed_combinations_that_cannot_be_right_are_refused_before_the_model_loads():
    from visalign.trainers.sharding import check_deepspeed

    with pytest.raises(ValueError, match="ZeRO-3 partitions the parameters"):
        check_deepspeed(_StubAccelerator(3), train_batch_size=2, max_grad_norm=1.0, balance_params=False)
    with pytest.raises(ValueError, match="gram=output"):
        check_deepspeed(_StubAccelerator(2), train_batch_size=2, max_grad_norm=1.0, balance_params=True)
    acc = _StubAccelerator(2)
    check_deepspeed(acc, train_batch_size=3, max_grad_norm=0.5, balance_params=False)
    config = acc.state.deepspeed_plugin.deepspeed_config  # the trainer owns accumulation and clipping
    assert (config["gradient_accumulation_steps"], config["gradient_clipping"]) == (1, 0.5)
    assert (config["train_micro_batch_size_per_gpu"], config["train_batch_size"]) == (3, 6)


def test_fsdp_wraps_the_listed_block_classes_the_model_has():
    # One accelerate config lists every supported model's blocks; accelerate itself refuses any name a model lacks.
    from accelerate.utils import DistributedType

    from visalign.trainers.sharding import fit_wrapping

    class JointTransformerBlock(torch.nn.Linear):
        pass

    model = torch.nn.Sequential(JointTransformerBlock(2, 2), torch.nn.Linear(2, 2))
    plugin = type("Plugin", (), {})()
    acc = type("Acc", (), {"distributed_type": DistributedType.FSDP,
                           "state": type("State", (), {"fsdp_plugin": plugin})()})()
    plugin.transformer_cls_names_to_wrap = ["FluxTransformerBlock", "JointTransformerBlock", "WanTransformerBlock"]
    fit_wrapping(acc, model)
    assert plugin.transformer_cls_names_to_wrap == ["JointTransformerBlock"]
    plugin.transformer_cls_names_to_wrap = ["FluxTransformerBlock"]
    with pytest.raises(ValueError, match=r"none of which this Sequential has.*JointTransformerBlock"):
        fit_wrapping(acc, model)


@pytest.mark.slow
def test_multi_node_rehearsal_two_machine_ranks_train_like_one_process(tmp_path):
    # configs/accelerate/cpu_multi_node.yaml: two launchers with distinct machine ranks meet over gloo, as the
    # nodes of configs/accelerate/multi_node.yaml do; the run equals a single process's.
    import socket

    with socket.socket() as sock:  # a free port for this rendezvous
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    overrides = [*COMMON, *MODES["lora"], "train.max_steps=1"]
    train_and_record(str(tmp_path / "one"), 0, [*overrides, "train.train_batch_size=4"])
    procs = [subprocess.Popen(launch_command(tmp_path / "two", [*overrides, "train.train_batch_size=2"],
                                             config="cpu_multi_node.yaml",
                                             launch_args=("--machine_rank", str(rank), "--main_process_port", port)),
                              cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors[0][-3000:] + errors[1][-3000:]
    info = run_info(tmp_path / "two")
    assert (info["processes"], info["machines"]) == (2, [0, 1])
    one, two = (load_file(str(tmp_path / d / "params.safetensors")) for d in ("one", "two"))
    assert relative_difference(one, two, load_file(str(tmp_path / "one" / "start.safetensors"))) <= REL_TOL
