"""``study transfer``: does a small model's fine-tune lift the large base through logit arithmetic?

Per skill: the large base, the large model fine-tuned directly, the small expert alone, and proxy tuning, EFT and
DLF (large base + (small expert, small base)); exact match, mean target log-likelihood, and the fraction of the
fine-tuning gap closed = (method − large base) ÷ (large fine-tuned − large base). Multi-skill: every expert at
once on the mixed prompts. Speed: fused tokens/s against the large base alone in the same decoding loop.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skillgraft.progress import ProgressFn, no_progress
from skillgraft.study.common import check_skills, load, new_results

METHODS = ("proxy", "eft", "dlf")


@dataclass(frozen=True)
class TransferStudySpec:
    profile: str = "quick"
    cache: Path | None = None
    skills: tuple[str, ...] = ()
    methods: tuple[str, ...] = METHODS
    alpha: float = 1.0
    limit: int | None = 100
    batch_size: int = 64
    multi: bool = True
    command: str = ""


def _rows(path: Path, limit: int | None) -> list[dict[str, str]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows[:limit] if limit else rows


def _score_fused(fused: Any, rows: list[dict[str, str]], batch: int) -> tuple[dict[str, float], float, int]:
    """EM and mean target log-likelihood of a FusedModel; also decoding seconds and generated tokens."""
    from skillgraft.eval.metrics import exact_match
    from skillgraft.transfer.fused import GenerationSpec

    n_new = max(len(fused.tok(r["target"], add_special_tokens=False).input_ids) for r in rows) + 4
    preds, seconds, tokens = [], 0.0, 0
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        t0 = time.perf_counter()
        preds += fused.generate([r["prompt"] for r in chunk], GenerationSpec(max_new_tokens=n_new))
        seconds += time.perf_counter() - t0
        tokens += fused.tokens_generated
    hits = exact_match(preds, [r["target"] for r in rows], "strip", "none")
    ll = fused.loglik([(r["prompt"], r["target"]) for r in rows])
    return {"em": sum(hits) / len(hits), "loglik": sum(t for t, _ in ll) / len(ll)}, seconds, tokens


def _plain(model: Any, tok: Any) -> Any:
    """A model alone, decoded by the same loop (no experts): the fair speed baseline."""
    from skillgraft.transfer.fused import FusedModel

    return FusedModel(model, tok, [], "proxy")


def run_transfer_study(spec: TransferStudySpec, progress: ProgressFn = no_progress) -> dict[str, Any]:
    from skillgraft.bench.build import build
    from skillgraft.transfer.fused import ExpertPair, FusedModel

    manifest = build(spec.profile, spec.cache, progress)
    skills = check_skills(manifest, spec.skills)
    large, tok = load(manifest.model_dir("base-large"))
    small, _ = load(manifest.model_dir("base"))
    res = new_results(manifest, skills, spec.command)
    rows_out, speed = [], {"large": [0.0, 0], **{m: [0.0, 0] for m in spec.methods}}
    experts = {s: load(manifest.model_dir(f"experts/{s}-full"))[0] for s in skills}
    for i, s in enumerate(skills):
        progress("transfer study", i, len(skills))
        rows = _rows(manifest.data_path(s, "test"), spec.limit)
        sc: dict[str, dict[str, float]] = {}
        sc["large_base"], t, n = _score_fused(_plain(large, tok), rows, spec.batch_size)
        speed["large"][0] += t
        speed["large"][1] += n
        sc["large_ft"], _, _ = _score_fused(
            _plain(load(manifest.model_dir(f"experts-large/{s}-full"))[0], tok), rows, spec.batch_size
        )
        sc["small_expert"], _, _ = _score_fused(_plain(experts[s], tok), rows, spec.batch_size)
        for m in spec.methods:
            fused = FusedModel(large, tok, [ExpertPair(experts[s], small, spec.alpha, s)], m)
            sc[m], t, n = _score_fused(fused, rows, spec.batch_size)
            speed[m][0] += t
            speed[m][1] += n
        rows_out += _gap_rows(s, sc)
    if spec.multi and len(skills) > 1:
        rows_out += _multi(spec, manifest, skills, large, small, tok, experts)
    progress("transfer study", len(skills), len(skills))
    res["transfer"] = rows_out
    tps = {k: (v[1] / v[0] if v[0] else 0.0) for k, v in speed.items()}
    res["transfer_speed"] = {
        "large_tokens_per_s": tps["large"],
        "fused_tokens_per_s": {m: tps[m] for m in spec.methods},
        "slowdown": {m: (tps["large"] / tps[m] if tps[m] else None) for m in spec.methods},
        "params": {
            "large": sum(p.numel() for p in large.parameters()),
            "small": sum(p.numel() for p in small.parameters()),
        },
    }
    return res


def _gap_rows(skill: str, sc: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    lo, hi = sc["large_base"], sc["large_ft"]
    out = []
    for method, v in sc.items():
        gap_em = (v["em"] - lo["em"]) / (hi["em"] - lo["em"]) if hi["em"] != lo["em"] else None
        gap_ll = (v["loglik"] - lo["loglik"]) / (hi["loglik"] - lo["loglik"]) if hi["loglik"] != lo["loglik"] else None
        out.append(
            {
                "skill": skill,
                "method": method,
                "em": v["em"],
                "loglik": v["loglik"],
                "gap_closed": gap_em,
                "gap_closed_loglik": gap_ll,
            }
        )
    return out


def _multi(
    spec: TransferStudySpec, manifest: Any, skills: list[str], large: Any, small: Any, tok: Any, experts: dict[str, Any]
) -> list[dict[str, Any]]:
    """All experts at once on the mixed prompt set (each skill's prompts carry their own tag)."""
    from skillgraft.transfer.fused import ExpertPair, FusedModel

    per = max(1, (spec.limit or 100) // len(skills))
    rows = [r for s in skills for r in _rows(manifest.data_path(s, "test"), per)]
    pairs = [ExpertPair(experts[s], small, spec.alpha, s) for s in skills]
    sc: dict[str, dict[str, float]] = {}
    sc["large_base"], _, _ = _score_fused(_plain(large, tok), rows, spec.batch_size)
    ft_scores = []
    for s in skills:  # the "directly fine-tuned" reference on a mixed set: each large expert on its own rows
        own = _rows(manifest.data_path(s, "test"), per)
        ft_scores.append(
            _score_fused(_plain(load(manifest.model_dir(f"experts-large/{s}-full"))[0], tok), own, spec.batch_size)[0]
        )
    sc["large_ft"] = {k: sum(x[k] for x in ft_scores) / len(ft_scores) for k in ("em", "loglik")}
    for m in spec.methods:
        sc[m], _, _ = _score_fused(FusedModel(large, tok, pairs, m), rows, spec.batch_size)
    for m in ("proxy", "dlf"):  # and with the prompt gate (combine.prompt_gate) choosing experts per prompt
        if m in spec.methods:
            sc[f"{m}+gate"], _, _ = _score_fused(FusedModel(large, tok, pairs, m, gate=True), rows, spec.batch_size)
    return _gap_rows("+".join(skills), sc)
