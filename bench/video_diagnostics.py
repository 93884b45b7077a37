"""Why do updates degrade the world-video model? Three controls on the shipped base, held-out motion metrics.

    .venv/bin/python bench/video_diagnostics.py                     # all three
    .venv/bin/python bench/video_diagnostics.py --only sft --sft-lr 5e-5 --sft-steps 16

  guidance  the base sampled at several CFG scales, and with the RL rollouts' 10 Euler steps: how much of its
            consistency lives in the guidance and in the step count
  perturb   the base with Gaussian noise of several scales added to every weight: is the model fragile?
  sft       Adam steps of the pretraining flow-matching loss on rendered ground-truth clips (fresh pretraining
            batches), the same learning rate as the RL configs: does a plain optimizer step hurt it?

Every evaluation samples the same held-out prompts (--n per template) with the same seeds (20 Euler steps unless
stated), so the rows compare directly; one table of all rows is printed at the end.

`PlaceboReward` is the fourth control, run through the video bench: a reward that ignores what a clip shows
(a hash of its 8-bit pixels, uniform in [0, 1)), so an update on it carries no signal, only the trainer's noise:

    .venv/bin/python bench/video_world.py --minutes 3.5 --eval-every 10 --arms nft -- \
        "rewards={video_diagnostics.PlaceboReward: 1.0}"
"""

from __future__ import annotations

import argparse
import hashlib

import torch

from rewards import Reward
from visalign.eval.motion_suite import generate_clips, motion_suite_prompts, score_motion
from visalign.models import load_model
from visalign.world.pretrain import PretrainConfig, batch_for_step, flow_matching_step

METRICS = ("direction", "whole_prompt", "consistency", "cleanliness")


class PlaceboReward(Reward):
    """A score unrelated to the content: the first 8 bytes of the SHA-256 of the clip's 8-bit pixels, in [0, 1)."""

    name = "placebo"
    needs_prompts = False
    inputs = ("images", "videos")
    value_range = (0.0, 1.0)

    def score(self, *, prompts, images, videos, metadata):
        x = (images if images is not None else videos).float()
        q = (x.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        digests = [hashlib.sha256(clip.numpy().tobytes()).digest()[:8] for clip in q]
        return torch.tensor([int.from_bytes(d, "little") / 2**64 for d in digests])


def evaluate(adapter, n: int, guidance: float = 3.0, steps: int = 20) -> dict:
    specs = motion_suite_prompts("heldout", n, 1234)
    with torch.no_grad():
        clips = generate_clips(adapter, [s.prompt for s in specs], steps=steps, guidance=guidance, seed=777,
                               batch_size=32, progress=False)
    overall = score_motion(clips, specs)["overall"]
    return {k: overall[k] for k in METRICS}


def guidance_rows(n: int, scales: list[float], steps: list[int]) -> list[tuple[str, dict]]:
    adapter = load_model("world-video")
    return ([(f"base, CFG {g:g}", evaluate(adapter, n, g)) for g in scales]
            + [(f"base, {k} Euler steps", evaluate(adapter, n, steps=k)) for k in steps])


def perturb_rows(n: int, stds: list[float]) -> list[tuple[str, dict]]:
    rows = []
    for std in stds:
        adapter = load_model("world-video")
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in [*adapter.denoiser.parameters(), *adapter.text_encoder.parameters()]:
                p.add_(torch.randn(p.shape, generator=g) * std)
        rows.append((f"weights + N(0, {std:g}²)", evaluate(adapter, n)))
    return rows


def sft_rows(n: int, lr: float, steps: int) -> list[tuple[str, dict]]:
    adapter = load_model("world-video")
    params = list(adapter.denoiser.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    # Batches the pretraining never drew (other seed and steps), the same losses and clipping as pretraining.
    cfg = PretrainConfig(video=True, batch_size=32, seed=5)
    rows = [(f"ground-truth flow matching, lr {lr:g}, 0 steps", evaluate(adapter, n))]
    for step in range(steps):
        prompts, x0, noise, sigma = batch_for_step(cfg, 10_000 + step)
        cond = adapter.text_features(prompts)
        flow_matching_step(lambda x, s, c=cond: adapter._velocity(x, s, c, 1.0), x0, noise, sigma, opt, params)
        if step + 1 in (steps // 2, steps):
            rows.append((f"ground-truth flow matching, lr {lr:g}, {step + 1} steps", evaluate(adapter, n)))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=("guidance", "perturb", "sft"), nargs="+",
                        default=["guidance", "perturb", "sft"])
    parser.add_argument("--n", type=int, default=16, help="held-out prompts per template")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 3.0, 5.0])
    parser.add_argument("--sample-steps", type=int, nargs="+", default=[10], help="also sample the base with these")
    parser.add_argument("--stds", type=float, nargs="+", default=[1.6e-4, 5e-4, 1.5e-3])
    parser.add_argument("--sft-lr", type=float, default=5e-5)
    parser.add_argument("--sft-steps", type=int, default=16)
    args = parser.parse_args(argv)
    if args.n < 1 or args.sft_steps < 2:
        parser.error("--n must be >= 1 and --sft-steps >= 2")
    torch.set_num_threads(2)
    rows = []
    if "guidance" in args.only:
        rows += guidance_rows(args.n, args.scales, args.sample_steps)
    if "perturb" in args.only:
        rows += perturb_rows(args.n, args.stds)
    if "sft" in args.only:
        rows += sft_rows(args.n, args.sft_lr, args.sft_steps)
    print("| held-out, CFG 3 unless stated | " + " | ".join(METRICS) + " |")
    print("|---|" + "---|" * len(METRICS))
    for label, m in rows:
        print(f"| {label} | " + " | ".join(f"{m[k]:.3f}" for k in METRICS) + " |")


if __name__ == "__main__":
    main()
