"""CLI commands over SkillBench: ``bench build`` trains and caches a profile's models, ``bench show`` prints
the accuracies its manifest recorded at build time."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from skillgraft.cli.main import app, console
from skillgraft.cli.render import info, print_json, progress_bar

bench_app = typer.Typer(
    help="SkillBench: skills with bases and experts built on CPU — tiny Llamas (quick, full) or the real "
    "SmolLM2-135M-Instruct with natural-language skills (real-quick, real).\n\n"
    "Example: skillgraft bench build --profile quick && skillgraft bench show --profile quick",
    no_args_is_help=True,
)
app.add_typer(bench_app, name="bench")

PROFILE_OPT = typer.Option(
    "quick",
    "--profile",
    "-p",
    help="quick (3 tiny skills, ~1-2 min), full (8, ~15 min), real-quick (SmolLM2-135M, 3 LoRA skills, ~6 min) "
    "or real (6 LoRA + 3 full fine-tune skills, ~45 min).",
)
CACHE_OPT = typer.Option(
    None, "--cache", envvar="SKILLGRAFT_CACHE", help="Cache directory (default: the user cache's skillbench/)."
)


def _summary(m) -> dict:
    return {
        "root": str(m.root),
        "profile": m.profile,
        "seed": m.seed,
        "build_seconds": m.build_seconds,
        "skills": list(m.skills),
        "compositions": list(m.compositions),
        "models": {k: {**v, "path": str(m.root / v["path"])} for k, v in m.models.items()},
        "accuracy": m.accuracy,
        **({"general": m.raw["general"]} if "general" in m.raw else {}),
        **({"reused": m.raw["reused"]} if m.raw.get("reused") else {}),
    }


def _table(m) -> Table:
    """One row per skill: base, large base, and each expert on that skill (test-split exact match)."""
    table = Table(title=f"SkillBench {m.profile} — exact match on each skill's test split ({m.root})")
    cols = {"base": "base", "full": "experts/{}-full", "lora": "experts/{}-lora"}
    if "base-large" in m.models:  # the tiny profiles' larger base (cross-scale transfer)
        cols |= {"base-large": "base-large", "large full": "experts-large/{}-full"}
    table.add_column("skill")
    for c in cols:
        table.add_column(c, justify="right")

    def pct(key: str, skill: str) -> str:
        v = m.accuracy.get(key, {}).get(skill)
        return "-" if v is None else f"{100 * v:.1f}%"

    for s in m.skills:
        table.add_row(s, *(pct(k.format(s), s) for k in cols.values()))
    return table


def _general_table(m) -> Table | None:
    """Real profiles: each model's general-ability check (GSM8K reference log-likelihood, fixed fact prompts)."""
    general = m.raw.get("general")
    if not general:
        return None
    table = Table(title="General ability (higher is better; the base is the reference)")
    for c in ("model", "GSM8K loglik / token", "facts exact match"):
        table.add_column(c, justify="left" if c == "model" else "right")
    for key, g in general.items():
        table.add_row(key, f"{g['gsm8k_token_loglik']:.3f}", f"{100 * g['facts_em']:.0f}%")
    return table


def _params_line(m) -> str:
    b = m.models["base"]["params"]
    large = m.models.get("base-large", {}).get("params")
    sizes = f"base {b:,} parameters" + (f", base-large {large:,}" if large else "")
    reused = m.raw.get("reused") or []
    kept = f" ({len(reused)} unchanged experts reused from the previous build)" if reused else ""
    return f"{sizes}; built in {m.build_seconds:.0f} s{kept}"


def _show(m) -> None:
    console.print(_table(m))
    general = _general_table(m)
    if general is not None:
        console.print(general)
    info(_params_line(m))


@bench_app.command("build")
def build_cmd(
    profile: str = PROFILE_OPT,
    cache: Path = CACHE_OPT,
    rebuild: bool = typer.Option(
        False,
        "--rebuild",
        help="Build again even if the cache holds this profile; trains every expert anew (a changed real profile "
        "otherwise reuses the experts whose recipe did not change).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest summary as JSON."),
) -> None:
    """Build (or reuse) a profile's data, tokenizer, bases and experts in the cache.

    Example: skillgraft bench build --profile full --cache ./skillbench
    """
    from skillgraft.bench.build import build

    with progress_bar() as progress:
        m = build(profile, cache, progress, rebuild=rebuild)
    if as_json:
        print_json(_summary(m))
        return
    _show(m)


@bench_app.command("show")
def show_cmd(
    profile: str = PROFILE_OPT,
    cache: Path = CACHE_OPT,
    as_json: bool = typer.Option(False, "--json", help="Print the manifest summary as JSON."),
) -> None:
    """Print a built profile's accuracy table (measured when it was built).

    Example: skillgraft bench show --profile quick --json
    """
    from skillgraft.bench.build import BenchManifest, default_cache, get_profile

    prof = get_profile(profile)
    m = BenchManifest.load((cache or default_cache()) / prof.name)
    if as_json:
        print_json(_summary(m))
        return
    _show(m)
