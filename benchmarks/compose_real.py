"""Learned composition (``skillgraft compose``) on a built SkillBench profile, scored like the merge study.

Fits the coefficients on the first ``--examples`` rows of each skill's *val* split (entropy: their prompts only),
merges, then scores the merged model on the first ``--limit`` rows of each skill's *test* split (greedy exact
match, the harness the merge study uses) and runs the general-ability check. Normalized accuracy divides by each
expert's own test EM, read from the merge-study results given by ``--study`` (same build, same rows); the best
training-free merge of that study is recorded beside it. One row is appended to ``--out`` per run.

    python benchmarks/compose_real.py --cache /tmp/sgcache/real --experts lora --skills cipher,compare,extract,list \
        --learn blockwise --study benchmarks/results/real_merge_lora4.json --out benchmarks/results/real_compose.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, required=True, help="a built profile directory (manifest.json)")
    ap.add_argument("--experts", default="lora", help="lora | full")
    ap.add_argument("--skills", required=True, help="comma-separated skills")
    ap.add_argument("--learn", default="blockwise")
    ap.add_argument("--examples", type=int, default=16)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--reg", type=float, default=0.01)
    ap.add_argument("--init", type=float, default=0.3)
    ap.add_argument("--bounds", default="0,1")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--granularity", default=None)
    ap.add_argument("--score", default="loss")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split", default="val", help="rows the coefficients are fitted on")
    ap.add_argument("--limit", type=int, default=50, help="test rows per skill")
    ap.add_argument("--study", type=Path, help="merge-study results of the same build (expert EM, baseline)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    from skillgraft.bench.build import BenchManifest
    from skillgraft.study.common import machine
    from skillgraft.study.compose import compose_row

    m = BenchManifest.load(args.cache)
    skills = args.skills.split(",")
    lo, hi = (float(x) for x in args.bounds.split(","))
    own, baseline = _expert_em(args.study, args.experts, skills)
    settings = dict(
        learn=args.learn, examples=args.examples, granularity=args.granularity, init=args.init, bounds=(lo, hi),
        steps=args.steps, lr=args.lr, reg=args.reg, batch=args.batch, score=args.score, seed=args.seed,
    )  # fmt: skip
    row = compose_row(m, args.experts, skills, own, args.limit, split=args.split, **settings)
    row.update(fit_split=args.split, baseline=baseline, machine=machine())
    row["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    row["command"] = " ".join(["python", *sys.argv])
    norm = row["normalized"]
    doc = {"kind": "skillgraft-study", "version": 1, "profile": m.profile, "skills": [], "compose": []}
    if args.out.exists():
        doc = json.loads(args.out.read_text())
    doc["skills"] = sorted(set(doc["skills"]) | set(skills))
    doc["compose"].append(row)
    tmp_out = args.out.with_suffix(".tmp")
    tmp_out.write_text(json.dumps(doc, indent=1))
    tmp_out.replace(args.out)
    mn, gen = row["mean_normalized"], row["general"]
    print(
        f"{args.learn} {args.experts} {len(skills)} skills: normalized {mn if mn is None else f'{100 * mn:.1f}%'}  "
        f"per skill { ({s: round(v, 3) if v is not None else None for s, v in norm.items()}) }  "
        f"baseline {baseline}  compose {row['compose_seconds']:.0f} s  facts {gen and gen.get('facts_em')}"
    )


def _expert_em(study: Path | None, kind: str, skills: list[str]) -> tuple[dict[str, float], dict | None]:
    """Each expert's EM on its own skill, and the best training-free merge of the same skills, from a study."""
    if study is None:
        return {}, None
    d = json.loads(study.read_text())
    table = d["experts"][kind]
    own = {s: table[s][s]["em"] for s in skills if s in table}
    rows = [r for r in d.get("merge", []) if r["experts"] == kind and r["n_skills"] == len(skills)]
    rows += [r for r in d.get("lambda_sweep", []) if r.get("experts") == kind and r.get("n_skills") == len(skills)]
    best = max(rows, key=lambda r: r["mean_normalized"], default=None)
    base = None
    if best:
        base = {"method": best["method"], "lambda": best.get("lambda"), "mean_normalized": best["mean_normalized"]}
    return own, base


if __name__ == "__main__":
    main()
