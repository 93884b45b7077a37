"""Sharded data parallelism through accelerate (FSDP2; DeepSpeed ZeRO), and what the trainer needs to treat a
shard like a tensor: checkpoints of each process's shard as data, gradients read shard by shard.

accelerate chooses FSDP or DeepSpeed only for accelerator devices: `accelerate launch` with an FSDP or DeepSpeed
config on CPU processes silently falls back to DDP. torch's `fully_shard` (FSDP2) and DeepSpeed's CPU accelerator
both run over gloo, so `make_accelerator` switches the state to the requested engine there: the same code path as
on GPUs, rehearsed on a laptop (and in the `distributed` tests).
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch import Tensor
from torch.distributed.tensor import DTensor


def requested_engine() -> str | None:
    """The sharding engine `accelerate launch` was asked for ("fsdp", "deepspeed"), from the environment it sets."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "deepspeed"
    return None


def make_accelerator(**kwargs) -> Accelerator:
    """`Accelerator(**kwargs)`, on CPU processes switched to the FSDP or DeepSpeed engine the launch asked for."""
    engine = requested_engine()
    if engine == "deepspeed" and kwargs.get("cpu"):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported: its CPU accelerator, gloo
    acc = Accelerator(**kwargs)
    if acc.distributed_type is not DistributedType.MULTI_CPU:
        return acc
    state = acc.state
    if engine == "deepspeed":
        from accelerate.utils import DeepSpeedPlugin

        plugin = DeepSpeedPlugin()  # read from the ACCELERATE_DEEPSPEED_* variables the launcher set
        plugin.set_mixed_precision(state.mixed_precision)
        plugin.select(_from_accelerator_state=True)
        state.deepspeed_plugins = plugin
        state.distributed_type = PartialState().distributed_type = DistributedType.DEEPSPEED
        state._mixed_precision = "no"  # DeepSpeed casts the model itself, as accelerate arranges on GPUs
    elif engine == "fsdp":
        plugin = FullyShardedDataParallelPlugin()  # read from the FSDP_* variables the launcher set
        if plugin.fsdp_version != 2:
            raise ValueError("FSDP on CPU processes needs fsdp_version: 2 in the accelerate config (FSDP1 has no "
                             "gloo path); FSDP2 is also the one visalign tests")
        if state.mixed_precision != "no":
            plugin.set_mixed_precision(state.mixed_precision)
        state.fsdp_plugin = plugin
        # Both singletons, as accelerate's own set-up does: AcceleratorState() copies PartialState's type back.
        state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
    return acc


def is_sharded(acc: Accelerator) -> bool:
    return acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def fit_wrapping(acc: Accelerator, module: torch.nn.Module) -> None:
    """Under FSDP with transformer-block wrapping, keep the configured block classes this model has: one
    accelerate config lists every supported model's blocks, and accelerate refuses a name the model lacks."""
    plugin = getattr(acc.state, "fsdp_plugin", None)
    if acc.distributed_type is not DistributedType.FSDP or plugin is None:
        return
    names = plugin.transformer_cls_names_to_wrap
    if not names:
        return
    present = {type(m).__name__ for m in module.modules()}
    keep = [n for n in names if n in present]
    if not keep:
        blocks = sorted(n for n in present if n.endswith("Block") or "TransformerBlock" in n)
        raise ValueError(f"fsdp_transformer_layer_cls_to_wrap lists {', '.join(names)}, none of which this "
                         f"{type(module).__name__} has; add one of its block classes ({', '.join(blocks) or 'none'}) "
                         "to the accelerate config")
    plugin.transformer_cls_names_to_wrap = keep


def deepspeed_config(acc: Accelerator) -> dict | None:
    """The DeepSpeed config the engine will start with, or None when it is not DeepSpeed."""
    if acc.distributed_type is not DistributedType.DEEPSPEED:
        return None
    return acc.state.deepspeed_plugin.deepspeed_config


def check_deepspeed(acc: Accelerator, *, train_batch_size: int, max_grad_norm: float, balance_params: bool) -> None:
    """Refuse what cannot be right under DeepSpeed, before any model loads, and fill the config values visalign
    owns. The trainer drives accumulation itself (the engine's boundary flag at each optimizer step's last
    micro-batch), so the engine's own accumulation count is 1 and clipping is `train.max_grad_norm`."""
    ds = deepspeed_config(acc)
    if ds is None:
        return
    stage = int(ds.get("zero_optimization", {}).get("stage", 0))
    if stage > 2:
        raise ValueError(f"DeepSpeed ZeRO-{stage} partitions the parameters themselves; visalign's rollouts, LoRA "
                         "switches and checkpoints read whole parameters. Use zero_stage: 2 "
                         "(configs/accelerate/deepspeed_zero2.yaml), or FSDP (configs/accelerate/fsdp.yaml) to "
                         "shard the parameters")
    if balance_params:
        raise ValueError("train.balance with gram=params writes per-reward gradients into .grad, which DeepSpeed "
                         "never reads (it reduces gradients into its own partitions during backward): use "
                         "train.balance.gram=output, or FSDP / DDP")
    ds["train_micro_batch_size_per_gpu"] = train_batch_size
    ds["gradient_accumulation_steps"] = 1
    ds["train_batch_size"] = train_batch_size * acc.num_processes
    ds["gradient_clipping"] = max_grad_norm


def local(t: Tensor) -> Tensor:
    """This process's shard of a sharded (FSDP2 DTensor) tensor; any other tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def like(shard: Tensor, ref: Tensor) -> Tensor:
    """`shard` (a process's part, as `local` gives it) as the same kind of tensor as `ref`: a DTensor laid out
    like `ref` when that is one (what optimizer state must be for a sharded parameter)."""
    if not isinstance(ref, DTensor) or isinstance(shard, DTensor) or shard.shape != ref.to_local().shape:
        return shard
    return DTensor.from_local(shard.to(ref.device), ref.device_mesh, ref.placements, shape=ref.shape,
                              stride=ref.stride())


def full(t: Tensor) -> Tensor:
    """The whole tensor of a shard (a collective under FSDP2: every process calls it); any other tensor itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_sum(x: Tensor, acc: Accelerator | None) -> Tensor:
    """Sum over processes of per-process partial results (dot products of gradient shards)."""
    if acc is None or acc.num_processes == 1:
        return x
    return acc.reduce(x.to(acc.device), reduction="sum").to(x.device)


@contextmanager
def unsharded(module: torch.nn.Module, acc: Accelerator):
    """On the main process, a whole CPU copy of a sharded diffusers model (its LoRA adapters included) holding the
    gathered weights; elsewhere None. Every process must enter it (the gather is a collective). Exports (LoRA
    files, full weights) then run on a plain module in their usual format."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    twin = None
    if acc.is_main_process:
        twin = type(module).from_config(module.config)
        for name, config in (getattr(module, "peft_config", None) or {}).items():
            twin.add_adapter(config, adapter_name=name)
        twin.load_state_dict(state, assign=True)  # the gathered tensors themselves, in their dtypes
    try:
        yield twin
    finally:
        acc.wait_for_everyone()
