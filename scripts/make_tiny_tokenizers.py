"""Write the small offline tokenizers shipped in visalign/assets/tiny_tokenizers.

The tiny SD3 / FLUX / Wan builders need real tokenizer classes but may not download anything, so we build
them in memory from a byte-level vocabulary (CLIP BPE with no merges) and a letter-level unigram vocabulary
(T5) and save them with `save_pretrained`. Run once; the output is committed.

    python scripts/make_tiny_tokenizers.py
"""

import string
from pathlib import Path

from transformers import CLIPTokenizer, T5Tokenizer

OUT = Path(__file__).resolve().parents[1] / "visalign" / "assets" / "tiny_tokenizers"


def byte_level_vocab() -> dict[str, int]:
    # GPT-2 / CLIP byte-to-unicode table: printable bytes map to themselves, the rest to 256+i.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    vocab = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def main() -> None:
    clip = CLIPTokenizer(vocab=byte_level_vocab(), merges=[], model_max_length=77)
    clip.save_pretrained(OUT / "clip")

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + c, -3.0) for c in string.ascii_lowercase]
    pieces += [(c, -4.0) for c in string.ascii_lowercase + string.digits + string.punctuation]
    t5 = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)
    t5.save_pretrained(OUT / "t5")


if __name__ == "__main__":
    main()
