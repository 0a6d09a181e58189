"""The ``skillgraft route`` commands: build a library's router, and show which skill it picks for prompts."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from skillgraft.cli.main import app, console
from skillgraft.cli.render import print_json
from skillgraft.cli.skill_cmd import LIBRARY_OPT
from skillgraft.errors import InputError

route_app = typer.Typer(
    name="route",
    help="Routers that pick a library skill per prompt: arrow (from LoRA weights, no labels), centroid and "
    "classifier (from the base's hidden states on a few labelled prompts per skill).\n\n"
    "A router is saved in the library (routers/METHOD.json + .safetensors) and rebuilt when its skills change; "
    "`eval`, `generate` and `serve` take --route METHOD.\n\n"
    "Example: skillgraft route build --library ./lib --base ./base --method centroid "
    "--examples cipher=cipher.jsonl --examples units=units.jsonl",
    no_args_is_help=True,
)
app.add_typer(route_app, name="route")

BASE_OPT = typer.Option(..., "--base", help="The base model directory the library's skills were made for.")


@route_app.command("build")
def build(
    base: Path = BASE_OPT,
    method: str = typer.Option(..., "--method", "-m", help="arrow | centroid | classifier"),
    examples: list[str] = typer.Option(
        [], "--examples", help="NAME=PROMPTS.jsonl: a skill's labelled prompts (centroid, classifier; repeatable)."
    ),
    skill: list[str] = typer.Option([], "--skill", "-s", help="Route among these skill names only (repeatable)."),
    library: Path = LIBRARY_OPT,
    as_json: bool = typer.Option(False, "--json", help="Print the router's summary as JSON."),
) -> None:
    """Build (or rebuild) the library's router of METHOD over every skill made for BASE, and save it.

    Examples given here are kept with the router, so a later rebuild (a skill added or removed) needs new
    examples only for new skills.

    Example: skillgraft route build --library ./lib --base ./base --method arrow
    """
    from skillgraft.route.routed import open_routed, read_examples
    from skillgraft.route.routers import METHODS, router_dir

    if method not in METHODS:
        raise InputError(f"unknown router {method!r}", hint=f"use one of {', '.join(METHODS)}")
    if library is None:
        raise InputError("route build needs --library", hint="pass --library DIR (or set $SKILLGRAFT_LIBRARY)")
    model = open_routed(base, library, method, names=skill, examples=read_examples(examples) or None)
    router = model.router
    assert router is not None
    summary = {
        "method": router.method,
        "skills": router.keys,
        "examples": {k: len(v) for k, v in router.examples.items()},
        "path": str(router_dir(library) / f"{method}.json"),
    }
    if as_json:
        print_json(summary)
        return
    console.print(f"{method} router over {len(router.keys)} skills saved to {summary['path']}")


@route_app.command("show")
def show(
    base: Path = BASE_OPT,
    method: str = typer.Option(..., "--method", "-m", help="arrow | centroid | classifier | arrow-token"),
    prompts: Path = typer.Option(..., "--prompts", help="JSONL with a 'prompt' per line."),
    library: Path = LIBRARY_OPT,
    as_json: bool = typer.Option(False, "--json", help="Print each prompt's choice and scores as JSON."),
) -> None:
    """Which skill the library's router picks for each prompt (and every skill's score).

    Example: skillgraft route show --library ./lib --base ./base --method arrow --prompts q.jsonl
    """
    from skillgraft.route.routed import open_routed, read_prompt_file

    if library is None:
        raise InputError("route show needs --library", hint="pass --library DIR (or set $SKILLGRAFT_LIBRARY)")
    texts = read_prompt_file(prompts)
    model = open_routed(base, library, method)
    if model.router is None:
        raise InputError("arrow-token chooses per token, not per prompt", hint="use --method arrow")
    scores = model.router.scores(model.runtime, texts)
    keys = model.router.keys
    rows = [
        {"prompt": p, "skill": keys[int(s.argmax())], "scores": dict(zip(keys, [round(float(x), 6) for x in s]))}
        for p, s in zip(texts, scores)
    ]
    if as_json:
        print_json({"method": method, "results": rows})
        return
    table = Table(title=f"{method} router: {len(texts)} prompts")
    table.add_column("prompt")
    table.add_column("skill")
    for r in rows:
        table.add_row(r["prompt"], r["skill"])
    console.print(table)
