"""The shipped prompt sets: the committed files are what the generator writes, the splits share no prompt (GenEval:
no composition; OCR: no word), every spec is valid GenEval metadata that agrees with its prompt, the sets load by
name with clear errors, and the concept rewards read their specs."""

import re
from collections import Counter

import pytest
import torch

from visalign.eval.prompt_sets import OBJECTS, write_prompt_sets
from visalign.eval.reward_suite import RewardEvalConfig, with_preset
from visalign.prompts import SHIPPED_DIR, check_prompt_spec, prompt_source
from visalign.rewards.concepts import DetectorConceptReward, VQAConceptReward, concept_questions, parse_spec

# djghosh13/geneval `evaluation/evaluate_images.py` COLORS and `prompts/create_prompts.py` positions, written out
GENEVAL_COLOURS = {"red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"}
GENEVAL_RELATIONS = {"left of", "right of", "above", "below"}
NUMBERS = {2: "two", 3: "three", 4: "four"}
IRREGULAR = {"person": "people", "sheep": "sheep", "skis": "skis", "knife": "knives", "scissors": "scissors",
             "computer mouse": "computer mice"}
GENEVAL_SIZES = {"train": {"single_object": 40, "two_object": 200, "counting": 160, "colors": 200, "position": 200,
                           "color_attr": 200},
                 "test": {"single_object": 40, "two_object": 100, "counting": 80, "colors": 100, "position": 100,
                          "color_attr": 100}}


def load(spec):
    return prompt_source(spec).fixed(1)


def a(word):
    return ("an " if word[0] in "aeiou" else "a ") + word


def expected_prompt(item) -> str:
    """The prompt GenEval's wording gives this spec, built here independently of the generator."""
    inc = item.metadata["include"]
    tag = item.metadata["tag"]
    if tag == "single_object":
        return f"a photo of {a(inc[0]['class'])}"
    if tag == "two_object":
        return f"a photo of {a(inc[0]['class'])} and {a(inc[1]['class'])}"
    if tag == "counting":
        name, n = inc[0]["class"], inc[0]["count"]
        many = IRREGULAR.get(name) or name + ("es" if name.endswith(("s", "sh", "ch")) else "s")
        return f"a photo of {NUMBERS[n]} {many}"
    if tag == "colors":
        return f"a photo of {a(inc[0]['color'])} {inc[0]['class']}"
    if tag == "position":
        return f"a photo of {a(inc[1]['class'])} {inc[1]['position'][0]} {a(inc[0]['class'])}"
    assert tag == "color_attr"
    return f"a photo of {a(inc[0]['color'])} {inc[0]['class']} and {a(inc[1]['color'])} {inc[1]['class']}"


def composition(item) -> tuple:
    """What a split holds out, per task: a class, an unordered class pair, (class, count) or (class, colour)."""
    inc = item.metadata["include"]
    classes = frozenset(c["class"] for c in inc)
    return {"single_object": classes, "two_object": classes, "position": classes, "color_attr": classes,
            "counting": (inc[0]["class"], inc[0]["count"]), "colors": (inc[0]["class"], inc[0].get("color"))
            }[item.category], item.category


def test_committed_files_are_what_the_generator_writes(tmp_path):
    written = write_prompt_sets(tmp_path, seed=0)
    shipped = sorted(p.name for p in SHIPPED_DIR.glob("*.jsonl"))
    assert sorted(written) == shipped == ["geneval_test.jsonl", "geneval_train.jsonl", "ocr_test.jsonl",
                                          "ocr_train.jsonl"]
    for name in shipped:
        assert (tmp_path / name).read_bytes() == (SHIPPED_DIR / name).read_bytes(), f"regenerate {name}"
    assert sum((SHIPPED_DIR / n).stat().st_size for n in shipped) < 500_000
    write_prompt_sets(tmp_path / "other", seed=1)  # another seed: other prompts
    assert (tmp_path / "other" / "geneval_test.jsonl").read_bytes() != (tmp_path / "geneval_test.jsonl").read_bytes()


def test_geneval_splits_hold_out_compositions_with_every_task():
    splits = {s: load(f"geneval:{s}") for s in ("train", "test")}
    for split, items in splits.items():
        assert Counter(it.category for it in items) == GENEVAL_SIZES[split]
        assert len({it.text for it in items}) == len(items)
    train, test = ({composition(it) for it in items} for items in splits.values())
    assert not train & test and not {it.text for it in splits["train"]} & {it.text for it in splits["test"]}


def test_geneval_specs_are_valid_and_agree_with_their_prompts():
    assert len(set(OBJECTS)) == 80 and {"computer mouse", "tv remote", "computer keyboard"} <= set(OBJECTS)
    for item in load("geneval:train") + load("geneval:test"):
        meta = item.metadata
        assert meta["tag"] == item.category and set(meta) <= {"tag", "include", "exclude"}
        assert item.text == expected_prompt(item)
        n_clauses = {"single_object": 1, "counting": 1, "colors": 1}.get(item.category, 2)
        assert len(meta["include"]) == n_clauses
        for k, clause in enumerate(meta["include"]):
            assert clause["class"] in OBJECTS
            assert ("color" in clause) == (item.category in ("colors", "color_attr"))
            if "color" in clause:
                assert clause["color"] in GENEVAL_COLOURS and clause["class"] != "person"
            assert ("position" in clause) == (item.category == "position" and k == 1)
            if "position" in clause:
                assert clause["position"][0] in GENEVAL_RELATIONS and clause["position"][1] == 0
        if item.category == "counting":
            n = meta["include"][0]["count"]
            assert 2 <= n <= 4 and meta["exclude"] == [{"class": meta["include"][0]["class"], "count": n + 1}]
        else:
            assert "exclude" not in meta and all(c["count"] == 1 for c in meta["include"])
        if item.category == "color_attr":
            assert meta["include"][0]["color"] != meta["include"][1]["color"]
        if item.category in ("two_object", "position", "color_attr"):
            assert meta["include"][0]["class"] != meta["include"][1]["class"]


def test_ocr_sets_quote_their_text_and_share_no_word():
    splits = {s: load(f"ocr:{s}") for s in ("train", "test")}
    assert {s: len(items) for s, items in splits.items()} == {"train": 800, "test": 200}
    words = {}
    for split, items in splits.items():
        assert len({it.text for it in items}) == len(items)
        assert len({it.category for it in items}) == 10  # every template in both splits
        for item in items:
            quoted = re.findall(r'"([^"]*)"', item.text)
            assert quoted == [item.metadata["text"]]  # what the ocr reward reads, either way
            assert 2 <= len(quoted[0]) <= 10 and quoted[0].isalnum()
        words[split] = {it.metadata["text"].lower() for it in items}
        assert any(w.isalpha() and len(w) > 4 for w in words[split])  # English words
        assert any(any(ch.isdigit() for ch in w) for w in words[split])  # letter / digit strings
        uses = Counter(it.metadata["text"].lower() for it in items).values()
        assert max(uses) - min(uses) == 1  # each word about equally often, never twice with one template
        assert all(len({it.category for it in items if it.metadata["text"].lower() == w}) == n
                   for w, n in Counter(it.metadata["text"].lower() for it in items).items())
    assert not words["train"] & words["test"]


def test_sets_load_by_name_and_errors_name_the_allowed_choices(tiny_run):
    chosen = load("geneval:test:counting,position")
    assert Counter(it.category for it in chosen) == {"counting": 80, "position": 100}
    assert prompt_source("ocr:train").all() == load("ocr:train")  # finite: text encoders can be freed
    with pytest.raises(ValueError, match=r"prompts='geneval:val': unknown geneval split 'val'; allowed: train, test"):
        prompt_source("geneval:val")
    with pytest.raises(ValueError, match=r"unknown ocr split 'tset' \(did you mean 'test'\?\); allowed: train, test"):
        prompt_source("ocr:tset")
    with pytest.raises(ValueError, match=r"unknown geneval categories \['count'\] \(did you mean 'counting'\?\); "
                                         r"allowed: single_object, two_object, counting, colors, position"):
        prompt_source("geneval:test:count")
    # at config time, before any model: trainer configs and evaluation suites
    with pytest.raises(ValueError, match=r"train.prompts='geneval:dev': unknown geneval split 'dev'; allowed"):
        tiny_run("train.prompts=geneval:dev")
    assert tiny_run("train.prompts=ocr:train", "run.eval_prompts=ocr:test").run.eval_prompts == "ocr:test"
    with pytest.raises(ValueError, match=r"run.eval_prompts='ocr:all': unknown ocr split 'all'"):
        tiny_run("run.eval_prompts=ocr:all")
    with pytest.raises(ValueError, match=r"prompts='geneval:x': unknown geneval split"):
        RewardEvalConfig(prompts="geneval:x")
    with pytest.raises(ValueError, match=r"the model edits source images, and the shipped geneval set names none"):
        check_prompt_spec("geneval:train", "train.prompts", edits=True)
    # the presets point at the shipped set; a user's prompts win
    assert with_preset(RewardEvalConfig(), "geneval").prompts == "geneval:test"
    assert with_preset(RewardEvalConfig(), "compbench").prompts == "geneval:test:color_attr,position"
    assert with_preset(RewardEvalConfig(), "preference").prompts == "world:heldout"
    assert with_preset(RewardEvalConfig(prompts="ocr:test"), "geneval").prompts == "ocr:test"
    assert with_preset(RewardEvalConfig(), "geneval").rewards == ["concepts-detector"]


def one_per_task():
    items = load("geneval:test")
    return [next(it for it in items if it.category == task) for task in dict.fromkeys(it.category for it in items)]


def test_concept_rewards_read_the_shipped_specs():
    items = one_per_task()
    assert [it.category for it in items] == ["single_object", "two_object", "counting", "colors", "position",
                                             "color_attr"]
    images = torch.rand(len(items), 3, 32, 32, generator=torch.Generator().manual_seed(0))
    metadata = [dict(it.metadata) for it in items]
    detector = DetectorConceptReward.tiny(seed=0, threshold=0.0, counting_threshold=0.0)
    asked = []
    inner = detector.detector
    detector.detector = lambda x, classes: asked.extend(classes) or inner(x, classes)
    out = detector(prompts=[it.text for it in items], images=images, metadata=metadata)
    # the detector is asked for the spec's objects (include, then exclude), and the groups follow the spec
    assert asked == [[c["class"] for c in m["include"]] + [c["class"] for c in m.get("exclude", [])]
                     for m in metadata]
    has_colour = [any("color" in c for c in m["include"]) for m in metadata]
    has_relation = [m["tag"] == "position" for m in metadata]
    assert out["attribute"].isnan().tolist() == [not c for c in has_colour]
    assert out["relation"].isnan().tolist() == [not r for r in has_relation]
    assert ((out["score"] >= 0) & (out["score"] <= 1)).all() and not out["object"].isnan().any()

    # the VQA path asks one question per object, colour and relation of the spec, about the prompt's words
    vqa = VQAConceptReward.tiny(seed=0)
    questions = []
    p_yes = vqa.answerer.p_yes
    vqa.answerer.p_yes = lambda x, qs: questions.extend(qs) or p_yes(x, qs)
    scores = vqa(prompts=[it.text for it in items], images=images, metadata=metadata)["score"]
    assert scores.shape == (6,) and ((scores >= 0) & (scores <= 1)).all()
    per_item = [[q for _, _, q in concept_questions(parse_spec(m))] for m in metadata]
    assert questions == [q for qs in per_item for q in qs]
    position = per_item[4]
    inc = metadata[4]["include"]
    assert position == [f"is there a {inc[0]['class']}?", f"is there a {inc[1]['class']}?",
                        f"is the {inc[1]['class']} {inc[1]['position'][0]} the {inc[0]['class']}?"]
    assert f"{inc[1]['class']} {inc[1]['position'][0]} {a(inc[0]['class'])}" in items[4].text
    colour_attr = metadata[5]["include"]
    assert per_item[5][1] == f"is the {colour_attr[0]['class']} {colour_attr[0]['color']}?"
    count = metadata[2]["include"][0]
    assert per_item[2][0].startswith(f"are there {NUMBERS[count['count']]} ")
