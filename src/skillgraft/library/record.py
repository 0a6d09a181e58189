"""Value objects of the skill library: one stored skill version, one verification problem, one reference.

They do no I/O; ``parse_ref`` turns ``name`` / ``name@3`` / ``name@latest`` into a checked ``SkillRef``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from skillgraft.errors import InputError


@dataclass(frozen=True)
class SkillRecord:
    """One row of the library index: a skill name at one version, stored as the blob ``sha256``."""

    name: str
    version: int
    sha256: str
    size: int
    tags: tuple[str, ...]
    description: str
    base_name: str
    base_fingerprint: str | None
    base_structure: str | None
    created: str  # ISO 8601, UTC

    @property
    def ref(self) -> str:
        """The exact reference of this record, ``name@version``."""
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict:
        """A JSON-ready dict (tags as a list, plus ``ref``)."""
        return {
            "ref": self.ref,
            "name": self.name,
            "version": self.version,
            "sha256": self.sha256,
            "size": self.size,
            "tags": list(self.tags),
            "description": self.description,
            "base_name": self.base_name,
            "base_fingerprint": self.base_fingerprint,
            "base_structure": self.base_structure,
            "created": self.created,
        }


@dataclass(frozen=True)
class Problem:
    """Something ``Library.verify`` found wrong.

    ``kind`` is ``missing`` (a row's blob is gone), ``modified`` (a blob's bytes no longer hash to its name)
    or ``index`` (SQLite's integrity check failed; ``ref`` and ``sha256`` are empty then).
    """

    kind: str
    ref: str
    sha256: str
    path: Path | None
    detail: str

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "ref": self.ref,
            "sha256": self.sha256,
            "path": str(self.path) if self.path else None,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class SkillRef:
    """A parsed library reference; ``version`` None means the latest version."""

    name: str
    version: int | None

    def __str__(self) -> str:
        return self.name if self.version is None else f"{self.name}@{self.version}"


def check_name(name: str) -> str:
    """Refuse names that could escape a path or cannot be skill names ('/', '..', empty).

    Lookups need only this; ``Library.add`` applies the pack's full ``validate_name`` rule.
    """
    if not name or "/" in name or "\\" in name or ".." in name:
        raise InputError(
            f"invalid skill name {name!r}: '/' and '..' are not allowed",
            hint="use letters, digits and _ . + - only",
        )
    return name


def check_version(version: int) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise InputError(f"invalid skill version {version!r}", hint="versions are whole numbers from 1")
    return version


def parse_ref(ref: str) -> SkillRef:
    """Parse ``name``, ``name@3`` or ``name@latest``; raises InputError for a malformed reference."""
    ref = ref.strip()
    name, sep, ver = ref.partition("@")
    check_name(name)
    if not sep or ver == "latest":
        return SkillRef(name, None)
    if not ver.isdigit():
        raise InputError(
            f"invalid skill reference {ref!r}: version {ver!r} is not a number",
            hint="write name@3 for version 3, or just name for the latest",
        )
    return SkillRef(name, check_version(int(ver)))
