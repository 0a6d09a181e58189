"""The ``skillgraft library`` commands: add, list, show, rm, verify and search stored skills.

Each handler opens one ``Library``, calls one method and renders the result as a rich table or ``--json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from skillgraft.cli.main import app, console
from skillgraft.cli.render import warn

if TYPE_CHECKING:
    from skillgraft.library import Library, SkillRecord

library_app = typer.Typer(
    name="library",
    help="Store skills by name and version, and find them again.\n\n"
    "The library lives in $SKILLGRAFT_LIBRARY, else the user data directory; every command that takes a "
    ".skill file also takes a library reference: NAME (latest version) or NAME@VERSION.\n\n"
    "Example: skillgraft library add math.skill --tag math && skillgraft apply ./base math@1 -o ./merged",
    no_args_is_help=True,
)
app.add_typer(library_app, name="library")

LIBRARY_OPT = typer.Option(
    None,
    "--library",
    metavar="DIR",
    help="Library directory (overrides $SKILLGRAFT_LIBRARY and the default).",
)
JSON_OPT = typer.Option(False, "--json", help="Print JSON instead of a table.")


def _open(root: Path | None) -> Library:
    from skillgraft.library import Library

    return Library(root)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"  # pragma: no cover


def _record_dict(lib: Library, rec: SkillRecord) -> dict:
    return {**rec.to_dict(), "path": str(lib.blobs.path(rec.sha256))}


def _table(records: list[SkillRecord], title: str) -> None:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col in ("skill", "tags", "base", "size", "added", "description"):
        table.add_column(col, overflow="fold", justify="right" if col == "size" else "left")
    for r in records:
        desc = r.description if len(r.description) <= 60 else r.description[:59] + "…"
        table.add_row(r.ref, ", ".join(r.tags), r.base_name, _size(r.size), r.created[:10], desc)
    console.print(table)


def _print_records(lib: Library, records: list[SkillRecord], as_json: bool, title: str, empty: str) -> None:
    from skillgraft.cli.render import print_json

    if as_json:
        print_json([_record_dict(lib, r) for r in records])
    elif records:
        _table(records, title)
    else:
        console.print(empty)


@library_app.command("add")
def add(
    path: Path = typer.Argument(..., help="The .skill file to store."),
    name: str = typer.Option(None, "--name", help="Name to store it under (default: the pack's own name)."),
    version: int = typer.Option(
        None, "--version", min=1, help="Version number (default: the pack's, or the next free one)."
    ),
    tag: list[str] = typer.Option([], "--tag", "-t", help="Extra tag; repeat for several."),
    replace: bool = typer.Option(False, "--replace", help="Overwrite NAME@VERSION if it holds other content."),
    library: Path = LIBRARY_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Copy a .skill file into the library and index it as NAME@VERSION.

    Adding the same content under the same name again changes nothing.

    Example: skillgraft library add math.skill --name math --tag arithmetic
    """
    from skillgraft.cli.render import print_json

    with _open(library) as lib:
        before = {r.ref: r.sha256 for r in lib.list()}
        rec = lib.add(path, name=name, version=version, tags=tag, replace=replace)
        added = before.get(rec.ref) != rec.sha256
        if as_json:
            print_json({**_record_dict(lib, rec), "added": added})
        elif not added:
            console.print(f"already in the library: {rec.ref} (sha256 {rec.sha256[:12]})")
        else:
            console.print(f"added {rec.ref} (sha256 {rec.sha256[:12]}, {_size(rec.size)})")


@library_app.command("list")
def list_(
    base: Path = typer.Option(
        None, "--base", metavar="MODEL_DIR", help="Only skills made against this base model (same content)."
    ),
    library: Path = LIBRARY_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """List stored skills, every version.

    Example: skillgraft library list --base ./Qwen2.5-0.5B
    """
    with _open(library) as lib:
        records = lib.list(base)
        empty = "no skills for this base model" if base is not None else f"library {lib.root} is empty"
        _print_records(lib, records, as_json, f"skills in {lib.root}", empty)


@library_app.command("show")
def show(
    ref: str = typer.Argument(..., metavar="REF", help="NAME (latest version) or NAME@VERSION."),
    library: Path = LIBRARY_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Show one stored skill: its record and where its file is.

    Example: skillgraft library show math@2
    """
    from rich.table import Table

    from skillgraft.cli.render import print_json

    with _open(library) as lib:
        rec = lib.get(ref)
        d = _record_dict(lib, rec)
        if as_json:
            print_json(d)
            return
        table = Table(show_header=False, box=None)
        table.add_column(style="bold")
        table.add_column(overflow="fold")
        d["tags"] = ", ".join(rec.tags)
        d["size"] = f"{_size(rec.size)} ({rec.size} bytes)"
        for key, value in d.items():
            table.add_row(key, "" if value is None else str(value))
        console.print(table)


@library_app.command("rm")
def rm(
    ref: str = typer.Argument(..., metavar="REF", help="NAME (latest version) or NAME@VERSION."),
    library: Path = LIBRARY_OPT,
) -> None:
    """Remove one version of a skill; its file is deleted once no other entry uses it.

    Example: skillgraft library rm math@1
    """
    with _open(library) as lib:
        rec = lib.rm(ref)
    console.print(f"removed {rec.ref}")


@library_app.command("verify")
def verify(library: Path = LIBRARY_OPT, as_json: bool = JSON_OPT) -> None:
    """Re-hash every stored file; exit 1 when one is missing or modified, or the index is damaged.

    Example: skillgraft library verify --json
    """
    from rich.table import Table

    from skillgraft.cli.render import print_json, progress_bar

    with _open(library) as lib, progress_bar() as progress:
        problems = lib.verify(progress)
        count = len(lib.list())
    if as_json:
        print_json({"ok": not problems, "skills": count, "problems": [p.to_dict() for p in problems]})
    elif not problems:
        console.print(f"library OK: {count} skill version(s) checked")
    else:
        table = Table(title=f"{len(problems)} problem(s)", title_justify="left")
        for col in ("skill", "problem", "detail", "file"):
            table.add_column(col, overflow="fold")
        for p in problems:
            table.add_row(p.ref, p.kind, p.detail, str(p.path or ""))
        console.print(table)
        console.print("hint: remove broken entries with `skillgraft library rm REF`, then add the file again")
    if problems:
        raise typer.Exit(1)


@library_app.command("reindex")
def reindex(library: Path = LIBRARY_OPT, as_json: bool = JSON_OPT) -> None:
    """Rebuild a damaged index from the journal and the stored files (names, versions and tags come back).

    The damaged index is kept beside the new one as index.sqlite.damaged-<time>. Run it while no other
    skillgraft process uses the library.

    Example: skillgraft library verify || skillgraft library reindex
    """
    from skillgraft.cli.render import print_json

    lib = _open(library)
    if not lib.root.is_dir():
        from skillgraft.errors import NotFoundError

        raise NotFoundError(f"{lib.root}: no such library", hint="give the library directory with --library")
    report = lib.reindex()
    if as_json:
        print_json(report.to_dict())
        return
    console.print(
        f"index rebuilt: {len(report.from_journal)} version(s) from the journal, "
        f"{len(report.from_blobs)} from stored files' own manifests"
        + (f"; the damaged index is kept at {report.kept_old}" if report.kept_old else "")
    )
    for line in report.dropped:
        warn(f"dropped {line}")


@library_app.command("search")
def search(
    query: str = typer.Argument(..., help="Text to find in names, tags and descriptions (any case)."),
    library: Path = LIBRARY_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Find skills whose name, tags or description contain QUERY.

    Example: skillgraft library search arithmetic
    """
    with _open(library) as lib:
        records = lib.search(query)
        _print_records(lib, records, as_json, f"skills matching {query!r}", f"no skill matches {query!r}")
