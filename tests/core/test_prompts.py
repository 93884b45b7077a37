"""Prompt sources: files checked line by line, registered sources, dotted-path sources, one registry lookup."""

import pytest
import torch

from visalign.prompts import SOURCES, FilePrompts, Prompt, PromptSource, prompt_source, prompts_of
from visalign.registry import lookup


class Countdown(PromptSource):
    """A user's source: `tests.core.test_prompts.Countdown:N` gives prompts "N", "N-1", ... as plain mappings,
    which `prompts_of` reads into records."""

    def __init__(self, args: str):
        if not args.isdigit():
            raise ValueError("N must be a number")
        self.items = [{"prompt": str(i)} for i in range(int(args), 0, -1)]

    def draw(self, n, generator):
        return [self.items[i] for i in torch.randint(len(self.items), (n,), generator=generator).tolist()]

    def fixed(self, n_per_category):
        return [{**item, "category": "all"} for item in self.items]


def test_text_and_jsonl_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a red circle\n\n  two cats  \n")
    assert prompt_source(str(txt)).fixed(5) == [Prompt("a red circle"), Prompt("two cats")]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "x", "category": "c", "id": 3}\n{"prompt": "y"}\n')
    source = prompt_source(str(jsonl))
    # the category is the record's own field; the rest of the line is the metadata rewards receive
    assert source.fixed(1) == [Prompt("x", {"id": 3}, "c"), Prompt("y", {}, "all")]
    drawn = source.draw(20, torch.Generator().manual_seed(0))
    assert {d.text for d in drawn} == {"x", "y"} and all(d.metadata == ({"id": 3} if d.text == "x" else {})
                                                           for d in drawn)


@pytest.mark.parametrize(("item", "match"), [
    ({"text": "no prompt key"}, "item 1: needs a non-empty 'prompt' string"),
    ({"prompt": "   "}, "item 1: needs a non-empty 'prompt' string"),
    ({"prompt": "x", "category": 3}, "item 1: 'category' must be a string"),
    (42, "item 1: needs a non-empty 'prompt' string"),
])
def test_records_from_a_users_items_are_checked(item, match):
    assert prompts_of(["plain text", {"prompt": "p", "spec": 1}], "src") == [Prompt("plain text"),
                                                                           Prompt("p", {"spec": 1})]
    with pytest.raises(ValueError, match=f"src, {match}"):
        prompts_of(["fine", item], "src")


@pytest.mark.parametrize(("text", "match"), [
    ('{"prompt": "x"}\nnot json\n', "line 2: not JSON"),
    ('{"prompt": ""}\n', "line 1: needs a non-empty 'prompt' string"),
    ("\n\n", "is empty"),
])
def test_bad_files_name_the_line(tmp_path, text, match):
    path = tmp_path / "p.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        FilePrompts(path)


def test_unknown_sources_name_the_choices(tmp_path):
    with pytest.raises(ValueError, match="prompt file 'nope.txt' does not exist; or use NAME:ARGS with NAME in "
                                         "geneval, ocr, world"):
        prompt_source("nope.txt")
    with pytest.raises(ValueError, match="cannot import prompt source 'my.missing'"):
        prompt_source("my.missing:3")


def test_a_dotted_path_names_a_users_source():
    source = prompt_source("tests.core.test_prompts.Countdown:3")
    assert [item.text for item in prompts_of(source.fixed(1), "countdown")] == ["3", "2", "1"]
    with pytest.raises(ValueError, match="prompts='tests.core.test_prompts.Countdown:x': N must be a number"):
        prompt_source("tests.core.test_prompts.Countdown:x")


def test_a_registered_source_and_the_worlds_fixed_lists(monkeypatch):
    monkeypatch.setitem(SOURCES, "countdown", Countdown)
    assert len(prompt_source("countdown:4").fixed(1)) == 4
    world = prompt_source("world:heldout:count,relation").fixed(3)
    assert [item.category for item in world] == ["count"] * 3 + ["relation"] * 3
    assert all(item.metadata["spec"].prompt == item.text for item in world)  # the world's rewards read the spec
    # a template's fixed list does not depend on which other templates are asked for
    alone = prompt_source("world:heldout:relation").fixed(3)
    assert [item.text for item in alone] == [item.text for item in world[3:]]


def test_lookup_resolves_names_objects_and_dotted_paths():
    registry = {"obj": len, "path": "math:sqrt"}
    assert lookup(registry, "obj", "thing") is len
    assert lookup(registry, "path", "thing")(9.0) == 3.0
    assert lookup(registry, "os.path.join", "thing")("a", "b").endswith("b")
    with pytest.raises(ValueError, match="unknown thing 'x'; allowed: obj, path or a dotted path"):
        lookup(registry, "x", "thing")
    with pytest.raises(ValueError, match="cannot import thing 'os.nope'"):
        lookup(registry, "os.nope", "thing")
