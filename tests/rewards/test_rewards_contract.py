"""The reward contract: registry, batching, input and output validation, and the world rewards."""

import math

import pytest
import torch

from visalign import rewards
from visalign.rewards import Reward, RewardError
from visalign.world.grammar import parse_prompt
from visalign.world.render import render_batch


class Brightness(Reward):
    name = "brightness"
    differentiable = True
    needs_prompts = False

    def __init__(self, bias: float = 0.0, **kw):
        super().__init__(**kw)
        self.bias, self.calls = bias, []

    def score(self, *, prompts, images, videos, metadata):
        self.calls.append(images.shape[0])
        return images.mean(dim=(1, 2, 3)) + self.bias


class Broken(Reward):
    name = "broken"
    needs_prompts = False

    def __init__(self, out, **kw):
        super().__init__(**kw)
        self.out = out

    def score(self, *, prompts, images, videos, metadata):
        return self.out


def test_batching_and_gradients():
    r = Brightness(batch_size=3)
    images = torch.rand(7, 3, 8, 8, requires_grad=True)
    out = r(images=images)
    assert r.calls == [3, 3, 1]
    torch.testing.assert_close(out, images.mean(dim=(1, 2, 3)))
    out.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_registry_load_list_cache_and_dotted_path():
    assert {"world-verifier", "world-strict", "world-cleanliness"} <= set(rewards.list_rewards())
    a = rewards.load("tests.rewards.test_rewards_contract.Brightness", bias=1.0)
    assert a is rewards.load("tests.rewards.test_rewards_contract.Brightness", bias=1.0)  # weights load once
    assert a is not rewards.load("tests.rewards.test_rewards_contract.Brightness", bias=2.0)
    with pytest.raises(ValueError, match=r"unknown reward 'pickscorez' \(did you mean 'pickscore'\?\); allowed: "
                                         r".*world-verifier"):
        rewards.load("pickscorez")
    with pytest.raises(ValueError, match="not a visalign.rewards.Reward subclass"):
        rewards.load("torch.nn.Linear")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"images": torch.rand(2, 8, 8)}, "B×3×H×W"),
        ({"images": torch.rand(2, 3, 8, 8) * 2}, r"in \[0, 1\]"),
        ({"images": torch.zeros(2, 3, 8, 8, dtype=torch.uint8)}, "floating point"),
        ({"videos": torch.rand(2, 3, 3, 8, 8)}, "not videos"),
        ({}, "exactly one of"),
    ],
)
def test_bad_inputs(kwargs, match):
    with pytest.raises(RewardError, match=match):
        Brightness()(**kwargs)


def test_prompts_and_metadata_lengths():
    r = rewards.load("world-verifier")
    with pytest.raises(RewardError, match="needs prompts"):
        r(images=torch.rand(2, 3, 32, 32))
    with pytest.raises(RewardError, match="list of 2 strings"):
        r(prompts=["a red circle"], images=torch.rand(2, 3, 32, 32))


@pytest.mark.parametrize(
    "out, match",
    [
        (torch.tensor([1.0, float("nan")]), "non-finite values at \\[1\\]"),
        (torch.tensor([1.0, float("inf")]), "non-finite"),
        (torch.ones(2, 1), r"shape \(2, 1\); expected \(2,\)"),
        ({"a": torch.ones(2)}, "without a combined 'score'"),
    ],
)
def test_bad_outputs_name_the_reward(out, match):
    with pytest.raises(RewardError, match=f"broken.*{match}|{match}"):
        Broken(out)(images=torch.rand(2, 3, 4, 4))


def test_check_options_follows_kwargs_up_to_the_base_class():
    # PickScore's **kwargs go to the CLIP base class and on to Reward: options of all three are accepted.
    rewards.check_options("pickscore", {"model": "/ckpt", "divide_by_26": True, "device": "cpu"})
    with pytest.raises(ValueError, match=r"PickScore takes no option \['modle'\]; it takes \['model', 'tokenizer'"):
        rewards.check_options("pickscore", {"modle": "/ckpt"})
    with pytest.raises(ValueError, match=r"FrameReward takes no option \['segments'\].*'num_segments'"):
        rewards.check_options("frames/pickscore", {"segments": 4})


def test_a_dtype_option_is_named_in_configs():
    # reward_options: {NAME: {dtype: bfloat16}} keeps a reward model in half precision (a memory switch)
    assert rewards.load("saturation", dtype="bfloat16").dtype is torch.bfloat16
    rewards.check_options("pickscore", {"dtype": "float16"})
    with pytest.raises(ValueError, match=r"reward 'pickscore': dtype='bf16'; allowed: float32, bfloat16, float16"):
        rewards.check_options("pickscore", {"dtype": "bf16"})


def test_non_differentiable_refuses_grad_inputs():
    r = rewards.load("world-cleanliness")
    assert not r.differentiable
    with pytest.raises(RewardError, match="not differentiable"):
        r(images=torch.rand(1, 3, 32, 32, requires_grad=True))


def test_world_verifier_reward():
    prompts = ["a red circle", "two blue squares", "a green triangle to the left of a yellow circle"]
    specs = [parse_prompt(p) for p in prompts]
    good = render_batch(specs, 0)
    r = rewards.load("world-verifier")
    out = r(prompts=prompts, images=good)
    assert torch.equal(out["score"], torch.ones(3)) and torch.equal(out["passed"], torch.ones(3))
    assert math.isnan(out["relation"][0]) and out["relation"][2] == 1  # NaN: no relation in the prompt
    assert out["cleanliness"].min() >= 0.95
    # swapped colours fail; partial credit stays between 0 and 1
    wrong = render_batch([parse_prompt("a blue circle")], 0)
    bad = r(prompts=["a red circle"], images=wrong)
    assert bad["passed"][0] == 0 and 0 <= bad["score"][0] < 1
    # metadata specs take precedence over the text
    meta = r(prompts=["ignored text"], images=wrong, metadata=[{"spec": parse_prompt("a blue circle")}])
    assert meta["passed"][0] == 1


def test_allow_invalid_returns_nan_for_trainers():
    out = Broken(torch.tensor([1.0, float("inf")]))(images=torch.rand(2, 3, 4, 4), allow_invalid=True)
    assert out[0] == 1.0 and torch.isnan(out[1])
    with pytest.raises(RewardError, match="shape"):
        Broken(torch.ones(3))(images=torch.rand(2, 3, 4, 4), allow_invalid=True)
