"""Cost of scoring a video RL step's clips with the world rewards: one shared detection per batch against one per
reward call, in one run.

    .venv/bin/python bench/world_reward_speed.py --clips 64

A video world step scores each batch with `world-motion` (which also reports per-frame cleanliness) and
`world-cleanliness` (configs/nft_world_video.yaml). Both judge the objects the verifier detects in every frame;
detection is nearly all of their cost. The clips are renders of the RL prompts with sampler-like speckle and
blur, so the detector meets stray marks as it does on a model's samples. The arms run interleaved round by round
(`bench/paired.py`); prints the median seconds per batch of each and their ratio with its spread, and checks both
arms score the same.
"""

from __future__ import annotations

import argparse
import sys

import torch
from paired import compare

from visalign.prompts import Prompt
from visalign.trainers.common import score_rewards
from visalign.world.motion import render_clips, sample_motion_specs
from visalign.world.rewards import WorldCleanlinessReward, WorldMotionReward


def sampler_like(videos: torch.Tensor, seed: int) -> torch.Tensor:
    """Renders roughened like a model's samples: a slight blur and pixel speckle."""
    g = torch.Generator().manual_seed(seed)
    frames = videos.reshape(-1, *videos.shape[2:])
    blurred = torch.nn.functional.avg_pool2d(frames, 3, stride=1, padding=1, count_include_pad=False)
    frames = 0.5 * frames + 0.5 * blurred + 0.06 * torch.randn(frames.shape, generator=g)
    return frames.clamp(0, 1).reshape(videos.shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=64, help="clips per batch (a step of 8 prompts x 8)")
    parser.add_argument("--repeats", type=int, default=3, help="batches per arm, each fresh")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    args = parser.parse_args()
    torch.set_num_threads(2)
    verify = sys.modules["visalign.world.verify"]  # the module (the package exports a function of that name)
    rewards = {r.name: r for r in (WorldMotionReward(), WorldCleanlinessReward())}
    batches = []
    for r in range(args.repeats):
        specs = sample_motion_specs(args.clips, "seen", generator=r)
        batches.append((sampler_like(render_clips(specs, r), r), [Prompt(s.prompt) for s in specs]))
    cached = verify._detect_pixels

    def arm(detect):
        def run():  # a fresh cache, the batches scored as a step scores them
            cached.cache_clear()
            verify._detect_pixels = detect
            try:
                return [score_rewards(rewards, videos, items) for videos, items in batches]
            finally:
                verify._detect_pixels = cached
        return run

    arms = {"detect per call": arm(cached.__wrapped__), "shared detection": arm(cached)}
    scores = {name: fn() for name, fn in arms.items()}
    same = all(torch.allclose(a[k], b[k], rtol=0, atol=0, equal_nan=True)  # NaN: a concept the prompt lacks
               for (a, _), (b, _) in zip(*scores.values(), strict=True) for k in a)
    report = compare(arms, rounds=args.rounds, warmup=0)  # each arm ran once above
    shared = report.arms[1]
    lo, hi = shared.spread
    for a in report.arms:
        print(f"{a.name:>17}: {a.median_seconds / args.repeats:.2f} s per batch of {args.clips} clips (median)")
    print(f"shared detection is {1 / shared.median_ratio:.1f}x faster (rounds {1 / hi:.1f} – {1 / lo:.1f}x, "
          f"{args.rounds} interleaved, bench/paired.py); scores identical: {same}")

if __name__ == "__main__":
    main()
