"""VLM-RM (`vlm-rm`): the goal-baseline projected CLIP reward against the formula applied by hand to embeddings of
the same tiny open_clip model, its limits (alpha = 0 is the cosine, alpha = 1 only the goal direction), gradient to
the pixels, and its option errors before any weights load."""

import pytest
import torch
import torchvision.transforms as T

from visalign import rewards
from visalign.rewards import RewardError
from visalign.rewards.clip_family import VLMRM, tiny_open_clip, tiny_open_clip_tokenizer
from visalign.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

PROMPTS = ["a red circle", "a blue square", "a red circle"]
BASELINES = ["a shape", "a picture of shapes"]


@pytest.fixture(scope="module")
def images():
    return torch.rand(3, 3, 40, 48, generator=torch.Generator().manual_seed(1))  # non-square: the squash matters


@pytest.fixture(scope="module")
def embeddings(images):
    """x, the prompts' g and the averaged baseline b, from the same tiny model with torchvision's transform (the
    reference's `Resize((32, 32), BICUBIC)` + `Normalize` on the float tensor)."""
    model, tokenizer = tiny_open_clip(0), tiny_open_clip_tokenizer()
    transform = T.Compose([T.Resize((32, 32), T.InterpolationMode.BICUBIC, antialias=True),
                           T.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)])
    with torch.no_grad():
        x = model.encode_image(torch.stack([transform(im) for im in images]), normalize=True)
        g = model.encode_text(tokenizer(PROMPTS), normalize=True)
        b = model.encode_text(tokenizer(BASELINES), normalize=True).mean(0)  # averaged, not renormalised
    return x, g, b


def by_hand(x, g, b, alpha):
    """R = 1 - 1/2 ||(x - g) P||^2 with the projection matrix built explicitly, one sample at a time."""
    out = []
    for xi, gi in zip(x, g.expand_as(x), strict=True):
        d = (gi - b)[:, None]
        P = alpha * d @ d.T / (d.T @ d) + (1 - alpha) * torch.eye(len(xi))
        out.append(1 - 0.5 * ((xi - gi)[None] @ P).pow(2).sum())
    return torch.stack(out)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_reward_equals_the_formula_on_the_models_embeddings(images, embeddings, alpha):
    x, g, b = embeddings
    reward = VLMRM.tiny(0, baseline=BASELINES, alpha=alpha)
    torch.testing.assert_close(reward(prompts=PROMPTS, images=images), by_hand(x, g, b, alpha), atol=1e-5,
                               rtol=1e-5)


def test_alpha_zero_is_the_cosine_and_one_keeps_only_the_goal_direction(images, embeddings):
    x, g, b = embeddings
    plain = VLMRM.tiny(0)(prompts=PROMPTS, images=images)  # no baseline needed
    torch.testing.assert_close(plain, (x * g).sum(-1), atol=1e-5, rtol=1e-5)
    d = (g - b) / (g - b).norm(dim=-1, keepdim=True)
    projected = VLMRM.tiny(0, baseline=BASELINES, alpha=1.0)(prompts=PROMPTS, images=images)
    torch.testing.assert_close(projected, 1 - 0.5 * ((x - g) * d).sum(-1).pow(2), atol=1e-5, rtol=1e-5)


def test_a_fixed_goal_list_is_averaged_for_every_sample(images, embeddings):
    x, _, b = embeddings
    goal = ["a red circle", "a blue square"]
    g = tiny_open_clip(0).encode_text(tiny_open_clip_tokenizer()(goal), normalize=True).mean(0).detach()
    reward = VLMRM.tiny(0, goal=goal, baseline=BASELINES, alpha=0.5)
    assert not reward.needs_prompts
    torch.testing.assert_close(reward(images=images), by_hand(x, g, b, 0.5), atol=1e-5, rtol=1e-5)


def test_gradient_reaches_the_pixels(images):
    pixels = images.clone().requires_grad_(True)
    VLMRM.tiny(0, baseline="a shape", alpha=0.5)(prompts=PROMPTS, images=pixels).sum().backward()
    assert torch.isfinite(pixels.grad).all() and pixels.grad.abs().sum() > 0


def test_registered_with_its_attributes_and_option_errors_before_loading():
    d = rewards.describe("vlm-rm")
    assert d["differentiable"] and d["value_range"] == (-1.0, 1.0) and d["class"].endswith("VLMRM")
    rewards.check_options("vlm-rm", {"baseline": "a shape", "alpha": 0.5, "pretrained": "/ckpt/open_clip.bin"})
    for options, match in [({"alpha": 0.5}, "give baseline="), ({"alpha": 1.5, "baseline": "x"}, r"in \[0, 1\]"),
                           ({"goal": []}, "non-empty list of prompts"), ({"gaol": "x"}, "takes no option")]:
        with pytest.raises(ValueError, match=match):
            rewards.check_options("vlm-rm", options)
    with pytest.raises(RewardError, match="equals the baseline's"):
        VLMRM.tiny(0, baseline="a red circle", alpha=0.5)(prompts=PROMPTS, images=torch.rand(3, 3, 32, 32))
