"""Shared CLI rendering: progress bars, JSON output and tables."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from skillgraft.cli.main import State, console, err_console
from skillgraft.progress import ProgressFn, no_progress


class _Count(ProgressColumn):
    """n/N and items/s for counted phases; bytes done and throughput (GB/s) for byte phases."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed or 0.0
        if task.fields.get("unit"):
            return Text(f"{task.completed / 1e9:.2f}/{(task.total or 0) / 1e9:.2f} GB  {speed / 1e9:.2f} GB/s")
        rate = f"  {speed:.1f}/s" if speed else ""
        return Text(f"{int(task.completed)}/{int(task.total or 0)}{rate}")


@contextlib.contextmanager
def progress_bar() -> Iterator[ProgressFn]:
    """A ``(phase, done, total)`` callback drawing one bar per phase on stderr (nothing with --quiet)."""
    if State.quiet:
        yield no_progress
        return
    bars: dict[str, TaskID] = {}
    with Progress(
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        _Count(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=False,
    ) as prog:

        def update(phase: str, done: int, total: int) -> None:
            if phase not in bars:
                bars[phase] = prog.add_task(phase.removesuffix(" [bytes]"), total=total, unit=phase.endswith("[bytes]"))
            prog.update(bars[phase], completed=done, total=total)

        yield update


def print_json(obj: object) -> None:
    console.file.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def warn(msg: str) -> None:
    """``warning: …`` on stderr, also with --quiet: something was not checked and the user should know."""
    err_console.print(Text.assemble(("warning:", "yellow"), " ", msg), soft_wrap=True)


def info(msg: str) -> None:
    if not State.quiet:
        err_console.print(msg, soft_wrap=True)
