"""``study route``: do routers pick the right LoRA skill per prompt, and what does routing keep end to end?

On a SkillBench build, every LoRA expert of the chosen skills is held unmerged by one :class:`SkillRuntime`
over the base. The test set is *mixed*: the first ``limit`` test rows of every skill together, each prompt
with its own skill's format (no skill label is given to the model). Measured, all by the evaluation harness
(greedy exact match):

* **routing accuracy** of each router: Arrow (no labels; centred, and ``arrow-uncentred`` as published),
  centroid (``centroid_examples`` labelled training prompts per skill) and classifier (``classifier_examples``
  per skill) — the fraction of mixed prompts sent to their own skill, per skill, and the confusion counts;
* **end to end**, per skill and normalized by each expert's own accuracy on its skill: the base alone, each
  expert on its own prompts (the oracle router: ≡ 100% normalized), every router, Arrow per token
  (``arrow-token``), and the two training-free merges the runtime computes exactly in one slot — all skills at
  1/n (linear) and at 1 (task arithmetic, λ 1);
* on profiles with a larger base (the tiny ``full`` profile), **multi-skill logit transfer** on the mixed
  prompts: the small full-fine-tuned experts steering the large base all at once, with the prompt gate, with
  each router (centroid/classifier on the large base's hidden states), and with the oracle choice; gap closed
  against the large base fine-tuned directly on each skill. First at α = 1; then with each expert's α chosen
  from ``alpha_grid`` by exact match on the first ``limit`` rows of its own skill's *val* split (ties: the
  smaller α; the test rows are never seen by the choice).

The best fixed merge and the best learned merge of the same experts are measured by ``study merge`` and
``benchmarks/compose_real.py`` (minutes per merge on the real profile); pass their results files to put them
beside the routed rows (``reference``).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skillgraft.progress import ProgressFn, no_progress
from skillgraft.study.common import check_skills, load, new_results

ROUTERS = ("arrow", "centroid", "classifier")


@dataclass(frozen=True)
class RouteStudySpec:
    profile: str = "quick"
    cache: Path | None = None
    skills: tuple[str, ...] = ()
    limit: int | None = 50
    routers: tuple[str, ...] = ROUTERS
    arrow_token: bool = True
    centroid_examples: int = 8
    classifier_examples: int = 64
    batch_size: int = 32
    transfer: bool = True
    alpha_grid: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0)  # transfer: each expert's α picked on val; () or (1,) skips
    references: tuple[Path, ...] = ()  # study merge / compose results JSON to compare with
    command: str = ""


class _Fixed:
    """A router stand-in that sends every prompt to one mix (experts alone, merges, the base)."""

    def __init__(self, mix: tuple) -> None:
        self.mix = mix

    def route(self, runtime: Any, prompts: Sequence[str]) -> list[tuple]:
        return [self.mix] * len(prompts)


def _train_prompts(manifest: Any, skill: str, n: int) -> list[str]:
    with open(manifest.data_path(skill, "train")) as f:
        rows = [json.loads(line) for _, line in zip(range(n), f)]
    return [r["prompt"] for r in rows]


def run_route_study(spec: RouteStudySpec, progress: ProgressFn = no_progress) -> dict[str, Any]:
    from skillgraft.bench.build import build
    from skillgraft.errors import InputError
    from skillgraft.eval.tasks import read_jsonl, task_from_examples
    from skillgraft.route.routers import Router, build_router
    from skillgraft.route.runtime import SkillRuntime
    from skillgraft.skill.peft import import_lora

    for r in spec.routers:
        if r not in ROUTERS:
            raise InputError(f"unknown router {r!r}", hint=f"use any of {', '.join(ROUTERS)}")
    bad = [a for a in spec.alpha_grid if not (0 < a < float("inf"))]
    if bad:
        raise InputError(f"--alpha {bad[0]} is not a positive number", hint="pass α values > 0, e.g. --alpha 1.5")
    refs = [_reference(p) for p in spec.references]  # bad files fail before any work
    manifest = build(spec.profile, spec.cache, progress)
    skills = [s for s in check_skills(manifest, spec.skills) if f"experts/{s}-lora" in manifest.models]
    if len(skills) < 2:
        raise InputError(f"routing needs two or more LoRA experts; the {spec.profile} build has {len(skills)}")
    res = new_results(manifest, skills, spec.command)
    base_dir = manifest.model_dir("base")
    model, tok = load(base_dir)
    rt = SkillRuntime(model, tok)
    tasks = [task_from_examples(s, read_jsonl(manifest.data_path(s, "test"))).head(spec.limit) for s in skills]
    prompts = [(s, e.prompt) for s, t in zip(skills, tasks) for e in t.examples]
    with tempfile.TemporaryDirectory(prefix="skillgraft-route-") as tmp:
        for s in skills:
            out = Path(tmp) / f"{s}.skill"
            import_lora(manifest.model_dir(f"experts/{s}-lora"), out, name=s, base=base_dir, overwrite=True)
            rt.load(out, key=s)
        shas = {s: rt.skills[s].sha256 for s in skills}
        routers, routing = {}, []
        uncentred = ("arrow-uncentred",) if "arrow" in spec.routers else ()  # the paper's own Arrow scores
        for method in (*spec.routers, *uncentred):
            n = {"centroid": spec.centroid_examples, "classifier": spec.classifier_examples}.get(method, 0)
            examples = {s: _train_prompts(manifest, s, n) for s in skills} if n else None
            t0 = time.perf_counter()
            if method == "arrow-uncentred":  # without our centring (routers.py), for comparison
                routers[method] = Router("arrow", sorted(shas), shas, {})
            else:
                routers[method] = build_router(method, rt, shas, examples)
            built = time.perf_counter() - t0
            t0 = time.perf_counter()
            chosen = routers[method].choose(rt, [p for _, p in prompts], spec.batch_size)
            routing.append(_routing_row(method, n, skills, prompts, chosen, built, time.perf_counter() - t0))
        rows: list[dict[str, Any]] = []

        def run(name: str, kind: str, router: Any, route: str = "fixed", only: Sequence[str] = ()) -> dict[str, Any]:
            from skillgraft.eval.harness import evaluate_model
            from skillgraft.route.routed import RoutedModel

            progress(f"route study: {name}", len(rows), len(rows) + 1)
            t0 = time.perf_counter()
            routed = RoutedModel(rt, router, route)
            chosen = [(s, t) for s, t in zip(skills, tasks) if not only or s in only]
            em_only = [dataclasses.replace(t, metrics=("exact_match",)) for _, t in chosen]
            results = evaluate_model(routed, tok, em_only, batch_size=spec.batch_size)
            row = {
                "method": name,
                "kind": kind,
                "scores": {s: {"em": r.exact_match or 0.0} for (s, _), r in zip(chosen, results)},
            }
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
            return row

        own = {}
        for s in skills:  # each expert on its own skill's prompts: the oracle router, and the normalizer
            ex = run(f"expert:{s}", "expert", _Fixed(((s, 1.0),)), only=(s,))
            own[s] = ex["scores"][s]["em"]
        rows.clear()
        rows.append(
            {"method": "experts (oracle routing)", "kind": "oracle", "scores": {s: {"em": own[s]} for s in skills}}
        )
        run("base", "base", _Fixed(()))
        for method, router in routers.items():
            run(f"routed:{method}", "router", router, "arrow" if method == "arrow-uncentred" else method)
        if spec.arrow_token:
            run("routed:arrow-token", "router", None, "arrow-token")
        run("merge:linear (1/n)", "merge", _Fixed(tuple((s, 1.0 / len(skills)) for s in skills)))
        run("merge:task_arithmetic (λ 1)", "merge", _Fixed(tuple((s, 1.0) for s in skills)))
        for row in rows:
            _normalize(row, own, skills)
        for ref in refs:
            rows += _reference_rows(ref, skills)
        res["route"] = {
            "settings": {
                "limit": spec.limit,
                "centroid_examples": spec.centroid_examples,
                "classifier_examples": spec.classifier_examples,
                "mixed_prompts": len(prompts),
            },
            "routing": routing,
            "end_to_end": rows,
            "expert_em": own,
        }
    if spec.transfer and "base-large" in manifest.models:
        res["transfer_alpha"] = {}
        res["transfer"] = _transfer(spec, manifest, skills, progress, res["transfer_alpha"])
    progress("route study", 1, 1)
    return res


def _routing_row(
    method: str, n: int, skills: list[str], prompts: list[tuple[str, str]], chosen: list[str], built: float, t: float
) -> dict[str, Any]:
    confusion = {s: {c: 0 for c in skills} for s in skills}
    for (s, _), c in zip(prompts, chosen):
        confusion[s][c] += 1
    per = {s: confusion[s][s] / max(1, sum(confusion[s].values())) for s in skills}
    right = sum(confusion[s][s] for s in skills)
    return {
        "router": method,
        "examples_per_skill": n,
        "accuracy": right / len(prompts),
        "per_skill": per,
        "confusion": confusion,
        "build_seconds": built,
        "route_seconds": t,
    }


def _normalize(row: dict[str, Any], own: dict[str, float], skills: list[str]) -> None:
    em = {s: row["scores"][s]["em"] for s in skills if s in row["scores"]}
    row["normalized"] = {s: (em[s] / own[s] if own[s] > 0 else 0.0) for s in em}
    row["mean_normalized"] = sum(row["normalized"].values()) / len(em) if em else None
    row["mean_em"] = sum(em.values()) / len(em) if em else None


def _reference(path: Path) -> dict[str, Any]:
    from skillgraft.eval.report import load_results

    data = load_results(path)
    return {"path": str(path), "data": data}


def _reference_rows(ref: dict[str, Any], skills: list[str]) -> list[dict[str, Any]]:
    """The best LoRA merge and each learned composition over exactly these skills, from another study's file."""
    data, out = ref["data"], []
    same = [
        r for r in data.get("merge") or [] if r.get("experts") == "lora" and set(r.get("scores", {})) == set(skills)
    ]
    if same:
        best = max(same, key=lambda r: r.get("mean_normalized") or 0.0)
        out.append(_ref_row(f"best fixed merge: {best['method']}", best, ref["path"]))
    for r in data.get("compose") or []:
        if r.get("experts") == "lora" and set(r.get("scores", {})) == set(skills):
            out.append(_ref_row(f"learned merge: {r.get('learn')}", r, ref["path"]))
    return out


def _ref_row(name: str, r: dict[str, Any], path: str) -> dict[str, Any]:
    return {
        "method": name,
        "kind": "reference",
        "scores": r.get("scores"),
        "normalized": r.get("normalized"),
        "mean_normalized": r.get("mean_normalized"),
        "mean_em": r.get("mean_em"),
        "source": path,
    }


def _transfer(
    spec: RouteStudySpec, manifest: Any, skills: list[str], progress: ProgressFn, alphas: dict[str, Any]
) -> list[dict[str, Any]]:
    """Multi-skill logit transfer on the mixed prompts: all experts, the prompt gate, each router, the oracle —
    at α = 1, then (``alpha_grid``) with each expert's α chosen on its skill's val rows, recorded in ``alphas``."""
    import torch

    from skillgraft.route.routers import build_router
    from skillgraft.route.runtime import SkillRuntime
    from skillgraft.study.transfer import _gap_rows, _plain, _rows, _score_fused
    from skillgraft.transfer.fused import ExpertPair, FusedModel

    full = [
        s for s in skills if f"experts/{s}-full" in manifest.models and f"experts-large/{s}-full" in manifest.models
    ]
    if len(full) < 2:
        return []
    large, tok = load(manifest.model_dir("base-large"))
    small, _ = load(manifest.model_dir("base"))
    per = spec.limit or 100
    rows = [r for s in full for r in _rows(manifest.data_path(s, "test"), per)]
    label = {r["prompt"]: i for i, s in enumerate(full) for r in _rows(manifest.data_path(s, "test"), per)}
    pairs = [ExpertPair(load(manifest.model_dir(f"experts/{s}-full"))[0], small, 1.0, s) for s in full]
    sc: dict[str, dict[str, float]] = {}
    progress("route study: transfer", 0, 1)
    sc["large_base"], _, _ = _score_fused(_plain(large, tok), rows, spec.batch_size)
    ft = [
        _score_fused(
            _plain(load(manifest.model_dir(f"experts-large/{s}-full"))[0], tok),
            _rows(manifest.data_path(s, "test"), per),
            spec.batch_size,
        )[0]
        for s in full
    ]
    sc["large_ft"] = {k: sum(x[k] for x in ft) / len(ft) for k in ("em", "loglik")}
    sc["proxy"], _, _ = _score_fused(FusedModel(large, tok, pairs, "proxy"), rows, spec.batch_size)
    sc["proxy+gate"], _, _ = _score_fused(FusedModel(large, tok, pairs, "proxy", gate=True), rows, spec.batch_size)
    rt = SkillRuntime(large, tok)  # routers score the large base's hidden states

    def oracle(prompts: Sequence[str]) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.tensor([label[p] for p in prompts]), len(full)).float()

    routed: dict[str, Any] = {}
    for method in [r for r in spec.routers if r != "arrow"]:  # Arrow needs LoRA experts; these are full
        n = spec.centroid_examples if method == "centroid" else spec.classifier_examples
        router = build_router(method, rt, dict.fromkeys(full, ""), {s: _train_prompts(manifest, s, n) for s in full})
        routed[method] = router.gate(rt, full)
        fused = FusedModel(large, tok, pairs, "proxy", router=routed[method])
        sc[f"proxy+route:{method}"], _, _ = _score_fused(fused, rows, spec.batch_size)
    routed["oracle"] = oracle
    sc["proxy+route:oracle"], _, _ = _score_fused(
        FusedModel(large, tok, pairs, "proxy", router=oracle), rows, spec.batch_size
    )
    if set(spec.alpha_grid) - {1.0}:  # each expert's α chosen on its skill's val rows (test rows untouched)
        tuned = []
        for s, pair in zip(full, pairs):
            val = _rows(manifest.data_path(s, "val"), per)
            em = {
                a: _score_fused(
                    FusedModel(large, tok, [dataclasses.replace(pair, alpha=a)], "proxy"), val, spec.batch_size
                )[0]["em"]
                for a in spec.alpha_grid
            }
            best = max(spec.alpha_grid, key=lambda a: (em[a], -a))  # ties: the smaller α
            tuned.append(dataclasses.replace(pair, alpha=best))
            alphas[s] = {"chosen": best, "val_em": {str(a): v for a, v in em.items()}}
        for method, router in routed.items():
            fused = FusedModel(large, tok, tuned, "proxy", router=router)
            sc[f"proxy(α val)+route:{method}"], _, _ = _score_fused(fused, rows, spec.batch_size)
    progress("route study: transfer", 1, 1)
    return _gap_rows("+".join(full), sc)
