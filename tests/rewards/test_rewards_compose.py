"""Composite rewards against hand-computed values: weighted sum, log-sigmoid conjunction, PAR, ensembles."""

import math

import pytest
import torch

from visalign import rewards
from visalign.rewards import Reward, RewardError
from visalign.rewards.compose import Ensemble, LogSigmoidSum, PARSigmoid, WeightedSum


class Channel(Reward):
    """Mean of one colour channel times a factor: differentiable, no prompts."""

    differentiable = True
    needs_prompts = False
    value_range = (0.0, 1.0)

    def __init__(self, channel: int, factor: float = 1.0, name: str | None = None, **kw):
        super().__init__(**kw)
        self.channel, self.factor = channel, factor
        self.name = name or f"channel{channel}"

    def score(self, *, prompts, images, videos, metadata):
        media = images if images is not None else videos.mean(dim=1)
        return media[:, self.channel].mean(dim=(1, 2)) * self.factor


class WithSubs(Channel):
    """Not differentiable, needs prompts, returns a sub-score dict."""

    differentiable = False
    needs_prompts = True

    def score(self, *, prompts, images, videos, metadata):
        value = super().score(prompts=prompts, images=images, videos=videos, metadata=metadata)
        return {"score": value, "half": value / 2}


def sig(x):
    return 1 / (1 + math.exp(-x))


def flat_images(values):
    """Images whose channel c is the constant values[b][c]."""
    return torch.tensor(values, dtype=torch.float32)[:, :, None, None].expand(-1, -1, 4, 4).contiguous()


IMAGES = flat_images([[0.2, 0.6, 0.9], [0.5, 0.1, 0.4]])


def test_weighted_sum_hand_values_and_sub_scores():
    r = WeightedSum({Channel(0): 2.0, Channel(1): -0.5})
    out = r(images=IMAGES)
    torch.testing.assert_close(out["score"], torch.tensor([2 * 0.2 - 0.5 * 0.6, 2 * 0.5 - 0.5 * 0.1]))
    torch.testing.assert_close(out["channel0"], torch.tensor([0.2, 0.5]))
    torch.testing.assert_close(out["channel1"], torch.tensor([0.6, 0.1]))
    assert r.value_range == (-0.5, 2.0)
    assert r.differentiable and not r.needs_prompts


def test_weighted_sum_gradient_flows_to_pixels():
    r = WeightedSum({Channel(0): 1.0, Channel(2): 3.0})
    images = IMAGES.clone().requires_grad_(True)
    r(images=images)["score"].sum().backward()
    # d/dx of mean over 16 pixels: 1/16 on channel 0, 3/16 on channel 2, 0 on channel 1.
    torch.testing.assert_close(images.grad[:, 0], torch.full((2, 4, 4), 1 / 16))
    torch.testing.assert_close(images.grad[:, 1], torch.zeros(2, 4, 4))
    torch.testing.assert_close(images.grad[:, 2], torch.full((2, 4, 4), 3 / 16))


def test_non_differentiable_member_makes_the_composite_non_differentiable():
    r = WeightedSum({Channel(0): 1.0, WithSubs(1, name="subs"): 1.0})
    assert not r.differentiable and r.needs_prompts
    with pytest.raises(RewardError, match="not differentiable"):
        r(prompts=["a", "b"], images=IMAGES.clone().requires_grad_(True))
    out = r(prompts=["a", "b"], images=IMAGES)
    torch.testing.assert_close(out["subs/half"], torch.tensor([0.3, 0.05]))
    torch.testing.assert_close(out["score"], torch.tensor([0.8, 0.6]))


def test_members_by_registry_name_and_duplicate_names():
    r = WeightedSum({"world-cleanliness": 1.0, Channel(0): 0.0})
    assert r.members["world-cleanliness"] is rewards.load("world-cleanliness")
    with pytest.raises(ValueError, match="two members are named 'channel0'"):
        WeightedSum({Channel(0): 1.0, Channel(0, factor=2.0): 1.0})


def test_log_sigmoid_sum_hand_values():
    # u = log sigmoid(r - ref), summed: Wang et al. 2024.
    r = LogSigmoidSum({Channel(0): 0.3, Channel(1): {"p": 0.5, "q": 0.0}})
    out = r(prompts=["p", "q"], images=IMAGES)

    def log_sigmoid(x):
        return -math.log1p(math.exp(-x))

    expected = [log_sigmoid(0.2 - 0.3) + log_sigmoid(0.6 - 0.5), log_sigmoid(0.5 - 0.3) + log_sigmoid(0.1 - 0.0)]
    torch.testing.assert_close(out["score"], torch.tensor(expected))
    torch.testing.assert_close(out["channel0/utility"], torch.tensor([log_sigmoid(-0.1), log_sigmoid(0.2)]))
    with pytest.raises(RewardError, match="no reference reward for prompt 'zzz'"):
        r(prompts=["p", "zzz"], images=IMAGES)


def test_par_sigmoid_single_and_multiple_references():
    r = PARSigmoid(Channel(0, factor=10.0), ref=3.0)
    out = r(images=IMAGES)
    torch.testing.assert_close(out["score"], torch.tensor([sig(2.0 - 3.0), sig(5.0 - 3.0)]))
    torch.testing.assert_close(out["channel0"], torch.tensor([2.0, 5.0]))
    multi = PARSigmoid(Channel(0, factor=10.0), ref={"p": [1.0, 4.0], "q": [6.0, 5.0]})
    out = multi(prompts=["p", "q"], images=IMAGES)
    expected = [(sig(2 - 1) + sig(2 - 4)) / 2, (sig(5 - 6) + sig(5 - 5)) / 2]
    torch.testing.assert_close(out["score"], torch.tensor(expected))
    assert multi.value_range == (0.0, 1.0)


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("mean", [(0.2 + 0.6 + 0.9) / 3, (0.5 + 0.1 + 0.4) / 3]),
        ("min", [0.2, 0.1]),
        # population std: sqrt(mean((x - mean)^2))
        ("mean_minus_std", [
            (0.2 + 0.6 + 0.9) / 3 - 2 * math.sqrt(((0.2 - 17 / 30) ** 2 + (0.6 - 17 / 30) ** 2
                                                   + (0.9 - 17 / 30) ** 2) / 3),
            1 / 3 - 2 * math.sqrt(((0.5 - 1 / 3) ** 2 + (0.1 - 1 / 3) ** 2 + (0.4 - 1 / 3) ** 2) / 3),
        ]),
    ],
)
def test_ensemble_modes_hand_values(mode, expected):
    r = Ensemble([Channel(0), Channel(1), Channel(2)], mode=mode, k=2.0)
    out = r(images=IMAGES)
    torch.testing.assert_close(out["score"], torch.tensor(expected, dtype=torch.float32))
    assert set(out) >= {"mean", "std", "channel0", "channel1", "channel2"}


def test_ensemble_gradient_is_finite_when_members_agree():
    r = Ensemble([Channel(0, name="a"), Channel(0, name="b")], mode="mean_minus_std")
    images = IMAGES.clone().requires_grad_(True)
    r(images=images)["score"].sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_composites_nest_and_validate():
    inner = PARSigmoid(Channel(0, factor=10.0), ref=3.0, name="par")
    outer = WeightedSum({inner: 2.0, Channel(1): 1.0})
    out = outer(images=IMAGES)
    torch.testing.assert_close(out["score"], torch.tensor([2 * sig(-1.0) + 0.6, 2 * sig(2.0) + 0.1]))
    torch.testing.assert_close(out["par/channel0"], torch.tensor([2.0, 5.0]))
    with pytest.raises(ValueError, match="mode='median' is not one of"):
        Ensemble([Channel(0)], mode="median")
    with pytest.raises(ValueError, match="at least one member"):
        WeightedSum({})
    with pytest.raises(TypeError, match="registry name or a visalign.rewards.Reward"):
        WeightedSum({3: 1.0})


class Broken(Channel):
    def score(self, *, prompts, images, videos, metadata):
        value = super().score(prompts=prompts, images=images, videos=videos, metadata=metadata)
        return torch.where(value > 0.3, torch.full_like(value, float("inf")), value)


def test_invalid_member_scores_follow_the_callers_choice():
    r = WeightedSum({Broken(0, name="broken"): 1.0, Channel(1): 1.0})
    with pytest.raises(RewardError, match=r"weighted_sum\[score\] returned non-finite values at \[1\]"):
        r(images=IMAGES)
    out = r(images=IMAGES, allow_invalid=True)
    assert out["score"][0].item() == pytest.approx(0.8) and out["score"][1].isnan()
    assert out["broken"][1].isnan()


def test_style_rewards_by_hand():
    from visalign import rewards

    img = torch.zeros(2, 3, 2, 2)
    img[0, 0] = 1.0  # pure red: saturation 1, luma 0.299
    img[1] = 0.5  # grey: saturation 0, luma 0.5
    img[1, :, 0, 0] = torch.tensor([1.0, 0.5, 0.5])  # one pixel at saturation 0.5
    sat = rewards.load("saturation")(images=img)
    torch.testing.assert_close(sat, torch.tensor([1.0, 0.125]), atol=1e-5, rtol=0)
    area = rewards.load("saturation", mode="area", threshold=0.25)(images=img)
    assert area[0] > 0.99 and 0.24 < area[1] < 0.26  # one of four pixels above 0.25
    luma = rewards.load("brightness")(images=img)
    torch.testing.assert_close(luma, torch.tensor([0.299, 0.5 + 0.299 * 0.5 / 4]), atol=1e-5, rtol=0)
    x = img.clone().requires_grad_(True)
    rewards.load("saturation")(images=x).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
