"""Shared CLI rendering: progress bars, JSON output and tables."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from skillgraft.cli.main import State, console, err_console
from skillgraft.progress import ProgressFn, no_progress


@contextlib.contextmanager
def progress_bar() -> Iterator[ProgressFn]:
    """A ``(phase, done, total)`` callback drawing one bar per phase on stderr (nothing with --quiet)."""
    if State.quiet:
        yield no_progress
        return
    bars: dict[str, TaskID] = {}
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=False,
    ) as prog:

        def update(phase: str, done: int, total: int) -> None:
            if phase not in bars:
                bars[phase] = prog.add_task(phase, total=total)
            prog.update(bars[phase], completed=done, total=total)

        yield update


def print_json(obj: object) -> None:
    console.file.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def info(msg: str) -> None:
    if not State.quiet:
        err_console.print(msg, soft_wrap=True)
