"""What every study shares: the results document, loading SkillBench models, and scoring a model on skills.

Scores are greedy exact match and mean target log-likelihood on each skill's test split, through the
evaluation harness (``skillgraft.eval``), so studies measure exactly what ``skillgraft eval`` measures.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from skillgraft.bench.build import BenchManifest
from skillgraft.progress import ProgressFn, no_progress

Scores = dict[str, dict[str, float]]  # skill -> {"em": …, "loglik": …}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def new_results(manifest: BenchManifest, skills: Sequence[str], command: str) -> dict[str, Any]:
    return {
        "kind": "skillgraft-study",
        "version": 1,
        "profile": manifest.profile,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "command": command,
        "skills": list(skills),
    }


def load(path: Path) -> tuple[Any, Any]:
    from skillgraft.eval.harness import load_model

    return load_model(path)


def score(
    model: Any,
    tok: Any,
    manifest: BenchManifest,
    skills: Sequence[str],
    limit: int | None,
    progress: ProgressFn = no_progress,
    loglik: bool = True,
) -> Scores:
    """Exact match (and, with ``loglik``, mean target log-likelihood) of ``model`` on each skill's test split.

    Merge, compression and negation studies report exact match only and skip the log-likelihood pass (about a
    third of the scoring time on the real profiles)."""
    from skillgraft.eval.harness import evaluate_model
    from skillgraft.eval.tasks import read_jsonl, task_from_examples

    tasks = [task_from_examples(s, read_jsonl(manifest.data_path(s, "test"))) for s in skills]
    if not loglik:
        tasks = [dataclasses.replace(t, metrics=("exact_match",)) for t in tasks]
    results = evaluate_model(model, tok, tasks, batch_size=64, limit=limit, progress=progress)
    out: Scores = {}
    for s, r in zip(skills, results):
        out[s] = {"em": r.exact_match or 0.0, **({"loglik": r.mean_loglik or 0.0} if loglik else {})}
    return out


def general(model: Any, tok: Any, manifest: BenchManifest) -> dict[str, Any] | None:
    """The general-ability check (GSM8K reference log-likelihood and fixed fact prompts) on builds that record one
    (the real profiles); None on the tiny profiles, whose character-level models have no general ability."""
    if "general" not in manifest.raw:
        return None
    from skillgraft.eval.general import general_check

    n = int(manifest.raw["profile"].get("n_general", 32))
    return general_check(model, tok, n_gsm8k=n).to_dict()


def check_skills(manifest: BenchManifest, skills: Sequence[str] | None) -> list[str]:
    from skillgraft.errors import InputError

    chosen = list(skills) if skills else list(manifest.skills)
    unknown = [s for s in chosen if s not in manifest.skills]
    if unknown:
        raise InputError(
            f"skill {unknown[0]!r} is not in the {manifest.profile} SkillBench build",
            hint=f"built skills: {', '.join(manifest.skills)}",
        )
    return chosen
