"""``study compress``: how much of each full fine-tune's skill a pack keeps at 0.5%–10% of the dense delta.

Each expert is extracted at every budget (and dense), applied in memory to the base and scored on its skill;
retained = exact match with the pack ÷ the expert's own exact match.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skillgraft.progress import ProgressFn, no_progress
from skillgraft.study.common import check_skills, load, new_results, score

BUDGETS: tuple[float | None, ...] = (0.005, 0.01, 0.02, 0.05, 0.1, None)  # None: dense


@dataclass(frozen=True)
class CompressStudySpec:
    profile: str = "quick"
    cache: Path | None = None
    skills: tuple[str, ...] = ()
    budgets: tuple[float | None, ...] = BUDGETS
    int8: bool = False
    limit: int | None = None
    command: str = ""


def run_compress_study(spec: CompressStudySpec, progress: ProgressFn = no_progress) -> dict[str, Any]:
    from skillgraft.bench.build import build
    from skillgraft.skill.apply import apply, unapply
    from skillgraft.skill.extract import ExtractSpec, extract

    manifest = build(spec.profile, spec.cache, progress)
    skills = check_skills(manifest, spec.skills)
    base_dir = manifest.model_dir("base")
    model, tok = load(base_dir)
    res = new_results(manifest, skills, spec.command)
    res["base"] = score(model, tok, manifest, skills, spec.limit)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="skillgraft-compress-") as tmp:
        for i, s in enumerate(skills):
            progress("compress study", i, len(skills))
            tuned = manifest.model_dir(f"experts/{s}-full")
            expert_em: float | None = None
            budgets = {*spec.budgets, None}  # dense is always measured: it is the expert itself
            for budget in sorted(budgets, key=lambda b: 2.0 if b is None else b, reverse=True):
                out = Path(tmp) / "pack.skill"
                r = extract(
                    ExtractSpec(
                        base=base_dir,
                        tuned=tuned,
                        out=out,
                        budget=budget,
                        dense=budget is None,
                        int8=spec.int8 and budget is not None,
                        overwrite=True,
                    )
                )
                apply(model, [out])
                em = score(model, tok, manifest, [s], spec.limit)[s]["em"]
                unapply(model)
                if budget is None:
                    expert_em = em
                energy = sum(t.energy for t in r.tensors)
                kept = sum(t.energy * t.retained for t in r.tensors) / energy if energy else 1.0
                rows.append(
                    {
                        "skill": s,
                        "budget": budget,
                        "bytes": r.file_bytes,
                        "dense_bytes": r.dense_delta_bytes,
                        "em": em,
                        "energy_retained": kept,
                    }
                )
            for row in rows:
                if row["skill"] == s:
                    row["expert_em"] = expert_em
                    row["retained"] = float(row["em"]) / expert_em if expert_em else 0.0
    progress("compress study", len(skills), len(skills))
    res["compress"] = rows
    return res
