"""CLI sub-app ``study``: merge, compress and transfer studies on SkillBench, each writing a results JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from skillgraft.cli.main import app, console
from skillgraft.cli.render import info, progress_bar
from skillgraft.cli.skill_cmd import _command_line, parse_fraction

study_app = typer.Typer(
    help="Measure merges, compression, negation, cross-scale transfer and routing on SkillBench.", no_args_is_help=True
)
app.add_typer(study_app, name="study")

PROFILE = typer.Option("quick", help="SkillBench profile: quick | full | real-quick | real (SmolLM2-135M).")
CACHE = typer.Option(None, "--cache", envvar="SKILLGRAFT_CACHE", help="SkillBench cache directory.")
OUT = typer.Option(Path("results.json"), "-o", "--out", help="Results JSON to write.")
REPORT = typer.Option(None, "--report", help="Also write an HTML report here.")
SKILLS = typer.Option([], "--skill", help="Restrict to these skills (repeatable).")
LIMIT = typer.Option(None, help="Test examples per skill (default: all).")


def _finish(results: dict[str, Any], out: Path, report: Path | None) -> None:
    from skillgraft.eval.report import render_html, render_markdown
    from skillgraft.io.writer import atomic_path

    with atomic_path(out, overwrite=True) as tmp:
        tmp.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    console.print(render_markdown(results))
    if report is not None:
        with atomic_path(report, overwrite=True) as tmp:
            tmp.write_text(render_html(results))
        info(f"report: {report}")
    info(f"results: {out}")


@study_app.command("merge")
def merge_study(
    profile: str = PROFILE,
    cache: Path = CACHE,
    skill: list[str] = SKILLS,
    method: list[str] = typer.Option([], "--method", help="Merge methods (repeatable; default: all that apply)."),
    experts: str = typer.Option("full,lora", help="Expert kinds to merge: full, lora or both."),
    n_skills: list[int] = typer.Option([], "--n-skills", help="Merge the first N skills (repeatable), e.g. 4 and 8."),
    lambdas: str = typer.Option("0.3,0.5,0.7,1.0", help="λ values of the sweep (task arithmetic, TIES)."),
    limit: int = LIMIT,
    seed: int = typer.Option(0),
    workers: int = typer.Option(
        None, "--workers", help="Merge and score the rows on N workers (1: this process, N > 1: local Ray)."
    ),
    ray_address: str = typer.Option(None, "--ray-address", help="Run the rows on this Ray cluster (HEAD:6379)."),
    out: Path = OUT,
    report: Path = REPORT,
) -> None:
    """Experts, interference matrix, every merge method (normalized accuracy) and a λ sweep.

    Example: skillgraft study merge --profile full --n-skills 4 --n-skills 8 -o merge.json --report merge.html
    (add --workers 4 to merge and score the rows on 4 local Ray workers; see docs/evolve.md for a cluster)
    """
    from skillgraft.study.merge import DEFAULT_METHODS, MergeStudySpec, run_merge_study

    spec = MergeStudySpec(
        profile=profile,
        cache=cache,
        skills=tuple(skill),
        methods=tuple(method) or DEFAULT_METHODS,
        experts=tuple(e.strip() for e in experts.split(",") if e.strip()),
        n_skills=tuple(n_skills),
        lambdas=tuple(float(x) for x in lambdas.split(",") if x.strip()),
        limit=limit,
        seed=seed,
        command=_command_line(),
        workers=workers,
        ray_address=ray_address,
    )
    with progress_bar() as progress:
        results = run_merge_study(spec, progress)
    _finish(results, out, report)


@study_app.command("compress")
def compress_study(
    profile: str = PROFILE,
    cache: Path = CACHE,
    skill: list[str] = SKILLS,
    budgets: str = typer.Option("0.5%,1%,2%,5%,10%", help="Pack budgets (dense is always added)."),
    int8: bool = typer.Option(False, "--int8", help="int8 low-rank factors."),
    limit: int = LIMIT,
    out: Path = OUT,
    report: Path = REPORT,
) -> None:
    """Retained skill (exact match ÷ expert's) against pack size, per skill.

    Example: skillgraft study compress --profile full -o compress.json --report compress.html
    """
    from skillgraft.study.compress import CompressStudySpec, run_compress_study

    spec = CompressStudySpec(
        profile=profile,
        cache=cache,
        skills=tuple(skill),
        limit=limit,
        int8=int8,
        budgets=tuple(parse_fraction(b) for b in budgets.split(",") if b.strip()),
        command=_command_line(),
    )
    with progress_bar() as progress:
        results = run_compress_study(spec, progress)
    _finish(results, out, report)


@study_app.command("negate")
def negate_study(
    profile: str = PROFILE,
    cache: Path = CACHE,
    skill: list[str] = SKILLS,
    experts: str = typer.Option("lora,full", help="Expert kinds: lora, full or both."),
    limit: int = LIMIT,
    out: Path = OUT,
    report: Path = REPORT,
) -> None:
    """Remove one skill from a multi-skill model (its pack at weight −1): the removed skill and the others.

    Example: skillgraft study negate --profile real --limit 50 -o negate.json --report negate.html
    """
    from skillgraft.study.negate import NegateStudySpec, run_negation_study

    kinds = tuple(k.strip() for k in experts.split(",") if k.strip())
    bad = [k for k in kinds if k not in ("lora", "full")]
    if bad or not kinds:
        from skillgraft.errors import InputError

        raise InputError(f"unknown expert kind {bad[0] if bad else experts!r}", hint="use lora, full or lora,full")
    spec = NegateStudySpec(
        profile=profile, cache=cache, skills=tuple(skill), experts=kinds, limit=limit, command=_command_line()
    )
    with progress_bar() as progress:
        results = run_negation_study(spec, progress)
    _finish(results, out, report)


@study_app.command("transfer")
def transfer_study(
    profile: str = PROFILE,
    cache: Path = CACHE,
    skill: list[str] = SKILLS,
    method: list[str] = typer.Option([], "--method", help="proxy, eft, dlf (repeatable; default: all)."),
    alpha: float = typer.Option(1.0, help="Static α for proxy tuning and EFT."),
    limit: int = typer.Option(100, help="Test examples per skill."),
    multi: bool = typer.Option(True, "--multi/--no-multi", help="Also all experts at once on mixed prompts."),
    out: Path = OUT,
    report: Path = REPORT,
) -> None:
    """Large base steered by small experts: exact match, log-likelihood, gap closed, and tokens/s overhead.

    Example: skillgraft study transfer --profile full -o transfer.json --report transfer.html
    """
    from skillgraft.study.transfer import METHODS, TransferStudySpec, run_transfer_study

    spec = TransferStudySpec(
        profile=profile,
        cache=cache,
        skills=tuple(skill),
        methods=tuple(method) or METHODS,
        alpha=alpha,
        limit=limit,
        multi=multi,
        command=_command_line(),
    )
    with progress_bar() as progress:
        results = run_transfer_study(spec, progress)
    _finish(results, out, report)


@study_app.command("route")
def route_study(
    profile: str = PROFILE,
    cache: Path = CACHE,
    skill: list[str] = SKILLS,
    router: list[str] = typer.Option([], "--router", help="arrow, centroid, classifier (repeatable; default: all)."),
    arrow_token: bool = typer.Option(True, "--arrow-token/--no-arrow-token", help="Also Arrow routing per token."),
    centroid_examples: int = typer.Option(8, "--centroid-examples", help="Labelled training prompts per skill."),
    classifier_examples: int = typer.Option(64, "--classifier-examples", help="Labelled training prompts per skill."),
    limit: int = typer.Option(50, help="Test examples per skill in the mixed set."),
    transfer: bool = typer.Option(
        True, "--transfer/--no-transfer", help="Also routed multi-skill logit transfer (profiles with a large base)."
    ),
    alpha: list[float] = typer.Option(
        [],
        "--alpha",
        help="Transfer: α values each expert's α is chosen from on its skill's val rows (repeatable; "
        "default 1, 1.5, 2, 3; --alpha 1 alone keeps α = 1).",
    ),
    reference: list[Path] = typer.Option(
        [], "--reference", help="A study merge / compose results JSON: its best LoRA merges go beside (repeatable)."
    ),
    out: Path = OUT,
    report: Path = REPORT,
) -> None:
    """Routers on mixed-skill prompts: routing accuracy, end-to-end accuracy vs each expert alone and merges.

    Example: skillgraft study route --profile real --reference benchmarks/results/real_merge_lora6.json
    -o route.json --report route.html
    """
    from skillgraft.study.route import ROUTERS, RouteStudySpec, run_route_study

    spec = RouteStudySpec(
        profile=profile,
        cache=cache,
        skills=tuple(skill),
        limit=limit,
        routers=tuple(router) or ROUTERS,
        arrow_token=arrow_token,
        centroid_examples=centroid_examples,
        classifier_examples=classifier_examples,
        transfer=transfer,
        alpha_grid=tuple(alpha) or RouteStudySpec.alpha_grid,
        references=tuple(reference),
        command=_command_line(),
    )
    with progress_bar() as progress:
        results = run_route_study(spec, progress)
    _finish(results, out, report)
