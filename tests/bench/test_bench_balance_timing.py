"""bench/balance_world.py: which steps an arm's time ratio averages, that its marble-upgrad arm is the shipped
configs/marble_world.yaml, and its table's columns."""

from pathlib import Path
from types import SimpleNamespace

from balance_world import ARMS, arm_overrides, metric_keys, rewards_override, table, timed_steps  # bench/

from visalign.trainers import load_train_config

ROOT = Path(__file__).resolve().parents[2]


def test_timed_steps_skip_the_first_cycle_and_keep_whole_cycles():
    steps = list(range(11))  # an amortised arm refreshing every 3rd step: refreshes at 0, 3, 6, 9
    assert timed_steps(steps, 3) == [3, 4, 5, 6, 7, 8]  # the part cycle [9, 10] would count a refresh twice as often
    assert timed_steps(steps, 1) == list(range(1, 11))  # per-step arms drop only the warm-up step
    # Each kept cycle holds exactly one refresh step, so the mean is the amortised cost.
    assert sum(s % 3 == 0 for s in timed_steps(steps, 3)) == 2


def test_too_short_a_run_times_no_step():
    assert timed_steps([0, 1, 2, 3, 4], 3) == []  # the bench then reports no time ratio instead of a biased one
    assert timed_steps([0], 1) == []


def test_marble_upgrad_arm_is_the_shipped_marble_config():
    # The bench applies the arm's overrides to configs/nft_world.yaml; the README's command adds the config's reward
    # weights (--weights) and lr. Both must give the trained settings of configs/marble_world.yaml.
    shipped = load_train_config(str(ROOT / "configs/marble_world.yaml"))
    weights = tuple(shipped.rewards.values())
    bench = load_train_config(str(ROOT / "configs/nft_world.yaml"),
                              [rewards_override("brightness", weights, "world-shape-fidelity"), *ARMS["marble-upgrad"],
                               f"train.lr={shipped.train.lr}"])
    assert list(shipped.rewards) == ["world-verifier", "world-shape-fidelity", "brightness"]
    assert dict(bench.rewards) == dict(shipped.rewards)
    assert bench.train == shipped.train and bench.sampling == shipped.sampling and bench.model == shipped.model


def test_table_has_a_column_per_trained_reward_and_the_pair_cosines():
    args = SimpleNamespace(quality="quality-nss", style="brightness")
    keys = metric_keys(args)
    assert keys == ["partial_credit", "verifier", "cleanliness", "quality-nss", "brightness"]  # cleanliness: held-out
    start = dict(zip(keys, [0.7, 0.3, 0.9, -32.0, 0.8], strict=True))
    end = dict(zip(keys, [0.75, 0.35, 0.6, -29.5, 0.9], strict=True))
    arm = {"curve": [{"minutes": 0.0, **start}, {"minutes": 4.2, **end}], "negative_fraction": 0.25, "cos_measured": 4,
           "time_ratio": {"step": {"median": 1.5, "spread": [1.25, 1.75], "cycles": 3}},  # training: none timed
           "pair_cos": {"a|b": -0.5, "a|c": 0.25}}
    lines = table({"marble": arm}, keys).splitlines()
    assert lines[0].split(" | ")[2:12:2] == ["verifier partial credit", "whole-prompt", "cleanliness", "quality-nss",
                                             "brightness"]
    assert "| marble | 4.2 | 0.750 | +0.050 | 0.350 | +0.050 | 0.600 | -0.300 | -29.500 | +2.500 | 0.900 | +0.100 | " \
           "0.25 (4 steps) | 1.50 (1.25–1.75) | — |" in lines
    assert lines[-3:] == ["| arm | cos a|b | cos a|c |", "|---|---|---|", "| marble | -0.50 | +0.25 |"]
    assert rewards_override("saturation", (1, 2, 3), "artifact") == \
        "rewards={world-verifier: 1, artifact: 2, saturation: 3}"


def test_arm_overrides_build_valid_configs_and_alone_arms_train_one_reward(tmp_path):
    weights = tmp_path / "artifact.safetensors"
    weights.touch()  # reward_options only names the file here; no reward loads
    args = SimpleNamespace(quality="artifact", style="saturation", weights=(1.0, 2.0, 1.0),
                           artifact_weights=str(weights), out=str(tmp_path))
    nft = str(ROOT / "configs/nft_world.yaml")
    marble = load_train_config(nft, arm_overrides("marble-upgrad", args))
    assert marble.rewards == {"world-verifier": 1.0, "artifact": 2.0, "saturation": 1.0}
    assert marble.reward_options == {"artifact": {"weights": str(weights)}} and marble.train.balance.method == "upgrad"
    alone = load_train_config(nft, arm_overrides("alone-quality", args))
    assert alone.rewards == {"artifact": 1.0} and alone.reward_options == {"artifact": {"weights": str(weights)}}
    assert alone.train.balance.method == "none"
    style = load_train_config(nft, arm_overrides("alone-style", args))  # the detector is not used: no options
    assert style.rewards == {"saturation": 1.0} and style.reward_options == {}
