"""A lightweight learned artifact detector as a reward: P(clean) in [0, 1], differentiable, with one sub-score per
artifact kind when it was trained with labels.

The detector (`ArtifactNet`) is a small fully convolutional CNN (4 conv layers with batch norm, 61k
parameters, an 8×8 final map for 32×32 inputs) with global mean and max pooling and 1 + K logits: "artifact"
and one per artifact kind (multi-label). Images are resized (bilinear, antialiased, aspect not kept) to the
`image_size` it was trained at, 32 for the shapes world. On a generated world set (1500 clean + 1500 artifact,
10 epochs, ~12 s on one CPU thread) it reaches ~98% held-out accuracy; broken shapes are the hardest kind.
Why learned and small: "Understanding Reward Hacking in T2I RL" (arXiv 2601.03468) regularises RL
with a lightweight artifact reward trained on a small curated set of clean vs artifact images; in this
project's probe RL drifted into faint background speckle that the exact verifier ignores.

    train_artifact(clean_dir, artifact_dir, out)     # PNG folders -> out (safetensors + config in metadata)
    ArtifactReward(weights=out)                      # score = P(clean); sub-scores 1 - P(kind)

`visalign.world.artifacts` generates a training set from the shapes world: clean renders and renders with one
or two corruptions from ARTIFACT_KINDS (blur, noise, broken shapes, extra blobs, faint background speckle),
with a `labels.json` naming each artifact image's kinds.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from visalign.rewards.base import Reward
from visalign.rewards.weights import load_state_dict_checked

ARTIFACT_KINDS = ("blur", "noise", "broken_shape", "extra_blob", "speckle")
IMAGE_SUFFIXES = (".png",)


def load_image_folder(folder: str | Path) -> tuple[Tensor, list[str]]:
    """All PNGs of a folder, sorted by name, as ([N, 3, H, W] in [0, 1], names). They must share one size."""

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no image folder at {folder}")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"{folder} holds no {'/'.join(IMAGE_SUFFIXES)} images")
    arrays = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255.0 for p in paths]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"images in {folder} have different sizes {sorted(shapes)}; resize them to one size")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous(), [p.name for p in paths]


# ------------------------------------------------------------------------------------ model


@dataclass
class ArtifactConfig:
    """Architecture of an `ArtifactNet`, stored in its checkpoint's metadata."""

    kinds: list[str] = field(default_factory=list)
    widths: list[int] = field(default_factory=lambda: [16, 32, 64, 64])
    strides: list[int] = field(default_factory=lambda: [1, 2, 2, 1])
    image_size: int = 32

    def __post_init__(self):
        if not self.widths or any(w < 1 for w in self.widths):
            raise ValueError(f"widths={self.widths} must be a non-empty list of positive channel counts")
        if len(self.strides) != len(self.widths) or any(s not in (1, 2) for s in self.strides):
            raise ValueError(f"strides={self.strides} must give 1 or 2 for each of the {len(self.widths)} layers")
        if self.image_size < 8:
            raise ValueError(f"image_size={self.image_size} must be >= 8")
        if len(set(self.kinds)) != len(self.kinds) or "score" in self.kinds:
            raise ValueError(f"kinds={self.kinds} has duplicates or 'score' (the combined sub-score's name)")


class ArtifactNet(nn.Module):
    """3×3 convs (strides from the config) with batch norm and ReLU, global mean and max pooling, and a linear head
    to 1 + K logits: [artifact, kind_1 ... kind_K]. Input: images [B, 3, S, S] in [0, 1]."""

    def __init__(self, config: ArtifactConfig):
        super().__init__()
        self.config = config
        layers, channels = [], 3
        for width, stride in zip(config.widths, config.strides, strict=True):
            layers += [nn.Conv2d(channels, width, 3, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(width), nn.ReLU()]
            channels = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(2 * channels, 1 + len(config.kinds))

    def forward(self, images: Tensor) -> Tensor:
        features = self.features(images * 2 - 1)
        # Mean and max pooling: dense artifacts (noise, blur) shift the mean, local ones (a blob) the max.
        return self.head(torch.cat([features.mean(dim=(2, 3)), features.amax(dim=(2, 3))], dim=1))


def _resize(images: Tensor, size: int) -> Tensor:
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def save_artifact_model(model: ArtifactNet, path: str | Path, metrics: dict | None = None) -> None:
    """safetensors with the config (and training metrics) as JSON in the metadata."""

    metadata = {"config": json.dumps(asdict(model.config)), "metrics": json.dumps(metrics or {})}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=metadata)


def load_artifact_model(path: str | Path) -> ArtifactNet:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"artifact: no weights at {path}; train them with train_artifact(...) "
                                "(`visalign rewards train-artifact`)")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    if "config" not in metadata:
        raise KeyError(f"artifact: {path} has no 'config' in its metadata; save it with save_artifact_model")
    model = ArtifactNet(ArtifactConfig(**json.loads(metadata["config"])))
    load_state_dict_checked(model, state, f"artifact: {path}")
    return model


class ArtifactReward(Reward):
    """P(clean) of a trained `ArtifactNet`, in [0, 1], higher is better, differentiable.

    Sub-scores, one per artifact kind the detector was trained with: 1 - P(kind), so every sub-score is
    higher-is-better too. `weights`: a file written by `train_artifact`; `ArtifactReward.tiny()` gives random
    weights for tests."""

    name = "artifact"
    differentiable = True
    needs_prompts = False
    value_range = (0.0, 1.0)

    def __init__(self, weights: str | Path | None = None, model: ArtifactNet | None = None, **kwargs):
        super().__init__(**kwargs)
        if (weights is None) == (model is None):
            raise ValueError("artifact: pass weights=PATH (train them with train_artifact / "
                             "`visalign rewards train-artifact`) or model=ArtifactNet, not both or neither")
        self.model = (model if model is not None else load_artifact_model(weights)).to(self.device).eval()
        self.model.requires_grad_(False)

    @classmethod
    def tiny(cls, kinds: tuple[str, ...] = ARTIFACT_KINDS, seed: int = 0, **kwargs) -> ArtifactReward:
        torch.manual_seed(seed)
        config = ArtifactConfig(kinds=list(kinds), widths=[4, 8], strides=[1, 2], image_size=16)
        return cls(model=ArtifactNet(config), **kwargs)

    def score(self, *, prompts, images, videos, metadata):
        logits = self.model(_resize(images.to(self.device, torch.float32), self.model.config.image_size))
        out = {"score": torch.sigmoid(-logits[:, 0])}
        for k, kind in enumerate(self.model.config.kinds):
            out[kind] = torch.sigmoid(-logits[:, 1 + k])
        return out


# ------------------------------------------------------------------------------------ training


def _read_labels(path: Path, names: list[str]) -> tuple[list[str], Tensor, Tensor]:
    """(kinds, labels [N, K], known [N]) from a {file name: [kinds]} JSON; files it omits are unlabelled."""
    entries = json.loads(path.read_text())
    if not isinstance(entries, dict) or not all(isinstance(v, list) for v in entries.values()):
        raise ValueError(f"{path} must map image file names to lists of artifact kinds")
    found = {kind for kinds in entries.values() for kind in kinds}
    kinds = [k for k in ARTIFACT_KINDS if k in found] + sorted(found - set(ARTIFACT_KINDS))
    unknown = sorted(set(entries) - set(names))
    if unknown:
        raise ValueError(f"{path} names files that are not in the artifact folder: {unknown[:5]}")
    labels, known = torch.zeros(len(names), len(kinds)), torch.zeros(len(names), dtype=torch.bool)
    for i, name in enumerate(names):
        if name in entries:
            known[i] = True
            for kind in entries[name]:
                labels[i, kinds.index(kind)] = 1.0
    return kinds, labels, known


def train_artifact(clean_dir: str | Path, artifact_dir: str | Path, out: str | Path,
                   labels: str | Path | None = None, epochs: int = 10, batch_size: int = 64, lr: float = 3e-3,
                   val_fraction: float = 0.2, widths: tuple[int, ...] = (16, 32, 64, 64),
                   strides: tuple[int, ...] = (1, 2, 2, 1), image_size: int = 32, seed: int = 0,
                   progress: bool = True) -> dict[str, float]:
    """Train an `ArtifactNet` on PNG folders of clean and artifact images and save it to `out`.

    labels: a JSON {artifact file name: [kinds]} for the multi-label heads; by default
    `artifact_dir/labels.json` when it exists. Without labels only the clean/artifact head is trained.
    A random `val_fraction` of each folder is held out; the returned (and saved) metrics are the held-out
    accuracy of "P(clean) > 0.5" and, with labels, the per-kind accuracy on labelled held-out images.
    Adam with a cosine learning-rate decay; random flips as augmentation."""
    clean, _ = load_image_folder(clean_dir)
    artifact, names = load_image_folder(artifact_dir)
    labels_path = Path(labels) if labels is not None else Path(artifact_dir) / "labels.json"
    if labels is not None and not labels_path.is_file():
        raise FileNotFoundError(f"no labels file at {labels_path}")
    kinds, kind_labels, known = [], torch.zeros(len(names), 0), torch.zeros(len(names), dtype=torch.bool)
    if labels_path.is_file():
        kinds, kind_labels, known = _read_labels(labels_path, names)
    images = _resize(torch.cat([clean, artifact]), image_size)
    is_artifact = torch.cat([torch.zeros(len(clean)), torch.ones(len(artifact))])
    # Clean images are free of every kind, so their kind labels are known zeros.
    kind_labels = torch.cat([torch.zeros(len(clean), len(kinds)), kind_labels])
    known = torch.cat([torch.ones(len(clean), dtype=torch.bool), known])
    config = ArtifactConfig(kinds=kinds, widths=list(widths), strides=list(strides), image_size=image_size)
    return _fit(images, is_artifact, kind_labels, known, config, Path(out), epochs, batch_size, lr, val_fraction,
                seed, progress)


def _split(is_artifact: Tensor, val_fraction: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Stratified random split: the same fraction of clean and of artifact images is held out."""
    train, val = [], []
    for value in (0.0, 1.0):
        index = (is_artifact == value).nonzero().flatten()
        index = index[torch.randperm(len(index), generator=generator)]
        cut = round(len(index) * val_fraction)
        val.append(index[:cut])
        train.append(index[cut:])
    return torch.cat(train), torch.cat(val)


def _fit(images, is_artifact, kind_labels, known, config, out, epochs, batch_size, lr, val_fraction, seed,
         progress) -> dict[str, float]:
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in (0, 1)")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    train, val = _split(is_artifact, val_fraction, generator)
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"too few images ({len(images)}) to hold out val_fraction={val_fraction}")
    model = ArtifactNet(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * math.ceil(len(train) / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    bar = tqdm(total=steps, desc="train-artifact", disable=not progress)
    for _ in range(epochs):
        model.train()
        for batch in train[torch.randperm(len(train), generator=generator)].split(batch_size):
            x = images[batch]
            flip = torch.rand(len(batch), generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss, _ = _loss(model(x), is_artifact[batch], kind_labels[batch], known[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    metrics = evaluate_artifact(model, images[val], is_artifact[val], kind_labels[val], known[val])
    metrics.update(train_images=float(len(train)), val_images=float(len(val)))
    out.parent.mkdir(parents=True, exist_ok=True)
    save_artifact_model(model.eval(), out, metrics)
    return metrics


def _loss(logits: Tensor, is_artifact: Tensor, kind_labels: Tensor, known: Tensor) -> tuple[Tensor, Tensor]:
    """BCE of the artifact logit plus the mean BCE of the kind logits over images with known labels."""
    loss = F.binary_cross_entropy_with_logits(logits[:, 0], is_artifact)
    kind_loss = logits.new_zeros(())
    if kind_labels.shape[1] and known.any():
        kind_loss = F.binary_cross_entropy_with_logits(logits[known, 1:], kind_labels[known])
    return loss + kind_loss, kind_loss


@torch.no_grad()
def evaluate_artifact(model: ArtifactNet, images: Tensor, is_artifact: Tensor, kind_labels: Tensor | None = None,
                      known: Tensor | None = None) -> dict[str, float]:
    """Accuracy of "artifact" (P(clean) < 0.5) and, for labelled images, of each kind head at 0.5."""
    model.eval()
    logits = torch.cat([model(_resize(x, model.config.image_size)) for x in images.split(256)])
    metrics = {"accuracy": ((logits[:, 0] > 0).float() == is_artifact).float().mean().item()}
    if kind_labels is not None and known is not None and known.any():
        for k, kind in enumerate(model.config.kinds):
            predicted = (logits[known, 1 + k] > 0).float()
            metrics[f"accuracy/{kind}"] = (predicted == kind_labels[known, k]).float().mean().item()
    return metrics


__all__ = [
    "ARTIFACT_KINDS", "ArtifactConfig", "ArtifactNet", "ArtifactReward", "evaluate_artifact", "load_artifact_model",
    "load_image_folder", "save_artifact_model", "train_artifact",
]
