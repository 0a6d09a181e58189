"""Time ``sortpath.rank_mask`` (the replayed sort) against the real ``torch.sort`` on dense bf16 |Δ|.

One synthetic delta of ``--entries`` entries (bf16 Gaussian noise, the dense-delta recipe of
``merge_vs_mergekit.py``); for each density, mergekit's TIES keep set (ranks ``[0, k)`` of a descending sort of
|Δ|) and a Breadcrumbs-like range (ascending ranks ``[n − k − n/100, n − n/100)``), each by replay and by sort,
``--repeats`` times, one thread. Prints a Markdown table and checks that both give the same set.

    .venv/bin/python benchmarks/sortpath_bench.py --entries 16777216
"""

from __future__ import annotations

import argparse
import time

import torch

from skillgraft.merge import sortpath


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=1 << 24)
    ap.add_argument("--densities", default="0.2,0.5,0.9")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    delta = (torch.randn(args.entries, generator=g) * 0.02).bfloat16()
    n = delta.numel()
    t0 = time.perf_counter()
    assert sortpath.replay_available(), "the replay's self-check failed on this torch build"
    print(f"C replay (ctypes) + self-check: {time.perf_counter() - t0:.2f} s (first use in a process)\n")
    print("| ranks | density | replay (s), runs | torch.sort (s), runs | speed-up (best) | same set |")
    print("|---|---:|---:|---:|---:|---|")
    for density in (float(x) for x in args.densities.split(",")):
        k = max(1, int(density * n))
        for label, start, stop, desc in (
            ("top k (TIES)", 0, k, True),
            ("Breadcrumbs range", max(0, n - k - n // 100), n - n // 100, False),
        ):
            replay, sort = [], []
            for _ in range(args.repeats):
                t = time.perf_counter()
                got = sortpath.rank_mask(delta, start, stop, descending=desc, magnitude=True)
                replay.append(time.perf_counter() - t)
                t = time.perf_counter()
                want = sortpath._sorted_mask(delta, start, stop, desc, True)
                sort.append(time.perf_counter() - t)
            same = torch.equal(got, want)
            print(
                f"| {label} | {density:g} | {', '.join(f'{x:.2f}' for x in replay)} | "
                f"{', '.join(f'{x:.2f}' for x in sort)} | {min(sort) / min(replay):.1f}× | {same} |"
            )
            if not same:
                raise SystemExit("the replay and the sort disagree")


if __name__ == "__main__":
    main()
