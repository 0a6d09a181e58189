"""``study compress``: how much of each full fine-tune's skill a pack keeps at 0.5%–10% of the dense delta.

Each expert is extracted at every budget (and dense), applied in memory to the base and scored on its skill;
retained = exact match with the pack ÷ the expert's own exact match. LoRA experts are imported exactly (budget
``"lora"``) and compared with the adapter's own score recorded at build time.
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

BUDGETS: tuple[float | None, ...] = (0.005, 0.01, 0.02, 0.05, 0.1, None)  # None: dense


@dataclass(frozen=True)
class CompressStudySpec:
    profile: str | Profile | RealProfile = "quick"  # a profile name or object
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
    res["base"] = score(model, tok, manifest, skills, spec.limit, loglik=False)
    base_general = general(model, tok, manifest)
    if base_general is not None:
        res["general"] = {"base": base_general}
    rows: list[dict[str, Any]] = []
    full = [s for s in skills if f"experts/{s}-full" in manifest.models]
    with tempfile.TemporaryDirectory(prefix="skillgraft-compress-") as tmp:
        for i, s in enumerate(full):
            progress("compress study", i, len(full))
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
                em = score(model, tok, manifest, [s], spec.limit, loglik=False)[s]["em"]
                gen = general(model, tok, manifest)
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
                        "general": gen,
                    }
                )
            for row in rows:
                if row["skill"] == s:
                    row["expert_em"] = expert_em
                    row["retained"] = float(row["em"]) / expert_em if expert_em else 0.0
        lora = [s for s in skills if f"experts/{s}-lora" in manifest.models]
        rows += _lora_rows(manifest, model, tok, lora, spec, tmp)
    progress("compress study", len(full), len(full))
    res["compress"] = rows
    return res


def _lora_rows(manifest: Any, model: Any, tok: Any, skills: list[str], spec: CompressStudySpec, tmp: str) -> list:
    """Each LoRA expert imported exactly as a pack, applied and scored; ``expert_em`` is the adapter's own score on
    the same rows (PEFT's unmerged forward)."""
    from peft import PeftModel

    from skillgraft.skill.apply import apply, unapply
    from skillgraft.skill.peft import import_lora

    rows = []
    for s in skills:
        adapter = manifest.model_dir(f"experts/{s}-lora")
        out = Path(tmp) / f"{s}-lora.skill"
        import_lora(adapter, out, base=manifest.model_dir("base"), overwrite=True)
        apply(model, [out])
        em = score(model, tok, manifest, [s], spec.limit, loglik=False)[s]["em"]
        gen = general(model, tok, manifest)
        unapply(model)
        peft_model = PeftModel.from_pretrained(model, str(adapter)).eval()
        expert_em = score(peft_model, tok, manifest, [s], spec.limit, loglik=False)[s]["em"]
        peft_model.unload()  # the base's own modules back, unchanged
        rows.append(
            {
                "skill": s,
                "budget": "lora",
                "bytes": out.stat().st_size,
                "em": em,
                "expert_em": expert_em,
                "retained": em / expert_em if expert_em else 0.0,
                "general": gen,
            }
        )
    return rows
