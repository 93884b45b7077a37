"""Accuracy and speed of the shapes-world verifier on renders of the renderer.

    .venv/bin/python bench/world_verifier.py --n 2000

Prints, per template: whole-prompt pass rate of the main and strict judges on clean renders, on mildly
corrupted renders, and the rejection rate of counterfactual prompts (one concept changed).
"""

import argparse
import random
import time

import torch

from visalign.world import (
    TEMPLATES,
    all_specs,
    cleanliness,
    counterfactuals,
    render_batch,
    verify,
    verify_strict,
)


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    offsets = torch.arange(-3, 4, dtype=torch.float32)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).repeat(3, 1, 1, 1)
    padded = torch.nn.functional.pad(images, (3, 3, 3, 3), mode="replicate")
    rows = torch.nn.functional.conv2d(padded, kernel.view(3, 1, 1, 7), groups=3)
    return torch.nn.functional.conv2d(rows, kernel.view(3, 1, 7, 1), groups=3)


def rate_per_template(passed: torch.Tensor, specs: list) -> str:
    rates = []
    for template in TEMPLATES:
        rows = [i for i, spec in enumerate(specs) if spec.template == template]
        rates.append(f"{template} {passed[rows].mean().item():.4f}")
    return f"all {passed.mean().item():.4f} | " + ", ".join(rates)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=2000, help="renders, spread evenly over the templates")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    rng = random.Random(args.seed)
    specs = [rng.choice(all_specs(t)) for t in TEMPLATES for _ in range(args.n // len(TEMPLATES))]
    start = time.perf_counter()
    images = render_batch(specs, args.seed)
    print(f"render {len(specs)} images: {time.perf_counter() - start:.2f} s")
    start = time.perf_counter()
    main_result = verify(images, specs)
    print(f"verify {len(specs)} images: {time.perf_counter() - start:.2f} s")
    strict_result = verify_strict(images, specs)

    print("clean, main   :", rate_per_template(main_result.passed, specs))
    print("clean, strict :", rate_per_template(strict_result.passed, specs))
    agreement = (main_result.passed == strict_result.passed).float().mean().item()
    print(f"strict agrees with main on clean renders: {agreement:.4f}")

    generator = torch.Generator().manual_seed(args.seed)
    corrupted = {
        "blur 0.5": gaussian_blur(images, 0.5),
        "blur 0.7": gaussian_blur(images, 0.7),
        "blur 1.0": gaussian_blur(images, 1.0),
        "noise 0.03": (images + 0.03 * torch.randn(images.shape, generator=generator)).clamp(0, 1),
        "noise 0.05": (images + 0.05 * torch.randn(images.shape, generator=generator)).clamp(0, 1),
        "blur 0.7 + noise 0.03": (
            gaussian_blur(images, 0.7) + 0.03 * torch.randn(images.shape, generator=generator)
        ).clamp(0, 1),
    }
    for name, corrupt in corrupted.items():
        print(f"{name:22s} main:", rate_per_template(verify(corrupt, specs).passed, specs))
        print(f"{name:22s} strict:", rate_per_template(verify_strict(corrupt, specs).passed, specs))

    speckle = (torch.rand(images.shape, generator=generator) - 0.5) * 0.1
    for name, batch in {"clean": images, "speckle +-0.05": (images + speckle).clamp(0, 1)}.items():
        scores = cleanliness(batch)
        print(f"cleanliness {name}: min {scores.min():.4f} mean {scores.mean():.4f} max {scores.max():.4f}")

    pairs = [(i, kind, wrong) for i, spec in enumerate(specs) for kind, wrong in counterfactuals(spec)]
    rejected = 1 - verify(images[[i for i, _, _ in pairs]], [wrong for _, _, wrong in pairs]).passed
    for kind in sorted({kind for _, kind, _ in pairs}):
        rows = [j for j, (_, k, _) in enumerate(pairs) if k == kind]
        print(f"rejected, {kind:15s}: {rejected[rows].mean().item():.4f} of {len(rows)}")


if __name__ == "__main__":
    main()
