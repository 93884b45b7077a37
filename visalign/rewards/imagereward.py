"""ImageReward (Xu et al. 2023, arXiv:2304.05977), rebuilt so the score is differentiable from pixels.

The released model (THUDM/ImageReward, `ImageReward/ImageReward.py`) is BLIP's ViT-L/16 image encoder, BLIP's
BERT text encoder cross-attending to every image token (`models/BLIP/med.py`, mode "multimodal"), the hidden
state of the first text token ([CLS]) through a 5-layer linear MLP, and a z-score with released constants:

    reward = (mlp(text_encoder(prompt, image_tokens)[:, 0]) - 0.16717362830052426) / 1.0333394966054072

Here the ViT is timm's `VisionTransformer` (BLIP's `vit.py` is a fork of it: same parameter names, LayerNorm
eps 1e-6, GELU, pre-norm blocks, final norm over all tokens) and the text encoder is transformers'
`BlipTextModel` (a port of BLIP's `med.py` with the same parameter names and a 1024-wide cross-attention
key/value). The released checkpoint `ImageReward.pt` loads through an explicit key map; preprocessing runs on
tensors so gradients reach the input pixels.

    >>> reward = ImageReward(checkpoint="ImageReward.pt", tokenizer="path/to/bert-base-uncased")
    >>> reward(prompts=["a cat"], images=images)   # images B×3×H×W in [0, 1] -> Tensor[B]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from visalign.models.tiny import TOKENIZERS
from visalign.rewards.base import Reward
from visalign.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clip_preprocess

# transformers and timm are imported where the model is built: each takes seconds to import.

# ImageReward/ImageReward.py: ImageReward.__init__ (self.mean, self.std).
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
# ImageReward/ImageReward.py: tokenizer(..., padding="max_length", truncation=True, max_length=35).
MAX_TEXT_TOKENS = 35

TINY_TOKENIZER = TOKENIZERS / "bert"

# Released key prefix -> prefix in ImageRewardModel.
_KEY_PREFIXES = (
    ("blip.visual_encoder.", "visual_encoder."),
    ("blip.text_encoder.", "text_encoder."),
    ("mlp.layers.", "mlp."),
)
# In ImageReward.pt but unused by the score: BLIP's contrastive projections, and the position-id buffer that
# older transformers saved (it is always arange and non-persistent in BlipTextModel).
_UNUSED_PREFIXES = ("blip.vision_proj.", "blip.text_proj.")
_UNUSED_KEYS = ("blip.text_encoder.embeddings.position_ids",)


@dataclass(frozen=True)
class ImageRewardConfig:
    """Sizes of the model; the defaults are the released ImageReward-v1.0 (BLIP ViT-L at 224 px, BERT-base)."""

    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 1024
    vision_depth: int = 24
    vision_heads: int = 16
    text_width: int = 768
    text_depth: int = 12
    text_heads: int = 12
    text_intermediate: int = 3072
    vocab_size: int = 30524  # bert-base-uncased 30522 + BLIP's [DEC] and [ENC]
    max_positions: int = 512
    max_text_tokens: int = MAX_TEXT_TOKENS

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} must be a multiple of patch_size={self.patch_size}")
        if self.max_text_tokens > self.max_positions:
            raise ValueError(f"max_text_tokens={self.max_text_tokens} exceeds max_positions={self.max_positions}")

    @classmethod
    def tiny(cls, vocab_size: int) -> ImageRewardConfig:
        """A few-thousand-parameter configuration of the same architecture, for tests."""
        return cls(image_size=32, patch_size=8, vision_width=32, vision_depth=2, vision_heads=2, text_width=32,
                   text_depth=2, text_heads=2, text_intermediate=64, vocab_size=vocab_size, max_positions=64)


def blip_tokenizer(path: str | Path):
    """The BERT tokenizer in local directory `path`, with the two tokens BLIP adds (`models/BLIP/blip.py`,
    `init_tokenizer`): "[DEC]" as the bos token, then "[ENC]" as an additional special token."""
    from transformers import BertTokenizer

    if not Path(path).is_dir():
        raise ValueError(f"imagereward: tokenizer={str(path)!r} must be a local directory holding the "
                         "bert-base-uncased tokenizer files (vocab.txt)")
    tokenizer = BertTokenizer.from_pretrained(str(path), local_files_only=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def preprocess(images: Tensor, size: int) -> Tensor:
    """ImageReward's `_transform(size)` on tensors in [0, 1]: short side to `size` (bicubic, antialiased, the
    long side truncated as torchvision does), centre crop size×size, OpenAI CLIP normalisation.

    The reference resizes 8-bit PIL images, which clips the bicubic overshoot between the two resampling passes;
    `clamp=True` does the same, leaving about one grey level of difference (8-bit rounding)."""
    # ImageReward/ImageReward.py `_transform`: Resize(n, BICUBIC), CenterCrop(n), OpenAI CLIP mean/std.
    return clip_preprocess(images, size, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, clamp=True)


class ImageRewardModel(nn.Module):
    """BLIP ViT + BLIP text encoder with cross-attention + the reward MLP; returns the raw (un-normalised) reward."""

    def __init__(self, config: ImageRewardConfig):
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer
        from transformers import BlipTextConfig
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        self.config = config
        # models/BLIP/blip.py create_vit: qkv bias, mlp ratio 4; vit.py VisionTransformer: LayerNorm eps 1e-6.
        self.visual_encoder = VisionTransformer(
            img_size=config.image_size, patch_size=config.patch_size, embed_dim=config.vision_width,
            depth=config.vision_depth, num_heads=config.vision_heads, mlp_ratio=4.0, qkv_bias=True, num_classes=0)
        # med_config.json with encoder_width = vision width. BlipTextModel builds the cross-attention layers when
        # is_decoder=True; forward(is_decoder=False) keeps the self-attention bidirectional, as in med.py.
        text_config = BlipTextConfig(
            vocab_size=config.vocab_size, hidden_size=config.text_width, encoder_hidden_size=config.vision_width,
            intermediate_size=config.text_intermediate, num_hidden_layers=config.text_depth,
            num_attention_heads=config.text_heads, max_position_embeddings=config.max_positions,
            hidden_act="gelu", layer_norm_eps=1e-12, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            pad_token_id=0, bos_token_id=None, sep_token_id=None, is_decoder=True)
        self.text_encoder = BlipTextModel(text_config, add_pooling_layer=False)
        # ImageReward.py MLP: linear layers only (the ReLUs are commented out); dropout keeps the key indices.
        self.mlp = nn.Sequential(
            nn.Linear(config.text_width, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Raw reward [B] for normalised pixels B×3×S×S and token ids/mask B×L (ImageReward.py `score_gard`)."""
        image_tokens = self.visual_encoder.forward_features(pixels)
        text = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                                 encoder_hidden_states=image_tokens, is_decoder=False)
        return self.mlp(text.last_hidden_state[:, 0]).squeeze(-1)


def _to_model_key(key: str) -> str | None:
    for released, own in _KEY_PREFIXES:
        if key.startswith(released):
            return own + key[len(released):]
    return None


def _to_released_key(key: str) -> str:
    for released, own in _KEY_PREFIXES:
        if key.startswith(own):
            return released + key[len(own):]
    raise KeyError(key)


def released_state_dict(model: ImageRewardModel) -> dict[str, Tensor]:
    """The weights of `model` under the key names of the released `ImageReward.pt`."""
    return {_to_released_key(k): v for k, v in model.state_dict().items()}


def load_released_state_dict(model: ImageRewardModel, state_dict: Mapping[str, Tensor]) -> None:
    """Load weights in the released key layout (`blip.visual_encoder.*`, `blip.text_encoder.*`,
    `mlp.layers.*`) into `model`. Missing, unknown or wrongly shaped keys raise a ValueError naming them."""
    own = model.state_dict()
    mapped, seen, unexpected, mismatched = {}, set(), [], []
    for key, value in state_dict.items():
        if key in _UNUSED_KEYS or key.startswith(_UNUSED_PREFIXES):
            continue
        target = _to_model_key(key)
        if target is None or target not in own:
            unexpected.append(key)
            continue
        seen.add(target)
        if not isinstance(value, Tensor) or value.shape != own[target].shape:
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            mismatched.append(f"{key} (checkpoint {got}, model {tuple(own[target].shape)})")
        else:
            mapped[target] = value
    missing = [_to_released_key(k) for k in own if k not in seen]
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch: {', '.join(mismatched)}")
    if problems:
        raise ValueError("imagereward checkpoint does not fit the model configuration; " + "; ".join(problems))
    model.load_state_dict(mapped, strict=True)


def read_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """A flat state dict from `ImageReward.pt` (torch.load, weights only) or a .safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"imagereward: checkpoint {str(path)!r} is not a file (download ImageReward.pt from the "
                         "THUDM/ImageReward hub repo and pass its local path)")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"imagereward: {path} holds a {type(state_dict).__name__}, expected a state dict")
    return dict(state_dict)


class ImageReward(Reward):
    """ImageReward-v1.0 human-preference score, a z-score (typically about -2 to +1), differentiable.

    Args:
        checkpoint: path to the released `ImageReward.pt` (or a .safetensors with the same keys), or a state
            dict in that key layout.
        tokenizer: local directory with the bert-base-uncased tokenizer (vocab.txt); BLIP's [DEC] and [ENC]
            are added to it as BLIP does.
        config: model sizes; defaults to the released model. `ImageReward.tiny()` builds a tiny random one.

    Prompts are truncated to 35 BERT tokens, as in the reference. Images of any size are resized (short side)
    and centre-cropped to 224 on tensors. The weights are frozen; gradients flow to the pixels.
    """

    name = "imagereward"
    differentiable = True
    higher_is_better = True
    value_range = None
    inputs = ("images",)
    needs_prompts = True

    def __init__(self, checkpoint: str | Path | Mapping[str, Tensor], tokenizer: str | Path,
                 config: ImageRewardConfig | None = None, batch_size: int = 8, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        super().__init__(batch_size=batch_size, device=device, dtype=dtype)
        self.config = config or ImageRewardConfig()
        self.tokenizer = blip_tokenizer(tokenizer)
        if len(self.tokenizer) > self.config.vocab_size:
            raise ValueError(f"imagereward: tokenizer has {len(self.tokenizer)} tokens but the model's "
                             f"vocab_size is {self.config.vocab_size}")
        state_dict = checkpoint if isinstance(checkpoint, Mapping) else read_checkpoint(checkpoint)
        model = ImageRewardModel(self.config)
        load_released_state_dict(model, state_dict)
        self.model = model.to(device=self.device, dtype=dtype).eval().requires_grad_(False)

    @classmethod
    def tiny(cls, seed: int = 0, **kwargs) -> ImageReward:
        """The same classes at tiny size with random weights and the shipped tiny BERT vocabulary (offline)."""
        vocab_size = len(blip_tokenizer(TINY_TOKENIZER))
        config = ImageRewardConfig.tiny(vocab_size=vocab_size)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = ImageRewardModel(config)
        return cls(checkpoint=released_state_dict(model), tokenizer=TINY_TOKENIZER, config=config, **kwargs)

    def tokenize(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Token ids and attention mask B×35. The first token stays [CLS]: ImageReward's `score` does not swap in
        [ENC] (BLIP's image-text-matching head does)."""
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                                max_length=self.config.max_text_tokens, return_tensors="pt")
        return tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)

    def score(self, *, prompts, images, videos, metadata) -> Tensor:
        pixels = preprocess(images.to(self.device), self.config.image_size).to(self.dtype)
        input_ids, attention_mask = self.tokenize(prompts)
        raw = self.model(pixels, input_ids, attention_mask)
        return (raw.float() - REWARD_MEAN) / REWARD_STD


__all__ = ["ImageReward", "ImageRewardConfig", "ImageRewardModel", "blip_tokenizer", "load_released_state_dict",
           "preprocess", "read_checkpoint", "released_state_dict"]
