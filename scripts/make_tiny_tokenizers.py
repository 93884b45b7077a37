"""Write the small offline tokenizers shipped in visalign/assets/tiny_tokenizers.

The tiny SD3 / FLUX / Wan builders need real tokenizer classes but may not download anything, so we build
them in memory from a byte-level vocabulary (CLIP BPE with no merges) and a letter-level unigram vocabulary
(T5) and save them with `save_pretrained`. The tiny Qwen2-VL tokenizer (for `visalign.rewards.videoalign`) is a
byte-level BPE with Qwen2's pre-tokenizer, whose merges are learnt from VideoAlign's prompt template (so the
~4,000-character prompt is a few hundred tokens), plus Qwen2-VL's special tokens and a chat template that renders
Qwen2-VL's format. Run once; the output is committed.

    python scripts/make_tiny_tokenizers.py
"""

import json
import string
import sys
from pathlib import Path

from transformers import CLIPTokenizer, Qwen2Tokenizer, T5Tokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "visalign" / "assets" / "tiny_tokenizers"


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


# Qwen2-VL-Instruct's special tokens (ids follow the vocabulary here, not the real 151643...151656).
QWEN2_VL_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
# Renders what Qwen2-VL-Instruct's chat template renders for plain user turns of text, images and videos:
# a default system turn, <|vision_start|><|video_pad|><|vision_end|> per video, the assistant generation prompt.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def qwen2_vl_tokenizer(vocab_size: int = 1000) -> Qwen2Tokenizer:
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from visalign.rewards.videoalign import PROMPT_TEMPLATE

    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    text = PROMPT_TEMPLATE + "\nsystem user assistant You are a helpful assistant. a red circle moving right"
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator([text], trainer)
    model = json.loads(backend.to_str())["model"]
    tokenizer = Qwen2Tokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]],
                               model_max_length=32768)
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN2_VL_SPECIAL[1:]})
    tokenizer.chat_template = QWEN2_VL_CHAT_TEMPLATE
    return tokenizer


def main() -> None:
    clip = CLIPTokenizer(vocab=byte_level_vocab(), merges=[], model_max_length=77)
    clip.save_pretrained(OUT / "clip")

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + c, -3.0) for c in string.ascii_lowercase]
    pieces += [(c, -4.0) for c in string.ascii_lowercase + string.digits + string.punctuation]
    t5 = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)
    t5.save_pretrained(OUT / "t5")

    qwen2_vl_tokenizer().save_pretrained(OUT / "qwen2_vl")


if __name__ == "__main__":
    main()
