import math
import random
import time

import pytest
import torch

from visalign.world.grammar import (
    COLORS,
    POSITIONS,
    TEMPLATES,
    SceneSpec,
    all_specs,
    counterfactuals,
    parse_prompt,
)
from visalign.world.render import BACKGROUND, CANVAS, PlacedShape, draw_layout, render, render_batch
from visalign.world.verify import (
    VerifyResult,
    cleanliness,
    detect_objects,
    shape_fidelity,
    verify,
    verify_strict,
)

torch.set_num_threads(1)

N_DEFAULT = 300  # renders per check in the default run, spread evenly over the templates
N_SLOW = 2000


def specs_per_template(n: int, seed: int) -> list[SceneSpec]:
    """n specs, an equal share per template, drawn from seen and held-out compositions alike."""
    rng = random.Random(seed)
    return [rng.choice(all_specs(template)) for template in TEMPLATES for _ in range(n // len(TEMPLATES))]


def pass_rate_per_template(result: VerifyResult, specs: list[SceneSpec]) -> dict[str, float]:
    rates = {}
    for template in TEMPLATES:
        rows = [i for i, spec in enumerate(specs) if spec.template == template]
        rates[template] = result.passed[rows].mean().item()
    return rates


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    offsets = torch.arange(-3, 4, dtype=torch.float32)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).repeat(3, 1, 1, 1)
    padded = torch.nn.functional.pad(images, (3, 3, 3, 3), mode="replicate")
    rows = torch.nn.functional.conv2d(padded, kernel.view(3, 1, 1, 7), groups=3)
    return torch.nn.functional.conv2d(rows, kernel.view(3, 1, 7, 1), groups=3)


def check_rejection(n: int, seed: int) -> dict[str, float]:
    specs = specs_per_template(n, seed)
    images = render_batch(specs, seed)
    pairs = [(i, kind, wrong) for i, spec in enumerate(specs) for kind, wrong in counterfactuals(spec)]
    result = verify(images[[i for i, _, _ in pairs]], [wrong for _, _, wrong in pairs])
    rates = {}
    for kind in sorted({kind for _, kind, _ in pairs}):
        rows = [j for j, (_, k, _) in enumerate(pairs) if k == kind]
        rates[kind] = 1.0 - result.passed[rows].mean().item()
    return rates


@pytest.fixture(scope="module")
def clean():
    specs = specs_per_template(N_DEFAULT, seed=0)
    return specs, render_batch(specs, 0)


# ---------------------------------------------------------------------------------------------- renderer


def test_render_is_deterministic_and_in_range():
    spec = parse_prompt("three cyan triangles")
    image = render(spec, 5)
    assert image.shape == (3, CANVAS, CANVAS) and image.dtype == torch.float32
    assert image.min() >= 0.0 and image.max() <= 1.0
    assert torch.equal(image, render(spec, 5))
    assert not torch.equal(image, render(spec, 6))
    generator = torch.Generator().manual_seed(5)
    assert torch.equal(render(spec, generator), render(spec, torch.Generator().manual_seed(5)))


def test_render_batch_matches_its_specs_and_background_is_plain():
    specs = specs_per_template(12, seed=1)
    images = render_batch(specs, 7)
    assert images.shape == (12, 3, CANVAS, CANVAS)
    assert torch.equal(images, render_batch(specs, 7))
    # Objects stay 1 px off the border, so the border rows are pure background.
    border = torch.cat([images[:, :, 0, :], images[:, :, -1, :]], dim=-1)
    assert torch.allclose(border, torch.tensor(BACKGROUND)[None, :, None].expand_as(border))


def test_render_is_anti_aliased():
    image = draw_layout([PlacedShape("circle", COLORS["red"], 16.0, 16.0, 10.0)])
    green = image[1]  # red's green channel is far from the background's
    partial = (green < BACKGROUND[1] - 0.01) & (green > COLORS["red"][1] + 0.01)
    assert partial.sum() > 10  # edge pixels blend object and background


# ------------------------------------------------------------------------------------- clean renders


def test_clean_renders_pass(clean):
    specs, images = clean
    result = verify(images, specs)
    rates = pass_rate_per_template(result, specs)
    assert all(rate >= 0.99 for rate in rates.values()), rates
    assert result.score.min().item() == 1.0


def test_result_groups_apply_where_the_prompt_states_them(clean):
    specs, images = clean
    result = verify(images, specs)
    for i, spec in enumerate(specs):
        assert math.isnan(result.position[i]) == (spec.template != "position")
        assert math.isnan(result.relation[i]) == (spec.template != "relation")
        assert not math.isnan(result.object[i]) and not math.isnan(result.attribute[i])
    assert set(result.sub_scores()) == {
        "object",
        "attribute",
        "position",
        "relation",
        "no_extra",
        "passed",
        "score",
    }


def test_verify_accepts_prompt_text(clean):
    specs, images = clean
    by_spec = verify(images[:12], specs[:12])
    by_text = verify(images[:12], [spec.prompt for spec in specs[:12]])
    assert torch.equal(by_spec.passed, by_text.passed)


def test_strict_judge_agrees_on_clean_renders(clean):
    specs, images = clean
    agreement = (verify(images, specs).passed == verify_strict(images, specs).passed).float().mean().item()
    assert agreement >= 0.98


def test_wrong_prompts_are_rejected():
    rates = check_rejection(N_DEFAULT, seed=1)
    assert all(rate >= 0.99 for rate in rates.values()), rates


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda x, g: gaussian_blur(x, 0.7),
        lambda x, g: (x + 0.03 * torch.randn(x.shape, generator=g)).clamp(0, 1),
        lambda x, g: (gaussian_blur(x, 0.5) + 0.03 * torch.randn(x.shape, generator=g)).clamp(0, 1),
    ],
    ids=["blur", "noise", "blur+noise"],
)
def test_mild_blur_and_noise_still_pass(clean, corrupt):
    specs, images = clean
    corrupted = corrupt(images, torch.Generator().manual_seed(0))
    assert verify(corrupted, specs).passed.mean().item() >= 0.95


# --------------------------------------------------------------------------------- targeted concepts


def scene(*shapes: tuple[str, str, float, float, float]) -> torch.Tensor:
    """One image [1, 3, 32, 32] of (colour, shape, cx, cy, width) objects."""
    return draw_layout([PlacedShape(shape, COLORS[color], cx, cy, w) for color, shape, cx, cy, w in shapes])[
        None
    ]


def concepts(image: torch.Tensor, prompt: str, strict: bool = False) -> dict[str, bool]:
    return verify(image, [prompt], strict=strict).concepts[0]


def test_detect_objects_reads_colour_shape_and_place():
    image = scene(
        ("red", "circle", 8, 10, 9), ("blue", "square", 24, 20, 10), ("green", "triangle", 12, 25, 9)
    )
    found = sorted((d.color, d.best_shape, round(d.cx), round(d.cy)) for d in detect_objects(image)[0])
    assert found == [("blue", "square", 24, 20), ("green", "triangle", 12, 25), ("red", "circle", 8, 10)]


def test_wrong_colour_fails_object_and_colour_but_not_shape():
    result = concepts(scene(("blue", "circle", 16, 16, 10)), "a red circle")
    assert result == {
        "red circle/object": False,
        "red circle/color": False,
        "red circle/shape": True,
        "no_extra": False,
    }


@pytest.mark.parametrize("drawn", ["square", "triangle"])
def test_wrong_shape_fails_object_and_shape(drawn):
    result = concepts(scene(("red", drawn, 16, 16, 11)), "a red circle")
    assert result == {
        "red circle/object": False,
        "red circle/color": True,
        "red circle/shape": False,
        "no_extra": False,
    }


def test_count_must_be_exact():
    two = scene(("green", "triangle", 8, 16, 9), ("green", "triangle", 24, 16, 9))
    three = scene(
        ("green", "triangle", 6, 16, 8), ("green", "triangle", 16, 16, 8), ("green", "triangle", 26, 16, 8)
    )
    assert verify(torch.cat([two, three]), ["two green triangles"] * 2).passed.tolist() == [1.0, 0.0]
    assert concepts(three, "two green triangles")["green triangle/count"] is False
    assert verify(two, ["a green triangle"]).passed.item() == 0.0  # a second copy is an extra object


def test_size_small_and_large():
    small, large = scene(("blue", "square", 16, 16, 7)), scene(("blue", "square", 16, 16, 14))
    images = torch.cat([small, large])
    assert verify(images, ["a small blue square", "a large blue square"]).passed.tolist() == [1.0, 1.0]
    assert verify(images, ["a large blue square", "a small blue square"]).passed.tolist() == [0.0, 0.0]
    assert concepts(small, "a large blue square")["blue square/size"] is False


@pytest.mark.parametrize(
    ("cx", "cy", "holds"),
    [(6, 16, "left"), (26, 16, "right"), (16, 6, "top"), (16, 26, "bottom")],
)
def test_position_uses_thirds_of_the_canvas(cx, cy, holds):
    image = scene(("yellow", "circle", cx, cy, 9))
    centre = scene(("yellow", "circle", 16, 16, 9))
    for position, phrase in POSITIONS.items():
        assert concepts(image, f"a yellow circle {phrase}")["yellow circle/position"] is (position == holds)
        assert concepts(centre, f"a yellow circle {phrase}")["yellow circle/position"] is False


def test_relation_and_its_mirror():
    image = scene(("red", "circle", 8, 16, 9), ("blue", "square", 24, 16, 9))
    prompts = [
        "a red circle to the left of a blue square",
        "a blue square to the right of a red circle",
        "a red circle to the right of a blue square",
        "a red circle above a blue square",
    ]
    assert verify(image.expand(4, -1, -1, -1), prompts).passed.tolist() == [1.0, 1.0, 0.0, 0.0]


def test_extra_object_fails_the_whole_prompt_only():
    image = scene(
        ("red", "circle", 8, 16, 9), ("blue", "square", 24, 16, 9), ("green", "triangle", 16, 27, 8)
    )
    result = verify(image, ["a red circle to the left of a blue square"])
    assert result.object.item() == 1 and result.attribute.item() == 1 and result.relation.item() == 1
    assert result.no_extra.item() == 0 and result.passed.item() == 0
    assert 0.8 < result.score.item() < 1.0


def test_colourless_blob_is_an_extra_object():
    image = scene(("red", "circle", 10, 16, 10))
    image[0, :, 12:20, 22:30] = 0.1  # a dark grey square
    assert verify(image, ["a red circle"]).no_extra.item() == 0


def test_strict_judge_rejects_a_diagonal_relation():
    # B is 6 px to the right of A but 18 px below it: "left of" only in the lenient reading.
    image = scene(("red", "circle", 9, 6, 8), ("blue", "square", 15, 24, 8))
    prompts = ["a red circle to the left of a blue square", "a red circle above a blue square"]
    assert verify(image.expand(2, -1, -1, -1), prompts).passed.tolist() == [1.0, 1.0]
    assert verify_strict(image.expand(2, -1, -1, -1), prompts).passed.tolist() == [0.0, 1.0]


def test_strict_judge_rejects_an_ambiguous_shape():
    # A square with rounded corners (3.5 px straight half-edge, 2 px radius), between square and circle.
    yy, xx = torch.meshgrid(torch.arange(32) + 0.5, torch.arange(32) + 0.5, indexing="ij")
    corner_distance = torch.stack([(xx - 16).abs() - 3.5, (yy - 16).abs() - 3.5]).clamp(min=0).norm(dim=0)
    alpha = (corner_distance <= 2.0).float()
    red = torch.tensor(COLORS["red"])[:, None, None]
    image = (torch.tensor(BACKGROUND)[:, None, None] * (1 - alpha) + red * alpha)[None]
    fits = detect_objects(image)[0][0].fits
    assert abs(fits["square"] - fits["circle"]) < 0.05
    best = max(fits, key=fits.get)
    assert verify(image, [f"a red {best}"]).passed.item() == 1.0
    assert verify_strict(image, [f"a red {best}"]).passed.item() == 0.0


def test_inputs_are_validated():
    with pytest.raises(ValueError, match=r"\[B, 3, H, H\]"):
        verify(torch.zeros(2, 1, 32, 32), ["a red circle"] * 2)
    with pytest.raises(ValueError, match="2 images but 1 specs"):
        verify(torch.zeros(2, 3, 32, 32), ["a red circle"])
    with pytest.raises(ValueError, match="unknown word 'hexagon'"):
        verify(torch.zeros(1, 3, 32, 32), ["a red hexagon"])
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        verify(torch.full((1, 3, 32, 32), -1.0), ["a red circle"])


def test_verify_works_at_higher_resolution(clean):
    specs, images = clean
    upsampled = torch.nn.functional.interpolate(images[::10], size=64, mode="bilinear", align_corners=False)
    assert verify(upsampled, specs[::10]).passed.mean().item() == 1.0


def test_a_batch_is_detected_once_across_world_rewards(monkeypatch):
    """The motion verifier, its cleanliness term and world-cleanliness share one detection per batch; the cache is
    keyed by the pixels, so an edited batch is detected afresh and matches a cold detection."""
    import sys

    from visalign.world.motion import render_clips, sample_motion_specs
    from visalign.world.rewards import WorldCleanlinessReward, WorldMotionReward

    module = sys.modules["visalign.world.verify"]
    specs = sample_motion_specs(4, "seen", generator=5)
    videos = render_clips(specs, 5)
    prompts = [s.prompt for s in specs]
    calls = []
    detect = module._detect_image
    monkeypatch.setattr(module, "_detect_image", lambda *a: calls.append(1) or detect(*a))
    module._detect_pixels.cache_clear()
    motion = WorldMotionReward().score(prompts=prompts, images=None, videos=videos, metadata=None)
    clean_score = WorldCleanlinessReward().score(prompts=prompts, images=None, videos=videos, metadata=None)
    assert len(calls) == videos.shape[0] * videos.shape[1]  # 36 frames, each detected once
    assert torch.equal(clean_score, motion["cleanliness"])
    edited = videos.clone()
    edited[0, :, :, 2:8, 2:8] = torch.tensor([0.9, 0.1, 0.1])[:, None, None]  # a red mark in every frame of clip 0
    frames = edited.reshape(-1, *edited.shape[2:])
    warm = detect_objects(frames)
    assert len(calls) == 2 * videos.shape[0] * videos.shape[1]
    module._detect_pixels.cache_clear()
    cold = detect_objects(frames)
    assert warm == cold and len(warm[0]) == len(detect_objects(videos.reshape(-1, *videos.shape[2:]))[0]) + 1
    warm[0].clear()  # a caller's list is its own
    assert detect_objects(frames)[0] == cold[0]


# --------------------------------------------------------------------------------------- cleanliness


def test_cleanliness_of_clean_and_speckled_renders(clean):
    _, images = clean
    speckle = (torch.rand(images.shape, generator=torch.Generator().manual_seed(0)) - 0.5) * 0.1
    clean_scores, noisy_scores = cleanliness(images), cleanliness((images + speckle).clamp(0, 1))
    assert clean_scores.min().item() >= 0.95
    assert noisy_scores.max().item() <= 0.85
    assert (clean_scores - noisy_scores).min().item() >= 0.1


def test_cleanliness_counts_unexplained_marks():
    image = scene(("red", "circle", 10, 16, 10))
    marked = image.clone()
    for row, col in [
        (3, 22),
        (6, 27),
        (9, 23),
        (14, 29),
        (18, 24),
        (22, 28),
        (26, 23),
        (28, 27),
        (25, 5),
        (4, 4),
    ]:
        marked[0, :, row, col] = torch.tensor(COLORS["blue"])  # isolated dots, each far below MIN_AREA
    assert cleanliness(image).item() == pytest.approx(1.0)
    assert cleanliness(marked).item() < 0.9
    assert verify(marked, ["a red circle"]).passed.item() == 1.0  # the dots are not objects


def test_shape_fidelity_of_renders_and_of_deformed_objects(clean):
    _, images = clean
    assert shape_fidelity(images).min().item() >= 0.98  # every rendered object is its ideal shape
    crisp = scene(("red", "circle", 10, 16, 10), ("blue", "square", 24, 16, 8))
    fits = [max(d.fits.values()) for d in detect_objects(crisp)[0]]
    assert shape_fidelity(crisp).item() == pytest.approx(sum(fits) / 2)
    # Two touching circles of one colour are one object that is no shape; smearing lowers the fit too.
    merged = scene(("red", "circle", 12, 16, 10), ("red", "circle", 19, 16, 10))
    assert shape_fidelity(merged).item() < 0.85
    assert shape_fidelity(gaussian_blur(crisp, 2.0)).item() < shape_fidelity(crisp).item() - 0.05
    # A colourless blob counts 0 in the mean; an image with no object scores 0.
    blob = crisp.clone()
    blob[0, :, 2:8, 2:8] = 0.1
    assert shape_fidelity(blob).item() == pytest.approx(sum(fits) / 3)
    assert shape_fidelity(torch.full((1, 3, 32, 32), BACKGROUND[0])).item() == 0.0
    # The registered reward is this function, and needs no prompt.
    from visalign import rewards

    torch.testing.assert_close(rewards.load("world-shape-fidelity")(images=blob), shape_fidelity(blob))


# ------------------------------------------------------------------------------------------ slow checks


@pytest.mark.slow
def test_clean_renders_pass_at_scale():
    specs = specs_per_template(N_SLOW, seed=10)
    images = render_batch(specs, 10)
    result, strict = verify(images, specs), verify_strict(images, specs)
    rates = pass_rate_per_template(result, specs)
    assert all(rate >= 0.99 for rate in rates.values()), rates
    assert (result.passed == strict.passed).float().mean().item() >= 0.98
    assert cleanliness(images).min().item() >= 0.95
    generator = torch.Generator().manual_seed(1)
    assert verify(gaussian_blur(images, 0.7), specs).passed.mean().item() >= 0.95
    noisy = (images + 0.03 * torch.randn(images.shape, generator=generator)).clamp(0, 1)
    assert verify(noisy, specs).passed.mean().item() >= 0.95


@pytest.mark.slow
def test_wrong_prompts_are_rejected_at_scale():
    rates = check_rejection(N_SLOW, seed=11)
    assert all(rate >= 0.99 for rate in rates.values()), rates


@pytest.mark.slow
def test_render_speed():
    specs = specs_per_template(N_SLOW, seed=12)
    start = time.perf_counter()
    render_batch(specs, 12)
    assert time.perf_counter() - start < 10.0


def test_concepts_are_named_per_object():
    image = scene(("red", "circle", 8, 16, 9), ("red", "square", 24, 16, 9))
    result = concepts(image, "a red circle and a red square")
    assert len(result) == 7 and all(result.values())
    assert {"red circle/color", "red square/color", "no_extra"} <= set(result)


def test_soft_world_reward_prefers_matching_renders_and_is_differentiable():
    from visalign import rewards
    from visalign.world.grammar import sample_specs
    from visalign.world.render import render_batch

    specs = sample_specs(60, "seen", generator=torch.Generator().manual_seed(0))
    images = render_batch(specs, 0)
    r = rewards.load("world-soft")
    right = r(prompts=[s.prompt for s in specs], images=images)
    # The same images judged against another prompt of the batch (a shifted pairing) score lower on average.
    wrong = r(prompts=[s.prompt for s in specs[1:] + specs[:1]], images=images)
    assert ((right >= 0) & (right <= 1)).all() and right.mean() > wrong.mean() + 0.15
    x = images[:4].clone().requires_grad_(True)
    r(prompts=[s.prompt for s in specs[:4]], images=x).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
