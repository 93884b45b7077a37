"""bench/paired.py: arms interleave with alternating order, ratios are taken within a round, the report's medians
and spreads are those of the per-round ratios, and the JSON holds them with the context; arms under a budget
interleave their steps, each until its own clock reaches the budget; outcome benches' line says what they compare."""

import json

import paired
import pytest


class FakeClock:
    """Each arm advances time by its own cost, which changes from round to round (a drifting machine)."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_arms_interleave_and_ratios_are_within_round(tmp_path):
    clock, calls = FakeClock(), []
    load = iter([1.0, 1.0, 2.0, 2.0, 4.0, 4.0])  # the machine slows down round by round, for both arms alike

    def arm(name, cost):
        def run():
            calls.append(name)
            if len(calls) > 2:  # after the warm-up
                clock.now += cost * next(load)
        return run

    report = paired.compare({"floor": arm("floor", 1.0), "step": arm("step", 1.5)}, rounds=3, warmup=1,
                            clock=clock)
    assert calls == ["floor", "step", "floor", "step", "step", "floor", "floor", "step"]
    floor, step = report.arms
    assert floor.seconds == [1.0, 2.0, 4.0] and step.seconds == [1.5, 3.0, 6.0]
    assert step.ratios == [1.5, 1.5, 1.5] and report.ratio("step") == 1.5 and step.spread == (1.5, 1.5)
    assert report.baseline == "floor" and floor.median_ratio == 1.0
    data = json.loads(report.write(tmp_path / "r.json", note="x").read_text())
    assert data["arms"][1]["median_ratio"] == 1.5 and data["note"] == "x" and data["rounds"] == 3
    assert {"torch_threads", "load_average", "cpus", "device", "commit"} <= set(data["context"])
    assert "| step | 1.500 | 1.500 – 1.500 |" in report.table()


def test_median_and_spread_of_uneven_rounds():
    clock = FakeClock()
    costs = iter([1.0, 2.0, 1.0, 1.0, 1.0, 3.0])  # rounds: (floor, step), (step, floor), (floor, step)

    def run():
        clock.now += next(costs)

    report = paired.compare({"floor": run, "step": run}, rounds=3, warmup=0, clock=clock)
    step = report.arms[1]
    assert step.ratios == [2.0, 1.0, 3.0] and step.median_ratio == 2.0 and step.spread == (1.0, 3.0)
    assert report.between("floor", "step") == (0.5, 1 / 3, 1.0)


def test_bad_requests():
    with pytest.raises(ValueError, match="a baseline and at least one other arm"):
        paired.compare({"only": lambda: None})
    with pytest.raises(ValueError, match="rounds=0 must be >= 1"):
        paired.compare({"a": lambda: None, "b": lambda: None}, rounds=0)


def test_mean_interval_resamples_whole_groups():
    # one group far from the rest: resampling groups (not values) must let it swing the mean
    groups = [[0.0, 0.0, 0.0]] * 9 + [[1.0, 1.0, 1.0]]
    mean, lo, hi = paired.mean_interval(groups, resamples=2000)
    assert mean == pytest.approx(0.1)
    assert lo == 0.0 and 0.2 <= hi <= 0.4  # P(the odd group drawn >= 3 times in 10) ~ 7 %: the upper end sees it
    constant = paired.mean_interval([[0.5, 0.5], [0.5]], resamples=200)
    assert constant == pytest.approx((0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="non-empty"):
        paired.mean_interval([[1.0], []])


def test_from_rounds_pairs_a_bench_s_own_interleaved_times():
    report = paired.from_rounds({"single": [2.0, 4.0, 2.0], "marble": [3.0, 4.0, 2.2]})
    assert report.arms[1].ratios == pytest.approx([1.5, 1.0, 1.1]) and report.ratio("marble") == pytest.approx(1.1)
    assert report.arms[1].spread == pytest.approx((1.0, 1.5)) and report.rounds == 3
    with pytest.raises(ValueError, match="same number"):
        paired.from_rounds({"single": [1.0, 2.0], "marble": [1.0]})


def test_interleave_budget_alternates_and_stops_each_arm_at_its_own_budget():
    cpu, wall, calls, seen = FakeClock(), FakeClock(), [], []

    def arm(name, cost):
        def step(i):
            calls.append((name, i))
            cpu.now += cost
            wall.now += 2 * cost  # a loaded machine: the wall clock runs faster than the process's CPU time
            return f"{name}{i}"
        return step

    def after(name, done, spent, result):
        seen.append((name, done, spent, result))
        cpu.now += 100.0  # evaluation: outside the budget

    run = paired.interleave_budget({"cheap": arm("cheap", 1.0), "dear": arm("dear", 2.0)}, 4.0, clock=cpu,
                                   wall=wall, after=after)
    # A B, B A, then the cheap arm alone once the dear one has spent its budget (after 2 steps)
    assert calls == [("cheap", 0), ("dear", 0), ("dear", 1), ("cheap", 1), ("cheap", 2), ("cheap", 3)]
    assert run.seconds == {"cheap": [1.0] * 4, "dear": [2.0, 2.0]} and run.wall == {"cheap": [2.0] * 4,
                                                                                     "dear": [4.0, 4.0]}
    assert seen[:3] == [("cheap", 1, 1.0, "cheap0"), ("dear", 1, 2.0, "dear0"), ("dear", 2, 4.0, "dear1")]
    assert run.rounds() == 2
    report = run.report()  # the first round is the warm-up; one paired round remains
    assert report.rounds == 1 and report.warmup == 1 and report.ratio("dear") == 2.0
    assert run.report(warmup=2).warmup == 0 and run.report(warmup=2).rounds == 2  # too few rounds to drop any
    assert run.report(wall=True).arms[1].seconds == [4.0]
    assert paired.Budgeted(**run.to_dict()) == run


def test_interleave_budget_after_can_end_an_arm_early():
    clock = FakeClock()

    def step(i):
        clock.now += 1.0

    run = paired.interleave_budget({"a": step, "b": step}, 10.0, clock=clock, wall=clock,
                                   after=lambda name, done, spent, result: name == "b" and done == 3)
    assert len(run.seconds["a"]) == 10 and len(run.seconds["b"]) == 3
    assert paired.interleave_budget({"a": step}, 0.0, clock=clock).seconds == {"a": []}
    with pytest.raises(ValueError, match="at least one arm"):
        paired.interleave_budget({}, 1.0)
    with pytest.raises(ValueError, match="same number"):
        paired.interleave_budget({"a": step, "b": step}, 0.0, clock=clock).report()


def test_equal_work_line_says_outcomes_not_time_and_the_context():
    ctx = {"torch_threads": 2, "load_average": [1.5, 1.0, 0.5], "cpus": 2, "device": "CPU (x)", "commit": "abc"}
    line = paired.equal_work("12 training steps each", ctx)
    assert line == ("arms compared on outcomes at equal work (12 training steps each), not on time; torch threads 2, "
                    "load average [1.5, 1.0, 0.5], 2 CPUs, CPU (x), commit abc")
    report = paired.from_rounds({"a": [1.0], "b": [2.0]})
    assert report.table().endswith("1 interleaved rounds after 0 warm-up; " + paired.context_line(report.context))
    assert "not on time; torch threads" in paired.equal_work("x")  # context() when none is given
