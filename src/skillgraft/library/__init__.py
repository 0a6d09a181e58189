"""The local skill library: store ``.skill`` files by name and version, find them, verify them.

Every command resolves its skill arguments with ``resolve_skill`` so ``name@3`` works wherever a path does.
"""

from skillgraft.library.record import Problem, SkillRecord, SkillRef, parse_ref
from skillgraft.library.store import Library, default_root, resolve_skill

__all__ = ["Library", "Problem", "SkillRecord", "SkillRef", "default_root", "parse_ref", "resolve_skill"]
