"""Transforms by name ("ensemble(a,b)", "log-sigmoid(a)", "par(...)", "weighted-sum(...)"): parsing, attributes from
the members, options checked before any model loads, values against hand computations, and a training config
whose logged transform equals the transform of its members' logged scores."""

import math

import pytest
import torch

from visalign import rewards
from visalign.rewards.compose import Ensemble, LogSigmoidSum
from visalign.rewards.registry import composite_parts


def flat_images(values):
    """Images whose channel c is the constant values[b][c]."""
    return torch.tensor(values, dtype=torch.float32)[:, :, None, None].expand(-1, -1, 4, 4).contiguous()


IMAGES = flat_images([[0.2, 0.6, 0.9], [0.5, 0.1, 0.4]])
PROMPTS = ["a", "b"]
LUMA = torch.tensor([0.299 * 0.2 + 0.587 * 0.6 + 0.114 * 0.9, 0.299 * 0.5 + 0.587 * 0.1 + 0.114 * 0.4])
SATURATION = torch.tensor([(0.9 - 0.2) / 0.9, (0.5 - 0.1) / 0.5])  # HSV: (max - min) / max


def test_names_split_at_top_level_commas_and_bad_names_say_what_is_allowed():
    assert composite_parts("ensemble(pickscore, hpsv2)") == ("ensemble", ["pickscore", "hpsv2"])
    assert composite_parts("par(weighted-sum(a,b))") == ("par", ["weighted-sum(a,b)"])
    assert composite_parts("brightness") is None and composite_parts("frames/pickscore") is None
    with pytest.raises(ValueError, match="unknown transform 'ensembel' \\(did you mean 'ensemble'\\?\\); allowed: "
                                         "weighted-sum, log-sigmoid, par, ensemble"):
        composite_parts("ensembel(a,b)")
    for bad in ("ensemble(a,b", "ensemble(a,a)", "ensemble()", "ensemble(a,b)x", "par(ensemble(a,b)"):
        with pytest.raises(ValueError, match="parentheses must balance"):
            composite_parts(bad)
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        rewards.describe("ensemble(brightness,nope)")


def test_describe_takes_a_transforms_attributes_from_its_members():
    d = rewards.describe("ensemble(brightness,saturation)")
    assert d["class"] == "visalign.rewards.compose.Ensemble"
    assert d["differentiable"] and d["inputs"] == "images/videos"
    d = rewards.describe("par(ensemble(brightness,world-verifier))")  # the verifier is neither differentiable nor video
    assert not d["differentiable"] and d["inputs"] == "images" and d["value_range"] == (0.0, 1.0)
    with pytest.raises(ValueError, match="share no input kind"):
        rewards.describe("ensemble(world-verifier,video-flicker)")


@pytest.mark.parametrize(("name", "options", "match"), [
    ("log-sigmoid(brightness,saturation)", {}, r"takes options \['ref', 'member_options'\], needs \['ref'\]"),
    ("par(brightness)", {"ref": 0.5, "k": 1}, r"got \['k'\]"),
    ("par(brightness,saturation)", {"ref": 0.5}, "PAR shapes one reward; it names 2"),
    ("par(brightness)", {"ref": "high"}, "ref='high' must be a number or a list of numbers"),
    ("log-sigmoid(brightness,saturation)", {"ref": {"brightness": 0.5}}, "mapping over"),
    ("ensemble(brightness,saturation)", {"mode": "median"}, "mode='median' is not one of"),
    ("ensemble(brightness,saturation)", {"k": -1}, "must be a number >= 0"),
    ("weighted-sum(brightness,saturation)", {"weights": {"contrast": 1.0}}, "mapping over"),
    ("ensemble(brightness,saturation)", {"member_options": {"contrast": {}}}, "member_options must be"),
    ("ensemble(brightness,saturation)", {"member_options": {"saturation": {"form": "area"}}},
     "Saturation takes no option"),
])
def test_options_are_checked_by_name_before_anything_loads(name, options, match):
    with pytest.raises(ValueError, match=match):
        rewards.check_options(name, options)


def test_loaded_by_name_the_transforms_give_the_hand_values():
    ls = rewards.load("log-sigmoid(brightness,saturation)", ref={"brightness": 0.3, "saturation": 0.6})
    assert isinstance(ls, LogSigmoidSum) and ls.name == "log-sigmoid(brightness,saturation)"
    out = ls(images=IMAGES, prompts=PROMPTS)
    expect = torch.nn.functional.logsigmoid(LUMA - 0.3) + torch.nn.functional.logsigmoid(SATURATION - 0.6)
    torch.testing.assert_close(out["score"], expect)
    torch.testing.assert_close(out["brightness"], LUMA)

    ens = rewards.load("ensemble(brightness,saturation)", mode="mean_minus_std", k=2.0)
    assert isinstance(ens, Ensemble)
    mean, std = (LUMA + SATURATION) / 2, (LUMA - SATURATION).abs() / 2  # population std of two
    torch.testing.assert_close(ens(images=IMAGES, prompts=PROMPTS)["score"], mean - 2 * std)

    # nested, the inner transform's options given through member_options; weights left out default to 1
    inner = "weighted-sum(brightness,saturation)"
    par = rewards.load(f"par({inner})", ref=[0.5, 1.5], member_options={inner: {"weights": {"saturation": 0.5}}})
    total = LUMA + 0.5 * SATURATION
    expect = (torch.sigmoid(total - 0.5) + torch.sigmoid(total - 1.5)) / 2
    out = par(images=IMAGES, prompts=PROMPTS)
    torch.testing.assert_close(out["score"], expect)
    torch.testing.assert_close(out[f"{inner}/saturation"], SATURATION)


def test_a_training_config_logs_the_transform_of_its_members(tiny_run, tmp_path):
    """Two samples (one prompt group of two) make each member's logged mean and std determine both of its values,
    so the nonlinear transforms' logged means can be recomputed from the members' logged scores."""
    from visalign.trainers import trainer_class

    log_sig, ens = "log-sigmoid(world-soft)", "ensemble(world-soft,brightness)"
    cfg = tiny_run("train.prompts_per_step=1", "train.group_size=2", "sampling.batch_size=2", "train.max_steps=1",
                   f'rewards={{"{log_sig}": 1.0, "{ens}": 0.5}}', f'reward_options={{"{log_sig}": {{ref: 0.4}}}}',
                   "sampling.steps=3", model="world", out=tmp_path)
    (row,) = trainer_class("flow_grpo")(cfg).train()

    def pair(key):  # the two values behind a logged mean and (Bessel) std
        mean, std = row[f"{key}/mean"], row[f"{key}/std"]
        return mean - std / math.sqrt(2), mean + std / math.sqrt(2)

    soft = pair(f"rewards/{log_sig}/world-soft")
    expect = sum(math.log(1 / (1 + math.exp(-(r - 0.4)))) for r in soft) / 2
    assert row[f"rewards/{log_sig}/mean"] == pytest.approx(expect, abs=1e-5)
    assert row[f"rewards/{log_sig}/world-soft/utility/mean"] == pytest.approx(expect, abs=1e-5)
    # the ensemble's mean is linear: the mean of its members' means
    members = (row[f"rewards/{ens}/world-soft/mean"] + row[f"rewards/{ens}/brightness/mean"]) / 2
    assert row[f"rewards/{ens}/mean"] == pytest.approx(members, abs=1e-6)
    assert row[f"rewards/{ens}/world-soft/mean"] == pytest.approx(row[f"rewards/{log_sig}/world-soft/mean"])


def test_a_training_config_refuses_a_transform_missing_its_options(tiny_run):
    with pytest.raises(ValueError, match="needs \\['ref'\\]"):
        tiny_run('rewards={"par(world-soft)": 1.0}', model="world")
    with pytest.raises(ValueError, match="unknown transform 'esemble'"):
        tiny_run('rewards={"esemble(world-soft,brightness)": 1.0}', model="world")
