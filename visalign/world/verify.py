"""Exact verifier of the "shapes" world: does an image show what its prompt says?

Pipeline, per image:

1. Colour per pixel by *direction*, not nearest RGB. The background is achromatic, so a pixel that blends
   an object's colour with the background (an anti-aliased edge, a faint sample) keeps the object's hue
   and only loses chroma. Chroma and hue come from the opponent coordinates of (pixel - BACKGROUND):
   a = r - (g + b) / 2, b = sqrt(3)/2 (g - b). Pixels with chroma >= CHROMA_MIN take the nearest
   colour hue.
2. Connected components (8-connected) per colour. Each component gets a soft coverage alpha = chroma /
   (its 90th-percentile chroma), clipped to [0, 1], over the component grown by one pixel; components
   whose coverage sums to less than MIN_AREA pixels are noise and ignored.
3. Shape by template fit: for each shape, the ideal shape with the component's area and centroid is drawn
   (same anti-aliasing as the renderer) and its soft IoU with alpha is the shape's *fit*; the ideal shape
   is also tried through small Gaussian blurs, so soft-edged samples of a generator fit as well as sharp
   renders.
4. Large achromatic blobs (grey, black, white marks) are detected too, as objects of no colour and shape,
   so they count as extra objects.
5. Concepts are judged from the detections with the renderer's own geometry (`render.position_holds`,
   `render.relation_holds`) by a `Judge`: MAIN_JUDGE, or STRICT_JUDGE with tighter fits, colours and sizes
   and dominant-axis relations.
"""

import functools
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage

from visalign.world.grammar import COLORS, SHAPES, ObjectSpec, SceneSpec, parse_prompt
from visalign.world.render import (
    BACKGROUND,
    CANVAS,
    SIZE_SPLIT,
    SUPERSAMPLE,
    TRIANGLE_HEIGHT,
    position_holds,
    relation_holds,
    shape_coverage,
)

CHROMA_MIN = 0.25  # object colours have chroma 0.6-0.86; this keeps pixels at least ~30-40% covered
MIN_AREA = 8.0  # in canvas pixels (32x32); the smallest shape, a 6 px triangle, covers 15.6
ACHROMATIC_DEVIATION = 0.3  # a colourless pixel further than this (max over channels) from the background
FOREGROUND_DEVIATION = 0.15  # cleanliness: pixels further than this from the background are foreground
BACKGROUND_DEVIATION_SCALE = 0.1  # cleanliness: a mean abs deviation this large zeroes the background term
# Area of a shape of width 1: the verifier infers a shape's width from its area.
UNIT_AREA = {"circle": math.pi / 4, "square": 1.0, "triangle": TRIANGLE_HEIGHT / 2}
# Ideal shapes are also compared through these Gaussian blurs (px): a soft-edged sample then meets a
# soft-edged template, and since the blur softens every shape hypothesis alike they stay apart.
TEMPLATE_BLURS = (0.6, 1.2)
CORE_COVERAGE = 0.35  # ~ coverage at which an object's pixel reaches CHROMA_MIN
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class Detection:
    """One object found in an image. Coordinates and sizes are in canvas pixels (32x32 units).

    `color` is the nearest colour by hue (None for an achromatic blob) and `hue_error` its distance in
    degrees. `fits` maps each shape to the soft IoU between the object and that ideal shape of the same
    area and centroid. `area` is the summed coverage.
    """

    color: str | None
    hue_error: float
    fits: dict[str, float] = field(compare=False)
    area: float
    cx: float
    cy: float

    @property
    def best_shape(self) -> str | None:
        return max(self.fits, key=self.fits.get) if self.fits else None

    def width(self, shape: str | None) -> float:
        """The width (see `render`) of an object of this area if it were the given shape."""
        return math.sqrt(self.area / UNIT_AREA.get(shape, 1.0))


@dataclass(frozen=True)
class Judge:
    """Thresholds that turn detections into concept decisions."""

    name: str
    min_fit: float  # a detection with a lower best fit has no shape (an unknown blob)
    min_fit_margin: float  # the best fit must beat the second best by this much
    max_hue_error: float  # degrees; a detection further from every colour hue has no colour
    dominant_axis: bool  # relations also need |offset along the axis| > |offset across it|
    size_dead_zone: float  # small needs width < SIZE_SPLIT - this, large width > SIZE_SPLIT + this

    def color_of(self, det: Detection) -> str | None:
        return det.color if det.hue_error <= self.max_hue_error else None

    def shape_of(self, det: Detection) -> str | None:
        if not det.fits:
            return None
        best, second = sorted(det.fits.values(), reverse=True)[:2]
        return det.best_shape if best >= self.min_fit and best - second >= self.min_fit_margin else None

    def size_of(self, det: Detection) -> str | None:
        width = det.width(self.shape_of(det))
        if width < SIZE_SPLIT - self.size_dead_zone:
            return "small"
        if width > SIZE_SPLIT + self.size_dead_zone:
            return "large"
        return None

    def matches(self, det: Detection, obj: ObjectSpec) -> bool:
        return self.color_of(det) == obj.color and self.shape_of(det) == obj.shape


MAIN_JUDGE = Judge(
    "main", min_fit=0.6, min_fit_margin=0.0, max_hue_error=30.0, dominant_axis=False, size_dead_zone=0.0
)
STRICT_JUDGE = Judge(
    "strict", min_fit=0.8, min_fit_margin=0.05, max_hue_error=20.0, dominant_axis=True, size_dead_zone=1.0
)


@dataclass
class VerifyResult:
    """Per-sample verdicts, each a float tensor [B].

    Concept groups hold the fraction of that group's concepts satisfied (0 or 1 when there is one), or NaN
    where the prompt states no concept of the group (position and relation outside their templates):

    - object: each mentioned object (colour and shape together) is present;
    - attribute: colour present, shape present, and where stated the exact count and the size;
    - position: the object lies where stated;
    - relation: the two objects stand in the stated relation;
    - no_extra: every detected object is a mentioned one and each is there exactly as often as stated.

    `score` is the partial credit: the fraction of all applicable concepts satisfied, counting no_extra as
    one concept so that a reward built on it does not pay for extra copies. `passed` is 1 where every
    concept holds and there are no extra objects. `concepts` names each sample's concepts and verdicts.
    """

    object: torch.Tensor
    attribute: torch.Tensor
    position: torch.Tensor
    relation: torch.Tensor
    no_extra: torch.Tensor
    passed: torch.Tensor
    score: torch.Tensor
    concepts: list[dict[str, bool]]

    GROUPS = ("object", "attribute", "position", "relation", "no_extra")

    def sub_scores(self) -> dict[str, torch.Tensor]:
        """The group verdicts, pass and score by name, e.g. for logging `rewards/<name>/mean`."""
        return {name: getattr(self, name) for name in (*self.GROUPS, "passed", "score")}


# ------------------------------------------------------------------------------------------ detection


def chroma_and_hue(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Chroma and hue (degrees in [0, 360)) of (image - BACKGROUND), each [B, H, W], for [B, 3, H, W]."""
    return _chroma_and_hue(images.detach().float().cpu().numpy())


def _chroma_and_hue(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    diff = pixels - np.asarray(BACKGROUND, dtype=np.float32)[:, None, None]
    a = diff[:, 0] - (diff[:, 1] + diff[:, 2]) / 2
    b = math.sqrt(3) / 2 * (diff[:, 1] - diff[:, 2])
    return np.hypot(a, b), np.degrees(np.arctan2(b, a)) % 360.0


# Hue of each canonical colour, measured exactly as the verifier measures pixels.
REFERENCE_HUES = chroma_and_hue(torch.tensor(list(COLORS.values()))[:, :, None, None])[1][:, 0, 0]


def _hue_distance(hue: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Circular distance in degrees, broadcast."""
    diff = np.abs(hue - reference) % 360.0
    return np.minimum(diff, 360.0 - diff)


def detect_objects(images: torch.Tensor) -> list[list[Detection]]:
    """Detect the objects of each image of a batch [B, 3, H, H] in [0, 1]."""
    _check_images(images)
    return [detections for detections, _ in _detect_batch(images)]


def _detect_batch(images: torch.Tensor) -> list[tuple[list[Detection], np.ndarray]]:
    """Per image: its detections and its support mask (pixels that belong to a coloured object; read-only)."""
    pixels = np.ascontiguousarray(images.detach().float().cpu().numpy())
    return [(list(detections), support)  # callers may edit their lists
            for detections, support in _detect_pixels(pixels.shape, pixels.tobytes())]


# Detection is most of a world reward's cost, and a training step scores the same batch with several world rewards
# (the motion verifier, its cleanliness term, world-cleanliness): the last few batches' detections are kept, keyed
# by the pixels' bytes, so each batch is detected once.
@functools.lru_cache(maxsize=4)
def _detect_pixels(shape: tuple[int, ...], data: bytes) -> list[tuple[list[Detection], np.ndarray]]:
    pixels = np.frombuffer(data, dtype=np.float32).reshape(shape)
    chroma, hue = _chroma_and_hue(pixels)
    deviation = np.abs(pixels - np.asarray(BACKGROUND, dtype=np.float32)[:, None, None]).max(axis=1)
    found = [_detect_image(chroma[i], hue[i], deviation[i]) for i in range(len(pixels))]
    for _, support in found:
        support.setflags(write=False)  # shared by every caller of this batch
    return found


def _detect_image(
    chroma: np.ndarray, hue: np.ndarray, deviation: np.ndarray
) -> tuple[list[Detection], np.ndarray]:
    scale = CANVAS / chroma.shape[1]  # image pixels -> canvas pixels
    min_pixels = MIN_AREA / scale**2
    color_index = np.where(chroma >= CHROMA_MIN, _hue_distance(hue[..., None], REFERENCE_HUES).argmin(-1), -1)
    detections: list[Detection] = []
    support = np.zeros(chroma.shape, dtype=bool)
    for k in np.unique(color_index[color_index >= 0]):
        labels, n_components = ndimage.label(color_index == k, structure=_EIGHT_CONNECTED)
        for j in range(1, n_components + 1):
            core = labels == j
            # Grow by one pixel to take in the faint anti-aliased rim, but not pixels of another colour.
            grown = ndimage.binary_dilation(core, _EIGHT_CONNECTED) & ((color_index < 0) | (color_index == k))
            if grown.sum() < min_pixels:  # alpha <= 1 on `grown`: too small whatever its chroma (skips speckle fast)
                continue
            alpha = np.where(grown, np.clip(chroma / np.percentile(chroma[core], 90), 0.0, 1.0), 0.0)
            if alpha.sum() < min_pixels:
                continue
            support |= grown
            hue_error = _hue_distance(_circular_mean(hue[core], chroma[core]), REFERENCE_HUES[k])
            detections.append(_measure(alpha, list(COLORS)[k], float(hue_error), scale))
    return detections + _achromatic_blobs(chroma, deviation, support, min_pixels, scale), support


def _circular_mean(hue: np.ndarray, weight: np.ndarray) -> float:
    """Weighted mean of angles in degrees."""
    radians = np.radians(hue)
    return math.degrees(math.atan2((weight * np.sin(radians)).sum(), (weight * np.cos(radians)).sum()))


def _measure(
    alpha: np.ndarray, color: str | None, hue_error: float, scale: float, with_fits: bool = True
) -> Detection:
    """Area, centroid and (if `with_fits`) shape fits of an object's coverage map `alpha` over the image."""
    area = float(alpha.sum())
    rows, cols = np.indices(alpha.shape)
    cy = float((alpha * (rows + 0.5)).sum() / area)
    cx = float((alpha * (cols + 0.5)).sum() / area)
    fits = {shape: _shape_fit(alpha, shape, cx, cy, area) for shape in SHAPES} if with_fits else {}
    return Detection(color, hue_error, fits, area * scale**2, cx * scale, cy * scale)


def _shape_fit(alpha: np.ndarray, shape: str, cx: float, cy: float, area: float) -> float:
    """Soft IoU between `alpha` and the ideal `shape` of the same area and centroid, the best over the ideal
    shape seen sharp and through each blur of TEMPLATE_BLURS. Works on the bounding box of both."""
    width = math.sqrt(area / UNIT_AREA[shape])
    rows, cols = np.nonzero(alpha)
    reach = math.ceil(width) + 3  # the blurred ideal shape stays within this of the centroid
    y0, x0 = min(rows.min(), int(cy) - reach), min(cols.min(), int(cx) - reach)
    y1, x1 = max(rows.max() + 1, int(cy) + reach + 1), max(cols.max() + 1, int(cx) + reach + 1)
    ideal = shape_coverage(shape, cx, cy, width, x0, y0, x1 - x0, y1 - y0, SUPERSAMPLE)
    observed = np.zeros_like(ideal)
    # The box may stick out of the image; copy the part of alpha inside it.
    top, left = max(y0, 0), max(x0, 0)
    bottom, right = min(y1, alpha.shape[0]), min(x1, alpha.shape[1])
    observed[top - y0 : bottom - y0, left - x0 : right - x0] = alpha[top:bottom, left:right]
    best = _soft_iou(observed, ideal)
    for sigma in TEMPLATE_BLURS:
        blurred = ndimage.gaussian_filter(ideal, sigma, mode="constant")
        # Normalise like alpha: by the 90th percentile over the pixels a detection's core would hold.
        core = blurred[blurred >= CORE_COVERAGE]
        peak = np.percentile(core, 90) if core.size else 1.0
        best = max(best, _soft_iou(observed, np.clip(blurred / peak, 0.0, 1.0)))
    return best


def _soft_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.minimum(a, b).sum() / np.maximum(a, b).sum())


def _achromatic_blobs(
    chroma: np.ndarray, deviation: np.ndarray, support: np.ndarray, min_pixels: float, scale: float
) -> list[Detection]:
    """Colourless marks far from the background and away from any coloured object."""
    near_objects = ndimage.binary_dilation(support, _EIGHT_CONNECTED)
    mask = (deviation > ACHROMATIC_DEVIATION) & (chroma < CHROMA_MIN) & ~near_objects
    labels, n_components = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    blobs = [(labels == j).astype(np.float32) for j in range(1, n_components + 1)]
    return [_measure(blob, None, 180.0, scale, with_fits=False) for blob in blobs if blob.sum() >= min_pixels]


def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
        raise ValueError(f"images must be [B, 3, H, H], got {tuple(images.shape)}")
    low, high = images.min().item(), images.max().item()
    if low < -0.1 or high > 1.1:
        raise ValueError(
            f"images must be in [0, 1], got values in [{low:.2f}, {high:.2f}]; map a model's [-1, 1] "
            "output with (x + 1) / 2"
        )


# -------------------------------------------------------------------------------------------- judging


def _concepts(spec: SceneSpec, detections: list[Detection], judge: Judge) -> list[tuple[str, str, bool]]:
    """(group, name, satisfied) for every concept the prompt states, then the no-extra-objects check.

    Names are "<colour> <shape>/<concept>" per mentioned object, then "relation" and "no_extra".
    """
    colors = {judge.color_of(det) for det in detections}
    shapes = {judge.shape_of(det) for det in detections}
    matches = [[det for det in detections if judge.matches(det, obj)] for obj in spec.objects]
    concepts = []
    for obj, found in zip(spec.objects, matches, strict=True):
        name = f"{obj.color} {obj.shape}"
        concepts += [
            ("object", f"{name}/object", bool(found)),
            ("attribute", f"{name}/color", obj.color in colors),
            ("attribute", f"{name}/shape", obj.shape in shapes),
        ]
        if obj.count > 1:
            concepts.append(("attribute", f"{name}/count", len(found) == obj.count))
        if obj.size is not None:
            concepts.append(
                ("attribute", f"{name}/size", any(judge.size_of(det) == obj.size for det in found))
            )
        if obj.position is not None:
            placed = any(position_holds(obj.position, det.cx, det.cy) for det in found)
            concepts.append(("position", f"{name}/position", placed))
    if spec.relation is not None:
        related = any(
            relation_holds(spec.relation, (a.cx, a.cy), (b.cx, b.cy), strict=judge.dominant_axis)
            for a in matches[0]
            for b in matches[1]
        )
        concepts.append(("relation", "relation", related))
    concepts.append(("no_extra", "no_extra", _no_extra(spec, detections, matches, judge)))
    return concepts


def _no_extra(
    spec: SceneSpec, detections: list[Detection], matches: list[list[Detection]], judge: Judge
) -> bool:
    """Every detection is a mentioned object and each mentioned object appears exactly `count` times."""
    explained = sum(any(judge.matches(det, obj) for obj in spec.objects) for det in detections)
    exact = all(len(found) == obj.count for obj, found in zip(spec.objects, matches, strict=True))
    return explained == len(detections) and exact


def verify(images: torch.Tensor, specs: list[SceneSpec | str], strict: bool = False) -> VerifyResult:
    """Check each image [B, 3, H, W] in [0, 1] against its spec (or prompt text); see `VerifyResult`.

    `strict` uses STRICT_JUDGE: tighter shape fits and hues, a size dead zone and dominant-axis relations.
    """
    # 1. Check inputs.
    _check_images(images)
    if len(specs) != len(images):
        raise ValueError(f"got {len(images)} images but {len(specs)} specs")
    specs = [parse_prompt(spec) if isinstance(spec, str) else spec for spec in specs]
    judge = STRICT_JUDGE if strict else MAIN_JUDGE

    # 2. Detect objects and judge every concept.
    per_sample = [_concepts(spec, dets, judge) for spec, dets in zip(specs, detect_objects(images), strict=True)]

    # 3. Aggregate per group, NaN where the group does not apply.
    groups = {}
    for group in VerifyResult.GROUPS:
        values = []
        for concepts in per_sample:
            verdicts = [ok for g, _, ok in concepts if g == group]
            values.append(sum(verdicts) / len(verdicts) if verdicts else math.nan)
        groups[group] = torch.tensor(values, dtype=torch.float32)
    score = [sum(ok for _, _, ok in concepts) / len(concepts) for concepts in per_sample]
    passed = [all(ok for _, _, ok in concepts) for concepts in per_sample]
    return VerifyResult(
        **groups,
        passed=torch.tensor(passed, dtype=torch.float32),
        score=torch.tensor(score, dtype=torch.float32),
        concepts=[{name: ok for _, name, ok in concepts} for concepts in per_sample],
    )


def verify_strict(images: torch.Tensor, specs: list[SceneSpec | str]) -> VerifyResult:
    """The strict second judge, reported beside `verify` to catch exploits of the main one."""
    return verify(images, specs, strict=True)


# ---------------------------------------------------------------------------------------- cleanliness


def cleanliness(images: torch.Tensor) -> torch.Tensor:
    """How clean each image [B, 3, H, H] in [0, 1] is, in [0, 1]: explained foreground x plain background.

    - explained foreground: of the pixels further than FOREGROUND_DEVIATION from the background (max over
      channels), the fraction inside detected coloured objects grown by one pixel; 1 if there are none;
    - plain background: 1 - (mean abs deviation from BACKGROUND outside the objects) /
      BACKGROUND_DEVIATION_SCALE, clipped at 0, so faint speckle lowers it.

    A clean render scores 1; uniform +-0.05 speckle scores about 0.75.
    """
    _check_images(images)
    background = torch.tensor(BACKGROUND, dtype=torch.float32)[:, None, None]
    difference = (images.detach().float().cpu() - background).abs()
    deviation, mean_deviation = difference.amax(dim=1).numpy(), difference.mean(dim=1).numpy()
    scores = []
    for i, (_, support) in enumerate(_detect_batch(images)):
        covered = ndimage.binary_dilation(support, _EIGHT_CONNECTED)
        foreground = deviation[i] > FOREGROUND_DEVIATION
        explained = (foreground & covered).sum() / foreground.sum() if foreground.any() else 1.0
        background_deviation = mean_deviation[i][~covered].mean() if (~covered).any() else 0.0
        plain = max(0.0, 1.0 - background_deviation / BACKGROUND_DEVIATION_SCALE)
        scores.append(float(explained) * plain)
    return torch.tensor(scores, dtype=torch.float32)


def shape_fidelity(images: torch.Tensor) -> torch.Tensor:
    """How well-formed the drawn objects of each image [B, 3, H, H] in [0, 1] are, in [0, 1]: the mean over its
    detected objects of the best shape fit (soft IoU with the ideal circle, square or triangle of the same area and
    centroid, sharp or through a template blur; `Detection.fits`). A colourless blob counts 0 (it has no shape), and
    an image with no object at all scores 0. Merged, broken or smeared shapes lower it; what the prompt asked for
    does not enter (that is the verifier's job), so on its own it can be raised by drawing fewer, cleaner shapes.
    """
    scores = []
    for detections in detect_objects(images):
        fits = [max(d.fits.values()) if d.fits else 0.0 for d in detections]
        scores.append(sum(fits) / len(fits) if fits else 0.0)
    return torch.tensor(scores, dtype=torch.float32)
