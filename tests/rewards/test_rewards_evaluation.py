"""Reward-model evaluation: pairwise accuracy with and without ties, BT-with-ties loss, pair files, and the
`visalign rewards` command line."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers.toy_rewards import MeanBrightness
from visalign.cli import main
from visalign.pairs import PairFileError, read_pairs
from visalign.rewards.evaluation import accuracy_with_ties, accuracy_without_ties, bt_ties_loss, evaluate_pairs


def test_accuracy_without_ties_by_hand():
    # Untied pairs 0, 1, 2: signs agree for 0 and 2; pair 3 is a human tie and does not count.
    assert accuracy_without_ties([1, 1, -1, 0], [0.5, -0.2, -1.0, 0.1]) == pytest.approx(2 / 3)
    assert accuracy_without_ties([1, -1], [0.0, 0.0]) == 0.0  # a zero margin is never right


def test_accuracy_with_ties_by_hand():
    labels, margins = [1, 0, 1, 0], [2.0, 0.1, 0.05, 3.0]
    # eps=0: concordant {0, 2} -> 2/4; eps=0.05: {0} -> 1/4; eps=0.1: {0} + tie {1} -> 2/4;
    # eps=2: tie {1} -> 1/4; eps=3: ties {1, 3} -> 2/4. Best 0.5, first reached at eps=0.
    assert accuracy_with_ties(labels, margins) == (pytest.approx(0.5), 0.0)
    # A threshold that separates the human ties from the decided pairs is found.
    acc, eps = accuracy_with_ties([1, 0, -1, 0], [1.0, 0.01, -2.0, -0.02])
    assert acc == 1.0 and eps == pytest.approx(0.02)


def test_accuracy_with_ties_equals_brute_force_on_random_data():
    rng = np.random.default_rng(0)
    labels = rng.choice([-1, 0, 1], size=60)
    margins = np.round(rng.normal(size=60) + 0.8 * labels, 2)

    def tau(eps):
        c = sum(1 for h, m in zip(labels, margins, strict=True) if h != 0 and abs(m) > eps and h * m > 0)
        t = sum(1 for h, m in zip(labels, margins, strict=True) if h == 0 and abs(m) <= eps)
        return (c + t) / len(labels)

    best = max(tau(e) for e in [0.0, *np.abs(margins)])
    assert accuracy_with_ties(labels, margins)[0] == pytest.approx(best)
    with pytest.raises(ValueError, match="labels must be"):
        accuracy_with_ties([2], [0.1])


def test_bt_ties_loss_by_hand_and_probabilities_sum_to_one():
    eta = math.log(2.0)
    d = torch.tensor([1.0])

    def sig(x):
        return 1 / (1 + math.exp(-x))

    p_a, p_b = sig(1 - eta), sig(-1 - eta)
    p_tie = (math.exp(2 * eta) - 1) * p_a * p_b
    assert p_a + p_b + p_tie == pytest.approx(1.0)
    for outcome, p in ((1, p_a), (-1, p_b), (0, p_tie)):
        loss, _ = bt_ties_loss(d, torch.zeros(1), torch.tensor([outcome]), eta)
        assert loss.item() == pytest.approx(-math.log(p), rel=1e-6)
    # eta = 0 is plain Bradley-Terry: -log sigmoid(d).
    loss, metrics = bt_ties_loss(torch.tensor([0.3, -0.2]), torch.zeros(2), torch.tensor([1, 1]), 0.0)
    assert loss.item() == pytest.approx(-(math.log(sig(0.3)) + math.log(sig(-0.2))) / 2)
    assert metrics["accuracy"] == 0.5
    with pytest.raises(ValueError, match="eta must be > 0"):
        bt_ties_loss(torch.zeros(1), torch.zeros(1), torch.tensor([0]), 0.0)


def test_bt_ties_gradient_pulls_tied_scores_together():
    a = torch.tensor([2.0], requires_grad=True)
    loss, _ = bt_ties_loss(a, torch.zeros(1), torch.tensor([0]), math.log(3.0))
    loss.backward()
    assert a.grad.item() > 0  # descending the loss lowers a towards b


def _write_pair_set(tmp_path, rows):
    (tmp_path / "img").mkdir()
    for name, value in {"dark": 0.2, "mid": 0.5, "light": 0.8}.items():
        Image.fromarray(np.full((8, 8, 3), round(value * 255), dtype=np.uint8)).save(tmp_path / "img" / f"{name}.png")
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_read_pairs_rejects_bad_rows_naming_the_line(tmp_path):
    good = {"prompt": "p", "chosen": "img/light.png", "rejected": "img/dark.png"}
    path = _write_pair_set(tmp_path, [good, {**good, "rejected": "img/missing.png"}])
    with pytest.raises(PairFileError, match=r"pairs.jsonl:2: 'rejected' image .*missing.png does not exist"):
        read_pairs(path)
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "tie": "yes"}) + "\n")
    with pytest.raises(PairFileError, match=r":2: 'tie' must be true or false"):
        read_pairs(path)
    path.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(PairFileError, match=r":2: not valid JSON"):
        read_pairs(path)
    path.write_text(json.dumps({**good, "winner": "a"}) + "\n")
    with pytest.raises(PairFileError, match=r":1: unknown keys \['winner'\]"):
        read_pairs(path)


def test_evaluate_pairs_with_a_known_reward(tmp_path):
    rows = [{"prompt": "p", "chosen": "img/light.png", "rejected": "img/dark.png"},
            {"prompt": "p", "chosen": "img/mid.png", "rejected": "img/dark.png"},
            {"prompt": "p", "chosen": "img/dark.png", "rejected": "img/mid.png"},  # brightness gets this wrong
            {"prompt": "p", "chosen": "img/mid.png", "rejected": "img/mid.png", "tie": True}]
    pairs = read_pairs(_write_pair_set(tmp_path, rows))
    result = evaluate_pairs(MeanBrightness(), pairs, batch_size=3, progress=False)
    assert result["pairs"] == 4 and result["ties"] == 1
    assert result["accuracy_without_ties"] == pytest.approx(2 / 3)
    # eps = 0 makes the identical pair a model tie as well: (2 concordant + 1 tie) / 4.
    assert result["accuracy_with_ties"] == pytest.approx(3 / 4) and result["tie_epsilon"] == 0.0


def test_cli_rewards_list_score_and_eval(tmp_path, capsys):
    assert main(["rewards", "list"]) == 0
    listing = capsys.readouterr().out
    for name in ("pickscore", "concepts-detector", "concepts-vqa", "vlm-judge", "world-verifier"):
        assert f"| {name} |" in listing
    from visalign.world.grammar import parse_prompt
    from visalign.world.render import render

    image = render(parse_prompt("a red circle"), 0)
    Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(tmp_path / "a.png")
    assert main(["rewards", "score", "--reward", "world-verifier", "--reward", "world-cleanliness",
                 "--prompt", "a red circle", str(tmp_path / "a.png")]) == 0
    out = capsys.readouterr().out
    assert f"| {tmp_path / 'a.png'} | 1.0000 |" in out
    assert main(["rewards", "score", "--reward", "world-verifier", "--prompt", "a blue square", "--json",
                 str(tmp_path / "a.png")]) == 0
    scores = json.loads(capsys.readouterr().out)[str(tmp_path / "a.png")]
    assert scores["world-verifier"] < 1.0 and scores["world-verifier/passed"] == 0.0
    rows = [{"prompt": "p", "chosen": "img/light.png", "rejected": "img/dark.png"}]
    pairs = _write_pair_set(tmp_path, rows)
    code = main(["rewards", "eval", "--pairs", str(pairs), "--reward", "tests.helpers.toy_rewards.MeanBrightness",
                 "--out", str(tmp_path / "eval.json")])
    assert code == 0
    assert json.loads((tmp_path / "eval.json").read_text())["tests.helpers.toy_rewards.MeanBrightness"][
        "accuracy_without_ties"] == 1.0
    assert main(["rewards", "score", "--reward", "world-verifier", "--option", "pickscore.model=x",
                 "--prompt", "a", str(tmp_path / "a.png")]) == 2
    assert "not among --reward" in capsys.readouterr().err
    assert main(["rewards", "score", "--reward", "world-verifier", "--option", "world-verifier.modle=x",
                 "--prompt", "a", str(tmp_path / "a.png")]) == 2
    assert "takes no option ['modle']" in capsys.readouterr().err


def test_cli_train_artifact_from_a_generated_set(tmp_path, capsys):
    assert main(["rewards", "make-artifact-set", "--out", str(tmp_path / "set"), "--num-clean", "48",
                 "--num-artifact", "48"]) == 0
    assert main(["rewards", "train-artifact", "--clean", str(tmp_path / "set" / "clean"), "--artifact",
                 str(tmp_path / "set" / "artifact"), "--out", str(tmp_path / "a.safetensors"), "--epochs", "1"]) == 0
    assert (tmp_path / "a.safetensors").is_file()
    from visalign import rewards

    r = rewards.load("artifact", weights=str(tmp_path / "a.safetensors"))
    assert r(images=torch.rand(2, 3, 32, 32))["score"].shape == (2,)
