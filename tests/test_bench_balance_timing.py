"""bench/balance_world.py's time ratio: which steps an arm's mean step time averages."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from balance_world import timed_steps


def test_timed_steps_skip_the_first_cycle_and_keep_whole_cycles():
    steps = list(range(11))  # an amortised arm refreshing every 3rd step: refreshes at 0, 3, 6, 9
    assert timed_steps(steps, 3) == [3, 4, 5, 6, 7, 8]  # the part cycle [9, 10] would count a refresh twice as often
    assert timed_steps(steps, 1) == list(range(1, 11))  # per-step arms drop only the warm-up step
    # Each kept cycle holds exactly one refresh step, so the mean is the amortised cost.
    assert sum(s % 3 == 0 for s in timed_steps(steps, 3)) == 2


def test_too_short_a_run_times_no_step():
    assert timed_steps([0, 1, 2, 3, 4], 3) == []  # the bench then reports no time ratio instead of a biased one
    assert timed_steps([0], 1) == []
