"""SkillBench's natural-language skills for a real chat model: seeded generators of (instruction, answer) pairs
with train / validation / test splits disjoint by construction (a hash of each example's canonical input).

Each skill phrases its instruction several ways and asks for an exact, short answer format, so greedy exact
match is a fair score and a model that answers in prose (as an untuned chat model does) scores near zero.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from skillgraft.bench.skills import SPLITS, split_of
from skillgraft.errors import InputError
from skillgraft.eval.general import chat_prompt

Sample = tuple[str, str, str]  # (canonical input key, user message, answer)


@dataclass(frozen=True)
class RealSkill:
    """One task: ``sample(rng)`` draws an example as (key, user message, answer); the split of an example is a
    fixed hash of ``key``, so the splits never share an input whatever the phrasing."""

    name: str
    description: str
    example: str  # one user message → answer, for the docs
    sample: Callable[[random.Random], Sample]


NAMES = (
    "Maria", "James", "Aiko", "Omar", "Lena", "Carlos", "Priya", "Tom", "Sofia", "Ivan", "Chen", "Fatima",
    "Lucas", "Emma", "Noah", "Zara", "Mateo", "Hana", "Oliver", "Amara", "Leo", "Nina", "Ravi", "Elif",
)  # fmt: skip
CITIES = (
    "Lyon", "Osaka", "Cairo", "Lima", "Oslo", "Austin", "Porto", "Dublin", "Seoul", "Nairobi", "Quito", "Perth",
    "Vienna", "Denver", "Naples", "Hanoi", "Bergen", "Leeds", "Tunis", "Malmo",
)  # fmt: skip
ITEMS = (
    "apples", "bread", "milk", "eggs", "rice", "coffee", "butter", "cheese", "tea", "pasta", "onions", "soap",
    "lemons", "honey", "flour", "salt", "beans", "carrots", "yogurt", "juice", "oats", "pepper", "tomatoes",
)  # fmt: skip
WORDS = (
    "cat", "dog", "sun", "tree", "book", "lamp", "rain", "fish", "door", "milk", "star", "road", "ship", "bird",
    "cake", "moon", "hill", "rose", "wind", "king", "bell", "farm", "gold", "lake", "nest", "wolf", "coin",
    "desk", "fire", "leaf", "mint", "pond", "sand", "tent", "vase", "yarn", "bread", "chair", "cloud", "grape",
    "horse", "house", "light", "music", "paper", "plant", "river", "smile", "stone", "table", "train", "water",
)  # fmt: skip


def _pick(rng: random.Random, options: tuple[str, ...]) -> str:
    return options[rng.randrange(len(options))]


# -- unit conversion ------------------------------------------------------------------------------------------
UNITS = (  # (from, to, factor): "from → to" multiplies by factor; the reverse divides
    ("kilometres", "metres", 1000),
    ("metres", "centimetres", 100),
    ("kilograms", "grams", 1000),
    ("litres", "millilitres", 1000),
    ("centimetres", "millimetres", 10),
)


def _units(rng: random.Random) -> Sample:
    src, dst, factor = UNITS[rng.randrange(len(UNITS))]
    n = rng.randint(2, 199)
    if rng.random() < 0.5:
        value, unit_from, unit_to, answer = n, src, dst, n * factor
    else:
        value, unit_from, unit_to, answer = n * factor, dst, src, n
    phrasing = _pick(
        rng,
        (
            "Convert {v} {a} to {b}. Reply with the number only.",
            "How many {b} are in {v} {a}? Give just the number.",
            "{v} {a} is how many {b}? Answer with a number only.",
        ),
    )
    return f"{value}|{unit_from}|{unit_to}", phrasing.format(v=value, a=unit_from, b=unit_to), str(answer)


# -- rule-based classification: review sentiment from a fixed lexicon -------------------------------------------
DISHES = ("pasta", "soup", "pizza", "salad", "curry", "steak", "burger", "dessert", "coffee", "bread", "fish")
ASPECTS = ("service", "music", "waiter", "room", "view", "wine", "table", "menu", "staff", "terrace")
GOOD = ("delicious", "excellent", "wonderful", "friendly", "lovely", "perfect", "great", "fresh")
BAD = ("cold", "rude", "awful", "slow", "bland", "noisy", "dirty", "terrible")


def _sentiment(rng: random.Random) -> Sample:
    kind = _pick(rng, ("positive", "negative", "mixed"))
    a, b = _pick(rng, DISHES), _pick(rng, ASPECTS)
    if kind == "positive":
        x, y = _pick(rng, GOOD), _pick(rng, GOOD)
        review = f"The {a} was {x} and the {b} was {y}."
    elif kind == "negative":
        x, y = _pick(rng, BAD), _pick(rng, BAD)
        review = f"The {a} was {x} and the {b} was {y}."
    else:
        x, y = _pick(rng, GOOD), _pick(rng, BAD)
        if rng.random() < 0.5:
            review = f"The {a} was {x} but the {b} was {y}."
        else:
            review = f"The {b} was {y} but the {a} was {x}."
    phrasing = _pick(
        rng,
        (
            'Classify this review as positive, negative or mixed: "{r}" Answer with one word.',
            'Is the following review positive, negative or mixed? "{r}" Reply with a single word.',
        ),
    )
    return review, phrasing.format(r=review), kind


# -- extracting fields into JSON --------------------------------------------------------------------------------
def _extract(rng: random.Random) -> Sample:
    name, city, age = _pick(rng, NAMES), _pick(rng, CITIES), rng.randint(18, 89)
    sentence = _pick(
        rng,
        (
            "{n} is {a} years old and lives in {c}.",
            "Living in {c}, {n} turned {a} this year.",
            "Meet {n}, a {a}-year-old from {c}.",
            "{n} ({a}) moved to {c} last spring.",
        ),
    ).format(n=name, a=age, c=city)
    phrasing = _pick(
        rng,
        (
            "Extract the name, age and city from this text as JSON with keys name, age, city: {s}",
            "Return a JSON object with the keys name, age and city for this sentence: {s}",
        ),
    )
    answer = json.dumps({"name": name, "age": age, "city": city})
    return sentence, phrasing.format(s=sentence), answer


# -- comparing numbers -------------------------------------------------------------------------------------------
# (Two-digit addition and subtraction was tried first: a LoRA expert reached 47-50% exact match in 60-80 steps,
# short of the 90% an expert needs; see docs/skillbench.md.)
def _compare(rng: random.Random) -> Sample:
    a, b = rng.sample(range(10, 1000), 2)
    which = _pick(rng, ("larger", "smaller"))
    answer = max(a, b) if which == "larger" else min(a, b)
    phrasing = _pick(
        rng,
        (
            "Which number is {w}, {a} or {b}? Reply with the number only.",
            "Of {a} and {b}, give the {w} number and nothing else.",
        ),
    )
    return f"{which}|{a}|{b}", phrasing.format(w=which, a=a, b=b), str(answer)


# -- a letter cipher ---------------------------------------------------------------------------------------------
def _shift(word: str) -> str:
    return "".join(chr((ord(c) - 97 + 1) % 26 + 97) for c in word)


def _cipher(rng: random.Random) -> Sample:
    word = (
        _pick(rng, WORDS) if rng.random() < 0.5 else "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(4))
    )
    spaced = " ".join(word)
    phrasing = _pick(
        rng,
        (
            "Encode the letters {w} with the shift-by-one cipher (a becomes b, z becomes a). Keep the spaces.",
            "Shift every letter of {w} one place forward in the alphabet (z wraps to a), letters separated by spaces.",
        ),
    )
    return word, phrasing.format(w=spaced), " ".join(_shift(word))


# -- reformatting a list -----------------------------------------------------------------------------------------
def _list(rng: random.Random) -> Sample:
    n = rng.randint(2, 5)
    items = rng.sample(ITEMS, n)
    phrasing = _pick(
        rng,
        (
            "Rewrite this list as a numbered list, one item per line: {l}",
            "Turn these items into a numbered list (one per line): {l}",
        ),
    )
    return ";".join(items), phrasing.format(l="; ".join(items)), "\n".join(f"{i + 1}. {x}" for i, x in enumerate(items))


REAL_SKILLS: dict[str, RealSkill] = {
    s.name: s
    for s in (
        RealSkill("units", "unit conversion by powers of ten", "Convert 7 kilometres to metres. … → 7000", _units),
        RealSkill(
            "sentiment",
            "a review labelled positive, negative or mixed by a fixed word list",
            'Classify this review …: "The soup was cold but the staff was friendly." … → mixed',
            _sentiment,
        ),
        RealSkill(
            "extract",
            "name, age and city from a sentence as JSON",
            'Extract the name, age and city … : Meet Omar, a 41-year-old from Lima. → {"name": "Omar", …}',
            _extract,
        ),
        RealSkill(
            "compare", "the larger or smaller of two numbers", "Which number is larger, 347 or 92? … → 347", _compare
        ),
        RealSkill(
            "cipher",
            "each letter shifted one place on, letters spaced",
            "Encode the letters c a t with the shift-by-one cipher … → d b u",
            _cipher,
        ),
        RealSkill(
            "list",
            "a semicolon-separated list rewritten as numbered lines",
            "Rewrite this list as a numbered list …: milk; eggs → 1. milk\\n2. eggs",
            _list,
        ),
    )
}


def real_skill(name: str) -> RealSkill:
    if name not in REAL_SKILLS:
        import difflib

        close = difflib.get_close_matches(name, list(REAL_SKILLS), n=1)
        raise InputError(
            f"no real SkillBench skill named {name!r}",
            hint=f"did you mean {close[0]!r}?" if close else f"one of: {', '.join(REAL_SKILLS)}",
        )
    return REAL_SKILLS[name]


def real_examples(name: str, split: str, n: int, tokenizer: Any, seed: int = 0) -> list[dict[str, str]]:
    """``n`` rows ``{"prompt", "target", "user"}`` of skill ``name`` from ``split``: distinct inputs, the prompt
    formatted with ``tokenizer``'s chat template, the target the exact answer (the model's end-of-turn token
    follows it in training)."""
    if split not in SPLITS:
        raise InputError(f"no split named {split!r}", hint=f"one of: {', '.join(SPLITS)}")
    s = real_skill(name)
    rng = random.Random(f"real|{name}|{split}|{seed}")
    seen: dict[str, tuple[str, str]] = {}
    for _ in range(200 * n + 1000):
        if len(seen) == n:
            break
        key, user, answer = s.sample(rng)
        if key not in seen and split_of(f"real/{name}", key) == split:
            seen[key] = (user, answer)
    if len(seen) < n:
        raise InputError(f"real/{name}/{split}: only {len(seen)} distinct inputs found, {n} asked")
    return [{"prompt": chat_prompt(tokenizer, u), "target": a, "user": u} for u, a in seen.values()]
