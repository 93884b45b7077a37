"""Wan2.2 (TI2V-5B, T2V-A14B) behind the adapter: faithful to WanPipeline, the expert switch, LoRA per expert."""

import pytest
import torch

from visalign.models import MODELS, load_model, request_rules
from visalign.models.wan22 import LORA_FILES, Wan22Adapter, tiny_wan22_a14b
from visalign.sampling import SDEOptions, sample, trajectory_log_prob
from visalign.trainers import trainer_class

PROMPTS = ["a red circle", "two blue squares on the left"]
# model -> (request, builder); A14B's 3-step schedule (shift 3: sigmas 1, 0.751, 0.009) crosses its boundary 0.875.
CASES = {"tiny-wan22-5b": ({"height": 32, "width": 32, "num_frames": 5}, "tiny_wan22_5b_pipeline"),
         "tiny-wan22-a14b": ({"height": 16, "width": 16, "num_frames": 5}, "tiny_wan22_a14b_pipeline")}
BOUNDARY = 0.875


def _record_timesteps(pipe) -> dict[str, list]:
    """The timestep tensors each expert is called with, by expert."""
    calls = {"transformer": [], "transformer_2": []}
    for name in calls:
        module = getattr(pipe, name)
        if module is not None:
            module.register_forward_pre_hook(lambda m, a, kw, name=name: calls[name].append(kw["timestep"].clone()),
                                             with_kwargs=True)
    return calls


@pytest.mark.parametrize("name, guidance, options", [("tiny-wan22-5b", 5.0, {}),
                                                     ("tiny-wan22-a14b", 4.0, {"guidance_scale_2": 3.0})])
def test_ode_sampler_reproduces_pipeline(name, guidance, options):
    adapter = tiny_wan22_a14b(0, **options) if name == "tiny-wan22-a14b" else load_model(name)
    request = CASES[name][0]
    pipe = adapter.pipe
    pipe.set_progress_bar_config(disable=True)
    seeds = [11, 12]
    kwargs = {"prompt": PROMPTS, "num_inference_steps": 3, "guidance_scale": guidance, "max_sequence_length": 32,
              **request, **options}
    ref = pipe(output_type="pt", generator=[torch.Generator().manual_seed(s) for s in seeds], **kwargs)[0]
    calls = _record_timesteps(pipe)
    ref_latents = pipe(output_type="latent", generator=[torch.Generator().manual_seed(s) for s in seeds], **kwargs)[0]
    pipe_calls = {expert: list(ts) for expert, ts in calls.items()}
    for ts in calls.values():
        ts.clear()
    traj = sample(adapter, adapter.encode_prompts(PROMPTS), num_steps=3, guidance_scale=guidance, seeds=seeds,
                  **request)
    assert traj.final.shape == ref_latents.shape
    assert (traj.final - ref_latents).abs().max() <= 1e-4
    assert (adapter.decode(traj.final) - ref).abs().max() <= 1e-4
    assert (traj.final - traj.latents[:, 0]).abs().mean() > 1e-2
    # The experts got the pipeline's calls: A14B 1 high-noise step and 2 low-noise steps (two CFG branches each),
    # the 5B per-token timesteps [B, tokens] (expand_timesteps).
    assert {n: len(ts) for n, ts in calls.items()} == (
        {"transformer": 2, "transformer_2": 4} if options else {"transformer": 6, "transformer_2": 0})
    for expert, ts in calls.items():
        assert all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(ts, pipe_calls[expert], strict=True))
    assert calls["transformer"][0].shape == ((2, 2) if name == "tiny-wan22-5b" else (2,))


def test_expert_switch_at_the_boundary():
    adapter = tiny_wan22_a14b(0, guidance_scale_2=2.0)
    pipe, cond = adapter.pipe, adapter.encode_prompts(["a red circle"])
    x = torch.randn(1, *adapter.latent_shape(16, 16, 5), generator=torch.Generator().manual_seed(0))
    text, neg = cond.cond["encoder_hidden_states"], cond.uncond["encoder_hidden_states"]

    def own(expert, sigma, embeds):
        with torch.no_grad():
            return expert(hidden_states=x, timestep=torch.tensor([sigma]) * 1000, encoder_hidden_states=embeds,
                          return_dict=False)[0]

    # WanPipeline: transformer while t >= boundary_ratio * 1000 (the boundary itself included), then transformer_2.
    above, at, below = BOUNDARY + 1e-4, BOUNDARY, BOUNDARY - 1e-4
    with torch.no_grad():
        for sigma, expert in ((above, pipe.transformer), (at, pipe.transformer), (below, pipe.transformer_2)):
            torch.testing.assert_close(adapter.predict_velocity(x, sigma, cond, 1.0), own(expert, sigma, text))
        # One batch straddling the boundary: each sample on its own expert.
        both = adapter.predict_velocity(x.repeat(2, 1, 1, 1, 1), torch.tensor([above, below]),
                                        cond.repeat_interleave(2))
    torch.testing.assert_close(both[0:1], own(pipe.transformer, above, text), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(both[1:2], own(pipe.transformer_2, below, text), atol=1e-6, rtol=1e-5)
    # CFG: guidance_scale on the high-noise expert, guidance_scale_2 on the low-noise one, as the pipeline.
    with torch.no_grad():
        guided = adapter.predict_velocity(x.repeat(2, 1, 1, 1, 1), torch.tensor([above, below]),
                                          cond.repeat_interleave(2), 5.0)
    for row, (sigma, expert, scale) in enumerate(((above, pipe.transformer, 5.0), (below, pipe.transformer_2, 2.0))):
        v_c, v_u = own(expert, sigma, text), own(expert, sigma, neg)
        torch.testing.assert_close(guided[row:row + 1], v_u + scale * (v_c - v_u), atol=1e-6, rtol=1e-5)
    # guidance_scale <= 1 turns CFG off for both experts, whatever guidance_scale_2 is (WanPipeline).
    with torch.no_grad():
        torch.testing.assert_close(adapter.predict_velocity(x, below, cond, 1.0), own(pipe.transformer_2, below, text))


def test_sde_log_probs_recompute_across_the_boundary():
    adapter = load_model("tiny-wan22-a14b")
    cond = adapter.encode_prompts(PROMPTS * 2)
    traj = sample(adapter, cond, num_steps=3, guidance_scale=4.0, seeds=[0, 1, 2, 3],
                  sde=SDEOptions("flow_grpo", 0.7), **CASES["tiny-wan22-a14b"][0])
    steps = torch.tensor([0, 1, 1, 0])  # per-sample steps: one batch on both experts
    with torch.no_grad():
        out = trajectory_log_prob(adapter, traj, steps, cond, 4.0)
    assert (out.log_prob - traj.log_probs[torch.arange(4), steps]).abs().max() <= 1e-6
    torch.testing.assert_close(out.mean, traj.means[torch.arange(4), steps], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(CASES))
def test_lora_step_save_load(name, tmp_path):
    from visalign.models import wan22

    adapter = load_model(name)
    request = CASES[name][0]
    before = {n: p.detach().clone() for n, p in adapter.denoiser.named_parameters()}
    adapter.add_lora(rank=4, alpha=8)
    lora = {n: p.detach().clone() for n, p in adapter.denoiser.named_parameters() if "lora_" in n}
    assert {n for n, p in adapter.denoiser.named_parameters() if p.requires_grad} == set(lora)
    cond = adapter.encode_prompts(["a red circle"], cfg=False).repeat_interleave(2)
    x = torch.randn(2, *adapter.latent_shape(request["height"], request["width"], 5),
                    generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.95, 0.5])  # A14B: one sample per expert
    opt = torch.optim.SGD(adapter.trainable_parameters(), lr=1e-2)
    adapter.predict_velocity(x, sigma, cond).pow(2).mean().backward()
    opt.step()
    named = dict(adapter.denoiser.named_parameters())
    after = {n.replace(".base_layer", ""): p for n, p in named.items() if "lora_" not in n}
    assert after.keys() == before.keys() and all(torch.equal(before[n], after[n]) for n in before)
    moved = {n for n in lora if not torch.equal(lora[n], named[n])}
    assert moved
    if name == "tiny-wan22-a14b":
        assert {n.split(".")[0] for n in moved} == {"transformer", "transformer_2"}
    with torch.no_grad():
        v = adapter.predict_velocity(x, sigma, cond)
        with adapter.lora_disabled():
            assert not torch.allclose(adapter.predict_velocity(x, sigma, cond), v)
    directory = adapter.save_lora(tmp_path / "lora")
    files = sorted(p.name for p in directory.iterdir())
    assert files == sorted(LORA_FILES.values() if name == "tiny-wan22-a14b" else [LORA_FILES["transformer"]])

    # diffusers' own loader: the low-noise expert's file with load_into_transformer_2 (WanLoraLoaderMixin).
    pipe = getattr(wan22, CASES[name][1])(0)
    pipe.load_lora_weights(str(directory))
    if name == "tiny-wan22-a14b":
        pipe.load_lora_weights(str(directory), weight_name=LORA_FILES["transformer_2"], load_into_transformer_2=True)
    with torch.no_grad():
        torch.testing.assert_close(Wan22Adapter(pipe, max_sequence_length=32).predict_velocity(x, sigma, cond), v,
                                   rtol=1e-5, atol=1e-6)
        fresh = load_model(name)
        fresh.load_lora(directory)
        torch.testing.assert_close(fresh.predict_velocity(x, sigma, cond), v, rtol=1e-5, atol=1e-6)
        fresh.merge_lora()
        assert not fresh.has_lora
        torch.testing.assert_close(fresh.predict_velocity(x, sigma, cond), v, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(CASES))
def test_real_loading_code_on_a_local_directory(name, tmp_path):
    from visalign.models import wan22

    request = CASES[name][0]
    getattr(wan22, CASES[name][1])(0).save_pretrained(tmp_path / name)
    loaded = load_model("wan22", str(tmp_path / name), max_sequence_length=32)
    reference = load_model(name)
    assert request_rules("wan22", str(tmp_path / name)) == request_rules(name) == reference.rules
    x = torch.randn(2, *reference.latent_shape(request["height"], request["width"], 5))
    sigma = torch.tensor([0.95, 0.5])
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict_velocity(x, sigma, loaded.encode_prompts(PROMPTS), 2.0),
                                   reference.predict_velocity(x, sigma, reference.encode_prompts(PROMPTS), 2.0))
    assert not any(p.requires_grad for p in loaded.pipe.vae.parameters())
    assert type(loaded.denoiser).__name__ == ("WanExperts" if name == "tiny-wan22-a14b" else "WanTransformer3DModel")


def _run_two_steps(tiny_run, trainer, model, name=None):
    """A 2-step LoRA run of `trainer`; the denoiser's parameters before and after, and the trainer."""
    extra = ["train.timesteps_per_sample=2"] if trainer == "diffusion_nft" else []
    request = CASES[name or model][0]
    cfg = tiny_run("model.lora_rank=4", "rewards={tests.helpers.toy_rewards.MeanBrightness: 1.0}",
                   f"model.height={request['height']}", f"model.width={request['width']}", "model.num_frames=5",
                   *extra, trainer=trainer, model=model)
    t = trainer_class(trainer)(cfg)
    named = dict(t.adapter.denoiser.named_parameters())
    before = {n: p.detach().clone() for n, p in named.items()}
    t.train()
    return t, {n for n, p in named.items() if not torch.equal(before[n], p.detach())}


def test_a14b_trains_both_experts_by_default(tiny_run):
    """(Every tiny model's 2-step runs: test_model_families.) A14B's default LoRA sits on both experts, and a run
    whose steps fall on both sides of the boundary trains both."""
    t, changed = _run_two_steps(tiny_run, "flow_grpo", "tiny-wan22-a14b")
    assert {n.split(".")[0] for n in changed} == {"transformer", "transformer_2"}
    assert all((t.out / "final" / LORA_FILES[e]).exists() for e in ("transformer", "transformer_2"))


@pytest.mark.parametrize("experts", ["high", "low"])
def test_lora_on_one_expert_leaves_the_other_unchanged(tiny_run, monkeypatch, experts):
    name = f"tiny-wan22-a14b-{experts}"
    monkeypatch.setitem(MODELS, name, lambda path=None, **_: tiny_wan22_a14b(0, experts=experts))
    t, changed = _run_two_steps(tiny_run, "flow_grpo", name, "tiny-wan22-a14b")
    trained, frozen = ("transformer", "transformer_2") if experts == "high" else ("transformer_2", "transformer")
    named = dict(t.adapter.denoiser.named_parameters())
    assert not any(n.startswith(f"{frozen}.") and "lora_" in n for n in named)  # no LoRA on the other expert
    assert changed and all(n.startswith(f"{trained}.") and "lora_" in n for n in changed)
    assert sorted(p.name for p in (t.out / "final").glob("*.safetensors")) == [LORA_FILES[trained]]
    # Full fine-tuning of one expert unfreezes only that one.
    t.adapter.denoiser.requires_grad_(True)
    assert {n.split(".")[0] for n, p in named.items() if p.requires_grad} == {trained}


@pytest.mark.parametrize("options, match", [({"experts": "mid"}, "expected one of high, low, both"),
                                            ({"guidance_scale_2": -1.0}, "must be >= 0")])
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        tiny_wan22_a14b(0, **options)


def test_one_expert_layout_refuses_two_expert_options():
    from visalign.models.wan22 import tiny_wan22_5b

    with pytest.raises(ValueError, match="two-expert checkpoint"):
        tiny_wan22_5b(0, experts="low")
    with pytest.raises(ValueError, match="guidance_scale_2 needs"):
        tiny_wan22_5b(0, guidance_scale_2=3.0)
    with pytest.raises(ValueError, match="multiple of 32"):
        tiny_wan22_5b(0).latent_shape(16, 16, 5)


def test_5b_encode_decode_use_the_48_channel_vae_and_its_statistics():
    adapter = load_model("tiny-wan22-5b")
    video = torch.rand(1, 5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    z = adapter.encode(video)
    assert z.shape == (1, *adapter.latent_shape(32, 32, 5)) == (1, 48, 2, 2, 2)
    vae = adapter.pipe.vae
    mode = vae.encode(video.permute(0, 2, 1, 3, 4) * 2 - 1).latent_dist.mode()
    mean, std = torch.tensor(vae.config.latents_mean), torch.tensor(vae.config.latents_std)
    torch.testing.assert_close(z, (mode - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1))
    out = adapter.decode(z)
    assert out.shape == video.shape and out.min() >= 0 and out.max() <= 1
