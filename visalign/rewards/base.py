"""The reward contract every reward model, trainer, steering method and evaluation shares.

A reward is called with keyword arguments only:

    reward(prompts=[...], images=Tensor[B, 3, H, W] in [0, 1])          -> Tensor[B]
    reward(prompts=[...], videos=Tensor[B, F, 3, H, W] in [0, 1])       -> Tensor[B]
    reward(..., metadata=[{...}, ...])                                   # optional per-sample data
    reward(..., source_images=Tensor[B, 3, H', W'])                      # the images an edit started from
    reward(..., groups=Tensor[B])                                        # a group id per sample (groupwise rewards)

`source_images` reach only rewards that judge an edit (`uses_source_images`); the others ignore them. Without
them, such a reward reads each sample's metadata `source_image` path (what a prompt file names), so every
caller that passes the prompts' metadata (trainers, steering, evaluation) scores edits unchanged.

`groups` reach only groupwise rewards (`groupwise`: a reward of a set of samples, e.g. a distribution's distance
to exemplars, returning each sample's credit); the others ignore them. The group-based trainers pass each sample's
prompt-group id; without them a groupwise reward takes the call's whole batch as one group.

or returns a dict of named sub-scores [B] plus the combined "score" [B]. Sub-scores may be NaN where a
concept does not apply to a sample; the combined score may not. A wrong shape, NaN or inf in a score raises
`RewardError` naming the reward, so trainers can decide to drop and count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from visalign.media import read_image
from visalign.prompts import SOURCE_IMAGE


def _sources_named_in(metadata: Sequence[dict], size: tuple[int, int]) -> Tensor | None:
    """The source images the samples' metadata name (`source_image` paths), resized to `size`; None if any lacks one."""
    paths = [m.get(SOURCE_IMAGE) if isinstance(m, Mapping) else None for m in metadata]
    if any(p is None for p in paths):
        return None
    return torch.stack([read_image(p, size) for p in paths])


class RewardError(ValueError):
    """A reward produced an invalid output (shape, NaN, inf) or was given invalid input."""


RewardOutput = Tensor | dict[str, Tensor]


class Reward:
    """Base class: subclasses set the attributes and implement `score` for one batch.

    Attributes:
        name: registry name, used in logs (`rewards/<name>/mean`).
        differentiable: gradients flow from the score to the input pixels.
        higher_is_better: direction of improvement.
        value_range: (low, high) of the score, or None when unbounded.
        inputs: which media the reward scores: ("images",), ("videos",) or both.
        batch_size: largest batch `score` is called with; inputs are split into chunks of this size.
        uses_source_images: judges an edit: `score` also receives `source_images=` (required in the call).
        groupwise: scores sets of samples: `score` receives the whole batch at once (never chunked) and `groups=`
            (a long tensor [B] of group ids), and returns each sample's credit within its group.
        min_group_size: the fewest samples a groupwise reward's group may hold.
    """

    name: str = "reward"
    differentiable: bool = False
    higher_is_better: bool = True
    value_range: tuple[float, float] | None = None
    inputs: tuple[str, ...] = ("images",)
    needs_prompts: bool = True
    uses_source_images: bool = False
    groupwise: bool = False
    min_group_size: int = 1

    def __init__(self, batch_size: int = 32, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        if batch_size < 1:
            raise ValueError(f"{self.name}: batch_size={batch_size} must be >= 1")
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.dtype = dtype

    def score(self, *, prompts: list[str] | None, images: Tensor | None, videos: Tensor | None,
              metadata: list[dict] | None) -> RewardOutput:
        raise NotImplementedError

    @classmethod
    def validate_options(cls, options: Mapping) -> None:
        """Config-time checks of constructor option values that need no weights (ValueError naming the option);
        `visalign.rewards.check_options` calls it. None by default."""

    # ---- the call: validate, batch, validate -----------------------------------------------------------
    def __call__(self, *, prompts: Sequence[str] | None = None, images: Tensor | None = None,
                 videos: Tensor | None = None, metadata: Sequence[dict] | None = None,
                 source_images: Tensor | None = None, groups: Sequence[int] | Tensor | None = None,
                 allow_invalid: bool = False) -> RewardOutput:
        """Score a batch. With `allow_invalid`, non-finite scores come back as NaN instead of raising, so a
        trainer can drop and count them; a wrong shape always raises. `groups` (one id per sample) is read by
        groupwise rewards only; for them None makes the batch one group."""
        media, kind = self._check_inputs(prompts, images, videos, metadata)
        batch = media.shape[0]
        if self.uses_source_images:
            if source_images is None and metadata is not None:
                source_images = _sources_named_in(metadata, tuple(media.shape[-2:]))
            self._check_sources(source_images, batch)
        # A groupwise reward's credits depend on every member of a group: one call sees the batch whole.
        chunk = batch if self.groupwise else self.batch_size
        grouped = {"groups": self._check_groups(groups, batch)} if self.groupwise else {}
        outputs = []
        for start in range(0, batch, chunk):
            sl = slice(start, start + chunk)
            edit = {"source_images": source_images[sl]} if self.uses_source_images else {}
            out = self.score(prompts=list(prompts[sl]) if prompts is not None else None,
                             images=media[sl] if kind == "images" else None,
                             videos=media[sl] if kind == "videos" else None,
                             metadata=list(metadata[sl]) if metadata is not None else None, **edit, **grouped)
            outputs.append(self._check_output(out, min(chunk, batch - start), allow_invalid))
        if isinstance(outputs[0], dict):
            return {k: torch.cat([o[k] for o in outputs]) for k in outputs[0]}
        return torch.cat(outputs)

    def _check_inputs(self, prompts, images, videos, metadata) -> tuple[Tensor, str]:
        if (images is None) == (videos is None):
            raise RewardError(f"{self.name}: pass exactly one of images= or videos=")
        kind, media = ("images", images) if images is not None else ("videos", videos)
        if kind not in self.inputs:
            raise RewardError(f"{self.name}: scores {' or '.join(self.inputs)}, not {kind}")
        ndim = 4 if kind == "images" else 5
        if not isinstance(media, Tensor) or media.ndim != ndim or media.shape[-3] != 3:
            shape = "B×3×H×W" if kind == "images" else "B×F×3×H×W"
            got = tuple(media.shape) if isinstance(media, Tensor) else type(media).__name__
            raise RewardError(f"{self.name}: {kind} must be a float tensor {shape} in [0, 1], got {got}")
        if not media.is_floating_point():
            raise RewardError(f"{self.name}: {kind} must be floating point in [0, 1], got {media.dtype}")
        if media.requires_grad and not self.differentiable:
            raise RewardError(f"{self.name} is not differentiable: pass {kind} without requires_grad "
                              "(detach them) or use a differentiable reward")
        with torch.no_grad():
            low, high = (float(x) for x in torch.aminmax(media))  # one pass over the batch, not two
        if low < -1e-3 or high > 1 + 1e-3:
            raise RewardError(f"{self.name}: {kind} must be in [0, 1], got values in [{low:.3f}, {high:.3f}]")
        batch = media.shape[0]
        if self.needs_prompts and prompts is None:
            raise RewardError(f"{self.name} needs prompts=")
        if prompts is not None and (isinstance(prompts, str) or len(prompts) != batch):
            raise RewardError(f"{self.name}: prompts must be a list of {batch} strings")
        if metadata is not None and len(metadata) != batch:
            raise RewardError(f"{self.name}: metadata must have {batch} entries, got {len(metadata)}")
        return media, kind

    def _check_groups(self, groups, batch: int) -> Tensor:
        """A groupwise reward's group ids as a long tensor [B]; all zeros (one group) when None."""
        ids = torch.zeros(batch, dtype=torch.long) if groups is None else torch.as_tensor(groups)
        if ids.shape != (batch,) or ids.is_floating_point() or ids.is_complex():
            raise RewardError(f"{self.name}: groups must give an integer group id per sample ({batch}), got "
                              f"{ids.dtype} of shape {tuple(ids.shape)}")
        ids = ids.long().cpu()
        names, counts = ids.unique(return_counts=True)
        small = counts < self.min_group_size
        if small.any():
            sizes = ", ".join(f"group {g} has {c}" for g, c in zip(names[small].tolist(), counts[small].tolist(),
                                                                    strict=True))
            raise RewardError(f"{self.name} scores groups of at least {self.min_group_size} samples; {sizes}")
        return ids

    def _check_sources(self, sources, batch: int) -> None:
        if sources is None:
            raise RewardError(f"{self.name} judges an edit: it needs source_images= (the images the edits started "
                              "from; a prompt file names one per prompt as 'source_image')")
        if not isinstance(sources, Tensor) or sources.ndim != 4 or sources.shape[:2] != (batch, 3):
            got = tuple(sources.shape) if isinstance(sources, Tensor) else type(sources).__name__
            raise RewardError(f"{self.name}: source_images must be a float tensor {batch}×3×H×W in [0, 1], got {got}")

    def _check_output(self, out: RewardOutput, batch: int, allow_invalid: bool = False) -> RewardOutput:
        if isinstance(out, dict):
            if "score" not in out:
                raise RewardError(f"{self.name} returned sub-scores without a combined 'score'")
            return {key: self._check_tensor(value, batch, f"{self.name}[{key}]", allow_nan=key != "score",
                                            allow_invalid=allow_invalid) for key, value in out.items()}
        return self._check_tensor(out, batch, self.name, allow_nan=False, allow_invalid=allow_invalid)

    @staticmethod
    def _check_tensor(value, batch: int, label: str, allow_nan: bool, allow_invalid: bool) -> Tensor:
        if not isinstance(value, Tensor) or value.shape != (batch,):
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise RewardError(f"reward {label} returned shape {got}; expected ({batch},)")
        bad = torch.isinf(value) if allow_nan else ~torch.isfinite(value)
        if bad.any():
            if not allow_invalid:
                raise RewardError(f"reward {label} returned non-finite values at {bad.nonzero().flatten().tolist()}")
            value = torch.where(bad, torch.full_like(value, float("nan")), value)
        return value

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, differentiable={self.differentiable})"


def combined(out: RewardOutput) -> Tensor:
    """The [B] score of a reward output (the tensor itself, or its dict's 'score')."""
    return out["score"] if isinstance(out, dict) else out
