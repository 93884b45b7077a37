"""CLIP-family rewards and their tensor preprocessing, each checked against an independent computation:
torchvision / open_clip / HF image processors for the geometry, the reference libraries' own forward passes
(`CLIPModel.forward`, `get_image_features`, open_clip `CLIP.forward`) for the scores, on tiny models."""

import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from visalign import rewards
from visalign.rewards.clip_family import (
    TINY_OPEN_CLIP_CFG,
    CLIPScore,
    HPSv2,
    HPSv21,
    LaionAesthetic,
    PickScore,
    tiny_hf_clip,
    tiny_hf_tokenizer,
    tiny_open_clip,
    tiny_open_clip_tokenizer,
)
from visalign.rewards.preprocess import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    center_crop,
    clip_preprocess,
    hpsv2_preprocess,
    longest_side_size,
    shortest_side_size,
    siglip_preprocess,
)

OPENAI_STD = torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)
PROMPTS = ["a red circle", "a blue square", "a red circle"]
# 8-bit references (PIL, torch's uint8 resampler) round the horizontal pass and the final image to 8 bits:
# at most 0.5/255 each, plus Pillow's fixed-point filter weights. Measured maximum on noise, hard edges and
# smooth images: 1.06/255. A one-pixel geometry shift gives errors of 10/255 and more on these images.
EIGHT_BIT_TOL = 1.5 / 255


def _uint8_image(height, width, kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "noise":
        return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=g)
    if kind == "blocks":  # hard edges: bicubic overshoot that 8-bit pipelines clip
        blocks = (torch.rand(3, height // 6 + 1, width // 6 + 1, generator=g) > 0.5).float()
        blocks = blocks.repeat_interleave(6, 1).repeat_interleave(6, 2)[:, :height, :width]
        return (blocks * 255).to(torch.uint8)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    smooth = torch.stack([0.5 + 0.4 * torch.sin(6 * xx + 3 * yy), 0.5 + 0.4 * torch.cos(5 * yy), xx * yy])
    return (smooth * 255).round().to(torch.uint8)


def _pil(u8):
    return Image.fromarray(u8.permute(1, 2, 0).numpy())


def _pixel_error(a, b, std=OPENAI_STD):
    """Largest difference in [0, 1] pixel units between two normalised images."""
    return float(((a - b).abs() * std).max())


# ---- preprocessing -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(48, 33), (33, 48), (40, 40), (20, 12)])
def test_clip_preprocess_equals_torchvision_and_open_clip_on_tensors(shape):
    import open_clip

    x = torch.rand(3, *shape, generator=torch.Generator().manual_seed(1))
    torchvision_ref = T.Compose([T.Resize(16, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
                                 T.CenterCrop(16), T.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)])(x)
    open_clip_ref = open_clip.image_transform(16, is_train=False)(x)
    ours = clip_preprocess(x[None], 16)[0]
    assert ours.shape == (3, 16, 16)
    torch.testing.assert_close(ours, torchvision_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours, open_clip_ref, rtol=0, atol=1e-6)
    video = torch.stack([x, x.flip(-1)])[None]  # [1, F=2, 3, H, W]: leading dims are kept
    torch.testing.assert_close(clip_preprocess(video, 16)[0, 1], clip_preprocess(x.flip(-1), 16))


def test_crop_offset_conventions_on_an_odd_margin():
    from transformers import CLIPImageProcessor
    from transformers.image_utils import SizeDict

    assert shortest_side_size(48, 33, 16) == (23, 16)  # long side int(16 * 48 / 33) = 23, margin 7
    assert longest_side_size(48, 32, 16) == (16, 11)   # round(32 * 16 / 48) = round(10.67)
    t = torch.arange(23 * 16, dtype=torch.float32).view(1, 23, 16).expand(3, 23, 16)
    # margin 7: torchvision takes round(3.5) = 4 (half to even), HF takes 7 // 2 = 3.
    torch.testing.assert_close(center_crop(t, 16, rounding="round"), t[:, 4:20])
    torch.testing.assert_close(center_crop(t, 16, rounding="round"), TF.center_crop(t, [16, 16]))
    hf = CLIPImageProcessor().center_crop(t, size=SizeDict(height=16, width=16))
    torch.testing.assert_close(center_crop(t, 16, rounding="floor"), t[:, 3:19])
    torch.testing.assert_close(center_crop(t, 16, rounding="floor"), hf)


@pytest.mark.parametrize("kind", ["noise", "blocks", "smooth"])
def test_clip_preprocess_matches_hf_clip_image_processor(kind):
    from transformers import CLIPImageProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    u8 = _uint8_image(48, 33, kind)  # odd crop margin: the floor / round offsets differ here
    x = u8.float() / 255
    ours = clip_preprocess(x, 16, crop_rounding="floor", clamp=True)
    for processor_cls in (CLIPImageProcessor, CLIPImageProcessorPil):
        processor = processor_cls(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
        reference = processor(images=_pil(u8), return_tensors="pt").pixel_values[0]
        assert _pixel_error(ours, reference) <= EIGHT_BIT_TOL, processor_cls.__name__
        assert _pixel_error(clip_preprocess(x, 16, crop_rounding="round", clamp=True), reference) > 4 / 255
    # OpenAI CLIP / LAION aesthetic / Hessel CLIPScore: torchvision transforms on a PIL image.
    openai_ref = T.Compose([T.Resize(16, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(16),
                            T.ToTensor(), T.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)])(_pil(u8))
    openai_style = clip_preprocess(x, 16, crop_rounding="round", clamp=True)
    assert _pixel_error(openai_style, openai_ref) <= EIGHT_BIT_TOL
    if kind == "blocks":  # without the per-pass clipping the hard edges are far off
        assert _pixel_error(clip_preprocess(x, 16, crop_rounding="round"), openai_ref) > 5 / 255


def _hpsv2_reference(x, size):
    """tgxs002/HPSv2 `hpsv2/src/open_clip/transform.py`: ResizeMaxSize(size, fill=0) on the ToTensor output
    (torchvision's tensor resize, bicubic), then Normalize with the OpenAI constants."""
    height, width = x.shape[-2:]
    scale = size / float(max(height, width))
    new_size = tuple(round(dim * scale) for dim in (height, width))
    x = TF.resize(x, list(new_size), T.InterpolationMode.BICUBIC)
    pad_h, pad_w = size - new_size[0], size - new_size[1]
    x = TF.pad(x, padding=[pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
    return TF.normalize(x, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)


@pytest.mark.parametrize("shape", [(48, 32), (32, 48), (48, 33), (20, 12)])
def test_hpsv2_preprocess_equals_resize_max_size(shape):
    import open_clip

    x = torch.rand(3, *shape, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(hpsv2_preprocess(x, 16), _hpsv2_reference(x, 16), rtol=0, atol=1e-6)
    # open_clip's own longest-side transform (PIL only): same geometry, 8-bit rounding.
    u8 = _uint8_image(*shape, "smooth")
    reference = open_clip.image_transform(16, is_train=False, resize_mode="longest", fill_color=0)(_pil(u8))
    assert _pixel_error(hpsv2_preprocess(u8.float() / 255, 16), reference) <= EIGHT_BIT_TOL


def test_hpsv2_pads_centred_with_black_by_hand():
    # 48×32 -> 16×11 (round(10.67)), pad_w = 5: two black columns left, three right; a constant stays one.
    x = torch.full((1, 3, 48, 32), 0.7)
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)
    for dim, image in [(-1, x), (-2, x.transpose(-1, -2))]:  # padded columns, then padded rows
        pixels = hpsv2_preprocess(image, 16)[0] * OPENAI_STD + mean
        profile = pixels.mean(dim=(0, 1 if dim == -1 else 2))
        torch.testing.assert_close(profile[[0, 1, 13, 14, 15]], torch.zeros(5), rtol=0, atol=1e-6)
        torch.testing.assert_close(profile[2:13], torch.full((11,), 0.7), rtol=0, atol=1e-5)


def test_siglip_preprocess_matches_hf_siglip_processor():
    from transformers import SiglipImageProcessor

    u8 = _uint8_image(48, 33, "noise")
    reference = SiglipImageProcessor(size={"height": 16, "width": 16})(images=_pil(u8), return_tensors="pt")
    ours = siglip_preprocess(u8.float() / 255, 16)
    assert _pixel_error(ours, reference.pixel_values[0], std=0.5) <= EIGHT_BIT_TOL


# ---- PickScore and CLIPScore (HF CLIPModel) ----------------------------------------------------------------


def _images(batch=3, height=48, width=33, seed=0):
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def test_pickscore_equals_clip_model_logits():
    reward = PickScore.tiny(seed=0)
    images = _images(height=45, width=33)  # short side 32 -> 43×32: odd crop margin
    model, tokenizer = tiny_hf_clip(0), tiny_hf_tokenizer()
    text = tokenizer(PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        # HF's own logit_scale.exp() * cos, on pixels from our (separately verified) preprocessing ...
        pixels = clip_preprocess(images, 32, crop_rounding="floor", clamp=True)
        logits = model(input_ids=text.input_ids, attention_mask=text.attention_mask, pixel_values=pixels)
        expected = logits.logits_per_image.diagonal()
        # ... and on pixels from the reference CLIPImageProcessor of 8-bit images.
        from transformers import CLIPImageProcessor

        u8 = (images * 255).round().to(torch.uint8)
        processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        hf_pixels = processor(images=[_pil(im) for im in u8], return_tensors="pt").pixel_values
        hf_expected = model(input_ids=text.input_ids, attention_mask=text.attention_mask,
                            pixel_values=hf_pixels).logits_per_image.diagonal()
    torch.testing.assert_close(reward(prompts=PROMPTS, images=images), expected, rtol=0, atol=1e-5)
    # Only 8-bit rounding separates the two inputs: measured |Δscore| <= 9.4e-3 (logit scale 14.3) over ten
    # noise batches, while a one-pixel crop shift gives >= 0.28.
    ours_8bit = reward(prompts=PROMPTS, images=u8.float() / 255)
    torch.testing.assert_close(ours_8bit, hf_expected, rtol=0, atol=2e-2)
    scaled = PickScore.tiny(seed=0, divide_by_26=True)(prompts=PROMPTS, images=images)
    torch.testing.assert_close(scaled, expected / 26, rtol=0, atol=1e-6)


@pytest.mark.parametrize("form, weight, prefix",
                         [("hessel", 2.5, "A photo depicts "), ("torchmetrics", 100.0, "")])
def test_clipscore_forms_by_hand(form, weight, prefix):
    model, tokenizer = tiny_hf_clip(0), tiny_hf_tokenizer()
    images = _images()
    rounding = "round" if form == "hessel" else "floor"
    text = tokenizer([prefix + p for p in PROMPTS], padding=True, return_tensors="pt")
    with torch.no_grad():
        image_features = model.get_image_features(
            pixel_values=clip_preprocess(images, 32, crop_rounding=rounding, clamp=True)).pooler_output
        text_features = model.get_text_features(**text).pooler_output
    cosine = torch.nn.functional.cosine_similarity(image_features, text_features, dim=-1)
    flipped = CLIPScore.tiny(seed=0, form=form)
    with torch.no_grad():  # negating the image projection negates every cosine: one side gets clamped
        flipped.model.visual_projection.weight.neg_()
    score = CLIPScore.tiny(seed=0, form=form)(prompts=PROMPTS, images=images)
    score_flipped = flipped(prompts=PROMPTS, images=images)
    torch.testing.assert_close(score, weight * cosine.clamp(min=0), rtol=0, atol=1e-5)
    torch.testing.assert_close(score_flipped, weight * (-cosine).clamp(min=0), rtol=0, atol=1e-5)
    assert ((score == 0) ^ (score_flipped == 0)).all()
    with pytest.raises(ValueError, match="form must be one of"):
        CLIPScore.tiny(form="paper")


def test_hf_clip_loads_from_a_local_dir_and_names_missing_keys(tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_hf_clip(0).save_pretrained(tmp_path / "clip")
    images = _images(seed=3)
    loaded = PickScore(model=tmp_path / "clip", tokenizer=tiny_hf_tokenizer().name_or_path)
    torch.testing.assert_close(loaded(prompts=PROMPTS, images=images),
                               PickScore.tiny(seed=0)(prompts=PROMPTS, images=images), rtol=0, atol=1e-6)
    weights = tmp_path / "clip" / "model.safetensors"
    state = load_file(str(weights))
    del state["visual_projection.weight"]
    save_file(state, str(weights))
    with pytest.raises(ValueError, match="missing keys.*visual_projection.weight"):
        PickScore(model=tmp_path / "clip", tokenizer=tiny_hf_tokenizer().name_or_path)


# ---- LAION aesthetic ---------------------------------------------------------------------------------------

RELEASED_HEAD_KEYS = {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}


def test_aesthetic_equals_manual_head_on_image_features():
    reward = LaionAesthetic.tiny(seed=0)
    images = _images()
    model = tiny_hf_clip(0)
    head = {k: v.double() for k, v in reward.head.state_dict().items()}
    assert set(head) == RELEASED_HEAD_KEYS
    pixels = clip_preprocess(images, 32, crop_rounding="round", clamp=True)
    with torch.no_grad():
        features = model.get_image_features(pixel_values=pixels).pooler_output.double()
    y = features / features.norm(dim=-1, keepdim=True)
    for i in (0, 2, 4, 6, 7):  # dropout at eval and no activations: five affine maps
        y = y @ head[f"layers.{i}.weight"].T + head[f"layers.{i}.bias"]
    torch.testing.assert_close(reward(images=images), y.squeeze(-1).float(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_aesthetic_loads_released_layout_and_names_bad_keys(tmp_path, suffix):
    from safetensors.torch import save_file

    tiny = LaionAesthetic.tiny(seed=0)
    tiny_hf_clip(0).save_pretrained(tmp_path / "clip")

    def save(state, name):
        path = tmp_path / (name + suffix)
        if suffix == ".safetensors":
            save_file(state, str(path))
        else:
            torch.save(state, path)
        return path

    state = {k: v.clone() for k, v in tiny.head.state_dict().items()}
    head = save(state, "head")
    loaded = LaionAesthetic(head=head, clip=tmp_path / "clip", head_hidden=(16, 8, 8, 4))
    images = _images(seed=4)
    torch.testing.assert_close(loaded(images=images), tiny(images=images), rtol=0, atol=1e-6)
    released_sizes = r"shape mismatch: .*layers\.0\.weight \(checkpoint \(16, 16\), model \(1024, 16\)"
    with pytest.raises(ValueError, match=released_sizes):
        LaionAesthetic(head=head, clip=tmp_path / "clip")  # the released sizes do not fit a tiny head
    del state["layers.6.bias"]
    with pytest.raises(ValueError, match=r"missing keys: layers\.6\.bias"):
        LaionAesthetic(head=save(state, "broken"), clip=tmp_path / "clip", head_hidden=(16, 8, 8, 4))


# ---- HPSv2 / HPSv2.1 (open_clip) ---------------------------------------------------------------------------


def test_hpsv2_equals_open_clip_forward():
    reward = HPSv2.tiny(seed=0)
    model, tokenizer = tiny_open_clip(0), tiny_open_clip_tokenizer()
    images = _images(height=48, width=32)
    with torch.no_grad():  # hpsv2/img_score.py: model(image, text) features, diagonal of image @ text.T
        pixels = torch.stack([_hpsv2_reference(im, 32) for im in images])
        image_features, text_features, _ = model(pixels, tokenizer(PROMPTS))
        expected = (image_features @ text_features.T).diagonal()
    torch.testing.assert_close(reward(prompts=PROMPTS, images=images), expected, rtol=0, atol=1e-5)


def test_hpsv2_loads_released_checkpoint_layout_and_names_bad_keys(tmp_path):
    tiny = tiny_open_clip(1)
    state = tiny.state_dict()
    # The released HPS_v2*_compressed.pt layout: {'state_dict': open_clip CLIP keys}.
    assert {"visual.conv1.weight", "visual.proj", "transformer.resblocks.0.attn.in_proj_weight",
            "token_embedding.weight", "text_projection", "logit_scale"} <= set(state)
    torch.save({"state_dict": state}, tmp_path / "HPS_v2.1_compressed.pt")
    loaded = HPSv21(tmp_path / "HPS_v2.1_compressed.pt", model_cfg=TINY_OPEN_CLIP_CFG,
                    tokenizer=tiny_open_clip_tokenizer())
    images = _images(height=32, width=48)
    expected = HPSv2(model=tiny, tokenizer=tiny_open_clip_tokenizer())(prompts=PROMPTS, images=images)
    torch.testing.assert_close(loaded(prompts=PROMPTS, images=images), expected, rtol=0, atol=1e-6)
    assert not torch.allclose(HPSv2.tiny(seed=0)(prompts=PROMPTS, images=images), expected)

    missing = {k: v for k, v in state.items() if k != "visual.proj"}
    for broken, match in [
        (missing, r"missing keys: visual\.proj"),
        ({**state, "text_projection": torch.zeros(32, 8)}, r"shape mismatch: text_projection"),
        ({**state, "visual.extra": torch.zeros(1)}, r"unexpected keys: visual\.extra"),
    ]:
        torch.save({"state_dict": broken}, tmp_path / "broken.pt")
        with pytest.raises(ValueError, match=match):
            HPSv2(tmp_path / "broken.pt", model_cfg=TINY_OPEN_CLIP_CFG, tokenizer=tiny_open_clip_tokenizer())


def test_hpsv2_default_tokenizer_is_open_clips_bundled_bpe():
    from open_clip.tokenizer import SimpleTokenizer

    reward = HPSv2(model=tiny_open_clip(0))
    assert isinstance(reward.tokenizer, SimpleTokenizer)
    assert reward.tokenizer(["a cat " * 100]).shape == (1, 77)  # truncated at CLIP's 77 tokens, offline


# ---- all five: registry, gradients, dtype ------------------------------------------------------------------

TINY = {
    "aesthetic": lambda **kw: LaionAesthetic.tiny(seed=0, **kw),
    "pickscore": lambda **kw: PickScore.tiny(seed=0, **kw),
    "hpsv2": lambda **kw: HPSv2.tiny(seed=0, **kw),
    "hpsv2.1": lambda **kw: HPSv21.tiny(seed=0, **kw),
    "clipscore": lambda **kw: CLIPScore.tiny(seed=4, **kw),  # seed 4: positive cosines, gradients pass
}


@pytest.mark.parametrize("name", sorted(TINY))
def test_registry_gradients_and_dtype(name):
    reward = TINY[name]()
    assert isinstance(reward, rewards.registry._resolve(name)) and reward.name == name and reward.differentiable
    images = _images(batch=2, height=40, width=56, seed=5).requires_grad_(True)
    prompts = PROMPTS[:2] if reward.needs_prompts else None
    score = reward(prompts=prompts, images=images)
    assert score.shape == (2,) and score.dtype == torch.float32
    if name == "clipscore":
        assert (score > 0).all()
    score.sum().backward()
    assert torch.isfinite(images.grad).all() and (images.grad.abs().sum(dim=(1, 2, 3)) > 0).all()
    double = TINY[name](dtype=torch.float64)(prompts=prompts, images=images.detach())
    assert double.dtype == torch.float32
    torch.testing.assert_close(double, score.detach(), rtol=1e-4, atol=1e-4)


def test_aesthetic_without_head_says_where_to_get_it():
    with pytest.raises(ValueError, match="head=.*sac\\+logos\\+ava1-l14-linearMSE.pth"):
        rewards.load("aesthetic")
