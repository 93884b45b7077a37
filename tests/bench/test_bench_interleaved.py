"""The benches that interleave their arms: alarm_world's trainers take one step each per round (order alternating)
until each is done, and the world benches' timing pairs the arms' steps, or says there is nothing to pair."""

import json
from types import SimpleNamespace

import paired
from alarm_world import train_interleaved  # bench/
from flow_grpo_world import timing  # bench/


class FakeTrainer:
    def __init__(self, name, calls, max_steps, fires_at=None, action="log"):
        self.name, self.calls, self.fires_at = name, calls, fires_at
        self.state = SimpleNamespace(step=0)
        self.alarm = SimpleNamespace(fired=None)
        self.cfg = SimpleNamespace(train=SimpleNamespace(max_steps=max_steps),
                                   run=SimpleNamespace(alarm=SimpleNamespace(action=action)))

    def train(self, stop_after=None):
        assert stop_after == 1
        self.calls.append(self.name)
        self.state.step += 1
        if self.state.step == self.fires_at:
            self.alarm.fired = object()


def test_alarm_world_interleaves_its_runs_step_by_step():
    calls = []
    train_interleaved({"proxy": FakeTrainer("proxy", calls, 3), "verifier": FakeTrainer("verifier", calls, 2)})
    assert calls == ["proxy", "verifier", "verifier", "proxy", "proxy"]
    calls = []  # an alarm that stops a run (run.alarm.action=stop) ends it there, as train() would; "log" does not
    train_interleaved({"a": FakeTrainer("a", calls, 4, fires_at=1, action="stop"),
                       "b": FakeTrainer("b", calls, 3, fires_at=1)})
    assert calls == ["a", "b", "b", "b"]


def test_world_timing_pairs_steps_or_says_there_is_nothing_to_pair(tmp_path):
    two = paired.Budgeted({"nft": [9.0, 2.0, 2.0], "grpo": [9.0, 3.0]}, {"nft": [5.0, 1.0, 1.0], "grpo": [5.0, 2.0]})
    text = timing(two, tmp_path, 2)
    assert "| grpo | 1.500 | 1.500 – 1.500 |" in text and "1 interleaved rounds after 1 warm-up" in text
    data = json.loads((tmp_path / "timing.json").read_text())
    assert data["arms"][1]["ratios"] == [1.5] and data["wall"]["arms"][1]["ratios"] == [2.0]
    assert data["steps"]["seconds"]["nft"] == [9.0, 2.0, 2.0] and data["threads"] == 2 and "context" in data
    one = timing(paired.Budgeted({"nft": [3.0, 1.0, 2.0]}, {"nft": [1.0, 1.0, 1.0]}), tmp_path, 2)
    assert one.startswith("nft 2.00 s CPU per step (median of 3); no other arm to pair with; torch threads")
    assert "context" in json.loads((tmp_path / "timing.json").read_text())
