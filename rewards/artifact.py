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

`make_artifact_set` / `write_artifact_set` generate a training set from the shapes world: clean renders and
renders with one or two corruptions from ARTIFACT_KINDS (blur, noise, broken shapes, extra blobs, faint
background speckle), with a `labels.json` naming each artifact image's kinds.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor, nn

from rewards.base import Reward
from rewards.weights import load_state_dict_checked

ARTIFACT_KINDS = ("blur", "noise", "broken_shape", "extra_blob", "speckle")
IMAGE_SUFFIXES = (".png",)


# ------------------------------------------------------------------------------------ corruptions


def _background(image: np.ndarray) -> np.ndarray:
    """The plain background colour, [3, 1, 1]: the world's BACKGROUND."""
    from visalign.world.render import BACKGROUND

    return np.asarray(BACKGROUND, dtype=np.float32)[:, None, None]


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    return np.stack([ndimage.gaussian_filter(c, sigma, mode="nearest") for c in image])


def corrupt_blur(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gaussian blur, sigma 0.8-1.6 px (a 32×32 render's edges are one anti-aliased pixel wide)."""
    return _gaussian_blur(image, rng.uniform(0.8, 1.6))


def corrupt_noise(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Dense Gaussian noise, std 0.03-0.08 per pixel and channel."""
    return image + rng.normal(0.0, rng.uniform(0.03, 0.08), image.shape).astype(np.float32)


def corrupt_speckle(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Faint sparse speckle: 10-30% of the pixels shifted by +-0.03-0.08 (grey, all channels alike)."""
    mask = rng.random(image.shape[1:]) < rng.uniform(0.1, 0.3)
    amplitude = rng.uniform(0.03, 0.08) * rng.choice([-1.0, 1.0], size=image.shape[1:])
    return image + (mask * amplitude).astype(np.float32)[None]


def _foreground(image: np.ndarray) -> np.ndarray:
    """Pixels further than 0.15 (max over channels) from the background, as the verifier's cleanliness."""
    return np.abs(image - _background(image)).max(axis=0) > 0.15


def corrupt_broken_shape(image: np.ndarray, rng: np.random.Generator, attempts: int = 20) -> np.ndarray:
    """Cut part of an object out (filled with the background): a 2-3 px gap across it, or a notch of 40-60% of
    its box at a corner. A cut must remove at least 15% of the object's pixels (a notch in the empty corner of
    a triangle's box would change nothing); falls back to an extra blob when the image has no object."""
    foreground = _foreground(image)
    labels, _ = ndimage.label(foreground, structure=np.ones((3, 3)))
    boxes = [(i + 1, box) for i, box in enumerate(ndimage.find_objects(labels)) if box is not None]
    if not boxes:
        return corrupt_extra_blob(image, rng)
    for _ in range(attempts):
        index, (rows, cols) = boxes[rng.integers(len(boxes))]
        height, width = rows.stop - rows.start, cols.stop - cols.start
        cut = np.zeros(foreground.shape, dtype=bool)
        if rng.random() < 0.5:
            gap = int(rng.integers(2, 4))
            if rng.random() < 0.5:  # a horizontal gap through the object's middle third
                top = rows.start + int(rng.integers(height // 3, max(height // 3 + 1, 2 * height // 3 - gap + 1)))
                cut[top:top + gap, cols] = True
            else:
                left = cols.start + int(rng.integers(width // 3, max(width // 3 + 1, 2 * width // 3 - gap + 1)))
                cut[rows, left:left + gap] = True
        else:
            cut_h = max(2, round(height * rng.uniform(0.4, 0.6)))
            cut_w = max(2, round(width * rng.uniform(0.4, 0.6)))
            top = rows.start if rng.random() < 0.5 else rows.stop - cut_h
            left = cols.start if rng.random() < 0.5 else cols.stop - cut_w
            cut[top:top + cut_h, left:left + cut_w] = True
        obj = labels == index
        if (cut & obj).sum() >= 0.15 * obj.sum():
            break
    out = image.copy()
    out[:, cut] = _background(image)[:, :, 0]
    return out


def corrupt_extra_blob(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An irregular blob (2-3 overlapping discs of radius 1-2.5 px, anti-aliased) off the objects where possible,
    in a random colour at least 0.3 from the background (or a dark grey mark)."""
    size = image.shape[-1]
    occupied = ndimage.binary_dilation(np.abs(image - _background(image)).max(axis=0) > 0.05, iterations=2)
    for _ in range(20):
        cy, cx = rng.uniform(3, size - 3, 2)
        if not occupied[int(cy), int(cx)]:
            break
    ss = 4
    axis = (np.arange(size * ss) + 0.5) / ss
    inside = np.zeros((size * ss, size * ss), dtype=bool)
    for _ in range(int(rng.integers(2, 4))):
        dy, dx = rng.normal(0, 1.0, 2)
        radius = rng.uniform(1.0, 2.5)
        inside |= (axis[:, None] - cy - dy) ** 2 + (axis[None, :] - cx - dx) ** 2 <= radius**2
    alpha = inside.reshape(size, ss, size, ss).mean(axis=(1, 3)).astype(np.float32)
    background = _background(image)[:, 0, 0]
    colour = np.full(3, rng.uniform(0.0, 0.5), dtype=np.float32)  # a dark grey mark
    if rng.random() < 0.7:
        for _ in range(20):
            colour = rng.uniform(0.0, 1.0, 3).astype(np.float32)
            if np.abs(colour - background).max() >= 0.3:
                break
    return image * (1 - alpha) + colour[:, None, None] * alpha


CORRUPTIONS = {
    "blur": corrupt_blur,
    "noise": corrupt_noise,
    "broken_shape": corrupt_broken_shape,
    "extra_blob": corrupt_extra_blob,
    "speckle": corrupt_speckle,
}


def corrupt(image: Tensor, kinds: tuple[str, ...], rng: np.random.Generator) -> Tensor:
    """Apply the named corruptions in order to one image [3, H, W] in [0, 1]; the result is clipped to [0, 1]."""
    out = image.numpy().astype(np.float32)
    for kind in kinds:
        if kind not in CORRUPTIONS:
            raise ValueError(f"artifact kind {kind!r} is not one of {tuple(CORRUPTIONS)}")
        out = CORRUPTIONS[kind](out, rng)
    return torch.from_numpy(np.clip(out, 0.0, 1.0))


def make_artifact_set(num_clean: int, num_artifact: int, seed: int = 0, kinds: tuple[str, ...] = ARTIFACT_KINDS,
                      two_kinds_fraction: float = 0.25) -> tuple[Tensor, Tensor, Tensor]:
    """A labelled set from the shapes world: (images [N, 3, 32, 32], is_artifact [N], kind labels [N, K]).

    The first `num_clean` images are clean renders of prompts drawn from all templates; the rest are other
    renders with one corruption (a second, different one with probability `two_kinds_fraction`). The kind
    labels follow `kinds`' order."""
    from visalign.world.grammar import sample_specs
    from visalign.world.render import render_batch

    total = num_clean + num_artifact
    renders = render_batch(sample_specs(total, generator=seed), seed)
    rng = np.random.default_rng(seed)
    labels = torch.zeros(total, len(kinds))
    images = [renders[i] for i in range(num_clean)]
    for i in range(num_clean, total):
        chosen = [int(rng.integers(len(kinds)))]
        if rng.random() < two_kinds_fraction and len(kinds) > 1:
            chosen.append(int(rng.choice([k for k in range(len(kinds)) if k != chosen[0]])))
        labels[i, chosen] = 1.0
        images.append(corrupt(renders[i], tuple(kinds[k] for k in chosen), rng))
    is_artifact = torch.cat([torch.zeros(num_clean), torch.ones(num_artifact)])
    return torch.stack(images), is_artifact, labels


def _save_png(image: Tensor, path: Path) -> None:
    from PIL import Image

    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(array).save(path)


def write_artifact_set(out_dir: str | Path, num_clean: int = 1500, num_artifact: int = 1500, seed: int = 0,
                       kinds: tuple[str, ...] = ARTIFACT_KINDS) -> tuple[Path, Path]:
    """Write `make_artifact_set` as PNGs: out_dir/clean/*.png, out_dir/artifact/*.png and
    out_dir/artifact/labels.json ({file name: [kinds]}). Returns (clean_dir, artifact_dir)."""
    images, is_artifact, labels = make_artifact_set(num_clean, num_artifact, seed, kinds)
    clean_dir, artifact_dir = Path(out_dir) / "clean", Path(out_dir) / "artifact"
    clean_dir.mkdir(parents=True, exist_ok=True)
    artifact_dir.mkdir(parents=True, exist_ok=True)
    names = {}
    for i, image in enumerate(images):
        if is_artifact[i]:
            name = f"{i:06d}.png"
            _save_png(image, artifact_dir / name)
            names[name] = [kinds[k] for k in labels[i].nonzero().flatten().tolist()]
        else:
            _save_png(image, clean_dir / f"{i:06d}.png")
    (artifact_dir / "labels.json").write_text(json.dumps(names, indent=1))
    return clean_dir, artifact_dir


def load_image_folder(folder: str | Path) -> tuple[Tensor, list[str]]:
    """All PNGs of a folder, sorted by name, as ([N, 3, H, W] in [0, 1], names). They must share one size."""
    from PIL import Image

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
    """3×3 convs (strides from the config) with batch norm and ReLU, global mean and max pooling, and a linear head to 1 + K logits: [artifact, kind_1 ... kind_K]. Input: images [B, 3, S, S] in
    [0, 1]."""

    def __init__(self, config: ArtifactConfig):
        super().__init__()
        self.config = config
        layers, channels = [], 3
        for width, stride in zip(config.widths, config.strides):
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
    from safetensors.torch import save_file

    metadata = {"config": json.dumps(asdict(model.config)), "metrics": json.dumps(metrics or {})}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=metadata)


def load_artifact_model(path: str | Path) -> ArtifactNet:
    from safetensors import safe_open

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
    from tqdm.auto import tqdm

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
    "ARTIFACT_KINDS", "CORRUPTIONS", "ArtifactConfig", "ArtifactNet", "ArtifactReward", "corrupt",
    "evaluate_artifact", "load_artifact_model", "load_image_folder", "make_artifact_set", "save_artifact_model",
    "train_artifact", "write_artifact_set",
]
