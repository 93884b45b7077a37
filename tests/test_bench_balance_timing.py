"""bench/balance_world.py: which steps an arm's mean step time averages, and that its marble-upgrad arm is the
shipped configs/marble_world.yaml."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from balance_world import ARMS, rewards_override, timed_steps

from visalign.train import load_train_config


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
                              [rewards_override("brightness", weights), *ARMS["marble-upgrad"],
                               f"train.lr={shipped.train.lr}"])
    assert list(shipped.rewards) == ["world-verifier", "world-cleanliness", "brightness"]
    assert dict(bench.rewards) == dict(shipped.rewards)
    assert bench.train == shipped.train and bench.sampling == shipped.sampling and bench.model == shipped.model
