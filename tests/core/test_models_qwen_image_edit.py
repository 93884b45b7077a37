"""Qwen-Image-Edit: the editing adapter is faithful to QwenImageEditPipeline (and QwenImageEditPlusPipeline) with a
source image read by the VL text encoder and appended as latent tokens, keeps log-probs consistent, saves LoRA the
pipeline loads, loads through the real loading code, and trains on a prompt file whose lines name source images
with a reward that judges the edit against them."""

import json

import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as edit_module
import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as plus_module
import numpy as np
import pytest
import torch
from PIL import Image

from visalign.models import load_model, request_rules
from visalign.models.base import encode
from visalign.models.qwen_image_edit import (
    TINY_AREA,
    QwenImageEditAdapter,
    condition_size,
    tiny_qwen_image_edit,
    tiny_qwen_image_edit_pipeline,
)
from visalign.sampling import sample

PROMPTS = ["make the circle red", "put two blue squares on the left side"]  # different token lengths
REQ = {"height": 32, "width": 32}  # tiny VAE factor 2: 16x16 latents, 64 packed tokens
MAX_LEN = 128  # the tiny adapter's max_sequence_length
IMAGE_TOKENS = 16  # a 32 px square through the tiny processor: 8x8 patches of 4 px, merged 2x2


@pytest.fixture
def qwen():
    return tiny_qwen_image_edit(0)


@pytest.fixture
def tiny_pipeline_sizes(monkeypatch):
    """The pipelines size source images for about 1024 x 1024 px (hard-coded); here for the tiny adapter's area."""
    real = edit_module.calculate_dimensions
    monkeypatch.setattr(edit_module, "calculate_dimensions", lambda area, ratio: real(TINY_AREA, ratio))


def _sources(seed=3, n=2, size=32):
    """8-bit images, as image files give (the pipelines take PIL images)."""
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed)) / 255


def _pil(pipe, images):
    return pipe.image_processor.numpy_to_pil(pipe.image_processor.pt_to_numpy(images))


def _generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.mark.parametrize("guidance", [4.0, 1.0])
def test_ode_sampler_reproduces_pipeline(qwen, tiny_pipeline_sizes, guidance):
    pipe = qwen.pipe
    pipe.set_progress_bar_config(disable=True)
    seeds, steps, src = [11, 12], 3, _sources()
    # The pipeline runs true CFG only with a negative prompt and true_cfg_scale > 1; ours defaults to "".
    call = {"prompt": PROMPTS, "image": _pil(pipe, src), "true_cfg_scale": guidance, "num_inference_steps": steps,
            **REQ, **({"negative_prompt": [""] * 2} if guidance > 1 else {})}
    ref = pipe(output_type="pt", generator=_generators(seeds), **call)[0]
    ref_latents = pipe(output_type="latent", generator=_generators(seeds), **call)[0]
    cond = encode(qwen, PROMPTS, cfg=guidance > 1, images=src)
    # Text with the image's tokens, padded to the fixed length; the source latents at the condition size.
    assert cond.cond["encoder_hidden_states"].shape[1] == MAX_LEN + IMAGE_TOKENS
    lengths = cond.cond["encoder_hidden_states_mask"].sum(1)
    assert IMAGE_TOKENS < lengths[0] < lengths[1] < MAX_LEN + IMAGE_TOKENS
    assert cond.cond["image_latents"].shape == (2, 4, 16, 16)
    traj = sample(qwen, cond, num_steps=steps, guidance_scale=guidance, seeds=seeds, **REQ)
    ref_latents = qwen._unpack(ref_latents, *traj.final.shape[-2:])  # the pipeline returns packed latents
    assert traj.final.shape == ref_latents.shape == (2, 4, 16, 16)
    assert (traj.final - ref_latents).abs().max() <= 1e-4
    assert (qwen.decode(traj.final) - ref).abs().max() <= 1e-4
    assert (traj.final - traj.latents[:, 0]).abs().mean() > 1e-2  # the sample moved away from its noise
    # The source image conditions the output: another source, same seeds, another sample.
    other = sample(qwen, encode(qwen, PROMPTS, cfg=guidance > 1, images=_sources(4)), num_steps=steps,
                   guidance_scale=guidance, seeds=seeds, **REQ)
    assert (other.final - traj.final).abs().max() > 1e-3


def test_source_is_sized_as_the_pipeline_sizes_it(qwen, tiny_pipeline_sizes):
    # By hand: width sqrt(area * ratio), height width / ratio, each rounded to 32 px; and as diffusers' own.
    assert condition_size(1024 * 1024, 1024, 1024) == (1024, 1024)
    assert condition_size(1024 * 1024, 512, 1024) == (736, 1440)  # 1448.2 -> 1440, 724.1 -> 736
    for area in (1024 * 1024, 384 * 384):
        for height, width in ((32, 32), (480, 832), (1024, 768), (300, 1000)):
            w, h = plus_module.calculate_dimensions(area, width / height)  # the edit module's is patched here
            assert condition_size(area, height, width) == (h, w)
    # A 16 px request: the source is resized up to the condition size (32 px) for both the VL and the VAE, as the
    # pipeline resizes a single image (with a list it gives the VL the images unresized).
    pipe = qwen.pipe
    pipe.set_progress_bar_config(disable=True)
    src = _sources(n=1, size=16)
    call = {"prompt": PROMPTS[1:], "image": _pil(pipe, src)[0], "negative_prompt": [""], "true_cfg_scale": 4.0,
            "num_inference_steps": 2, "height": 16, "width": 16}
    ref_latents = pipe(output_type="latent", generator=_generators([5]), **call)[0]
    cond = encode(qwen, PROMPTS[1:], cfg=True, images=src)
    assert cond.cond["image_latents"].shape == cond.uncond["image_latents"].shape == (1, 4, 16, 16)
    traj = sample(qwen, cond, num_steps=2, guidance_scale=4.0, seeds=[5], height=16, width=16)
    assert (traj.final - qwen._unpack(ref_latents, 8, 8)).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="rounds to 0x0"):
        condition_size(16 * 16, 16, 16)


@pytest.mark.parametrize("zero_cond_t", [False, True])  # 2509; 2511 (its transformer's zero_cond_t)
def test_plus_pipeline_is_served_with_one_image_per_prompt(monkeypatch, zero_cond_t):
    pipe = tiny_qwen_image_edit_pipeline(0, plus=True)
    if zero_cond_t:
        pipe.transformer.zero_cond_t = True
        for block in pipe.transformer.transformer_blocks:
            block.zero_cond_t = True
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == "QwenImageEditPlusPipeline"
    defaults = QwenImageEditAdapter(pipe)
    assert defaults.plus and (defaults.vision_area, defaults.image_area) == (384 * 384, 1024 * 1024)
    # The pipeline's VL and VAE areas at tiny size, kept apart: the VAE sees 64 px, the VL 32 px.
    monkeypatch.setattr(plus_module, "CONDITION_IMAGE_SIZE", 32 * 32)
    monkeypatch.setattr(plus_module, "VAE_IMAGE_SIZE", 64 * 64)
    qwen = QwenImageEditAdapter(pipe, MAX_LEN, image_area=64 * 64, vision_area=32 * 32)
    src = _sources(n=1, size=16)
    # The Plus pipeline takes one prompt per call.
    call = {"prompt": PROMPTS[1:], "image": _pil(pipe, src), "negative_prompt": [""], "true_cfg_scale": 4.0,
            "num_inference_steps": 3, "height": 16, "width": 16}
    ref = pipe(output_type="pt", generator=_generators([7]), **call)[0]
    ref_latents = pipe(output_type="latent", generator=_generators([7]), **call)[0]
    cond = encode(qwen, PROMPTS[1:], cfg=True, images=src)
    assert cond.cond["image_latents"].shape == (1, 4, 32, 32)
    assert cond.cond["encoder_hidden_states"].shape[1] == MAX_LEN + IMAGE_TOKENS
    traj = sample(qwen, cond, num_steps=3, guidance_scale=4.0, seeds=[7], height=16, width=16)
    assert (traj.final - qwen._unpack(ref_latents, 8, 8)).abs().max() <= 1e-4
    assert (qwen.decode(traj.final) - ref).abs().max() <= 1e-4
    # Our batches hold several prompts: each is encoded alone (the Plus template would number a list of images as
    # pictures of every prompt), as the pipeline would encode it.
    both = encode(qwen, PROMPTS, cfg=True, images=_sources(n=2, size=16))
    alone = encode(qwen, PROMPTS[:1], cfg=True, images=_sources(n=2, size=16)[:1])
    for k, v in alone.uncond.items():
        torch.testing.assert_close(both.uncond[k][:1], v)


def test_lora_step_save_and_diffusers_load(qwen, tmp_path):
    before = {n: p.detach().clone() for n, p in qwen.denoiser.named_parameters()}
    qwen.add_lora(rank=4, alpha=8)
    trainable = {n for n, p in qwen.denoiser.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    cond = encode(qwen, PROMPTS, cfg=True, images=_sources())
    x = torch.randn(2, *qwen.latent_shape(32, 32), generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.3, 0.8])
    opt = torch.optim.SGD(qwen.trainable_parameters(), lr=1e-2)
    qwen.predict_velocity(x, sigma, cond, 4.0).pow(2).mean().backward()
    opt.step()
    after = {n.replace(".base_layer", ""): p.detach() for n, p in qwen.denoiser.named_parameters() if "lora_" not in n}
    assert after.keys() == before.keys() and all(torch.equal(before[n], after[n]) for n in before)
    with torch.no_grad():
        v = qwen.predict_velocity(x, sigma, cond, 4.0)
        with qwen.lora_disabled():
            assert not torch.allclose(qwen.predict_velocity(x, sigma, cond, 4.0), v)
    path = qwen.save_lora(tmp_path / "lora")
    assert path.name == "pytorch_lora_weights.safetensors" and path.exists()

    fresh = tiny_qwen_image_edit_pipeline(0)
    fresh.load_lora_weights(str(tmp_path / "lora"))  # QwenImageLoraLoaderMixin, not our code
    with torch.no_grad():
        reloaded = QwenImageEditAdapter(fresh, MAX_LEN, image_area=TINY_AREA)
        torch.testing.assert_close(reloaded.predict_velocity(x, sigma, cond, 4.0), v, rtol=1e-5, atol=1e-6)


def test_real_loading_code_on_a_local_directory(tmp_path):
    tiny_qwen_image_edit_pipeline(0).save_pretrained(tmp_path / "edit")
    loaded = load_model("qwen-image-edit", str(tmp_path / "edit"), max_sequence_length=MAX_LEN, image_area=TINY_AREA)
    reference = load_model("tiny-qwen-image-edit")
    assert type(loaded) is QwenImageEditAdapter and loaded.edits and not loaded.plus
    x = torch.randn(1, *reference.latent_shape(32, 32))
    src = _sources(n=1)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.predict_velocity(x, 0.6, encode(loaded, ["make it red"], cfg=True, images=src), 2.0),
            reference.predict_velocity(x, 0.6, encode(reference, ["make it red"], cfg=True, images=src), 2.0))
    assert request_rules("qwen-image-edit", str(tmp_path / "edit")) == request_rules("tiny-qwen-image-edit")
    assert request_rules("tiny-qwen-image-edit") == reference.rules
    assert not any(p.requires_grad for m in (loaded.pipe.vae, loaded.pipe.text_encoder) for p in m.parameters())
    # The checkpoint's model_index.json picks the pipeline: a Plus checkpoint loads as one, others are refused.
    index = tmp_path / "edit" / "model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "_class_name": "QwenImageEditPlusPipeline"}))
    assert load_model("qwen-image-edit", str(tmp_path / "edit"), image_area=TINY_AREA).plus
    (tmp_path / "t2i").mkdir()
    (tmp_path / "t2i" / "model_index.json").write_text(json.dumps({"_class_name": "QwenImagePipeline"}))
    with pytest.raises(ValueError, match="holds a QwenImagePipeline; qwen-image-edit loads QwenImageEditPipeline"):
        load_model("qwen-image-edit", str(tmp_path / "t2i"))


def _edit_prompts(tmp_path):
    rows = []
    for i, value in enumerate((30, 220)):
        array = np.zeros((32, 32, 3), dtype=np.uint8)
        array[:, : 16 * (i + 1)] = value
        Image.fromarray(array).save(tmp_path / f"src{i}.png")
        rows.append({"prompt": f"edit number {i}", "source_image": f"src{i}.png"})
    path = tmp_path / "edits.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_bad_inputs(qwen):
    with pytest.raises(ValueError, match=r"images must be \[2, 3, H, W\]"):
        encode(qwen, PROMPTS, cfg=False, images=_sources(n=1))
    with pytest.raises(ValueError, match="1 negative prompts for 2 prompts"):
        qwen.encode_prompts(PROMPTS, ["blurry"], images=_sources())
    with pytest.raises(ValueError, match="max_sequence_length=128"):
        encode(qwen, ["a very long instruction " * 20], cfg=False, images=_sources(n=1))
    with pytest.raises(ValueError, match="cannot be encoded once up front"):
        qwen.free_text_encoders(PROMPTS, cfg=False)
    from visalign.models.qwen_image import tiny_qwen_image_pipeline

    with pytest.raises(ValueError, match="runs QwenImageEditPipeline or QwenImageEditPlusPipeline, not QwenImage"):
        QwenImageEditAdapter(tiny_qwen_image_pipeline(0))


@pytest.mark.parametrize("name", ["flow_grpo_qwen_image_edit", "nft_qwen_image_edit"])
def test_shipped_configs_load_without_weights(name, tmp_path):
    from visalign.trainers import load_train_config

    path = f"configs/{name}.yaml"
    with open(path) as f:
        assert f.readline().startswith(f"# visalign train {path}")  # the first line is the command
    cfg = load_train_config(path, [f"train.prompts={_edit_prompts(tmp_path)}"])
    assert cfg.model.name == "qwen-image-edit" and "source-l1" in cfg.rewards
    assert cfg.model.options["image_area"] == cfg.model.height * cfg.model.width  # sources at the sample's size
