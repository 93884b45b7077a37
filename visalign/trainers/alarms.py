"""Reward-hacking alarm: the optimised reward rises while signals it should not trade away fall.

During training the evaluation records, at each evaluation step, the trained reward and held-out signals (a
reward not optimised, sample diversity within prompt groups, an artifact / quality score). The alarm fires at
the first evaluation where, relative to the run's first evaluation, the trained reward has risen by more than
`rise` while some held-out signal has fallen by more than `tolerance` (both absolute, in each signal's units,
after a moving average over `window` evaluations to ignore single noisy points). `direction` of a held-out
signal is +1 when higher is better (default) or -1.

A drift watch (`run.alarm.watch`) fires on its own, whatever the trained reward does: at the first evaluation where
a watched signal (a `drift/*` diagnostic, visalign.trainers.diagnostics) has moved, in either direction, by more
than its limit from its value at the first evaluation (absolute, after the same moving average).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class Alarm:
    step: int
    signal: str
    trained_rise: float
    signal_drop: float

    def message(self) -> str:
        return (f"reward-hacking alarm at step {self.step}: the trained reward rose {self.trained_rise:+.3f} while "
                f"{self.signal} fell {self.signal_drop:.3f} from the start of the run")


@dataclass
class DriftAlarm:
    step: int
    signal: str
    first: float
    value: float
    limit: float

    def message(self) -> str:
        return (f"drift alarm at step {self.step}: {self.signal} moved {self.value - self.first:+.3f} from its first "
                f"evaluation ({self.first:.3f} -> {self.value:.3f}), more than the {self.limit} run.alarm.watch "
                "allows")


def _smoothed(values: list[float], window: int) -> list[float]:
    return [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
            for i in range(len(values))]


def check_alarm(steps: list[int], trained: list[float], heldout: dict[str, list[float]], *, tolerance: float,
                rise: float = 0.0, window: int = 1, directions: dict[str, int] | None = None) -> Alarm | None:
    """The first alarm on these curves, or None. Curves are aligned with `steps` (one point per evaluation)."""
    if tolerance < 0 or rise < 0 or window < 1:
        raise ValueError("tolerance and rise must be >= 0 and window >= 1")
    n = len(steps)
    if len(trained) != n or any(len(v) != n for v in heldout.values()):
        raise ValueError("every curve needs one value per evaluation step")
    if n < 2:
        return None
    directions = directions or {}
    t = _smoothed(trained, window)
    smoothed = {name: _smoothed(v, window) for name, v in heldout.items()}
    for i in range(1, n):
        trained_rise = t[i] - t[0]
        if trained_rise <= rise:
            continue
        for name, values in smoothed.items():
            drop = (values[0] - values[i]) * directions.get(name, 1)
            if drop > tolerance:
                return Alarm(steps[i], name, trained_rise, drop)
    return None


def _finite_mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def check_drift(steps: list[int], watched: dict[str, list[float]], limits: dict[str, float],
                window: int = 1) -> DriftAlarm | None:
    """The first evaluation where a watched curve, moving-averaged over `window` evaluations, is more than its limit
    away (either direction) from its first value, or None. A NaN point (no value at that evaluation) is left out
    of the averages; the first value is the first finite average."""
    if window < 1 or any(v <= 0 for v in limits.values()):
        raise ValueError("watch limits must be > 0 and window >= 1")
    n = len(steps)
    if any(len(v) != n for v in watched.values()):
        raise ValueError("every curve needs one value per evaluation step")
    smoothed = {name: [_finite_mean(v[max(0, i - window + 1):i + 1]) for i in range(n)]
                for name, v in watched.items()}
    first = {name: next((x for x in v if math.isfinite(x)), math.nan) for name, v in smoothed.items()}
    for i in range(n):
        for name, values in smoothed.items():
            if abs(values[i] - first[name]) > limits[name]:  # False while either is NaN
                return DriftAlarm(steps[i], name, first[name], values[i], limits[name])
    return None


@dataclass
class AlarmMonitor:
    """Accumulates evaluation points during training and checks them (used by the trainers' evaluation): the
    hacking check when `tolerance` is set, the drift watch on the signals `watch` names (with their limits)."""

    tolerance: float | None
    rise: float = 0.0
    window: int = 1
    directions: dict[str, int] = field(default_factory=dict)
    watch: dict[str, float] = field(default_factory=dict)
    steps: list[int] = field(default_factory=list)
    trained: list[float] = field(default_factory=list)
    heldout: dict[str, list[float]] = field(default_factory=dict)
    watched: dict[str, list[float]] = field(default_factory=dict)
    fired: Alarm | DriftAlarm | None = None

    def update(self, step: int, trained: float, heldout: dict[str, float],
               watched: dict[str, float] | None = None) -> Alarm | DriftAlarm | None:
        """Add one evaluation. A held-out signal that stops coming (a held-out reward disabled after it raised) is
        no longer watched; a new one after the first evaluation is an error. A watched signal missing from
        `watched` counts as NaN (not measured)."""
        if self.steps and set(heldout) - set(self.heldout):
            raise ValueError(f"held-out signals changed from {sorted(self.heldout)} to {sorted(heldout)}")
        self.heldout = {name: values for name, values in self.heldout.items() if name in heldout}
        self.steps.append(step)
        self.trained.append(trained)
        for name, value in heldout.items():
            self.heldout.setdefault(name, []).append(value)
        # A history restored under another watch list: curves of dropped names go, new names start with NaN.
        self.watched = {name: self.watched.get(name, [math.nan] * (len(self.steps) - 1)) for name in self.watch}
        for name, values in self.watched.items():
            values.append((watched or {}).get(name, math.nan))
        if self.fired is None:
            self.fired = self._check()
        return self.fired

    def _check(self) -> Alarm | DriftAlarm | None:
        """The earliest alarm on the curves (the hacking alarm first at the same step)."""
        found = []
        if self.tolerance is not None:
            found.append(check_alarm(self.steps, self.trained, self.heldout, tolerance=self.tolerance,
                                     rise=self.rise, window=self.window, directions=self.directions))
        if self.watch:
            found.append(check_drift(self.steps, self.watched, self.watch, self.window))
        found = [a for a in found if a is not None]
        return min(found, key=lambda a: a.step) if found else None

    def goodness(self) -> dict[int, float]:
        """For the alarm that fired, a score per evaluated step, higher where its signal was better: a held-out
        signal's value (times its direction), or minus a watched signal's distance from its first value."""
        signal = self.fired.signal
        if isinstance(self.fired, DriftAlarm):
            scores = [-abs(v - self.fired.first) for v in self.watched[signal]]
        else:
            scores = [self.directions.get(signal, 1) * v for v in self.heldout[signal]]
        return {step: s if math.isfinite(s) else -math.inf for step, s in zip(self.steps, scores, strict=True)}

    def state_dict(self) -> dict:
        return {"steps": self.steps, "trained": self.trained, "heldout": self.heldout, "watched": self.watched}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.trained, self.heldout = list(state["steps"]), list(state["trained"]), dict(state["heldout"])
        n = len(self.steps)
        saved = state.get("watched", {})  # absent from checkpoints written before the drift watch
        self.watched = {name: list(saved.get(name, [math.nan] * n)) for name in self.watch}
        self.fired = self._check() if n >= 2 else None
