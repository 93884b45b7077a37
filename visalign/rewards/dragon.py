"""A distribution-level reward after DRAGON: how close a group of samples' embeddings lie to an exemplar set's.

DRAGON (Bai et al. 2025, "DRAGON: Distributional Rewards Optimize Diffusion Generative Models", arXiv:2504.15217)
optimises rewards of a *set* of generations, e.g. the Fréchet distance of their embeddings to a reference set's,
built from an encoder and exemplars. Here, for each prompt group S of a training step and the exemplar images E:

    set reward   R(S) = -MMD²_u(φ(S), φ(E))        φ: an image embedding (thumbnails or CLIP)
    credit       c_i  = R(S) - R(S \\ {i})          sample i's leave-one-out contribution to its group's reward
    score        s_i  = R(S) + c_i - mean_S c       the group's mean is R(S); differences within it are the credits'

Group-relative advantages, best-of-N and DPO pairs read differences within a group, so they see the credits: a
sample that pulls its group toward the exemplars (a missing mode) outranks one that repeats what the group already
has. Logs, the hacking alarm and evaluation read means, so they see R(S). DRAGON turns a set reward into training
signal by contrasting positive and negative sets of on-policy samples; the leave-one-out credit is this module's
per-sample form of that contrast (the paper's own construction of those sets for a dataset-level reward was not
checked against its text here).

Why MMD and not the Fréchet distance: a group holds G ~ 4-24 samples, far fewer than an embedding's dimensions,
so its covariance, which the Fréchet distance compares, is singular. The unbiased MMD² (Gretton et al. 2012, "A
Kernel Two-Sample Test", JMLR 13, Eq. 3: MMD²_u) with an RBF kernel has no such need and no bias in the set size,
so groups of different sizes, and a group against its own leave-one-out sets, compare fairly. It needs two samples
a set, hence groups of at least three. The kernel width defaults to the median distance between exemplars (the
median heuristic, Gretton et al. 2012, Sec. 8), fixed once so that every group is measured on one scale.

    >>> r = DistributionReward(exemplars="exemplars/")               # a directory of images, thumbnail features
    >>> out = r(images=images, groups=torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]))
    >>> out["score"], out["set"], out["credit"]                      # [B] each
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from visalign.media import read_image
from visalign.rewards.base import Reward
from visalign.rewards.clip_family import _hf_image_embeds, tiny_hf_clip
from visalign.rewards.preprocess import clip_preprocess
from visalign.rewards.video import ThumbnailFeatures
from visalign.rewards.weights import hf_pretrained

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FEATURES = ("thumbnail", "clip")
Embedding = Callable[[Tensor], Tensor]  # images [B, 3, H, W] in [0, 1] -> embeddings [B, D]

# ---- the math ------------------------------------------------------------------------------------------------


def rbf_kernel(x: Tensor, y: Tensor, bandwidth: float) -> Tensor:
    """k(x_i, y_j) = exp(-|x_i - y_j|² / (2 σ²)) for embeddings x [n, D], y [m, D]: [n, m]."""
    return torch.exp(-torch.cdist(x, y).square() / (2 * bandwidth**2))


def median_bandwidth(y: Tensor) -> float:
    """The median heuristic (Gretton et al. 2012, Sec. 8): σ = the median distance between distinct rows of y."""
    distance = torch.pdist(y.double()).median().item()
    if distance <= 0:
        raise ValueError("the exemplars' embeddings are (mostly) identical, so the median heuristic gives no kernel "
                         "width: give bandwidth= or more varied exemplars")
    return distance


def mmd2_unbiased(x: Tensor, y: Tensor, bandwidth: float) -> Tensor:
    """MMD²_u of samples x [n, D] and y [m, D], n, m >= 2 (Gretton et al. 2012, Eq. 3):
    mean_{i≠j} k(x_i, x_j) + mean_{a≠b} k(y_a, y_b) - 2 mean_{i,a} k(x_i, y_a)."""
    n, m = len(x), len(y)
    kxx, kyy, kxy = rbf_kernel(x, x, bandwidth), rbf_kernel(y, y, bandwidth), rbf_kernel(x, y, bandwidth)
    xx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    yy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return xx + yy - 2 * kxy.mean()


def leave_one_out_mmd2(x: Tensor, y: Tensor, bandwidth: float) -> tuple[Tensor, Tensor]:
    """(MMD²_u(x, y), [MMD²_u(x without row i, y) for each i]) for x [n, D], n >= 3, from one kernel matrix:
    without row i the within-x sum loses 2 r_i (r_i = sum_{j≠i} k(x_i, x_j)) over (n-1)(n-2) pairs and the
    cross sum loses the row's own sum s_i = sum_a k(x_i, y_a)."""
    n, m = len(x), len(y)
    kxx, kyy, kxy = rbf_kernel(x, x, bandwidth), rbf_kernel(y, y, bandwidth), rbf_kernel(x, y, bandwidth)
    row = kxx.sum(1) - kxx.diagonal()  # r_i
    within = row.sum()  # sum_{i≠j} k(x_i, x_j)
    yy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    cross = kxy.sum(1)  # s_i
    full = within / (n * (n - 1)) + yy - 2 * cross.sum() / (n * m)
    without = (within - 2 * row) / ((n - 1) * (n - 2)) + yy - 2 * (cross.sum() - cross) / ((n - 1) * m)
    return full, without


def group_credits(x: Tensor, y: Tensor, groups: Tensor, bandwidth: float) -> dict[str, Tensor]:
    """Per sample of embeddings x [B, D] in groups [B] against exemplars y [M, D]: the group's set reward
    R(S) = -MMD²_u, the leave-one-out credit c_i = R(S) - R(S \\ {i}), and the score R(S) + c_i - mean_S c."""
    x, y = x.double(), y.double()
    set_reward, credit = torch.empty(len(x), dtype=torch.float64), torch.empty(len(x), dtype=torch.float64)
    for g in groups.unique():
        members = (groups == g).nonzero().flatten()
        full, without = leave_one_out_mmd2(x[members], y, bandwidth)
        set_reward[members] = -full.cpu()
        credit[members] = (without - full).cpu()  # R(S) - R(S \ i) = MMD²(S \ i) - MMD²(S)
    mean_credit = torch.zeros(int(groups.max()) + 1, dtype=torch.float64).index_add(0, groups, credit)
    mean_credit = mean_credit / torch.bincount(groups).clamp(min=1)
    return {"score": set_reward + credit - mean_credit[groups], "set": set_reward, "credit": credit}


# ---- the reward ----------------------------------------------------------------------------------------------


def exemplar_files(directory: str | Path) -> list[Path]:
    """The image files directly in `directory`, sorted; ValueError naming the option when fewer than two."""
    path = Path(directory)
    if not path.is_dir():
        raise ValueError(f"dragon-mmd: exemplars={str(directory)!r} is not a directory (give a directory of "
                         f"{', '.join(IMAGE_SUFFIXES)} images)")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < 2:
        raise ValueError(f"dragon-mmd: exemplars={str(directory)!r} holds {len(files)} images "
                         f"({', '.join(IMAGE_SUFFIXES)}); the MMD needs at least 2")
    return files


class DistributionReward(Reward):
    """DRAGON-style distribution reward: minus the unbiased MMD² between a prompt group's image embeddings and an
    exemplar set's, with each sample's leave-one-out credit (groupwise: trainers pass the prompt groups).

    Options: `exemplars` (a directory of images, or a tensor [M, 3, H, W] in [0, 1], M >= 2), `feature`
    ("thumbnail": weight-free area-downsampled pixels, `thumbnail_size`² × 3 values; "clip": the L2-normalised
    image embedding of the transformers CLIP model `clip`, a local directory or hub id; or a callable), and
    `bandwidth` (the RBF kernel's σ; default: the exemplars' median pairwise distance). Returns "score" (see the
    module doc), "set" (R(S), the same for a group's samples) and "credit" (leave-one-out)."""

    name = "dragon-mmd"
    groupwise = True
    min_group_size = 3  # a leave-one-out set needs two samples for MMD²_u
    needs_prompts = False
    higher_is_better = True

    def __init__(self, exemplars: str | Path | Tensor, *, feature: str | Embedding = "thumbnail",
                 clip: str | Path | nn.Module = "openai/clip-vit-base-patch32", thumbnail_size: int = 8,
                 bandwidth: float | None = None, **reward_kwargs):
        self.validate_options({"exemplars": exemplars, "feature": feature, "thumbnail_size": thumbnail_size,
                               "bandwidth": bandwidth})
        super().__init__(**reward_kwargs)
        self.embed = self._embedding(feature, clip, thumbnail_size)
        self.exemplars = self._embed_exemplars(exemplars)
        self.bandwidth = float(bandwidth) if bandwidth is not None else median_bandwidth(self.exemplars)

    @classmethod
    def tiny(cls, exemplars: str | Path | Tensor, seed: int = 0, **kwargs) -> DistributionReward:
        """CLIP features from a random ~54k-parameter transformers CLIP (tests, offline use)."""
        return cls(exemplars, feature="clip", clip=tiny_hf_clip(seed), **kwargs)

    @classmethod
    def validate_options(cls, options: Mapping) -> None:
        if "exemplars" not in options:
            raise ValueError("dragon-mmd needs the option exemplars: a directory of at least 2 exemplar images "
                             "(reward_options: {dragon-mmd: {exemplars: DIR}})")
        exemplars = options["exemplars"]
        if isinstance(exemplars, Tensor):
            if exemplars.ndim != 4 or exemplars.shape[1] != 3 or len(exemplars) < 2:
                raise ValueError(f"dragon-mmd: exemplars must be a directory or a tensor [M >= 2, 3, H, W], got "
                                 f"shape {tuple(exemplars.shape)}")
        else:
            exemplar_files(exemplars)
        feature = options.get("feature", "thumbnail")
        if not callable(feature) and feature not in FEATURES:
            raise ValueError(f"dragon-mmd: feature={feature!r}; allowed: {', '.join(FEATURES)} or a callable "
                             "images [B, 3, H, W] -> embeddings [B, D]")
        size = options.get("thumbnail_size", 8)
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"dragon-mmd: thumbnail_size={size!r} must be an integer >= 1")
        bandwidth = options.get("bandwidth")
        if bandwidth is not None and (isinstance(bandwidth, bool) or not isinstance(bandwidth, (int, float))
                                      or not bandwidth > 0):
            raise ValueError(f"dragon-mmd: bandwidth={bandwidth!r} must be a number > 0, or None for the median "
                             "heuristic")

    def _embedding(self, feature: str | Embedding, clip, thumbnail_size: int) -> Embedding:
        if callable(feature):
            return feature
        if feature == "thumbnail":
            return ThumbnailFeatures(thumbnail_size)
        from transformers import CLIPModel  # seconds to import: only when CLIP features are asked for

        model = clip if isinstance(clip, nn.Module) else hf_pretrained(CLIPModel, clip, self.dtype)
        model = model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        size = model.config.vision_config.image_size

        def clip_embeds(images: Tensor) -> Tensor:  # HF CLIPImageProcessor geometry, as CLIPScore / PickScore
            pixels = clip_preprocess(images.to(self.device), size, crop_rounding="floor", clamp=True)
            return _hf_image_embeds(model, pixels.to(self.dtype))

        return clip_embeds

    @torch.no_grad()
    def _features(self, images: Tensor) -> Tensor:
        """Embeddings [B, D] (float64, CPU) of images [B, 3, H, W], `batch_size` at a time."""
        return torch.cat([self.embed(images[i:i + self.batch_size]).double().cpu()
                          for i in range(0, len(images), self.batch_size)])

    def _embed_exemplars(self, exemplars: str | Path | Tensor) -> Tensor:
        if isinstance(exemplars, Tensor):
            return self._features(exemplars.float())
        # Files keep their own sizes: the features take any size (thumbnails pool, CLIP resizes), so embed by size.
        images = [read_image(p) for p in exemplar_files(exemplars)]
        out: list[Tensor | None] = [None] * len(images)
        for size in {tuple(im.shape) for im in images}:
            index = [i for i, im in enumerate(images) if tuple(im.shape) == size]
            for i, row in zip(index, self._features(torch.stack([images[i] for i in index])), strict=True):
                out[i] = row
        return torch.stack(out)

    def score(self, *, prompts, images, videos, metadata, groups):
        out = group_credits(self._features(images), self.exemplars, groups, self.bandwidth)
        return {k: v.float() for k, v in out.items()}
