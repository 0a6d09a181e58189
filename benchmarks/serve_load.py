"""Load test of ``skillgraft serve --library``: throughput, latency, errors and mis-routes under concurrent clients.

Starts the server as a subprocess on loopback (``--port 0``) over ``--base`` and an empty temporary library, reads
its RSS (base alone), adds the skills while it runs (``--library``'s latest versions that fit the base, else the
SkillBench profile's LoRA adapters imported with ``import_lora``), waits until they are listed, reads its RSS
again, then runs ``--concurrency`` asyncio + httpx clients per scenario, each bounded by ``--requests`` and
``--seconds``:

* ``base`` — every request names model ``base``;
* ``skills`` — each request names the skill its prompt belongs to (prompts: ``data/<skill>/test.jsonl``);
* ``auto`` — model ``auto`` (the server's ``--route`` router picks; a centroid/classifier router is built
  first by ``skillgraft route build``).

Greedy, ``--max-tokens`` (16). Mis-routes (named skills): the answer's ``skillgraft.skills`` is not the skill asked
for, or its text differs from the same request sent alone (``--check`` requests, after the load). Writes
``--out`` (JSON) and prints a Markdown table.

    nice -n 10 python benchmarks/serve_load.py                      # the SkillBench real profile
    python benchmarks/serve_load.py --requests 8 --seconds 30 --check 4   # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEFAULT_CACHE = Path("/tmp/sgcache/real")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="a SkillBench profile (models/, data/)")
    ap.add_argument("--base", type=Path, help="base model directory (default: CACHE/models/base)")
    ap.add_argument("--library", type=Path, help="take skills from this library (default: CACHE's LoRA adapters)")
    ap.add_argument("--requests", type=int, default=400, help="requests per scenario, at most")
    ap.add_argument("--seconds", type=float, default=90, help="seconds per scenario, at most")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--batch-wait-ms", type=float, default=10)
    ap.add_argument("--check", type=int, default=16, help="named-skill answers re-asked alone")
    ap.add_argument("--scenarios", default="base,skills,auto")
    ap.add_argument("--route", default="arrow", help="the server's router for model 'auto'")
    ap.add_argument(
        "--route-examples", type=int, default=64, help="centroid/classifier: labelled train prompts per skill"
    )
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "serve_load.json")
    args = ap.parse_args(argv)
    base = args.base or args.cache / "models" / "base"
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        packs = _packs(args, base, Path(tmp))
        prompts = _prompts(args.cache, sorted(packs))
        result = asyncio.run(_run(args, base, Path(tmp) / "lib", packs, prompts))
    result["command"] = " ".join(["python", *sys.argv])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(_table(result))
    print(f"wrote {args.out}")


# -- setup ------------------------------------------------------------------------------------------------
def _packs(args: argparse.Namespace, base: Path, tmp: Path) -> dict[str, Path]:
    """Skill name -> .skill file to add while the server runs."""
    from skillgraft.library import Library

    if args.library is not None:
        with Library(args.library) as lib:
            recs = {r.name: r for r in lib.list(base=base)}  # the latest version of each
            return {name: lib.path(r.ref) for name, r in recs.items()}
    from skillgraft.skill.peft import import_lora

    packs = {}
    for adapter in sorted((args.cache / "models" / "experts").glob("*-lora")):
        name = adapter.name.removesuffix("-lora")
        import_lora(adapter, tmp / f"{name}.skill", name=name, base=base)
        packs[name] = tmp / f"{name}.skill"
    if not packs:
        raise SystemExit(f"no *-lora adapters under {args.cache / 'models' / 'experts'}")
    return packs


def _prompts(cache: Path, skills: list[str]) -> list[tuple[str, str, str]]:
    """(skill, prompt, target) rows of every skill's test split, interleaved across skills."""
    per = {}
    for s in skills:
        path = cache / "data" / s / "test.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
        per[s] = [(s, r["prompt"], str(r.get("target", ""))) for r in rows]
    out = [row for group in zip(*[v for v in per.values() if v]) for row in group]
    if not out:
        raise SystemExit(f"no prompts under {cache / 'data'} for {', '.join(skills)}")
    return out


def _start(args: argparse.Namespace, base: Path, library: Path) -> tuple[subprocess.Popen, str]:
    library.mkdir(parents=True, exist_ok=True)
    exe = Path(sys.executable).parent / "skillgraft"
    cmd = [str(exe), "serve", "--base", str(base), "--library", str(library), "--port", "0"]
    cmd += ["--max-batch", str(args.max_batch), "--batch-wait-ms", str(args.batch_wait_ms), "--route", args.route]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    while True:
        line = proc.stdout.readline() if proc.stdout else ""
        if not line:
            raise SystemExit("the server did not start:\n" + "".join(lines))
        lines.append(line)
        if line.startswith("serving "):
            return proc, line.split(" on ")[1].split()[0].removesuffix("/v1")


def _build_router(args: argparse.Namespace, base: Path, library: Path, skills: list[str]) -> None:
    """Save the library's centroid/classifier router (another process, as a user would) from the first
    ``--route-examples`` training prompts of each skill; the server reads it on the first ``auto`` request."""
    exe = Path(sys.executable).parent / "skillgraft"
    cmd = [str(exe), "-q", "route", "build", "--library", str(library), "--base", str(base), "--method", args.route]
    for s in skills:
        path = library.parent / f"{s}-route-examples.jsonl"
        with open(args.cache / "data" / s / "train.jsonl") as f:
            path.write_text("".join(line for _, line in zip(range(args.route_examples), f)))
        cmd += ["--examples", f"{s}={path}"]
    subprocess.run(cmd, check=True)


# -- load -------------------------------------------------------------------------------------------------
async def _run(args: argparse.Namespace, base: Path, library: Path, packs: dict[str, Path], prompts: list) -> dict:
    import httpx

    from skillgraft.library import Library
    from skillgraft.study.common import machine

    proc, url = _start(args, base, library)
    try:
        async with httpx.AsyncClient(base_url=url, timeout=600) as hc:
            rss_base = (await hc.get("/health")).json()
            t0 = time.perf_counter()
            with Library(library) as lib:
                for pack in packs.values():
                    lib.add(pack)
            while (await hc.get("/health")).json()["skills"] < len(packs):
                await asyncio.sleep(0.2)
            added = time.perf_counter() - t0
            rss_skills = (await hc.get("/health")).json()
            if args.route != "arrow" and "auto" in args.scenarios.split(","):
                _build_router(args, base, library, sorted(packs))
            scenarios = {}
            for name in args.scenarios.split(","):
                before = (await hc.get("/health")).json()["forward"]
                scenarios[name] = await _scenario(hc, name, prompts, args)
                after = (await hc.get("/health")).json()
                scenarios[name]["rss_mib_after"] = after["rss_bytes"] / (1 << 20)
                scenarios[name]["forward"] = _forward(before, after["forward"])
                print(f"{name}: {json.dumps(_brief(scenarios[name]))}", flush=True)
            rss_end = (await hc.get("/health")).json()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    mib = 1 << 20
    return {
        "kind": "skillgraft-serve-load",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "base": str(base),
        "skills": sorted(packs),
        "settings": {k: getattr(args, k) for k in ("concurrency", "max_tokens", "max_batch", "batch_wait_ms", "route")},
        "memory_mib": {
            "rss_base_only": rss_base["rss_bytes"] / mib,
            "rss_all_skills": rss_skills["rss_bytes"] / mib,
            "rss_after_load": rss_end["rss_bytes"] / mib,
            "runtime_skills": rss_skills["runtime_bytes"] / mib,
            "runtime_after_load": rss_end["runtime_bytes"] / mib,
        },
        "seconds_to_serve_added_skills": added,
        "batches": {k: rss_end[k] for k in ("batches", "rows", "largest_batch")},
        "scenarios": scenarios,
    }


def _model(name: str, skill: str) -> str:
    return {"base": "base", "auto": "auto"}.get(name, skill)


async def _one(hc: Any, model: str, prompt: str, max_tokens: int) -> tuple[int, dict, float]:
    t = time.perf_counter()
    r = await hc.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens})
    return r.status_code, r.json(), time.perf_counter() - t


async def _scenario(hc: Any, name: str, prompts: list, args: argparse.Namespace) -> dict:
    todo = list(range(min(args.requests, len(prompts))))
    random.Random(0).shuffle(todo)
    answers: dict[int, tuple[int, dict, float]] = {}
    start = time.perf_counter()
    stop_at = start + args.seconds

    async def client() -> None:
        while todo and time.perf_counter() < stop_at:
            i = todo.pop()
            skill, prompt, _ = prompts[i]
            answers[i] = await _one(hc, _model(name, skill), prompt, args.max_tokens)

    await asyncio.gather(*(client() for _ in range(args.concurrency)))
    wall = time.perf_counter() - start
    ok = {i: a for i, a in answers.items() if a[0] == 200}
    lat = sorted(a[2] for a in ok.values())
    tokens = sum(a[1]["usage"]["completion_tokens"] for a in ok.values())
    out: dict[str, Any] = {
        "requests": len(answers),
        "errors": len(answers) - len(ok),
        "seconds": wall,
        "requests_per_s": len(ok) / wall,
        "completion_tokens_per_s": tokens / wall,
        "p50_ms": 1000 * _quantile(lat, 0.5),
        "p99_ms": 1000 * _quantile(lat, 0.99),
        "exact_match": sum(a[1]["choices"][0]["text"].strip() == prompts[i][2].strip() for i, a in ok.items())
        / max(1, len(ok)),
    }
    if name == "auto":
        picked = [a[1]["choices"][0]["skillgraft"]["skills"] for a in ok.values()]
        want = [prompts[i][0] for i in ok]
        out["routed_to_own_skill"] = sum(p[:1] and p[0].split("@")[0] == w for p, w in zip(picked, want)) / max(
            1, len(ok)
        )
    if name == "skills":
        out["misrouted_label"] = sum(
            a[1]["choices"][0]["skillgraft"]["skills"][0].split("@")[0] != prompts[i][0] for i, a in ok.items()
        )
        sample = sorted(ok)[: args.check]
        alone = [await _one(hc, _model(name, prompts[i][0]), prompts[i][1], args.max_tokens) for i in sample]
        out["checked_alone"] = len(sample)
        out["differs_from_alone"] = sum(
            a[1]["choices"][0]["text"] != ok[i][1]["choices"][0]["text"] for i, a in zip(sample, alone)
        )
    return out


def _quantile(xs: list[float], q: float) -> float:
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def _forward(before: dict, after: dict) -> dict:
    """The server's forward passes during one scenario: counts, ms per decode step, rows per step, and decode
    rows per second (tokens the steps produced per second of stepping: the per-step cost, EOS aside)."""
    d = {k: after[k] - before[k] for k in after}
    steps = max(1, d["steps"])
    return {
        **d,
        "ms_per_step": 1000 * d["step_s"] / steps,
        "rows_per_step": d["row_steps"] / steps,
        "ms_per_prefill": 1000 * d["prefill_s"] / max(1, d["prefills"]),
        "row_tokens_per_step_s": d["row_steps"] / max(1e-9, d["step_s"]),
    }


def _brief(s: dict) -> dict:
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in s.items()}


def _table(r: dict) -> str:
    m = r["memory_mib"]
    lines = [
        f"serve load: {r['machine']}, {r['created']}; concurrency {r['settings']['concurrency']}, "
        f"max_tokens {r['settings']['max_tokens']}, greedy; {len(r['skills'])} skills ({', '.join(r['skills'])})",
        "",
        "| scenario | requests | errors | req/s | completion tok/s | p50 ms | p99 ms | exact match | mis-routes "
        "| ms / decode step | rows / step | row-tokens / step-second | RSS after, MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in r["scenarios"].items():
        f = s["forward"]
        mis = (
            f"{s['misrouted_label']} label, {s['differs_from_alone']}/{s['checked_alone']} differ alone"
            if name == "skills"
            else (f"routed to own skill {100 * s['routed_to_own_skill']:.0f}%" if name == "auto" else "")
        )
        lines.append(
            f"| {name} | {s['requests']} | {s['errors']} | {s['requests_per_s']:.2f} | "
            f"{s['completion_tokens_per_s']:.1f} | {s['p50_ms']:.0f} | {s['p99_ms']:.0f} | "
            f"{100 * s['exact_match']:.0f}% | {mis} | {f['ms_per_step']:.0f} | {f['rows_per_step']:.1f} | "
            f"{f['row_tokens_per_step_s']:.0f} | {s['rss_mib_after']:.0f} |"
        )
    lines += [
        "",
        f"RSS: base alone {m['rss_base_only']:.0f} MiB, all skills {m['rss_all_skills']:.0f} MiB, after the load "
        f"{m['rss_after_load']:.0f} MiB; runtime skill bytes {m['runtime_skills']:.1f} MiB "
        f"({m['runtime_after_load']:.1f} after the load); added skills served after "
        f"{r['seconds_to_serve_added_skills']:.1f} s; {r['batches']['batches']} batches, largest "
        f"{r['batches']['largest_batch']} rows",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
