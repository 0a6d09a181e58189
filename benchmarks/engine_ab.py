"""A/B of two skillgraft checkouts' merge engines on the same inputs and YAMLs (skillgraft only, interleaved).

For refactors of the engine: "no method slower than before". Inputs come from merge_vs_mergekit.py's synthetic
recipe (``--rel`` / ``--noise``: 1e-3 / 0.2 gives sparse bf16 deltas, 2e-2 / 1.0 dense ones).

    python benchmarks/engine_ab.py --old /tmp/old/src --new src --size 1b --workdir /tmp/ab
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import merge_vs_mergekit as mvm  # noqa: E402

CASES = {  # name -> (method, mergekit YAML? (with its dtype), extra parameters for our YAML)
    "task_arithmetic": ("task_arithmetic", True, {}),
    # mergekit YAMLs with dtype: bfloat16 (most published ones): computed in bf16 since the compute-dtype change
    "task_arithmetic_bf16": ("task_arithmetic", "bfloat16", {}),
    "ties_mergekit_bf16": ("ties", "bfloat16", {}),
    "ties_mergekit": ("ties", True, {}),
    "dare_ties_mergekit": ("dare_ties", True, {}),
    "ties_paper": ("ties", False, {"density": mvm.DENSITY}),
    "ties_position": ("ties", False, {"density": mvm.DENSITY, "mode": "mergekit", "tie_break": "position"}),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", type=Path, required=True, help="the src/ directory of the baseline checkout")
    p.add_argument("--new", type=Path, default=HERE.parent / "src")
    p.add_argument("--size", default="1b", choices=sorted(mvm.SIZES))
    p.add_argument("--rel", type=float, default=1e-3)
    p.add_argument("--noise", type=float, default=0.2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--workdir", type=Path, default=Path("/tmp/engine-ab"))
    p.add_argument("--out", type=Path, default=HERE / "results" / "engine_ab.json")
    a = p.parse_args()
    work = a.workdir
    work.mkdir(parents=True, exist_ok=True)
    base, tunes = work / "base", [work / "ft1", work / "ft2"]
    recipe = {"config": mvm.SIZES[a.size], "rel": a.rel, "noise": a.noise, "seed": 0, "version": mvm.GEN_VERSION}
    stamp = work / "recipe.json"
    if not stamp.exists() or json.loads(stamp.read_text()) != recipe:
        mvm.run_child("generate", {**recipe, "base": str(base), "tunes": list(map(str, tunes))}, work)
        stamp.write_text(json.dumps(recipe))
    mvm.warm([base, *tunes])
    results: dict = {"recipe": recipe, "machine": mvm.machine(), "cases": {}}
    for case in a.cases.split(","):
        method, mergekit, params = CASES[case]
        cfg = work / f"{case}.yaml"
        compute = mergekit if isinstance(mergekit, str) else "float32"
        text = (
            mvm.mk_yaml(method, base, tunes, compute)
            if mergekit
            else mvm.sg_yaml(method, base, tunes, mvm.WEIGHTS, params)
        )
        cfg.write_text(text)
        times: dict[str, list[float]] = {"old": [], "new": []}
        for rep in range(a.repeats):
            for side in ("old", "new") if rep % 2 == 0 else ("new", "old"):
                src = a.old if side == "old" else a.new
                out = work / f"out-{side}"
                cmd = [sys.executable, "-c", "import sys; from skillgraft.cli.main import main; sys.exit(main())"]
                cmd += ["-q", "merge", str(cfg), "-o", str(out), "--overwrite", "--seed", "0"]
                os.environ["PYTHONPATH"] = str(Path(src).resolve())
                m = mvm.measure(cmd, f"{case} {side} #{rep + 1}")
                times[side].append(m["wall"])
                shutil.rmtree(out, ignore_errors=True)
        best_old, best_new = min(times["old"]), min(times["new"])
        results["cases"][case] = {**times, "new_over_old_best": best_new / best_old}
        median = statistics.median(times["new"]) / statistics.median(times["old"])
        print(f"{case}: old {times['old']} new {times['new']} new/old best {best_new / best_old:.2f} ({median:.2f})")
    os.environ.pop("PYTHONPATH", None)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
