"""Compositional concept rewards: GenEval's rules on hand-built detections, the detector path on a tiny OWL-ViT,
the VQA path on a tiny BLIP and a tiny LLaVA, checked against independent computations."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from visalign.rewards import RewardError
from visalign.rewards.concepts import (
    COLORS,
    ColourClassifier,
    Detection,
    DetectorConceptReward,
    HFZeroShotDetector,
    VQAConceptReward,
    combine_probabilities,
    concept_questions,
    judge,
    parse_spec,
    relative_position,
    select_detections,
    tiny_owlvit,
)
from visalign.rewards.vqa import BlipVQA, VLMJudgeReward, VLMYesNo, tiny_blip_vqa, tiny_llava


def det(label, box, score=0.95):
    return Detection(label, tuple(float(v) for v in box), score)


# ---- spec ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, message", [
    ({"include": []}, "non-empty 'include'"),
    ({"include": [{"class": "dog", "count": 0}]}, "count must be an integer >= 1"),
    ({"include": [{"class": "dog", "color": "teal"}]}, "'teal' is not one of"),
    ({"include": [{"class": "dog", "position": ["left of", 0]}]}, "earlier clause index"),
    ({"include": [{"class": "dog"}, {"class": "cat", "position": ["beside", 0]}]}, "relation in"),
])
def test_parse_spec_rejects_malformed_specs_naming_the_sample(bad, message):
    with pytest.raises(RewardError, match=message) as err:
        parse_spec(bad, index=3)
    assert "sample 3" in str(err.value)


def test_concept_questions_cover_object_attribute_relation():
    spec = parse_spec({"include": [{"class": "dog", "count": 1},
                                   {"class": "cat", "count": 2, "color": "red", "position": ["left of", 0]}]})
    assert concept_questions(spec) == [
        ("object", "0:dog", "is there a dog?"),
        ("object", "1:cat", "are there two cats?"),
        ("attribute", "1:cat:red", "are the cats red?"),
        ("relation", "1:cat:left of:0", "are the cats left of the dog?"),
    ]


# ---- GenEval rules --------------------------------------------------------------------------------------------

def test_relative_position_matches_hand_computation():
    # A left of B: offset (-20, 0), sizes 10 + 10 -> revised |offset| 20 - 0.1*20 = 18, dx = -18/20 = -0.9.
    assert relative_position((0, 0, 10, 10), (20, 0, 30, 10)) == {"left of"}
    assert relative_position((20, 0, 30, 10), (0, 0, 10, 10)) == {"right of"}
    # Diagonal: offset (-10, -10), sizes 2 each -> revised 10 - 0.4 = 9.6 per axis, / 14.142 = 0.679 > 0.5.
    assert relative_position((-1, -1, 1, 1), (9, 9, 11, 11)) == {"left of", "above"}
    # Mostly vertical: offset (-2, 20), sizes 10 -> revised (0, 18)/20.1 -> only "below".
    assert relative_position((0, 20, 10, 30), (2, 0, 12, 10)) == {"below"}
    # Overlapping centres within the size margin: no relation.
    assert relative_position((0, 0, 10, 10), (1, 0, 11, 10)) == set()


def test_select_detections_threshold_order_cap_and_nms():
    dets = [det("dog", (0, 0, 10, 10), 0.5), det("dog", (1, 1, 11, 11), 0.9), det("dog", (50, 50, 60, 60), 0.7),
            det("dog", (0, 0, 5, 5), 0.2), det("cat", (0, 0, 3, 3), 0.4)]
    out = select_detections(dets, threshold=0.3)
    assert [d.score for d in out["dog"]] == [0.9, 0.7, 0.5]
    assert [d.score for d in out["cat"]] == [0.4]
    assert [d.score for d in select_detections(dets, 0.3, max_objects=2)["dog"]] == [0.9, 0.7]
    # IoU of (1,1,11,11) and (0,0,10,10) with inclusive pixels: 100 / (121 + 121 - 100) = 0.704.
    assert [d.score for d in select_detections(dets, 0.3, nms_iou=0.7)["dog"]] == [0.9, 0.7]
    assert [d.score for d in select_detections(dets, 0.3, nms_iou=0.75)["dog"]] == [0.9, 0.7, 0.5]


def test_judge_counting_exact_count_and_partial_credit():
    spec = parse_spec({"tag": "counting", "include": [{"class": "cup", "count": 2}],
                       "exclude": [{"class": "cup", "count": 3}]})
    two = {"cup": [det("cup", (0, 0, 5, 5)), det("cup", (10, 0, 15, 5))]}
    three = {"cup": two["cup"] + [det("cup", (20, 0, 25, 5))]}
    one = {"cup": two["cup"][:1]}
    assert judge(spec, two).passed and judge(spec, two).partial == 1.0
    v = judge(spec, three)  # the exclude clause fails; credit 1 - |3 - 2|/2
    assert not v.passed and v.partial == pytest.approx(0.5) and "cup<3" in v.reasons[0]
    v = judge(spec, one)
    assert not v.passed and v.partial == pytest.approx(0.5)
    assert judge(spec, {}).partial == 0.0


def test_judge_colour_and_position_follow_geneval():
    spec = parse_spec({"include": [{"class": "dog", "count": 1, "color": "red"},
                                   {"class": "cat", "count": 1, "color": "blue", "position": ["right of", 0]}]})
    dog, cat = det("dog", (0, 0, 10, 10)), det("cat", (30, 0, 40, 10))
    colours = {"dog": ["red"], "cat": ["blue"]}
    ok = judge(spec, {"dog": [dog], "cat": [cat]}, lambda cls, ds: colours[cls][:len(ds)])
    assert ok.passed and ok.partial == 1.0
    assert (ok.group("object"), ok.group("attribute"), ok.group("relation")) == (1.0, 1.0, 1.0)
    # Wrong colour on the dog: GenEval fails the dog clause, so the cat has no target; credits keep the
    # relation (both objects were found and stand right of each other) and lose the dog's colour.
    colours["dog"] = ["green"]
    v = judge(spec, {"dog": [dog], "cat": [cat]}, lambda cls, ds: colours[cls][:len(ds)])
    assert not v.passed and "no target" in " ".join(v.reasons)
    assert v.group("attribute") == 0.5 and v.group("relation") == 1.0 and v.partial == pytest.approx(4 / 5)
    # Cat on the wrong side.
    colours["dog"] = ["red"]
    v = judge(spec, {"dog": [dog], "cat": [det("cat", (-40, 0, -30, 10))]}, lambda cls, ds: colours[cls][:len(ds)])
    assert not v.passed and v.group("relation") == 0.0 and math.isnan(judge(parse_spec(
        {"include": [{"class": "dog"}]}), {"dog": [dog]}).group("relation"))


class FakeDetector:
    """Returns fixed detections per image and records the classes it was asked for."""

    def __init__(self, detections):
        self.detections, self.asked = detections, []

    def __call__(self, images, classes):
        self.asked.append(classes)
        return self.detections[:len(images)]


def test_detector_reward_uses_counting_threshold_and_modes():
    cups = [det("cup", (0, 0, 4, 4), 0.95), det("cup", (10, 0, 14, 4), 0.95), det("cup", (20, 0, 24, 4), 0.5)]
    counting = {"tag": "counting", "include": [{"class": "cup", "count": 2}], "exclude": [{"class": "cup", "count": 3}]}
    single = {"tag": "single_object", "include": [{"class": "cup", "count": 1}]}
    fake = FakeDetector([cups, cups])
    r = DetectorConceptReward(fake, mode="strict")
    out = r(images=torch.rand(2, 3, 32, 32), metadata=[counting, single])
    # Counting ignores the 0.5 detection (threshold 0.9): exactly two cups -> pass; single object passes.
    assert out["score"].tolist() == [1.0, 1.0] and out["passed"].tolist() == [1.0, 1.0]
    assert fake.asked[0] == [["cup", "cup"], ["cup"]]
    r = DetectorConceptReward(fake, mode="partial", counting_threshold=0.4)
    out = r(images=torch.rand(2, 3, 32, 32), metadata=[counting, single])
    assert out["score"].tolist() == [0.5, 1.0] and out["passed"].tolist() == [0.0, 1.0]
    assert math.isnan(out["attribute"][0])
    with pytest.raises(RewardError, match="needs metadata"):
        r(images=torch.rand(1, 3, 32, 32))
    with pytest.raises(RewardError, match="not differentiable"):
        r(images=torch.rand(1, 3, 32, 32, requires_grad=True), metadata=[single])


# ---- real classes at tiny size -----------------------------------------------------------------------------------

def _uint8_images(n, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, size, size, generator=g) * 255).round() / 255


def test_owlvit_detector_matches_processor_and_model_called_directly():
    model, processor = tiny_owlvit(seed=1)
    detector = HFZeroShotDetector(model, processor, query_template="a photo of a {}")
    images = _uint8_images(2)
    got = detector(images, [["dog", "cat"], ["cup"]])
    for image, names, dets in zip(images, [["dog", "cat"], ["cup"]], got, strict=True):
        pil = Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
        inputs = processor(text=[[f"a photo of a {n}" for n in names]], images=pil, return_tensors="pt")
        with torch.no_grad():
            outputs = model(**inputs)
        ref = processor.post_process_grounded_object_detection(outputs, threshold=0.0, target_sizes=[(32, 32)])[0]
        assert len(dets) == len(ref["scores"]) > 0
        assert [d.label for d in dets] == [names[int(i)] for i in ref["labels"]]
        torch.testing.assert_close(torch.tensor([d.box for d in dets]), ref["boxes"], atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.tensor([d.score for d in dets]), ref["scores"], atol=1e-5, rtol=0)


def test_colour_classifier_matches_zero_shot_clip_computed_directly():
    from visalign.rewards.clip_family import tiny_hf_clip, tiny_hf_tokenizer

    model, tokenizer = tiny_hf_clip(3), tiny_hf_tokenizer()
    clf = ColourClassifier(model, tokenizer)
    # Class weights: mean of normalised template embeddings, re-normalised (clip_benchmark).
    with torch.no_grad():
        texts = [f"a photo of a {c}-colored dog" for c in COLORS]
        emb = torch.nn.functional.normalize(model.get_text_features(**tokenizer(texts, padding=True,
                                                                                  return_tensors="pt")).pooler_output,
                                        dim=-1)
    weights = clf.class_weights("dog")
    assert weights.shape == (10, 16)
    torch.testing.assert_close(weights.norm(dim=-1), torch.ones(10))
    assert not torch.allclose(weights, emb)  # three templates, not one
    image = _uint8_images(1, size=32, seed=4)[0]
    boxes = [det("dog", (0, 0, 32, 32)), det("dog", (3.6, 4.2, 20.4, 30.0))]
    got = clf(image, "dog", boxes)
    from visalign.rewards.preprocess import clip_preprocess
    with torch.no_grad():
        for d, colour in zip(boxes, got, strict=True):
            x0, y0, x1, y1 = (round(v) for v in d.box)
            crop = image[:, y0:y1, x0:x1][None]
            feats = torch.nn.functional.normalize(model.get_image_features(pixel_values=clip_preprocess(crop, 32))
                                                  .pooler_output, dim=-1)
            assert COLORS[int((feats @ weights.T).argmax())] == colour


def test_tiny_detector_reward_end_to_end_scores_in_range():
    r = DetectorConceptReward.tiny(seed=0, threshold=0.0, counting_threshold=0.0)
    spec = {"tag": "color_attr", "include": [{"class": "dog", "count": 1, "color": "red"},
                                             {"class": "cat", "count": 1, "position": ["left of", 0]}]}
    out = r(images=_uint8_images(2), metadata=[spec, spec])
    assert set(out) == {"object", "attribute", "relation", "passed", "score"}
    assert ((out["score"] >= 0) & (out["score"] <= 1)).all()
    assert out["object"].tolist() == [1.0, 1.0]  # threshold 0: every query gets boxes


def test_blip_vqa_p_yes_matches_generate_first_step():
    model, processor = tiny_blip_vqa(seed=2)
    vqa = BlipVQA(model, processor)
    images = _uint8_images(2, seed=5)
    questions = ["is there a red dog?", "is the cat left of the dog?"]
    got = vqa.p_yes(images, questions)
    yes = processor.tokenizer("yes", add_special_tokens=False).input_ids[0]
    for i, q in enumerate(questions):  # one at a time: no padding, so generate's all-ones mask is the same
        pil = Image.fromarray((images[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
        inputs = processor(images=pil, text=q, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=1, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True, output_logits=True)
        ref = out.logits[0].float().softmax(-1)[0, yes]
        torch.testing.assert_close(got[i], ref, atol=1e-5, rtol=1e-4)
    # Batching does not change a question's score (padding is masked).
    torch.testing.assert_close(vqa.p_yes(images[:1], questions[:1]), got[:1], atol=1e-6, rtol=0)


def test_vqa_reward_is_differentiable_and_combines_as_defined():
    r = VQAConceptReward.tiny(seed=0, combine="product")
    spec = {"include": [{"class": "dog", "count": 1, "color": "red"}, {"class": "cat", "position": ["left of", 0]}]}
    x = _uint8_images(1).requires_grad_(True)
    out = r(images=x, metadata=[spec])
    out["score"].sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # The score is the product of the four per-question probabilities; the groups are their means.
    questions = [q for _, _, q in concept_questions(parse_spec(spec))]
    probs = r.answerer.p_yes(x.detach().expand(4, -1, -1, -1), questions).detach()
    torch.testing.assert_close(out["score"].detach(), probs.prod()[None], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out["object"].detach(), probs[[0, 2]].mean()[None], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out["attribute"].detach(), probs[1:2], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out["relation"].detach(), probs[3:4], atol=1e-6, rtol=1e-5)


def test_combine_probabilities_by_hand():
    p = torch.tensor([0.5, 0.8, 0.1])
    assert combine_probabilities(p, "product").item() == pytest.approx(0.04)
    assert combine_probabilities(p, "geometric").item() == pytest.approx(0.04 ** (1 / 3))
    assert combine_probabilities(p, "mean").item() == pytest.approx(1.4 / 3)
    assert combine_probabilities(torch.tensor([0.0, 1.0]), "geometric").item() == pytest.approx(1e-6)
    with pytest.raises(ValueError, match="combine must be"):
        VQAConceptReward(object(), combine="max")


def test_vlm_yes_no_matches_generate_and_teacher_forcing():
    model, processor = tiny_llava(seed=0)
    judge_ = VLMYesNo(model, processor, answers=("Yes",))
    images = _uint8_images(2, seed=7)
    got = judge_.p_yes(images, ["is there a red circle?", "is the dog left of the cat?"])
    yes = processor.tokenizer("Yes", add_special_tokens=False).input_ids[0]
    for i, q in enumerate(["is there a red circle?", "is the dog left of the cat?"]):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        pil = Image.fromarray((images[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
        inputs = processor(images=[pil], text=[text], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=1, do_sample=False, return_dict_in_generate=True,
                                 output_logits=True)
        torch.testing.assert_close(got[i], out.logits[0][0].float().softmax(-1)[yes], atol=1e-5, rtol=1e-4)
    # Two spellings sum; normalising against "No" stays in [0, 1] and equals yes / (yes + no).
    both = VLMYesNo(model, processor, answers=("Yes", "yes")).p_yes(images, ["is there a dog?"] * 2)
    assert (both > VLMYesNo(model, processor, answers=("Yes",)).p_yes(images, ["is there a dog?"] * 2)).all()
    norm = VLMYesNo(model, processor, answers=("Yes",), normalize=True).p_yes(images[:1], ["is there a dog?"])
    p_yes = VLMYesNo(model, processor, answers=("Yes",)).p_yes(images[:1], ["is there a dog?"])
    p_no = VLMYesNo(model, processor, answers=("No",)).p_yes(images[:1], ["is there a dog?"])
    torch.testing.assert_close(norm, p_yes / (p_yes + p_no), atol=1e-6, rtol=1e-5)
    # A two-token answer is the product of its teacher-forced token probabilities.
    two = VLMYesNo(model, processor, answers=("yes .",)).p_yes(images[:1], ["is there a dog?"])
    assert 0 < float(two) < float(VLMYesNo(model, processor, answers=("yes",)).p_yes(images[:1], ["is there a dog?"]))


def test_vlm_judge_reward_asks_about_the_prompt_and_refuses_gradients():
    class Recorder:
        differentiable = False

        def __init__(self):
            self.questions = []

        def p_yes(self, images, questions):
            self.questions += questions
            return torch.full((len(questions),), 0.25)

    rec = Recorder()
    r = VLMJudgeReward(answerer=rec)
    assert r(prompts=["a red dog"], images=torch.rand(1, 3, 8, 8)).tolist() == [0.25]
    assert rec.questions == ['Does this figure show "a red dog"? Please answer yes or no.']
    with pytest.raises(RewardError, match="not differentiable"):
        r(prompts=["a"], images=torch.rand(1, 3, 8, 8, requires_grad=True))
    with pytest.raises(ValueError, match="exactly one"):
        VLMJudgeReward()
    model, processor = tiny_llava(seed=0)
    real = VLMJudgeReward(model, processor)
    assert 0 < float(real(prompts=["a red circle"], images=_uint8_images(1))[0]) < 1
