"""The README's main job: SkillBench end to end — build or reuse the models, extract a skill pack per expert
into a temporary library, merge the packs with every method, evaluate, rank, and write an HTML report.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from skillgraft.progress import ProgressFn, no_progress

# The main methods the demo ranks on the real profile (``skillgraft study merge`` runs every method and λ).
REAL_METHODS = ("task_arithmetic", "ties", "dare_ties", "breadcrumbs_ties", "della")
COMPOSE_ROWS = 16  # labelled rows per skill for the learned merge (step 5)
# The demo keeps to minutes: experts are scored on their own skill only (the interference matrix is
# ``study merge``'s) and every method runs at its default settings (``study merge`` sweeps λ).


def run_demo(
    out_dir: Path = Path("skillgraft-demo"),
    profile: str | Any = "real-quick",  # a profile name, or a Profile / RealProfile object
    budget: float | None = 0.25,
    cache: Path | None = None,
    say: Callable[[str], None] = print,
    progress: ProgressFn = no_progress,
    compose_steps: int = 0,
) -> bool:
    """Run the demo; returns True when the skills are there (experts far above the base) and at least one
    merge ran. Writes ``results.json`` and ``report.html`` into ``out_dir``. ``compose_steps``: optimizer steps of
    the learned merge (step 5).

    On a real profile (SmolLM2-135M-Instruct) the LoRA experts are imported exactly and merged with the main
    methods; on a tiny profile full fine-tunes are also extracted at ``budget`` and every method runs."""
    from skillgraft.bench.build import build, get_profile
    from skillgraft.bench.real import RealProfile
    from skillgraft.eval.report import render_html
    from skillgraft.io.writer import atomic_path
    from skillgraft.library import Library
    from skillgraft.study.compose import compose_row
    from skillgraft.study.merge import MergeStudySpec, run_merge_study

    prof = get_profile(profile)
    real, profile = isinstance(prof, RealProfile), prof.name
    what = "SmolLM2-135M-Instruct and a LoRA expert per skill" if real else "the base and one expert per skill"
    say(f"1. SkillBench ({profile}): building or reusing {what}")
    manifest = build(prof, cache, progress)
    say(f"   {manifest.root} — skills: {', '.join(manifest.skills)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="skillgraft-demo-") as tmp:
        lib = Library(Path(tmp) / "library")
        label = "dense" if budget is None else f"{budget:.1%}"
        full = any(k.endswith("-full") for k in manifest.models)
        say(
            "2. one skill pack per expert into a temporary library: "
            + (f"full fine-tunes extracted at {label} of the dense delta, " if full else "")
            + "LoRA experts imported exactly"
        )
        refs = _store_packs(manifest, lib, Path(tmp), budget, profile, say)
        lib.close()
        kinds = tuple(dict.fromkeys(k for k, _, _ in refs))
        methods = f"the main methods ({', '.join(REAL_METHODS)})" if real else "every method"
        say(f"3. merging the packs of each kind with {methods}, evaluating every merge on every skill")
        spec = MergeStudySpec(
            profile=prof,
            cache=cache,
            experts=kinds,
            packs=tuple(refs),
            library=Path(tmp) / "library",
            lambdas=(0.5, 1.0),
            command="skillgraft demo",
        )
        if real:
            spec = dataclasses.replace(spec, methods=REAL_METHODS, sweep_methods=(), interference=False)
        results = run_merge_study(spec, progress)
    if compose_steps > 0:
        say(
            "5. learning the merge instead: `skillgraft compose --learn blockwise` fits one coefficient per skill and "
            f"block (layer × module group) on {COMPOSE_ROWS} val rows per skill; scored like the merges above"
        )
        own = {s: results["experts"]["lora-pack"][s][s]["em"] for s in results["experts"]["lora-pack"]}
        row = compose_row(
            manifest, "lora", manifest.skills, own, spec.limit, examples=COMPOSE_ROWS, steps=compose_steps
        )
        results["compose"] = [row]
    with atomic_path(out_dir / "results.json", overwrite=True) as t:
        t.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    with atomic_path(out_dir / "report.html", overwrite=True) as t:
        t.write_text(render_html(results))
    return _summarise(results, manifest.skills, out_dir, say)


def _store_packs(
    manifest: Any, lib: Any, tmp: Path, budget: float | None, profile: str, say: Callable[[str], None]
) -> list[tuple[str, str, str]]:
    from skillgraft.skill.extract import ExtractSpec, extract

    base = manifest.model_dir("base")
    refs = []
    for s in manifest.skills:
        if f"experts/{s}-full" not in manifest.models:  # real profiles fully fine-tune only some skills
            rec_l = _import_lora(manifest, lib, tmp, s)
            refs.append(("lora-pack", s, rec_l.ref))
            say(f"   {rec_l.ref:<18} {rec_l.size:>11,} bytes (LoRA, exact)")
            continue
        r = extract(
            ExtractSpec(
                base=base,
                tuned=manifest.model_dir(f"experts/{s}-full"),
                out=tmp / f"{s}.skill",
                budget=budget,
                dense=budget is None,
                name=s,
                tags=("skillbench", profile),
            )
        )
        rec = lib.add(r.path)
        refs.append(("full-pack", s, rec.ref))
        rec_l = _import_lora(manifest, lib, tmp, s)
        refs.append(("lora-pack", s, rec_l.ref))
        say(
            f"   {rec.ref:<14} {r.file_bytes:>9,} bytes ({r.file_bytes / r.dense_delta_bytes:.1%} of dense Δ); "
            f"{rec_l.ref:<18} {rec_l.size:>9,} bytes"
        )
    return refs


def _import_lora(manifest: Any, lib: Any, tmp: Path, skill: str) -> Any:
    """The skill's LoRA expert imported exactly as a pack and added to ``lib``; returns the library record."""
    from skillgraft.skill.peft import import_lora

    out = tmp / f"{skill}-lora.skill"
    import_lora(manifest.model_dir(f"experts/{skill}-lora"), out, base=manifest.model_dir("base"), name=f"{skill}-lora")
    return lib.add(out)


def _summarise(results: dict, skills: tuple[str, ...], out_dir: Path, say: Callable[[str], None]) -> bool:
    from skillgraft.eval.report import ranked_methods

    base = {s: results["base"][s]["em"] for s in skills}
    ok = True
    for kind, table in results["experts"].items():
        own = {s: table[s][s]["em"] for s in table}
        say(f"   {kind}: exact match on its own skill — " + ", ".join(f"{s} {base[s]:.0%} → {own[s]:.0%}" for s in own))
        ok &= all(own[s] >= base[s] + 0.3 for s in own)
    general = results.get("general")
    if general:
        say(f"   general ability of the base: {_general(general['base'])}")
    say("4. merges ranked by mean normalized accuracy (merged ÷ expert, per skill)")
    head = f"   {'experts':<11}{'method':<18}{'normalized':>11}{'exact match':>13}{'seconds':>9}"
    say(head + ("   general (GSM8K loglik/token, facts)" if general else ""))
    ranked = ranked_methods(results)
    for r in ranked:
        norm, em = f"{r['mean_normalized']:.1%}", f"{r['mean_em']:.1%}"
        row = f"   {r['experts']:<11}{r['method']:<18}{norm:>11}{em:>13}{r['seconds']:>9.2f}"
        say(row + (f"   {_general(r['general'])}" if r.get("general") else ""))
    for c in results.get("compose", []):
        best = max((r["mean_normalized"] for r in ranked if r["experts"] == "lora-pack"), default=float("nan"))
        row = f"   {'lora':<11}{'learned (' + c['learn'] + ')':<18}{c['mean_normalized']:>11.1%}{c['mean_em']:>13.1%}"
        say(row + f"{c['compose_seconds']:>9.2f}" + (f"   {_general(c['general'])}" if c.get("general") else ""))
        say(f"   learned from {c['examples_used']} labelled rows; best fixed-recipe LoRA merge above: {best:.1%}")
    say(f"report: {out_dir / 'report.html'}   results: {out_dir / 'results.json'}")
    say(
        "the skills are there: every pack lifts the base on its skill"
        if ok
        else "FAILED: a pack did not lift its skill"
    )
    return ok and len(ranked) > 0


def _general(g: dict[str, Any]) -> str:
    return f"{g['gsm8k_token_loglik']:.3f}, {g['facts_em']:.0%}"
