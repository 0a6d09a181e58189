"""The ``import-lora`` and ``export-lora`` commands: PEFT LoRA adapters in and out of skill packs.

Thin wrappers over :mod:`skillgraft.skill.peft`; heavy imports happen inside the handlers.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import typer

from skillgraft.cli.main import app, console
from skillgraft.cli.render import info, print_json, warn


def _command(*parts: object, flags: dict[str, object]) -> str:
    words = ["skillgraft", *map(str, parts)]
    for flag, value in flags.items():
        if value is True:
            words.append(flag)
        elif value not in (None, False):
            words += [flag, str(value)]
    return shlex.join(words)


@app.command(
    "import-lora",
    help="Import a PEFT LoRA adapter as a skill pack, exactly (factors kept as stored, scale folded in).\n\n"
    "Example: skillgraft import-lora ./math-adapter -o math.skill --base ./base-model",
)
def import_lora_cmd(
    adapter_dir: Path = typer.Argument(..., help="PEFT adapter directory (adapter_config.json + weights)."),
    out: Path = typer.Option(..., "-o", "--out", help="Skill pack to write (NAME.skill)."),
    base: Path | None = typer.Option(None, "--base", help="Base model directory: check shapes, record fingerprint."),
    name: str | None = typer.Option(None, "--name", help="Skill name (default: the output file's stem)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Accept adapter_model.bin (pickle; trusted only)."),
    force: bool = typer.Option(
        False, "--force", help="Import even if the adapter's tokenizer files differ from BASE's."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    from skillgraft.skill.peft import import_lora

    command = _command(
        "import-lora",
        adapter_dir,
        "-o",
        out,
        flags={
            "--base": base,
            "--name": name,
            "--overwrite": overwrite,
            "--allow-pickle": allow_pickle,
            "--force": force,
        },
    )
    manifest = import_lora(
        adapter_dir,
        out,
        name=name,
        base=base,
        overwrite=overwrite,
        allow_pickle=allow_pickle,
        command=command,
        force=force,
    )
    ranks = sorted({int(e["rank"]) for e in manifest.tensors.values()})
    if as_json:
        print_json(
            {
                "path": str(out),
                "name": manifest.name,
                "tensors": len(manifest.tensors),
                "ranks": ranks,
                "base": manifest.base.name,
                "base_fingerprint": manifest.base.fingerprint,
            }
        )
        return
    if manifest.base.fingerprint is None:
        warn(
            "no --base given: the pack records no base fingerprint, so applying it checks only tensor names and shapes"
        )
    console.print(
        f"wrote {out}: {len(manifest.tensors)} low-rank tensors (rank {', '.join(map(str, ranks))}), exact",
        soft_wrap=True,
    )


def _resolve(ref: str, library_dir: Path | None) -> Path:
    """An existing path as is, else a library reference (``name`` or ``name@3``)."""
    try:
        from skillgraft.library import Library, resolve_skill
    except ImportError:  # library package not installed in this build
        return Path(ref)
    return resolve_skill(ref, Library(library_dir))


@app.command(
    "export-lora",
    help="Export a skill pack as a PEFT LoRA adapter (dense deltas by truncated SVD, error reported).\n\n"
    "Example: skillgraft export-lora math.skill -o ./math-adapter --rank 16",
)
def export_lora_cmd(
    skill: str = typer.Argument(..., help="Skill pack file or library reference (NAME or NAME@VERSION)."),
    out: Path = typer.Option(..., "-o", "--out", help="Adapter directory to write."),
    rank: int | None = typer.Option(
        None, "--rank", min=1, help="Maximum rank (default: low-rank entries as stored, 16 for dense ones)."
    ),
    drop_unrepresentable: bool = typer.Option(
        False, "--drop-unrepresentable", help="Leave out 1-D tensors (norms, biases) instead of refusing."
    ),
    library_dir: Path | None = typer.Option(
        None, "--library", envvar="SKILLGRAFT_LIBRARY", help="Skill library directory (for references)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    from skillgraft.skill.peft import export_lora

    report = export_lora(
        _resolve(skill, library_dir),
        out,
        rank=rank,
        drop_unrepresentable=drop_unrepresentable,
        overwrite=overwrite,
    )
    if as_json:
        print_json(report.to_dict())
        return
    for name in report.dropped:
        info(f"dropped {name} (not representable as a LoRA)")
    ranks = sorted({m.rank for m in report.modules})
    console.print(
        f"wrote {out}: {len(report.modules)} modules (rank {', '.join(map(str, ranks))}), "
        f"max relative error {report.max_rel_error:.3g}",
        soft_wrap=True,
    )
