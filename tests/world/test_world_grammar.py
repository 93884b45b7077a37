import pytest
import torch

from visalign.world.grammar import (
    COLORS,
    HELDOUT_FRACTION,
    SHAPES,
    TEMPLATE_TIERS,
    TEMPLATES,
    ObjectSpec,
    SceneSpec,
    all_specs,
    composition_key,
    counterfactuals,
    parse_prompt,
    sample_specs,
    split_specs,
)


@pytest.mark.parametrize("template", TEMPLATES)
def test_every_spec_round_trips_through_its_prompt(template):
    specs = all_specs(template)
    assert len(set(specs)) == len(specs)
    for spec in specs:
        assert parse_prompt(spec.prompt) == spec


@pytest.mark.parametrize(
    ("prompt", "template"),
    [
        ("a red circle", "single"),
        ("a large blue square", "size"),
        ("two green triangles", "count"),
        ("a yellow circle on the left", "position"),
        ("a red circle and a blue square", "two_objects"),
        ("a red circle to the left of a blue square", "relation"),
    ],
)
def test_template_examples_parse(prompt, template):
    spec = parse_prompt(prompt)
    assert spec.template == template
    assert spec.prompt == prompt


def test_parse_is_case_and_space_insensitive():
    assert parse_prompt("  A Red   CIRCLE ") == parse_prompt("a red circle")


def test_parse_relation_keeps_the_order_of_objects():
    spec = parse_prompt("a cyan square below a magenta triangle")
    assert spec.relation == "below"
    assert spec.objects == (ObjectSpec("cyan", "square"), ObjectSpec("magenta", "triangle"))


@pytest.mark.parametrize("word", ["hexagon", "orange", "beside", "huge"])
def test_unknown_word_raises_naming_it(word):
    with pytest.raises(ValueError, match=f"unknown word '{word}'"):
        parse_prompt(f"a red {word} circle")


@pytest.mark.parametrize(
    "prompt",
    [
        "",
        "red a circle",
        "a red circles",
        "two red circle",
        "a red circle and",
        "a red circle on the",
        "a red circle a blue square",
        "a red circle and a red circle",  # the same object twice is a count, not two objects
        "two large red circles",  # no template states count and size together
        "a red circle on the left and a blue square",
    ],
)
def test_prompts_outside_the_grammar_raise(prompt):
    with pytest.raises(ValueError):
        parse_prompt(prompt)


def test_invalid_specs_raise_naming_the_field():
    with pytest.raises(ValueError, match="color='orange'"):
        ObjectSpec("orange", "circle")
    with pytest.raises(ValueError, match="count=4"):
        ObjectSpec("red", "circle", count=4)
    with pytest.raises(ValueError, match="count=2"):
        SceneSpec("single", (ObjectSpec("red", "circle", count=2),))
    with pytest.raises(ValueError, match="relation"):
        SceneSpec("two_objects", (ObjectSpec("red", "circle"), ObjectSpec("blue", "square")), "above")


def test_vocabulary_sizes():
    assert len(COLORS) >= 4
    assert set(SHAPES) == {"circle", "square", "triangle"}
    assert [len(all_specs(t)) for t in TEMPLATES] == [18, 36, 36, 72, 306, 1224]


@pytest.mark.parametrize("template", TEMPLATES)
def test_split_partitions_the_template(template):
    seen, heldout = split_specs(template, "seen"), split_specs(template, "heldout")
    assert set(seen).isdisjoint(heldout)
    assert set(seen) | set(heldout) == set(all_specs(template))
    assert abs(len(heldout) / len(all_specs(template)) - HELDOUT_FRACTION) < 0.03


@pytest.mark.parametrize("template", TEMPLATES)
def test_held_out_combinations_cannot_be_seen_under_another_wording(template):
    seen_keys = {composition_key(spec) for spec in split_specs(template, "seen")}
    assert seen_keys.isdisjoint(composition_key(spec) for spec in split_specs(template, "heldout"))


def test_mirrored_phrasings_share_their_split():
    spec = parse_prompt("a red circle to the left of a blue square")
    mirror = parse_prompt("a blue square to the right of a red circle")
    swapped = parse_prompt("a blue square and a red circle")
    assert composition_key(spec) == composition_key(mirror)
    assert composition_key(parse_prompt("a red circle and a blue square")) == composition_key(swapped)


@pytest.mark.parametrize("template", TEMPLATES)
def test_every_word_appears_in_seen_prompts(template):
    words = {word for spec in all_specs(template) for word in spec.prompt.split()}
    seen_words = {word for spec in split_specs(template, "seen") for word in spec.prompt.split()}
    assert words == seen_words


def test_split_is_fixed():
    # Pinned: the split is made by sha256 of the composition, so it must never change between runs.
    heldout = {spec.prompt for spec in split_specs("single", "heldout")}
    assert heldout == {"a red triangle", "a yellow square", "a cyan circle", "a blue circle"}
    split_specs.cache_clear()
    assert {spec.prompt for spec in split_specs("single", "heldout")} == heldout


def test_sample_specs_is_deterministic_and_stays_in_its_split():
    first = sample_specs(200, "heldout", generator=3)
    assert first == sample_specs(200, "heldout", generator=3)
    assert first != sample_specs(200, "heldout", generator=4)
    heldout = {spec for template in TEMPLATES for spec in split_specs(template, "heldout")}
    assert set(first) <= heldout
    from_torch = sample_specs(10, generator=torch.Generator().manual_seed(0))
    assert from_torch == sample_specs(10, generator=torch.Generator().manual_seed(0))


def test_sample_specs_draws_templates_uniformly():
    specs = sample_specs(1200, "seen", generator=0)
    counts = {t: sum(spec.template == t for spec in specs) for t in TEMPLATES}
    assert all(140 <= n <= 260 for n in counts.values()), counts
    only = sample_specs(50, "seen", templates=("relation",), generator=0)
    assert {spec.template for spec in only} == {"relation"}
    with pytest.raises(ValueError, match="template"):
        sample_specs(1, templates=("stack",))


def test_relations_are_the_hard_tier():
    assert set(TEMPLATE_TIERS) == set(TEMPLATES)
    assert [t for t, tier in TEMPLATE_TIERS.items() if tier == "hard"] == ["relation"]


@pytest.mark.parametrize("template", TEMPLATES)
def test_counterfactuals_change_the_scene(template):
    for spec in all_specs(template):
        changes = dict(counterfactuals(spec))
        assert {"change shape"} <= set(changes) and {"change colour", "swap colours"} & set(changes)
        for changed in changes.values():
            assert composition_key(changed) != composition_key(spec) or changed.template != spec.template


def test_counterfactuals_of_a_relation():
    spec = parse_prompt("a red circle to the left of a blue square")
    assert {kind: changed.prompt for kind, changed in counterfactuals(spec)} == {
        "swap colours": "a blue circle to the left of a red square",
        "change shape": "a red square to the left of a blue square",
        "swap relation": "a red circle to the right of a blue square",
    }
