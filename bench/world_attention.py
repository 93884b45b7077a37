"""Attention kernel of the world models' training passes on CPU: PyTorch's default (flash attention) against the
math kernel that `WorldAdapter.grad_attention` selects for passes that build a graph, in one run.

    .venv/bin/python bench/world_attention.py

For the shipped image and video world models, a training pass (forward at CFG 3, as a guided NFT step trains, and
backward) and a no-grad pass (as sampling runs) on a micro-batch, under bf16 autocast as the video recipes train and
in fp32. The two kernels' passes run interleaved round by round (`bench/paired.py`); prints the median ratio of
default to math with its spread, and the largest difference between
the two kernels' velocities and gradients relative to their scale. The adapters pick the math kernel for passes
that build a graph only (`grad_attention`); sampling keeps PyTorch's choice.
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from visalign.world.model import WorldAdapter, WorldVideoAdapter


def pass_fn(adapter, kernel, batch: int, grad: bool, bf16: bool):
    """One pass with attention `kernel` (None: PyTorch's choice) on a fixed micro-batch; returns the velocity and
    the first weight's gradient."""
    g = torch.Generator().manual_seed(0)
    shape = adapter.latent_shape(32, 32, adapter.frames)
    x = torch.randn(batch, *shape, generator=g)
    sigma = torch.rand(batch, generator=g)
    cond = adapter.encode_prompts(["a red circle moving right" if adapter.frames else "a red circle"] * batch)
    weight = next(adapter.denoiser.parameters())

    def run():
        weight.grad = None
        with (torch.set_grad_enabled(grad), sdpa_kernel([kernel]) if kernel else contextlib.nullcontext(),
              torch.autocast("cpu", torch.bfloat16) if bf16 else contextlib.nullcontext()):
            v = adapter.predict_velocity(x, sigma, cond, 3.0)
        if grad:
            v.float().square().mean().backward()
        return v.detach().float(), (weight.grad.clone() if grad else torch.zeros(()))

    return run


def main() -> None:
    from paired import compare

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16, help="clips or images per pass (a training micro-batch)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per row")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print("| model | pass | precision | math kernel, s | default / math (median) | spread | max rel. diff |")
    print("|---|---|---|---|---|---|---|")
    for adapter in (WorldAdapter.from_pretrained(), WorldVideoAdapter.from_pretrained()):
        adapter.denoiser.requires_grad_(True)
        adapter.grad_attention = None  # the kernel is set here, around the whole pass
        for grad, bf16 in ((True, True), (True, False), (False, True)):
            arms = {"math": pass_fn(adapter, SDPBackend.MATH, args.batch, grad, bf16),
                    "default": pass_fn(adapter, None, args.batch, grad, bf16)}
            (v_math, g_math), (v_def, g_def) = arms["math"](), arms["default"]()
            diff = max(float((v_def - v_math).abs().max() / v_def.abs().max()),
                       float((g_def - g_math).abs().max() / g_def.abs().max().clamp(min=1e-12)) if grad else 0.0)
            report = compare(arms, rounds=args.rounds)
            default = report.arms[1]
            lo, hi = default.spread
            print(f"| {adapter.name} | {'train' if grad else 'no-grad'} | {'bf16' if bf16 else 'fp32'} | "
                  f"{report.arms[0].median_seconds:.3f} | {default.median_ratio:.2f}x | {lo:.2f} – {hi:.2f} | "
                  f"{diff:.1e} |", flush=True)
    print(f"\n{args.rounds} interleaved rounds per row (bench/paired.py); context: {report.context}")


if __name__ == "__main__":
    main()
