"""The world's base model: a small pixel-space UNet (diffusers `UNet2DConditionModel`) with a small CLIP text
encoder (transformers `CLIPTextModel`) over a word-level tokenizer of the world's vocabulary, exposed through
the same `FlowModelAdapter` interface as SD3/FLUX/Wan so trainers and steering use one code path.

Why a UNet and pixels: a probe on this 2-core CPU drew clean shapes with a ~1.8M-parameter UNet after 3
minutes, while a DiT of similar size still drew patch noise after 20 minutes; at 32x32 a VAE buys nothing.
Two coordinate channels are appended to the input so the network can tell left from right cheaply.

The video variant (`WorldVideoAdapter`) is the same UNet class over frames stacked on channels (9 frames x 3
colours in, 27 out): on 2 CPU cores one step costs about the same as the image model's, where a tiny
`WanTransformer3DModel` costs 2.5x, AnimateDiff's per-frame UNet about 26x per clip and a 3-D UNet
(`UNet3DConditionModel`) about 30x (measured; README); at 9 frames of 32x32 every frame fits in the receptive
field, so motion is a per-pixel pattern across channels.
`build_networks(..., denoiser="wan" | "motion")` builds those alternatives (a tiny Wan transformer over pixel
patches, AnimateDiff's per-frame UNet with temporal attention) for pretraining experiments; none is shipped.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from visalign.models.base import Conditioning, FlowModelAdapter, RequestRules
from visalign.world.grammar import VOCABULARY
from visalign.world.motion import MOTION_VOCABULARY

# diffusers, transformers and tokenizers are imported where the networks are built: they take seconds to
# import, and the grammar, renderer and verifier users of this package need none of them.

CANVAS = 32
MAX_TOKENS = 16
SPECIAL = ("<pad>", "<unk>", "<bos>", "<eos>")
SHIPPED = Path(__file__).resolve().parents[1] / "assets" / "world" / "base.safetensors"
SHIPPED_VIDEO = Path(__file__).resolve().parents[1] / "assets" / "world" / "video_base.safetensors"

UNET_CONFIG = {
    "sample_size": CANVAS, "in_channels": 5, "out_channels": 3, "layers_per_block": 1,
    "block_out_channels": (32, 64, 128),
    "down_block_types": ("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 64, "attention_head_dim": 16, "norm_num_groups": 8,
    "class_embed_type": "projection", "projection_class_embeddings_input_dim": 64,
}
VIDEO_BLOCK_CHANNELS = (64, 96, 128)  # a wider first level: it carries 27 channels of frames
# A tiny Wan video transformer over pixels (the same class as Wan2.1): 4x4-pixel patches of every frame are tokens,
# and 3-D RoPE gives attention a bias for where a patch was in the previous frames (README, "Video: is the gain real?").
WAN_VIDEO_CONFIG = {"patch_size": (1, 4, 4), "num_attention_heads": 4, "attention_head_dim": 32, "in_channels": 3,
                    "out_channels": 3, "text_dim": 64, "freq_dim": 64, "ffn_dim": 384, "num_layers": 4,
                    "rope_max_seq_len": 64}
# AnimateDiff's layout (diffusers UNetMotionModel): the image model's UNet run on every frame, with cross-attention on
# the two lower levels, plus a temporal-attention motion module after every block; coordinates per frame as before.
MOTION_UNET_CONFIG = {**{k: v for k, v in UNET_CONFIG.items()
                         if k not in ("class_embed_type", "projection_class_embeddings_input_dim")},
                      "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")}
MOTION_ADAPTER_CONFIG = {"block_out_channels": UNET_CONFIG["block_out_channels"], "motion_layers_per_block": 1,
                         "motion_num_attention_heads": 4, "motion_norm_num_groups": 8, "motion_max_seq_length": 16,
                         "use_motion_mid_block": True}
DENOISERS = ("unet", "wan", "motion")
TEXT_CONFIG = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2,
               "max_position_embeddings": MAX_TOKENS, "projection_dim": 64}


def world_vocab(video: bool = False) -> dict[str, int]:
    words = list(SPECIAL) + sorted(MOTION_VOCABULARY if video else VOCABULARY)
    return {w: i for i, w in enumerate(words)}


def build_tokenizer(vocab: dict[str, int]):
    """A word-level fast tokenizer (tokenizers' WordLevel model): the world's prompts are whole words."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<bos>", eos_token="<eos>", model_max_length=MAX_TOKENS)


def check_denoiser(denoiser: str, video: bool) -> None:
    """A known denoiser, and only the UNet for the image world."""
    if denoiser not in DENOISERS:
        raise ValueError(f"denoiser={denoiser!r} not allowed; choose from {', '.join(DENOISERS)}")
    if denoiser != "unet" and not video:
        raise ValueError(f"denoiser={denoiser!r} applies to the video world only (video: true)")


def build_networks(seed: int = 0, vocab: dict[str, int] | None = None, frames: int | None = None,
                   token_embedding_std: float | None = None, denoiser: str = "unet"):
    """Fresh (random) denoiser and text encoder; `frames` builds the video variant: frames stacked on the UNet's
    channels, or with `denoiser="wan"` a tiny `WanTransformer3DModel` that sees every frame's patches as tokens, or
    with `denoiser="motion"` a per-frame UNet with temporal attention (`UNetMotionModel`, AnimateDiff's layout).

    `token_embedding_std` re-draws the word embeddings at that scale (CLIP's own init is 0.02). With CLIP's init the
    layers' outputs soon dominate the residual stream, and pretraining the video model squashed its direction words
    together (the trained encoder's states for "moving left" and "moving right" closer than at initialisation) while
    colours stayed apart; larger word embeddings keep every word's identity in its token's state (README, "The video
    world")."""
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel, WanTransformer3DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    check_denoiser(denoiser, video=frames is not None)
    vocab = vocab or world_vocab(video=frames is not None)
    torch.manual_seed(seed)
    if denoiser == "wan":
        unet = WanTransformer3DModel(**WAN_VIDEO_CONFIG)
    elif denoiser == "motion":
        unet = UNetMotionModel.from_unet2d(UNet2DConditionModel(**MOTION_UNET_CONFIG),
                                           MotionAdapter(**MOTION_ADAPTER_CONFIG))
    else:
        unet = UNet2DConditionModel(**(UNET_CONFIG if frames is None else {
            **UNET_CONFIG, "in_channels": 3 * frames + 2, "out_channels": 3 * frames,
            "block_out_channels": VIDEO_BLOCK_CHANNELS}))
    text_config = CLIPTextConfig(vocab_size=len(vocab), pad_token_id=vocab["<pad>"], bos_token_id=vocab["<bos>"],
                                 eos_token_id=vocab["<eos>"], **{k: v for k, v in TEXT_CONFIG.items()})
    text_encoder = CLIPTextModel(text_config)
    if token_embedding_std is not None:
        if token_embedding_std <= 0:
            raise ValueError(f"token_embedding_std={token_embedding_std} must be > 0")
        weight = text_encoder.embeddings.token_embedding.weight
        generator = torch.Generator().manual_seed(seed + 7)  # its own: every other weight is drawn as without it
        with torch.no_grad():
            weight.copy_(torch.randn(weight.shape, generator=generator) * token_embedding_std)
    return unet, text_encoder


class WorldAdapter(FlowModelAdapter):
    """The shapes-world model. Pixel space: latents are images in [-1, 1], shape [B, 3, 32, 32]."""

    name = "world"
    default_size = CANVAS
    guidance = "cfg"
    cfg_batched = True
    frames: int | None = None
    shipped = SHIPPED
    # Attention kernel of bf16 passes that build a graph on CPU (None: PyTorch's choice). At these sizes PyTorch's
    # CPU flash-attention backward in bf16 costs about 12x its forward; the math kernel makes such a training pass
    # 1.35-1.5x faster, while fp32 training and no-grad passes are as fast or faster with flash
    # (bench/world_attention.py).
    grad_attention = SDPBackend.MATH

    def __init__(self, unet, text_encoder, vocab: dict[str, int] | None = None, shift: float = 1.0):
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.denoiser = unet
        self.text_encoder = text_encoder
        self.source: Path | None = None  # the file from_pretrained read
        self.vocab = vocab or world_vocab(video=self.frames is not None)
        self.tokenizer = build_tokenizer(self.vocab)
        self.scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
        self.text_encoder.requires_grad_(False)

    def text_encoders(self):
        return {"text_encoder": self.text_encoder} if self.text_encoder is not None else {}

    def _drop_text_encoder(self, name):
        self.text_encoder = None

    # ---- construction / persistence ------------------------------------------------------------------
    @classmethod
    def random(cls, seed: int = 0, token_embedding_std: float | None = None, denoiser: str = "unet") -> WorldAdapter:
        return cls(*build_networks(seed, frames=cls.frames, token_embedding_std=token_embedding_std,
                                   denoiser=denoiser))

    @property
    def denoiser_kind(self) -> str:
        """Which of `DENOISERS` this is (what checkpoints record and loading rebuilds)."""
        return {"WanTransformer3DModel": "wan", "UNetMotionModel": "motion"}.get(type(self.denoiser).__name__, "unet")

    @property
    def default_lora_targets(self) -> tuple[str, ...]:
        if self.denoiser_kind == "wan":  # attention and feed-forward projections of every block
            return ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")
        if self.denoiser_kind == "motion":  # spatial and temporal attention, and the per-frame convolutions
            return ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")
        return ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in", "proj_out")

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device="cpu", torch_dtype=torch.float32,
                        **_) -> WorldAdapter:
        """Load a checkpoint written by `save_pretrained` (default: the shipped base model)."""

        path = Path(path) if path is not None else cls.shipped
        if path.is_dir():
            path = path / "model.safetensors"
        if not path.exists():
            raise ValueError(f"world checkpoint {str(path)!r} does not exist")
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        frames = int(meta["frames"]) if "frames" in meta else None
        if frames != cls.frames:
            kind = f"a video model of {frames} frames" if frames else "an image model"
            raise ValueError(f"world checkpoint {str(path)!r} holds {kind}: load it with "
                             f"{'WorldVideoAdapter (model world-video)' if frames else 'WorldAdapter (model world)'}")
        vocab = json.loads(meta["vocab"]) if "vocab" in meta else world_vocab(video=frames is not None)
        kind = meta.get("denoiser", "unet")  # checkpoints before the Wan option hold a UNet
        unet, text_encoder = build_networks(0, vocab, frames, denoiser=kind)
        state = load_file(str(path))
        prefix = f"{kind}."
        if not any(k.startswith(prefix) for k in state) or not any(k.startswith("text_encoder.") for k in state):
            # e.g. a training checkpoint's model.safetensors: the trained denoiser alone, without the text encoder
            raise ValueError(f"world checkpoint {str(path)!r} holds no whole model ({prefix!r} and "
                             "'text_encoder.' weights); a run writes its whole model to final/model.safetensors "
                             "when it ends")
        unet.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        text_encoder.load_state_dict({k[13:]: v for k, v in state.items() if k.startswith("text_encoder.")})
        if torch_dtype != torch.float32:  # built in float32; casting (which diffusers warns about) only when asked
            unet, text_encoder = unet.to(torch_dtype), text_encoder.to(torch_dtype)
        adapter = cls(unet.to(device).eval(), text_encoder.to(device).eval(), vocab)
        adapter.source = path  # where save_pretrained reads the text encoder once it was freed
        return adapter

    def save_pretrained(self, path: str | Path, metadata: dict[str, str] | None = None,
                        dtype: torch.dtype | None = None) -> Path:
        """One safetensors file: denoiser and text-encoder weights (cast to `dtype` if given; loading casts back to
        the model's dtype) plus the vocabulary and the denoiser's kind in its metadata."""

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {f"{self.denoiser_kind}.{k}": v for k, v in self.denoiser.state_dict().items()}
        if self.text_encoder is not None:
            state.update({f"text_encoder.{k}": v for k, v in self.text_encoder.state_dict().items()})
        elif self.source is not None:  # freed after encoding (model.free_text_encoders): read the unchanged file
            with safe_open(str(self.source), "pt") as f:
                state.update({k: f.get_tensor(k) for k in f.keys() if k.startswith("text_encoder.")})  # noqa: SIM118
        else:
            raise ValueError("this world model's text encoder was freed and it was not loaded from a file: "
                             "nothing to save it from")
        state = {k: v.detach().to("cpu", dtype if dtype is not None and v.is_floating_point() else v.dtype)
                 .contiguous() for k, v in state.items()}
        meta = {"vocab": json.dumps(self.vocab), "denoiser": self.denoiser_kind,
                **({"frames": str(self.frames)} if self.frames else {})}
        save_file(state, str(path), metadata={**meta, **(metadata or {})})
        return path

    # ---- interface -----------------------------------------------------------------------------------
    @property
    def size_multiple(self) -> int:
        return CANVAS

    @classmethod
    def request_rules(cls, path=None) -> RequestRules:
        """Every world checkpoint draws one canvas (and the video model one clip length)."""
        return RequestRules(cls.name, 1, cls.is_video, size=(CANVAS, CANVAS), frames=cls.frames)

    @property
    def rules(self) -> RequestRules:
        return self.request_rules()

    def latent_shape(self, height, width, num_frames=None):
        self.check_request(height, width, num_frames)
        return (3, CANVAS, CANVAS)

    def sigmas(self, num_steps, latent_shape):
        if num_steps < 1:
            raise ValueError(f"num_steps={num_steps} must be >= 1")
        self.scheduler.set_timesteps(num_steps, device="cpu")
        return self.scheduler.sigmas.detach().float().clone()

    def check_prompts(self, prompts: list[str]) -> None:
        unknown = sorted({w for p in prompts for w in p.split() if w not in self.vocab})
        if unknown:  # a few, each cut short: the message may be logged, and a prompt may be huge
            shown = ", ".join(w if len(w) <= 24 else w[:24] + "…" for w in unknown[:8])
            more = f" and {len(unknown) - 8} more" if len(unknown) > 8 else ""
            raise ValueError(f"words outside the world's vocabulary: {shown}{more}; "
                             f"allowed: {', '.join(w for w in self.vocab if w not in SPECIAL)}")

    def tokenize(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        self.check_prompts(prompts)
        enc = self.tokenizer(list(prompts), padding="max_length", max_length=MAX_TOKENS, truncation=True,
                             return_tensors="pt")
        return enc.input_ids.to(self.device), enc.attention_mask.to(self.device)

    def text_features(self, prompts: list[str]) -> dict[str, Tensor]:
        ids, mask = self.tokenize(prompts)
        out = self.text_encoder(input_ids=ids, attention_mask=mask)
        return {"encoder_hidden_states": out.last_hidden_state, "pooled": out.pooler_output,
                "encoder_attention_mask": mask}

    def encode_prompts(self, prompts, negative_prompts=None, cfg=True):
        prompts = list(prompts)
        with torch.no_grad():
            cond = self.text_features(prompts)
            uncond = self.text_features(list(negative_prompts) if negative_prompts else [""] * len(prompts)) \
                if cfg else None
        return Conditioning(cond, uncond, prompts)

    @staticmethod
    def coords(batch: int, device, dtype) -> Tensor:
        lin = torch.linspace(-1, 1, CANVAS, device=device, dtype=dtype)
        yy, xx = torch.meshgrid(lin, lin, indexing="ij")
        return torch.stack([xx, yy]).expand(batch, 2, CANVAS, CANVAS)

    def attention_kernel(self, latents: Tensor):
        """The scaled-dot-product-attention context of a denoiser pass: `grad_attention` for a bf16 training pass
        on CPU (bf16 latents or CPU autocast to bf16), PyTorch's choice otherwise."""
        bf16 = latents.dtype == torch.bfloat16 or (torch.is_autocast_enabled("cpu")
                                                   and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        if self.grad_attention is not None and latents.device.type == "cpu" and torch.is_grad_enabled() and bf16:
            return sdpa_kernel([self.grad_attention])
        return nullcontext()

    def _velocity(self, latents, sigma, embeds, guidance_scale):
        b = latents.shape[0]
        x = torch.cat([latents, self.coords(b, latents.device, latents.dtype)], dim=1)
        with self.attention_kernel(latents):
            return self.net(x, sigma * 1000, encoder_hidden_states=embeds["encoder_hidden_states"].to(latents.dtype),
                            class_labels=embeds["pooled"].to(latents.dtype),
                            encoder_attention_mask=embeds["encoder_attention_mask"], return_dict=False)[0]

    def decode(self, latents):
        return (latents.float() / 2 + 0.5).clamp(0, 1)

    def encode(self, pixels, generator=None):
        return pixels.float() * 2 - 1

    # ---- LoRA: no diffusers pipeline owns this model, so use ModelMixin's own adapter files -------------
    def save_lora(self, directory, adapter_name: str = "default") -> Path:
        self.denoiser.save_lora_adapter(str(directory), adapter_name=adapter_name)
        return Path(directory) / "pytorch_lora_weights.safetensors"

    def load_lora(self, path, adapter_name: str = "default") -> None:
        path = Path(path)
        if not path.exists():
            raise ValueError(f"LoRA path {str(path)!r} does not exist")
        directory, weight_name = (path, "pytorch_lora_weights.safetensors") if path.is_dir() \
            else (path.parent, path.name)
        self.denoiser.load_lora_adapter(str(directory), weight_name=weight_name, adapter_name=adapter_name,
                                        prefix=None, use_safetensors=True)
        self.denoiser.requires_grad_(False)


class WorldVideoAdapter(WorldAdapter):
    """The moving-shapes world's video model (`visalign.world.motion`): latents are clips in [-1, 1] laid out
    like every video adapter's, [B, 3, F, 32, 32]; the UNet sees the F frames stacked on channels."""

    name = "world-video"
    is_video = True
    frames = 9
    shipped = SHIPPED_VIDEO


    def latent_shape(self, height, width, num_frames=None):
        self.check_request(height, width, num_frames)
        return (3, self.frames, CANVAS, CANVAS)

    def _velocity(self, latents, sigma, embeds, guidance_scale):
        b = latents.shape[0]
        if self.denoiser_kind == "wan":
            # Wan cross-attends to every text position (no mask argument), so padding states are zeroed, as
            # Wan2.1's own pipeline pads its T5 states with zeros.
            mask = embeds["encoder_attention_mask"][..., None].to(latents.dtype)
            return self.net(hidden_states=latents, timestep=sigma * 1000,
                            encoder_hidden_states=embeds["encoder_hidden_states"].to(latents.dtype) * mask,
                            return_dict=False)[0]
        if self.denoiser_kind == "motion":
            # Every frame with its coordinates; the prompt's states repeated per frame, unmasked, as AnimateDiff's
            # pipeline passes SD's CLIP states (diffusers pipelines/animatediff/pipeline_animatediff.py).
            coords = self.coords(b, latents.device, latents.dtype)[:, :, None].expand(b, 2, self.frames, CANVAS, CANVAS)
            states = embeds["encoder_hidden_states"].to(latents.dtype).repeat_interleave(self.frames, 0)
            return self.net(torch.cat([latents, coords], dim=1), sigma * 1000, encoder_hidden_states=states,
                            return_dict=False)[0]
        stacked = latents.transpose(1, 2).reshape(b, 3 * self.frames, CANVAS, CANVAS)  # frame-major channels
        v = super()._velocity(stacked, sigma, embeds, guidance_scale)
        return v.reshape(b, self.frames, 3, CANVAS, CANVAS).transpose(1, 2)

    def decode(self, latents):
        """[B, 3, F, H, W] latents -> [B, F, 3, H, W] frames in [0, 1]."""
        return (latents.float().transpose(1, 2) / 2 + 0.5).clamp(0, 1)

    def encode(self, pixels, generator=None):
        """[B, F, 3, H, W] frames in [0, 1] -> [B, 3, F, H, W] latents."""
        return pixels.float().transpose(1, 2) * 2 - 1


def load_world(path=None, torch_dtype=torch.float32, device="cpu", **_) -> WorldAdapter:
    """`load_model("world")`: the image model (default: the shipped base)."""
    return WorldAdapter.from_pretrained(path, device=device, torch_dtype=torch_dtype)


def load_world_video(path=None, torch_dtype=torch.float32, device="cpu", **_) -> WorldVideoAdapter:
    """`load_model("world-video")`: the video model (default: the shipped video base)."""
    return WorldVideoAdapter.from_pretrained(path, device=device, torch_dtype=torch_dtype)


load_world.request_rules = WorldAdapter.request_rules  # what configs are checked against before loading
load_world_video.request_rules = WorldVideoAdapter.request_rules
