"""The README's main job: SkillBench end to end — build or reuse the models, extract a skill pack per expert
into a temporary library, merge the packs with every method, evaluate, rank, and write an HTML report.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from skillgraft.progress import ProgressFn, no_progress


def run_demo(
    out_dir: Path = Path("skillgraft-demo"),
    profile: str = "quick",
    budget: float | None = 0.25,
    cache: Path | None = None,
    say: Callable[[str], None] = print,
    progress: ProgressFn = no_progress,
) -> bool:
    """Run the demo; returns True when the skills are there (experts far above the base) and at least one
    merge keeps most of every skill. Writes ``results.json`` and ``report.html`` into ``out_dir``."""
    from skillgraft.bench.build import build
    from skillgraft.eval.report import render_html
    from skillgraft.io.writer import atomic_path
    from skillgraft.library import Library
    from skillgraft.study.merge import MergeStudySpec, run_merge_study

    say(f"1. SkillBench ({profile}): building or reusing the base and one expert per skill")
    manifest = build(profile, cache, progress)
    say(f"   {manifest.root} — skills: {', '.join(manifest.skills)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="skillgraft-demo-") as tmp:
        lib = Library(Path(tmp) / "library")
        label = "dense" if budget is None else f"{budget:.1%}"
        say(
            f"2. one skill pack per expert into a temporary library: full fine-tunes extracted at {label} of the "
            "dense delta, LoRA experts imported exactly"
        )
        refs = _store_packs(manifest, lib, Path(tmp), budget, profile, say)
        lib.close()
        say("3. merging the packs of each kind with every method, evaluating every merge on every skill")
        spec = MergeStudySpec(
            profile=profile,
            cache=cache,
            experts=("full-pack", "lora-pack"),
            packs=tuple(refs),
            library=Path(tmp) / "library",
            lambdas=(0.5, 1.0),
            command="skillgraft demo",
        )
        results = run_merge_study(spec, progress)
    with atomic_path(out_dir / "results.json", overwrite=True) as t:
        t.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    with atomic_path(out_dir / "report.html", overwrite=True) as t:
        t.write_text(render_html(results))
    return _summarise(results, manifest.skills, out_dir, say)


def _store_packs(
    manifest: Any, lib: Any, tmp: Path, budget: float | None, profile: str, say: Callable[[str], None]
) -> list[tuple[str, str, str]]:
    from skillgraft.io.peft_adapter import import_lora
    from skillgraft.skill.extract import ExtractSpec, extract

    base = manifest.model_dir("base")
    refs = []
    for s in manifest.skills:
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
        import_lora(manifest.model_dir(f"experts/{s}-lora"), tmp / f"{s}-lora.skill", base=base, name=f"{s}-lora")
        rec_l = lib.add(tmp / f"{s}-lora.skill")
        refs.append(("lora-pack", s, rec_l.ref))
        say(
            f"   {rec.ref:<14} {r.file_bytes:>9,} bytes ({r.file_bytes / r.dense_delta_bytes:.1%} of dense Δ); "
            f"{rec_l.ref:<18} {rec_l.size:>9,} bytes"
        )
    return refs


def _summarise(results: dict, skills: tuple[str, ...], out_dir: Path, say: Callable[[str], None]) -> bool:
    from skillgraft.eval.report import ranked_methods

    base = {s: results["base"][s]["em"] for s in skills}
    ok = True
    for kind in ("full-pack", "lora-pack"):
        own = {s: results["experts"][kind][s][s]["em"] for s in skills}
        say(
            f"   {kind}: exact match on its own skill — "
            + ", ".join(f"{s} {base[s]:.0%} → {own[s]:.0%}" for s in skills)
        )
        ok &= all(own[s] >= base[s] + 0.3 for s in skills)
    say("4. merges ranked by mean normalized accuracy (merged ÷ expert, per skill)")
    say(f"   {'experts':<11}{'method':<18}{'normalized':>11}{'exact match':>13}{'seconds':>9}")
    ranked = ranked_methods(results)
    for r in ranked:
        norm, em = f"{r['mean_normalized']:.1%}", f"{r['mean_em']:.1%}"
        say(f"   {r['experts']:<11}{r['method']:<18}{norm:>11}{em:>13}{r['seconds']:>9.2f}")
    say(f"report: {out_dir / 'report.html'}   results: {out_dir / 'results.json'}")
    say(
        "the skills are there: every pack lifts the base on its skill"
        if ok
        else "FAILED: a pack did not lift its skill"
    )
    return ok and len(ranked) > 0
