"""Scoring throughput of visalign's rewards against each reference pipeline, with identical weights, in one run.

    .venv/bin/python bench/reward_throughput.py                 # ViT-B/32-sized random weights, 512x512 images
    .venv/bin/python bench/reward_throughput.py --size tiny     # seconds: tiny models (measures overheads)

Both sides get the same images: visalign as a float tensor batch (what a sampler produces), the reference as
8-bit PIL images (what its pipeline takes: HF `CLIPProcessor` / open_clip's `preprocess_val` on PIL, then the
model). Weights are random (nothing is downloaded) but shared, so every pair computes the same function; the
bench checks the scores agree and prints images/s and the ratio. Real checkpoints change the model cost, not
the preprocessing cost this comparison isolates.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def hf_clip(size: str):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    if size == "tiny":
        from visalign.rewards.clip_family import tiny_hf_clip

        return tiny_hf_clip(0, image_size=32)
    # CLIPConfig() defaults are ViT-B/32 at 224; the vocabulary fits the shipped tiny tokenizer.
    return CLIPModel(CLIPConfig(text_config={"vocab_size": 514, "bos_token_id": 512, "eos_token_id": 513,
                                             "pad_token_id": 513})).eval()


def open_clip_model(size: str):
    import open_clip

    from visalign.rewards.clip_family import TINY_OPEN_CLIP_CFG

    torch.manual_seed(0)
    if size == "tiny":
        return open_clip.create_model("ViT-H-14", **TINY_OPEN_CLIP_CFG).eval()
    return open_clip.create_model("ViT-B-32", text_cfg={"context_length": 77, "vocab_size": 514, "width": 512,
                                                        "heads": 8, "layers": 12}).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "base"], default="base")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--videos", type=int, default=4, help="videos for the video rows")
    parser.add_argument("--frames", type=int, default=16, help="frames per video")
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import CLIPImageProcessor

    from visalign.rewards.clip_family import (
        AestheticHead,
        CLIPScore,
        HPSv2,
        LaionAesthetic,
        PickScore,
        tiny_hf_tokenizer,
        tiny_open_clip_tokenizer,
    )

    g = torch.Generator().manual_seed(0)
    # Non-square, as generated images often are, so the two geometries (crop vs pad) both do work.
    h, w = args.resolution, args.resolution * 3 // 4
    images = (torch.rand(args.batch, 3, h, w, generator=g) * 255).round() / 255
    pils = [Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for x in images]
    prompts = ["a red circle left of a blue square"] * args.batch
    tokenizer = tiny_hf_tokenizer()
    rows = []

    # PickScore / CLIPScore: HF CLIP, processor = short side + centre crop.
    clip = hf_clip(args.size)
    crop = clip.config.vision_config.image_size
    processor = CLIPImageProcessor(size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop})

    def ref_pickscore():
        with torch.no_grad():
            pixels = processor(images=pils, return_tensors="pt").pixel_values
            img = F.normalize(clip.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
            tok = tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
            txt = F.normalize(clip.get_text_features(**tok).pooler_output, dim=-1)
            return clip.logit_scale.exp() * (img * txt).sum(-1)

    ours = PickScore(model=clip, tokenizer=tokenizer, batch_size=args.batch)
    rows.append(("pickscore", lambda: ours(prompts=prompts, images=images), ref_pickscore))
    clipscore = CLIPScore(model=clip, tokenizer=tokenizer, batch_size=args.batch)

    def ref_clipscore():
        return ref_pickscore() / clip.logit_scale.exp() * 100

    rows.append(("clipscore", lambda: clipscore(prompts=prompts, images=images).clamp(min=0), ref_clipscore))

    # LAION aesthetic: CLIP vision tower + MLP head. Reference: processor + get_image_features + head.
    torch.manual_seed(1)
    head = AestheticHead(clip.config.projection_dim, (64, 32, 16, 8)).eval()
    aesthetic = LaionAesthetic(head=head, clip=clip, batch_size=args.batch)

    def ref_aesthetic():
        with torch.no_grad():
            pixels = processor(images=pils, return_tensors="pt").pixel_values
            emb = F.normalize(clip.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
            return head(emb).squeeze(-1)

    rows.append(("aesthetic", lambda: aesthetic(images=images, prompts=prompts), ref_aesthetic))

    # HPSv2: open_clip, preprocess_val = longest side + zero pad.
    import open_clip

    oc = open_clip_model(args.size)
    oc_tok = tiny_open_clip_tokenizer()
    hps = HPSv2(model=oc, tokenizer=oc_tok, batch_size=args.batch)
    preprocess_val = open_clip.image_transform(oc.visual.image_size[0], is_train=False, resize_mode="longest",
                                               fill_color=0)

    def ref_hps():
        with torch.no_grad():
            pixels = torch.stack([preprocess_val(p) for p in pils])
            img = F.normalize(oc.encode_image(pixels), dim=-1)
            txt = F.normalize(oc.encode_text(oc_tok(prompts)), dim=-1)
            return (img * txt).sum(-1)

    rows.append(("hpsv2", lambda: hps(prompts=prompts, images=images), ref_hps))

    rows.append(imagereward_row(args.size, images, pils, prompts, args.batch))
    videos = video_rows(args.size, args.videos, args.frames, args.resolution // 2)

    print(f"{args.size} models, {args.batch} images of {h}x{w} ({args.videos} videos of {args.frames} frames at "
          f"{args.resolution // 2}x{args.resolution // 2} for the video rows), {args.threads} threads, "
          f"{args.repeats} interleaved rounds after a warm-up (bench/paired.py)\n")
    print("| reward | visalign img/s | reference img/s | speed ratio (visalign / reference; spread) | max abs score "
          "diff |")
    print("|---|---|---|---|---|")
    for name, ours_fn, ref_fn in rows:
        print(_row(name, args.batch, ours_fn, ref_fn, args.repeats))
    for name, ours_fn, ref_fn in videos:
        print(_row(f"{name} (frames/s)", args.videos * args.frames, ours_fn, ref_fn, args.repeats))
    if args.out:
        import json
        from pathlib import Path

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"rows": RESULTS, "settings": vars(args)}, indent=1) + "\n")


RESULTS: list[dict] = []  # one entry per row, written as JSON by --out


def _row(name: str, count: int, ours_fn, ref_fn, repeats: int) -> str:
    """One table row: items/s of both sides (median seconds), the speed ratio (the median of the per-round
    reference / visalign time ratios, both run interleaved through `bench/paired.py`, with their spread), and
    the largest score difference."""
    from paired import compare

    ours = lambda: torch.no_grad()(ours_fn)()  # noqa: E731
    diff = float((ours().float() - ref_fn().float()).abs().max())
    report = compare({"visalign": ours, "reference": ref_fn}, rounds=repeats, warmup=0)  # both ran once above
    ref = report.arms[1]
    lo, hi = ref.spread
    RESULTS.append({"reward": name, "speed_ratio": ref.median_ratio, "spread": [lo, hi], "max_abs_diff": diff,
                    "visalign_per_s": count / report.arms[0].median_seconds, "reference_per_s": count /
                    ref.median_seconds, "context": report.context})
    return (f"| {name} | {count / report.arms[0].median_seconds:.1f} | {count / ref.median_seconds:.1f} | "
            f"{ref.median_ratio:.2f}x ({lo:.2f} – {hi:.2f}) | {diff:.2e} |")


def imagereward_row(size: str, images, pils, prompts, batch: int):
    """ImageReward. The `image-reward` package cannot be built offline (its constructor downloads BERT's tokenizer
    and BLIP's med_config), so the reference is its `ImageReward.score` path written out on the same modules: for
    each image separately, PIL -> Resize(224, BICUBIC) -> CenterCrop -> ToTensor -> Normalize, then the BLIP
    forward with batch 1 (`inference_rank` loops over images), z-scored with the released mean / std."""
    import torchvision.transforms as T

    from visalign.rewards.imagereward import (
        REWARD_MEAN,
        REWARD_STD,
        TINY_TOKENIZER,
        ImageReward,
        ImageRewardConfig,
        ImageRewardModel,
        blip_tokenizer,
        released_state_dict,
    )

    vocab = len(blip_tokenizer(TINY_TOKENIZER))
    if size == "tiny":
        config = ImageRewardConfig.tiny(vocab_size=vocab)
    else:  # ViT-B/16 at 224 + BERT-base: the released text side, a smaller vision tower than its ViT-L
        config = ImageRewardConfig(vision_width=768, vision_depth=12, vision_heads=12, vocab_size=vocab)
    torch.manual_seed(2)
    reward = ImageReward(checkpoint=released_state_dict(ImageRewardModel(config)), tokenizer=TINY_TOKENIZER,
                         config=config, batch_size=batch)
    n = config.image_size
    transform = T.Compose([T.Resize(n, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(n), T.ToTensor(),
                           T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])

    def reference():
        out = []
        with torch.no_grad():
            for prompt, pil in zip(prompts, pils, strict=True):
                ids, mask = reward.tokenize([prompt])
                out.append(reward.model(transform(pil)[None], ids, mask))
        return (torch.cat(out).float() - REWARD_MEAN) / REWARD_STD

    return "imagereward", lambda: reward(prompts=prompts, images=images), reference


def video_rows(size: str, n_videos: int, n_frames: int, side: int):
    """VBench dimensions against VBench's own loops on 8-bit frames: temporal flicker (numpy / cv2 absdiff per
    consecutive pair, `vbench/temporal_flickering.py`), subject consistency (DINO, one frame at a time,
    `vbench/subject_consistency.py`), background consistency (CLIP, one video at a time,
    `vbench/background_consistency.py`); same backbone modules on both sides (random weights)."""
    import cv2
    import open_clip

    from visalign.rewards.video import (
        BackgroundConsistency,
        ClipFeatures,
        DinoFeatures,
        SubjectConsistency,
        TemporalFlicker,
    )

    g = torch.Generator().manual_seed(3)
    videos = (torch.rand(n_videos, n_frames, 3, side, side, generator=g) * 255).round() / 255
    frames8 = (videos * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2).numpy()  # [V, F, H, W, 3]
    rows = []
    flicker = TemporalFlicker(batch_size=n_videos)

    def ref_flicker():
        scores = []
        for video in frames8:
            diffs = [np.mean(cv2.absdiff(video[i], video[i + 1])) for i in range(len(video) - 1)]
            scores.append((255.0 - np.mean(diffs)) / 255.0)
        return torch.tensor(scores)

    rows.append(("video-flicker", lambda: flicker(videos=videos), ref_flicker))

    torch.manual_seed(4)
    dino = DinoFeatures.tiny() if size == "tiny" else DinoFeatures()
    subject = SubjectConsistency(backbone=dino, batch_size=n_videos)

    def consistency_loop(features_of_frame):
        scores = []
        with torch.no_grad():
            for video in videos:
                feats = [F.normalize(features_of_frame(video, i), dim=-1) for i in range(len(video))]
                sims = [(max(0.0, float((feats[i - 1] * feats[i]).sum()))
                         + max(0.0, float((feats[0] * feats[i]).sum()))) / 2 for i in range(1, len(feats))]
                scores.append(sum(sims) / len(sims))
        return torch.tensor(scores)

    rows.append(("video-subject-consistency (DINO)", lambda: subject(videos=videos),
                 lambda: consistency_loop(lambda video, i: dino(video[i:i + 1])[0])))

    torch.manual_seed(5)
    if size == "tiny":
        from visalign.rewards.clip_family import TINY_OPEN_CLIP_CFG

        oc = open_clip.create_model("ViT-H-14", **TINY_OPEN_CLIP_CFG).eval()
    else:
        oc = open_clip.create_model("ViT-B-32").eval()
    clip = ClipFeatures(oc, image_size=oc.visual.image_size[0])
    background = BackgroundConsistency(backbone=clip, batch_size=n_videos)
    per_video = {}

    def clip_frame(video, i):  # VBench encodes a whole video at once, then loops over its frames
        if i == 0:
            per_video["f"] = clip(video)
        return per_video["f"][i]

    rows.append(("video-background-consistency (CLIP)", lambda: background(videos=videos),
                 lambda: consistency_loop(clip_frame)))
    return rows


if __name__ == "__main__":
    main()
