"""``study negate``: removing one skill from a multi-skill model with ``apply`` at weight −1.

The start model is the base with every expert's pack applied at weight +1 (task arithmetic, λ = 1); removing skill
k applies its pack once more at −1. The removed skill should fall to the base's level and every other skill keep
its accuracy in the start model.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skillgraft.bench.build import Profile
from skillgraft.bench.real import RealProfile
from skillgraft.progress import ProgressFn, no_progress
from skillgraft.study.common import check_skills, general, load, new_results, score


@dataclass(frozen=True)
class NegateStudySpec:
    profile: str | Profile | RealProfile = "quick"  # a profile name or object
    cache: Path | None = None
    skills: tuple[str, ...] = ()
    experts: tuple[str, ...] = ("lora", "full")
    limit: int | None = None
    command: str = ""


def _packs(manifest: Any, kind: str, skills: list[str], tmp: Path) -> dict[str, Path]:
    """Each skill's expert of ``kind`` as an exact pack (LoRA imported, full fine-tune extracted densely)."""
    from skillgraft.skill.extract import ExtractSpec, extract
    from skillgraft.skill.peft import import_lora

    base = manifest.model_dir("base")
    out = {}
    for s in skills:
        path = tmp / f"{kind}-{s}.skill"
        source = manifest.model_dir(f"experts/{s}-{kind}")
        if kind == "lora":
            import_lora(source, path, base=base)
        else:
            extract(ExtractSpec(base=base, tuned=source, out=path, dense=True))
        out[s] = path
    return out


def run_negation_study(spec: NegateStudySpec, progress: ProgressFn = no_progress) -> dict[str, Any]:
    """For each expert kind: scores of the start model (all packs at +1) and of each removal (one pack at −1)."""
    from skillgraft.bench.build import build
    from skillgraft.skill.apply import apply, unapply

    manifest = build(spec.profile, spec.cache, progress)
    skills = check_skills(manifest, spec.skills)
    model, tok = load(manifest.model_dir("base"))
    res = new_results(manifest, skills, spec.command)
    res["base"] = score(model, tok, manifest, skills, spec.limit, loglik=False)
    base_general = general(model, tok, manifest)
    if base_general is not None:
        res["general"] = {"base": base_general}
    rows: list[dict[str, Any]] = []
    kinds = {k: [s for s in skills if f"experts/{s}-{k}" in manifest.models] for k in spec.experts}
    kinds = {k: v for k, v in kinds.items() if len(v) >= 2}
    total, done = sum(len(v) + 1 for v in kinds.values()), 0
    with tempfile.TemporaryDirectory(prefix="skillgraft-negate-") as tmp:
        for kind, chosen in kinds.items():
            packs = _packs(manifest, kind, chosen, Path(tmp))
            for removed in (None, *chosen):
                progress("negation study", done, total)
                refs: list[Any] = list(packs.values())
                if removed is not None:
                    refs.append((packs[removed], -1.0))
                apply(model, refs)
                try:
                    scores = score(model, tok, manifest, chosen, spec.limit, loglik=False)
                    gen = general(model, tok, manifest)
                finally:
                    unapply(model)
                rows.append({"experts": kind, "removed": removed, "skills": chosen, "scores": scores, "general": gen})
                done += 1
    progress("negation study", total, total)
    res["negation"] = _with_verdicts(rows, res["base"])
    return res


def _with_verdicts(rows: list[dict[str, Any]], base: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """Per removal: the removed skill's drop to the base (points) and the others' accuracy kept (÷ start model)."""
    start = {r["experts"]: r["scores"] for r in rows if r["removed"] is None}
    for r in rows:
        k = r["removed"]
        if k is None:
            continue
        s0 = start[r["experts"]]
        r["removed_em"] = r["scores"][k]["em"]
        r["removed_above_base"] = r["scores"][k]["em"] - base[k]["em"]
        kept = {s: (r["scores"][s]["em"] / s0[s]["em"]) if s0[s]["em"] else None for s in r["skills"] if s != k}
        r["others_kept"] = kept
        values = [v for v in kept.values() if v is not None]
        r["min_others_kept"] = min(values) if values else None
    return rows
