"""CLI command ``evolve``: a thin layer over :func:`skillgraft.compose.evolve.run_evolve`."""

from __future__ import annotations

from pathlib import Path

import typer

from skillgraft.cli.main import app, console
from skillgraft.cli.render import info, print_json, progress_bar
from skillgraft.cli.skill_cmd import _command_line


@app.command()
def evolve(
    config: Path = typer.Argument(..., help="Evolve config YAML (see docs/evolve.md)."),
    out_dir: Path = typer.Option(..., "--out-dir", help="Writes best.yaml, evolve.json and checkpoint.json here."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run checkpointed in --out-dir."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start again over a run already in --out-dir."),
    workers: int = typer.Option(
        None, "--workers", help="Candidates scored at once: 1 in this process (default), N > 1 on N Ray workers."
    ),
    ray_address: str = typer.Option(
        None, "--ray-address", help="Score on this Ray cluster (HEAD:6379) instead of a local instance."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Search merge recipes (method, per-layer-group weights, density, inputs) with CMA-ES, scoring each
    candidate's greedy exact match on your tasks; the best is written as a merge YAML.

    Example: skillgraft evolve search.yaml --out-dir runs/s1 --workers 2 && skillgraft merge runs/s1/best.yaml
    -o ./merged
    """
    from skillgraft.compose.evolve import EvolveOptions, run_evolve
    from skillgraft.compose.evolve_spec import load_spec

    spec = load_spec(config)
    opts = EvolveOptions(
        out_dir=out_dir,
        resume=resume,
        overwrite=overwrite,
        workers=workers if workers is not None or ray_address else 1,
        ray_address=ray_address,
        command=_command_line(),
    )
    try:
        with progress_bar() as progress:
            res = run_evolve(spec, opts, progress, notify=info)
    except KeyboardInterrupt:
        ckpt = out_dir / "checkpoint.json"
        kept = (
            f"{ckpt} keeps every finished generation; --resume continues" if ckpt.exists() else "no generation finished"
        )
        info(f"interrupted: {kept}")
        raise typer.Exit(130) from None
    if as_json:
        print_json(res.to_dict())
        return
    b = res.best
    where = f"{res.backend}, {res.workers} worker(s)" if res.workers else res.backend
    console.print(
        f"best fitness {b['fitness']:.4f} ({b['recipe']['method']}, generation {b['generation']}, candidate "
        f"{b['index']}) of {res.candidates} candidates in {res.seconds:.1f} s ({where})"
    )
    console.print("per task: " + ", ".join(f"{k} {v:.3f}" for k, v in b["scores"].items()))
    console.print("best per generation: " + " ".join(f"{r['best']:.3f}" for r in res.curve))
    console.print(f"wrote {res.out_dir / 'best.yaml'}, evolve.json, checkpoint.json")
