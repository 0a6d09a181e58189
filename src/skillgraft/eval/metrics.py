"""Scoring functions: answer extraction, normalisation, exact match, multiple-choice accuracy and log-likelihood.

Pure functions over strings and numbers; no model here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_SPACES = re.compile(r"\s+")


def normalize_number(text: str) -> str:
    """``"$1,234.00."`` → ``"1234"``: drop ``$``, commas, a sentence-final period and a zero fraction."""
    s = text.strip().replace(",", "").replace("$", "").rstrip(".").strip()
    if re.fullmatch(r"-?\d+\.0+", s):
        s = s.split(".")[0]
    return s


def normalize(text: str, how: str) -> str:
    """``exact`` (unchanged), ``strip``, ``lower`` (strip, casefold, collapse whitespace) or ``number``."""
    if how == "exact":
        return text
    if how == "strip":
        return text.strip()
    if how == "lower":
        return _SPACES.sub(" ", text.strip().casefold())
    if how == "number":
        return normalize_number(text)
    raise ValueError(f"unknown normalisation {how!r}")


def extract_gsm8k(text: str) -> str:
    """The answer of a GSM8K solution: the number after ``####`` if there is one, else the last number."""
    head, sep, tail = text.partition("####")
    if sep:
        m = _NUMBER.search(tail)
        return m.group(0) if m else tail.strip()
    found = _NUMBER.findall(head)
    return found[-1] if found else ""


def extract(text: str, how: str) -> str:
    if how == "none":
        return text
    if how == "gsm8k":
        return extract_gsm8k(text)
    raise ValueError(f"unknown answer extractor {how!r}")


def exact_match(predictions: Sequence[str], targets: Sequence[str], normalize_how: str, extract_how: str) -> list[bool]:
    """Per-example correctness: ``normalize(extract(prediction)) == normalize(extract(target))``."""

    def key(t: str) -> str:
        return normalize(extract(t, extract_how), normalize_how)

    return [key(p) == key(t) for p, t in zip(predictions, targets, strict=True)]


def mc_choice(logliks: Sequence[float], tokens: Sequence[int] | None = None) -> int:
    """Index of the choice with the highest summed log-likelihood, or per-token mean when ``tokens`` is given.

    Ties go to the earliest choice.
    """
    if tokens is None:
        scores = list(logliks)
    else:
        scores = [ll / max(n, 1) for ll, n in zip(logliks, tokens, strict=True)]
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def mean(values: Sequence[float]) -> float | None:
    """Arithmetic mean, ``None`` for no values."""
    return math.fsum(values) / len(values) if values else None
