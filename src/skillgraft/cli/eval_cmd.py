"""CLI command ``eval``: score a base, optionally with skills applied in memory, on tasks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from skillgraft.cli.main import app, console
from skillgraft.cli.render import print_json, progress_bar

LIBRARY_OPT = typer.Option(None, "--library", envvar="SKILLGRAFT_LIBRARY", help="Skill library directory.")


def _fmt(value: float | None, percent: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if percent else f"{value:.3f}"


@app.command("eval")
def eval_(
    model: str = typer.Argument(..., help="Model directory (config.json, weights, tokenizer)."),
    tasks: list[str] = typer.Option(
        ..., "--tasks", "-t", help="FILE.jsonl, jsonl:PATH, gsm8k[:N] or skillbench[:a,b] (repeatable)."
    ),
    skill: list[str] = typer.Option([], "--skill", "-s", help="SKILL[:WEIGHT] applied in memory (repeatable)."),
    limit: int = typer.Option(None, "--limit", help="Score only the first N examples of each task."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", help="Prompts per forward pass."),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", help="Override every task's generation limit."),
    force: bool = typer.Option(False, "--force", help="Apply a skill even if it was made for another base."),
    expert: list[str] = typer.Option(
        [], "--expert", help="SMALL_TUNED:SMALL_BASE[:ALPHA]: steer MODEL by logit arithmetic (repeatable)."
    ),
    method: str = typer.Option("proxy", "--method", help="With --expert: proxy | eft | dlf."),
    parallel: bool = typer.Option(
        False, "--parallel", help="With --expert: the small models decode in a second process, beside MODEL."
    ),
    chat: bool = typer.Option(
        False, "--chat", help="With --expert: each model formats prompts with its own tokenizer's chat template."
    ),
    library: Path = LIBRARY_OPT,
    route: str = typer.Option(
        None,
        "--route",
        help="Route each prompt to one --library skill: arrow | centroid | classifier | arrow-token (per token). "
        "With --expert: route among the experts (arrow | centroid | classifier).",
    ),
    examples: list[str] = typer.Option(
        [], "--examples", help="NAME=PROMPTS.jsonl: labelled prompts of a skill or expert for centroid/classifier."
    ),
    samples: bool = typer.Option(False, "--samples", help="With --json: include every example's prediction."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """Score MODEL (+ skills, applied in memory) by exact match, multiple-choice accuracy and log-likelihood.

    A JSONL task has one {"prompt", "target", "choices"?} object a line.

    With --expert, MODEL is a large base steered by small (expert, base) pairs, as in `skillgraft generate`.

    With --library and --route, every library skill made for MODEL is held at once and each prompt runs with the
    skill its router picks (the router is saved in the library and rebuilt when its skills change):
    skillgraft eval ./base --library ./lib --route arrow --tasks mixed.jsonl

    Example: skillgraft eval ./llama-base --skill math.skill --tasks gsm8k:100 --tasks my_task.jsonl --json
    """
    from skillgraft.errors import InputError
    from skillgraft.eval.harness import EvalSpec, evaluate, evaluate_fused
    from skillgraft.skill.apply import WeightedSkill

    parsed = [WeightedSkill.parse(s) for s in skill]
    spec = EvalSpec(
        model=model,
        tasks=tuple(tasks),
        skills=tuple((s.ref, s.weight) for s in parsed),
        batch_size=batch_size,
        limit=limit,
        max_new_tokens=max_new_tokens,
        library=library,
        force=force,
    )
    transfer = None
    if examples and not route:
        raise InputError("--examples label prompts for a router", hint="add --route centroid (or classifier)")
    if route and not expert:
        from skillgraft.eval.harness import evaluate_routed
        from skillgraft.route.routed import read_examples

        if skill:
            raise InputError("--skill and --route cannot be combined", hint="the router chooses the skills")
        with progress_bar() as progress:
            res, routing = evaluate_routed(spec, route, read_examples(examples) or None, progress)
        if as_json:
            print_json({**res.to_dict(samples=samples), "routing": routing})
            return
        _table(res)
        console.print(f"routed: {routing['chosen']}")
        return
    if (chat or parallel) and not expert:
        raise InputError("--chat and --parallel apply to transfer only", hint="add --expert SMALL_TUNED:SMALL_BASE")
    if expert:
        from skillgraft.transfer.load import ExpertSpec, TransferSpec

        if skill:
            raise InputError("--skill and --expert cannot be combined", hint="apply the skill to the small expert")
        from skillgraft.route.routed import read_examples

        transfer = TransferSpec(
            model,
            tuple(ExpertSpec.parse(e) for e in expert),
            method,
            library=library,
            parallel=parallel,
            chat=chat,
            route=route,
            examples=tuple((k, tuple(v)) for k, v in read_examples(examples).items()),
        )
    with progress_bar() as progress:
        res = evaluate_fused(spec, transfer, progress) if transfer else evaluate(spec, progress)
    if as_json:
        print_json(res.to_dict(samples=samples))
        return
    _table(res)


def _table(res: Any) -> None:
    skills = " + ".join(f"{r}×{w:g}" for r, w in res.skills)
    table = Table(title=f"{res.model}{' + ' + skills if skills else ''}")
    for col in ("task", "n", "exact match", "MC acc", "MC acc (norm)", "mean loglik", "loglik/token", "seconds"):
        table.add_column(col, justify="left" if col == "task" else "right")
    for t in res.tasks:
        table.add_row(
            t.name,
            str(t.n),
            _fmt(t.exact_match, True),
            _fmt(t.mc_accuracy, True),
            _fmt(t.mc_accuracy_norm, True),
            _fmt(t.mean_loglik),
            _fmt(t.mean_token_loglik),
            f"{t.seconds:.1f}",
        )
    console.print(table)
