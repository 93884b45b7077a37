"""The FLUX.2 klein adapter is faithful to Flux2KleinPipeline (base with CFG, step-distilled without), keeps
log-probs consistent, trains and saves LoRA in diffusers' format, and loads through the real loading code."""

import pytest
import torch

from visalign.models import Conditioning, load_model, request_rules
from visalign.models.flux2 import Flux2KleinAdapter, empirical_mu, tiny_flux2_klein, tiny_flux2_klein_pipeline
from visalign.sampling import sample

PROMPTS = ["a red circle", "two blue squares on the left"]  # different token lengths
REQ = {"height": 16, "width": 16}  # tiny VAE factor 2: 8x8 VAE latents, 4x4 patchified tokens
MAX_LEN, LAYERS = 48, (1, 2, 3)  # the tiny adapter's max_sequence_length and text_encoder_out_layers


@pytest.fixture
def klein():
    return tiny_flux2_klein(0)


def _generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.mark.parametrize("distilled", [False, True])
def test_ode_sampler_reproduces_pipeline(distilled):
    adapter = tiny_flux2_klein(0, is_distilled=distilled)
    assert adapter.guidance == ("none" if distilled else "cfg")
    pipe = adapter.pipe
    pipe.set_progress_bar_config(disable=True)
    seeds, steps, guidance = [11, 12], 3, 4.0  # the distilled pipeline ignores guidance_scale, as we do
    call = {"prompt": PROMPTS, "num_inference_steps": steps, "guidance_scale": guidance,
            "max_sequence_length": MAX_LEN, "text_encoder_out_layers": LAYERS, **REQ}
    ref = pipe(output_type="pt", generator=_generators(seeds), **call)[0]
    ref_latents = pipe(output_type="latent", generator=_generators(seeds), **call)[0]  # the VAE's [B, 2, 8, 8]
    cond = adapter.encode_prompts(PROMPTS, cfg=True)
    assert (cond.uncond is None) == distilled
    assert cond.cond["encoder_hidden_states"].shape == (2, MAX_LEN, 48)  # padded to the fixed length, as the pipeline
    traj = sample(adapter, cond, num_steps=steps, guidance_scale=guidance, seeds=seeds, **REQ)
    assert traj.final.shape == (2, 8, 4, 4)
    assert (traj.final - adapter.from_vae_latents(ref_latents)).abs().max() <= 1e-4
    assert (adapter.to_vae_latents(traj.final) - ref_latents).abs().max() <= 1e-4
    assert (adapter.decode(traj.final) - ref).abs().max() <= 1e-4
    assert (traj.final - traj.latents[:, 0]).abs().mean() > 1e-2  # the sample moved away from its noise


def test_empirical_mu_and_schedule_follow_diffusers(klein):
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    for seq_len in (16, 256, 1024, 4096, 4300, 4301, 9216):  # both sides of the 4300-token switch
        for steps in (1, 4, 10, 28, 50, 200):
            assert empirical_mu(seq_len, steps) == pytest.approx(compute_empirical_mu(seq_len, steps), rel=1e-12)
    sigmas = klein.sigmas(4, (8, 32, 32))
    klein.pipe.scheduler.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25], mu=compute_empirical_mu(1024, 4))
    torch.testing.assert_close(sigmas, klein.pipe.scheduler.sigmas, rtol=0, atol=0)
    assert sigmas[-1] == 0 and sigmas[1] > 0.75  # shifted towards noise


def test_separately_encoded_batches_concatenate(klein):
    cond = klein.encode_prompts(PROMPTS)
    parts = Conditioning.cat([klein.encode_prompts([p]) for p in PROMPTS])
    x = torch.randn(2, *klein.latent_shape(16, 16))
    with torch.no_grad():
        torch.testing.assert_close(klein.predict_velocity(x, 0.7, parts, 4.0),
                                   klein.predict_velocity(x, 0.7, cond, 4.0), rtol=1e-5, atol=1e-6)


def test_guidance_per_variant(klein):
    x = torch.randn(1, *klein.latent_shape(16, 16))
    cond = klein.encode_prompts(["a red circle"], ["blurry"])
    with torch.no_grad():
        v = klein.predict_velocity(x, 0.6, cond, 4.0)
        v_c = klein.predict_velocity(x, 0.6, Conditioning(cond.cond), 1.0)
        v_u = klein.predict_velocity(x, 0.6, Conditioning(cond.uncond), 1.0)
    torch.testing.assert_close(v, v_u + 4.0 * (v_c - v_u), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(v_c, v_u)
    distilled = tiny_flux2_klein(0, is_distilled=True)
    d_cond = distilled.encode_prompts(["a red circle"])
    with torch.no_grad():
        torch.testing.assert_close(distilled.predict_velocity(x, 0.6, d_cond, 4.0),
                                   distilled.predict_velocity(x, 0.6, d_cond, 1.0), rtol=0, atol=0)


def test_encode_is_the_pipelines_latent_layout(klein):
    pixels = torch.rand(2, 3, 16, 16)
    z = klein.encode(pixels)
    with torch.no_grad():
        torch.testing.assert_close(z, klein.pipe._encode_vae_image(pixels * 2 - 1, None))
        assert z.shape == (2, *klein.latent_shape(16, 16))
        torch.testing.assert_close(klein.from_vae_latents(klein.to_vae_latents(z)), z, rtol=1e-5, atol=1e-5)
        out = klein.decode(z)
    assert out.shape == pixels.shape and out.min() >= 0 and out.max() <= 1


def test_lora_step_save_and_diffusers_load(klein, tmp_path):
    before = {n: p.detach().clone() for n, p in klein.denoiser.named_parameters()}
    klein.add_lora(rank=4, alpha=8)
    adapted = {n.split(".lora_A.")[0] for n, _ in klein.denoiser.named_parameters() if ".lora_A." in n}
    for target in klein.default_lora_targets:  # each default target adapts a module, both block kinds included
        assert any(m == target or m.endswith("." + target) for m in adapted), target
    assert "single_transformer_blocks.0.attn.to_out" in adapted
    trainable = {n for n, p in klein.denoiser.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    cond = klein.encode_prompts(["a red circle"], cfg=False).repeat_interleave(2)
    x = torch.randn(2, *klein.latent_shape(16, 16), generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.3, 0.8])
    opt = torch.optim.SGD(klein.trainable_parameters(), lr=1e-2)
    klein.predict_velocity(x, sigma, cond).pow(2).mean().backward()
    opt.step()
    after = {n.replace(".base_layer", ""): p.detach() for n, p in klein.denoiser.named_parameters() if "lora_" not in n}
    assert after.keys() == before.keys() and all(torch.equal(before[n], after[n]) for n in before)
    with torch.no_grad():
        v = klein.predict_velocity(x, sigma, cond)
        with klein.lora_disabled():
            assert not torch.allclose(klein.predict_velocity(x, sigma, cond), v)
    path = klein.save_lora(tmp_path / "lora")
    assert path.name == "pytorch_lora_weights.safetensors" and path.exists()

    fresh = tiny_flux2_klein_pipeline(0)
    fresh.load_lora_weights(str(tmp_path / "lora"))  # Flux2LoraLoaderMixin, not our code
    loaded = Flux2KleinAdapter(fresh, MAX_LEN, LAYERS)
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict_velocity(x, sigma, cond), v, rtol=1e-5, atol=1e-6)
        loaded.merge_lora()
        assert not any("lora_" in n for n, _ in loaded.denoiser.named_parameters())
        torch.testing.assert_close(loaded.predict_velocity(x, sigma, cond), v, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("distilled", [False, True])
def test_real_loading_code_on_a_local_directory(distilled, tmp_path):
    tiny_flux2_klein_pipeline(0, is_distilled=distilled).save_pretrained(tmp_path / "klein")
    loaded = load_model("flux2-klein", str(tmp_path / "klein"), max_sequence_length=MAX_LEN,
                        text_encoder_out_layers=LAYERS)
    reference = tiny_flux2_klein(0, is_distilled=distilled)
    assert loaded.guidance == reference.guidance  # is_distilled travels in model_index.json
    x = torch.randn(1, *reference.latent_shape(16, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict_velocity(x, 0.6, loaded.encode_prompts(["a red circle"]), 2.0),
                                   reference.predict_velocity(x, 0.6, reference.encode_prompts(["a red circle"]), 2.0))
        torch.testing.assert_close(loaded.decode(x), reference.decode(x))  # batch-norm statistics saved and loaded
    assert request_rules("flux2-klein", str(tmp_path / "klein")) == request_rules("tiny-flux2-klein") == reference.rules
    assert not any(p.requires_grad for m in (loaded.pipe.vae, loaded.pipe.text_encoder) for p in m.parameters())


def test_bad_requests_and_settings(klein):
    with pytest.raises(ValueError, match="multiple of 4"):
        klein.latent_shape(18, 16)
    with pytest.raises(ValueError, match="1 negative prompts for 2 prompts"):
        klein.encode_prompts(PROMPTS, ["blurry"])
    with pytest.raises(ValueError, match="hidden states 0 to 3"):
        Flux2KleinAdapter(klein.pipe, text_encoder_out_layers=(9, 18, 27))  # the real default, on a 3-layer Qwen3
    with pytest.raises(ValueError, match="joint_attention_dim=48"):
        Flux2KleinAdapter(klein.pipe, text_encoder_out_layers=(1, 2))
