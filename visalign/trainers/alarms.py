"""Reward-hacking alarm: the optimised reward rises while signals it should not trade away fall.

During training the evaluation records, at each evaluation step, the trained reward and held-out signals (a
reward not optimised, sample diversity within prompt groups, an artifact / quality score). The alarm fires at
the first evaluation where, relative to the run's first evaluation, the trained reward has risen by more than
`rise` while some held-out signal has fallen by more than `tolerance` (both absolute, in each signal's units,
after a moving average over `window` evaluations to ignore single noisy points). `direction` of a held-out
signal is +1 when higher is better (default) or -1.
"""

from __future__ import annotations

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


@dataclass
class AlarmMonitor:
    """Accumulates evaluation points during training and checks them (used by the trainers' evaluation)."""

    tolerance: float
    rise: float = 0.0
    window: int = 1
    directions: dict[str, int] = field(default_factory=dict)
    steps: list[int] = field(default_factory=list)
    trained: list[float] = field(default_factory=list)
    heldout: dict[str, list[float]] = field(default_factory=dict)
    fired: Alarm | None = None

    def update(self, step: int, trained: float, heldout: dict[str, float]) -> Alarm | None:
        """Add one evaluation. A signal that stops coming (a held-out reward disabled after it raised) is no
        longer watched; a new one after the first evaluation is an error."""
        if self.steps and set(heldout) - set(self.heldout):
            raise ValueError(f"held-out signals changed from {sorted(self.heldout)} to {sorted(heldout)}")
        self.heldout = {name: values for name, values in self.heldout.items() if name in heldout}
        self.steps.append(step)
        self.trained.append(trained)
        for name, value in heldout.items():
            self.heldout.setdefault(name, []).append(value)
        if self.fired is None:
            self.fired = check_alarm(self.steps, self.trained, self.heldout, tolerance=self.tolerance,
                                     rise=self.rise, window=self.window, directions=self.directions)
        return self.fired

    def state_dict(self) -> dict:
        return {"steps": self.steps, "trained": self.trained, "heldout": self.heldout}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.trained, self.heldout = list(state["steps"]), list(state["trained"]), dict(state["heldout"])
        self.fired = None
        if len(self.steps) >= 2:
            self.fired = check_alarm(self.steps, self.trained, self.heldout, tolerance=self.tolerance,
                                     rise=self.rise, window=self.window, directions=self.directions)
