"""CLI command ``merge``: a thin layer over :func:`skillgraft.merge.engine.merge`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from skillgraft.cli.main import app, console
from skillgraft.cli.render import print_json, progress_bar, warn
from skillgraft.cli.skill_cmd import LIBRARY_OPT, _command_line


@app.command()
def merge(
    config: Path = typer.Argument(..., help="Merge config (skillgraft or mergekit YAML)."),
    out: Path = typer.Option(..., "-o", "--out", help="Output: model dir, .skill file, or adapter dir."),
    out_format: str = typer.Option("hf", "--out-format", help="hf (full checkpoint), skill, or lora."),
    rank: int = typer.Option(None, help="Rank of the LoRA adapter for --out-format lora."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the plan without reading weights."),
    seed: int = typer.Option(None, help="Seed for randomized methods (overrides the config's)."),
    force: bool = typer.Option(False, "--force", help="Merge skills made for another base anyway."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pytorch_model.bin inputs."),
    library: Path = LIBRARY_OPT,
    compute_dtype: str = typer.Option(
        None,
        "--compute-dtype",
        help="Round inputs to and compute in float32, bfloat16 or float16 (default: the config's; a mergekit "
        "YAML computes in its dtype, as mergekit does).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result (or the plan) as JSON."),
) -> None:
    """Merge skills, LoRA adapters and fine-tuned checkpoints of one base into one model.

    Example: skillgraft merge ties.yaml -o ./merged  (see docs/merging.md for the config schema)

    Example: skillgraft merge mergekit-ties.yaml -o ./merged --compute-dtype float32  (full-precision arithmetic)
    """
    from skillgraft.merge.config import check_dtype, load_config
    from skillgraft.merge.engine import MergeOptions, plan_merge, run_merge

    compute = check_dtype(compute_dtype, "--compute-dtype")
    cfg = load_config(config)
    opts = MergeOptions(
        out=out,
        out_format=out_format,
        rank=rank,
        overwrite=overwrite,
        force=force,
        seed=seed,
        library=library,
        allow_pickle=allow_pickle,
        dry_run=dry_run,
        compute_dtype=compute,
    )
    plan = plan_merge(cfg, opts)
    for note in plan.warnings:
        warn(note)
    try:
        if dry_run:
            _show_plan(plan.describe(), as_json)
            return
        with progress_bar() as progress:
            res = run_merge(plan, opts, progress, _command_line())
    finally:
        plan.close()
    if as_json:
        print_json(res.to_dict())
    else:
        console.print(
            f"wrote {res.out} ({res.out_format}): {res.method} merged {res.merged} of {res.tensors} "
            f"tensors in {res.seconds:.1f} s ({res.bytes_read / res.seconds / 1e9:.2f} GB/s read)"
        )
        if res.out_format == "lora":
            d = res.details
            dropped = f"; dropped (no LoRA holds them): {len(d['dropped'])} tensors" if d["dropped"] else ""
            console.print(
                f"LoRA rank {d['rank']} on {d['modules']} modules: largest relative error of the truncated SVD "
                f"{d['max_rel_error']:.3g} (‖ΔW − BA‖ / ‖ΔW‖){dropped}"
            )


def _show_plan(plan: dict, as_json: bool) -> None:
    if as_json:
        print_json(plan)
        return
    table = Table(title=f"merge plan: {plan['method']} {plan['parameters']}")
    for col in ("tensor", "shape", "out dtype", "inputs"):
        table.add_column(col)
    for row in plan["tensors"]:
        table.add_row(
            row["tensor"],
            "×".join(map(str, row["shape"])),
            row["out_dtype"],
            ", ".join(row["inputs"]) or "(base copied)",
        )
    console.print(table)
    console.print(
        f"{plan['merged_tensors']} of {plan['total_tensors']} tensors merged; expected output "
        f"{plan['expected_output_bytes']:,} bytes. No weights were read, nothing was written (--dry-run)."
    )
    if plan["fingerprints_not_checked"]:
        console.print(
            f"Not checked: that {', '.join(plan['fingerprints_not_checked'])} were made for this base (the fingerprint "
            "hashes every base weight); the merge checks it before writing anything."
        )
