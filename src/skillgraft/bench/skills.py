"""SkillBench's string skills: a registry of seeded, deterministic tasks with disjoint splits by construction.

A prompt is ``TAG + " " + input + ">"`` and the target is the output; a composition ``f∘g`` is prompted with
both tags, ``f.tag + g.tag + " " + x + ">"``, and its target is ``f(g(x))``.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass

from skillgraft.errors import InputError

LOWER = "abcdefgh"
UPPER = LOWER.upper()
DIGITS = "0123456789"
SPLITS = ("train", "val", "test")
_BUCKETS = {"train": range(0, 8), "val": range(8, 9), "test": range(9, 10)}  # of 10 hash buckets


@dataclass(frozen=True)
class Skill:
    """One task: ``fn`` maps an input string to the output; ``sample`` draws a candidate input from ``rng``.

    Inputs with ``fn(x) == x`` are never used (unless ``drop_fixed_points`` is off, as for the generic copy
    task), so a model that copies its input scores zero on every skill.
    """

    name: str
    tag: str
    description: str
    fn: Callable[[str], str]
    sample: Callable[[random.Random], str]
    drop_fixed_points: bool = True

    def prompt(self, x: str) -> str:
        return f"{self.tag} {x}>"


def _word(rng: random.Random, lo: int = 3, hi: int = 6, alphabet: str = LOWER) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def _caesar(s: str, k: int = 3) -> str:
    return "".join(LOWER[(LOWER.index(c) + k) % len(LOWER)] for c in s)


def _dedup(s: str) -> str:
    return "".join(dict.fromkeys(s))


def _count_sample(rng: random.Random) -> str:
    return "".join("a" if rng.random() < 0.3 else rng.choice(LOWER[1:]) for _ in range(rng.randint(3, 6)))


def _rotate(s: str) -> str:
    return s[1:] + s[:1]


def _interleave(s: str) -> str:
    a, b = s.split(",")
    return "".join(x + y for x, y in zip(a, b))


def _pair(rng: random.Random) -> str:
    n = rng.randint(2, 4)
    return f"{_word(rng, n, n)},{_word(rng, n, n)}"


SKILLS: dict[str, Skill] = {
    s.name: s
    for s in (
        Skill("reverse", "[rev]", "the input reversed", lambda s: s[::-1], _word),
        Skill("sort", "[sort]", "the letters sorted (by code point)", lambda s: "".join(sorted(s)), _word),
        Skill("caesar", "[rot]", "each letter moved 3 places on in 'abcdefgh', wrapping", _caesar, _word),
        Skill(
            "swapcase",
            "[swap]",
            "upper case becomes lower case and vice versa",
            str.swapcase,
            lambda r: _word(r, alphabet=LOWER + UPPER),
        ),
        Skill("dedup", "[dedup]", "repeated letters dropped, first occurrences kept", _dedup, _word),
        Skill("count", "[count]", "how many times 'a' occurs, as a digit", lambda s: str(s.count("a")), _count_sample),
        Skill("rotate", "[rotl]", "the input rotated left by one (first letter moved to the end)", _rotate, _word),
        Skill("interleave", "[mix]", "two equal-length words zipped letter by letter", _interleave, _pair),
    )
}

# Generic tasks of the base model's pretraining mixture: they teach the prompt format and the characters, and
# are none of the skills above.
GENERIC: dict[str, Skill] = {
    s.name: s
    for s in (
        Skill("copy", "[copy]", "the input unchanged", lambda s: s, lambda r: _any_input(r), False),
        Skill("length", "[len]", "the input's length, as a digit", lambda s: str(len(s)), lambda r: _any_input(r)),
        Skill("first", "[first]", "the input's first character", lambda s: s[0], lambda r: _any_input(r)),
    )
}


def _any_input(rng: random.Random) -> str:
    return rng.choice([s.sample for s in SKILLS.values()])(rng)


def skill(name: str) -> Skill:
    """The registered skill (or generic task) called ``name``."""
    if name in SKILLS:
        return SKILLS[name]
    if name in GENERIC:
        return GENERIC[name]
    import difflib

    close = difflib.get_close_matches(name, [*SKILLS, *GENERIC], n=1)
    raise InputError(
        f"no skill named {name!r}",
        hint=f"did you mean {close[0]!r}?" if close else f"one of: {', '.join(SKILLS)}",
    )


def all_tags() -> list[str]:
    return [s.tag for s in (*SKILLS.values(), *GENERIC.values())]


def split_of(key: str, x: str) -> str:
    """Which split input ``x`` of task ``key`` belongs to: a fixed hash, so splits never overlap."""
    bucket = int.from_bytes(hashlib.sha256(f"{key}\0{x}".encode()).digest()[:4], "big") % 10
    return next(s for s, r in _BUCKETS.items() if bucket in r)


def _draw(key: str, sample: Callable[[random.Random], str], keep: Callable[[str], bool], split: str, n: int, seed: int):
    if split not in SPLITS:
        raise InputError(f"no split named {split!r}", hint=f"one of: {', '.join(SPLITS)}")
    rng = random.Random(f"{key}|{split}|{seed}")
    seen: dict[str, None] = {}
    for _ in range(200 * n + 1000):
        if len(seen) == n:
            break
        x = sample(rng)
        if x not in seen and split_of(key, x) == split and keep(x):
            seen[x] = None
    if len(seen) < n:
        raise InputError(f"{key}/{split}: only {len(seen)} distinct inputs found, {n} asked")
    return list(seen)


def examples(name: str, split: str, n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` distinct ``{"prompt", "target"}`` rows of skill ``name`` from ``split`` (train, val or test)."""
    s = skill(name)
    xs = _draw(s.name, s.sample, lambda x: not s.drop_fixed_points or s.fn(x) != x, split, n, seed)
    return [{"prompt": s.prompt(x), "target": s.fn(x)} for x in xs]


def composition_name(f: str, g: str) -> str:
    return f"{f}-{g}"


def composition_examples(f: str, g: str, n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` rows of ``f(g(x))`` for inputs from ``g``'s test split; rows where doing only ``f`` or only ``g``
    (or nothing) would be right are left out, so only the composition scores."""
    sf, sg = skill(f), skill(g)

    def keep(x: str) -> bool:
        try:
            y = sf.fn(sg.fn(x))
            alone = sf.fn(x)
        except (ValueError, IndexError):
            return False
        return y not in (x, sg.fn(x), alone)

    xs = _draw(sg.name, sg.sample, keep, "test", n, seed + 1)
    return [{"prompt": f"{sf.tag}{sg.tag} {x}>", "target": sf.fn(sg.fn(x))} for x in xs]
