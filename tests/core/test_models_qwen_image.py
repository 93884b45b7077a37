"""The Qwen-Image adapter is faithful to QwenImagePipeline (true CFG with norm rescale, masked padded text), keeps
log-probs consistent, trains and saves LoRA in diffusers' format, and loads through the real loading code."""

import math

import pytest
import torch

from visalign.models import Conditioning, load_model, request_rules
from visalign.models.qwen_image import QwenImageAdapter, tiny_qwen_image, tiny_qwen_image_pipeline
from visalign.sampling import sample

PROMPTS = ["a red circle", "two blue squares on the left"]  # different token lengths
REQ = {"height": 16, "width": 16}  # tiny VAE factor 2: 8x8 latents, 16 packed tokens
MAX_LEN = 128  # the tiny adapter's max_sequence_length


@pytest.fixture
def qwen():
    return tiny_qwen_image(0)


def _generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.mark.parametrize("guidance", [4.0, 1.0])
def test_ode_sampler_reproduces_pipeline(qwen, guidance):
    pipe = qwen.pipe
    pipe.set_progress_bar_config(disable=True)
    seeds, steps = [11, 12], 3
    # The pipeline runs true CFG only with a negative prompt and true_cfg_scale > 1; ours defaults to "".
    call = {"prompt": PROMPTS, "true_cfg_scale": guidance, "num_inference_steps": steps, "max_sequence_length": MAX_LEN,
            **REQ, **({"negative_prompt": [""] * 2} if guidance > 1 else {})}
    ref = pipe(output_type="pt", generator=_generators(seeds), **call)[0]
    ref_latents = pipe(output_type="latent", generator=_generators(seeds), **call)[0]
    cond = qwen.encode_prompts(PROMPTS, cfg=guidance > 1)
    # Padded to the fixed length, with the mask marking each prompt's own tokens (the pipeline pads to the longest).
    assert cond.cond["encoder_hidden_states"].shape[1] == MAX_LEN
    lengths = cond.cond["encoder_hidden_states_mask"].sum(1)
    assert lengths[0] < lengths[1] < MAX_LEN
    traj = sample(qwen, cond, num_steps=steps, guidance_scale=guidance, seeds=seeds, **REQ)
    ref_latents = qwen._unpack(ref_latents, *traj.final.shape[-2:])  # the pipeline returns packed latents
    assert traj.final.shape == ref_latents.shape == (2, 4, 8, 8)
    assert (traj.final - ref_latents).abs().max() <= 1e-4
    assert (qwen.decode(traj.final) - ref).abs().max() <= 1e-4
    assert (traj.final - traj.latents[:, 0]).abs().mean() > 1e-2  # the sample moved away from its noise


def test_sigmas_follow_the_pipeline_schedule(qwen):
    # By hand: linspace(1, 1/3, 3); mu = calculate_shift(16 tokens) on the line (256, 0.5)-(8192, 0.9); exponential
    # shift e^mu / (e^mu + 1/s - 1); then stretched so the last sigma is shift_terminal = 0.02; then a final 0.
    mu = 0.5 + (16 - 256) * 0.4 / (8192 - 256)
    shifted = [math.exp(mu) / (math.exp(mu) + 1 / s - 1) for s in (1, 2 / 3, 1 / 3)]
    scale = (1 - shifted[-1]) / (1 - 0.02)
    expected = [1 - (1 - s) / scale for s in shifted] + [0.0]
    sigmas = qwen.sigmas(3, qwen.latent_shape(16, 16))
    assert sigmas.tolist() == pytest.approx(expected, abs=1e-6)


def test_true_cfg_rescales_each_token_to_the_conditional_norm(qwen):
    v_c, v_u = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    guided = qwen.guide(v_c, v_u, 4.0)
    plain = v_u + 4.0 * (v_c - v_u)

    def tokens(v):  # [B, tokens, C * 2 * 2]: the pipeline's packed layout
        return qwen._pack(v)

    torch.testing.assert_close(tokens(guided).norm(dim=-1), tokens(v_c).norm(dim=-1))
    # the same direction as plain CFG within every token: a per-token positive rescale of it
    cos = torch.nn.functional.cosine_similarity(tokens(guided), tokens(plain), dim=-1)
    torch.testing.assert_close(cos, torch.ones_like(cos))
    assert not torch.allclose(guided, plain)
    # predict_velocity routes the two branches through it
    cond = qwen.encode_prompts(["a red circle"])
    x = torch.randn(1, *qwen.latent_shape(16, 16))
    with torch.no_grad():
        v = qwen.predict_velocity(x, 0.6, cond, 4.0)
        vc = qwen.predict_velocity(x, 0.6, Conditioning(cond.cond), 1.0)
        vu = qwen.predict_velocity(x, 0.6, Conditioning(cond.uncond), 1.0)
    torch.testing.assert_close(v, qwen.guide(vc, vu, 4.0), rtol=1e-5, atol=1e-6)


def test_separately_encoded_batches_concatenate(qwen):
    cond = qwen.encode_prompts(PROMPTS)
    parts = Conditioning.cat([qwen.encode_prompts([p]) for p in PROMPTS])
    x = torch.randn(2, *qwen.latent_shape(16, 16))
    sigma = torch.tensor([0.7, 0.7])
    with torch.no_grad():
        v = qwen.predict_velocity(x, sigma, cond, 1.0)
        torch.testing.assert_close(qwen.predict_velocity(x, sigma, parts, 4.0),
                                   qwen.predict_velocity(x, sigma, cond, 4.0), rtol=1e-5, atol=1e-6)
        # _velocity cuts the padding to the longest prompt; the transformer on the whole masked padding agrees.
        full = qwen.denoiser(hidden_states=qwen._pack(x), timestep=sigma, img_shapes=[[(1, 4, 4)]] * 2,
                             return_dict=False, **cond.cond)[0]
    torch.testing.assert_close(qwen._unpack(full, 8, 8), v, rtol=1e-5, atol=1e-6)


def test_encode_normalises_as_decode_expects(qwen):
    pixels = torch.rand(2, 3, 16, 16)
    z = qwen.encode(pixels)
    vae = qwen.pipe.vae
    mode = vae.encode((pixels * 2 - 1)[:, :, None]).latent_dist.mode()[:, :, 0]  # one frame of the video VAE
    mean, std = torch.tensor(vae.config.latents_mean), torch.tensor(vae.config.latents_std)
    torch.testing.assert_close(z, (mode - mean[:, None, None]) / std[:, None, None])
    assert z.shape == (2, *qwen.latent_shape(16, 16))
    out = qwen.decode(z)
    assert out.shape == pixels.shape and out.min() >= 0 and out.max() <= 1


def test_lora_step_save_and_diffusers_load(qwen, tmp_path):
    before = {n: p.detach().clone() for n, p in qwen.denoiser.named_parameters()}
    qwen.add_lora(rank=4, alpha=8)
    names = [n for n, _ in qwen.denoiser.named_parameters()]
    for target in QwenImageAdapter.default_lora_targets:  # each default target names a module of the transformer
        assert any(n.endswith(f".{target}.lora_A.default.weight") for n in names), target
    trainable = {n for n, p in qwen.denoiser.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    cond = qwen.encode_prompts(["a red circle"], cfg=False).repeat_interleave(2)
    x = torch.randn(2, *qwen.latent_shape(16, 16), generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.3, 0.8])
    opt = torch.optim.SGD(qwen.trainable_parameters(), lr=1e-2)
    qwen.predict_velocity(x, sigma, cond).pow(2).mean().backward()
    opt.step()
    after = {n.replace(".base_layer", ""): p.detach() for n, p in qwen.denoiser.named_parameters() if "lora_" not in n}
    assert after.keys() == before.keys() and all(torch.equal(before[n], after[n]) for n in before)
    with torch.no_grad():
        v = qwen.predict_velocity(x, sigma, cond)
        with qwen.lora_disabled():
            assert not torch.allclose(qwen.predict_velocity(x, sigma, cond), v)
    path = qwen.save_lora(tmp_path / "lora")
    assert path.name == "pytorch_lora_weights.safetensors" and path.exists()

    fresh = tiny_qwen_image_pipeline(0)
    fresh.load_lora_weights(str(tmp_path / "lora"))  # QwenImageLoraLoaderMixin, not our code
    with torch.no_grad():
        torch.testing.assert_close(QwenImageAdapter(fresh, MAX_LEN).predict_velocity(x, sigma, cond), v,
                                   rtol=1e-5, atol=1e-6)


def test_real_loading_code_on_a_local_directory(tmp_path):
    tiny_qwen_image_pipeline(0).save_pretrained(tmp_path / "qwen")
    loaded = load_model("qwen-image", str(tmp_path / "qwen"), max_sequence_length=MAX_LEN)
    reference = load_model("tiny-qwen-image")
    x = torch.randn(1, *reference.latent_shape(16, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict_velocity(x, 0.6, loaded.encode_prompts(["a red circle"]), 2.0),
                                   reference.predict_velocity(x, 0.6, reference.encode_prompts(["a red circle"]), 2.0))
    assert request_rules("qwen-image", str(tmp_path / "qwen")) == request_rules("tiny-qwen-image") == reference.rules
    assert not any(p.requires_grad for m in (loaded.pipe.vae, loaded.pipe.text_encoder) for p in m.parameters())


def test_bad_requests_and_settings(qwen):
    with pytest.raises(ValueError, match="multiple of 4"):
        qwen.latent_shape(18, 16)
    with pytest.raises(ValueError, match="max_sequence_length=2000"):
        QwenImageAdapter(qwen.pipe, max_sequence_length=2000)
    with pytest.raises(ValueError, match="1 negative prompts for 2 prompts"):
        qwen.encode_prompts(PROMPTS, ["blurry"])
    qwen.pipe.transformer.register_to_config(guidance_embeds=True)
    with pytest.raises(ValueError, match="guidance_embeds=True are not supported"):
        QwenImageAdapter(qwen.pipe)
