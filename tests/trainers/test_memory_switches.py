"""Memory switches: rollout decoding in chunks (sampling.decode_batch) and a half-precision frozen reference copy
for full fine-tuning (model.reference_dtype)."""

import pytest
import torch

from visalign.config import ConfigError
from visalign.trainers import load_train_config, trainer_class

TOY = "tests.helpers.toy_rewards"
TINY = ["model.name=tiny-sd3", "train.max_steps=1", "train.prompts_per_step=2", "train.group_size=2",
        "sampling.batch_size=4", "sampling.steps=3", "run.eval_every=0", "run.log_with=none", "run.progress=false",
        f"rewards={{{TOY}.MeanBrightness: 1.0}}"]


def trainer(tmp_path, *overrides):
    cfg = load_train_config(None, [f"run.out_dir={tmp_path}", *TINY, *overrides])
    return trainer_class(cfg.trainer)(cfg)


def test_chunked_decoding_gives_the_same_images_a_few_at_a_time(tmp_path, monkeypatch):
    whole = trainer(tmp_path / "whole").rollout_step(0).ro.images
    t = trainer(tmp_path / "chunks", "sampling.decode_batch=1")
    sizes = []
    decode = t.adapter.decode
    monkeypatch.setattr(t.adapter, "decode", lambda z: sizes.append(len(z)) or decode(z))
    chunked = t.rollout_step(0).ro.images
    assert sizes == [1, 1, 1, 1]  # one sampling batch of 4, decoded one by one
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=0)


def test_a_bfloat16_reference_copy_is_half_the_memory_and_trains(tmp_path):
    t = trainer(tmp_path, "model.finetune=full", "train.kl_beta=0.04", "model.reference_dtype=bfloat16")
    ref = list(t.ref_denoiser.parameters())
    assert {p.dtype for p in ref} == {torch.bfloat16}
    assert {p.dtype for p in t.params} == {torch.float32}  # the trained weights stay fp32
    before = [p.detach().clone() for p in t.params]
    metrics = t.step(0)
    # at step 0 the copy is the live weights rounded to bf16: a small, finite KL
    assert 0 < metrics["train/kl"] < 1e-2
    assert any(not torch.equal(a, p) for a, p in zip(before, t.params, strict=True))
    assert all(not p.requires_grad for p in ref)


def test_reference_dtype_is_refused_with_lora():
    with pytest.raises(ConfigError, match="reference_dtype='bfloat16'.*finetune='lora'"):
        load_train_config(None, [*TINY, "model.reference_dtype=bfloat16"])


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-wan"])
def test_freed_text_encoders_give_the_embeddings_they_gave_before(name):
    from visalign.models import load_model

    adapter = load_model(name)
    prompts = ["a cat", "two dogs on a red sofa", "a cat"]
    before = adapter.encode_prompts(prompts, cfg=True)
    adapter.free_text_encoders(["two dogs on a red sofa", "a cat", "a fox"], cfg=True, batch_size=2)
    assert adapter.text_encoders() == {} and adapter.pipe.text_encoder is None
    after = adapter.encode_prompts(prompts, cfg=True)
    for k in before.cond:  # encoded in other batches: equal up to float rounding
        torch.testing.assert_close(after.cond[k], before.cond[k], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(after.uncond[k], before.uncond[k], atol=1e-5, rtol=1e-5)
    assert after.prompts == prompts and adapter.encode_prompts(["a fox"], cfg=False).uncond is None
    with pytest.raises(ValueError, match=r"freed after encoding the run's prompts .*not among them: \['a bird'\]"):
        adapter.encode_prompts(["a cat", "a bird"])
    with pytest.raises(ValueError, match="only the prompts encoded before, with the empty negative prompt"):
        adapter.encode_prompts(["a cat"], negative_prompts=["blurry"])


def test_a_run_with_freed_text_encoders_trains_as_one_with_them(tmp_path):
    """The world model, a prompt file: same rollouts and update as a run that keeps its text encoder; the final
    export still holds the (unchanged) text encoder; a generated prompt source is refused before any model loads."""
    from safetensors.torch import load_file

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\ntwo blue squares\na green triangle above a yellow circle\n")
    world = ["model.name=world", "model.finetune=full", "train.max_steps=1", "train.prompts_per_step=2",
             "train.group_size=2", "sampling.batch_size=4", "sampling.steps=3", "run.eval_every=0",
             "run.log_with=none", "run.progress=false", f"rewards={{{TOY}.MeanBrightness: 1.0}}",
             f"train.prompts={prompts}"]
    runs = {}
    for arm in ("kept", "freed"):
        cfg = load_train_config(None, [f"run.out_dir={tmp_path / arm}", *world,
                                       f"model.free_text_encoders={arm == 'freed'}"])
        t = trainer_class(cfg.trainer)(cfg)
        t.step(0)
        runs[arm] = (t, [p.detach().clone() for p in t.params], t.save_final())
    kept, freed = runs["kept"], runs["freed"]
    assert freed[0].adapter.text_encoder is None and kept[0].adapter.text_encoder is not None
    for a, b in zip(kept[1], freed[1], strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0)
    exported = load_file(freed[2] / "model.safetensors")
    shipped = {k: v for k, v in load_file(kept[2] / "model.safetensors").items() if k.startswith("text_encoder.")}
    assert shipped and all(torch.equal(exported[k], v) for k, v in shipped.items())
    with pytest.raises(ValueError, match=r"train.prompts='world:seen' is a generated source with no end: give a "
                                         r"prompt file"):
        cfg = load_train_config(None, [f"run.out_dir={tmp_path / 'gen'}", *world[:-1], "train.prompts=world:seen",
                                       "model.free_text_encoders=true"])
        trainer_class(cfg.trainer)(cfg)


@pytest.mark.parametrize("recipe, extra", [("flow_grpo", ["train.kl_beta=0.04", "train.ema.decay=0.9"]),
                                           ("diffusion_nft", ["train.timesteps_per_sample=2"])])
def test_offloaded_copies_train_exactly_as_resident_ones(tmp_path, recipe, extra):
    """model.offload_copies: the frozen reference (flow_grpo's KL), the old policy (NFT) and the EMA live in CPU
    memory and are moved for each use. On this CPU-only machine the moves are between equal devices, so this
    checks the bookkeeping: the frozen copy runs its passes on the trainer's device and keeps its own CPU tensors
    between them, every parameter copy is CPU-resident, and two steps give bit-identical weights to the
    resident run."""
    runs, passes = {}, []
    for arm in ("resident", "offloaded"):
        t = trainer(tmp_path / arm, f"trainer={recipe}", "model.finetune=full", "train.max_steps=2", *extra,
                    f"model.offload_copies={arm == 'offloaded'}")
        ref = t.ref_denoiser
        if arm == "offloaded" and ref is not None:
            kept = [p.data_ptr() for p in ref.parameters()]
            ref.register_forward_pre_hook(lambda m, _: passes.append(
                {p.device for p in m.parameters()} == {torch.device("cpu")}))  # the trainer's device here
        for step in range(2):
            t.step(step)
        runs[arm] = t
    for a, b in zip(runs["resident"].params, runs["offloaded"].params, strict=True):
        assert torch.equal(a, b)
    copies = [s for s in runs["offloaded"].checkpointed.values() if hasattr(s, "shadow")]
    assert copies and all(x.device.type == "cpu" for c in copies for x in c.shadow)
    if recipe == "flow_grpo":
        assert passes and all(passes)
        assert [p.data_ptr() for p in runs["offloaded"].ref_denoiser.parameters()] == kept


def test_offloaded_copies_are_refused_under_sharding_before_the_model_loads(tmp_path, monkeypatch):
    import visalign.trainers.engine as engine

    monkeypatch.setattr(engine, "is_sharded", lambda acc: True)
    monkeypatch.setattr(engine, "check_deepspeed", lambda *a, **k: None)
    monkeypatch.setattr(engine, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(ValueError, match="model.offload_copies .* under FSDP / DeepSpeed they are shards"):
        trainer(tmp_path, "model.finetune=full", "train.kl_beta=0.04", "model.offload_copies=true")
