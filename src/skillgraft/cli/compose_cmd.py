"""CLI command ``compose``: a thin layer over :func:`skillgraft.compose.learn.compose`."""

from __future__ import annotations

from pathlib import Path

import typer

from skillgraft.cli.main import app, console
from skillgraft.cli.render import print_json, progress_bar
from skillgraft.cli.skill_cmd import LIBRARY_OPT
from skillgraft.errors import InputError


def _named(value: str, what: str) -> tuple[str, str]:
    """``NAME=PATH``, or ``PATH`` named after its file or directory (``math.skill`` → ``math``)."""
    if "=" in value:
        name, _, path = value.partition("=")
        if not name or not path:
            raise InputError(f"{what} {value!r}: expected NAME=PATH")
        return name, path
    p = Path(value.rstrip("/"))
    return p.name.removesuffix(".skill") or value, value


def _data(value: str) -> tuple[str, str]:
    if "=" not in value:
        raise InputError(f"--data {value!r}: name the skill the rows are for", hint="--data NAME=FILE.jsonl")
    return _named(value, "--data")


def _bounds(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise InputError(f"--bounds {text!r}: expected LO,HI (e.g. 0,1)") from None
    return lo, hi


@app.command()
def compose(
    base: str = typer.Argument(..., help="Base model directory."),
    inputs: list[str] = typer.Argument(..., help="Skills: [NAME=]PATH of a pack, LoRA adapter or fine-tuned model."),
    out: Path = typer.Option(..., "-o", "--out", help="Output directory: merged model + merge.yaml + compose.json."),
    learn: str = typer.Option(
        "blockwise",
        "--learn",
        help="blockwise (labels, gradients) | entropy (no labels) | search (labels, CMA-ES, no gradients).",
    ),  # fmt: skip
    data: list[str] = typer.Option(..., "--data", "-d", help="NAME=FILE.jsonl rows for skill NAME (repeatable)."),
    examples: int = typer.Option(16, "--examples", "-n", help="Rows used per skill (the first N of its file)."),
    granularity: str = typer.Option(
        None,
        "--granularity",
        help="block (layer × module group) | layer | skill; default block, skill for --learn search.",
    ),  # fmt: skip
    init: float = typer.Option(0.3, "--init", help="Starting coefficient of every skill and block."),
    bounds: str = typer.Option("0,1", "--bounds", help="LO,HI: every coefficient stays in this range."),
    steps: int = typer.Option(40, "--steps", help="Optimizer steps (search: candidate evaluations)."),
    lr: float = typer.Option(0.05, "--lr", help="Adam learning rate (on the coefficients' logits)."),
    reg: float = typer.Option(0.01, "--reg", help="Regularisation: L2 to --init (gradient), L1 (search)."),
    batch: int = typer.Option(16, "--batch", help="Rows per step, drawn evenly across skills."),
    score: str = typer.Option("loss", "--score", help="search: loss (target cross-entropy) | em (exact match)."),
    gen_tokens: int = typer.Option(4, "--gen-tokens", help="entropy: greedy answer tokens scored after the prompt."),
    seed: int = typer.Option(0, "--seed", help="Seed for batches and the search."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
    force: bool = typer.Option(False, "--force", help="Use skills made for another base anyway."),
    library: Path = LIBRARY_OPT,
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Learn how much of each skill to merge (per block) from a few examples; write the model and its merge YAML.

    Example: skillgraft compose ./base cipher=./cipher-lora list=./list-lora --learn blockwise
    -d cipher=cipher.jsonl -d list=list.jsonl --examples 16 -o ./composed
    (then `skillgraft merge ./composed/merge.yaml -o ./again` rebuilds the same model)
    """
    from skillgraft.compose.learn import ComposeSpec
    from skillgraft.compose.learn import compose as run

    spec = ComposeSpec(
        base=base,
        inputs=tuple(_named(i, "input") for i in inputs),
        data=tuple(_data(d) for d in data),
        out=out,
        learn=learn,
        examples=examples,
        granularity=granularity,
        init=init,
        bounds=_bounds(bounds),
        steps=steps,
        lr=lr,
        reg=reg,
        batch=batch,
        score=score,
        gen_tokens=gen_tokens,
        seed=seed,
        overwrite=overwrite,
        extra={"library": library, "force": force},
    )
    with progress_bar() as progress:
        res = run(spec, progress)
    if as_json:
        print_json(res.to_dict())
        return
    first = res.curve[0] if res.curve else float("nan")
    last = res.curve[-1] if res.curve else float("nan")
    console.print(
        f"composed {len(res.coefficients)} skills ({res.learn}) -> {res.out}  objective {first:.4f} -> {last:.4f}  "
        f"{res.seconds:.0f} s\nreproduce: skillgraft merge {res.config_path} -o DIR"
    )
