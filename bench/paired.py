"""Paired timing for benches: arms run interleaved in one process, ratios taken within each round.

    from paired import compare
    report = compare({"floor": floor_step, "visalign": trainer_step}, rounds=7)
    print(report.table())
    report.write("outputs/bench/flow_grpo_step.json")

Why: timing each arm in its own process, or all of one arm before the next, lets the machine's load drift between
arms; on a shared 2-core machine that moved a ratio from 0.71x to 0.85x between two runs of the same code. Here
every round runs each arm once, the order alternating between rounds (A B, B A, ...) so a slow-down that grows
through a round does not favour one arm, and each round gives one ratio per arm against the baseline (the first
arm). The report is the median of those per-round ratios and their spread (the lowest and highest), with the
context needed to judge them: torch threads, load average, CPU count, device and commit.

Training arms under a time budget run through `interleave_budget`: one step of each arm per round (order
alternating), each arm until its own process CPU seconds reach the budget; `Budgeted.report()` pairs the rounds in
which every arm stepped. Benches that compare arms on outcomes after the same work (fixed steps, bit-identity)
print `equal_work(...)`: that the comparison is not on time, and the context it ran in.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class ArmResult:
    name: str
    seconds: list[float]  # one per round
    ratios: list[float]  # seconds / the baseline's seconds in the same round

    @property
    def median_seconds(self) -> float:
        return statistics.median(self.seconds)

    @property
    def median_ratio(self) -> float:
        return statistics.median(self.ratios)

    @property
    def spread(self) -> tuple[float, float]:
        return min(self.ratios), max(self.ratios)


@dataclass
class Report:
    arms: list[ArmResult]
    rounds: int
    warmup: int
    context: dict = field(default_factory=dict)

    @property
    def baseline(self) -> str:
        return self.arms[0].name

    def ratio(self, name: str) -> float:
        return next(a for a in self.arms if a.name == name).median_ratio

    def between(self, name: str, other: str) -> tuple[float, float, float]:
        """Median, lowest and highest of `name`'s time over `other`'s, round by round (two non-baseline arms)."""
        a, b = (next(x for x in self.arms if x.name == n).seconds for n in (name, other))
        ratios = [x / y for x, y in zip(a, b, strict=True)]
        return statistics.median(ratios), min(ratios), max(ratios)

    def table(self) -> str:
        lines = [f"| arm | median time / {self.baseline} | spread over {self.rounds} rounds | median time, s |",
                 "|---|---|---|---|"]
        for a in self.arms:
            lo, hi = a.spread
            lines.append(f"| {a.name} | {a.median_ratio:.3f} | {lo:.3f} – {hi:.3f} | {a.median_seconds:.4f} |")
        lines.append(f"\n{self.rounds} interleaved rounds after {self.warmup} warm-up; {context_line(self.context)}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"baseline": self.baseline, "rounds": self.rounds, "warmup": self.warmup, "context": self.context,
                "arms": [{**asdict(a), "median_ratio": a.median_ratio, "spread": list(a.spread),
                          "median_seconds": a.median_seconds} for a in self.arms]}

    def write(self, path: str | Path, **extra) -> Path:
        """The report as JSON (plus any `extra` results of the bench) next to the printed table."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**self.to_dict(), **extra}, indent=2) + "\n")
        return path


def context() -> dict:
    """What the figures depend on besides the code: threads, load, CPUs, device, commit."""
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        commit = None
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or '?'})"
    return {"torch_threads": torch.get_num_threads(), "load_average": [round(x, 2) for x in os.getloadavg()],
            "cpus": os.cpu_count(), "device": device, "commit": commit}


def context_line(c: dict) -> str:
    """`context()` in words, as the report's table ends."""
    return (f"torch threads {c.get('torch_threads')}, load average {c.get('load_average')}, {c.get('cpus')} CPUs, "
            f"{c.get('device')}, commit {c.get('commit')}")


def equal_work(work: str, ctx: dict | None = None) -> str:
    """The line a bench prints whose arms are compared on outcomes after the same work (`work`: e.g. "12 training
    steps each"), not on time, with the context it ran in (`context()` unless given)."""
    return (f"arms compared on outcomes at equal work ({work}), not on time; "
            f"{context_line(context() if ctx is None else ctx)}")


def peak_memory(fn: Callable[[], object], workdir: str | Path | None = None) -> int:
    """Peak tensor memory (bytes) of one call of `fn`: on a GPU the peak allocated during it; on the CPU the peak
    of torch's memory timeline (`torch.profiler`'s export_memory_timeline: every tensor it sees, deterministic,
    where resident-set peaks varied by ±40 % between runs of this machine)."""
    import tempfile

    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        timeline = Path(tmp) / "memory_timeline.json"
        prof.export_memory_timeline(str(timeline), device="cpu")
        return max(sum(sizes) for sizes in json.loads(timeline.read_text())[1])


def mean_interval(groups: list[list[float]], level: float = 0.95, resamples: int = 4000,
                  seed: int = 0) -> tuple[float, float, float]:
    """Mean of all values and its percentile-bootstrap interval, resampling whole groups (e.g. one prompt's draws
    under several seeds, which are not independent of each other; Efron & Tibshirani 1993, ch. 13)."""
    import random

    if not groups or any(not g for g in groups):
        raise ValueError("mean_interval needs non-empty groups")
    if not 0 < level < 1:
        raise ValueError(f"level={level} must be in (0, 1)")
    sums, counts = [sum(g) for g in groups], [len(g) for g in groups]
    rng, n, means = random.Random(seed), len(groups), []
    for _ in range(resamples):
        picks = [rng.randrange(n) for _ in range(n)]
        means.append(sum(sums[i] for i in picks) / sum(counts[i] for i in picks))
    means.sort()
    lo = means[int((1 - level) / 2 * resamples)]
    hi = means[min(resamples - 1, int((1 + level) / 2 * resamples))]
    return sum(sums) / sum(counts), lo, hi


def compare(arms: dict[str, Callable[[], object]], rounds: int = 7, warmup: int = 1,
            clock: Callable[[], float] = time.perf_counter, sync: Callable[[], None] | None = None) -> Report:
    """Time each arm `rounds` times, interleaved, after `warmup` untimed calls of each; the first arm is the
    baseline. `sync` (e.g. torch.cuda.synchronize) runs before each clock read so queued GPU work is counted."""
    if len(arms) < 2:
        raise ValueError("compare needs a baseline and at least one other arm")
    if rounds < 1 or warmup < 0:
        raise ValueError(f"rounds={rounds} must be >= 1 and warmup={warmup} >= 0")
    names = list(arms)
    for _ in range(warmup):
        for name in names:
            arms[name]()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):  # A B, B A, ...
            if sync:
                sync()
            start = clock()
            arms[name]()
            if sync:
                sync()
            seconds[name].append(clock() - start)
    return from_rounds(seconds, warmup)


def from_rounds(seconds: dict[str, list[float]], warmup: int = 0) -> Report:
    """The report of arms a bench timed interleaved itself (e.g. a baseline step after every step of a training
    run): one time per round for each arm, the first arm the baseline."""
    names = list(seconds)
    if len(names) < 2 or len({len(v) for v in seconds.values()}) != 1 or not seconds[names[0]]:
        raise ValueError("from_rounds needs a baseline and another arm with the same number (>= 1) of rounds")
    base = seconds[names[0]]
    results = [ArmResult(name, list(seconds[name]), [s / b for s, b in zip(seconds[name], base, strict=True)])
               for name in names]
    return Report(results, len(base), warmup, context())


@dataclass
class Budgeted:
    """Per-step times of arms that `interleave_budget` ran: `seconds` on the budget's clock (process CPU time unless
    told otherwise) and `wall` on the wall clock, one entry per step of each arm, in the order they ran."""
    seconds: dict[str, list[float]]
    wall: dict[str, list[float]]

    def rounds(self) -> int:
        """Rounds in which every arm took a step: each arm's first steps (an arm stops at its budget)."""
        return min(len(v) for v in self.seconds.values())

    def report(self, warmup: int = 1, wall: bool = False) -> Report:
        """The paired report (first arm the baseline) of the rounds in which every arm took a step, on the budget's
        clock or with `wall` the wall clock. The first `warmup` rounds (the process's first allocations, thread
        pools) are left out when at least one round remains; otherwise none is, and the report says so."""
        times = self.wall if wall else self.seconds
        n = self.rounds()
        skip = warmup if n > warmup else 0
        return from_rounds({name: v[skip:n] for name, v in times.items()}, skip)

    def to_dict(self) -> dict:
        return {"seconds": self.seconds, "wall": self.wall}


def interleave_budget(arms: dict[str, Callable[[int], object]], budget: float, *,
                      clock: Callable[[], float] = time.process_time, wall: Callable[[], float] = time.perf_counter,
                      after: Callable[[str, int, float, object], object] | None = None) -> Budgeted:
    """Run arms that each take steps (`arms[name](i)` for i = 0, 1, ...) interleaved, round by round, each round one
    step of every arm still under budget, the order alternating (A B, B A, ...), until each arm's own `clock`
    seconds reach `budget`. `after(name, steps_done, spent, result)` runs after each step, outside the budget
    (evaluation, logging); a truthy return ends that arm there.

    The budget's clock is process CPU time by default (as bench/recipes_compared.py budgets): one process runs the
    arms one step at a time, so the CPU seconds of a step are that arm's, and a busy machine slows a step's wall
    time without shortening any arm's budget; interleaving puts the arms under the same load at the same time, so
    the wall times are fair to compare too."""
    if not arms:
        raise ValueError("interleave_budget needs at least one arm")
    if budget < 0:
        raise ValueError(f"budget={budget} must be >= 0")
    names = list(arms)
    spent = dict.fromkeys(names, 0.0)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    walls: dict[str, list[float]] = {name: [] for name in names}
    active = [name for name in names if budget > 0]
    r = 0
    while active:
        for name in (list(active) if r % 2 == 0 else active[::-1]):
            c, w = clock(), wall()
            result = arms[name](len(seconds[name]))
            seconds[name].append(clock() - c)
            walls[name].append(wall() - w)
            spent[name] += seconds[name][-1]
            stop = after(name, len(seconds[name]), spent[name], result) if after else None
            if stop or spent[name] >= budget:
                active.remove(name)
        r += 1
    return Budgeted(seconds, walls)
