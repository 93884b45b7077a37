"""The Z-Image adapter is faithful to ZImagePipeline (sampling, guidance options, log-probs, LoRA, loading) and
trains and samples through the toolkit's entry points."""

import math

import pytest
import torch

from visalign.models import load_model, request_rules
from visalign.models.base import Conditioning, RequestRules
from visalign.models.z_image import ZImageAdapter, tiny_z_image_pipeline
from visalign.sampling import sample

PROMPTS = ["a red circle", "two blue squares on the left of a big green triangle"]  # 31 and 54 tokens
REQ = {"height": 16, "width": 16}
SEQ = 64  # the tiny adapter's max_sequence_length


def _adapter(**options) -> ZImageAdapter:
    pipe = tiny_z_image_pipeline(0)
    pipe.set_progress_bar_config(disable=True)
    return ZImageAdapter(pipe, max_sequence_length=SEQ, **options)


@pytest.mark.parametrize("pipeline_guidance, options", [
    (0.0, {}),  # Turbo: no CFG
    (3.0, {}),
    (3.0, {"cfg_normalization": 1.0, "cfg_truncation": 0.3}),  # renorm on, guidance off for the last step
])
def test_ode_sampler_reproduces_pipeline(pipeline_guidance, options):
    adapter = _adapter(**options)
    seeds, steps = [11, 12], 3

    def run(output_type):  # the pipeline rewrites the prompt list it is given: a copy each call
        return adapter.pipe(prompt=list(PROMPTS), num_inference_steps=steps, guidance_scale=pipeline_guidance,
                            output_type=output_type, generator=[torch.Generator().manual_seed(s) for s in seeds],
                            max_sequence_length=SEQ, **options, **REQ)[0]

    ref, ref_latents = run("pt"), run("latent")
    scale = pipeline_guidance + 1  # our scale: 1 = no guidance
    cond = adapter.encode_prompts(PROMPTS, cfg=scale > 1)
    assert cond.cond["prompt_mask"].sum(1).tolist() == [31, 54]  # two lengths, padded to one fixed shape
    traj = sample(adapter, cond, num_steps=steps, guidance_scale=scale, seeds=seeds, **REQ)
    assert traj.final.shape == ref_latents.shape == (2, 4, 8, 8)
    assert (traj.final - ref_latents).abs().max() <= 1e-4
    assert (adapter.decode(traj.final) - ref).abs().max() <= 1e-4
    assert (traj.final - traj.latents[:, 0]).abs().mean() > 1e-2  # moved away from its noise
    if options:  # the options changed the result: the comparison exercised them
        plain = sample(_adapter(), cond, num_steps=steps, guidance_scale=scale, seeds=seeds, **REQ)
        assert (plain.final - traj.final).abs().max() > 1e-3


def test_schedule_is_the_pipelines():
    """linspace(1, 1/N, N) through the scheduler: the static shift of the tiny (and released) configs, and the
    dynamic shift with the pipeline's mu when a scheduler config asks for it."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    adapter = _adapter()
    s = torch.tensor([1.0, 2 / 3, 1 / 3])
    torch.testing.assert_close(adapter.sigmas(3, (4, 8, 8)), torch.cat([3 * s / (1 + 2 * s), torch.zeros(1)]))
    adapter.pipe.scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    # 64x64 latents: 1024 patches, mu = 0.5 + 0.65 (1024 - 256) / 3840 = 0.63; sigma = e^mu / (e^mu + 1/s - 1)
    shifted = math.exp(0.63) / (math.exp(0.63) + 1 / s - 1)
    torch.testing.assert_close(adapter.sigmas(3, (4, 64, 64)), torch.cat([shifted, torch.zeros(1)]))


def test_cfg_normalization_caps_each_sample_at_its_conditional_norm():
    plain, capped = _adapter(), _adapter(cfg_normalization=1.0)
    cond = plain.encode_prompts(PROMPTS)
    x = torch.randn(2, *plain.latent_shape(16, 16), generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.8, 0.4])
    with torch.no_grad():
        v_c = plain.predict_velocity(x, sigma, cond, 1.0)
        v_g = plain.predict_velocity(x, sigma, cond, 6.0)
        v = capped.predict_velocity(x, sigma, cond, 6.0)
    ratio = (v_c.flatten(1).norm(dim=1) / v_g.flatten(1).norm(dim=1)).clamp(max=1.0)
    assert (ratio < 1).all()  # the cap binds, so the check is not vacuous
    torch.testing.assert_close(v, v_g * ratio.view(-1, 1, 1, 1), rtol=1e-5, atol=1e-6)


def test_cfg_truncation_is_decided_per_sample():
    plain, truncated = _adapter(), _adapter(cfg_truncation=0.5)
    cond = plain.encode_prompts(PROMPTS)
    x = torch.randn(2, *plain.latent_shape(16, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # normalised times 0.1 (guided) and 0.8 (> 0.5: unguided)
        v = truncated.predict_velocity(x, torch.tensor([0.9, 0.2]), cond, 4.0)
        guided = plain.predict_velocity(x[:1], 0.9, cond.index([0]), 4.0)
        unguided = plain.predict_velocity(x[1:], 0.2, cond.index([1]), 1.0)
    torch.testing.assert_close(v, torch.cat([guided, unguided]), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(unguided, plain.predict_velocity(x[1:], 0.2, cond.index([1]), 4.0))


def test_padding_and_separate_encoding_do_not_change_the_velocity():
    adapter = _adapter()
    longer = ZImageAdapter(adapter.pipe, max_sequence_length=2 * SEQ)
    x = torch.randn(2, *adapter.latent_shape(16, 16), generator=torch.Generator().manual_seed(2))
    together = adapter.encode_prompts(PROMPTS)
    apart = Conditioning.cat([adapter.encode_prompts([p]) for p in PROMPTS])
    with torch.no_grad():
        v = adapter.predict_velocity(x, 0.6, together, 3.0)
        torch.testing.assert_close(adapter.predict_velocity(x, 0.6, apart, 3.0), v, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(longer.predict_velocity(x, 0.6, longer.encode_prompts(PROMPTS), 3.0), v,
                                   rtol=1e-5, atol=1e-6)


def test_lora_step_save_and_the_pipelines_own_loader(tmp_path):
    adapter = _adapter()
    before = {n: p.detach().clone() for n, p in adapter.denoiser.named_parameters()}
    adapter.add_lora(rank=4, alpha=8)
    targets = {n.split(".lora_A")[0] for n, _ in adapter.denoiser.named_parameters() if ".lora_A." in n}
    assert targets == {f"{blocks}.0.attention.{m}" for blocks in ("layers", "noise_refiner", "context_refiner")
                       for m in ("to_q", "to_k", "to_v", "to_out.0")}
    trainable = {n for n, p in adapter.denoiser.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    cond = adapter.encode_prompts(PROMPTS, cfg=False)
    x = torch.randn(2, *adapter.latent_shape(16, 16), generator=torch.Generator().manual_seed(3))
    sigma = torch.tensor([0.3, 0.8])
    opt = torch.optim.SGD(adapter.trainable_parameters(), lr=1e-2)
    adapter.predict_velocity(x, sigma, cond).pow(2).mean().backward()
    opt.step()
    after = {n.replace(".base_layer", ""): p.detach() for n, p in adapter.denoiser.named_parameters()
             if "lora_" not in n}
    assert after.keys() == before.keys() and all(torch.equal(before[n], after[n]) for n in before)
    with torch.no_grad():
        v = adapter.predict_velocity(x, sigma, cond)
        with adapter.lora_disabled():
            assert not torch.allclose(adapter.predict_velocity(x, sigma, cond), v)
    path = adapter.save_lora(tmp_path / "lora")
    assert path.name == "pytorch_lora_weights.safetensors" and path.exists()

    fresh = tiny_z_image_pipeline(0)
    fresh.load_lora_weights(str(tmp_path / "lora"))  # diffusers' ZImageLoraLoaderMixin
    with torch.no_grad():
        torch.testing.assert_close(ZImageAdapter(fresh, max_sequence_length=SEQ).predict_velocity(x, sigma, cond), v,
                                   rtol=1e-5, atol=1e-6)


def test_real_loading_code_on_a_local_directory(tmp_path):
    tiny_z_image_pipeline(0).save_pretrained(tmp_path / "z")
    loaded = load_model("z-image", str(tmp_path / "z"), max_sequence_length=SEQ)
    reference = load_model("tiny-z-image")
    x = torch.randn(1, *reference.latent_shape(16, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict_velocity(x, 0.6, loaded.encode_prompts(PROMPTS[:1]), 2.0),
                                   reference.predict_velocity(x, 0.6, reference.encode_prompts(PROMPTS[:1]), 2.0))
    assert not any(p.requires_grad for p in [*loaded.pipe.vae.parameters(), *loaded.pipe.text_encoder.parameters()])
    assert request_rules("z-image", str(tmp_path / "z")) == request_rules("tiny-z-image") == RequestRules("z-image", 4)
    assert reference.rules == request_rules("tiny-z-image")
    with pytest.raises(ValueError, match="multiple of 4"):
        reference.latent_shape(18, 16)
