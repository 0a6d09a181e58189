"""The ``skillgraft export`` commands: hand a library's skills to another serving engine (``export vllm``).

Thin wrappers over :mod:`skillgraft.route.vllm`; heavy imports happen inside the handlers.
"""

from __future__ import annotations

from pathlib import Path

import typer

from skillgraft.cli.main import app, console
from skillgraft.cli.render import info, print_json, warn
from skillgraft.cli.skill_cmd import LIBRARY_OPT

export_app = typer.Typer(
    name="export",
    help="Write a library's skills in the form another serving engine loads.\n\n"
    "Example: skillgraft export vllm --library ./lib --base ./base -o ./vllm-skills && ./vllm-skills/serve.sh",
    no_args_is_help=True,
)
app.add_typer(export_app, name="export")


@export_app.command("vllm")
def vllm_cmd(
    library: Path = LIBRARY_OPT,
    out: Path = typer.Option(..., "-o", "--out", help="Directory to write (adapters, serve.sh, skills.json)."),
    base: Path | None = typer.Option(
        None, "--base", help="Base model directory: export only skills made for it; written into serve.sh."
    ),
    skill: list[str] = typer.Option(
        [], "--skill", "-s", help="Export only this skill, NAME or NAME@VERSION (repeatable)."
    ),
    max_loras: int | None = typer.Option(
        None, "--max-loras", min=1, help="vLLM's --max-loras (adapters per batch; default: all exported, at most 8)."
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing non-empty output directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Export every LoRA-form skill (latest version of each name) as PEFT adapters plus a `vllm serve` command.

    Writes OUT/<name>/ (adapter_config.json + adapter_model.safetensors) per skill, OUT/serve.sh (vLLM's
    multi-LoRA server over all of them), OUT/skills.json and OUT/README.md. Dense or sparse skills are skipped
    with the reason. Clients then choose a skill with "model": "<name>".

    Example: skillgraft export vllm --library ./lib --base ./base -o ./vllm-skills && ./vllm-skills/serve.sh
    """
    from skillgraft.route.vllm import export_vllm

    result = export_vllm(library, out, base=base, skills=skill or None, max_loras=max_loras, force=force)
    if as_json:
        print_json(result.to_dict())
        return
    for s in result.skipped:
        info(f"skipped {s.ref}: {s.reason}")
    if result.base is None:
        warn("no --base given: skills were not checked against a base; set BASE_MODEL when running serve.sh")
    n = len(result.adapters)
    names = ", ".join(a.name for a in result.adapters)
    console.print(
        f"wrote {out}: {n} LoRA adapter{'' if n == 1 else 's'} ({names}), --max-lora-rank {result.max_lora_rank}",
        soft_wrap=True,
    )
    console.print(f"serve with: {out / 'serve.sh'}", soft_wrap=True)
    console.print(result.command_line, soft_wrap=True)
