"""Retrain a built SkillBench profile's experts with other seeds and report exact match: how far a profile's
accuracies are from the tests' floors when the numerics change (as they do on another host).

Usage: .venv/bin/python benchmarks/skillbench_seed_check.py --cache /tmp/sbq [--profile quick] [--kinds full,lora,large]
       [--seeds 11,12,13,14] [--skills caesar] [--threads 2]
Uses the profile's own stages (``Profile.stage_for``) on the build's bases; writes nothing, prints one line per run
and a JSON summary. The numbers in docs/skillbench.md (2026-12-03) came from this loop.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from skillgraft.bench import skills as sk
    from skillgraft.bench.build import get_profile
    from skillgraft.bench.train import exact_match, train, with_lora

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cache", required=True, help="the cache directory a `skillgraft bench build` wrote")
    ap.add_argument("--profile", default="quick")
    ap.add_argument("--kinds", default="full,lora,large", help="full, lora (on the small base), large (full FT)")
    ap.add_argument("--seeds", default="11,12,13,14")
    ap.add_argument("--skills", default=None, help="comma-separated (default: the profile's)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    p = get_profile(a.profile)
    root = f"{a.cache}/{p.name}"
    tok = AutoTokenizer.from_pretrained(f"{root}/tokenizer")
    bases = {"small": AutoModelForCausalLM.from_pretrained(f"{root}/models/base"),
             "large": AutoModelForCausalLM.from_pretrained(f"{root}/models/base-large")}  # fmt: skip
    res: dict[str, list[float]] = {}
    for s in a.skills.split(",") if a.skills else p.skills:
        train_rows, test_rows = sk.examples(s, "train", p.n_train, p.seed), sk.examples(s, "test", p.n_test, p.seed)
        for seed in (int(x) for x in a.seeds.split(",")):
            for kind in a.kinds.split(","):
                t = time.time()
                if kind == "lora":
                    model, stage = with_lora(copy.deepcopy(bases["small"]), p.lora_rank, seed), p.lora
                elif kind == "full":
                    model, stage = copy.deepcopy(bases["small"]), p.full
                else:
                    model, stage = copy.deepcopy(bases["large"]), p.full_large
                loss = train(model, tok, train_rows, p.stage_for(stage, s), seed)
                em = exact_match(model, tok, test_rows)
                res.setdefault(f"{s}-{kind}", []).append(em)
                secs = time.time() - t
                print(s, kind, seed, f"loss {loss:.3f}", f"exact match {em:.3f}", f"{secs:.1f} s", flush=True)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
