"""VideoAlign's VideoReward (Liu et al. 2025, "Improving Video Generation with Human Feedback",
arXiv:2501.13918; KwaiVGI/VideoAlign, MIT): Qwen2-VL-2B fine-tuned with LoRA, and a bias-free linear head read
at three special tokens, giving visual quality (VQ), motion quality (MQ) and text alignment (TA).

What the reference does, file by file (KwaiVGI/VideoAlign):

    prompt     `prompt_template.py` "detailed_special": a fixed instruction with the user prompt at
               {text_prompt} and the tokens <|VQ_reward|>, <|MQ_reward|>, <|TA_reward|> in that order; one user
               turn [video, text] through Qwen2-VL's chat template with the generation prompt (`inference.py`)
    tokens     the three tokens are added to the Qwen2 tokenizer as additional special tokens and the
               embedding is resized to len(tokenizer) (`train_reward.py` create_model_and_processor)
    frames     `vision_process.py` smart_nframes: n = F / video_fps * fps, clamped to [4, min(768, F)] and
               rounded to an even number; frames linspace(0, F - 1, n).round(); each frame resized (bicubic,
               antialiased, uint8) by smart_resize to multiples of 28, down to at most max_frame_pixels or up
               to at least 128*28*28. Released model_config.json: fps 2, max_frame_pixels 200704 = 256*28*28
               (DataConfig's defaults: fps 2, 240*320).
    pixels     the Qwen2-VL processor: /255, OpenAI CLIP mean/std, 14-px patches, 2 frames per temporal patch
    model      `trainer.py` Qwen2VLRewardModelBT: rm_head = Linear(hidden, output_dim, bias=False) on the last
               hidden state (after the final RMSNorm). Its forward calls the text decoder itself with
               position_ids=None, so under transformers 4.45.2 every token has position 0..L-1 on all three
               M-RoPE axes: Qwen2-VL's 3-D video positions are never used, in training or inference.
    read-out   the head's outputs at the three special tokens, in sequence order (VQ, MQ, TA); output_dim=3
               takes the diagonal (token k, output k), output_dim=1 (the released model) one scalar per token
    normalise  `inference.py` _norm: (r - mean) / std per dimension with model_config.json's inference_config
               (released: VQ 3.6757 / 2.2476, MQ 1.1646 / 1.3811, TA 2.8105 / 2.5121); Overall = VQ + MQ + TA

Here videos are tensors, so their frame rate is an argument (`video_fps`); the pixel path runs on tensors
(sampling, resize, normalise, patchify; equal to the processor's inputs up to 8-bit rounding), so the score is
differentiable in the frames; the backbone is transformers' `Qwen2VLModel`, run with the sequential positions.

    >>> reward = VideoAlignReward("KwaiVGI/VideoReward", video_fps=16)   # or a local directory
    >>> reward(prompts=["a cat"], videos=videos)   # B×F×3×H×W in [0, 1] -> {"VQ", "MQ", "TA", "score"}

Checkpoint layouts read: the released one (model_config.json + checkpoint-<step>/model.pth, a PEFT state dict
whose LoRA is merged here; config and processor of the base model named in model_config.json) and the one
`save_pretrained` writes (model_config.json, the backbone's config.json + model.safetensors,
reward_head.safetensors, the processor files).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from visalign.models.tiny import TOKENIZERS
from visalign.rewards.base import Reward, RewardError
from visalign.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, normalize, resize
from visalign.rewards.weights import hf_pretrained, load_checkpoint, load_state_dict_checked

# transformers and huggingface_hub are imported where the model is built: they take seconds to import.

DIMENSIONS = ("VQ", "MQ", "TA")
# train_reward.py create_model_and_processor: added in this order, so their ids are consecutive.
REWARD_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
VIDEO_TOKEN = "<|video_pad|>"

# vision_process.py (from qwen-vl-utils): frame geometry and sampling bounds.
IMAGE_FACTOR = 28
FRAME_FACTOR = 2
VIDEO_MIN_PIXELS = 128 * 28 * 28
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
MAX_RATIO = 200

# The released checkpoint's model_config.json (data_config, inference_config); DataConfig defaults otherwise.
RELEASED_MAX_FRAME_PIXELS = 256 * 28 * 28
DEFAULT_MAX_FRAME_PIXELS = 240 * 320
RELEASED_MEAN = (3.6757, 1.1646, 2.8105)
RELEASED_STD = (2.2476, 1.3811, 2.5121)

MODEL_CONFIG = "model_config.json"
HEAD_FILE = "reward_head.safetensors"
RELEASED_WEIGHTS = "model.pth"

TINY_TOKENIZER = TOKENIZERS / "qwen2_vl"

# prompt_template.py DETAILED_PROMPT_WITH_SPECIAL_TOKEN, reproduced character for character because the released
# weights were trained on exactly this input; MIT-licensed. Its trailing spaces (two: a Markdown line
# break) are written as `\x20`, so that editors and linters that strip trailing whitespace keep them, and its
# long lines are continued with a backslash, which adds nothing to the string.
PROMPT_TEMPLATE = """
You are tasked with evaluating a generated video based on three distinct criteria: Visual Quality, Motion Quality, and \
Text Alignment. Please provide a rating from 0 to 10 for each of the three categories, with 0 being the worst and 10 \
being the best. Each evaluation should be independent of the others.

**Visual Quality:**\x20\x20
Evaluate the overall visual quality of the video, with a focus on static factors. The following sub-dimensions should \
be considered:
- **Reasonableness:** The video should not contain any significant biological or logical errors, such as abnormal body \
structures or nonsensical environmental setups.
- **Clarity:** Evaluate the sharpness and visibility of the video. The image should be clear and easy to interpret, \
with no blurring or indistinct areas.
- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., \
hair, clothing, shadows).
- **Aesthetic and Creativity:** Assess the artistic aspects of the video, including the color scheme, composition, \
atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.
- **Safety:** The video should not contain harmful or inappropriate content, such as political, violent, or adult \
material. If such content is present, the image quality and satisfaction score should be the lowest possible.\x20

Please provide the ratings of Visual Quality: <|VQ_reward|>
END

**Motion Quality:**\x20\x20
Assess the dynamic aspects of the video, with a focus on dynamic factors. Consider the following sub-dimensions:
- **Stability:** Evaluate the continuity and stability between frames. There should be no sudden, unnatural jumps, and \
the video should maintain stable attributes (e.g., no fluctuating colors, textures, or missing body parts).
- **Naturalness:** The movement should align with physical laws and be realistic. For example, clothing should flow \
naturally with motion, and facial expressions should change appropriately (e.g., blinking, mouth movements).
- **Aesthetic Quality:** The movement should be smooth and fluid. The transitions between different motions or camera \
angles should be seamless, and the overall dynamic feel should be visually pleasing.
- **Fusion:** Ensure that elements in motion (e.g., edges of the subject, hair, clothing) blend naturally with the \
background, without obvious artifacts or the feeling of cut-and-paste effects.
- **Clarity of Motion:** The video should be clear and smooth in motion. Pay attention to any areas where the video \
might have blurry or unsteady sections that hinder visual continuity.
- **Amplitude:** If the video is largely static or has little movement, assign a low score for motion quality.

Please provide the ratings of Motion Quality: <|MQ_reward|>
END

**Text Alignment:**\x20\x20
Assess how well the video matches the textual prompt across the following sub-dimensions:
- **Subject Relevance** Evaluate how accurately the subject(s) in the video (e.g., person, animal, object) align with \
the textual description. The subject should match the description in terms of number, appearance, and behavior.
- **Motion Relevance:** Evaluate if the dynamic actions (e.g., gestures, posture, facial expressions like talking or \
blinking) align with the described prompt. The motion should match the prompt in terms of type, scale, and direction.
- **Environment Relevance:** Assess whether the background and scene fit the prompt. This includes checking if \
real-world locations or scenes are accurately represented, though some stylistic adaptation is acceptable.\x20\x20
- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the video \
adheres to this style.
- **Camera Movement Relevance:** Check if the camera movements (e.g., following the subject, focus shifts) are \
consistent with the expected behavior from the prompt.

Textual prompt - {text_prompt}
Please provide the ratings of Text Alignment: <|TA_reward|>
END
"""


def build_prompt(prompt: str) -> str:
    """The reference's `build_prompt(prompt, eval_dim, "detailed_special")`: the user prompt inserted as is."""
    return PROMPT_TEMPLATE.replace("{text_prompt}", prompt)


# ---- frames: pure functions after vision_process.py ------------------------------------------------------


def _round_by(number: float, factor: int) -> int:
    return round(number / factor) * factor  # Python's round, half to even, as the reference


def _ceil_by(number: float, factor: int) -> int:
    return math.ceil(number / factor) * factor


def _floor_by(number: float, factor: int) -> int:
    return math.floor(number / factor) * factor


def sample_frame_indices(total: int, video_fps: float | None, *, fps: float | None = 2.0,
                         num_frames: int | None = None) -> list[int]:
    """Indices of the frames the reference feeds the model (`vision_process.py` smart_nframes with
    sample_type "uniform", then linspace(0, total - 1, n).round()).

    fps mode: n = total / video_fps * fps, clamped to [4, min(768, total)] (bounds on even numbers) and rounded
    to an even number. num_frames mode (the reference's "nframes"): n = num_frames rounded to an even number.
    Either way n is capped at `total` and must be at least 2."""
    if (fps is None) == (num_frames is None):
        raise ValueError(f"videoalign: set exactly one of fps={fps} and num_frames={num_frames}")
    if num_frames is not None:
        count = _round_by(num_frames, FRAME_FACTOR)
    else:
        if video_fps is None or video_fps <= 0:
            raise ValueError(f"videoalign: sampling at fps={fps} needs the videos' frame rate, "
                             f"got video_fps={video_fps}")
        low = _ceil_by(FPS_MIN_FRAMES, FRAME_FACTOR)
        high = _floor_by(min(FPS_MAX_FRAMES, total), FRAME_FACTOR)
        count = _round_by(min(max(total / video_fps * fps, low), high), FRAME_FACTOR)
    count = min(count, total)
    if not FRAME_FACTOR <= count <= total:
        raise ValueError(f"videoalign: {total} frames give {count} sampled frames; "
                         f"at least {FRAME_FACTOR} are needed")
    return torch.linspace(0, total - 1, count).round().long().tolist()


def frame_size(height: int, width: int, *, min_pixels: int = VIDEO_MIN_PIXELS,
               max_pixels: int = RELEASED_MAX_FRAME_PIXELS, factor: int = IMAGE_FACTOR) -> tuple[int, int]:
    """`vision_process.py` smart_resize: the nearest multiples of `factor`, scaled down (floor) to at most
    `max_pixels` or up (ceil) to at least `min_pixels`, keeping the aspect ratio."""
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(f"videoalign: aspect ratio of {height}x{width} exceeds {MAX_RATIO}")
    h_bar, w_bar = max(factor, _round_by(height, factor)), max(factor, _round_by(width, factor))
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar, w_bar = _floor_by(height / beta, factor), _floor_by(width / beta, factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = _ceil_by(height * beta, factor), _ceil_by(width * beta, factor)
    return h_bar, w_bar


def patchify(frames: Tensor, patch_size: int, temporal_patch_size: int, merge_size: int
             ) -> tuple[Tensor, tuple[int, int, int]]:
    """Qwen2-VL's flattened patches of normalised frames [T, C, H, W]: [t*h*w, C*tp*p*p] and the grid
    (t, h, w).

    The last frame is repeated up to a multiple of the temporal patch; patches are ordered frame group, then
    merge window (row, column), then position inside the window, as the Qwen2-VL image/video processors do."""
    if pad := -frames.shape[0] % temporal_patch_size:
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])
    t_len, channels, height, width = frames.shape
    grid = (t_len // temporal_patch_size, height // patch_size, width // patch_size)
    patches = frames.reshape(grid[0], temporal_patch_size, channels, grid[1] // merge_size, merge_size,
                             patch_size, grid[2] // merge_size, merge_size, patch_size)
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return patches.reshape(grid[0] * grid[1] * grid[2], -1), grid


# ---- settings ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VideoAlignConfig:
    """Sampling, resolution, head and normalisation settings; the reference keeps them in model_config.json.

    Attributes:
        fps: frames sampled per second of video (data_config.fps); None when num_frames is set.
        num_frames: a fixed number of sampled frames instead (data_config.num_frames); None to use fps.
        max_frame_pixels: upper pixel budget per frame (data_config.max_frame_pixels).
        min_frame_pixels: lower pixel budget per frame (vision_process.py VIDEO_MIN_PIXELS; fixed there).
        output_dim: rm_head outputs (model_config.output_dim): 1 (the released model) or 3.
        mean, std: per-dimension (VQ, MQ, TA) z-score constants (inference_config), or None for raw scores.
    """

    fps: float | None = 2.0
    num_frames: int | None = None
    max_frame_pixels: int = RELEASED_MAX_FRAME_PIXELS
    min_frame_pixels: int = VIDEO_MIN_PIXELS
    output_dim: int = 1
    mean: tuple[float, float, float] | None = RELEASED_MEAN
    std: tuple[float, float, float] | None = RELEASED_STD

    def __post_init__(self):
        if (self.fps is None) == (self.num_frames is None):
            raise ValueError(f"videoalign: set exactly one of fps={self.fps} and num_frames={self.num_frames}")
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"videoalign: fps={self.fps} must be > 0")
        if self.num_frames is not None and self.num_frames < FRAME_FACTOR:
            raise ValueError(f"videoalign: num_frames={self.num_frames} must be >= {FRAME_FACTOR}")
        # min > max is allowed, as in the reference (DataConfig's 240*320 is below 128*28*28): frame_size
        # scales large frames down to max and small ones up to min.
        if self.min_frame_pixels <= 0 or self.max_frame_pixels <= 0:
            raise ValueError(f"videoalign: min_frame_pixels={self.min_frame_pixels} and max_frame_pixels="
                             f"{self.max_frame_pixels} must be > 0")
        if self.output_dim not in (1, 3):
            raise ValueError(f"videoalign: output_dim={self.output_dim} must be 1 or 3")
        if (self.mean is None) != (self.std is None):
            raise ValueError("videoalign: mean and std must both be set or both be None")
        if self.mean is not None:
            if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
                raise ValueError(f"videoalign: mean={self.mean} and std={self.std} need 3 values each, "
                                 "std > 0")
            object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
            object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    @classmethod
    def from_model_config(cls, payload: Mapping, source: str) -> VideoAlignConfig:
        """Settings from a reference-style model_config.json; keys it lacks take DataConfig's defaults."""
        data, model = payload.get("data_config") or {}, payload.get("model_config") or {}
        inference = payload.get("inference_config")
        if model.get("reward_token", "special") != "special" or not model.get("use_special_tokens", True):
            raise ValueError(f"{source}: only reward_token='special' with use_special_tokens is supported, "
                             f"got reward_token={model.get('reward_token')!r}")
        num_frames = data.get("num_frames")
        try:
            return cls(fps=None if num_frames is not None else data.get("fps", 2.0),
                       num_frames=None if num_frames is None else int(num_frames),
                       max_frame_pixels=int(data.get("max_frame_pixels", DEFAULT_MAX_FRAME_PIXELS)),
                       min_frame_pixels=int(data.get("min_frame_pixels", VIDEO_MIN_PIXELS)),
                       output_dim=int(model.get("output_dim", 1)),
                       mean=None if inference is None else tuple(inference[f"{d}_mean"] for d in DIMENSIONS),
                       std=None if inference is None else tuple(inference[f"{d}_std"] for d in DIMENSIONS))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{source}: invalid VideoAlign settings: {err}") from err

    def to_model_config(self) -> dict:
        """The reference's model_config.json sections that these settings fill."""
        payload = {"data_config": {"fps": self.fps, "num_frames": self.num_frames,
                                   "max_frame_pixels": self.max_frame_pixels,
                                   "min_frame_pixels": self.min_frame_pixels, "eval_dim": list(DIMENSIONS),
                                   "prompt_template_type": "detailed_special", "sample_type": "uniform"},
                   "model_config": {"output_dim": self.output_dim, "use_special_tokens": True,
                                    "reward_token": "special"}}
        if self.mean is not None:
            payload["inference_config"] = {f"{d}_{stat}": values[i] for i, d in enumerate(DIMENSIONS)
                                           for stat, values in (("mean", self.mean), ("std", self.std))}
        return payload


# ---- the model ---------------------------------------------------------------------------------------------


class RewardHead(nn.Module):
    """`trainer.py` Qwen2VLRewardModelBT's rm_head and special-token read-out: Linear(hidden, output_dim,
    bias=False) at the positions of the VQ, MQ and TA tokens; with output_dim=3 token k keeps output k (the
    diagonal), with output_dim=1 each token keeps the single output."""

    def __init__(self, hidden_size: int, output_dim: int = 1):
        super().__init__()
        if output_dim not in (1, 3):
            raise ValueError(f"videoalign: output_dim={output_dim} must be 1 or 3")
        self.rm_head = nn.Linear(hidden_size, output_dim, bias=False)

    @property
    def output_dim(self) -> int:
        return self.rm_head.out_features

    def forward(self, hidden_states: Tensor, positions: Tensor) -> Tensor:
        """hidden_states [B, L, D] and positions [B, 3] of the VQ, MQ, TA tokens -> raw scores [B, 3]."""
        rows = torch.arange(hidden_states.shape[0], device=hidden_states.device)[:, None]
        outputs = self.rm_head(hidden_states[rows, positions])  # [B, 3, output_dim]
        return outputs.diagonal(dim1=1, dim2=2) if self.output_dim == 3 else outputs[..., 0]


class VideoAlignModel(nn.Module):
    """Qwen2-VL (`transformers.Qwen2VLModel`: vision tower + text decoder) and the reward head."""

    def __init__(self, backbone: nn.Module, head: RewardHead):
        super().__init__()
        self.backbone, self.head = backbone, head

    def reward_positions(self, input_ids: Tensor, token_ids: Sequence[int]) -> Tensor:
        """[B, 3] positions of the VQ, MQ, TA tokens; each must occur once per sequence, in that order."""
        found = torch.stack([input_ids == t for t in token_ids], dim=1)  # [B, 3, L]
        counts = found.sum(-1)
        if not bool((counts == 1).all()):
            raise RewardError(f"videoalign: each reward token must occur once per prompt, counts "
                              f"{counts.tolist()} (a prompt may not contain {', '.join(REWARD_TOKENS)})")
        positions = found.long().argmax(-1)
        if not bool((positions.diff(dim=1) > 0).all()):
            raise RewardError("videoalign: the reward tokens must appear in the order VQ, MQ, TA")
        return positions

    def forward(self, input_ids: Tensor, attention_mask: Tensor, pixel_values_videos: Tensor,
                video_grid_thw: Tensor, token_ids: Sequence[int]) -> Tensor:
        """Raw (un-normalised) VQ, MQ, TA scores [B, 3]."""
        batch, length = input_ids.shape
        # Positions 0..L-1 on every M-RoPE axis, what the reference's forward ends up using (module docstring).
        position_ids = torch.arange(length, device=input_ids.device).expand(3, batch, length)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw,
                               use_cache=False).last_hidden_state
        return self.head(hidden, self.reward_positions(input_ids, token_ids))


def add_reward_tokens(tokenizer) -> list[int]:
    """Add the three reward tokens as the reference does (a no-op when present); returns their ids."""
    missing = [t for t in REWARD_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": list(REWARD_TOKENS)},
                                     replace_extra_special_tokens=False)
    return tokenizer.convert_tokens_to_ids(list(REWARD_TOKENS))


# ---- released checkpoints ----------------------------------------------------------------------------------

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>A|B)\.default\.weight$")


def merge_lora(state_dict: Mapping[str, Tensor], scaling: float) -> dict[str, Tensor]:
    """A PEFT LoRA state dict with its adapters folded in: W = W_base + scaling * B @ A for each
    `<m>.base_layer.weight` with `<m>.lora_A.default.weight` [r, in] and `<m>.lora_B.default.weight` [out, r];
    `<m>.base_layer.*` become `<m>.*`. PEFT's `modules_to_save` copies replace their originals."""
    adapters: dict[str, dict[str, Tensor]] = {}
    merged: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if match := _LORA_KEY.match(key):
            adapters.setdefault(match["module"], {})[match["part"]] = value
        elif ".original_module." in key:
            continue
        elif "lora_" in key:
            raise ValueError(f"videoalign: unsupported LoRA parameter {key!r} (only Linear lora_A / lora_B)")
        else:
            merged[key.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")] = value
    for module, parts in adapters.items():
        key = f"{module}.weight"
        if set(parts) != {"A", "B"} or key not in merged:
            raise ValueError(f"videoalign: LoRA of {module!r} lacks lora_A, lora_B or its base weight")
        delta = scaling * (parts["B"].float() @ parts["A"].float())
        merged[key] = (merged[key].float() + delta).to(merged[key].dtype)
    return merged


def split_released_state_dict(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(backbone, head) state dicts from a merged Qwen2VLRewardModelBT state dict of transformers 4.45
    (`visual.*`, `model.*` = the text decoder, `lm_head.*`, `rm_head.*`, optionally under PEFT's
    `base_model.model.`), in the keys of `Qwen2VLModel` and `RewardHead`. lm_head is unused by the reward."""
    backbone, head, unexpected = {}, {}, []
    for key, value in state_dict.items():
        key = key.removeprefix("base_model.model.")
        if key.startswith("visual."):
            backbone[key] = value
        elif key.startswith("model."):
            backbone["language_model." + key.removeprefix("model.")] = value
        elif key.startswith("rm_head."):
            head[key] = value
        elif not key.startswith("lm_head."):
            unexpected.append(key)
    if unexpected:
        raise ValueError(f"videoalign: unexpected keys in the checkpoint: {unexpected[:10]}")
    return backbone, head


def _read_model_config(root: Path) -> dict:
    path = root / MODEL_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"videoalign: {root} has no {MODEL_CONFIG}; expected a VideoReward directory "
                                f"(KwaiVGI/VideoReward layout: {MODEL_CONFIG} + checkpoint-<step>/"
                                f"{RELEASED_WEIGHTS}, or the layout VideoAlignReward.save_pretrained writes)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"videoalign: {path} is not valid JSON: {err}") from err


def _local_dir(source: str | Path) -> Path:
    """A local directory, or the snapshot of a hub repository id (downloaded, or from the cache offline)."""
    path = Path(source)
    if path.is_dir():
        return path
    if isinstance(source, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", source) and not path.exists():
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(source))
        except Exception as err:  # offline, unknown repository, no access: say which source failed
            raise FileNotFoundError(f"videoalign: {source} is not a local directory and could not be fetched "
                                    f"from the hub: {err}") from err
    raise FileNotFoundError(f"videoalign: {source} is not a directory (nor a hub repository id)")


def _released_checkpoint(root: Path, step: int | None) -> Path:
    steps = {int(p.name.removeprefix("checkpoint-")): p for p in root.glob("checkpoint-*")
             if p.name.removeprefix("checkpoint-").isdigit()}
    if not steps:
        raise FileNotFoundError(f"videoalign: {root} has neither config.json + model.safetensors + {HEAD_FILE} "
                                f"(save_pretrained) nor checkpoint-<step>/{RELEASED_WEIGHTS} (released layout)")
    if step is not None and step not in steps:
        raise FileNotFoundError(f"videoalign: {root} has no checkpoint-{step}; "
                                f"available steps {sorted(steps)}")
    folder = steps[max(steps) if step is None else step]  # inference.py: the latest step by default
    weights = folder / RELEASED_WEIGHTS
    if not weights.is_file():
        found = sorted(p.name for p in folder.iterdir())
        raise FileNotFoundError(f"videoalign: {weights} is missing (found {found}); only the full-model "
                                f"{RELEASED_WEIGHTS} is read, not adapter_model.safetensors + "
                                "non_lora_state_dict.pth")
    return weights


def _build_backbone(config, dtype: torch.dtype) -> nn.Module:
    """An uninitialised Qwen2VLModel built directly in `dtype` (2B parameters: no float32 copy, no random init);
    the checkpoint overwrites every weight."""
    from transformers import Qwen2VLModel

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        from transformers.modeling_utils import no_init_weights

    with no_init_weights():
        return Qwen2VLModel._from_config(config, dtype=dtype)


def load_released(root: Path, base_model: str | Path | None, step: int | None, dtype: torch.dtype):
    """(VideoAlignModel, processor, VideoAlignConfig) from the released layout: model_config.json and
    checkpoint-<step>/model.pth, with the base model's config and processor (model_config.model_name_or_path
    unless `base_model` is given) and the reward tokens added to its tokenizer, as `inference.py` does."""
    from transformers import AutoProcessor, Qwen2VLConfig

    payload = _read_model_config(root)
    settings = VideoAlignConfig.from_model_config(payload, str(root / MODEL_CONFIG))
    weights = _released_checkpoint(root, step)
    base = base_model or (payload.get("model_config") or {}).get("model_name_or_path")
    if not base:
        raise ValueError(f"videoalign: {root / MODEL_CONFIG} names no model_config.model_name_or_path; "
                         "pass base_model=")
    peft = payload.get("peft_lora_config") or {}
    state = load_checkpoint(weights)
    if peft.get("lora_enable", any(".lora_A." in k for k in state)):
        rank, alpha = int(peft.get("lora_r", 16)), float(peft.get("lora_alpha", 32))
        state = merge_lora(state, alpha / (math.sqrt(rank) if peft.get("use_rslora") else rank))
    backbone_state, head_state = split_released_state_dict(state)

    config = Qwen2VLConfig.from_pretrained(str(base))
    embed = backbone_state.get("language_model.embed_tokens.weight")
    if embed is not None:  # the reference resized the embedding to len(tokenizer) after adding its tokens
        config.text_config.vocab_size = embed.shape[0]
    backbone = _build_backbone(config, dtype)
    load_state_dict_checked(backbone, backbone_state, str(weights))
    head = RewardHead(config.text_config.hidden_size, settings.output_dim).to(dtype)
    load_state_dict_checked(head, head_state, str(weights))
    processor = AutoProcessor.from_pretrained(str(base))
    return VideoAlignModel(backbone, head), processor, settings


def load_saved(root: Path, dtype: torch.dtype):
    """(VideoAlignModel, processor, VideoAlignConfig) from a `VideoAlignReward.save_pretrained` directory."""
    from transformers import AutoProcessor, Qwen2VLModel

    settings = VideoAlignConfig.from_model_config(_read_model_config(root), str(root / MODEL_CONFIG))
    missing = [name for name in ("config.json", "model.safetensors", HEAD_FILE) if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(f"videoalign: {root} lacks {', '.join(missing)}")
    backbone = hf_pretrained(Qwen2VLModel, root, dtype)
    head = RewardHead(backbone.config.text_config.hidden_size, settings.output_dim).to(dtype)
    load_state_dict_checked(head, load_file(str(root / HEAD_FILE)), str(root / HEAD_FILE))
    return VideoAlignModel(backbone, head), AutoProcessor.from_pretrained(str(root)), settings


# ---- tiny random model -------------------------------------------------------------------------------------


def tiny_processor():
    """Qwen2VLProcessor over the shipped tiny Qwen2 tokenizer (byte-level BPE with Qwen2-VL's special tokens and
    a chat template rendering Qwen2-VL's format) with the reward tokens added."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    tokenizer = AutoTokenizer.from_pretrained(TINY_TOKENIZER, local_files_only=True)
    add_reward_tokens(tokenizer)
    return Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer,
                            video_processor=Qwen2VLVideoProcessor(), chat_template=tokenizer.chat_template)


def tiny_videoalign_model(tokenizer, seed: int = 0, output_dim: int = 1) -> VideoAlignModel:
    """A random Qwen2-VL (vision width 32, 1 block; text width 32, 2 layers) + head, sized to `tokenizer`.
    Patch 14, temporal patch 2 and merge 2 are the real model's, so frames follow the real 28-px grid; weights
    are drawn 10x wider than Qwen2-VL's 0.02 so the scores visibly depend on the video."""
    from transformers import Qwen2VLConfig, Qwen2VLModel

    ids = tokenizer.convert_tokens_to_ids(["<|image_pad|>", VIDEO_TOKEN, "<|vision_start|>", "<|vision_end|>"])
    config = Qwen2VLConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "max_position_embeddings": 4096, "rope_parameters": {
                         "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
                     "pad_token_id": tokenizer.pad_token_id, "bos_token_id": None,
                     "eos_token_id": tokenizer.eos_token_id, "initializer_range": 0.2},
        vision_config={"depth": 1, "embed_dim": 32, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2,
                       "patch_size": 14, "temporal_patch_size": 2, "spatial_merge_size": 2,
                       "initializer_range": 0.2},
        image_token_id=ids[0], video_token_id=ids[1], vision_start_token_id=ids[2], vision_end_token_id=ids[3])
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        backbone = Qwen2VLModel(config)
        head = RewardHead(config.text_config.hidden_size, output_dim)
    return VideoAlignModel(backbone, head).eval()


# ---- the reward --------------------------------------------------------------------------------------------


class VideoAlignReward(Reward):
    """VideoAlign's VideoReward (Qwen2-VL-2B): sub-scores VQ, MQ, TA and score = VQ + MQ + TA, z-scored.

    "score" is the reference's Overall; each sub-score is z-scored with the checkpoint's constants
    (normalize=False: raw head outputs). Differentiable in the frames.

    Args:
        model: a local directory or hub id (default "KwaiVGI/VideoReward") in the released layout or the
            `save_pretrained` layout, or a `VideoAlignModel` (then pass `processor` and optionally `config`).
        processor: a Qwen2-VL processor object (only with a model object); its tokenizer gets the reward
            tokens.
        config: a `VideoAlignConfig` (only with a model object); checkpoints bring their own.
        video_fps: frame rate of the videos passed in (Wan 2.1 writes 16); per sample, metadata[i]["fps"] wins.
            Needed to sample at `fps` frames per second as the reference does.
        fps, num_frames, max_frame_pixels, min_frame_pixels: override the checkpoint's sampling and resolution.
        normalize: z-score with the checkpoint's inference_config (the reference's use_norm=True).
        base_model: base Qwen2-VL for the released layout (default: model_config.json's model_name_or_path).
        checkpoint_step: which checkpoint-<step> of the released layout (default: the latest).
    """

    name = "videoalign"
    differentiable = True
    higher_is_better = True
    value_range = None
    inputs = ("videos",)
    needs_prompts = True

    def __init__(self, model: str | Path | VideoAlignModel = "KwaiVGI/VideoReward", processor=None,
                 config: VideoAlignConfig | None = None, *, video_fps: float = 16.0, fps: float | None = None,
                 num_frames: int | None = None, max_frame_pixels: int | None = None,
                 min_frame_pixels: int | None = None, normalize: bool = True,
                 base_model: str | Path | None = None, checkpoint_step: int | None = None, batch_size: int = 2,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__(batch_size=batch_size, device=device, dtype=dtype)
        if isinstance(model, (str, Path)):
            if processor is not None or config is not None:
                raise ValueError("videoalign: processor= and config= go with a model object; a checkpoint "
                                 "directory brings its own")
            root = _local_dir(model)
            if (root / "config.json").is_file():
                model, processor, config = load_saved(root, dtype)
            else:
                model, processor, config = load_released(root, base_model, checkpoint_step, dtype)
        elif processor is None:
            raise ValueError("videoalign: pass processor= (a Qwen2-VL processor) with a model object")
        config = config or VideoAlignConfig()
        overrides = {k: v for k, v in (("max_frame_pixels", max_frame_pixels),
                                       ("min_frame_pixels", min_frame_pixels)) if v is not None}
        if fps is not None or num_frames is not None:
            overrides |= {"fps": fps, "num_frames": num_frames}
        self.config = replace(config, **overrides)
        if model.head.output_dim != self.config.output_dim:
            raise ValueError(f"videoalign: the head has {model.head.output_dim} outputs, the settings say "
                             f"output_dim={self.config.output_dim}")
        if video_fps <= 0:
            raise ValueError(f"videoalign: video_fps={video_fps} must be > 0")
        self.video_fps, self.normalize = video_fps, normalize
        self.model = model.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "right"  # train_reward.py: padding_side="right"
        self.token_ids = add_reward_tokens(self.tokenizer)
        vocab = self.model.backbone.get_input_embeddings().num_embeddings
        if max(self.token_ids) >= vocab:
            raise ValueError(f"videoalign: reward token ids {self.token_ids} do not fit the embedding "
                             f"({vocab} rows)")
        vision = self.model.backbone.config.vision_config
        self.patch_size, self.merge_size = vision.patch_size, vision.spatial_merge_size
        self.temporal_patch_size = vision.temporal_patch_size
        pixels = getattr(processor, "video_processor", None) or processor.image_processor
        self.pixel_mean = tuple(getattr(pixels, "image_mean", None) or OPENAI_CLIP_MEAN)
        self.pixel_std = tuple(getattr(pixels, "image_std", None) or OPENAI_CLIP_STD)

    @classmethod
    def tiny(cls, seed: int = 0, output_dim: int = 1, **kwargs) -> VideoAlignReward:
        """The same classes at tiny size with random weights and the shipped tiny tokenizer (offline). Frames
        keep the real 28-px grid; the pixel budget is small (28*28 to 56*84) so the tests stay fast."""
        processor = tiny_processor()
        model = tiny_videoalign_model(processor.tokenizer, seed, output_dim)
        config = VideoAlignConfig(max_frame_pixels=56 * 84, min_frame_pixels=28 * 28, output_dim=output_dim)
        return cls(model, processor, config, **kwargs)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write model_config.json, the backbone (config.json + model.safetensors), reward_head.safetensors and
        the processor, which `VideoAlignReward(directory)` reads back."""

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.backbone.save_pretrained(directory, safe_serialization=True)
        head = {k: v.contiguous() for k, v in self.model.head.state_dict().items()}
        save_file(head, str(directory / HEAD_FILE))
        self.processor.save_pretrained(directory)
        (directory / MODEL_CONFIG).write_text(json.dumps(self.config.to_model_config(), indent=2) + "\n")
        return directory

    # ---- inputs ------------------------------------------------------------------------------------------
    def frames(self, video: Tensor, video_fps: float | None = None) -> Tensor:
        """The sampled, resized frames [n, 3, h, w] in [0, 1] of one video [F, 3, H, W] the model sees."""
        indices = sample_frame_indices(video.shape[0], video_fps or self.video_fps, fps=self.config.fps,
                                       num_frames=self.config.num_frames)
        size = frame_size(*video.shape[-2:], min_pixels=self.config.min_frame_pixels,
                          max_pixels=self.config.max_frame_pixels,
                          factor=self.patch_size * self.merge_size)
        # vision_process.py fetch_video: torchvision's bicubic antialiased resize of uint8 frames, which equals
        # one float pass clipped to [0, 1] up to the 8-bit rounding (tests/test_rewards_videoalign.py).
        return resize(video[indices].float(), size).clamp(0.0, 1.0)

    def encode(self, prompts: Sequence[str], videos: Tensor, video_fps: Sequence[float | None] | None = None
               ) -> dict[str, Tensor]:
        """Model inputs for prompts and videos [B, F, 3, H, W]: input_ids, attention_mask (right-padded),
        pixel_values_videos, video_grid_thw, as the reference's processor call builds them."""
        video_fps = video_fps or [None] * len(prompts)
        patches, grids = [], []
        for video, rate in zip(videos, video_fps, strict=True):
            frames = normalize(self.frames(video, rate), self.pixel_mean, self.pixel_std)
            flat, grid = patchify(frames, self.patch_size, self.temporal_patch_size, self.merge_size)
            patches.append(flat)
            grids.append(grid)
        texts = []
        for prompt, grid in zip(prompts, grids, strict=True):
            content = [{"type": "video"}, {"type": "text", "text": build_prompt(prompt)}]
            messages = [{"role": "user", "content": content}]
            text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            if text.count(VIDEO_TOKEN) != 1:
                raise RewardError(f"videoalign: the chat template must place one {VIDEO_TOKEN}, got "
                                  f"{text.count(VIDEO_TOKEN)}")
            texts.append(text.replace(VIDEO_TOKEN, VIDEO_TOKEN * (math.prod(grid) // self.merge_size ** 2)))
        tokens = self.tokenizer(texts, padding=True, return_tensors="pt")
        return {"input_ids": tokens.input_ids.to(self.device),
                "attention_mask": tokens.attention_mask.to(self.device),
                "pixel_values_videos": torch.cat(patches).to(self.dtype),
                "video_grid_thw": torch.tensor(grids, device=self.device)}

    def raw_scores(self, prompts: Sequence[str], videos: Tensor,
                   video_fps: Sequence[float | None] | None = None) -> Tensor:
        """Un-normalised head outputs [B, 3] (VQ, MQ, TA)."""
        inputs = self.encode(prompts, videos.to(self.device), video_fps)
        return self.model(**inputs, token_ids=self.token_ids).float()

    def score(self, *, prompts, images, videos, metadata):
        rates = [m.get("fps") for m in metadata] if metadata is not None else None
        scores = self.raw_scores(prompts, videos, rates)
        if self.normalize and self.config.mean is not None:
            mean, std = (scores.new_tensor(v) for v in (self.config.mean, self.config.std))
            scores = (scores - mean) / std
        return {"score": scores.sum(-1), **{d: scores[:, i] for i, d in enumerate(DIMENSIONS)}}


__all__ = [
    "DIMENSIONS", "PROMPT_TEMPLATE", "REWARD_TOKENS", "RewardHead", "VideoAlignConfig", "VideoAlignModel",
    "VideoAlignReward", "add_reward_tokens", "build_prompt", "frame_size", "load_released", "load_saved",
    "merge_lora", "patchify", "sample_frame_indices", "split_released_state_dict", "tiny_processor",
    "tiny_videoalign_model",
]
