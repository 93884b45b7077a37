"""The HunyuanVideo 1.5 adapter is faithful to HunyuanVideo15Pipeline (two text encoders with masked fixed-length
padding, the guider's CFG, zero image conditioning for text-to-video), keeps log-probs consistent, trains and saves
LoRA that the transformer's own diffusers loader reads, and loads through the real loading code."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from visalign.models import Conditioning, load_model, request_rules
from visalign.models.hunyuan_video15 import (
    HunyuanVideo15Adapter,
    tiny_hunyuan_video15,
    tiny_hunyuan_video15_pipeline,
)
from visalign.sampling import sample

# Different Qwen token counts; only the second has quoted (glyph) text for ByT5.
PROMPTS = ["a red circle", 'a sign that says "hello world"']
REQ = {"height": 8, "width": 12, "num_frames": 5}  # VAE 4x / 4x: latents [4, 2, 2, 3]; not square, to catch h/w swaps
SMALLEST = {"height": 4, "width": 4, "num_frames": 5}


@pytest.fixture
def hv():
    return tiny_hunyuan_video15(0)


def _generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.mark.parametrize("guidance, rescale", [(4.0, 0.0), (4.0, 0.7), (1.0, 0.0)])
def test_ode_sampler_reproduces_pipeline(guidance, rescale):
    adapter = tiny_hunyuan_video15(0)
    pipe = adapter.pipe
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.enable_slicing()  # the pipeline's own decode fails on batches of two clips (diffusers 0.42)
    # The pipeline takes its CFG settings from the guider component, not from __call__.
    pipe.guider.guidance_scale, pipe.guider.guidance_rescale = guidance, rescale
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["hidden_states"].shape[0]),
                                               with_kwargs=True)
    seeds, steps = [11, 12], 3
    call = {"prompt": PROMPTS, "num_inference_steps": steps, **REQ}
    ref = pipe(output_type="pt", generator=_generators(seeds), **call).frames
    ref_latents = pipe(output_type="latent", generator=_generators(seeds), **call).frames
    # The guider runs the conditional and unconditional batches in separate calls (cfg_batched = False).
    assert calls == [2] * steps * (2 if guidance > 1 else 1) * 2
    cond = adapter.encode_prompts(PROMPTS, cfg=guidance > 1)
    # Fixed lengths (the pipeline's 1000 Qwen and 256 ByT5 positions) with masks marking each prompt's own tokens.
    assert cond.cond["encoder_hidden_states"].shape[1] == 1000 and cond.cond["encoder_hidden_states_2"].shape[1] == 256
    lengths = cond.cond["encoder_attention_mask"].sum(1)
    assert 0 < lengths[0] < lengths[1] < 1000
    assert cond.cond["encoder_attention_mask_2"].sum(1).tolist()[0] == 0 < cond.cond["encoder_attention_mask_2"].sum()
    traj = sample(adapter, cond, num_steps=steps, guidance_scale=guidance, seeds=seeds, **REQ)
    assert traj.final.shape == ref_latents.shape == (2, 4, 2, 2, 3)
    assert (traj.final - ref_latents).abs().max() <= 1e-4
    assert (adapter.decode(traj.final) - ref).abs().max() <= 1e-4
    assert (traj.final - traj.latents[:, 0]).abs().mean() > 1e-2  # the sample moved away from its noise


def test_sigmas_follow_the_pipeline_schedule(hv):
    # By hand: the pipeline's linspace(1, 0, 4)[:-1] = 1, 2/3, 1/3 under the static shift 5, s' = 5s / (1 + 4s),
    # then a final 0.
    expected = [5 * s / (1 + 4 * s) for s in (1, 2 / 3, 1 / 3)] + [0.0]
    assert hv.sigmas(3, hv.latent_shape(**REQ)).tolist() == pytest.approx(expected, abs=1e-6)


def test_guidance_follows_the_guider():
    distilled = tiny_hunyuan_video15(0, distilled=True)  # the CFG-distilled checkpoints' guider scale 1.0
    assert distilled.guidance == "none" and tiny_hunyuan_video15(0).guidance == "cfg"
    cond = distilled.encode_prompts(PROMPTS)
    assert cond.uncond is None
    x = torch.randn(2, *distilled.latent_shape(**REQ))
    with torch.no_grad():
        torch.testing.assert_close(distilled.predict_velocity(x, 0.6, cond, 6.0),
                                   distilled.predict_velocity(x, 0.6, cond, 1.0))
    # The guider's rescale: CFG, then the guided prediction's std mixed toward the conditional one's per sample.
    adapter = tiny_hunyuan_video15(0)
    adapter.pipe.guider.guidance_rescale = 0.7
    v_c, v_u = torch.randn(2, 4, 2, 2, 3), torch.randn(2, 4, 2, 2, 3)
    plain = v_u + 4.0 * (v_c - v_u)
    ratio = v_c.std(dim=(1, 2, 3, 4), keepdim=True) / plain.std(dim=(1, 2, 3, 4), keepdim=True)
    torch.testing.assert_close(adapter.guide(v_c, v_u, 4.0), 0.7 * plain * ratio + 0.3 * plain)


def test_masked_padding_and_separate_batches_change_nothing(hv):
    cond = hv.encode_prompts(PROMPTS)
    x = torch.randn(2, *hv.latent_shape(**REQ), generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.7, 0.4])
    with torch.no_grad():
        v = hv.predict_velocity(x, sigma, cond, 1.0)
        parts = Conditioning.cat([hv.encode_prompts([p]) for p in PROMPTS])
        torch.testing.assert_close(hv.predict_velocity(x, sigma, parts, 4.0), hv.predict_velocity(x, sigma, cond, 4.0),
                                   rtol=1e-5, atol=1e-6)
        # _velocity cuts the padding and passes one zero image token; the pipeline's inputs (all 1000 + 256
        # positions, 729 zero image tokens, zero condition channels) agree.
        b, c, f, h, w = x.shape
        full = hv.denoiser(hidden_states=torch.cat([x, x.new_zeros(b, c + 1, f, h, w)], 1), timestep=sigma * 1000,
                           image_embeds=x.new_zeros(b, 729, 12), return_dict=False, **cond.cond)[0]
        torch.testing.assert_close(full, v, rtol=1e-5, atol=1e-6)
        # Keeping fewer Qwen positions than the pipeline (still past every prompt) changes nothing either.
        short = HunyuanVideo15Adapter(hv.pipe, max_sequence_length=128)
        torch.testing.assert_close(short.predict_velocity(x, sigma, short.encode_prompts(PROMPTS), 1.0), v,
                                   rtol=1e-5, atol=1e-6)
        # The quoted text reaches the transformer through ByT5.
        other = hv.encode_prompts(["a red circle", 'a sign that says "goodbye"'], cfg=False)
        assert not torch.allclose(hv.predict_velocity(x, sigma, other, 1.0)[1], v[1])


def test_encode_decode_use_the_scaling_factor_one_clip_at_a_time(hv):
    pixels = torch.rand(2, 5, 3, 8, 12)
    z = hv.encode(pixels)
    vae = hv.pipe.vae
    mode = vae.encode(pixels[:1].permute(0, 2, 1, 3, 4) * 2 - 1).latent_dist.mode()
    torch.testing.assert_close(z[:1], mode * vae.config.scaling_factor)
    assert z.shape == (2, *hv.latent_shape(**REQ))
    out = hv.decode(z)
    assert out.shape == pixels.shape and out.min() >= 0 and out.max() <= 1
    with torch.no_grad():
        torch.testing.assert_close(out[1:], hv.decode(z[1:]))


def test_lora_step_save_and_diffusers_load(tmp_path):
    adapter = tiny_hunyuan_video15(0)
    before = {n: p.detach().clone() for n, p in adapter.denoiser.named_parameters()}
    adapter.add_lora(rank=4, alpha=8)
    names = [n for n, _ in adapter.denoiser.named_parameters()]
    for target in HunyuanVideo15Adapter.default_lora_targets:  # each default target names a module of the transformer
        assert any(n.endswith(f".{target}.lora_A.default.weight") for n in names), target
    trainable = {n for n, p in adapter.denoiser.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    cond = adapter.encode_prompts(PROMPTS, cfg=False)
    x = torch.randn(2, *adapter.latent_shape(**REQ), generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.3, 0.8])
    opt = torch.optim.SGD(adapter.trainable_parameters(), lr=1e-2)
    adapter.predict_velocity(x, sigma, cond).pow(2).mean().backward()
    # The last block's text-stream output projection does not reach the video: no gradient (partial_passes for DDP).
    named = dict(adapter.denoiser.named_parameters())
    assert adapter.partial_passes and {n for n in trainable if named[n].grad is None} == {
        f"transformer_blocks.0.attn.to_add_out.lora_{ab}.default.weight" for ab in "AB"}
    opt.step()
    after = {n.replace(".base_layer", ""): p.detach() for n, p in named.items() if "lora_" not in n}
    assert after.keys() == before.keys() and all(torch.equal(before[n], after[n]) for n in before)
    with torch.no_grad():
        v = adapter.predict_velocity(x, sigma, cond)
        with adapter.lora_disabled():
            assert not torch.allclose(adapter.predict_velocity(x, sigma, cond), v)
    path = adapter.save_lora(tmp_path / "lora")
    assert path.name == "pytorch_lora_weights.safetensors" and path.exists()
    # diffusers' pipeline format: "transformer." keys, rank/alpha in the metadata
    assert all(k.startswith("transformer.") for k in load_file(path))
    with safe_open(path, "pt") as f:
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    assert (metadata["transformer.r"], metadata["transformer.lora_alpha"]) == (4, 8)

    # HunyuanVideo15Pipeline has no load_lora_weights: the transformer's own diffusers loader, not our code.
    fresh = tiny_hunyuan_video15_pipeline(0)
    fresh.transformer.load_lora_adapter(str(tmp_path / "lora"), weight_name="pytorch_lora_weights.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(HunyuanVideo15Adapter(fresh).predict_velocity(x, sigma, cond), v,
                                   rtol=1e-5, atol=1e-6)
        loaded = tiny_hunyuan_video15(0)
        loaded.load_lora(path)  # the file, as the CLI's --lora may give it
        torch.testing.assert_close(loaded.predict_velocity(x, sigma, cond), v, rtol=1e-5, atol=1e-6)
        loaded.merge_lora()
        assert not loaded.has_lora
        torch.testing.assert_close(loaded.predict_velocity(x, sigma, cond), v, rtol=1e-4, atol=1e-5)


def test_real_loading_code_on_a_local_directory(tmp_path):
    for distilled in (False, True):
        tiny_hunyuan_video15_pipeline(0, distilled).save_pretrained(tmp_path / str(distilled))
    loaded = load_model("hunyuan-video15", str(tmp_path / "False"))
    reference = load_model("tiny-hunyuan-video15")
    x = torch.randn(2, *reference.latent_shape(**REQ))
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict_velocity(x, 0.6, loaded.encode_prompts(PROMPTS), 4.0),
                                   reference.predict_velocity(x, 0.6, reference.encode_prompts(PROMPTS), 4.0))
    assert request_rules("hunyuan-video15", str(tmp_path / "False")) == request_rules("tiny-hunyuan-video15") \
        == reference.rules
    assert loaded.pipe.vae.use_tiling and not reference.pipe.vae.use_tiling
    frozen = (loaded.pipe.vae, loaded.pipe.text_encoder, loaded.pipe.text_encoder_2)
    assert not any(p.requires_grad for m in frozen for p in m.parameters())
    # The guider's saved config tells the variants apart.
    assert loaded.guidance == "cfg" and load_model("hunyuan-video15", str(tmp_path / "True")).guidance == "none"


def test_bad_requests_and_settings(hv):
    with pytest.raises(ValueError, match="multiple of 4"):
        hv.latent_shape(6, 8, 5)
    with pytest.raises(ValueError, match="4k\\+1"):
        hv.latent_shape(8, 8, 6)
    with pytest.raises(ValueError, match="1 negative prompts for 2 prompts"):
        hv.encode_prompts(PROMPTS, ["blurry"])
    with pytest.raises(ValueError, match="max_sequence_length=1001"):
        HunyuanVideo15Adapter(hv.pipe, max_sequence_length=1001)
    from diffusers.guiders import ClassifierFreeGuidance

    pipe = tiny_hunyuan_video15_pipeline(0)
    pipe.guider = ClassifierFreeGuidance(guidance_scale=6.0, stop=0.5)
    with pytest.raises(ValueError, match="part of the steps"):
        HunyuanVideo15Adapter(pipe)
    pipe.guider = ClassifierFreeGuidance(guidance_scale=6.0, use_original_formulation=True)
    with pytest.raises(ValueError, match="use_original_formulation=True"):
        HunyuanVideo15Adapter(pipe)
