"""``study merge``: experts, interference and every merge method on SkillBench, with λ sweeps.

Each merge runs through the real engine (inputs: full fine-tuned checkpoints or PEFT adapter directories),
writes a skill pack to a temp dir, is applied in memory to the loaded base and scored on its skills.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skillgraft.bench.build import BenchManifest, Profile
from skillgraft.bench.real import RealProfile
from skillgraft.progress import ProgressFn, no_progress
from skillgraft.study.common import Scores, check_skills, general, load, new_results, score

DEFAULT_METHODS = (
    "linear",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "magnitude_prune",
    "pcb",
    "consensus",
    "fisher",
    "regmean",
)
SWEEP = ("task_arithmetic", "ties")


@dataclass(frozen=True)
class MergeStudySpec:
    profile: str | Profile | RealProfile = "quick"  # a profile name or object
    cache: Path | None = None
    skills: tuple[str, ...] = ()  # empty: every skill of the build
    methods: tuple[str, ...] = DEFAULT_METHODS
    experts: tuple[str, ...] = ("full", "lora")
    n_skills: tuple[int, ...] = ()  # merge the first n skills for each n; empty: all chosen skills
    lambdas: tuple[float, ...] = (0.3, 0.5, 0.7, 1.0)
    sweep_methods: tuple[str, ...] = SWEEP
    limit: int | None = None  # test examples per skill
    seed: int = 0
    command: str = ""
    packs: tuple[tuple[str, str, str], ...] = ()  # (kind, skill, library reference): experts stored as packs
    library: Path | None = None
    interference: bool = True  # score every expert on every skill (off: on its own skill only, as the demo does)
    # Merge rows on a backend (compose.backends): None keeps the one-process path (packs applied to one loaded
    # model, general check per row); a number of workers (1: in this process, N > 1: local Ray) or a Ray address
    # merges each row in memory and scores it on a worker — no general check on those rows.
    workers: int | None = None
    ray_address: str | None = None


class _Study:
    def __init__(self, spec: MergeStudySpec, manifest: BenchManifest, skills: list[str], progress: ProgressFn):
        self.spec, self.m, self.skills, self.progress = spec, manifest, skills, progress
        self.base_dir = manifest.model_dir("base")
        self.model, self.tok = load(self.base_dir)
        self.tmp = tempfile.TemporaryDirectory(prefix="skillgraft-study-")
        self.own: dict[str, dict[str, float]] = {}  # kind -> skill -> expert EM on its own skill

    def score_with(self, pack: Path | None, skills: list[str]) -> tuple[Scores, dict[str, Any] | None]:
        """Scores on ``skills`` with ``pack`` applied, and the general-ability check where the build has one."""
        from skillgraft.skill.apply import apply, unapply

        if pack is not None:
            apply(self.model, [pack])
        try:
            return score(self.model, self.tok, self.m, skills, self.spec.limit, loglik=False), general(
                self.model, self.tok, self.m
            )
        finally:
            unapply(self.model)

    def skills_for(self, kind: str) -> list[str]:
        """The chosen skills that have an expert of ``kind`` (real profiles fine-tune only some skills fully)."""
        if any(k == kind for k, _, _ in self.spec.packs):
            return [s for s in self.skills if any(k == kind and x == s for k, x, _ in self.spec.packs)]
        base_kind = kind.removesuffix("-pack")
        return [s for s in self.skills if f"experts/{s}-{base_kind}" in self.m.models]

    def expert_source(self, kind: str, skill: str) -> str:
        refs = {(k, s): ref for k, s, ref in self.spec.packs}
        if (kind, skill) in refs:
            return refs[(kind, skill)]
        return str(self.m.model_dir(f"experts/{skill}-{kind}"))

    def expert_pack(self, kind: str, skill: str) -> Path:
        """The expert as a skill pack (a LoRA is imported exactly, a full fine-tune extracted densely)."""
        if any(k == kind for k, _, _ in self.spec.packs):
            from skillgraft.library import Library, resolve_skill

            return resolve_skill(self.expert_source(kind, skill), Library(self.spec.library))
        out = Path(self.tmp.name) / f"expert-{kind}-{skill}.skill"
        if kind == "lora":
            from skillgraft.skill.peft import import_lora

            import_lora(self.expert_source(kind, skill), out, base=self.base_dir, overwrite=True)
        else:
            from skillgraft.skill.extract import ExtractSpec, extract

            extract(
                ExtractSpec(
                    base=self.base_dir, tuned=Path(self.expert_source(kind, skill)), out=out, dense=True, overwrite=True
                )
            )
        return out

    def experts(self, kind: str) -> tuple[dict[str, Scores], dict[str, Any]]:
        """The interference matrix (each expert on every skill) and each expert's general-ability check."""
        table, gen = {}, {}
        for s in self.skills_for(kind):
            on = self.skills if self.spec.interference else [s]
            table[s], gen[s] = self.score_with(self.expert_pack(kind, s), on)
        self.own[kind] = {s: table[s][s]["em"] for s in table}
        return table, gen

    def examples_file(self, skills: list[str]) -> Path:
        path = Path(self.tmp.name) / f"calib-{'-'.join(skills)}.jsonl"
        rows = []
        for s in skills:
            with open(self.m.data_path(s, "train")) as f:
                rows += [json.loads(line) for _, line in zip(range(32), f)]
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        return path

    def merge(self, kind: str, skills: list[str], method: str, params: dict[str, Any]) -> dict[str, Any]:
        from skillgraft.merge.config import from_dict
        from skillgraft.merge.engine import MergeOptions, merge

        cfg = from_dict(self.config(kind, skills, method, params))
        out = Path(self.tmp.name) / "merged.skill"
        t0 = time.perf_counter()
        merge(cfg, MergeOptions(out=out, out_format="skill", overwrite=True, library=self.spec.library))
        seconds = time.perf_counter() - t0
        scores, gen = self.score_with(out, skills)
        return self.row(kind, skills, method, params, scores, seconds, gen)

    def config(self, kind: str, skills: list[str], method: str, params: dict[str, Any]) -> dict[str, Any]:
        """The merge of one row as a plain config mapping (what a backend worker merges)."""
        from skillgraft.merge.registry import get_method

        cfg: dict[str, Any] = {
            "base": str(self.base_dir),
            "method": method,
            "parameters": params,
            "seed": self.spec.seed,
            "inputs": [self.expert_source(kind, s) for s in skills],
        }
        if get_method(method).stats:
            cfg["examples"], cfg["num_examples"] = str(self.examples_file(skills)), 32 * len(skills)
        return cfg

    def row(
        self,
        kind: str,
        skills: list[str],
        method: str,
        params: dict[str, Any],
        scores: Scores,
        seconds: float,
        gen: Any,
    ) -> dict[str, Any]:
        norm = {s: (scores[s]["em"] / self.own[kind][s]) if self.own[kind][s] > 0 else 0.0 for s in skills}
        return {
            "method": method,
            "experts": kind,
            "n_skills": len(skills),
            "params": params,
            "lambda": params.get("lambda", 1.0),
            "scores": scores,
            "normalized": norm,
            "mean_normalized": sum(norm.values()) / len(norm),
            "mean_em": sum(v["em"] for v in scores.values()) / len(scores),
            "seconds": seconds,
            "general": gen,
        }


def run_merge_study(spec: MergeStudySpec, progress: ProgressFn = no_progress) -> dict[str, Any]:
    """Run the study; returns the results document (see ``skillgraft report``)."""
    from skillgraft.bench.build import build
    from skillgraft.merge.registry import get_method

    for m in (*spec.methods, *spec.sweep_methods):
        get_method(m)  # unknown names fail before any work
    manifest = build(spec.profile, spec.cache, progress)
    skills = check_skills(manifest, spec.skills)
    study = _Study(spec, manifest, skills, progress)
    res = new_results(manifest, skills, spec.command)
    res["base"], base_general = study.score_with(None, skills)
    res["experts"], res["merge"], res["lambda_sweep"] = {}, [], []
    if base_general is not None:
        res["general"] = {"base": base_general, "experts": {}}
    plan = {kind: _sizes(spec.n_skills, len(study.skills_for(kind))) for kind in spec.experts}
    total = sum(
        len(sizes) * (len(spec.methods) + len(spec.sweep_methods) * len(spec.lambdas)) for sizes in plan.values()
    )
    done = 0
    for kind, sizes in plan.items():
        res["experts"][kind], gen = study.experts(kind)
        if base_general is not None:
            res["general"]["experts"][kind] = gen
        kind_skills = study.skills_for(kind)
        for n in sizes:
            runs: list[tuple[str, dict[str, Any]]] = [(m, {}) for m in spec.methods]
            runs += [(m, {"lambda": lam}) for m in spec.sweep_methods for lam in spec.lambdas]
            rows = _on_backend(study, kind, kind_skills[:n], runs) if _parallel(spec) else None
            for i, (method, params) in enumerate(runs):
                progress("merge study", done, total)
                r = rows[i] if rows is not None else study.merge(kind, kind_skills[:n], method, params)
                if params:
                    keys = ("method", "experts", "n_skills", "lambda", "mean_normalized", "mean_em", "general")
                    res["lambda_sweep"].append({k: r[k] for k in keys})
                else:
                    res["merge"].append(r)
                done += 1
    progress("merge study", total, total)
    study.tmp.cleanup()
    return res


def _parallel(spec: MergeStudySpec) -> bool:
    return spec.workers is not None or spec.ray_address is not None


def _on_backend(study: _Study, kind: str, skills: list[str], runs: list[tuple[str, dict[str, Any]]]) -> list[dict]:
    """Every run of one (kind, skills) group merged in memory and scored on backend workers (in order)."""
    import dataclasses

    from skillgraft.compose.backends import ScorerArgs, open_backend
    from skillgraft.eval.tasks import read_jsonl, task_from_examples

    tasks = tuple(
        dataclasses.replace(
            task_from_examples(s, read_jsonl(study.m.data_path(s, "test"))), metrics=("exact_match",)
        ).head(study.spec.limit)
        for s in skills
    )
    args = ScorerArgs(str(study.base_dir), tasks, 64, 1)
    backend = open_backend(args, study.spec.workers, study.spec.ray_address, lambda msg: study.progress(msg, 0, 0))
    try:
        recipes = [study.config(kind, skills, m, p) for m, p in runs]
        out = []
        for (method, params), r in zip(runs, backend.map(recipes)):
            if r.get("error"):
                from skillgraft.errors import NumericError

                raise NumericError(f"{method} {params}: {r['error']}")
            scores = {s: {"em": r["scores"][s]} for s in skills}
            out.append(study.row(kind, skills, method, params, scores, r["seconds"], None))
        return out
    finally:
        backend.close()


def _sizes(n_skills: tuple[int, ...], available: int) -> list[int]:
    """Merge sizes: each asked n between 2 and the skills available (n past it: all of them), else all."""
    sizes = sorted({min(n, available) for n in n_skills if n >= 2}) if n_skills else []
    return [n for n in sizes if n >= 2] or ([available] if available >= 2 else [])
