"""Compositional concept rewards from a structured prompt spec: an open-vocabulary detector path with
GenEval's rules and a VQA path (P("yes") per concept question, combined as T2I-CompBench / Soft-TIFA do).

The spec is GenEval's metadata format (djghosh13/geneval `prompts/evaluation_metadata.jsonl`), passed per
sample as `metadata=[{"include": [...], "exclude": [...], "tag": ...}]` (or under `metadata[i]["spec"]`):

    {"tag": "position", "include": [{"class": "dog", "count": 1},
                                    {"class": "cat", "count": 1, "position": ["left of", 0]}]}
    {"tag": "counting", "include": [{"class": "cup", "count": 3}], "exclude": [{"class": "cup", "count": 4}]}
    {"tag": "color_attr", "include": [{"class": "car", "count": 1, "color": "red"}, ...]}

`position: [relation, j]` places this clause's objects relative to clause j's objects.

Both rewards return the combined "score" plus group sub-scores "object", "attribute", "relation" (NaN where a
sample has no concept of that group) and "passed" (GenEval's all-or-nothing verdict for the detector path),
the same names the world's exact verifier uses, so trainers and the balancing module treat the three
concept sources alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from visalign.rewards.base import Reward, RewardError
from visalign.rewards.clip_family import tiny_hf_clip, tiny_hf_tokenizer
from visalign.rewards.preprocess import clip_preprocess, to_uint8_hwc
from visalign.rewards.vqa import BlipVQA
from visalign.rewards.weights import hf_model_and_processor

# transformers is imported where a model is built: it takes seconds to import.

# djghosh13/geneval `evaluation/evaluate_images.py`: COLORS, the three colour prompt templates, and the
# defaults THRESHOLD 0.3, COUNTING_THRESHOLD 0.9, MAX_OBJECTS 16, NMS off, POSITION_THRESHOLD 0.1.
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
COLOR_TEMPLATES = ("a photo of a {color} {object}", "a photo of a {color}-colored {object}",
                   "a photo of a {color} object")
RELATIONS = ("left of", "right of", "above", "below")
GROUPS = ("object", "attribute", "relation")


# ---- spec ---------------------------------------------------------------------------------------------------


def parse_spec(raw: object, index: int = 0) -> dict:
    """Validate one GenEval-style spec (dict, or a dict with "spec"); errors name the sample index."""
    if isinstance(raw, dict) and "spec" in raw and "include" not in raw:
        raw = raw["spec"]
    where = f"sample {index}"
    if not isinstance(raw, dict) or not isinstance(raw.get("include"), list) or not raw["include"]:
        raise RewardError(f"{where}: concept rewards need a GenEval-style spec with a non-empty 'include' list "
                          f"in metadata (see rewards/concepts.py), got {raw!r}")
    include = []
    for k, clause in enumerate(raw["include"]):
        if not isinstance(clause, dict) or not isinstance(clause.get("class"), str) or not clause["class"]:
            raise RewardError(f"{where}: include[{k}] needs a 'class' string, got {clause!r}")
        count = clause.get("count", 1)
        if not isinstance(count, int) or count < 1:
            raise RewardError(f"{where}: include[{k}].count must be an integer >= 1, got {count!r}")
        color = clause.get("color")
        if color is not None and color not in COLORS:
            raise RewardError(f"{where}: include[{k}].color {color!r} is not one of {COLORS}")
        position = clause.get("position")
        if position is not None:
            if (not isinstance(position, (list, tuple)) or len(position) != 2 or position[0] not in RELATIONS
                    or not isinstance(position[1], int) or not 0 <= position[1] < k):
                raise RewardError(f"{where}: include[{k}].position must be [relation, j] with relation in "
                                  f"{RELATIONS} and j an earlier clause index, got {position!r}")
            position = (position[0], position[1])
        include.append({"class": clause["class"], "count": count, "color": color, "position": position})
    exclude = []
    for k, clause in enumerate(raw.get("exclude", []) or []):
        if not isinstance(clause, dict) or not isinstance(clause.get("class"), str):
            raise RewardError(f"{where}: exclude[{k}] needs a 'class' string, got {clause!r}")
        count = clause.get("count", 1)
        if not isinstance(count, int) or count < 1:
            raise RewardError(f"{where}: exclude[{k}].count must be an integer >= 1, got {count!r}")
        exclude.append({"class": clause["class"], "count": count})
    return {"tag": raw.get("tag", ""), "include": include, "exclude": exclude}


def specs_from_metadata(metadata: Sequence[dict] | None, batch: int, name: str) -> list[dict]:
    if metadata is None:
        raise RewardError(f"{name} needs metadata=[{{'include': [...]}}, ...] (GenEval-style specs), one per image")
    return [parse_spec(m, i) for i, m in enumerate(metadata)]


def _plural(word: str, n: int) -> str:
    return word if n == 1 or word.endswith("s") else word + "s"


def _number(n: int) -> str:
    return ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")[n] if n <= 10 \
        else str(n)


def _noun_phrase(clause: dict) -> str:
    n, color = clause["count"], clause["color"]
    words = [_number(n) if n > 1 else "a"] + ([color] if color else []) + [_plural(clause["class"], n)]
    return " ".join(words)


def concept_questions(spec: dict) -> list[tuple[str, str, str]]:
    """(group, concept name, yes/no question) for each concept of a parsed spec, in include order."""
    out = []
    include = spec["include"]
    for k, clause in enumerate(include):
        cls, n = clause["class"], clause["count"]
        if n == 1:
            out.append(("object", f"{k}:{cls}", f"is there a {cls}?"))
        else:
            out.append(("object", f"{k}:{cls}", f"are there {_number(n)} {_plural(cls, n)}?"))
        if clause["color"]:
            verb = "is the" if n == 1 else "are the"
            out.append(("attribute", f"{k}:{cls}:{clause['color']}",
                        f"{verb} {_plural(cls, n)} {clause['color']}?"))
        if clause["position"]:
            relation, j = clause["position"]
            verb = "is the" if n == 1 else "are the"
            out.append(("relation", f"{k}:{cls}:{relation}:{j}",
                        f"{verb} {_plural(cls, n)} {relation} the {include[j]['class']}?"))
    return out


# ---- detector rules -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Detection:
    """One detected object: the query class it answers, its box (x0, y0, x1, y1) in pixels, its confidence."""

    label: str
    box: tuple[float, float, float, float]
    score: float


def relative_position(box_a: Sequence[float], box_b: Sequence[float], threshold: float = 0.1) -> set[str]:
    """Relations of box A to box B by GenEval's rule (`evaluate_images.py: relative_position`): the centre
    offset, shrunk by threshold × (size A + size B) per axis, normalised by the raw offset's length; a relation
    holds when its component passes ±0.5. Image y grows downwards, so "above" is dy < -0.5."""
    a, b = torch.tensor(box_a[:4], dtype=torch.float64), torch.tensor(box_b[:4], dtype=torch.float64)
    center_a, center_b = (a[:2] + a[2:]) / 2, (b[:2] + b[2:]) / 2
    dim_a, dim_b = (a[2:] - a[:2]).abs(), (b[2:] - b[:2]).abs()
    offset = center_a - center_b
    revised = (offset.abs() - threshold * (dim_a + dim_b)).clamp(min=0) * offset.sign()
    if bool((revised.abs() < 1e-3).all()):
        return set()
    dx, dy = (revised / offset.norm()).tolist()
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    # GenEval's compute_iou uses inclusive pixel boxes (+1); so does this.
    def area(box):
        return max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0)

    inter = area([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])])
    union = area(a) + area(b) - inter
    return inter / union if union else 0.0


def select_detections(detections: Sequence[Detection], threshold: float, max_objects: int = 16,
                      nms_iou: float | None = None) -> dict[str, list[Detection]]:
    """Per class: detections above `threshold`, most confident first, at most `max_objects`, then greedy NMS
    when `nms_iou` is set (GenEval's default is no NMS)."""
    by_class: dict[str, list[Detection]] = {}
    for det in sorted(detections, key=lambda d: -d.score):
        if det.score > threshold:
            by_class.setdefault(det.label, []).append(det)
    out = {}
    for label, dets in by_class.items():
        dets = dets[:max_objects]
        kept = []
        while dets:
            best = dets.pop(0)
            kept.append(best)
            if nms_iou is not None:
                dets = [d for d in dets if _iou(best.box, d.box) < nms_iou]
        out[label] = kept
    return out


@dataclass
class ConceptVerdict:
    """GenEval's all-or-nothing verdict, per-concept partial credits (group, name, credit in [0, 1]) and the
    reasons a strict check failed."""

    passed: bool
    concepts: list[tuple[str, str, float]]
    reasons: list[str]

    def group(self, group: str) -> float:
        values = [c for g, _, c in self.concepts if g == group]
        return sum(values) / len(values) if values else math.nan

    @property
    def partial(self) -> float:
        return sum(c for _, _, c in self.concepts) / len(self.concepts)


ColourFn = Callable[[str, list[Detection]], list[str]]


def judge(spec: dict, objects: dict[str, list[Detection]], colours: ColourFn | None = None,
          position_threshold: float = 0.1) -> ConceptVerdict:
    """Judge one image's selected detections against a parsed spec.

    `passed` follows GenEval's `evaluate` exactly: include clauses AND-ed (at least `count` objects; the
    `count` most confident have the colour; every one of them stands in the relation to every object of the
    target clause, which must itself have matched), exclude clauses OR-ed (fewer than `count` objects).
    Partial credit, for RL (in the spirit of flow_grpo's GenEval reward, which credits counts by
    1 − |found − n|/n): the object credit is 1 − |found − n|/n (floored at 0) when an exclude clause makes the
    count exact and min(found, n)/n otherwise; the attribute credit is the fraction of the n wanted objects
    found with the colour; the relation credit is 1 when every found pair satisfies it (0 with no objects).
    """
    passed, reasons, concepts = True, [], []
    matched_groups: list[list[Detection] | None] = []
    exact = {c["class"]: c["count"] for c in spec["exclude"]}
    for k, clause in enumerate(spec["include"]):
        cls, n = clause["class"], clause["count"]
        found_all = objects.get(cls, [])
        found = found_all[:n]
        matched = len(found) >= n
        if cls in exact and exact[cls] == n + 1:
            credit = max(0.0, 1.0 - abs(len(found_all) - n) / n)
        else:
            credit = min(len(found_all), n) / n
        concepts.append(("object", f"{k}:{cls}", credit))
        if not matched:
            passed = False
            reasons.append(f"expected {cls}>={n}, found {len(found)}")
        if clause["color"]:
            if colours is None:
                raise RewardError("the spec asks for a colour but no colour classifier was given")
            got = colours(cls, found) if found else []
            hits = got.count(clause["color"])
            concepts.append(("attribute", f"{k}:{cls}:{clause['color']}", hits / n))
            if matched and hits < n:
                passed = matched = False
                reasons.append(f"expected {clause['color']} {cls}>={n}, found {hits} {clause['color']}")
        if clause["position"]:
            relation, j = clause["position"]
            target = matched_groups[j]
            # For credit, use whatever was found of both clauses; the strict verdict needs both matched.
            target_found = objects.get(spec["include"][j]["class"], [])[:spec["include"][j]["count"]]
            ok_pairs = bool(found) and bool(target_found) and all(
                relation in relative_position(a.box, b.box, position_threshold) for a in found for b in target_found)
            concepts.append(("relation", f"{k}:{cls}:{relation}:{j}", float(ok_pairs)))
            if matched:
                if target is None:
                    passed = matched = False
                    reasons.append(f"no target for {cls} to be {relation}")
                elif not all(relation in relative_position(a.box, b.box, position_threshold)
                             for a in found for b in target):
                    passed = matched = False
                    reasons.append(f"expected {cls} {relation} target")
        matched_groups.append(found if matched else None)
    for clause in spec["exclude"]:
        cls, n = clause["class"], clause["count"]
        present = len(objects.get(cls, []))
        if present >= n:
            passed = False
            reasons.append(f"expected {cls}<{n}, found {present}")
        if cls not in {c["class"] for c in spec["include"]}:
            concepts.append(("object", f"no:{cls}", float(present < n)))
    return ConceptVerdict(passed=passed, concepts=concepts, reasons=reasons)


def _group_outputs(verdict_values: list[dict[str, float]], score_key: str) -> dict[str, Tensor]:
    keys = (*GROUPS, "passed", "score")
    out = {k: torch.tensor([v[k] for v in verdict_values], dtype=torch.float32) for k in keys if k != "score"}
    out["score"] = torch.tensor([v[score_key] for v in verdict_values], dtype=torch.float32)
    return out


# ---- detectors ----------------------------------------------------------------------------------------------


class HFZeroShotDetector:
    """An open-vocabulary detector from transformers: OWL-ViT, OWLv2 (`AutoModelForZeroShotObjectDetection`)
    or Grounding DINO, with its processor. Returns every detection above `min_score` for the given class names;
    thresholds per task are applied later by `select_detections`."""

    def __init__(self, model, processor=None, *, query_template: str = "a photo of a {}", min_score: float = 0.0,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        self.model, self.processor = hf_model_and_processor(
            model, processor, AutoModelForZeroShotObjectDetection, AutoProcessor, dtype=dtype, device=device,
            label="detector")
        self.device, self.dtype = torch.device(device), dtype
        self.query_template = query_template
        self.min_score = min_score
        self.kind = type(self.model).__name__

    @torch.no_grad()
    def __call__(self, images: Tensor, classes: Sequence[Sequence[str]]) -> list[list[Detection]]:
        height, width = images.shape[-2:]
        arrays = to_uint8_hwc(images)
        out = []
        for array, names in zip(arrays, classes, strict=True):  # one image at a time: queries differ per image
            names = list(dict.fromkeys(names))
            queries = [self.query_template.format(c) for c in names]
            if "GroundingDino" in self.kind:
                # Grounding DINO takes one lower-case string of "."-terminated phrases.
                inputs = self.processor(images=array, text=". ".join(q.lower() for q in queries) + ".",
                                        return_tensors="pt").to(self.device)
                outputs = self.model(**inputs)
                result = self.processor.post_process_grounded_object_detection(
                    outputs, inputs.input_ids, threshold=self.min_score, text_threshold=self.min_score,
                    target_sizes=[(height, width)])[0]
                lookup = {q.lower(): c for q, c in zip(queries, names, strict=True)}
                labels = [lookup.get(t, t) for t in result["text_labels"]]
            else:
                inputs = self.processor(text=[queries], images=array, return_tensors="pt").to(self.device)
                outputs = self.model(**inputs)
                # OWLv2 pads to a square at the bottom/right, so boxes scale by the padded side.
                side = max(height, width)
                size = (side, side) if "Owlv2" in self.kind else (height, width)
                result = self.processor.post_process_grounded_object_detection(
                    outputs, threshold=self.min_score, target_sizes=[size])[0]
                labels = [names[int(i)] for i in result["labels"]]
            out.append([Detection(label, tuple(float(v) for v in box), float(score))
                        for label, box, score in zip(labels, result["boxes"].tolist(), result["scores"].tolist(),
                                                     strict=True)])
        return out


class ColourClassifier:
    """GenEval's colour check: zero-shot CLIP over the 10 colours with 3 templates (class embedding = mean of
    the L2-normalised template embeddings, re-normalised: clip_benchmark `zero_shot_classifier`), applied to
    the box crop (PIL-style rounding of box corners), CLIP-preprocessed."""

    def __init__(self, model, tokenizer=None, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        from transformers import AutoTokenizer, CLIPModel

        self.model, self.tokenizer = hf_model_and_processor(model, tokenizer, CLIPModel, AutoTokenizer, dtype=dtype,
                                                            device=device, label="colour classifier")
        self.device, self.dtype = torch.device(device), dtype
        self._weights: dict[str, Tensor] = {}

    @torch.no_grad()
    def class_weights(self, object_name: str) -> Tensor:
        if object_name not in self._weights:
            rows = []
            for color in COLORS:
                texts = [t.format(color=color, object=object_name) for t in COLOR_TEMPLATES]
                tokens = self.tokenizer(texts, padding=True, return_tensors="pt").to(self.device)
                emb = F.normalize(self.model.get_text_features(**tokens).pooler_output, dim=-1)
                rows.append(F.normalize(emb.mean(0), dim=-1))
            self._weights[object_name] = torch.stack(rows)
        return self._weights[object_name]

    @torch.no_grad()
    def __call__(self, image: Tensor, object_name: str, detections: list[Detection]) -> list[str]:
        size = self.model.config.vision_config.image_size
        crops = []
        for det in detections:
            x0, y0, x1, y1 = (round(v) for v in det.box)
            # Keep at least one pixel inside the image (boxes may lie partly or wholly outside it).
            x0, y0 = min(max(x0, 0), image.shape[-1] - 1), min(max(y0, 0), image.shape[-2] - 1)
            x1, y1 = min(max(x1, x0 + 1), image.shape[-1]), min(max(y1, y0 + 1), image.shape[-2])
            crop = image[:, y0:y1, x0:x1]
            crops.append(clip_preprocess(crop[None].float(), size)[0])
        pixels = torch.stack(crops).to(self.device, self.dtype)
        features = F.normalize(self.model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        return [COLORS[i] for i in (features @ self.class_weights(object_name).T).argmax(1).tolist()]


class DetectorConceptReward(Reward):
    """GenEval-style concept reward from an open-vocabulary detector (OWLv2 / OWL-ViT / Grounding DINO) and a
    CLIP colour classifier. `mode="partial"` scores the mean of per-concept credits (a dense RL signal);
    `mode="strict"` scores GenEval's 1/0 verdict. GenEval's thresholds (0.3; 0.9 for counting) were set for
    Mask2Former: OWL-family confidences run lower, so calibrate `threshold` / `counting_threshold` for yours.

        >>> r = DetectorConceptReward("google/owlv2-base-patch16-ensemble",
        ...                           colour_model="openai/clip-vit-large-patch14")
        >>> r(prompts=p, images=x, metadata=[{"include": [{"class": "dog", "count": 2}]}])["score"]
    """

    name = "concepts-detector"
    differentiable = False
    value_range = (0.0, 1.0)
    needs_prompts = False

    def __init__(self, detector, processor=None, *, colour_model=None, colour_tokenizer=None,
                 mode: str = "partial", threshold: float = 0.3, counting_threshold: float = 0.9,
                 max_objects: int = 16, nms_iou: float | None = None, position_threshold: float = 0.1,
                 query_template: str = "a photo of a {}", batch_size: int = 8, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        super().__init__(batch_size=batch_size, device=device, dtype=dtype)
        if mode not in ("partial", "strict"):
            raise ValueError(f"{self.name}: mode must be 'partial' or 'strict', got {mode!r}")
        for label, value in (("threshold", threshold), ("counting_threshold", counting_threshold)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{self.name}: {label} must be in [0, 1), got {value}")
        if isinstance(detector, (str, Path, torch.nn.Module)):
            detector = HFZeroShotDetector(detector, processor, query_template=query_template, device=device,
                                          dtype=dtype)
        elif not callable(detector):
            raise ValueError(f"{self.name}: detector must be a model, a path / hub id, or a callable "
                             f"(images, classes) -> detections, got {type(detector).__name__}")
        self.detector = detector
        self.colours = None
        if colour_model is not None:
            self.colours = colour_model if isinstance(colour_model, ColourClassifier) else ColourClassifier(
                colour_model, colour_tokenizer, device=device, dtype=dtype)
        self.mode, self.threshold, self.counting_threshold = mode, threshold, counting_threshold
        self.max_objects, self.nms_iou, self.position_threshold = max_objects, nms_iou, position_threshold

    @classmethod
    def tiny(cls, seed: int = 0, **kwargs) -> DetectorConceptReward:
        """Random OWL-ViT and CLIP at a few ten thousand parameters with the tiny CLIP tokenizer (tests)."""

        model, processor = tiny_owlvit(seed)
        colours = ColourClassifier(tiny_hf_clip(seed), tiny_hf_tokenizer())
        return cls(model, processor, colour_model=colours, **kwargs)

    def score(self, *, prompts, images, videos, metadata):
        specs = specs_from_metadata(metadata, images.shape[0], self.name)
        classes = [[c["class"] for c in s["include"]] + [c["class"] for c in s["exclude"]] for s in specs]
        detections = self.detector(images, classes)
        values = []
        for image, spec, dets in zip(images, specs, detections, strict=True):
            threshold = self.counting_threshold if spec["tag"] == "counting" else self.threshold
            objects = select_detections(dets, threshold, self.max_objects, self.nms_iou)
            colours = None if self.colours is None else (lambda cls, ds, im=image: self.colours(im, cls, ds))
            verdict = judge(spec, objects, colours, self.position_threshold)
            values.append({**{g: verdict.group(g) for g in GROUPS}, "passed": float(verdict.passed),
                           "partial": verdict.partial})
        return _group_outputs(values, "passed" if self.mode == "strict" else "partial")


def tiny_owlvit(seed: int = 0, image_size: int = 32):
    """A random `OwlViTForObjectDetection` and its processor over the tiny CLIP tokenizer (tests, offline)."""
    from transformers import OwlViTConfig, OwlViTForObjectDetection, OwlViTImageProcessor, OwlViTProcessor

    torch.manual_seed(seed)
    config = OwlViTConfig(
        text_config={"vocab_size": 514, "hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4,
                     "num_hidden_layers": 2, "max_position_embeddings": 77, "bos_token_id": 512,
                     "eos_token_id": 513, "pad_token_id": 513},
        vision_config={"image_size": image_size, "patch_size": 8, "hidden_size": 32, "intermediate_size": 37,
                       "num_attention_heads": 4, "num_hidden_layers": 2},
        projection_dim=32)  # OWL's class head compares image embeddings with projected queries at this width
    model = OwlViTForObjectDetection(config).eval()
    processor = OwlViTProcessor(
        image_processor=OwlViTImageProcessor(size={"height": image_size, "width": image_size},
                                             crop_size={"height": image_size, "width": image_size}),
        tokenizer=tiny_hf_tokenizer())
    return model, processor


# ---- VQA path -----------------------------------------------------------------------------------------------


def combine_probabilities(probs: Tensor, how: str) -> Tensor:
    """Combine per-concept P(yes) [K] into one score: "product" (T2I-CompBench's BLIP-VQA), "geometric" (Soft-
    TIFA's prompt level, values clipped at 1e-12 first), or "mean" (Soft-TIFA's atom level, TIFA)."""
    if how == "product":
        return probs.prod()
    if how == "geometric":
        return probs.clamp(min=1e-12).log().mean().exp()
    if how == "mean":
        return probs.mean()
    raise ValueError(f"combine must be 'product', 'geometric' or 'mean', got {how!r}")


class VQAConceptReward(Reward):
    """Per-concept P("yes") from a yes/no answerer (`visalign.rewards.vqa.BlipVQA`, differentiable, or
    `visalign.rewards.vqa.VLMYesNo` over any HF vision-language model) for one question per concept of the spec,
    combined by `combine` ("product" as T2I-CompBench, "geometric" as Soft-TIFA, or "mean").

        >>> r = VQAConceptReward(BlipVQA("Salesforce/blip-vqa-capfilt-large"), combine="geometric")
        >>> r(prompts=p, images=x, metadata=specs)["score"]
    """

    name = "concepts-vqa"
    value_range = (0.0, 1.0)
    needs_prompts = False

    def __init__(self, answerer, *, combine: str = "product", batch_size: int = 8,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__(batch_size=batch_size, device=device, dtype=dtype)
        combine_probabilities(torch.ones(1), combine)  # validates the name now, not at the first call
        self.answerer, self.combine = answerer, combine
        self.differentiable = bool(getattr(answerer, "differentiable", False))

    @classmethod
    def tiny(cls, seed: int = 0, **kwargs) -> VQAConceptReward:
        return cls(BlipVQA.tiny(seed), **kwargs)

    def score(self, *, prompts, images, videos, metadata):
        specs = specs_from_metadata(metadata, images.shape[0], self.name)
        questions = [concept_questions(s) for s in specs]
        flat_images = torch.cat([images[i:i + 1].expand(len(q), -1, -1, -1) for i, q in enumerate(questions)])
        flat_probs = self.answerer.p_yes(flat_images, [text for q in questions for _, _, text in q])
        out = {g: [] for g in GROUPS}
        scores, start = [], 0
        for q in questions:
            probs = flat_probs[start:start + len(q)]
            start += len(q)
            scores.append(combine_probabilities(probs, self.combine))
            for g in GROUPS:
                members = [p for p, (group, _, _) in zip(probs, q, strict=True) if group == g]
                out[g].append(torch.stack(members).mean() if members else probs.new_tensor(math.nan))
        result = {g: torch.stack(v).float() for g, v in out.items()}
        result["score"] = torch.stack(scores).float()
        return result
