"""``skillgraft evolve`` on the real SkillBench profile: search merge recipes over the cipher, compare, extract and
list LoRA experts (scored on their val splits), then score the best recipe on the test splits like the merge study.

Usage: .venv/bin/python benchmarks/evolve_real.py [--cache /tmp/sgcache] [--workers 2] [--population 12]
       [--generations 12] [--limit 8] [--test-limit 50] [--out benchmarks/results/evolve_real.json]
       .venv/bin/python benchmarks/evolve_real.py --time-one   # one candidate, one process: size the run first
Sizing (2 cores, 2026-12-03): one candidate, 4 tasks × 8 val rows, one thread, takes 5.5 s (task arithmetic) to
10 s (TIES: its per-tensor trim is most of the merge); 12 × 12 = 144 candidates on 2 workers ≈ 10-15 min, inside
the 30-minute target with room for a loaded machine. Scale --population/--generations/--limit from --time-one.
Writes the search config and run under --work-dir (default <cache>/evolve-real); the results JSON has the wall
time, the evolve summary and curve, and the best recipe's test exact match, raw and normalized by each expert's
own accuracy (mean over skills of merged EM / expert EM, as ``study merge`` reports it), next to the merge
study's fixed-recipe numbers on the same build where benchmarks/results/real_merge_lora4.json has them.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

SKILLS = ("cipher", "compare", "extract", "list")
REFERENCE = Path(__file__).parent / "results" / "real_merge_lora4.json"


def write_config(manifest, a: argparse.Namespace, work: Path) -> Path:
    import yaml

    cfg = {
        "base": str(manifest.model_dir("base")),
        "inputs": [str(manifest.model_dir(f"experts/{s}-lora")) for s in SKILLS],
        "tasks": [str(manifest.data_path(s, "val")) for s in SKILLS],
        "limit": a.limit,
        "methods": a.methods.split(","),
        "layer_groups": a.layer_groups,
        "weight": [0.0, 1.5],
        "density": [0.1, 1.0],
        "select_inputs": False,
        "population": a.population,
        "generations": a.generations,
        "seed": a.seed,
        "batch_size": 64,
        "threads_per_worker": a.threads,
    }
    work.mkdir(parents=True, exist_ok=True)
    path = work / "search.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def time_one(cfg: Path) -> dict:
    """Merge one candidate (the search's start point, under each method) in memory and score it, in one process."""
    from skillgraft.compose.backends import ScorerArgs
    from skillgraft.compose.evolve import check_spec
    from skillgraft.compose.evolve_spec import load_spec
    from skillgraft.compose.scoring import Scorer, load_state
    from skillgraft.merge.config import from_dict
    from skillgraft.merge.engine import merge_in_memory

    t = time.perf_counter()
    prep = check_spec(load_spec(cfg))
    checks = time.perf_counter() - t
    args = ScorerArgs(prep.spec.base, prep.tasks, prep.spec.batch_size, prep.spec.threads_per_worker)
    t = time.perf_counter()
    scorer = Scorer(args.base, args.tasks, args.batch_size, args.threads)
    load = time.perf_counter() - t
    rows = []
    x0 = prep.layout.initial()
    for k, method in enumerate(prep.spec.methods):
        x = list(x0)
        if prep.layout.n_methods:
            x[k] += 0.1  # this method's gene highest
        recipe = prep.layout.decode(x)
        with scorer._threads():
            t = time.perf_counter()
            state = merge_in_memory(from_dict(recipe))
            merge_s = time.perf_counter() - t
            t = time.perf_counter()
            load_state(scorer.model, state)
            del state
            scores = scorer.evaluate()
            eval_s = time.perf_counter() - t
        rows.append({"method": method, "merge_seconds": merge_s, "load_and_score_seconds": eval_s, "scores": scores})
        print(f"{method}: merge {merge_s:.1f} s, load+score {eval_s:.1f} s, {scores}", flush=True)
    return {"checks_seconds": checks, "base_load_seconds": load, "candidates": rows}


def score_best(manifest, best_yaml: Path, work: Path, test_limit: int) -> dict:
    """Merge best.yaml with ``skillgraft merge`` and score it on the test splits (50 rows a skill, exact match)."""
    from skillgraft.cli.main import main as cli
    from skillgraft.study.common import general, load, score

    merged = work / "best-merged"
    if cli(["-q", "merge", str(best_yaml), "-o", str(merged), "--overwrite"]) != 0:
        raise SystemExit("skillgraft merge best.yaml failed")
    model, tok = load(merged)
    scores = score(model, tok, manifest, list(SKILLS), test_limit, loglik=False)
    own = expert_em(manifest, test_limit)
    norm = {s: (scores[s]["em"] / own[s]) if own[s] > 0 else 0.0 for s in SKILLS}
    return {
        "test_limit": test_limit,
        "scores": {s: scores[s]["em"] for s in SKILLS},
        "expert_em": own,
        "normalized": norm,
        "mean_normalized": sum(norm.values()) / len(norm),
        "mean_em": sum(scores[s]["em"] for s in SKILLS) / len(SKILLS),
        "general": general(model, tok, manifest),
    }


def expert_em(manifest, test_limit: int) -> dict[str, float]:
    """Each expert's EM on its own skill: the merge study's (same rows: its --limit 50) when recorded, else the
    build's (the whole test split)."""
    if REFERENCE.is_file() and test_limit == 50:
        table = json.loads(REFERENCE.read_text())["experts"]["lora"]
        if all(s in table for s in SKILLS):
            return {s: table[s][s]["em"] for s in SKILLS}
    return {s: manifest.accuracy[f"experts/{s}-lora"][s] for s in SKILLS}


def references() -> dict | None:
    """The merge study's fixed recipes on the same 4 LoRA skills (mean normalized test accuracy), if recorded."""
    if not REFERENCE.is_file():
        return None
    d = json.loads(REFERENCE.read_text())
    rows = {f"{r['method']}": r["mean_normalized"] for r in d.get("merge", []) if r.get("n_skills") == 4}
    rows.update({f"{r['method']} λ{r['lambda']}": r["mean_normalized"] for r in d.get("lambda_sweep", [])})
    return {"source": str(REFERENCE.name), "mean_normalized": rows}


def main() -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default="/tmp/sgcache", help="the cache holding the real build (<cache>/real)")
    ap.add_argument("--work-dir", default=None, help="where the config and the run go (default <cache>/evolve-real)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--population", type=int, default=12)  # CMA-ES's own default for the 16 genes: 4 + ⌊3 ln 16⌋
    ap.add_argument("--generations", type=int, default=12)
    ap.add_argument("--limit", type=int, default=8, help="val rows per skill scored per candidate")
    ap.add_argument("--layer-groups", type=int, default=3)
    ap.add_argument("--methods", default="task_arithmetic,ties,dare_ties")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test-limit", type=int, default=50)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "evolve_real.json"))
    ap.add_argument("--time-one", action="store_true", help="only time one candidate per method, in one process")
    ap.add_argument("--resume", action="store_true", help="continue an interrupted run in the work dir")
    a = ap.parse_args()

    from skillgraft.bench.build import BenchManifest
    from skillgraft.cli.main import main as cli
    from skillgraft.study.common import machine

    manifest = BenchManifest.load(Path(a.cache) / "real")
    work = Path(a.work_dir) if a.work_dir else Path(a.cache) / "evolve-real"
    cfg = write_config(manifest, a, work)
    if a.time_one:
        print(json.dumps(time_one(cfg), indent=1))
        return
    run = work / "run"
    argv = ["evolve", str(cfg), "--out-dir", str(run), "--workers", str(a.workers)]
    argv += ["--resume"] if a.resume else ["--overwrite"]
    t = time.perf_counter()
    if cli(argv) != 0:
        raise SystemExit("skillgraft evolve failed")
    wall = time.perf_counter() - t
    evolve = json.loads((run / "evolve.json").read_text())
    t = time.perf_counter()
    test = score_best(manifest, run / "best.yaml", work, a.test_limit)
    test["seconds"] = time.perf_counter() - t
    out = {
        "kind": "skillgraft-benchmark",
        "benchmark": "evolve_real",
        "machine": machine(),
        "skills": list(SKILLS),
        "command": "python benchmarks/evolve_real.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if v not in (None, False) and k != "out"),
        "search": {
            "config": evolve["config"],
            "wall_seconds": wall,
            "evaluation_seconds": evolve["evaluation_seconds"],
            "candidates": len(evolve["candidates"]),
            "mean_candidate_seconds": evolve["evaluation_seconds"] / len(evolve["candidates"]),
            "backend": evolve["backend"],
            "workers": evolve["workers"],
            "curve": evolve["curve"],
            "best": evolve["best"],
        },
        "best_on_test": test,
        "merge_study_reference": references(),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(
        f"evolve: {len(evolve['candidates'])} candidates in {wall / 60:.1f} min on {evolve['workers']} "
        f"{evolve['backend']} worker(s); best val fitness {evolve['best']['fitness']:.3f}; test mean normalized "
        f"{test['mean_normalized']:.3f} (mean EM {test['mean_em']:.3f}); wrote {a.out}"
    )


if __name__ == "__main__":
    main()
