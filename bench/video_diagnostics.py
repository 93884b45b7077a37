"""Why do updates degrade the world-video model? Three controls on the shipped base, held-out motion metrics.

    .venv/bin/python bench/video_diagnostics.py                     # all three
    .venv/bin/python bench/video_diagnostics.py --only sft --sft-lr 5e-5 --sft-steps 16
    .venv/bin/python bench/video_diagnostics.py --only sft --sft-lr 3e-4 --sft-steps 600 --sft-eval-every 200 \
        --sft-warmup 20 --sft-ema 0.99 --sft-text-encoder \
        --sft-templates two_motion two_motion two_motion two_motion motion speed still stop

  guidance  the base sampled at several CFG scales, and with the RL rollouts' 10 Euler steps: how much of its
            consistency lives in the guidance and in the step count
  perturb   the base with Gaussian noise of several scales added to every weight: is the model fragile?
  sft       Adam steps of the pretraining flow-matching loss on rendered ground-truth clips (fresh pretraining
            batches), the same learning rate as the RL configs: does a plain optimizer step hurt it? With a
            pretraining-like learning rate, an EMA, the text encoder trained too and a template mix weighted towards
            two objects (a template listed k times is drawn k times as often), it is continued pretraining: does
            more two-object data teach the base to move two objects differently?

`--model-path` runs them on another video checkpoint; `--sft-batch 64` matches an RL step's clips and
`--sft-lora-rank 16` trains only the RL runs' conditioning-pathway LoRA: together, the oracle that replaces every
rollout with a correct ground-truth clip, the most any reward could teach from that many clips.

Every evaluation samples the same held-out prompts (--n per template) with the same seeds (20 Euler steps unless
stated), so the rows compare directly; one table of all rows is printed at the end and written to `--out`
(results.md, and results.json with the settings and `context`: threads, load, CPUs, device, commit from
bench/paired.py). The rows are compared on outcomes after the same work (each control's fixed steps and the same
evaluation), not on time: nothing is timed, and the controls run one after another, as each row is deterministic
whatever runs beside it.

`PlaceboReward` is the fourth control, run through the video bench: a reward that ignores what a clip shows
(a hash of its 8-bit pixels, uniform in [0, 1)), so an update on it carries no signal, only the trainer's noise:

    .venv/bin/python bench/video_world.py --minutes 3.5 --eval-every 10 --arms nft -- \
        "rewards={video_diagnostics.PlaceboReward: 1.0}"
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import paired
import torch

from visalign.models import load_model
from visalign.rewards import Reward
from visalign.trainers.common import ParamCopy
from visalign.world.motion_suite import generate_clips, motion_suite_prompts, score_motion
from visalign.world.pretrain import PretrainConfig, batch_for_step, flow_matching_step

METRICS = ("direction", "two objects", "whole_prompt", "consistency", "cleanliness")


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
    scores = score_motion(clips, specs)
    # "two objects": direction accuracy on the two_motion template alone, where the base has its room
    return {**{k: scores["overall"][k] for k in METRICS if k in scores["overall"]},
            "two objects": scores["templates"]["two_motion"]["direction"]}


def guidance_rows(n: int, scales: list[float], steps: list[int], path: str | None = None) -> list[tuple[str, dict]]:
    adapter = load_model("world-video", path)
    return ([(f"base, CFG {g:g}", evaluate(adapter, n, g)) for g in scales]
            + [(f"base, {k} Euler steps", evaluate(adapter, n, steps=k)) for k in steps])


def perturb_rows(n: int, stds: list[float], path: str | None = None) -> list[tuple[str, dict]]:
    rows = []
    for std in stds:
        adapter = load_model("world-video", path)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in [*adapter.denoiser.parameters(), *adapter.text_encoder.parameters()]:
                p.add_(torch.randn(p.shape, generator=g) * std)
        rows.append((f"weights + N(0, {std:g}²)", evaluate(adapter, n)))
    return rows


# The RL runs' conditioning-pathway LoRA targets (README, "Video: is the gain real?").
CONDITIONING_LORA = ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "time_emb_proj",
                     "class_embedding.linear_1", "class_embedding.linear_2")


def sft_rows(n: int, lr: float, steps: int, *, eval_every: int | None = None, ema: float = 0.0,
             text_encoder: bool = False, templates: list[str] | None = None, warmup: int = 0,
             path: str | None = None, batch_size: int = 32, lora_rank: int = 0,
             min_sigma: float = 0.0) -> list[tuple[str, dict]]:
    adapter = load_model("world-video", path)
    if lora_rank:  # the conditioning-pathway LoRA of the RL runs (README), trained on ground truth instead
        adapter.add_lora(rank=lora_rank, alpha=lora_rank, target_modules=list(CONDITIONING_LORA))
        params = [p for p in adapter.denoiser.parameters() if p.requires_grad]
    else:
        modules = [adapter.denoiser, adapter.text_encoder] if text_encoder else [adapter.denoiser]
        params = [p for m in modules for p in m.parameters()]
        for p in params:
            p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    # The EMA (as pretraining keeps one) is what is evaluated, swapped in; without one, the trained weights.
    averaged = ParamCopy(params) if ema else None

    def evaluate_now() -> dict:
        if averaged is None:
            return evaluate(adapter, n)
        with averaged.swapped():
            return evaluate(adapter, n)

    # Batches the pretraining never drew (other seed and steps), the same losses and clipping as pretraining.
    cfg = PretrainConfig(video=True, batch_size=batch_size, seed=5, templates=list(templates or []))
    label = "".join([f"ground-truth flow matching, lr {lr:g}", f", EMA {ema:g}" if ema else "",
                     ", text encoder too" if text_encoder else "",
                     f", conditioning LoRA r{lora_rank}" if lora_rank else "",
                     f", {batch_size} clips per step" if batch_size != 32 else "",
                     f", noise levels >= {min_sigma:g}" if min_sigma else "",
                     f", templates {'/'.join(templates)}" if templates else ""])
    checkpoints = {steps // 2, steps} if eval_every is None else set(range(eval_every, steps + 1, eval_every))
    rows = [(f"{label}, 0 steps", evaluate_now())]
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup) if warmup else lr
        prompts, x0, noise, sigma = batch_for_step(cfg, 10_000 + step)
        # Levels squeezed into [min_sigma, 1]: where the clip's layout, and so its motion, is still undecided.
        sigma = min_sigma + (1 - min_sigma) * sigma
        flow_matching_step(lambda x, s, p=prompts: adapter._velocity(x, s, adapter.text_features(p), 1.0), x0, noise,
                           sigma, opt, params)
        if averaged is not None:
            averaged.blend(ema)
        if step + 1 in checkpoints:
            rows.append((f"{label}, {step + 1} steps", evaluate_now()))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=("guidance", "perturb", "sft"), nargs="+",
                        default=["guidance", "perturb", "sft"])
    parser.add_argument("--n", type=int, default=16, help="held-out prompts per template")
    parser.add_argument("--model-path", default=None, help="video checkpoint (default: the shipped base)")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 3.0, 5.0])
    parser.add_argument("--sample-steps", type=int, nargs="+", default=[10], help="also sample the base with these")
    parser.add_argument("--stds", type=float, nargs="+", default=[1.6e-4, 5e-4, 1.5e-3])
    parser.add_argument("--sft-lr", type=float, default=5e-5)
    parser.add_argument("--sft-steps", type=int, default=16)
    parser.add_argument("--sft-eval-every", type=int, default=None, help="evaluate every this many steps "
                        "(default: halfway and at the end)")
    parser.add_argument("--sft-ema", type=float, default=0.0, help="evaluate an EMA of the weights (0: off)")
    parser.add_argument("--sft-warmup", type=int, default=0, help="linear learning-rate warm-up steps (0: off)")
    parser.add_argument("--sft-text-encoder", action="store_true", help="train the text encoder too, as pretraining")
    parser.add_argument("--sft-batch", type=int, default=32, help="ground-truth clips per step (an RL step samples 64)")
    parser.add_argument("--sft-lora-rank", type=int, default=0,
                        help="train only a LoRA of this rank on the conditioning pathway (0: the full denoiser)")
    parser.add_argument("--sft-templates", nargs="+", default=None,
                        help="motion templates of the ground-truth clips; repeat one to draw it more often")
    parser.add_argument("--sft-min-sigma", type=float, default=0.0,
                        help="train only on noise levels in [this, 1] (the pretraining draw, rescaled)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--out", default="outputs/bench_video_diagnostics", help="folder of results.md and .json")
    args = parser.parse_args(argv)
    if not 0 <= args.sft_min_sigma < 1 or args.threads < 1:
        parser.error("--sft-min-sigma must be in [0, 1) and --threads >= 1")
    if args.n < 1 or args.sft_steps < 2 or args.sft_batch < 1 or args.sft_lora_rank < 0:
        parser.error("--n and --sft-batch must be >= 1, --sft-steps >= 2 and --sft-lora-rank >= 0")
    if args.sft_lora_rank and args.sft_text_encoder:
        parser.error("--sft-lora-rank trains the denoiser's LoRA only; drop --sft-text-encoder")
    if args.sft_eval_every is not None and not 1 <= args.sft_eval_every <= args.sft_steps:
        parser.error("--sft-eval-every must be in [1, --sft-steps]")
    if not 0 <= args.sft_ema < 1 or args.sft_warmup < 0:
        parser.error("--sft-ema must be in [0, 1) and --sft-warmup >= 0")
    torch.set_num_threads(args.threads)
    rows = []
    if "guidance" in args.only:
        rows += guidance_rows(args.n, args.scales, args.sample_steps, args.model_path)
    if "perturb" in args.only:
        rows += perturb_rows(args.n, args.stds, args.model_path)
    if "sft" in args.only:
        rows += sft_rows(args.n, args.sft_lr, args.sft_steps, eval_every=args.sft_eval_every, ema=args.sft_ema,
                         text_encoder=args.sft_text_encoder, templates=args.sft_templates, warmup=args.sft_warmup,
                         path=args.model_path, batch_size=args.sft_batch, lora_rank=args.sft_lora_rank,
                         min_sigma=args.sft_min_sigma)
    context = paired.context()
    line = paired.equal_work("each control's fixed steps, the same held-out prompts and seeds", context)
    table = "\n".join(["| held-out, CFG 3 unless stated | " + " | ".join(METRICS) + " |",
                       "|---|" + "---|" * len(METRICS),
                       *(f"| {label} | " + " | ".join(f"{m[k]:.3f}" for k in METRICS) + " |" for label, m in rows)])
    print(table)
    print(line)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(f"{table}\n\n{line}\n")
    (out / "results.json").write_text(json.dumps({"rows": [{"label": label, **m} for label, m in rows],
                                                  "settings": vars(args), "context": context}, indent=1) + "\n")


if __name__ == "__main__":
    main()
