"""VideoAlign's VideoReward on a tiny random Qwen2-VL: the reference's frame sampling, resizing and prompt, the
processor's inputs, the head read at the three reward tokens (checked against the backbone run by hand),
batch independence, and loading from the save_pretrained and released checkpoint layouts."""

import hashlib
import json

import pytest
import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

from visalign import rewards
from visalign.rewards import RewardError
from visalign.rewards.videoalign import (
    PROMPT_TEMPLATE,
    REWARD_TOKENS,
    TINY_TOKENIZER,
    VideoAlignReward,
    build_prompt,
    frame_size,
    merge_lora,
    sample_frame_indices,
)

PROMPTS = ["a red circle moving right", "a cat"]  # different lengths: the second row is right-padded
# inference_config of the released KwaiVGI/VideoReward model_config.json (the tiny model uses them too).
MEAN, STD = torch.tensor([3.6757, 1.1646, 2.8105]), torch.tensor([2.2476, 1.3811, 2.5121])


@pytest.fixture(scope="module")
def reward():
    return VideoAlignReward.tiny()


@pytest.fixture(scope="module")
def videos():
    return torch.rand(2, 9, 3, 40, 48, generator=torch.Generator().manual_seed(0))


def test_prompt_is_the_reference_template():
    # sha256 of KwaiVGI/VideoAlign prompt_template.py DETAILED_PROMPT_WITH_SPECIAL_TOKEN (trailing spaces included).
    digest = hashlib.sha256(PROMPT_TEMPLATE.encode()).hexdigest()
    assert digest == "fdb6309bac618dd0c8b1b589d3a0970a974f7856eecbb355a190b2dce54af700"
    text = build_prompt("a {cat}")
    assert "Textual prompt - a {cat}\nPlease provide the ratings of Text Alignment: <|TA_reward|>\nEND\n" in text
    assert [text.index(t) for t in REWARD_TOKENS] == sorted(text.index(t) for t in REWARD_TOKENS)


@pytest.mark.parametrize("total, video_fps, fps, num_frames, expected", [
    (81, 16, 2.0, None, [0, 9, 18, 27, 36, 44, 53, 62, 71, 80]),  # 81 / 16 * 2 = 10.1 -> 10 frames
    (9, 16, 2.0, None, [0, 3, 5, 8]),                            # 1.1 frames -> raised to the minimum of 4
    (3, 16, 2.0, None, [0, 2]),                                  # minimum capped at the even count <= 3
    (9, None, None, 5, [0, 3, 5, 8]),                            # nframes 5 -> round(2.5) * 2 = 4 (half to even)
])
def test_frame_sampling_hand_values(total, video_fps, fps, num_frames, expected):
    assert sample_frame_indices(total, video_fps, fps=fps, num_frames=num_frames) == expected


def test_frame_sampling_needs_two_frames_and_a_rate():
    with pytest.raises(ValueError, match="at least 2"):
        sample_frame_indices(1, 16.0)
    with pytest.raises(ValueError, match="frame rate"):
        sample_frame_indices(9, None)


@pytest.mark.parametrize("size, expected", [
    ((480, 832), (336, 588)),   # down to <= 200704 px (the released max_frame_pixels), floored to 28
    ((720, 1280), (336, 588)),
    ((32, 32), (336, 336)),     # up to >= 128 * 28 * 28 px, ceiled to 28
    ((336, 588), (336, 588)),
])
def test_frame_size_hand_values(size, expected):
    assert frame_size(*size) == expected


def test_frames_match_the_reference_uint8_resize(reward):
    # vision_process.py fetch_video resizes uint8 frames with torchvision (bicubic, antialias); the same kernel
    # on floats, clipped to [0, 1], differs only by the 8-bit rounding (half a grey level), even on noise.
    video8 = (torch.rand(9, 3, 40, 48, generator=torch.Generator().manual_seed(1)) * 255).round().to(torch.uint8)
    ours = reward.frames(video8.float() / 255)
    index = sample_frame_indices(9, 16.0)
    ref = TF.resize(video8[index], [28, 56], interpolation=InterpolationMode.BICUBIC, antialias=True).float() / 255
    assert ours.shape == ref.shape == (4, 3, 28, 56)
    assert (ours - ref).abs().max() <= 0.51 / 255


def test_tiny_tokenizer_and_chat_template(reward):
    assert sum(p.stat().st_size for p in TINY_TOKENIZER.iterdir()) < 300_000
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "hi"}]}]
    text = reward.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # Qwen2-VL-Instruct's rendering of one user turn [video, text] with the generation prompt.
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|video_pad|><|vision_end|>hi<|im_end|>\n<|im_start|>assistant\n")
    ids = reward.tokenizer.convert_tokens_to_ids(list(REWARD_TOKENS))
    assert ids == reward.token_ids == list(range(ids[0], ids[0] + 3))  # added after the vocabulary, in order
    assert reward.model.backbone.get_input_embeddings().num_embeddings == len(reward.tokenizer)


def test_inputs_equal_the_qwen2_vl_processor(reward, videos):
    ours = reward.encode(PROMPTS, videos)
    chats = [[{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": build_prompt(p)}]}]
             for p in PROMPTS]
    texts = reward.processor.apply_chat_template(chats, tokenize=False, add_generation_prompt=True)
    ref = reward.processor(text=texts, videos=[reward.frames(v) for v in videos], do_resize=False,
                           do_rescale=False, padding=True, return_tensors="pt", cap_pixels_per_frame=False)
    for key in ("input_ids", "attention_mask", "video_grid_thw", "pixel_values_videos"):
        torch.testing.assert_close(ours[key], ref[key], rtol=0, atol=1e-6)
    assert ours["video_grid_thw"].tolist() == [[2, 2, 4], [2, 2, 4]]  # 4 frames of 28x56: 2 x (2 x 4) patches
    assert (ours["input_ids"] == reward.model.backbone.config.video_token_id).sum(1).tolist() == [4, 4]


def test_scores_shape_keys_and_normalisation(reward, videos):
    out = reward(prompts=PROMPTS, videos=videos)
    assert set(out) == {"VQ", "MQ", "TA", "score"}
    assert all(v.shape == (2,) and v.dtype == torch.float32 for v in out.values())
    raw = reward.raw_scores(PROMPTS, videos)
    z = (raw - MEAN) / STD  # inference.py _norm, then Overall = VQ + MQ + TA
    torch.testing.assert_close(torch.stack([out["VQ"], out["MQ"], out["TA"]], 1), z)
    torch.testing.assert_close(out["score"], z.sum(1))
    assert (out["score"][0] - out["score"][1]).abs() > 1e-3  # the two videos score differently
    plain = VideoAlignReward.tiny(normalize=False)(prompts=PROMPTS, videos=videos)
    torch.testing.assert_close(plain["score"], raw.sum(1))


@pytest.mark.parametrize("output_dim", [1, 3])
def test_head_reads_the_reward_tokens(output_dim, videos):
    """The backbone run by hand: token embeddings with the vision tower's merged features written over the video
    tokens, the text decoder with its default positions 0..L-1 (what the reference's forward passes), the final
    hidden state at each reward token times the head's row (row 0 for output_dim=1, row k for token k for 3)."""
    reward = VideoAlignReward.tiny(output_dim=output_dim, normalize=False)
    inputs = reward.encode(PROMPTS, videos)
    backbone, config = reward.model.backbone, reward.model.backbone.config
    with torch.no_grad():
        embeds = backbone.get_input_embeddings()(inputs["input_ids"])
        vision = backbone.visual(inputs["pixel_values_videos"], grid_thw=inputs["video_grid_thw"]).pooler_output
        embeds[inputs["input_ids"] == config.video_token_id] = vision
        hidden = backbone.language_model(inputs_embeds=embeds,
                                         attention_mask=inputs["attention_mask"]).last_hidden_state
    weight = reward.model.head.rm_head.weight
    assert weight.shape == (output_dim, 32)
    expected = torch.zeros(2, 3)
    for b in range(2):
        ids = inputs["input_ids"][b].tolist()
        for k, token in enumerate(REWARD_TOKENS):
            position = ids.index(reward.tokenizer.convert_tokens_to_ids(token))
            expected[b, k] = hidden[b, position] @ weight[k if output_dim == 3 else 0]
    torch.testing.assert_close(reward.raw_scores(PROMPTS, videos), expected, rtol=1e-5, atol=1e-5)


def test_positions_are_the_references_not_qwen2_vl_3d(reward, videos):
    # Qwen2-VL's own forward (3-D M-RoPE positions for the video tokens) reads other hidden states than the
    # reference's sequential positions, so the hand computation above would catch the wrong choice.
    inputs = reward.encode(PROMPTS, videos)
    chats = [[{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": build_prompt(p)}]}]
             for p in PROMPTS]
    texts = reward.processor.apply_chat_template(chats, tokenize=False, add_generation_prompt=True)
    types = reward.processor(text=texts, videos=[reward.frames(v) for v in videos], do_resize=False,
                             do_rescale=False, padding=True, return_tensors="pt",
                             cap_pixels_per_frame=False)["mm_token_type_ids"]
    with torch.no_grad():
        hidden = reward.model.backbone(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                       pixel_values_videos=inputs["pixel_values_videos"],
                                       video_grid_thw=inputs["video_grid_thw"], mm_token_type_ids=types,
                                       use_cache=False).last_hidden_state
        positions = reward.model.reward_positions(inputs["input_ids"], reward.token_ids)
        mrope = reward.model.head(hidden, positions)
    assert (mrope - reward.raw_scores(PROMPTS, videos)).abs().max() > 1e-3


def test_deterministic_and_batch_independent(reward, videos):
    both = reward(prompts=PROMPTS, videos=videos)
    again = reward(prompts=PROMPTS, videos=videos)
    assert all(torch.equal(both[k], again[k]) for k in both)
    for i in range(2):
        alone = reward(prompts=[PROMPTS[i]], videos=videos[i:i + 1])
        for key in both:
            torch.testing.assert_close(alone[key], both[key][i:i + 1], rtol=1e-5, atol=1e-5)
    rebuilt = VideoAlignReward.tiny()(prompts=PROMPTS, videos=videos)
    assert all(torch.equal(both[k], rebuilt[k]) for k in both)


def test_gradients_reach_the_frames(reward):
    videos = torch.rand(1, 9, 3, 40, 48, generator=torch.Generator().manual_seed(2)).requires_grad_()
    reward(prompts=PROMPTS[:1], videos=videos)["score"].sum().backward()
    assert torch.isfinite(videos.grad).all() and videos.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in reward.model.parameters())


def test_frame_rate_from_metadata(reward, videos):
    # 9 frames at 4 fps are 2.25 s: 4.5 frames at 2 fps -> 4; at 1 fps they are 9 s: 18 -> capped at 8.
    assert reward.frames(videos[0], 1.0).shape[0] == 8
    fast = reward(prompts=PROMPTS, videos=videos)
    slow = reward(prompts=PROMPTS, videos=videos, metadata=[{"fps": 1.0}, {"fps": 1.0}])
    assert not torch.allclose(fast["score"], slow["score"])


def test_prompt_with_a_reward_token_is_rejected(reward, videos):
    with pytest.raises(RewardError, match="once per prompt"):
        reward(prompts=["a cat <|TA_reward|>", "a dog"], videos=videos)


def test_save_and_load_round_trip(reward, videos, tmp_path):
    reward.save_pretrained(tmp_path)
    loaded = VideoAlignReward(tmp_path)
    assert loaded.config == reward.config
    before, after = reward(prompts=PROMPTS, videos=videos), loaded(prompts=PROMPTS, videos=videos)
    assert all(torch.equal(before[k], after[k]) for k in before)


def _released_layout(reward, root, base, rank=4, alpha=8.0):
    """The tiny model written as the released checkpoint: a PEFT state dict of Qwen2VLRewardModelBT under
    transformers 4.45 key names (`visual.*`, `model.*` for the text decoder, tied `lm_head`, `rm_head`), with
    LoRA (r=4, alpha=8) on every text-decoder Linear whose merge gives back the tiny weights."""
    g = torch.Generator().manual_seed(3)
    state = {}
    for key, value in reward.model.backbone.state_dict().items():
        name = key if key.startswith("visual.") else "model." + key.removeprefix("language_model.")
        module, _, kind = name.rpartition(".")
        if name.startswith("model.layers.") and module.endswith("_proj"):
            if kind == "weight":
                a = torch.randn(rank, value.shape[1], generator=g)
                b = torch.randn(value.shape[0], rank, generator=g)
                state[f"base_model.model.{module}.lora_A.default.weight"] = a
                state[f"base_model.model.{module}.lora_B.default.weight"] = b
                value = value - alpha / rank * b @ a
            state[f"base_model.model.{module}.base_layer.{kind}"] = value
        else:
            state[f"base_model.model.{name}"] = value
    state["base_model.model.lm_head.weight"] = state["base_model.model.model.embed_tokens.weight"]
    state["base_model.model.rm_head.weight"] = reward.model.head.rm_head.weight
    (root / "checkpoint-7").mkdir(parents=True)
    (root / "checkpoint-3").mkdir()
    torch.save(state, root / "checkpoint-7" / "model.pth")
    payload = {"data_config": {"fps": 2.0, "num_frames": None, "max_frame_pixels": 56 * 84,
                               "eval_dim": ["VQ", "MQ", "TA"], "prompt_template_type": "detailed_special",
                               "sample_type": "uniform"},
               "model_config": {"model_name_or_path": str(base), "output_dim": 1, "use_special_tokens": True,
                                "reward_token": "special"},
               "peft_lora_config": {"lora_enable": True, "lora_r": rank, "lora_alpha": alpha, "use_rslora": False},
               "inference_config": {f"{d}_{s}": float(v[i]) for i, d in enumerate(("VQ", "MQ", "TA"))
                                    for s, v in (("mean", MEAN), ("std", STD))}}
    (root / "model_config.json").write_text(json.dumps(payload))
    # The base model: Qwen2-VL's config (vocabulary without the reward tokens) and processor.
    config = reward.model.backbone.config.to_dict()
    config["text_config"]["vocab_size"] = len(reward.tokenizer) - 3
    (base / "config.json").parent.mkdir(parents=True)
    (base / "config.json").write_text(json.dumps(config))
    from transformers import AutoTokenizer, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    tokenizer = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer,
                     video_processor=Qwen2VLVideoProcessor(),
                     chat_template=tokenizer.chat_template).save_pretrained(base)


def test_released_layout_merges_lora_and_scores_the_same(reward, videos, tmp_path):
    _released_layout(reward, tmp_path / "VideoReward", tmp_path / "Qwen2-VL")
    # model_config.json has no min_frame_pixels (the reference fixes 128*28*28); the tiny budget is passed here.
    loaded = VideoAlignReward(tmp_path / "VideoReward", min_frame_pixels=28 * 28)
    assert loaded.token_ids == reward.token_ids
    before, after = reward(prompts=PROMPTS, videos=videos), loaded(prompts=PROMPTS, videos=videos)
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=1e-4, atol=1e-4)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint-5; available steps \[3, 7\]"):
        VideoAlignReward(tmp_path / "VideoReward", checkpoint_step=5)
    with pytest.raises(FileNotFoundError, match=r"checkpoint-3/model.pth is missing"):
        VideoAlignReward(tmp_path / "VideoReward", checkpoint_step=3)


def test_merge_lora_hand_value():
    a, b = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0], [4.0]])
    state = {"m.q.base_layer.weight": torch.zeros(2, 2), "m.q.base_layer.bias": torch.ones(2),
             "m.q.lora_A.default.weight": a, "m.q.lora_B.default.weight": b}
    merged = merge_lora(state, scaling=2.0)
    assert set(merged) == {"m.q.weight", "m.q.bias"}
    torch.testing.assert_close(merged["m.q.weight"], torch.tensor([[6.0, 12.0], [8.0, 16.0]]))


def test_missing_files_raise_errors_naming_the_path(reward, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"{missing} is not a directory"):
        VideoAlignReward(missing)
    with pytest.raises(FileNotFoundError, match=f"{tmp_path} has no model_config.json"):
        VideoAlignReward(tmp_path)
    (tmp_path / "model_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"neither config.json .* nor checkpoint-<step>/model.pth"):
        VideoAlignReward(tmp_path)
    saved = reward.save_pretrained(tmp_path / "saved")
    (saved / "reward_head.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=f"{saved} lacks reward_head.safetensors"):
        VideoAlignReward(saved)


def test_registered():
    assert "videoalign" in rewards.list_rewards()
    info = rewards.describe("videoalign")
    assert info["inputs"] == "videos" and info["differentiable"] and info["value_range"] is None
