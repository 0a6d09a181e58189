"""Strict validation of a skill pack manifest (spec: docs/skillpack.md) before anything trusts its fields.

Every field the reader uses is checked for presence and JSON type, so a damaged or hand-edited manifest is a
``FormatError`` naming the field, never a Python traceback or a silently wrong delta. Fields the spec does not
name are ignored, as it requires.
"""

from __future__ import annotations

import math
import re
from typing import Any

from skillgraft.errors import FormatError, InputError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")
ENCODINGS = ("dense", "lowrank", "sparse")
_HINT = "the pack is damaged or was not written by skillgraft: extract or download it again"


def validate_name(name: str) -> str:
    """Skill names are file- and URL-safe: letters, digits, ``_ . + -``; no ``/`` and no ``..``."""
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        raise InputError(
            f"invalid skill name {name!r}",
            hint="use letters, digits and _ . + - (no '/', no '..', at most 128 characters)",
        )
    return name


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


_KINDS = {
    "string": lambda v: isinstance(v, str),
    "int": _is_int,
    "int >= 0": lambda v: _is_int(v) and v >= 0,
    "int >= 1": lambda v: _is_int(v) and v >= 1,
    "object": lambda v: isinstance(v, dict),
    "list": lambda v: isinstance(v, list),
    "list of strings": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "list of objects": lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v),
    "string or null": lambda v: v is None or isinstance(v, str),
    "finite number or null": lambda v: v is None or _is_number(v),
    "list of ints >= 0": lambda v: isinstance(v, list) and all(_is_int(x) and x >= 0 for x in v),
    'null or "int8"': lambda v: v is None or v == "int8",
}


def _need(d: dict, key: str, kind: str, where: str, required: bool = True) -> None:
    if key not in d:
        if required:
            raise FormatError(f"{where}: skill manifest lacks the required field {key!r}", hint=_HINT)
        return
    if not _KINDS[kind](d[key]):
        raise FormatError(
            f"{where}: skill manifest field {key!r} must be {kind}, not {type(d[key]).__name__} {d[key]!r:.60}",
            hint=_HINT,
        )


_TOP = (
    ("name", "string", True),
    ("version", "int >= 1", True),
    ("base", "object", True),
    ("tensors", "object", True),
    ("description", "string", False),
    ("tags", "list of strings", False),
    ("provenance", "object", False),
    ("evaluations", "list of objects", False),
    ("source", "object", False),
)
_BASE = (
    ("name", "string", True),
    ("fingerprint", "string or null", False),
    ("structure", "string or null", False),
    ("tokenizer", "string or null", False),
)
_ENTRY = (
    ("shape", "list of ints >= 0", True),
    ("dtype", "string", True),
    ("bytes", "int >= 0", True),
    ("rel_error", "finite number or null", True),
    ("value_dtype", "string", True),
)
_BY_ENCODING = {
    "dense": (),
    "lowrank": (("rank", "int >= 1", True), ("quant", 'null or "int8"', True)),
    "sparse": (("nnz", "int >= 0", True),),
}


def check_manifest(d: dict, where: str) -> dict:
    """Validate a parsed manifest object (its ``format`` and ``format_version`` already checked); returns it."""
    for key, kind, required in _TOP:
        _need(d, key, kind, where, required)
    try:
        validate_name(d["name"])
    except InputError as e:
        raise FormatError(f"{where}: skill manifest has an {e.message}", hint=e.hint) from e
    for key, kind, required in _BASE:
        _need(d["base"], key, kind, f"{where} (base)", required)
    for name, entry in d["tensors"].items():
        at = f"{where} (tensor {name!r})"
        if not name:
            raise FormatError(f"{where}: skill manifest has a tensor with an empty name", hint=_HINT)
        if not isinstance(entry, dict):
            raise FormatError(f"{at}: manifest entry must be an object, not {type(entry).__name__}", hint=_HINT)
        enc = entry.get("encoding")
        if enc not in ENCODINGS:
            raise FormatError(
                f"{at}: unknown encoding {enc!r:.40} (expected one of {', '.join(ENCODINGS)})", hint=_HINT
            )
        for key, kind, required in _ENTRY + _BY_ENCODING[enc]:
            _need(entry, key, kind, at, required)
        _need(entry, "layout", "string", at, required=False)
        if enc == "lowrank" and not entry["shape"]:
            raise FormatError(f"{at}: a lowrank entry needs a shape of at least one dimension", hint=_HINT)
    return d
