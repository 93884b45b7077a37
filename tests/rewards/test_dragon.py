"""dragon-mmd, the DRAGON-style distribution reward: MMD² and leave-one-out credits by hand, the world's diverse vs
collapsed groups, the group contract (trainers pass prompt groups; other callers get one set or a clear error)."""

import math

import pytest
import torch
from PIL import Image

from visalign import rewards
from visalign.eval.reward_suite import RewardEvalConfig
from visalign.media import to_uint8
from visalign.rewards.base import RewardError
from visalign.rewards.compose import WeightedSum
from visalign.rewards.dragon import DistributionReward, leave_one_out_mmd2, median_bandwidth, mmd2_unbiased
from visalign.steering.core import resolve_rewards
from visalign.trainers.config import check_groups_per_process
from visalign.trainers.flow_grpo import FlowGRPOTrainer
from visalign.world.grammar import parse_prompt
from visalign.world.model import WorldAdapter
from visalign.world.render import render, render_batch

COLOURS = ("red", "yellow", "green", "blue")


def flat(values) -> torch.Tensor:
    """Images [B, 3, 4, 4] of constant value: with `mean_pixel` their embeddings are the values themselves."""
    return torch.tensor(values, dtype=torch.float32)[:, None, None, None].expand(-1, 3, 4, 4).contiguous()


def mean_pixel(images: torch.Tensor) -> torch.Tensor:  # a 1-D embedding
    return images.mean(dim=(1, 2, 3))[:, None]


def save_pngs(images: torch.Tensor, directory):
    directory.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(to_uint8(image.permute(1, 2, 0))).save(directory / f"{i:02d}.png")
    return directory


def test_set_reward_and_leave_one_out_credit_by_hand():
    # Embeddings S = {0, 1, 1}, exemplars E = {0, 1}, σ = 1: k(0, 1) = a = e^(-1/2), k(x, x) = 1.
    a = math.exp(-0.5)
    within = (4 * a + 2) / 6  # ordered pairs i≠j of S: four (0, 1) pairs, two (1, 1)
    mmd2 = within + a - 2 * (3 * (1 + a)) / 6  # + mean_{a≠b} k(e_a, e_b) - 2 mean k(x, e)
    assert mmd2 == pytest.approx((2 * a - 2) / 3)
    without_0 = 1 + a - 2 * (2 * (1 + a)) / 4  # S \ {0} = {1, 1}: MMD² = 0
    without_1 = a + a - 2 * ((1 + a) + (a + 1)) / 4  # S \ {1} = {0, 1}: MMD² = a - 1
    credit = [without_0 - mmd2, without_1 - mmd2, without_1 - mmd2]  # R(S) - R(S\i) = MMD²(S\i) - MMD²(S)
    assert credit[0] == pytest.approx((2 - 2 * a) / 3) and credit[1] == pytest.approx((a - 1) / 3)

    reward = DistributionReward(flat([0.0, 1.0]), feature=mean_pixel, bandwidth=1.0)
    out = reward(images=flat([0.0, 1.0, 1.0]))  # no groups: the batch is one set
    torch.testing.assert_close(out["set"], torch.full((3,), -mmd2, dtype=torch.float32))
    torch.testing.assert_close(out["credit"], torch.tensor(credit, dtype=torch.float32))
    # score = R(S) + c_i - mean c: the group's mean is R(S), its differences the credits'.
    mean = sum(credit) / 3
    torch.testing.assert_close(out["score"], torch.tensor([-mmd2 + c - mean for c in credit], dtype=torch.float32))
    # A collapsed set: removing a copy leaves the same distribution, so every credit is exactly 0.
    torch.testing.assert_close(reward(images=flat([1.0] * 4))["credit"], torch.zeros(4))


def test_median_bandwidth_and_closed_form_leave_one_out():
    assert median_bandwidth(torch.tensor([[0.0], [1.0], [3.0]])) == pytest.approx(2.0)  # distances 1, 3, 2
    assert DistributionReward(flat([0.0, 0.5, 1.0]), feature=mean_pixel).bandwidth == pytest.approx(0.5)
    with pytest.raises(ValueError, match="give bandwidth="):
        median_bandwidth(torch.zeros(3, 2))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 3, generator=g).double(), torch.randn(5, 3, generator=g).double()
    full, without = leave_one_out_mmd2(x, y, 1.3)
    torch.testing.assert_close(full, mmd2_unbiased(x, y, 1.3))
    torch.testing.assert_close(without, torch.stack([mmd2_unbiased(torch.cat([x[:i], x[i + 1:]]), y, 1.3)
                                                     for i in range(6)]))


# Thumbnails see colours and places; the tiny CLIP's random weights only guarantee the diverse group's lead.
@pytest.mark.parametrize("build, graded", [(DistributionReward, True), (DistributionReward.tiny, False)],
                         ids=["thumbnail", "tiny-clip"])
def test_world_group_matching_the_exemplars_beats_a_collapsed_one(build, graded):
    specs = [parse_prompt(f"a {c} circle") for c in COLOURS]
    reward = build(render_batch(specs * 4, 0))  # 16 exact renders: four colours, varied places and sizes
    matching = render_batch(specs, 5)  # fresh renders of the same mix
    collapsed = render(specs[0], 2)[None].repeat(4, 1, 1, 1)  # one render, four times
    one_new = torch.cat([render(specs[0], 3)[None].repeat(3, 1, 1, 1), render(specs[1], 4)[None]])
    out = reward(images=torch.cat([matching, collapsed, one_new]), groups=torch.arange(12) // 4)
    set_reward = out["set"][::4]
    assert set_reward[0] > max(set_reward[1], set_reward[2])  # the matching group beats both narrow ones
    torch.testing.assert_close(out["credit"][4:8], torch.zeros(4), atol=1e-6, rtol=0)  # copies: nothing to credit
    if graded:  # three copies plus a second colour sit between; the sample bringing the missing mode earns credit
        assert set_reward[2] > set_reward[1]
        assert out["credit"][11] > 0 and out["credit"][11] > out["credit"][8:11].max()
    for group in range(3):  # each group's mean score is its set reward
        torch.testing.assert_close(out["score"][4 * group:4 * group + 4].mean(), set_reward[group])


def test_exemplar_directory_and_option_checks(tmp_path):
    images = render_batch([parse_prompt(f"a {c} square") for c in COLOURS], 1)
    directory = save_pngs(images, tmp_path / "exemplars")
    (directory / "notes.txt").write_text("not an image")
    from_dir = DistributionReward(directory)
    from_tensor = DistributionReward(torch.stack([torch.from_numpy(to_uint8(im)).float() / 255 for im in images]))
    torch.testing.assert_close(from_dir.exemplars, from_tensor.exemplars)
    assert rewards.describe("dragon-mmd")["groupwise"] is True
    for options, message in [({}, "needs the option exemplars"),
                             ({"exemplars": str(tmp_path / "nowhere")}, "is not a directory"),
                             ({"exemplars": str(tmp_path)}, "holds 0 images"),
                             ({"exemplars": str(directory), "feature": "dino"}, "feature='dino'; allowed: thumbnail"),
                             ({"exemplars": str(directory), "bandwidth": 0}, "bandwidth=0 must be a number > 0"),
                             ({"exemplars": str(directory), "thumbnail_size": 0}, "thumbnail_size=0")]:
        with pytest.raises(ValueError, match=message):
            rewards.check_options("dragon-mmd", options)


def test_groups_reach_only_groupwise_rewards_and_non_group_callers_are_refused(tmp_path):
    reward = DistributionReward(flat([0.0, 0.5, 1.0]), feature=mean_pixel)
    images = flat([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    two_sets = reward(images=images, groups=[0, 0, 0, 1, 1, 1])
    torch.testing.assert_close(two_sets["score"][:3], reward(images=images[:3])["score"])
    assert not torch.allclose(two_sets["score"], reward(images=images)["score"])  # one set of six differs
    with pytest.raises(RewardError, match="groups of at least 3 samples; group 1 has 2"):
        reward(images=images[:5], groups=[0, 0, 0, 1, 1])
    with pytest.raises(RewardError, match="integer group id per sample"):
        reward(images=images, groups=torch.zeros(6))
    brightness = rewards.load("brightness")  # a per-sample reward ignores groups
    torch.testing.assert_close(brightness(images=images, groups=[0] * 6), brightness(images=images))
    with pytest.raises(ValueError, match="steering scores each particle on its own"):
        resolve_rewards(reward)
    with pytest.raises(ValueError, match="member 'dragon-mmd' scores groups"):
        WeightedSum({reward: 1.0, "brightness": 1.0})
    with pytest.raises(ValueError, match="scores groups of samples as sets"):
        RewardEvalConfig(rewards=["dragon-mmd"], reward_options={"dragon-mmd": {"exemplars": str(tmp_path)}})


@pytest.fixture(scope="module")
def world_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("world") / "w.safetensors"
    WorldAdapter.random(0).save_pretrained(path)
    return str(path)


def test_flow_grpo_scores_each_prompt_group_as_a_set(tiny_run, world_ckpt, tmp_path, monkeypatch):
    exemplars = save_pngs(render_batch([parse_prompt(f"a {c} circle") for c in COLOURS] * 2, 0), tmp_path / "ex")
    dragon = ["rewards={dragon-mmd: 1.0}", f"reward_options={{dragon-mmd: {{exemplars: {exemplars}}}}}"]
    # Misfits fail at config time, before any model loads, naming the field.
    with pytest.raises(ValueError, match="sampling.batch_size=2 must be a multiple of train.group_size=4"):
        tiny_run(*dragon, "sampling.batch_size=2", model="world")
    with pytest.raises(ValueError, match="train.group_size=2: reward dragon-mmd scores each prompt group"):
        tiny_run(*dragon, "train.group_size=2", model="world")
    with pytest.raises(ValueError, match="needs the option exemplars"):
        tiny_run("rewards={dragon-mmd: 1.0}", model="world")
    with pytest.raises(ValueError, match="prompts_per_step=2 must be divisible by the 3 processes"):
        check_groups_per_process(tiny_run(*dragon, model="world"), 3)

    trainer = FlowGRPOTrainer(tiny_run(f"model.path={world_ckpt}", "train.max_steps=1", *dragon, model="world"))
    reward, calls = trainer.rewards["dragon-mmd"], []
    score = reward.score

    def spy(**kwargs):
        calls.append((kwargs["groups"], score(**kwargs)))
        return calls[-1][1]

    monkeypatch.setattr(reward, "score", spy)
    before = [p.detach().clone() for p in trainer.params]
    history = trainer.train()
    # 2 prompts × 4 samples, sampled and scored in batches of 4: each call gets one whole prompt group, by its id.
    assert [groups.tolist() for groups, _ in calls] == [[0] * 4, [1] * 4]
    set_reward = torch.stack([out["set"] for _, out in calls])
    torch.testing.assert_close(set_reward, set_reward[:, :1].expand(2, 4))  # one value per group
    torch.testing.assert_close(torch.stack([out["score"] for _, out in calls]).mean(1), set_reward[:, 0])
    assert history[0]["rewards/dragon-mmd/set/mean"] == pytest.approx(set_reward[:, 0].mean().item(), abs=1e-6)
    assert any(not torch.equal(b, p.detach()) for b, p in zip(before, trainer.params, strict=True))
