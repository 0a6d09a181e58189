"""CLI commands over skill packs: ``extract``, ``apply``, ``inspect`` and ``demo``."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from skillgraft.cli.main import app, console
from skillgraft.cli.render import info, print_json, progress_bar, warn
from skillgraft.errors import InputError

LIBRARY_OPT = typer.Option(None, "--library", envvar="SKILLGRAFT_LIBRARY", help="Skill library directory.")


def parse_fraction(text: str) -> float:
    """'2%' → 0.02, '0.02' → 0.02."""
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise InputError(f"cannot read {text!r} as a fraction", hint="write e.g. 2% or 0.02") from None


def _command_line() -> str:
    return "skillgraft " + " ".join(shlex.quote(a) for a in sys.argv[1:])


@app.command()
def extract(
    base: Path = typer.Argument(..., help="Base model directory (config.json + safetensors)."),
    tuned: Path = typer.Argument(..., help="Fine-tuned model directory of the same architecture."),
    out: Path = typer.Option(..., "-o", "--out", help="Output skill pack (NAME.skill)."),
    budget: str = typer.Option("2%", help="Pack size as a fraction of the dense delta's bytes (e.g. 2% or 0.02)."),
    rank: int = typer.Option(None, help="Fixed rank for every matrix instead of a budget."),
    density: float = typer.Option(None, help="Fixed fraction of entries kept per tensor (sparse)."),
    dense: bool = typer.Option(False, "--dense", help="Store exact dense deltas (reproduces TUNED bit for bit)."),
    int8: bool = typer.Option(False, "--int8", help="Quantise low-rank factors to int8 (per-row scales)."),
    name: str = typer.Option(None, help="Skill name (default: the output file's stem)."),
    version: int = typer.Option(1, help="Skill version number."),
    description: str = typer.Option("", help="Free-text description stored in the manifest."),
    tag: list[str] = typer.Option([], "--tag", help="Tag to store (repeatable)."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pytorch_model.bin (weights_only)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
    seed: int = typer.Option(0, help="Seed of the randomized SVD."),
    as_json: bool = typer.Option(False, "--json", help="Print the full per-tensor table as JSON."),
) -> None:
    """Extract the skill TUNED − BASE into a compact skill pack.

    Example: skillgraft extract ./llama-base ./llama-math -o math.skill --budget 2%
    """
    from skillgraft.skill.extract import ExtractSpec
    from skillgraft.skill.extract import extract as run

    spec = ExtractSpec(
        base=base,
        tuned=tuned,
        out=out,
        budget=parse_fraction(budget),
        rank=rank,
        density=density,
        dense=dense,
        int8=int8,
        name=name,
        version=version,
        description=description,
        tags=tuple(tag),
        allow_pickle=allow_pickle,
        overwrite=overwrite,
        seed=seed,
        command=_command_line(),
    )
    with progress_bar() as progress:
        res = run(spec, progress)
    kinds = res.by_kind()
    if as_json:
        print_json(
            {
                "path": str(res.path),
                "file_bytes": res.file_bytes,
                "dense_delta_bytes": res.dense_delta_bytes,
                "budget_bytes": res.budget_bytes,
                "by_kind": kinds,
                "omitted": list(res.omitted),
                "tensors": [{**t.__dict__, "retained": t.retained} for t in res.tensors],
            }
        )
        return
    table = Table(title=f"{res.manifest.name}@{res.manifest.version} → {res.path}")
    for col in ("module", "tensors", "bytes", "energy retained"):
        table.add_column(col, justify="right" if col != "module" else "left")
    for kind, d in sorted(kinds.items()):
        table.add_row(kind, str(d["tensors"]), f"{d['bytes']:,}", f"{100 * d['retained']:.2f}%")
    console.print(table)
    ratio = res.file_bytes / res.dense_delta_bytes if res.dense_delta_bytes else 0.0
    console.print(
        f"pack {res.file_bytes:,} bytes = {100 * ratio:.2f}% of the dense delta "
        f"({res.dense_delta_bytes:,} bytes); {len(res.omitted)} changed tensor(s) omitted"
    )


@app.command()
def apply(
    base: Path = typer.Argument(..., help="Base model directory."),
    skills: list[str] = typer.Argument(..., help="SKILL[:WEIGHT] ... (a .skill path or a library reference)."),
    out: Path = typer.Option(..., "-o", "--out", help="Output model directory."),
    force: bool = typer.Option(False, "--force", help="Apply even if a skill was made for another base."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output directory."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow a pytorch_model.bin base."),
    library: Path = LIBRARY_OPT,
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Write BASE + Σ weight·skill as a full Hugging Face checkpoint. A negative weight removes a skill.

    Example: skillgraft apply ./llama-base math.skill code@2:0.5 -o ./llama-math-code
    """
    from skillgraft.skill.apply import WeightedSkill, apply_to_checkpoint

    parsed = [WeightedSkill.parse(s) for s in skills]
    with progress_bar() as progress:
        res = apply_to_checkpoint(
            base,
            [(s.ref, s.weight) for s in parsed],
            out,
            force=force,
            overwrite=overwrite,
            allow_pickle=allow_pickle,
            library=library,
            progress=progress,
        )
    for note in res["warnings"]:
        warn(note)
    if as_json:
        print_json(res)
    else:
        names = ", ".join(f"{s['name']}@{s['version']}×{s['weight']:g}" for s in res["skills"])
        console.print(f"wrote {res['out']}: {res['changed']} of {res['tensors']} tensors changed by {names}")


@app.command()
def inspect(
    skill: str = typer.Argument(..., help="A .skill path or a library reference."),
    library: Path = LIBRARY_OPT,
    as_json: bool = typer.Option(False, "--json", help="Print the whole manifest as JSON."),
) -> None:
    """Show a skill pack's manifest: identity, base, and per-tensor encodings and errors.

    Example: skillgraft inspect math.skill --json
    """
    import json

    from skillgraft.skill.apply import open_skill

    with open_skill(skill, library) as pack:
        m = pack.manifest
        if as_json:
            print_json(json.loads(m.to_json()))
            return
        console.print(Text.assemble((f"{m.name}@{m.version}", "bold"), " ", m.description))
        console.print(f"base: {m.base.name}  fingerprint {m.base.fingerprint}")
        console.print(f"tags: {', '.join(m.tags) or '-'}  created {m.provenance.get('created', '?')}")
        table = Table()
        for col in ("tensor", "encoding", "rank/nnz", "bytes", "rel. error"):
            table.add_column(col)
        for name, e in m.tensors.items():
            level = e.get("rank") or e.get("nnz") or ""
            err = e.get("rel_error")
            table.add_row(name, e["encoding"], str(level), f"{e['bytes']:,}", "?" if err is None else f"{err:.2e}")
        console.print(table)
        info(f"{len(m.tensors)} tensors, {m.total_bytes:,} bytes of tensor data")


@app.command()
def demo(
    profile: str = typer.Option(
        "real-quick",
        help="SkillBench profile: real-quick (SmolLM2-135M, the default), real, quick or full (tiny models).",
    ),
    out: Path = typer.Option(Path("skillgraft-demo"), "-o", "--out", help="Where results.json and report.html go."),
    budget: str = typer.Option("25%", help="Skill pack budget per expert (a fraction of the dense delta, or 'dense')."),
    cache: Path = typer.Option(None, "--cache", envvar="SKILLGRAFT_CACHE", help="SkillBench cache directory."),
    learn: bool = typer.Option(
        False,
        "--learn",
        help="Also learn the merge (compose --learn blockwise, 40 steps; ~3-5 min more on real-quick).",
    ),
) -> None:
    """Build (or reuse) SkillBench, extract a skill per expert into a library, merge with every method, rank.

    Example: skillgraft demo --profile quick -o ./skillgraft-demo  (--learn: add the learned merge)
    """
    from skillgraft.demo import run_demo

    frac = None if budget == "dense" else parse_fraction(budget)
    with progress_bar() as progress:
        ok = run_demo(out, profile, frac, cache, say=console.print, progress=progress, compose_steps=40 if learn else 0)
    raise typer.Exit(0 if ok else 1)
