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
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def _timeit(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    return (time.perf_counter() - start) / repeats, out


def hf_clip(size: str):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    if size == "tiny":
        from rewards.clip_family import tiny_hf_clip

        return tiny_hf_clip(0, image_size=32)
    # CLIPConfig() defaults are ViT-B/32 at 224; the vocabulary fits the shipped tiny tokenizer.
    return CLIPModel(CLIPConfig(text_config={"vocab_size": 514, "bos_token_id": 512, "eos_token_id": 513,
                                             "pad_token_id": 513})).eval()


def open_clip_model(size: str):
    import open_clip

    from rewards.clip_family import TINY_OPEN_CLIP_CFG

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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import CLIPImageProcessor

    from rewards.clip_family import (
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

    print(f"{args.size} models, {args.batch} images of {h}x{w}, {args.threads} threads, "
          f"mean of {args.repeats} runs after a warm-up\n")
    print("| reward | visalign img/s | reference img/s | speed ratio (visalign / reference) | max abs score diff |")
    print("|---|---|---|---|---|")
    for name, ours_fn, ref_fn in rows:
        t_ours, s_ours = _timeit(lambda f=ours_fn: torch.no_grad()(f)(), args.repeats)
        t_ref, s_ref = _timeit(ref_fn, args.repeats)
        diff = float((s_ours.float() - s_ref.float()).abs().max())
        print(f"| {name} | {args.batch / t_ours:.1f} | {args.batch / t_ref:.1f} | {t_ref / t_ours:.2f}x | "
              f"{diff:.2e} |")


if __name__ == "__main__":
    main()
