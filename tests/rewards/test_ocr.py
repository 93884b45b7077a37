"""The `ocr` reward: Flow-GRPO's score against hand values, target text from the prompt or metadata, RapidOCR's
bundled models on rendered text with no network, and a 2-step Flow-GRPO run on it."""

import json
import math
import socket
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from visalign import rewards
from visalign.rewards.base import RewardError
from visalign.rewards.ocr import OCRAccuracy, ocr_accuracy, target_text

FONT = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"  # matplotlib (dev) ships it
SIGN = 'a sign that says "HELLO"'


def render(text: str, size: tuple[int, int] = (256, 64), font_size: int = 40) -> torch.Tensor:
    """Black text centred on white, [3, H, W] in [0, 1]."""
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).text((size[0] // 2, size[1] // 2), text, fill="black",
                               font=ImageFont.truetype(str(FONT), font_size), anchor="mm")
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255


def _refuse(*args, **kwargs):
    raise AssertionError("the ocr reward tried to reach the network")


@pytest.fixture(scope="module")
def ocr():
    """One reward for the module (its ONNX sessions load on the first image, ~1-3 s), built and first used with
    sockets and rapidocr's downloader refusing: the bundled models are all it needs."""
    from rapidocr.utils.download_file import DownloadFile

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", _refuse)
        patch.setattr(DownloadFile, "run", _refuse)
        reward = OCRAccuracy()
        assert reward(prompts=[SIGN], images=render("HELLO")[None]).item() == 1.0
    return reward


@pytest.mark.parametrize(("recognised", "target", "expected"), [
    ("HELLO", "hello", 1.0),                # case is ignored
    ("Hello World", "helloworld", 1.0),     # spaces are removed on both sides
    ("xxHELLOyy", "HELLO", 1.0),            # the target inside longer text: distance 0
    ("HELL", "HELLO", 1 - 1 / 5),           # one insertion
    ("HELP", "HELLO", 1 - 2 / 5),           # P→L and an insertion
    ("WORLD", "HELLO", 1 - 4 / 5),          # four substitutions (L is the only letter kept in place)
    ("abcdefghijkl", "HELLO", 0.0),         # distance 12 capped at len(target) = 5
    ("", "HELLO", 0.0),                     # nothing read
])
def test_ocr_accuracy_matches_flow_grpo_normalisation(recognised, target, expected):
    assert ocr_accuracy(recognised, target) == pytest.approx(expected)


def test_target_text_is_the_quoted_text_unless_metadata_names_one():
    assert target_text(SIGN, None) == "HELLO"
    assert target_text('"Open" and "Closed" signs', {}) == "Open"  # the first quoted span, as flow_grpo's split
    assert target_text(SIGN, {"text": "WORLD"}) == "WORLD"
    assert target_text("a blank sign", {"text": "WORLD"}) == "WORLD"
    with pytest.raises(RewardError, match=r"prompt 'a blank sign' has no text to render.*double quotes"):
        target_text("a blank sign", None)
    with pytest.raises(RewardError, match="has no text to render"):
        target_text('a sign that says " "', None)  # nothing left once spaces go
    with pytest.raises(RewardError, match=r"metadata\['text'\]=3 must be a non-empty string"):
        target_text(SIGN, {"text": 3})


def test_a_prompt_without_quoted_text_fails_before_any_image_is_read(ocr, monkeypatch):
    monkeypatch.setattr(ocr, "read", _refuse)
    with pytest.raises(RewardError, match="prompt 'a red sign' has no text to render"):
        ocr(prompts=[SIGN, "a red sign"], images=torch.ones(2, 3, 64, 256))


def test_rendered_text_scores_by_how_well_it_reads(ocr):
    images = torch.stack([render("HELLO"), render("WORLD"), torch.ones(3, 64, 256), render("Hello World", font_size=32),
                          render("WORLD")])
    prompts = [SIGN, SIGN, SIGN, 'a neon sign reading "hello world"', SIGN]
    metadata = [{}, {}, {}, {}, {"text": "WORLD"}]  # the last one's metadata overrides its prompt
    scores = ocr(prompts=prompts, images=images, metadata=metadata)
    assert scores[0] >= 0.9 and scores[3] >= 0.9 and scores[4] >= 0.9
    assert scores[1] <= 0.5  # WORLD for HELLO: one letter of five in place
    assert scores[2].item() == 0.0  # a blank image: nothing read, distance len(target)


def test_the_reward_is_registered_with_its_options_checked():
    info = rewards.describe("ocr")
    assert info["differentiable"] is False and info["value_range"] == (0.0, 1.0) and info["inputs"] == "images"
    with pytest.raises(ValueError, match="takes no option"):
        rewards.check_options("ocr", {"language": "en"})
    with pytest.raises(ValueError, match=r"text_score=1.5 must be in \[0, 1\)"):
        OCRAccuracy(text_score=1.5)
    with pytest.raises(ValueError, match="threads=-1 must be >= 0"):
        OCRAccuracy(threads=-1)


def test_ocr_uses_only_the_bundled_models(ocr):
    import rapidocr

    bundled = Path(rapidocr.__file__).parent / "models"
    assert Path(ocr.engine.cfg.Det.model_path).parent == bundled
    assert Path(ocr.engine.cfg.Rec.model_path).parent == bundled
    assert ocr.engine.use_cls is False


def test_two_flow_grpo_steps_on_tiny_sd3_with_the_ocr_reward(tiny_run, tmp_path):
    from visalign.trainers.flow_grpo import FlowGRPOTrainer

    prompts = tmp_path / "signs.txt"
    prompts.write_text('a sign that says "HELLO"\na poster with the words "Open Late"\n')
    FlowGRPOTrainer(tiny_run(f"train.prompts={prompts}", "rewards={ocr: 1.0}")).train()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1]
    assert all(math.isfinite(row["rewards/ocr/mean"]) and 0 <= row["rewards/ocr/mean"] <= 1 for row in rows)
