"""FLUX.1 Kontext: the editing adapter is faithful to FluxKontextPipeline with a source image, keeps log-probs
consistent, saves LoRA the pipeline loads, and trains on a prompt file whose lines name source images, with a
reward that judges the edit against them."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers.toy_rewards import RecordingSourceL1
from visalign.media import read_image
from visalign.models import load_model, request_rules
from visalign.models.base import encode
from visalign.models.flux_kontext import FluxKontextAdapter, tiny_flux_kontext, tiny_flux_kontext_pipeline
from visalign.sampling import sample
from visalign.trainers import trainer_class

PROMPTS = ["make the circle red", "put two blue squares on the left side of the table"]
REQ = {"height": 32, "width": 32}


@pytest.fixture
def kontext():
    return tiny_flux_kontext(0)


def _sources(seed=3):
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_ode_sampler_reproduces_pipeline(kontext):
    pipe = kontext.pipe
    pipe.set_progress_bar_config(disable=True)
    seeds, src = [11, 12], _sources()
    # The pipeline's own sizing (auto-resize to Kontext's preferred resolutions, max_area) is kept at the request.
    call = {"prompt": PROMPTS, "image": src, "num_inference_steps": 3, "guidance_scale": 3.5, "max_sequence_length": 32,
            "_auto_resize": False, "max_area": 32 * 32, **REQ}
    ref = pipe(output_type="pt", generator=[torch.Generator().manual_seed(s) for s in seeds], **call)[0]
    ref_latents = pipe(output_type="latent", generator=[torch.Generator().manual_seed(s) for s in seeds], **call)[0]
    cond = encode(kontext, PROMPTS, cfg=False, images=src)
    traj = sample(kontext, cond, num_steps=3, guidance_scale=3.5, seeds=seeds, **REQ)
    ref_latents = kontext._unpack(ref_latents, *traj.final.shape[-2:])
    assert (traj.final - ref_latents).abs().max() <= 1e-4
    assert (kontext.decode(traj.final) - ref).abs().max() <= 1e-4
    assert (traj.final - traj.latents[:, 0]).abs().mean() > 1e-2
    # The source image conditions the output: another source, same seeds, another sample.
    other = sample(kontext, encode(kontext, PROMPTS, cfg=False, images=_sources(4)), num_steps=3,
                   guidance_scale=3.5, seeds=seeds, **REQ)
    assert (other.final - traj.final).abs().max() > 1e-3


def test_lora_step_save_and_the_pipelines_loader(kontext, tmp_path):
    kontext.add_lora(rank=4, alpha=8)
    cond = encode(kontext, PROMPTS, cfg=False, images=_sources())
    x = torch.randn(2, *kontext.latent_shape(32, 32), generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.3, 0.8])
    opt = torch.optim.SGD(kontext.trainable_parameters(), lr=1e-2)
    kontext.predict_velocity(x, sigma, cond, 3.5).pow(2).mean().backward()
    opt.step()
    assert all("lora_" in n for n, p in kontext.denoiser.named_parameters() if p.requires_grad)
    with torch.no_grad():
        v = kontext.predict_velocity(x, sigma, cond, 3.5)
    kontext.save_lora(tmp_path / "lora")
    fresh = tiny_flux_kontext_pipeline(0)
    fresh.load_lora_weights(str(tmp_path / "lora"))  # FluxLoraLoaderMixin, not our code
    with torch.no_grad():
        torch.testing.assert_close(FluxKontextAdapter(fresh, 32).predict_velocity(x, sigma, cond, 3.5), v,
                                   rtol=1e-5, atol=1e-6)


def test_real_loading_code_on_a_local_directory(tmp_path):
    tiny_flux_kontext_pipeline(0).save_pretrained(tmp_path / "kontext")
    loaded = load_model("flux-kontext", str(tmp_path / "kontext"), max_sequence_length=32)
    reference = load_model("tiny-flux-kontext")
    assert loaded.edits and type(loaded) is FluxKontextAdapter
    x = torch.randn(1, *reference.latent_shape(32, 32))
    src = _sources()[:1]
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict_velocity(x, 0.6, encode(loaded, ["a"], cfg=False, images=src), 2.0),
                                   reference.predict_velocity(x, 0.6, encode(reference, ["a"], cfg=False, images=src),
                                                              2.0))
    assert request_rules("flux-kontext", str(tmp_path / "kontext")) == request_rules("tiny-flux-kontext")


def _edit_prompts(tmp_path):
    rows = []
    for i, value in enumerate((30, 220)):
        array = np.zeros((32, 32, 3), dtype=np.uint8)
        array[:, : 16 * (i + 1)] = value
        Image.fromarray(array).save(tmp_path / f"src{i}.png")
        rows.append({"prompt": f"edit {i}", "source_image": f"src{i}.png"})
    path = tmp_path / "edits.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.mark.parametrize("trainer", ["flow_grpo", "diffusion_nft"])
def test_trains_on_edit_prompts_with_a_reward_that_reads_sources(tiny_run, trainer, tmp_path):
    RecordingSourceL1.seen.clear()
    prompts = _edit_prompts(tmp_path)
    cfg = tiny_run("model.lora_rank=4", "model.height=32", "model.width=32", f"train.prompts={prompts}",
                   "rewards={tests.helpers.toy_rewards.MeanBrightness: 1.0, "
                   "tests.helpers.toy_rewards.RecordingSourceL1: 1.0}",
                   trainer=trainer, model="tiny-flux-kontext", out=tmp_path / "run")
    t = trainer_class(trainer)(cfg)
    named = dict(t.adapter.denoiser.named_parameters())
    before = {n: p.detach().clone() for n, p in named.items()}
    t.train()
    changed = {n for n, p in named.items() if not torch.equal(before[n], p.detach())}
    assert changed and all("lora_" in n for n in changed)
    # The reward was called with each sample's own source image, as the file holds it.
    assert RecordingSourceL1.seen
    for sources, paths in RecordingSourceL1.seen:
        expected = torch.stack([read_image(p, (32, 32)) for p in paths])
        torch.testing.assert_close(sources, expected)
    assert {p for _, paths in RecordingSourceL1.seen for p in paths} == {str(tmp_path / "src0.png"),
                                                                          str(tmp_path / "src1.png")}


def test_cli_sample_edits_a_source_image(tmp_path, capsys):
    from visalign.cli import main

    Image.fromarray(np.full((48, 40, 3), 200, dtype=np.uint8)).save(tmp_path / "src.png")
    out = tmp_path / "k.png"
    args = ["sample", "--model", "tiny-flux-kontext", "--prompt", "make it red", "--height", "32", "--width", "32",
            "--steps", "2", "--out", str(out)]
    assert main([*args, "--source-image", str(tmp_path / "src.png")]) == 0
    assert Image.open(out).size == (36, 36)
    assert main(args) == 2 and "tiny-flux-kontext edits a source image per prompt" in capsys.readouterr().err
    assert main([*args[:2], "tiny-sd3", *args[3:], "--source-image", str(tmp_path / "src.png")]) == 2
    assert "tiny-sd3 is not an editing model" in capsys.readouterr().err


def test_config_checks_prompt_files_against_the_model(tiny_run, tmp_path):
    prompts = _edit_prompts(tmp_path)
    plain = tmp_path / "plain.txt"
    plain.write_text("a red circle\n")
    with pytest.raises(ValueError, match=r"train.prompts=.*plain.txt.*the model edits source images"):
        tiny_run(f"train.prompts={plain}", model="tiny-flux-kontext")
    with pytest.raises(ValueError, match=r"train.prompts=.*edits.jsonl.* names source images, and the model is not"):
        tiny_run(f"train.prompts={prompts}")
    with pytest.raises(ValueError, match="model.free_text_encoders: tiny-flux-kontext edits source images"):
        tiny_run(f"train.prompts={prompts}", "model.free_text_encoders=true", model="tiny-flux-kontext")


@pytest.mark.parametrize("trainer", ["flow_rwr", "flow_dpo", "awm", "dgpo", "draft"])
def test_every_other_trainer_trains_an_editing_model_unchanged(tiny_run, trainer, tmp_path):
    RecordingSourceL1.seen.clear()
    prompts = _edit_prompts(tmp_path)
    # the recipes' own small settings: AWM's stratified levels and DGPO's whole groups fit 4 steps of 4 samples
    extra = {"awm": ["train.timesteps_per_sample=2"], "dgpo": ["train.train_batch_size=4"]}.get(trainer, [])
    cfg = tiny_run("model.lora_rank=4", "model.height=32", "model.width=32", f"train.prompts={prompts}",
                   "train.max_steps=1", "rewards={tests.helpers.toy_rewards.RecordingSourceL1: 1.0}", *extra,
                   trainer=trainer, model="tiny-flux-kontext", out=tmp_path / "run")
    t = trainer_class(trainer)(cfg)
    named = dict(t.adapter.denoiser.named_parameters())
    before = {n: p.detach().clone() for n, p in named.items()}
    t.train()
    changed = {n for n, p in named.items() if not torch.equal(before[n], p.detach())}
    assert changed and all("lora_" in n for n in changed)
    assert RecordingSourceL1.seen and all(sources.shape[1:] == (3, 32, 32) for sources, _ in RecordingSourceL1.seen)


def test_every_steering_method_edits_the_source_each_prompt_names(kontext, tmp_path):
    from visalign.steering import steer

    prompts = _edit_prompts(tmp_path)
    rows = [json.loads(line) for line in prompts.read_text().splitlines()]
    metadata = [{"source_image": str(tmp_path / r["source_image"])} for r in rows]
    for method, opts in (("best_of_n", {"n": 2}), ("fk", {"k": 2, "lam": 10.0}), ("guidance", {"scale": 0.3}),
                         ("reno", {"iterations": 1}), ("drift", {"scale": 0.5})):
        RecordingSourceL1.seen.clear()
        out = steer(kontext, [r["prompt"] for r in rows], RecordingSourceL1(), method, steps=2, guidance=2.5,
                    height=32, width=32, metadata=metadata, **opts)
        assert out.reward.shape == (2,) and torch.isfinite(out.latents).all(), method
        # the reward judged each sample against the file its prompt names
        for sources, paths in RecordingSourceL1.seen:
            assert set(paths) <= {m["source_image"] for m in metadata}, method
            torch.testing.assert_close(sources, torch.stack([read_image(p, (32, 32)) for p in paths]))
    with pytest.raises(ValueError, match="flux-kontext edits a source image per prompt"):
        steer(kontext, ["a"], RecordingSourceL1(), "best_of_n", steps=2, height=32, width=32, n=2)
