"""Reward suites: tables with intervals per category, deterministic and resumable (cached samples and scores are
not recomputed), user prompt files, presets, comparison mode."""

import json

import pytest
from safetensors.torch import load_file

from visalign import rewards
from visalign.cli import main as cli_main
from visalign.eval.reward_suite import RewardEvalConfig, evaluate_rewards, load_prompts
from visalign.models import load_model


@pytest.fixture(scope="module")
def world():
    return load_model("world")


def cfg(out, **kw):
    base = {"prompts": "world:heldout:single,count", "n_per_template": 3, "seeds": [0, 1], "steps": 4,
            "batch_size": 5, "rewards": ["world-verifier", "saturation"], "out": str(out)}
    return RewardEvalConfig(**{**base, **kw})


def test_suite_tables_resume_and_determinism(world, tmp_path):
    first = evaluate_rewards(world, cfg(tmp_path / "a"), progress=False)
    assert first["_run"] == {"generated": 12, "scored": 24, "prompts": 6, "seeds": [0, 1]}
    sat = first["saturation"]
    assert sat["low"] <= sat["mean"] <= sat["high"] and sat["n"] == 12
    assert set(sat["categories"]) == {"single", "count"} and len(sat["per_seed"]) == 2
    # A score equals the reward applied to the stored 8-bit sample.
    px = load_file(str(tmp_path / "a" / "samples" / "p00004_s1.safetensors"))["pixels"].float()[None] / 255
    assert sat["per_sample"]["p00004_s1"] == pytest.approx(float(rewards.load("saturation")(images=px)), abs=1e-6)
    # Same settings again: nothing regenerated or rescored, identical numbers.
    again = evaluate_rewards(world, cfg(tmp_path / "a"), progress=False)
    assert again["_run"]["generated"] == 0 and again["_run"]["scored"] == 0
    assert again["saturation"]["per_sample"] == sat["per_sample"]
    # A fresh directory reproduces the numbers exactly (per-sample seeds, independent of batching).
    fresh = evaluate_rewards(world, cfg(tmp_path / "b", batch_size=7), progress=False)
    assert fresh["world-verifier"]["per_sample"] == first["world-verifier"]["per_sample"]
    # An interrupted run: one sample missing, the last score line cut in half; a reward added.
    (tmp_path / "a" / "samples" / "p00002_s0.safetensors").unlink()
    scores = tmp_path / "a" / "scores.jsonl"
    text = scores.read_text()
    scores.write_text(text[: len(text) - 20])
    resumed = evaluate_rewards(world, cfg(tmp_path / "a", rewards=["world-verifier", "saturation",
                                                                   "world-cleanliness"]), progress=False)
    assert resumed["_run"]["generated"] == 1 and resumed["_run"]["scored"] == 1 + 12
    assert resumed["saturation"]["per_sample"] == sat["per_sample"]
    # Changing what a sample is (steps) in the same directory is refused.
    with pytest.raises(ValueError, match="different settings"):
        evaluate_rewards(world, cfg(tmp_path / "a", steps=5), progress=False)


def test_prompt_files_and_errors(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a red circle", "category": "colour"}\n{"prompt": "two blue squares"}\n')
    items = load_prompts(str(path))
    assert [it.category for it in items] == ["colour", "all"]
    path.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match="line 2"):
        load_prompts(str(path))
    with pytest.raises(ValueError, match="does not exist"):
        load_prompts(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="unknown reward"):
        RewardEvalConfig(rewards=["nope"])
    with pytest.raises(ValueError, match="seeds"):
        RewardEvalConfig(rewards=["saturation"], seeds=[1, 1])
    with pytest.raises(ValueError, match="distinct"):
        RewardEvalConfig(rewards=["saturation"], compare=["base", "base"])


def test_cli_user_suite_and_comparison(tmp_path, capsys):
    prompts = tmp_path / "mine.txt"
    prompts.write_text("a red circle\ntwo green triangles\na blue square on the left\n")
    common = [f"prompts={prompts}", "steps=4", "rewards=[saturation, brightness]", "seeds=[3]"]
    assert cli_main(["eval", "--suite", "rewards", "--out", str(tmp_path / "one"), *common]) == 0
    table = (tmp_path / "one" / "results.md").read_text()
    assert "| saturation | **overall** |" in table and "| brightness | **overall** |" in table
    assert (tmp_path / "one" / "grid.png").exists()
    from visalign.world.model import SHIPPED

    # The shipped checkpoint named by path is the same model as "base": every paired delta is exactly 0.
    assert cli_main(["eval", "--suite", "rewards", "--out", str(tmp_path / "cmp"), "--compare", "base",
                     "--compare", str(SHIPPED), *common]) == 0
    deltas = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    d = deltas[str(SHIPPED)]["saturation"]
    assert d["delta"] == 0.0 and d["low"] == 0.0 and d["n"] == 3
    # A preset fills in its rewards; with none and no preset it is an error.
    capsys.readouterr()
    assert cli_main(["eval", "--suite", "rewards", "--out", str(tmp_path / "x"), f"prompts={prompts}"]) == 2
    assert "needs rewards" in capsys.readouterr().err
