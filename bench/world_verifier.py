"""Accuracy and speed of the shapes-world verifier on renders of the renderer.

    .venv/bin/python bench/world_verifier.py --n 2000

Prints, per template: whole-prompt pass rate of the main and strict judges on clean renders, on mildly
corrupted renders, and the rejection rate of counterfactual prompts (one concept changed).

Speed: rendering the images, the main judge and the strict judge (each with its own object detection: the
detection cache is cleared before every call) run interleaved round by round (`bench/paired.py`, `--rounds`);
prints the median seconds of each and the paired table of their per-round ratios to rendering the same images,
with the spread and the context (threads, load, commit). Writes results.json (the paired report and every rate
printed) to `--out`.
"""

import argparse
import random
from pathlib import Path

import paired
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
from visalign.world.verify import _detect_pixels


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    offsets = torch.arange(-3, 4, dtype=torch.float32)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).repeat(3, 1, 1, 1)
    padded = torch.nn.functional.pad(images, (3, 3, 3, 3), mode="replicate")
    rows = torch.nn.functional.conv2d(padded, kernel.view(3, 1, 1, 7), groups=3)
    return torch.nn.functional.conv2d(rows, kernel.view(3, 1, 7, 1), groups=3)


def rates_per_template(passed: torch.Tensor, specs: list) -> dict[str, float]:
    rates = {"all": passed.mean().item()}
    for template in TEMPLATES:
        rows = [i for i, spec in enumerate(specs) if spec.template == template]
        rates[template] = passed[rows].mean().item()
    return rates


def rate_per_template(rates: dict[str, float]) -> str:
    return f"all {rates['all']:.4f} | " + ", ".join(f"{t} {rates[t]:.4f}" for t in TEMPLATES)


def fresh(judge):
    """`judge` with its own detection: the cache shared between judges of the same pixels is cleared first."""
    def run(images, specs):
        _detect_pixels.cache_clear()
        return judge(images, specs)
    return run


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=2000, help="renders, spread evenly over the templates")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (render, main, strict)")
    parser.add_argument("--out", default="outputs/bench_world_verifier", help="folder of results.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: dict = {"settings": vars(args)}

    rng = random.Random(args.seed)
    specs = [rng.choice(all_specs(t)) for t in TEMPLATES for _ in range(args.n // len(TEMPLATES))]
    # The outputs the accuracy part reads; these calls are also the timing's warm-up.
    images = render_batch(specs, args.seed)
    main_result = fresh(verify)(images, specs)
    strict_result = verify_strict(images, specs)
    report = paired.compare({"render": lambda: render_batch(specs, args.seed),
                             "verify": lambda: fresh(verify)(images, specs),
                             "verify strict": lambda: fresh(verify_strict)(images, specs)},
                            rounds=args.rounds, warmup=0)
    seconds = {a.name: a.median_seconds for a in report.arms}
    print(f"render {len(specs)} images: {seconds['render']:.2f} s")
    print(f"verify {len(specs)} images: {seconds['verify']:.2f} s")
    print(f"verify strict {len(specs)} images: {seconds['verify strict']:.2f} s "
          f"(medians of {args.rounds} interleaved rounds, each judge with its own detection)")
    print(report.table())

    rates = results["rates"] = {}
    for name, result in {"clean, main": main_result, "clean, strict": strict_result}.items():
        rates[name] = rates_per_template(result.passed, specs)
        print(f"{name:14s}:", rate_per_template(rates[name]))
    agreement = results["strict_agrees_with_main"] = (main_result.passed == strict_result.passed).float().mean().item()
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
        for judge, fn in (("main", verify), ("strict", verify_strict)):
            rates[f"{name}, {judge}"] = rates_per_template(fn(corrupt, specs).passed, specs)
            print(f"{name:22s} {judge}:", rate_per_template(rates[f"{name}, {judge}"]))

    speckle = (torch.rand(images.shape, generator=generator) - 0.5) * 0.1
    results["cleanliness"] = {}
    for name, batch in {"clean": images, "speckle +-0.05": (images + speckle).clamp(0, 1)}.items():
        scores = cleanliness(batch)
        results["cleanliness"][name] = {"min": scores.min().item(), "mean": scores.mean().item(),
                                        "max": scores.max().item()}
        print(f"cleanliness {name}: min {scores.min():.4f} mean {scores.mean():.4f} max {scores.max():.4f}")

    pairs = [(i, kind, wrong) for i, spec in enumerate(specs) for kind, wrong in counterfactuals(spec)]
    rejected = 1 - verify(images[[i for i, _, _ in pairs]], [wrong for _, _, wrong in pairs]).passed
    results["rejected"] = {}
    for kind in sorted({kind for _, kind, _ in pairs}):
        rows = [j for j, (_, k, _) in enumerate(pairs) if k == kind]
        results["rejected"][kind] = {"rate": rejected[rows].mean().item(), "prompts": len(rows)}
        print(f"rejected, {kind:15s}: {rejected[rows].mean().item():.4f} of {len(rows)}")
    path = report.write(Path(args.out) / "results.json", **results)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
