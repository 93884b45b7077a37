"""Editing as a conditioning: prompt files name source images, rewards that judge an edit receive them, and the
adapter interface refuses a mismatch between model and prompts."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from visalign.models.base import encode
from visalign.prompts import FilePrompts, Prompt, source_image_paths, source_images
from visalign.rewards import load as load_reward
from visalign.rewards.base import RewardError
from visalign.rewards.compose import WeightedSum


def write_png(path, value, size=(8, 8)):
    array = np.full((*size, 3), value, dtype=np.uint8)
    Image.fromarray(array).save(path)
    return path


def test_prompt_files_resolve_and_check_source_images(tmp_path):
    (tmp_path / "img").mkdir()
    write_png(tmp_path / "img" / "a.png", 255)
    path = tmp_path / "edits.jsonl"
    path.write_text(json.dumps({"prompt": "make it red", "source_image": "img/a.png"}) + "\n")
    items = FilePrompts(path).fixed(1)
    assert items[0].metadata["source_image"] == str((tmp_path / "img" / "a.png").resolve())
    pixels = source_images(items, (4, 6))
    assert pixels.shape == (1, 3, 4, 6) and torch.allclose(pixels, torch.ones_like(pixels))

    path.write_text(json.dumps({"prompt": "x"}) + "\n" + json.dumps({"prompt": "y", "source_image": "nope.png"}))
    with pytest.raises(ValueError, match=r"edits.jsonl, line 2: 'source_image' .*nope.png' does not exist"):
        FilePrompts(path)
    with pytest.raises(ValueError, match="some prompts name a 'source_image' and some do not, e.g. 'b'"):
        source_image_paths([Prompt("a", {"source_image": "x.png"}), Prompt("b")])
    assert source_images([Prompt("a"), Prompt("b")], (4, 4)) is None


def test_a_reward_that_judges_edits_gets_source_images():
    reward = load_reward("source-l1")
    images = torch.full((2, 3, 4, 4), 0.75)
    sources = torch.stack([torch.full((3, 4, 4), 0.25), torch.full((3, 4, 4), 0.75)])
    torch.testing.assert_close(reward(images=images, source_images=sources), torch.tensor([0.5, 1.0]))
    # A source of another size is resized to the edit's; the score is 1 - mean |edit - source|.
    torch.testing.assert_close(reward(images=images, source_images=torch.full((2, 3, 8, 8), 0.5)),
                               torch.tensor([0.75, 0.75]))
    with pytest.raises(RewardError, match="source-l1 judges an edit: it needs source_images="):
        reward(images=images)
    with pytest.raises(RewardError, match="source_images must be a float tensor 2×3×H×W"):
        reward(images=images, source_images=sources[:1])
    # Rewards that do not judge edits ignore them; a composite forwards them to the members that do.
    torch.testing.assert_close(load_reward("brightness")(images=images, source_images=sources),
                               torch.full((2,), 0.75))
    both = WeightedSum({"source-l1": 1.0, "brightness": 1.0}, name="edit-and-bright")
    assert both.uses_source_images
    torch.testing.assert_close(both(images=images, source_images=sources)["score"], torch.tensor([1.25, 1.75]))


def test_source_images_are_read_from_metadata(tmp_path):
    """A caller that passes the prompts' metadata (trainers, steering, evaluation) needs nothing more."""
    a, b = write_png(tmp_path / "a.png", 0), write_png(tmp_path / "b.png", 255, size=(16, 16))
    images = torch.full((2, 3, 8, 8), 0.5)
    out = load_reward("source-l1")(images=images, metadata=[{"source_image": str(a)}, {"source_image": str(b)}])
    torch.testing.assert_close(out, torch.tensor([0.5, 0.5]))


def test_encode_refuses_a_mismatch_between_model_and_prompts(tiny_sd3):
    with pytest.raises(ValueError, match="tiny-sd3|sd3 is not an editing model"):
        encode(tiny_sd3, ["a red circle"], cfg=False, images=torch.rand(1, 3, 32, 32))
    from visalign.models import load_model

    kontext = load_model("tiny-flux-kontext")
    with pytest.raises(ValueError, match="flux-kontext edits a source image per prompt"):
        encode(kontext, ["a red circle"], cfg=False)
    with pytest.raises(ValueError, match="cannot be encoded once up front"):
        kontext.free_text_encoders(["a red circle"], cfg=False)
