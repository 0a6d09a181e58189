"""Progress reporting: the API emits ``(phase, done, total)`` events; the CLI renders them as rich bars."""

from __future__ import annotations

from collections.abc import Callable

ProgressFn = Callable[[str, int, int], None]


def no_progress(phase: str, done: int, total: int) -> None:
    """The default sink: ignore events."""
