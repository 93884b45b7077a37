"""ImageReward: a tiny checkpoint in the released key layout loads through the real loading code and scores the
same as BLIP's forward written out here with plain torch ops on the raw tensors of that checkpoint."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
import torchvision.transforms.v2.functional as TF
from PIL import Image

from visalign import rewards
from visalign.rewards.imagereward import TINY_TOKENIZER, ImageReward, ImageRewardConfig, preprocess

VOCAB = {w: i for i, w in enumerate((TINY_TOKENIZER / "vocab.txt").read_text().split("\n")[:-1])}
# Tiny sizes: ViT 32 px, patch 8, width 32, 2 blocks, 2 heads; BERT width 32, 2 layers, 2 heads, FFN 64.
SIZE, PATCH, VW, VD, VH = 32, 8, 32, 2, 2
TW, TD, TH, TI, MAXPOS = 32, 2, 2, 64, 64
VOCAB_SIZE = len(VOCAB) + 2  # + [DEC], [ENC]
CONFIG = ImageRewardConfig(image_size=SIZE, patch_size=PATCH, vision_width=VW, vision_depth=VD, vision_heads=VH,
                           text_width=TW, text_depth=TD, text_heads=TH, text_intermediate=TI,
                           vocab_size=VOCAB_SIZE, max_positions=MAXPOS)
MEAN, STD = 0.16717362830052426, 1.0333394966054072  # THUDM/ImageReward ImageReward.py
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
PROMPTS = ["a red cat sitting on a tree", "two blue circle"]


def released_checkpoint(seed=0):
    """Random weights under the names BLIP_Pretrain + MLP give them in ImageReward.pt (ImageReward.py,
    models/BLIP/vit.py, models/BLIP/med.py), written out key by key."""
    g = torch.Generator().manual_seed(seed)

    def linear(prefix, out_dim, in_dim):
        return {f"{prefix}.weight": torch.randn(out_dim, in_dim, generator=g) / math.sqrt(in_dim),
                f"{prefix}.bias": 0.1 * torch.randn(out_dim, generator=g)}

    def norm(prefix, dim):
        return {f"{prefix}.weight": 1 + 0.1 * torch.randn(dim, generator=g),
                f"{prefix}.bias": 0.1 * torch.randn(dim, generator=g)}

    sd = {"blip.visual_encoder.cls_token": torch.randn(1, 1, VW, generator=g),
          "blip.visual_encoder.pos_embed": torch.randn(1, (SIZE // PATCH) ** 2 + 1, VW, generator=g),
          "blip.visual_encoder.patch_embed.proj.weight": torch.randn(VW, 3, PATCH, PATCH, generator=g) / 14,
          "blip.visual_encoder.patch_embed.proj.bias": 0.1 * torch.randn(VW, generator=g)}
    for i in range(VD):
        b = f"blip.visual_encoder.blocks.{i}"
        sd |= norm(f"{b}.norm1", VW) | linear(f"{b}.attn.qkv", 3 * VW, VW) | linear(f"{b}.attn.proj", VW, VW)
        sd |= norm(f"{b}.norm2", VW) | linear(f"{b}.mlp.fc1", 4 * VW, VW) | linear(f"{b}.mlp.fc2", VW, 4 * VW)
    sd |= norm("blip.visual_encoder.norm", VW)
    t = "blip.text_encoder"
    sd |= {f"{t}.embeddings.word_embeddings.weight": torch.randn(VOCAB_SIZE, TW, generator=g),
           f"{t}.embeddings.position_embeddings.weight": torch.randn(MAXPOS, TW, generator=g),
           f"{t}.embeddings.position_ids": torch.arange(MAXPOS)[None]}
    sd |= norm(f"{t}.embeddings.LayerNorm", TW)
    for i in range(TD):
        lay = f"{t}.encoder.layer.{i}"
        for att, kv_width in (("attention", TW), ("crossattention", VW)):
            sd |= linear(f"{lay}.{att}.self.query", TW, TW) | linear(f"{lay}.{att}.self.key", TW, kv_width)
            sd |= linear(f"{lay}.{att}.self.value", TW, kv_width) | linear(f"{lay}.{att}.output.dense", TW, TW)
            sd |= norm(f"{lay}.{att}.output.LayerNorm", TW)
        sd |= linear(f"{lay}.intermediate.dense", TI, TW) | linear(f"{lay}.output.dense", TW, TI)
        sd |= norm(f"{lay}.output.LayerNorm", TW)
    sd |= linear("blip.vision_proj", 256, VW) | linear("blip.text_proj", 256, TW)
    for index, (out_dim, in_dim) in zip((0, 2, 4, 6, 7), ((1024, TW), (128, 1024), (64, 128), (16, 64), (1, 16)),
                                        strict=True):
        sd |= linear(f"mlp.layers.{index}", out_dim, in_dim)
    return sd


def token_ids(prompt):
    """[CLS] words [SEP] [PAD]..., 35 long, read straight from the vocabulary file (prompts are in-vocab words)."""
    ids = [VOCAB["[CLS]"]] + [VOCAB[w] for w in prompt.split()][:33] + [VOCAB["[SEP]"]]
    return ids + [VOCAB["[PAD]"]] * (35 - len(ids)), [1] * len(ids) + [0] * (35 - len(ids))


def reference_pixels(images):
    """ImageReward's _transform geometry (Resize(n, BICUBIC) + CenterCrop(n) + Normalize) via torchvision."""
    x = TF.center_crop(TF.resize(images, [SIZE], interpolation=T.InterpolationMode.BICUBIC, antialias=True), [SIZE])
    return TF.normalize(x, list(CLIP_MEAN), list(CLIP_STD))


def reference_score(sd, pixels, prompts):
    """BLIP's ViT (vit.py), BERT in mode 'multimodal' (med.py) and the MLP (ImageReward.py), step by step."""
    def lin(x, key):
        return F.linear(x, sd[f"{key}.weight"], sd[f"{key}.bias"])

    def ln(x, key, eps):
        return F.layer_norm(x, (x.shape[-1],), sd[f"{key}.weight"], sd[f"{key}.bias"], eps)

    def attend(q, k, v, heads, mask=None):
        b, n, d = q.shape
        q, k, v = (z.reshape(b, z.shape[1], heads, d // heads).transpose(1, 2) for z in (q, k, v))
        logits = q @ k.transpose(-1, -2) / math.sqrt(d // heads)
        if mask is not None:
            logits = logits + mask
        return (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)

    v = "blip.visual_encoder"
    x = F.conv2d(pixels, sd[f"{v}.patch_embed.proj.weight"], sd[f"{v}.patch_embed.proj.bias"], stride=PATCH)
    x = torch.cat([sd[f"{v}.cls_token"].expand(len(x), 1, VW), x.flatten(2).transpose(1, 2)], 1) + sd[f"{v}.pos_embed"]
    for i in range(VD):
        b = f"{v}.blocks.{i}"
        q, k, val = lin(ln(x, f"{b}.norm1", 1e-6), f"{b}.attn.qkv").chunk(3, dim=-1)
        x = x + lin(attend(q, k, val, VH), f"{b}.attn.proj")
        x = x + lin(F.gelu(lin(ln(x, f"{b}.norm2", 1e-6), f"{b}.mlp.fc1")), f"{b}.mlp.fc2")
    image_tokens = ln(x, f"{v}.norm", 1e-6)

    t = "blip.text_encoder"
    ids, mask = (torch.tensor(z) for z in zip(*map(token_ids, prompts), strict=True))
    h = sd[f"{t}.embeddings.word_embeddings.weight"][ids] + sd[f"{t}.embeddings.position_embeddings.weight"][:35]
    h = ln(h, f"{t}.embeddings.LayerNorm", 1e-12)
    self_mask = (1.0 - mask[:, None, None, :].float()) * -10000.0  # med.py get_extended_attention_mask
    for i in range(TD):
        lay = f"{t}.encoder.layer.{i}"
        for att, m in (("attention", self_mask), ("crossattention", None)):
            a = f"{lay}.{att}"
            context = h if att == "attention" else image_tokens
            out = attend(lin(h, f"{a}.self.query"), lin(context, f"{a}.self.key"), lin(context, f"{a}.self.value"),
                         TH, m)
            h = ln(lin(out, f"{a}.output.dense") + h, f"{a}.output.LayerNorm", 1e-12)
        h = ln(lin(F.gelu(lin(h, f"{lay}.intermediate.dense")), f"{lay}.output.dense") + h,
               f"{lay}.output.LayerNorm", 1e-12)
    r = h[:, 0]
    for index in (0, 2, 4, 6, 7):
        r = lin(r, f"mlp.layers.{index}")
    return (r[:, 0] - MEAN) / STD


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("imagereward") / "ImageReward.pt"
    sd = released_checkpoint()
    torch.save(sd, path)
    return path, sd


@pytest.fixture(scope="module")
def reward(checkpoint):
    return ImageReward(checkpoint=checkpoint[0], tokenizer=TINY_TOKENIZER, config=CONFIG)


def test_tokenizer_matches_blip():
    r = ImageReward.tiny()
    # init_tokenizer adds [DEC] (bos) then [ENC] after the BERT vocabulary (30522 and 30523 for bert-base).
    assert r.tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [len(VOCAB), len(VOCAB) + 1]
    assert r.tokenizer.bos_token == "[DEC]"
    ids, mask = r.tokenize(["A Red cat", " ".join(["cat"] * 50)])
    assert ids.tolist()[0] == token_ids("a red cat")[0] and mask.tolist()[0] == token_ids("a red cat")[1]
    # Truncated at 35 tokens with [SEP] last; the first token stays [CLS] (ImageReward does not use [ENC]).
    assert ids.shape == (2, 35) and ids[1, -1] == VOCAB["[SEP]"] and bool(mask[1].all())
    assert (ids[:, 0] == VOCAB["[CLS]"]).all()


def pil_reference(images):
    """ImageReward._transform(SIZE) itself, on 8-bit PIL images (the reference's scoring path)."""
    transform = T.Compose([T.Resize(SIZE, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(SIZE),
                           T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])
    return torch.stack([transform(Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)))
                        for x in images])


def grey_levels(a, b):
    return (a - b).abs() * torch.tensor(CLIP_STD).view(3, 1, 1) * 255


def test_preprocess_non_square_matches_reference_geometry():
    torch.manual_seed(0)
    small = 0.15 + 0.7 * torch.rand(2, 3, 6, 9)  # smooth and away from 0/1: no bicubic overshoot to clip
    for h, w in ((48, 80), (90, 40)):
        images = (F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False) * 255).round() / 255
        ours = preprocess(images, SIZE)
        assert ours.shape == (2, 3, SIZE, SIZE)
        torch.testing.assert_close(ours, reference_pixels(images), atol=1e-5, rtol=0)
        diff = grey_levels(pil_reference(images), ours)
        assert diff.max() < 1.2 and diff.mean() < 0.5, (h, w, diff.max(), diff.mean())
    # Hard edges overshoot; PIL clips them to [0, 255], so must we.
    noise = (torch.rand(2, 3, 48, 80) * 255).round() / 255
    diff = grey_levels(pil_reference(noise), preprocess(noise, SIZE))
    assert diff.max() < 1.2 and diff.mean() < 0.5, (diff.max(), diff.mean())


def test_score_equals_blip_forward_on_released_layout(checkpoint, reward):
    _, sd = checkpoint
    torch.manual_seed(1)
    images = 0.15 + 0.7 * torch.rand(2, 3, 40, 64)  # no overshoot to clip, so torchvision's resize is exact
    out = reward(prompts=PROMPTS, images=images)
    expected = reference_score(sd, reference_pixels(images), PROMPTS)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)
    # The score depends on both the prompt and the image.
    assert abs(float(out[0] - out[1])) > 1e-3
    swapped = reward(prompts=PROMPTS[::-1], images=images)
    assert (swapped - out).abs().max() > 1e-3


def test_safetensors_checkpoint_and_registry(checkpoint, reward, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "imagereward.safetensors"
    save_file({k: v.contiguous() for k, v in checkpoint[1].items()}, str(path))
    images = torch.rand(1, 3, SIZE, SIZE)
    loaded = rewards.load("imagereward", checkpoint=str(path), tokenizer=str(TINY_TOKENIZER), config=CONFIG)
    assert isinstance(loaded, ImageReward)
    torch.testing.assert_close(loaded(prompts=PROMPTS[:1], images=images), reward(prompts=PROMPTS[:1], images=images))


def test_gradient_reaches_pixels(reward):
    images = torch.rand(2, 3, 48, 40, requires_grad=True)
    reward(prompts=PROMPTS, images=images).sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    assert all(p.grad is None for p in reward.model.parameters())


@pytest.mark.parametrize("change, named", [
    (lambda sd: sd.pop("blip.text_encoder.encoder.layer.1.crossattention.self.key.weight"),
     "missing keys: blip.text_encoder.encoder.layer.1.crossattention.self.key.weight"),
    (lambda sd: sd.update({"mlp.layers.7.weight": torch.zeros(2, 16)}),
     "mlp.layers.7.weight (checkpoint (2, 16), model (1, 16))"),
    (lambda sd: sd.update({"blip.text_decoder.cls.weight": torch.zeros(1)}),
     "unexpected keys: blip.text_decoder.cls.weight"),
])
def test_bad_checkpoint_names_the_key(checkpoint, change, named):
    sd = dict(checkpoint[1])
    change(sd)
    with pytest.raises(ValueError) as err:
        ImageReward(checkpoint=sd, tokenizer=TINY_TOKENIZER, config=CONFIG)
    assert named in str(err.value)


def test_tiny_and_missing_files(tmp_path):
    r = ImageReward.tiny(seed=3)
    out = r(prompts=PROMPTS, images=torch.rand(2, 3, SIZE, SIZE))
    assert out.shape == (2,) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="not a file"):
        ImageReward(checkpoint=tmp_path / "ImageReward.pt", tokenizer=TINY_TOKENIZER, config=CONFIG)
    with pytest.raises(ValueError, match="local directory"):
        ImageReward(checkpoint={}, tokenizer=tmp_path / "bert-base-uncased", config=CONFIG)


@pytest.mark.slow
def test_released_model_matches_readme_example():
    """The released model on the README example (THUDM/ImageReward README.md / example.py). Needs local files:
    IMAGEREWARD_CHECKPOINT (ImageReward.pt), IMAGEREWARD_TOKENIZER (bert-base-uncased directory) and
    IMAGEREWARD_IMAGES (the repo's assets/images with 1.webp ... 4.webp)."""
    import os
    from pathlib import Path

    paths = [os.environ.get(k) for k in ("IMAGEREWARD_CHECKPOINT", "IMAGEREWARD_TOKENIZER", "IMAGEREWARD_IMAGES")]
    if not all(paths):
        pytest.skip("set IMAGEREWARD_CHECKPOINT, IMAGEREWARD_TOKENIZER and IMAGEREWARD_IMAGES")
    reward = ImageReward(checkpoint=paths[0], tokenizer=paths[1], batch_size=1)
    prompt = "a painting of an ocean with clouds and birds, day time, low depth field effect"
    scores = []
    for i in range(1, 5):
        image = np.asarray(Image.open(Path(paths[2]) / f"{i}.webp").convert("RGB"))
        image = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
        scores.append(float(reward(prompts=[prompt], images=image)))
    # README: 0.58, 0.27, -1.41, -2.03; tensor resizing moves scores by a few hundredths.
    assert scores == pytest.approx([0.5812, 0.2745, -1.4132, -2.0296], abs=0.05)
