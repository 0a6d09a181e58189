"""Learned composition on SkillBench: fit with ``skillgraft compose`` on a few val rows per skill, then score the
merged model on the test split exactly as the merge study scores a merge (and run the general-ability check).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from skillgraft.bench.build import BenchManifest
from skillgraft.study.common import general, load, score


def compose_spec(manifest: BenchManifest, kind: str, skills: Sequence[str], out: Path, **kw: Any) -> Any:
    """A :class:`~skillgraft.compose.learn.ComposeSpec` over the ``kind`` (lora / full) experts of ``skills``,
    fitted on the first rows of each skill's val split (``split=`` to change it)."""
    from skillgraft.compose.learn import ComposeSpec

    split = kw.pop("split", "val")
    return ComposeSpec(
        base=str(manifest.model_dir("base")),
        inputs=tuple((s, str(manifest.model_dir(f"experts/{s}-{kind}"))) for s in skills),
        data=tuple((s, str(manifest.data_path(s, split))) for s in skills),
        out=out,
        **kw,
    )


def compose_row(
    manifest: BenchManifest, kind: str, skills: Sequence[str], own: dict[str, float], limit: int | None, **kw: Any
) -> dict[str, Any]:
    """Compose, score on the test split, normalize by the experts' own EM ``own``; one ``compose`` results row."""
    import json

    from skillgraft.compose.learn import compose

    with tempfile.TemporaryDirectory(prefix="skillgraft-compose-") as tmp:
        spec = compose_spec(manifest, kind, skills, Path(tmp) / "composed", **kw)
        t0 = time.perf_counter()
        res = compose(spec)
        wall = time.perf_counter() - t0
        model, tok = load(res.out)
        t1 = time.perf_counter()
        scores = score(model, tok, manifest, list(skills), limit, loglik=False)
        score_seconds = time.perf_counter() - t1
        gen = general(model, tok, manifest)
        record = json.loads((res.out / "compose.json").read_text())["compose"][0]
    norm = {s: scores[s]["em"] / own[s] if own.get(s) else None for s in skills}
    valid = [v for v in norm.values() if v is not None]
    return {
        **record,
        "experts": kind,
        "n_skills": len(skills),
        "examples_used": sum(res.examples.values()),
        "scores": scores,
        "expert_em": dict(own),
        "normalized": norm,
        "mean_normalized": sum(valid) / len(valid) if valid else None,
        "mean_em": sum(v["em"] for v in scores.values()) / len(scores),
        "compose_seconds": wall,
        "score_seconds": score_seconds,
        "general": gen,
    }
