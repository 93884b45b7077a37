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
