"""CLI command ``moe``: a thin layer over :mod:`skillgraft.merge.moe` (mergekit-moe configs → a Mixtral model)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from skillgraft.cli.main import app, console
from skillgraft.cli.render import print_json, progress_bar, warn


@app.command()
def moe(
    config: Path = typer.Argument(..., help="mergekit-moe YAML (base_model, experts, gate_mode, ...)."),
    out: Path = typer.Option(..., "-o", "--out", help="Output model directory (a MixtralForCausalLM checkpoint)."),
    seed: int = typer.Option(0, help="Seed of the random gate modes and noise_scale (mergekit's --random-seed)."),
    layout: str = typer.Option(
        "fused",
        help="fused: experts.gate_up_proj / down_proj, as mergekit-moe 0.1.5 writes (transformers >= 5); "
        "per_expert: block_sparse_moe.experts.N.w1/w2/w3 (transformers 4 and 5).",
    ),
    allow_identical_experts: bool = typer.Option(
        False, "--allow-identical-experts", help="Accept a config whose experts are all one model (to train later)."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the output tensors; read no weight."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
    as_json: bool = typer.Option(False, "--json", help="Print the result (or the plan) as JSON."),
) -> None:
    """Build a mixture-of-experts model from dense fine-tunes of one Llama/Mistral base (a mergekit-moe config).

    Attention, norms and embeddings come from base_model; each expert's MLPs become one expert per layer.
    Routers come from gate_mode: hidden, hidden_avg or cheap_embed (the experts' prompts), random or uniform_random.
    See docs/merging.md (mixture of experts).

    Example: skillgraft moe moe.yaml -o ./math-code-moe

    Example: skillgraft moe moe.yaml -o ./moe --layout per_expert --json
    """
    from skillgraft.merge.moe import MoeOptions, load_moe_config, plan_moe, run_moe

    cfg = load_moe_config(config)
    opts = MoeOptions(
        out=out,
        overwrite=overwrite,
        seed=seed,
        layout=layout,
        allow_identical_experts=allow_identical_experts,
        dry_run=dry_run,
    )
    plan = plan_moe(cfg, opts)
    try:
        if dry_run:
            for note in plan.warnings:
                warn(note)
            _show_plan(plan.describe(), as_json)
            return
        with progress_bar() as progress:
            res = run_moe(plan, progress)
    finally:
        plan.close()
    for note in res.warnings:
        warn(note)
    if as_json:
        print_json(res.to_dict())
    else:
        console.print(
            f"wrote {res.out} (MixtralForCausalLM, {res.layout} layout): {res.experts} experts, "
            f"{res.experts_per_token} per token, {res.layers} layers, {res.gate_mode} gates; {res.tensors} tensors, "
            f"{res.bytes:,} bytes in {res.seconds:.1f} s"
        )


def _show_plan(plan: dict, as_json: bool) -> None:
    if as_json:
        print_json(plan)
        return
    table = Table(title=f"MoE plan: {len(plan['experts'])} experts, {plan['gate_mode']} gates, {plan['layout']} layout")
    for col in ("tensor", "shape", "dtype", "from"):
        table.add_column(col)
    for row in plan["tensors"]:
        table.add_row(row["tensor"], "×".join(map(str, row["shape"])), row["dtype"], row["from"])
    console.print(table)
    console.print(
        f"expected output {plan['expected_output_bytes']:,} bytes. No weights were read, nothing was written "
        "(--dry-run)."
    )
