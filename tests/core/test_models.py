"""Adapters are faithful to their diffusers pipelines, validate requests, and handle LoRA."""

import pytest
import torch

from visalign.models import list_models, load_model
from visalign.sampling import sample

CASES = {  # model -> (request, guidance)
    "tiny-sd3": ({"height": 32, "width": 32}, 4.5),
    "tiny-flux": ({"height": 32, "width": 32}, 3.5),
    "tiny-wan": ({"height": 16, "width": 16, "num_frames": 9}, 5.0),
}
PROMPTS = ["a red circle", "two blue squares on the left"]


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("steps", [3])
def test_ode_sampler_reproduces_pipeline(name, steps):
    adapter = load_model(name)
    request, guidance = CASES[name]
    pipe = adapter.pipe
    pipe.set_progress_bar_config(disable=True)
    seeds = [11, 12]
    ref = pipe(prompt=PROMPTS, num_inference_steps=steps, guidance_scale=guidance, output_type="pt",
               generator=[torch.Generator().manual_seed(s) for s in seeds], max_sequence_length=32, **request)[0]
    ref_latents = pipe(prompt=PROMPTS, num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
                       generator=[torch.Generator().manual_seed(s) for s in seeds], max_sequence_length=32,
                       **request)[0]
    cond = adapter.encode_prompts(PROMPTS, cfg=adapter.guidance == "cfg")
    traj = sample(adapter, cond, num_steps=steps, guidance_scale=guidance, seeds=seeds, **request)
    if name == "tiny-flux":  # the pipeline returns packed latents
        ref_latents = adapter._unpack(ref_latents, *traj.final.shape[-2:])
    assert traj.final.shape == ref_latents.shape
    assert (traj.final - ref_latents).abs().max() <= 1e-4
    assert (adapter.decode(traj.final) - ref).abs().max() <= 1e-4
    # The sample moved away from its noise: the comparison is not trivially between two noise tensors.
    assert (traj.final - traj.latents[:, 0]).abs().mean() > 1e-2


def test_guidance_changes_the_velocity(tiny_sd3):
    cond = tiny_sd3.encode_prompts(["a red circle"])
    x = torch.randn(1, *tiny_sd3.latent_shape(32, 32))
    v1 = tiny_sd3.predict_velocity(x, 0.5, cond, 1.0)
    v5 = tiny_sd3.predict_velocity(x, 0.5, cond, 5.0)
    v_u = tiny_sd3.predict_velocity(x, 0.5, type(cond)(cond.uncond), 1.0)
    torch.testing.assert_close(v5, v_u + 5.0 * (v1 - v_u), rtol=1e-4, atol=1e-5)


def test_flux_guidance_embedding_is_used(tiny_flux):
    cond = tiny_flux.encode_prompts(["a red circle"], cfg=False)
    x = torch.randn(1, *tiny_flux.latent_shape(32, 32))
    assert not torch.allclose(tiny_flux.predict_velocity(x, 0.7, cond, 1.0),
                              tiny_flux.predict_velocity(x, 0.7, cond, 4.0))


def test_latent_shapes(tiny_sd3, tiny_flux, tiny_wan):
    assert tiny_sd3.latent_shape(32, 48) == (4, 16, 24)
    assert tiny_flux.latent_shape(32, 48) == (1, 16, 24)
    assert tiny_wan.latent_shape(16, 32, 9) == (16, 3, 2, 4)


def test_encode_decode_shapes_and_scaling(tiny_sd3, tiny_wan):
    pixels = torch.rand(2, 3, 32, 32)
    z = tiny_sd3.encode(pixels)
    vae = tiny_sd3.pipe.vae
    mode = vae.encode(pixels * 2 - 1).latent_dist.mode()
    torch.testing.assert_close(z, (mode - vae.config.shift_factor) * vae.config.scaling_factor)
    assert tiny_sd3.decode(z).shape == pixels.shape
    video = torch.rand(1, 9, 3, 16, 16)
    zv = tiny_wan.encode(video)
    assert zv.shape == (1, *tiny_wan.latent_shape(16, 16, 9))
    out = tiny_wan.decode(zv)
    assert out.shape == video.shape and out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: load_model("sdxl-turbo"), "allowed: .*tiny-sd3"),
        (lambda: load_model("sd3", "/no/such/dir"), "does not exist"),
        (lambda: load_model("sd3"), "needs --model-path"),
    ],
)
def test_bad_model_requests(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_bad_generation_requests(tiny_sd3, tiny_wan):
    cond = tiny_sd3.encode_prompts(["a red circle"])
    with pytest.raises(ValueError, match="multiple of 2"):
        sample(tiny_sd3, cond, num_steps=2, height=33, width=32)
    with pytest.raises(ValueError, match="num_steps=0 must be >= 1"):
        sample(tiny_sd3, cond, num_steps=0, height=32, width=32)
    with pytest.raises(ValueError, match="guidance_scale=-1.0 must be >= 0"):
        sample(tiny_sd3, cond, num_steps=2, height=32, width=32, guidance_scale=-1.0)
    wcond = tiny_wan.encode_prompts(["a red circle"])
    with pytest.raises(ValueError, match="4k\\+1"):
        sample(tiny_wan, wcond, num_steps=2, height=16, width=16, num_frames=8)
    with pytest.raises(ValueError, match="multiple of 16"):
        sample(tiny_wan, wcond, num_steps=2, height=24, width=16, num_frames=9)


def test_registry_lists_models():
    assert {"sd3", "flux", "wan", "tiny-sd3", "tiny-flux", "tiny-wan"} <= set(list_models())


def _lora_step(adapter):
    cond = adapter.encode_prompts(["a red circle"], cfg=False)
    x = torch.randn(2, *adapter.latent_shape(32, 32), generator=torch.Generator().manual_seed(0))
    cond = cond.repeat_interleave(2)
    opt = torch.optim.SGD(adapter.trainable_parameters(), lr=1e-2)
    loss = adapter.predict_velocity(x, torch.tensor([0.3, 0.8]), cond).pow(2).mean()
    loss.backward()
    opt.step()
    return cond, x


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_lora_step_save_load(name, tmp_path):
    adapter = load_model(name)
    before = {n: p.detach().clone() for n, p in adapter.denoiser.named_parameters()}
    adapter.add_lora(rank=4, alpha=8)
    trainable = {n for n, p in adapter.denoiser.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    lora_before = {n: p.detach().clone() for n, p in adapter.denoiser.named_parameters() if "lora_" in n}
    cond, x = _lora_step(adapter)
    after = {n.replace(".base_layer", ""): p.detach() for n, p in adapter.denoiser.named_parameters()
             if "lora_" not in n}
    assert after.keys() == before.keys()
    assert all(torch.equal(before[n], after[n]) for n in before)  # base weights untouched
    moved = [n for n, p in adapter.denoiser.named_parameters() if "lora_" in n and not torch.equal(p, lora_before[n])]
    assert moved and all(n in trainable for n in moved)
    sigma = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        v = adapter.predict_velocity(x, sigma, cond)
        with adapter.lora_disabled():
            v_base = adapter.predict_velocity(x, sigma, cond)
    assert not torch.allclose(v, v_base)
    path = adapter.save_lora(tmp_path / "lora")
    assert path.name == "pytorch_lora_weights.safetensors" and path.exists()

    fresh = load_model(name)
    fresh.load_lora(tmp_path / "lora")
    with torch.no_grad():
        torch.testing.assert_close(fresh.predict_velocity(x, sigma, cond), v, rtol=1e-5, atol=1e-6)
        fresh.merge_lora()
        assert not fresh.has_lora or not any("lora_" in n for n, _ in fresh.denoiser.named_parameters())
        torch.testing.assert_close(fresh.predict_velocity(x, sigma, cond), v, rtol=1e-4, atol=1e-5)


def test_load_lora_missing_path(tiny_sd3, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        tiny_sd3.load_lora(tmp_path / "nope")


@pytest.mark.parametrize("name, builder", [("sd3", "tiny_sd3_pipeline"), ("flux", "tiny_flux_pipeline"),
                                           ("wan", "tiny_wan_pipeline")])
def test_real_loading_code_on_a_local_directory(name, builder, tmp_path):
    """`load_model(name, DIR)` goes through diffusers' from_pretrained, as it would for a real checkpoint."""
    from visalign.models import tiny

    pipe = getattr(tiny, builder)(0)
    pipe.save_pretrained(tmp_path / name)
    loaded = load_model(name, str(tmp_path / name), max_sequence_length=32)
    reference = load_model(f"tiny-{name}")
    shape = (16, 16, 5) if name == "wan" else (32, 32, None)
    x = torch.randn(1, *reference.latent_shape(*shape))
    cond_l = loaded.encode_prompts(["a red circle"], cfg=loaded.guidance == "cfg")
    cond_r = reference.encode_prompts(["a red circle"], cfg=reference.guidance == "cfg")
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict_velocity(x, 0.6, cond_l, 2.0),
                                   reference.predict_velocity(x, 0.6, cond_r, 2.0))
    assert not any(p.requires_grad for p in loaded.pipe.vae.parameters())
