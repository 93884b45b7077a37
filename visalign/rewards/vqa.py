"""Yes/no answerers for the VQA concept path and the VLM-judge reward: P("yes") for a question about an image.

- `BlipVQA`: transformers' `BlipForQuestionAnswering` (T2I-CompBench's BLIP-VQA), differentiable from pixels:
  tensor preprocessing (BLIP's square bicubic resize, OpenAI CLIP mean/std), the question encoder over the
  image tokens, and the probability of "yes" as the answer decoder's first token.
- `VLMYesNo`: any HF vision-language model with a chat template (`AutoModelForImageTextToText`, e.g. Qwen2.5-VL,
  LLaVA, Idefics): P(answer | image, question) by teacher forcing the answer tokens after the generation prompt,
  summed over the accepted spellings (VQAScore scores "Yes"; Soft-TIFA sums "Yes"/"yes" variants).
  Processors take 8-bit images, so this path is not differentiable.
- `VLMJudgeReward`: a reward whose score is P("yes") for a question built from the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from visalign.rewards.base import Reward
from visalign.rewards.imagereward import TINY_TOKENIZER, blip_tokenizer
from visalign.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, normalize, resize, to_uint8_hwc
from visalign.rewards.weights import hf_model_and_processor

# transformers and tokenizers are imported where a model is built: they take seconds to import.

# linzhiqiu/t2v_metrics (v3.0) `clip_t5_model.py`: the VQAScore question and answer.
VQASCORE_QUESTION = 'Does this figure show "{prompt}"? Please answer yes or no.'
VQASCORE_ANSWER = "Yes"


class BlipVQA:
    """P("yes") of BLIP's VQA model (T2I-CompBench attribute binding uses BLIP-VQA's yes probability).

    The answer decoder starts from BLIP's [DEC] token; the probability is the softmax of its first-step logits
    at the "yes" token, as `generate` computes it for a single question."""

    differentiable = True

    def __init__(self, model, processor=None, *, answer: str = "yes", batch_size: int = 16,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        from transformers import AutoProcessor, BlipForQuestionAnswering

        self.model, processor = hf_model_and_processor(model, processor, BlipForQuestionAnswering, AutoProcessor,
                                                       dtype=dtype, device=device, label="BlipVQA")
        self.tokenizer = processor.tokenizer
        self.image_size = self.model.config.vision_config.image_size
        ids = self.tokenizer(answer, add_special_tokens=False).input_ids
        if len(ids) != 1 or ids[0] == self.tokenizer.unk_token_id:
            raise ValueError(f"BlipVQA: answer {answer!r} is not a single known token of this tokenizer ({ids})")
        self.answer_id = ids[0]
        self.batch_size, self.device, self.dtype = batch_size, torch.device(device), dtype

    @classmethod
    def tiny(cls, seed: int = 0, image_size: int = 32, **kwargs) -> BlipVQA:
        model, processor = tiny_blip_vqa(seed, image_size)
        return cls(model, processor, **kwargs)

    def pixels(self, images: Tensor) -> Tensor:
        """BLIP's VQA transform on tensors: Resize((n, n), bicubic), OpenAI CLIP mean/std (BLIP `transform/
        randaugment`-free test transform; HF `BlipImageProcessor` does the same on 8-bit images)."""
        square = resize(images.to(self.device).float(), (self.image_size, self.image_size), clamp=True)
        return normalize(square, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD).to(self.dtype)

    def p_yes(self, images: Tensor, questions: Sequence[str]) -> Tensor:
        if images.shape[0] != len(questions):
            raise ValueError(f"BlipVQA: {images.shape[0]} images but {len(questions)} questions")
        # Questions are batched only with questions of the same token length: transformers' BLIP answer decoder
        # does not apply the question padding mask in its cross-attention, so padding would change the score.
        ids = self.tokenizer(list(questions)).input_ids
        by_length: dict[int, list[int]] = {}
        for i, tokens in enumerate(ids):
            by_length.setdefault(len(tokens), []).append(i)
        out = [None] * len(questions)
        for indices in by_length.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                probs = self._p_yes(images[chunk], torch.tensor([ids[i] for i in chunk], device=self.device))
                for i, p in zip(chunk, probs, strict=True):
                    out[i] = p
        return torch.stack(out)

    def _p_yes(self, images: Tensor, input_ids: Tensor) -> Tensor:
        model = self.model
        image_embeds = model.vision_model(pixel_values=self.pixels(images)).last_hidden_state
        question = model.text_encoder(input_ids=input_ids, encoder_hidden_states=image_embeds).last_hidden_state
        bos = torch.full((input_ids.shape[0], 1), model.decoder_start_token_id, device=self.device)
        logits = model.text_decoder(input_ids=bos, encoder_hidden_states=question).logits[:, -1]
        return logits.float().softmax(-1)[:, self.answer_id]


def tiny_blip_vqa(seed: int = 0, image_size: int = 32):
    """A random `BlipForQuestionAnswering` and `BlipProcessor` over the shipped tiny BERT vocabulary."""
    from transformers import BlipConfig, BlipForQuestionAnswering, BlipImageProcessor, BlipProcessor

    tokenizer = blip_tokenizer(TINY_TOKENIZER)
    torch.manual_seed(seed)
    config = BlipConfig(
        vision_config={"image_size": image_size, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                       "num_attention_heads": 2, "num_hidden_layers": 2},
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
                     "num_attention_heads": 2, "num_hidden_layers": 2, "encoder_hidden_size": 32,
                     "max_position_embeddings": 64, "bos_token_id": tokenizer.bos_token_id,
                     "pad_token_id": tokenizer.pad_token_id, "sep_token_id": tokenizer.sep_token_id})
    model = BlipForQuestionAnswering(config).eval()
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": image_size, "width": image_size}),
                              tokenizer=tokenizer)
    return model, processor


class VLMYesNo:
    """P(answer) from a chat vision-language model: the question (with the image) goes through the processor's
    chat template with the generation prompt; each accepted answer spelling is appended as tokens and its
    probability is the product of its token probabilities (teacher forcing); spellings are summed.
    `normalize=True` divides by P(yes) + P(no) over the same spellings in lower case ("no"/"No")."""

    differentiable = False

    def __init__(self, model, processor=None, *, answers: Sequence[str] = (VQASCORE_ANSWER,), normalize: bool = False,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if not answers:
            raise ValueError("VLMYesNo: answers must name at least one spelling of yes")
        self.model, self.processor = hf_model_and_processor(model, processor, AutoModelForImageTextToText,
                                                            AutoProcessor, dtype=dtype, device=device, label="VLMYesNo")
        self.answers, self.normalize = tuple(answers), normalize
        self.device, self.dtype = torch.device(device), dtype
        tokenizer = self.processor.tokenizer
        self._answer_ids = {a: tokenizer(a, add_special_tokens=False).input_ids for a in self._spellings()}
        for spelling, ids in self._answer_ids.items():
            if not ids or (tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids):
                raise ValueError(f"VLMYesNo: answer {spelling!r} tokenises to unknown tokens {ids}")

    def _spellings(self) -> tuple[str, ...]:
        negatives = tuple(a.replace("Yes", "No").replace("yes", "no") for a in self.answers)
        return self.answers + (negatives if self.normalize else ())

    @torch.no_grad()
    def _answer_prob(self, inputs: dict, answer: str) -> Tensor:
        ids = torch.tensor(self._answer_ids[answer], device=self.device)
        prompt_ids = inputs["input_ids"]
        batch = {**inputs, "input_ids": torch.cat([prompt_ids, ids.expand(prompt_ids.shape[0], -1)], 1)}
        if "attention_mask" in inputs:
            batch["attention_mask"] = torch.cat([inputs["attention_mask"],
                                                 torch.ones_like(batch["input_ids"][:, :len(ids)])], 1)
        logits = self.model(**batch).logits[:, prompt_ids.shape[1] - 1:-1].float()
        return logits.log_softmax(-1).gather(-1, ids.expand(logits.shape[0], -1)[..., None]).sum((1, 2)).exp()

    @torch.no_grad()
    def p_yes(self, images: Tensor, questions: Sequence[str]) -> Tensor:
        if images.shape[0] != len(questions):
            raise ValueError(f"VLMYesNo: {images.shape[0]} images but {len(questions)} questions")
        out = []
        for array, question in zip(to_uint8_hwc(images), questions, strict=True):  # one by one: no padding side effects
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            inputs = dict(self.processor(images=[array], text=[text], return_tensors="pt").to(self.device))
            probs = {a: self._answer_prob(inputs, a) for a in self._spellings()}
            yes = sum(probs[a] for a in self.answers)
            if self.normalize:
                no = sum(probs[a] for a in self._spellings()[len(self.answers):])
                yes = yes / (yes + no).clamp(min=1e-12)
            out.append(yes)
        return torch.cat(out).to(images.device)


def tiny_llava(seed: int = 0, image_size: int = 32):
    """A random `LlavaForConditionalGeneration` (tiny CLIP vision tower + tiny Llama) and a processor with a
    word-level tokenizer and a minimal chat template, for tests of the VLM path without downloads."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    words = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "USER:", "ASSISTANT:", "Yes", "yes", "No", "no", "?", ".",
             '"', "Does", "this", "figure", "show", "Please", "answer", "or", "is", "are", "there", "a", "the", "red",
             "green", "blue", "yellow", "circle", "square", "triangle", "dog", "cat", "left", "of", "right", "above",
             "below", "two", "three", "on"]
    vocab = {w: i for i, w in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                     pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<s>", eos_token="</s>",
                                        extra_special_tokens={"image_token": "<image>"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    chat = ("{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
            "{% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}"
            "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    patch = 8
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": image_size},
                                           crop_size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer, patch_size=patch, vision_feature_select_strategy="default", chat_template=chat,
        num_additional_image_tokens=1)
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=image_size, patch_size=patch, hidden_size=32, intermediate_size=37,
                                       num_attention_heads=4, num_hidden_layers=2),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                                max_position_embeddings=128, pad_token_id=0, bos_token_id=2, eos_token_id=3),
        image_token_index=vocab["<image>"], vision_feature_select_strategy="default", vision_feature_layer=-1)
    return LlavaForConditionalGeneration(config).eval(), processor


class VLMJudgeReward(Reward):
    """Score = P("yes") of a vision-language model for a question about the image, built from the prompt
    (default: VQAScore's 'Does this figure show "{prompt}"? Please answer yes or no.'). Any answerer with
    `p_yes(images, questions)` works: `VLMYesNo` over an HF VLM (default when `model` is a path / hub id),
    or `BlipVQA`.

        >>> r = VLMJudgeReward("Qwen/Qwen2.5-VL-3B-Instruct")
        >>> r(prompts=["a red dog"], images=x)   # Tensor[B] in [0, 1]
    """

    name = "vlm-judge"
    value_range = (0.0, 1.0)

    def __init__(self, model=None, processor=None, *, answerer=None, question: str = VQASCORE_QUESTION,
                 answers: Sequence[str] = (VQASCORE_ANSWER,), normalize: bool = False, batch_size: int = 8,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__(batch_size=batch_size, device=device, dtype=dtype)
        if (model is None) == (answerer is None):
            raise ValueError("vlm-judge: pass exactly one of model= (an HF VLM path / hub id) or answerer=")
        if "{prompt}" not in question:
            raise ValueError(f"vlm-judge: question must contain '{{prompt}}', got {question!r}")
        self.answerer = answerer if answerer is not None else VLMYesNo(
            model, processor, answers=answers, normalize=normalize, device=device, dtype=dtype)
        self.question = question
        self.differentiable = bool(getattr(self.answerer, "differentiable", False))

    def score(self, *, prompts, images, videos, metadata):
        return self.answerer.p_yes(images, [self.question.format(prompt=p) for p in prompts]).float()
