"""CLIP-family rewards: LAION aesthetic, PickScore, HPSv2 / HPSv2.1, CLIPScore and VLM-RM.

All are differentiable in the pixels (tensor preprocessing from `visalign.rewards.preprocess`, frozen weights, no
`no_grad` on the image path) and load their weights once, from local files or hub ids:

    >>> r = LaionAesthetic(head="sac+logos+ava1-l14-linearMSE.pth")  # CLIP ViT-L/14 + MLP head, 1-10
    >>> r = PickScore()                                               # logit_scale.exp() * cos, ~20-23
    >>> r = HPSv2(checkpoint="HPS_v2_compressed.pt")                  # cos of open_clip ViT-H-14, ~0.2-0.35
    >>> r = CLIPScore(form="hessel")                                  # 2.5 * max(cos, 0)
    >>> r = VLMRM(baseline="a photo", alpha=0.5)                      # goal-baseline projected CLIP, [-1, 1]
    >>> r(prompts=["a cat"], images=images)                           # Tensor[B]

Every class has `.tiny(seed)`: the same model classes at a few ten thousand random parameters with the
tokenizer shipped in `visalign/assets/tiny_tokenizers/clip`, for tests and offline use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visalign.models.tiny import TOKENIZERS
from visalign.rewards.base import Reward, RewardError
from visalign.rewards.preprocess import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    clip_preprocess,
    hpsv2_preprocess,
    normalize,
    resize,
)
from visalign.rewards.weights import hf_model_and_processor, hf_pretrained, load_checkpoint, load_state_dict_checked

# Model libraries (transformers, open_clip, huggingface_hub) are imported where a model is built: each takes
# seconds to import, and the registry, option checks and other rewards need none of them.

# ---- checkpoints -------------------------------------------------------------------------------------------


def _freeze(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Eval mode, no parameter gradients (gradients still reach the inputs), on device in dtype."""
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _tiny_tokenizer_dir() -> Path:
    return TOKENIZERS / "clip"


def _unique(prompts: Sequence[str]) -> tuple[list[str], Tensor]:
    """Distinct prompts (GRPO groups repeat them) and the index of each prompt among them."""
    distinct = list(dict.fromkeys(prompts))
    position = {p: i for i, p in enumerate(distinct)}
    return distinct, torch.tensor([position[p] for p in prompts], dtype=torch.long)


# ---- Hugging Face CLIP (PickScore, CLIPScore, the aesthetic backbone) -------------------------------------


def tiny_hf_clip(seed: int = 0, projection_dim: int = 16, image_size: int = 32):
    """A random `transformers.CLIPModel` (~54k parameters) whose text side fits the tiny CLIP tokenizer."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={"vocab_size": 514, "hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4,
                     "num_hidden_layers": 2, "max_position_embeddings": 77, "bos_token_id": 512,
                     "eos_token_id": 513, "pad_token_id": 513, "projection_dim": projection_dim},
        vision_config={"image_size": image_size, "patch_size": 8, "hidden_size": 32, "intermediate_size": 37,
                       "num_attention_heads": 4, "num_hidden_layers": 2, "projection_dim": projection_dim},
        projection_dim=projection_dim)
    return CLIPModel(config).eval()


def tiny_hf_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(_tiny_tokenizer_dir())


def _hf_image_embeds(model, pixel_values: Tensor) -> Tensor:
    """L2-normalised projected image embedding `visual_projection(vision_model(x).pooler_output)`: that is
    `CLIPModel.get_image_features`, `CLIPVisionModelWithProjection.image_embeds`, OpenAI's `encode_image`."""
    pooled = model.vision_model(pixel_values=pixel_values).pooler_output
    return F.normalize(model.visual_projection(pooled), dim=-1)


class _HFCLIPReward(Reward):
    """Shared by PickScore and CLIPScore: a frozen HF `CLIPModel`, its tokenizer, CLIP preprocessing."""

    differentiable = True
    crop_rounding = "floor"  # HF CLIPImageProcessor

    def __init__(self, model, tokenizer, *, batch_size: int = 32, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        super().__init__(batch_size=batch_size, device=device, dtype=dtype)
        from transformers import AutoTokenizer, CLIPModel

        self.model, self.tokenizer = hf_model_and_processor(model, tokenizer, CLIPModel, AutoTokenizer, dtype=dtype,
                                                            device=self.device, label=self.name)
        self.image_size = self.model.config.vision_config.image_size
        self.max_length = self.model.config.text_config.max_position_embeddings  # 77: CLIP truncates there

    def image_embeds(self, images: Tensor) -> Tensor:
        """L2-normalised image embeddings [B, D] of images in [0, 1]; differentiable."""
        pixels = clip_preprocess(images.to(self.device), self.image_size, crop_rounding=self.crop_rounding,
                                 clamp=True)
        return _hf_image_embeds(self.model, pixels.to(self.dtype))

    @torch.no_grad()
    def text_embeds(self, prompts: Sequence[str]) -> Tensor:
        """L2-normalised text embeddings [B, D] (`CLIPModel.get_text_features`, truncated at 77 tokens)."""
        distinct, index = _unique(prompts)
        tokens = self.tokenizer(distinct, padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(self.device)
        text = self.model.text_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        pooled = text.pooler_output
        return F.normalize(self.model.text_projection(pooled), dim=-1)[index.to(self.device)]

    def cosine(self, prompts: Sequence[str], images: Tensor) -> Tensor:
        return (self.image_embeds(images) * self.text_embeds(prompts)).sum(-1).float()


class PickScore(_HFCLIPReward):
    """PickScore (Kirstain et al. 2023; yuvalkirstain/PickScore README): `logit_scale.exp() * cos(text,
    image)` with a fine-tuned CLIP ViT-H/14 and the `laion/CLIP-ViT-H-14-laion2B-s32B-b79K` processor (short
    side to 224, centre crop with HF's floor offset, OpenAI mean/std, 77 tokens). Raw values are about 20-23;
    `divide_by_26=True` applies flow_grpo's normalisation (`flow_grpo/pickscore_scorer.py`)."""

    name = "pickscore"

    def __init__(self, model="yuvalkirstain/PickScore_v1",
                 tokenizer="laion/CLIP-ViT-H-14-laion2B-s32B-b79K", *, divide_by_26: bool = False,
                 **reward_kwargs):
        super().__init__(model, tokenizer, **reward_kwargs)
        self.divide_by_26 = divide_by_26

    @classmethod
    def tiny(cls, seed: int = 0, **kwargs) -> PickScore:
        return cls(model=tiny_hf_clip(seed), tokenizer=tiny_hf_tokenizer(), **kwargs)

    def score(self, *, prompts, images, videos, metadata):
        scores = self.model.logit_scale.exp().float() * self.cosine(prompts, images)
        return scores / 26.0 if self.divide_by_26 else scores


class CLIPScore(_HFCLIPReward):
    """CLIPScore, the clamped image-text cosine of a CLIP model, per sample, in two forms (`form`).

    form="hessel":       2.5 * max(cos, 0) with the caption prefixed "A photo depicts " and ViT-B/32
                         (Hessel et al. 2021, Eq. 1; jmhessel/clipscore `clipscore.py`; OpenAI preprocessing,
                         torchvision centre-crop offset). Range [0, 2.5].
    form="torchmetrics": 100 * max(cos, 0), no prefix, ViT-L/14 (torchmetrics `functional/multimodal/
                         clip_score.py`; HF processor geometry). Range [0, 100]. torchmetrics clamps the batch
                         mean, not each sample; the mean of these scores equals it when no cosine is negative.
    """

    name = "clipscore"
    # form: (weight, caption prefix, default model, centre-crop rounding)
    FORMS: ClassVar[dict[str, tuple]] = {
        "hessel": (2.5, "A photo depicts ", "openai/clip-vit-base-patch32", "round"),
        "torchmetrics": (100.0, "", "openai/clip-vit-large-patch14", "floor"),
    }

    def __init__(self, model=None, tokenizer=None, *, form: str = "torchmetrics", prefix: str | None = None,
                 **reward_kwargs):
        if form not in self.FORMS:
            raise ValueError(f"clipscore: form must be one of {sorted(self.FORMS)}, got {form!r}")
        self.weight, default_prefix, default_model, self.crop_rounding = self.FORMS[form]
        super().__init__(default_model if model is None else model, tokenizer, **reward_kwargs)
        self.form = form
        self.prefix = default_prefix if prefix is None else prefix
        self.value_range = (0.0, self.weight)

    @classmethod
    def tiny(cls, seed: int = 0, **kwargs) -> CLIPScore:
        return cls(model=tiny_hf_clip(seed), tokenizer=tiny_hf_tokenizer(), **kwargs)

    def score(self, *, prompts, images, videos, metadata):
        cosine = self.cosine([self.prefix + p for p in prompts], images)
        return self.weight * cosine.clamp(min=0.0)


# ---- LAION improved aesthetic predictor --------------------------------------------------------------------


class AestheticHead(nn.Module):
    """christophschuhmann/improved-aesthetic-predictor `simple_inference.py` MLP: 768→1024→128→64→16→1 with
    Dropout(0.2, 0.2, 0.1) and no activations, so one affine map at eval. Keys `layers.{0,2,4,6,7}.*` as in
    `sac+logos+ava1-l14-linearMSE.pth`. `hidden` changes only for tiny test heads."""

    def __init__(self, in_dim: int = 768, hidden: Sequence[int] = (1024, 128, 64, 16)):
        super().__init__()
        h1, h2, h3, h4 = hidden
        self.layers = nn.Sequential(
            nn.Linear(in_dim, h1), nn.Dropout(0.2), nn.Linear(h1, h2), nn.Dropout(0.2),
            nn.Linear(h2, h3), nn.Dropout(0.1), nn.Linear(h3, h4), nn.Linear(h4, 1))

    def forward(self, embeds: Tensor) -> Tensor:
        return self.layers(embeds)


class LaionAesthetic(Reward):
    """LAION improved aesthetic predictor v2: the MLP head on the L2-normalised OpenAI CLIP ViT-L/14 image
    embedding, about 1-10 (affine in the embedding, so not strictly bounded). Preprocessing is OpenAI CLIP's:
    short side to 224 (bicubic), centre crop with torchvision's offset, OpenAI mean/std.

    Args:
        head: the head weights (`sac+logos+ava1-l14-linearMSE.pth`, .pth or .safetensors) or an AestheticHead.
        clip: a local dir / hub id of a CLIP checkpoint (its vision tower and projection are loaded as
            `CLIPVisionModelWithProjection`), or a loaded `CLIPModel` / `CLIPVisionModelWithProjection`.
        head_hidden: hidden sizes of a head loaded from a file; the released head's are the default.
    """

    name = "aesthetic"
    differentiable = True
    needs_prompts = False

    def __init__(self, head: str | Path | nn.Module | None = None, clip="openai/clip-vit-large-patch14", *,
                 head_hidden: Sequence[int] = (1024, 128, 64, 16), batch_size: int = 32,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__(batch_size=batch_size, device=device, dtype=dtype)
        if head is None:
            raise ValueError("aesthetic: pass head= the path of sac+logos+ava1-l14-linearMSE.pth "
                             "(christophschuhmann/improved-aesthetic-predictor) or an AestheticHead")
        if isinstance(clip, (str, Path)):
            from transformers import CLIPVisionModelWithProjection

            clip = hf_pretrained(CLIPVisionModelWithProjection, clip, dtype)
        self.clip = _freeze(clip, self.device, dtype)
        embed_dim = self.clip.config.projection_dim
        if isinstance(head, (str, Path)):
            module = AestheticHead(embed_dim, head_hidden)
            load_state_dict_checked(module, load_checkpoint(head), str(head))
            head = module
        # The reference runs the head in float32 on the normalised embedding, whatever the CLIP precision.
        self.head = _freeze(head, self.device, torch.float32)
        vision_config = getattr(self.clip.config, "vision_config", self.clip.config)
        self.image_size = vision_config.image_size

    @classmethod
    def tiny(cls, seed: int = 0, **kwargs) -> LaionAesthetic:
        clip = tiny_hf_clip(seed)
        torch.manual_seed(seed)
        return cls(head=AestheticHead(clip.config.projection_dim, (16, 8, 8, 4)), clip=clip, **kwargs)

    def image_embeds(self, images: Tensor) -> Tensor:
        pixels = clip_preprocess(images.to(self.device), self.image_size, crop_rounding="round", clamp=True)
        return _hf_image_embeds(self.clip, pixels.to(self.dtype))

    def score(self, *, prompts, images, videos, metadata):
        return self.head(self.image_embeds(images).float()).squeeze(-1)


# ---- HPSv2 / HPSv2.1 (open_clip ViT-H-14) ------------------------------------------------------------------

# A tiny open_clip CLIP (~78k parameters) for `create_model("ViT-H-14", **TINY_OPEN_CLIP_CFG)`; its vocabulary
# fits the tiny CLIP tokenizer (eos 513 is the largest id, as open_clip's argmax text pooling needs).
TINY_OPEN_CLIP_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 514, "width": 32, "heads": 4, "layers": 2},
}


def tiny_open_clip(seed: int = 0) -> nn.Module:
    import open_clip

    torch.manual_seed(seed)
    return open_clip.create_model("ViT-H-14", **TINY_OPEN_CLIP_CFG).eval()


def tiny_open_clip_tokenizer() -> Callable[[list[str]], Tensor]:
    from open_clip.tokenizer import HFTokenizer

    return HFTokenizer(str(_tiny_tokenizer_dir()), context_length=77)


class HPSv2(Reward):
    """Human Preference Score v2 (Wu et al. 2023; tgxs002/HPSv2 `hpsv2/img_score.py`): open_clip ViT-H-14
    with the released fine-tuned `state_dict`, score = normalised image features · normalised text features
    (no logit scale; about 0.2-0.35, tables multiply by 100). Preprocessing is `preprocess_val`: long side to
    224, zero-pad to a square, OpenAI mean/std (`visalign.rewards.preprocess.hpsv2_preprocess`). The reference runs
    under fp16 autocast; this runs in `dtype` (float32 by default).

    Args:
        checkpoint: local `HPS_v2_compressed.pt` ({'state_dict': ...}) or a .safetensors state dict. None:
            `hf_hub_download(hub_repo, <released file>)` (served from the local cache when offline).
        model: an open_clip CLIP to use instead of building `create_model("ViT-H-14", **model_cfg)`; with
            checkpoint=None it is used as it is.
        model_cfg: overrides of the ViT-H-14 config passed to `open_clip.create_model` (tiny tests).
        tokenizer: callable list[str] -> LongTensor[B, 77]; default `open_clip.get_tokenizer("ViT-H-14")`.
        antialias: of the tensor resize; False reproduces torchvision < 0.17 (see `hpsv2_preprocess`).
    """

    name = "hpsv2"
    differentiable = True
    value_range = (-1.0, 1.0)
    checkpoint_file = "HPS_v2_compressed.pt"

    def __init__(self, checkpoint: str | Path | None = None, *, model: nn.Module | None = None,
                 model_cfg: dict | None = None, tokenizer: Callable | None = None,
                 hub_repo: str = "xswu/HPSv2", antialias: bool = True, batch_size: int = 32,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__(batch_size=batch_size, device=device, dtype=dtype)
        import open_clip

        if model is None:
            model = open_clip.create_model("ViT-H-14", **(model_cfg or {}))
            if checkpoint is None:
                from huggingface_hub import hf_hub_download

                checkpoint = hf_hub_download(hub_repo, self.checkpoint_file)
        if checkpoint is not None:
            load_state_dict_checked(model, load_checkpoint(checkpoint), str(checkpoint))
        self.model = _freeze(model, self.device, dtype)
        self.tokenizer = tokenizer if tokenizer is not None else open_clip.get_tokenizer("ViT-H-14")
        size = self.model.visual.image_size
        self.image_size = size if isinstance(size, int) else size[0]
        self.antialias = antialias

    @classmethod
    def tiny(cls, seed: int = 0, **kwargs) -> HPSv2:
        return cls(model=tiny_open_clip(seed), tokenizer=tiny_open_clip_tokenizer(), **kwargs)

    def image_embeds(self, images: Tensor) -> Tensor:
        pixels = hpsv2_preprocess(images.to(self.device), self.image_size, antialias=self.antialias)
        return self.model.encode_image(pixels.to(self.dtype), normalize=True)

    @torch.no_grad()
    def text_embeds(self, prompts: Sequence[str]) -> Tensor:
        distinct, index = _unique(prompts)
        tokens = self.tokenizer(distinct).to(self.device)
        return self.model.encode_text(tokens, normalize=True)[index.to(self.device)]

    def score(self, *, prompts, images, videos, metadata):
        return (self.image_embeds(images) * self.text_embeds(prompts)).sum(-1).float()


class HPSv21(HPSv2):
    """HPSv2.1: the same model and formula with `HPS_v2.1_compressed.pt`; not comparable with v2.0 scores."""

    name = "hpsv2.1"
    checkpoint_file = "HPS_v2.1_compressed.pt"


# ---- VLM-RM (open_clip, the reference's backbone) ------------------------------------------------------------


def goal_baseline_reward(x: Tensor, goal: Tensor, baseline: Tensor, alpha: float) -> Tensor:
    """VLM-RM's goal-baseline regularised CLIP reward (Rocamonde et al. 2023, "Vision-Language Models are Zero-Shot
    Reward Models for Reinforcement Learning", arXiv 2310.12921, "Goal-Baseline Regularization"; AlignmentResearch/
    vlmrm `src/vlmrm/reward_model.py:CLIPReward.forward`):

        R = 1 - 1/2 ||(x - g) P||^2,  P = alpha d d^T / ||d||^2 + (1 - alpha) I,  d = g - b,

    i.e. 1 - 1/2 ||alpha proj_L x + (1 - alpha) x - g||^2 with L the line through b and g. `x` [B, D] are the
    images' normalised embeddings, `goal` and `baseline` [B, D] or [D]. P is symmetric, so (x - g) P is computed
    as its two terms, without the D x D matrix."""
    direction = goal - baseline
    diff = x - goal
    along = (diff * direction).sum(-1, keepdim=True) / direction.pow(2).sum(-1, keepdim=True) * direction
    projected = alpha * along + (1 - alpha) * diff
    return 1 - 0.5 * projected.pow(2).sum(-1)


def vlmrm_preprocess(images: Tensor, size: int, *, antialias: bool = True) -> Tensor:
    """VLM-RM's transform (`vlmrm/contrib/open_clip/transform.py`): `Resize((size, size), BICUBIC)` on the float
    tensor, a squash to size x size (its `CenterCrop` is then a no-op), and OpenAI CLIP's mean/std. `antialias=False`
    reproduces torchvision < 0.17, whose tensor resize did not antialias."""
    return normalize(resize(images, (size, size), antialias=antialias), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)


class VLMRM(Reward):
    """VLM-RM (Rocamonde et al. 2023, arXiv 2310.12921): CLIP as a zero-shot reward, with goal-baseline
    regularisation that projects the image's embedding onto the baseline-to-goal direction by `alpha`.

    R = 1 - 1/2 ||(x - g) P||^2 with P = alpha d d^T / ||d||^2 + (1 - alpha) I, d = g - b, and x, g, b the
    normalised CLIP embeddings of the image, the goal and the baseline prompt (`goal_baseline_reward`).

    alpha = 0 is the plain CLIP reward 1 - 1/2 ||x - g||^2, cos(x, g) for a single goal prompt; alpha = 1 keeps only
    the component along the baseline-to-goal direction. Several goal or baseline prompts are averaged after
    normalising, not renormalised, as the reference does (`CLIPReward.__init__`). In [-1, 1]; differentiable.

    Args:
        goal: the goal prompt(s); None: each sample's own prompt (its text-to-image condition).
        baseline: the baseline prompt(s), a description of the setting without the goal (the paper's "a humanoid
            robot" for "a humanoid robot kneeling"); needed when alpha > 0.
        alpha: the projection's strength, in [0, 1].
        model: open_clip architecture name, or an open_clip CLIP module (used as it is).
        pretrained: open_clip pretrained tag or a local checkpoint file for `model` (the reference's README config:
            ViT-g-14 / laion2b_s34b_b88k); served from the local cache when offline.
        tokenizer: callable list[str] -> LongTensor[B, 77]; default `open_clip.get_tokenizer(model)`.
        antialias: of the tensor resize (`vlmrm_preprocess`).
    """

    name = "vlm-rm"
    differentiable = True
    value_range = (-1.0, 1.0)

    def __init__(self, goal: str | Sequence[str] | None = None, baseline: str | Sequence[str] | None = None,
                 alpha: float = 0.0, *, model: str | nn.Module = "ViT-g-14", pretrained: str = "laion2b_s34b_b88k",
                 tokenizer: Callable | None = None, antialias: bool = True, batch_size: int = 32,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.validate_options({"goal": goal, "baseline": baseline, "alpha": alpha})
        super().__init__(batch_size=batch_size, device=device, dtype=dtype)
        import open_clip

        if tokenizer is None:  # a module's: CLIP's BPE tokenizer, open_clip's default
            tokenizer = open_clip.get_tokenizer(model if isinstance(model, str) else "ViT-B-32")
        if isinstance(model, str):
            model = open_clip.create_model(model, pretrained=pretrained)
        self.model = _freeze(model, self.device, dtype)
        self.tokenizer = tokenizer
        size = self.model.visual.image_size
        self.image_size = size if isinstance(size, int) else size[0]
        self.alpha, self.antialias = float(alpha), antialias
        self.needs_prompts = goal is None
        self.goal = None if goal is None else self.prompt_embedding(goal)
        self.baseline = None if baseline is None else self.prompt_embedding(baseline)

    @classmethod
    def validate_options(cls, options) -> None:
        alpha = options.get("alpha", 0.0)
        if not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise ValueError(f"vlm-rm: alpha={alpha!r} must be a number in [0, 1]")
        for key in ("goal", "baseline"):
            value = options.get(key)
            prompts = isinstance(value, str) or isinstance(value, (list, tuple)) and value and all(
                isinstance(p, str) for p in value)
            if value is not None and not prompts:
                raise ValueError(f"vlm-rm: {key}={value!r} must be a prompt or a non-empty list of prompts")
        if alpha > 0 and options.get("baseline") is None:
            raise ValueError(f"vlm-rm: alpha={alpha} projects onto the baseline-to-goal direction; give baseline= "
                             "(a prompt or list of prompts), or alpha=0 for the plain CLIP reward")

    @classmethod
    def tiny(cls, seed: int = 0, **kwargs) -> VLMRM:
        return cls(model=tiny_open_clip(seed), tokenizer=tiny_open_clip_tokenizer(), **kwargs)

    def image_embeds(self, images: Tensor) -> Tensor:
        """Normalised image embeddings x [B, D] of images in [0, 1]; differentiable."""
        pixels = vlmrm_preprocess(images.to(self.device), self.image_size, antialias=self.antialias)
        return self.model.encode_image(pixels.to(self.dtype), normalize=True).float()

    @torch.no_grad()
    def text_embeds(self, prompts: Sequence[str]) -> Tensor:
        """Normalised text embeddings [B, D]."""
        distinct, index = _unique(prompts)
        tokens = self.tokenizer(distinct).to(self.device)
        return self.model.encode_text(tokens, normalize=True).float()[index.to(self.device)]

    def prompt_embedding(self, prompts: str | Sequence[str]) -> Tensor:
        """The mean of the prompts' normalised embeddings [D] (not renormalised, as the reference)."""
        return self.text_embeds([prompts] if isinstance(prompts, str) else list(prompts)).mean(0)

    def score(self, *, prompts, images, videos, metadata):
        x = self.image_embeds(images)
        goal = self.text_embeds(prompts) if self.goal is None else self.goal
        if self.alpha == 0:  # P = I: the baseline plays no part (and may be absent)
            return 1 - 0.5 * (x - goal).pow(2).sum(-1)
        if ((goal - self.baseline).norm(dim=-1) < 1e-4).any():  # the same text up to float rounding
            raise RewardError(f"{self.name}: a goal embedding equals the baseline's, so there is no direction to "
                              "project on; choose a baseline that differs from every goal prompt")
        return goal_baseline_reward(x, goal, self.baseline, self.alpha)


__all__ = [
    "TINY_OPEN_CLIP_CFG", "VLMRM", "AestheticHead", "CLIPScore", "HPSv2", "HPSv21", "LaionAesthetic", "PickScore",
    "goal_baseline_reward", "load_checkpoint", "load_state_dict_checked", "tiny_hf_clip", "tiny_hf_tokenizer",
    "tiny_open_clip", "tiny_open_clip_tokenizer", "vlmrm_preprocess",
]
