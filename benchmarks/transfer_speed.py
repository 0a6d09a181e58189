"""Fused decoding speed vs the large base alone, interleaved, on SkillBench's full profile.

Usage: .venv/bin/python benchmarks/transfer_speed.py [--cache DIR] [--repeats 3] [--batch 64] [--tokens 16]
       .venv/bin/python benchmarks/transfer_speed.py --synthetic [--large-hidden 1024 --small-hidden 512 --layers 8]
Each round decodes the same prompts with the large base alone and with proxy / EFT / DLF (one expert), the same
with the small models in a second process (``+par``: ``FusedModel(parallel=True)``), and proxy / DLF with
speculative decoding (``--speculate``: the small models draft K tokens, one large forward verifies), all
through FusedModel with greedy decoding and no early stop, so tokens/s compare like for like. The large base alone
and plain proxy tuning also run on one torch thread (``@1t``); slowdowns are against the faster large-alone run.
``--synthetic`` times the same loop with randomly initialised Llama models (SkillBench's tokenizer, same prompts)
big enough that arithmetic, not per-call overhead, dominates: the weights do not change the cost of a step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument(
        "--profile",
        default=None,
        help="SkillBench profile (default: full; quick with --synthetic, which needs only its tokenizer and prompts)",
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--skill", default="sort")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--synthetic", action="store_true", help="random-weight models of the sizes below")
    ap.add_argument("--large-hidden", type=int, default=1024)
    ap.add_argument("--small-hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--speculate", default="4", help="comma-separated draft lengths for proxy+spec runs ('' = none)")
    ap.add_argument(
        "--no-parallel",
        dest="parallel",
        action="store_false",
        help="skip the runs with the small models in a second process (FusedModel(parallel=True))",
    )
    args = ap.parse_args()
    name = "transfer_speed_synthetic.json" if args.synthetic else "transfer_speed.json"
    args.out = args.out or Path("benchmarks/results") / name
    from skillgraft.bench.build import build
    from skillgraft.eval.harness import load_model
    from skillgraft.transfer.fused import ExpertPair, FusedModel, GenerationSpec

    torch.set_num_threads(2)
    m = build(args.profile or ("quick" if args.synthetic else "full"), args.cache)
    large, tok = load_model(m.model_dir("base-large"))
    small, _ = load_model(m.model_dir("base"))
    expert, _ = load_model(m.model_dir(f"experts/{args.skill}-full"))
    if args.synthetic:
        large, small, expert = _random_models(large.config, args)
    rows = [json.loads(x) for x in m.data_path(args.skill, "test").read_text().splitlines()][: args.batch]
    prompts = [r["prompt"] for r in rows]
    runs = {"large": FusedModel(large, tok, [], "proxy")}
    for method in ("proxy", "eft", "dlf"):
        runs[method] = FusedModel(large, tok, [ExpertPair(expert, small, 1.0)], method)
    # The same one-process loops on one torch thread: at small sizes one thread beats two (no fork/join per op),
    # and the parallel runs give the large model one thread, so the baseline is the faster of the two.
    threads = {"large@1t": 1, "proxy@1t": 1}
    runs["large@1t"] = runs["large"]
    runs["proxy@1t"] = runs["proxy"]
    if args.parallel:
        for method in ("proxy", "eft", "dlf"):
            runs[f"{method}+par"] = FusedModel(large, tok, [ExpertPair(expert, small, 1.0)], method, parallel=True)
    for k in [int(x) for x in args.speculate.split(",") if x]:
        for method in ("proxy", "dlf"):
            runs[f"{method}+spec{k}"] = FusedModel(large, tok, [ExpertPair(expert, small, 1.0)], method, speculate=k)
    spec = GenerationSpec(max_new_tokens=args.tokens)
    eos = tok.eos_token_id  # disabled below: every run decodes exactly the same number of steps
    tok.eos_token_id = None  # type: ignore[misc]
    times: dict[str, list[float]] = {k: [] for k in runs}
    drafts: dict[str, float] = {}
    try:
        for fm in runs.values():  # warm-up
            fm.generate(prompts[:4], GenerationSpec(max_new_tokens=2))
        for _ in range(args.repeats):
            for name, fm in runs.items():
                torch.set_num_threads(threads.get(name, 2))
                t0 = time.perf_counter()
                fm.generate(prompts, spec)
                times[name].append(time.perf_counter() - t0)
                torch.set_num_threads(2)
                if fm.speculate:  # drafts accepted per row and round (rows decode all tokens: EOS is off)
                    rounds, accepted = fm.draft_stats
                    drafts[name] = accepted / (rounds * len(prompts))
    finally:
        tok.eos_token_id = eos  # type: ignore[misc]
        for fm in runs.values():
            fm.close()
    tps = {k: len(prompts) * args.tokens / min(v) for k, v in times.items()}
    baseline = max(("large", "large@1t"), key=tps.__getitem__)  # slowdowns are against the faster large run
    res = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(["python benchmarks/transfer_speed.py", *sys.argv[1:]]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {"cpu": _cpu(), "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__},
        "params": {
            "large": sum(p.numel() for p in large.parameters()),
            "small": sum(p.numel() for p in small.parameters()),
        },
        "batch": len(prompts),
        "tokens": args.tokens,
        "seconds": times,
        "tokens_per_s": tps,
        "baseline": baseline,
        "slowdown": {k: tps[baseline] / v for k, v in tps.items() if not k.startswith("large")},
        "accepted_drafts_per_round": drafts,
    }
    if args.synthetic:
        res["synthetic"] = {"large_hidden": args.large_hidden, "small_hidden": args.small_hidden, "layers": args.layers}
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    shown = ("params", "tokens_per_s", "baseline", "slowdown", "accepted_drafts_per_round")
    print(json.dumps({k: res[k] for k in shown}, indent=1))


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "?"


def _random_models(like, args):  # noqa: ANN001
    """Large base, small base and small expert: Llama models with ``like``'s vocabulary, random weights."""
    from transformers import LlamaForCausalLM

    def make(hidden: int, seed: int):  # noqa: ANN202
        cfg = like.__class__.from_dict(like.to_dict())
        cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size = hidden, args.layers, int(hidden * 2.75)
        cfg.num_attention_heads = cfg.num_key_value_heads = hidden // 64
        cfg.head_dim = 64
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg).eval()

    return make(args.large_hidden, 0), make(args.small_hidden, 1), make(args.small_hidden, 2)


if __name__ == "__main__":
    main()
