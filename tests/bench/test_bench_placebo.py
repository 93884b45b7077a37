"""The placebo reward of bench/video_diagnostics.py: a score that carries no information about the content."""

import torch
from video_diagnostics import PlaceboReward  # bench/


def test_placebo_is_a_fixed_function_of_the_8bit_pixels():
    reward = PlaceboReward()
    clips = torch.rand(64, 9, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    a, b = reward(videos=clips), reward(videos=clips.clone())
    assert torch.equal(a, b) and a.shape == (64,)
    assert ((a >= 0) & (a < 1)).all()
    # Changing one pixel changes the score; the scores spread over [0, 1) and do not follow brightness.
    changed = clips.clone()
    changed[0, 0, 0, 0, 0] = 1.0 if clips[0, 0, 0, 0, 0] < 0.5 else 0.0
    assert reward(videos=changed)[0] != a[0]
    assert a.std() > 0.2
    brightness = clips.mean(dim=(1, 2, 3, 4))
    assert abs(torch.corrcoef(torch.stack([a, brightness]))[0, 1]) < 0.35
