"""The shipped prompt sets and the code that writes them: a GenEval-style set (`geneval`) and a text-rendering
set (`ocr`), each as train / test JSONL files under visalign/assets/prompts/, loaded by name (`geneval:train`,
`ocr:test`; `visalign.prompts.ShippedSet`). The files are this module's output for seed 0:

    python -m visalign.eval.prompt_sets                 # rewrites the shipped files (same seed: same bytes)
    python -m visalign.eval.prompt_sets --out DIR --seed 1

`geneval` follows djghosh13/geneval `prompts/create_prompts.py`: its six tasks, its 80 COCO object names, colours,
relations, counts (2-4, with an exclude clause one above), prompt wording ("a photo of an orange banana") and
metadata (`tag`, `include` [{class, count, color?, position?}], `exclude`), which the concept rewards read
(`visalign.rewards.concepts`). Two changes: the test split holds out whole compositions per task (a class, a
class pair, a (class, count) or (class, colour) pair) that the train split never uses, and plurals are English
("three knives", where GenEval writes "knifes").

`ocr` asks for text in quotes (`a street sign that says "OPEN"`) through ten templates (the category), with the
text also in the metadata (`text`), as the `ocr` reward reads it; words are common English words and generated
letter / digit strings of 2-10 characters, and the two splits share no word.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import string
from pathlib import Path

from visalign.prompts import SHIPPED_DIR
from visalign.rewards.concepts import COLORS, RELATIONS, parse_spec

# djghosh13/geneval `prompts/object_names.txt`: the 80 COCO classes, with mouse, remote and keyboard renamed.
OBJECTS = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
COLOURED = tuple(o for o in OBJECTS if o != "person")  # GenEval writes no "[colour] person" prompt
COUNTS = (2, 3, 4)
NUMBERS = {2: "two", 3: "three", 4: "four"}
TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
# (train, test) prompts per task: every held-out composition gives one prompt. Counting has 240 compositions in
# all, single objects 80; the test split's sizes are close to GenEval's own 553 prompts.
GENEVAL_SIZES = {"single_object": (40, 40), "two_object": (200, 100), "counting": (160, 80), "colors": (200, 100),
                 "position": (200, 100), "color_attr": (200, 100)}
IRREGULAR = {"person": "people", "sheep": "sheep", "skis": "skis", "knife": "knives", "scissors": "scissors",
             "computer mouse": "computer mice"}


def article(phrase: str) -> str:
    """GenEval's `with_article`: "an" before a vowel letter."""
    return f"an {phrase}" if phrase[0] in "aeiou" else f"a {phrase}"


def plural(name: str) -> str:
    return IRREGULAR.get(name) or name + ("es" if name.endswith(("s", "sh", "ch", "x")) else "s")


def compositions(task: str) -> list[tuple]:
    """What a task's prompts are made of, in a fixed order; a split holds out whole compositions. A pair is
    unordered: "a dog left of a cat" and "a cat right of a dog" are one composition."""
    if task == "single_object":
        return [(o,) for o in OBJECTS]
    if task in ("two_object", "position"):
        return list(itertools.combinations(OBJECTS, 2))
    if task == "counting":
        return [(o, n) for o in OBJECTS for n in COUNTS]
    if task == "colors":
        return [(o, c) for o in COLOURED for c in COLORS]
    if task == "color_attr":
        return list(itertools.combinations(COLOURED, 2))
    raise ValueError(f"unknown GenEval task {task!r}; allowed: {', '.join(TASKS)}")


def geneval_spec(task: str, composition: tuple, rng: random.Random) -> dict:
    """One prompt and its metadata as djghosh13/geneval `create_prompts.py` writes them; `rng` picks what the
    composition leaves open (the pair's order, the relation, the two colours)."""
    if task == "single_object":
        (obj,) = composition
        return {"tag": task, "include": [{"class": obj, "count": 1}], "prompt": f"a photo of {article(obj)}"}
    if task == "two_object":
        a, b = rng.sample(composition, 2)
        return {"tag": task, "include": [{"class": a, "count": 1}, {"class": b, "count": 1}],
                "prompt": f"a photo of {article(a)} and {article(b)}"}
    if task == "counting":
        obj, n = composition
        return {"tag": task, "include": [{"class": obj, "count": n}], "exclude": [{"class": obj, "count": n + 1}],
                "prompt": f"a photo of {NUMBERS[n]} {plural(obj)}"}
    if task == "colors":
        obj, colour = composition
        return {"tag": task, "include": [{"class": obj, "count": 1, "color": colour}],
                "prompt": f"a photo of {article(colour)} {obj}"}
    if task == "position":  # "a photo of A <relation> B": A is placed relative to B, the first clause
        a, b = rng.sample(composition, 2)
        relation = rng.choice(RELATIONS)
        return {"tag": task, "include": [{"class": b, "count": 1},
                                         {"class": a, "count": 1, "position": [relation, 0]}],
                "prompt": f"a photo of {article(a)} {relation} {article(b)}"}
    if task == "color_attr":
        a, b = rng.sample(composition, 2)
        colour_a, colour_b = rng.sample(COLORS, 2)
        return {"tag": task, "include": [{"class": a, "count": 1, "color": colour_a},
                                         {"class": b, "count": 1, "color": colour_b}],
                "prompt": f"a photo of {article(colour_a)} {a} and {article(colour_b)} {b}"}
    raise ValueError(f"unknown GenEval task {task!r}; allowed: {', '.join(TASKS)}")


def geneval_lines(seed: int = 0) -> dict[str, list[dict]]:
    """{"train": lines, "test": lines}, task by task: each task's compositions shuffled by its own generator, the
    first ones held out for test, the next ones for train. A line is the GenEval metadata with `prompt` first and
    the tag repeated as `category` (evaluation tables group by it)."""
    out = {"train": [], "test": []}
    for task in TASKS:
        rng = random.Random(f"geneval:{task}:{seed}")  # str seeds hash with SHA-512: stable across runs
        pool = compositions(task)
        rng.shuffle(pool)
        n_train, n_test = GENEVAL_SIZES[task]
        for split, chosen in (("test", pool[:n_test]), ("train", pool[n_test:n_test + n_train])):
            for i, composition in enumerate(chosen):
                spec = geneval_spec(task, composition, rng)
                parse_spec(spec, i)  # what the concept rewards will read
                out[split].append({"prompt": spec.pop("prompt"), "category": task, **spec})
    return out


# Common English words of 2-10 letters, the kind written on signs, shirts and covers.
WORDS = (
    "hi", "go", "no", "ok", "up", "on", "we", "me",
    "cat", "dog", "sun", "sky", "tea", "bus", "car", "bar", "art", "joy", "fun", "zoo", "gym", "spa", "box", "map",
    "key", "ice", "pie", "jam", "owl", "fox", "bee", "day", "new", "hot", "big", "top", "win", "yes", "now", "red",
    "open", "shop", "cafe", "love", "hope", "rain", "snow", "wind", "fire", "moon", "star", "road", "park", "exit",
    "stop", "sale", "free", "gold", "blue", "time", "home", "food", "milk", "cake", "fish", "bird", "tree", "book",
    "jazz", "rock", "surf", "wine", "taxi", "farm", "lake", "kids", "play", "city", "wild", "calm", "salt", "soup",
    "hello", "happy", "smile", "peace", "dream", "ocean", "river", "beach", "light", "night", "sweet", "fresh",
    "bread", "pizza", "sushi", "candy", "music", "dance", "party", "hotel", "plaza", "metro", "train", "radio",
    "tiger", "eagle", "horse", "apple", "lemon", "mango", "grape", "cloud", "storm", "earth", "stone", "water",
    "green", "white", "black", "brave", "magic", "lucky", "quiet", "enter", "thank", "bloom",
    "coffee", "bakery", "garden", "market", "cinema", "museum", "winter", "summer", "spring", "autumn", "forest",
    "island", "rocket", "planet", "silver", "orange", "purple", "yellow", "friend", "family", "school", "office",
    "closed", "sunday", "monday", "cheese", "burger", "cookie", "butter", "flower", "castle", "dragon", "wonder",
    "travel", "energy", "future", "thanks", "danger", "street", "bridge", "harbor", "arcade", "studio", "sunset",
    "picnic", "welcome", "library", "station", "parking", "airport", "kitchen", "fitness", "theater", "gallery",
    "holiday", "rainbow", "sunrise", "morning", "evening", "freedom", "harmony", "journey", "diamond", "dolphin",
    "penguin", "chicken", "noodles", "bicycle", "history", "science", "country", "victory", "balance",
    "pharmacy", "festival", "mountain", "sandwich", "bookshop", "sunshine", "paradise", "midnight", "treasure",
    "universe", "daylight", "pancakes", "lemonade", "elephant", "vacation", "hospital", "language", "champion",
    "adventure", "chocolate", "beautiful", "breakfast", "butterfly", "celebrate", "discovery", "fantastic",
    "happiness", "wonderful", "community", "knowledge",
    "lighthouse", "strawberry", "restaurant", "friendship", "basketball", "everything", "motorcycle", "playground",
    "wilderness", "university",
)
# template name (the category) -> prompt with the text in double quotes
OCR_TEMPLATES = {
    "sign": 'a street sign that says "{}"',
    "poster": 'a poster with the word "{}" in large letters',
    "tshirt": 'a white t-shirt printed with "{}"',
    "storefront": 'a storefront with "{}" written above the door',
    "book": 'a book cover titled "{}"',
    "neon": 'a neon sign that reads "{}"',
    "chalkboard": 'a chalkboard with "{}" written in chalk',
    "mug": 'a coffee mug with "{}" printed on it',
    "banner": 'a banner that says "{}"',
    "cake": 'a cake with "{}" written in icing',
}
OCR_STRINGS = 100  # generated letter / digit strings beside the English words
OCR_TEST_FRACTION = 0.2  # of each kind of word, held out for test
OCR_SIZES = {"train": 800, "test": 200}


def letter_digit_strings(n: int, rng: random.Random, taken: set[str]) -> list[str]:
    """n distinct upper-case strings, a third each digits only (2-4), letters only (2-4) and mixed (3-6, a letter
    and a digit at least), none equal to a word in `taken` (lower case)."""
    out: list[str] = []
    while len(out) < n:
        kind = len(out) % 3
        if kind == 0:
            text = "".join(rng.choices(string.digits, k=rng.randint(2, 4)))
        elif kind == 1:
            text = "".join(rng.choices(string.ascii_uppercase, k=rng.randint(2, 4)))
        else:
            text = "".join(rng.choices(string.ascii_uppercase + string.digits, k=rng.randint(3, 6)))
            if text.isdigit() or text.isalpha():
                continue
        if text.lower() not in taken and text not in out:
            out.append(text)
    return out


def ocr_lines(seed: int = 0) -> dict[str, list[dict]]:
    """{"train": lines, "test": lines}: the vocabulary's words split per kind (English words, strings), then each
    split's words taken in rounds, each word with its own shuffled templates, so every word appears about equally
    often and never twice with one template. English words are written in upper or title case."""
    rng = random.Random(f"ocr:{seed}")
    words = list(WORDS)
    strings = letter_digit_strings(OCR_STRINGS, rng, set(words))
    splits: dict[str, list[str]] = {"train": [], "test": []}
    for kind in (words, strings):
        rng.shuffle(kind)
        n_test = round(len(kind) * OCR_TEST_FRACTION)
        splits["test"] += kind[:n_test]
        splits["train"] += kind[n_test:]
    out = {}
    for split, vocabulary in splits.items():
        rng.shuffle(vocabulary)
        templates = {word: rng.sample(list(OCR_TEMPLATES), len(OCR_TEMPLATES)) for word in vocabulary}
        lines = []
        for turn in range(len(OCR_TEMPLATES)):
            for word in vocabulary:
                if len(lines) == OCR_SIZES[split]:
                    break
                text = rng.choice((word.upper(), word.title())) if word.islower() else word
                category = templates[word][turn]
                lines.append({"prompt": OCR_TEMPLATES[category].format(text), "category": category, "text": text})
        out[split] = lines
    return out


def write_prompt_sets(out_dir: str | Path = SHIPPED_DIR, seed: int = 0) -> dict[str, int]:
    """Write geneval_{train,test}.jsonl and ocr_{train,test}.jsonl into `out_dir`; returns lines per file."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, splits in (("geneval", geneval_lines(seed)), ("ocr", ocr_lines(seed))):
        for split, lines in splits.items():
            path = out_dir / f"{name}_{split}.jsonl"
            path.write_text("".join(json.dumps(line) + "\n" for line in lines))
            written[path.name] = len(lines)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(SHIPPED_DIR), help="directory (default: the shipped sets' own)")
    parser.add_argument("--seed", type=int, default=0, help="the shipped files use 0")
    args = parser.parse_args(argv)
    for name, n in write_prompt_sets(args.out, args.seed).items():
        print(f"wrote {Path(args.out) / name} ({n} prompts)")


if __name__ == "__main__":
    main()
