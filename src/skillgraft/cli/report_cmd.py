"""CLI command ``report``: render a ``skillgraft study`` results JSON as one HTML page and/or Markdown."""

from __future__ import annotations

from pathlib import Path

import typer

from skillgraft.cli.main import app, console
from skillgraft.cli.render import info


@app.command()
def report(
    results: Path = typer.Argument(..., help="Results JSON written by `skillgraft study`."),
    out: Path = typer.Option(None, "-o", "--out", help="Write a self-contained HTML page (figures embedded)."),
    markdown: str = typer.Option(None, "--markdown", help="Write the Markdown tables to this file ('-': stdout)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing output files."),
) -> None:
    """Render study results as one offline HTML page with figures, plus Markdown tables.

    Without -o (and without --markdown) the Markdown is printed to stdout.

    Example: skillgraft report study.json -o report.html --markdown report.md
    """
    from skillgraft.eval.report import load_results, render_html, render_markdown
    from skillgraft.io.writer import atomic_path, check_output

    md_path = None if markdown in (None, "-") else Path(markdown)
    for path in (out, md_path):
        if path is not None:
            check_output(path, overwrite)
    data = load_results(results)
    if out is not None:
        page = render_html(data)
        with atomic_path(out, overwrite) as tmp:
            tmp.write_text(page, encoding="utf-8")
        info(f"wrote {out} ({len(page) / 1024:.0f} KiB, {page.count('<img ')} figures)")
    if md_path is not None:
        with atomic_path(md_path, overwrite) as tmp:
            tmp.write_text(render_markdown(data), encoding="utf-8")
        info(f"wrote {md_path}")
    elif markdown == "-" or out is None:
        console.file.write(render_markdown(data))
