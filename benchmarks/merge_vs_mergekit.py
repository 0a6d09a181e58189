"""Benchmark ``skillgraft merge`` against mergekit 0.1.5: wall time, peak memory and output agreement.

Every merge runs as its own subprocess (the ``skillgraft`` CLI and ``mergekit-yaml``), measured from outside:
wall clock, the kernel's peak RSS (``ru_maxrss`` from ``wait4``) and the highest ``RssAnon`` sampled from /proc.
Parts (``--parts``, comma-separated):

* ``synth``  — synthetic Llama-shaped bf16 checkpoints (TinyLlama-1.1B shape): a base + 2 fine-tunes, merged with
  task arithmetic, TIES and DARE-TIES by both tools from one mergekit YAML; agreement streamed tensor by tensor.
* ``7b``     — a Llama-2-7B-shaped synthetic base + 3 rank-16 skill packs, TIES into a full checkpoint
  (skillgraft only: mergekit cannot read skill packs).
* ``smollm`` — the real SmolLM2-135M-Instruct (bf16) + 2 synthetic fine-tunes, same three methods, both tools.

mergekit lives in its own venv (``--mk-venv``; created with ``python3 -m venv DIR && DIR/bin/pip install
torch==2.13.0 mergekit==0.1.5``); it is never a dependency of skillgraft. Usage:
    python benchmarks/merge_vs_mergekit.py [--parts synth,7b,smollm] [--workdir benchmarks/_work] [--repeats 2]
Writes benchmarks/results/merge_vs_mergekit.md and .json.
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
sys.path.insert(0, str(HERE))

SIZE_1B = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
)  # TinyLlama-1.1B (as extract_apply.py's "1b")
SIZE_TINY = dict(
    hidden_size=256,
    intermediate_size=704,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=1000,
)  # smoke tests only
SIZE_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
)  # Llama-2-7B
SIZE_100M = dict(
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_key_value_heads=4,
    vocab_size=32000,
)  # ~0.13 B parameters: the dense-delta part
SIZES = {"1b": SIZE_1B, "100m": SIZE_100M, "tiny": SIZE_TINY}
# Fine-tunes that change most bf16 entries (long or high-rate training): each entry moves by ~2 % of the
# tensor's scale, all of ‖Δ‖² dense noise, so the k-th largest |Δ| of a density-0.5 trim is nonzero.
DENSE = {"rel": 2e-2, "noise": 1.0}
METHODS = ("task_arithmetic", "ties", "dare_ties")
DETERMINISTIC = ("task_arithmetic", "ties")
WEIGHTS = (0.6, 0.4)  # unequal on purpose: exercises weighted sign election and the weighted disjoint mean
DENSITY = 0.5
GEN_VERSION = 1
MK_FLAGS = ["--lazy-unpickle", "--quiet", "--no-write-model-card"]  # CPU defaults otherwise (no --cuda)


# ---------------------------------------------------------------------------------------------------------
# Synthetic weights (child processes)
# ---------------------------------------------------------------------------------------------------------
def _gen(seed: int, name: str):
    import torch

    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def _base_tensor(name: str, shape: tuple[int, ...], seed: int):
    import torch

    g = _gen(seed, name)
    if len(shape) == 1:  # RMSNorm scales around 1
        return (1.0 + 0.1 * torch.randn(shape, generator=g)).to(torch.bfloat16)
    return (0.02 * torch.randn(shape, generator=g)).to(torch.bfloat16)


def child_generate(a: dict) -> dict:
    """Base + N fine-tunes (base + low-rank + noise delta, ‖Δ‖/‖W‖ = rel), bf16, sharded, tensor by tensor."""
    import torch
    from extract_apply import llama_layout, synthetic_delta

    from skillgraft.io.writer import CheckpointWriter

    cfg, layout = llama_layout(a["config"])
    cfg["architectures"] = ["LlamaForCausalLM"]  # mergekit picks its architecture table from this
    base = Path(a["base"])
    cfg_dir = base.parent / f".cfg-{base.name}"
    cfg_dir.mkdir(exist_ok=True)
    (cfg_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    dirs = [base, *map(Path, a["tunes"])]
    writers = [CheckpointWriter(d, overwrite=True, max_shard_bytes=GiB, copy_from=cfg_dir) for d in dirs]
    params = 0
    for name, shape in layout:
        w = _base_tensor(name, shape, a["seed"])
        writers[0].add(name, w)
        for k, wr in enumerate(writers[1:]):
            d = synthetic_delta(name, w, a["rel"], a["noise"], 1000 * (a["seed"] + 1) + k)
            wr.add(name, (w.float() + d).to(torch.bfloat16))
            del d
        params += w.numel()
    for wr in writers:
        wr.__exit__(None, None, None)
    shutil.rmtree(cfg_dir)
    return {"params": params, "tensors": len(layout)}


def child_tunes(a: dict) -> dict:
    """Fine-tunes of an existing checkpoint (SmolLM2): base + synthetic delta, written tensor by tensor."""
    from extract_apply import synthetic_delta

    from skillgraft.io.checkpoint import Checkpoint
    from skillgraft.io.writer import CheckpointWriter

    with Checkpoint(a["base"]) as base:
        for k, out in enumerate(a["tunes"]):
            with CheckpointWriter(out, overwrite=True, copy_from=base.path) as w:
                for name in base.names():
                    t = base.get(name)
                    d = synthetic_delta(name, t, a["rel"], a["noise"], 1000 * (a["seed"] + 1) + k)
                    w.add(name, (t.float() + d).to(t.dtype))
        return {"tensors": len(base.names()), "params": sum(math.prod(base.shape(n)) for n in base.names())}


def child_smollm_base(a: dict) -> dict:
    from extract_apply import child_smollm_base as make

    return make(a)


def child_packs(a: dict) -> dict:
    """Skill packs of rank-``rank`` low-rank deltas for every matrix of ``base`` (‖Δ‖/‖W‖ = rel)."""
    import torch

    from skillgraft.io.checkpoint import Checkpoint
    from skillgraft.skill.encoding import encode_lowrank
    from skillgraft.skill.fingerprint import fingerprint_checkpoint
    from skillgraft.skill.modules import layout, module_kind
    from skillgraft.skill.pack import BaseIdentity, Manifest, PackWriter

    r = a["rank"]
    with Checkpoint(a["base"]) as base:
        fp = fingerprint_checkpoint(base)
        ident = BaseIdentity(name=str(base.path), fingerprint=fp.content, structure=fp.structure, tokenizer=None)
        mats = [n for n in base.names() if len(base.shape(n)) == 2]
        norms = {n: float(base.get(n).float().norm()) for n in mats}
        model_type = base.config.get("model_type")
        sizes = []
        for k, out in enumerate(a["packs"]):
            w = PackWriter(out, overwrite=True)
            for name in mats:
                m, n = base.shape(name)
                g = _gen(1000 * (a["seed"] + 1) + k, name)
                spectrum = 0.8 ** torch.arange(r, dtype=torch.float32)
                up = torch.randn(m, r, generator=g) * spectrum
                down = torch.randn(r, n, generator=g)
                fro = math.sqrt(float(((up.T @ up) * (down @ down.T)).sum()))  # ‖up·down‖_F without forming it
                s = math.sqrt(a["rel"] * norms[name] / fro)
                parts, fields = encode_lowrank(up * s, down * s)
                fields.update(
                    shape=[m, n],
                    dtype=str(base.dtype(name)).removeprefix("torch."),
                    rel_error=0.0,
                    kind=module_kind(name, (m, n)),
                )
                if lay := layout(name, model_type):
                    fields["layout"] = lay
                w.add(name, parts, fields)
            sizes.append(
                w.close(
                    Manifest(
                        name=f"synthetic-{k}",
                        version=1,
                        base=ident,
                        tensors={},
                        source={"kind": "synthetic", "rank": r, "rel": a["rel"]},
                    )
                )
            )
    return {"pack_bytes": sizes, "matrices": len(mats)}


def _index(d: Path) -> dict[str, Path]:
    from safetensors import safe_open

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                out[k] = f
    return out


def child_compare(a: dict) -> dict:
    """Stream two merged checkpoints (and the base) tensor by tensor: bit-identical fraction, max |a−b|, and
    how far apart the merged deltas are (‖a−b‖ / ‖b−θ₀‖)."""
    import torch
    from safetensors import safe_open

    ia, ib, i0 = _index(Path(a["a"])), _index(Path(a["b"])), _index(Path(a["base"]))
    common = [n for n in i0 if n in ia and n in ib]
    handles: dict[Path, object] = {}

    def get(idx: dict, name: str):
        f = idx[name]
        if f not in handles:
            handles[f] = safe_open(str(f), "pt")
        return handles[f].get_tensor(name)

    tot = same = 0
    diff2 = da2 = db2 = 0.0
    changed_a = changed_b = 0
    worst = (0.0, None)
    per = {}
    for name in common:
        x, y, z = get(ia, name), get(ib, name), get(i0, name)
        n = x.numel()
        bits = {2: torch.int16, 4: torch.int32}.get(x.element_size())
        eq = int((x.view(bits) == y.view(bits)).sum()) if (bits and x.dtype == y.dtype) else int((x == y).sum())
        xf, yf, zf = x.float(), y.float(), z.float()
        mad = float((xf - yf).abs().max()) if n else 0.0
        diff2 += float((xf - yf).pow(2).sum())
        da2 += float((xf - zf).pow(2).sum())
        db2 += float((yf - zf).pow(2).sum())
        changed_a += int((x != z).sum())
        changed_b += int((y != z).sum())
        tot, same = tot + n, same + eq
        per[name] = {"max_abs_diff": mad, "identical": eq / n if n else 1.0}
        if mad > worst[0]:
            worst = (mad, name)
        del x, y, z, xf, yf, zf
    mads = sorted(p["max_abs_diff"] for p in per.values())
    return {
        "tensors": len(common),
        "only_a": sorted(set(ia) - set(ib)),
        "only_b": sorted(set(ib) - set(ia)),
        "dtypes": [str(get(ia, common[0]).dtype), str(get(ib, common[0]).dtype)] if common else [],
        "elements": tot,
        "identical": same / tot if tot else 1.0,
        "tensors_identical": sum(p["identical"] == 1.0 for p in per.values()),
        "max_abs_diff": worst[0],
        "worst_tensor": worst[1],
        "median_tensor_max_abs_diff": mads[len(mads) // 2],
        "rel_diff_of_delta": math.sqrt(diff2 / db2) if db2 else 0.0,
        "delta_norm_ratio": math.sqrt(da2 / db2) if db2 else float("nan"),
        "changed_frac": [changed_a / tot, changed_b / tot] if tot else [0, 0],
        "per_tensor": per,
    }


CHILDREN = {
    f.__name__.removeprefix("child_"): f
    for f in (child_generate, child_tunes, child_smollm_base, child_packs, child_compare)
}


# ---------------------------------------------------------------------------------------------------------
# Harness (parent)
# ---------------------------------------------------------------------------------------------------------
def child_env() -> dict:
    return {
        **os.environ,
        "OMP_WAIT_POLICY": "PASSIVE",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    }


def measure(cmd: list[str], label: str, log: Path | None = None) -> dict:
    """Run ``cmd``; wall time, CPU time, peak RSS (ru_maxrss) and peak anonymous RSS (sampled every 50 ms)."""
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    out = open(log, "w") if log else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, env=child_env(), stdout=out, stderr=subprocess.STDOUT if log else None)
    from extract_apply import wait_sampling

    status, usage, peak = wait_sampling(proc)
    wall = time.perf_counter() - t0
    if log:
        out.close()
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        tail = log.read_text()[-3000:] if log else ""
        raise SystemExit(f"{label} failed with exit code {rc}: {' '.join(cmd)}\n{tail}")
    res = {
        "wall": wall,
        "cpu": usage.ru_utime + usage.ru_stime,
        "peak_rss": usage.ru_maxrss * 1024,
        "peak_anon": peak["RssAnon"] * 1024,
        "load": [round(load0, 2), round(os.getloadavg()[0], 2)],
    }
    print(
        f"  {label:<34} {wall:7.1f} s wall, {res['cpu']:7.1f} s CPU, peak RSS {res['peak_rss'] / GiB:5.2f} GiB "
        f"(anon {res['peak_anon'] / GiB:5.2f}), load {res['load'][0]:.1f}→{res['load'][1]:.1f}",
        flush=True,
    )
    return res


def run_child(kind: str, args: dict, work: Path) -> dict:
    res_file = work / f".result-{kind}.json"
    res_file.unlink(missing_ok=True)
    m = measure(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            kind,
            json.dumps({**args, "_result": str(res_file)}),
        ],
        kind,
    )
    out = json.loads(res_file.read_text())
    res_file.unlink()
    return {**out, **{f"_{k}": v for k, v in m.items()}}


def warm(dirs: list[Path]) -> float:
    """Read every input file once so both tools start from a warm page cache."""
    t0 = time.perf_counter()
    for d in dirs:
        for f in sorted(d.glob("*.safetensors")) if d.is_dir() else [d]:
            with open(f, "rb") as fh:
                while fh.read(64 << 20):
                    pass
    return time.perf_counter() - t0


def _dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*.safetensors")) if d.is_dir() else d.stat().st_size


def mk_yaml(method: str, base: Path, tunes: list[Path], compute: str = "float32") -> str:
    lines = [f"merge_method: {method}", f"base_model: {base}", "models:"]
    for t, w in zip(tunes, WEIGHTS):
        p = f"weight: {w}" + (f", density: {DENSITY}" if method != "task_arithmetic" else "")
        lines += [f"  - model: {t}", f"    parameters: {{{p}}}"]
    if method == "ties":
        lines += ["parameters: {normalize: true}"]
    lines += [f"dtype: {compute}", "out_dtype: bfloat16", ""]
    return "\n".join(lines)


def sg_yaml(method: str, base: Path, inputs: list[Path], weights, params: dict) -> str:
    lines = [f"base: {base}", f"method: {method}", f"parameters: {json.dumps(params)}", "inputs:"]
    lines += [f"  - {{source: {i}, weight: {w}}}" for i, w in zip(inputs, weights)]
    lines += ["out_dtype: bfloat16", "seed: 0", ""]
    return "\n".join(lines)


class Tools:
    def __init__(self, a: argparse.Namespace) -> None:
        self.sg = str(Path(sys.executable).parent / "skillgraft")
        self.mk = str(a.mk_venv / "bin" / "mergekit-yaml")
        self.pyspy = shutil.which("py-spy") or str(a.mk_venv / "bin" / "py-spy")

    def sg_cmd(self, cfg: Path, out: Path) -> list[str]:
        return [self.sg, "merge", str(cfg), "-o", str(out), "--overwrite", "--seed", "0"]

    def mk_cmd(self, cfg: Path, out: Path) -> list[str]:
        return [self.mk, str(cfg), str(out), *MK_FLAGS, "--random-seed", "0"]


def compare_tools(
    name: str, base: Path, tunes: list[Path], work: Path, a: argparse.Namespace, tools: Tools, repeats: int
) -> dict:
    """Both tools on the same mergekit YAML, interleaved; then agreement of the first pair of outputs."""
    res: dict = {"methods": {}}
    cfgs = work / f"cfg-{name}"
    cfgs.mkdir(exist_ok=True)
    res["warm_s"] = warm([base, *tunes])
    for method in a.methods:
        compute = getattr(a, "compute", "float32")  # the YAML's dtype: mergekit and skillgraft compute in it
        cfg = cfgs / f"{method}.mergekit{'' if compute == 'float32' else '-' + compute}.yaml"
        cfg.write_text(mk_yaml(method, base, tunes, compute))
        outs = {"skillgraft": work / f"out-{name}-{method}-sg", "mergekit": work / f"out-{name}-{method}-mk"}
        runs: dict[str, list] = {"skillgraft": [], "mergekit": []}
        for rep in range(repeats):
            order = ("skillgraft", "mergekit") if rep % 2 == 0 else ("mergekit", "skillgraft")
            for tool in order:
                cmd = tools.sg_cmd(cfg, outs[tool]) if tool == "skillgraft" else tools.mk_cmd(cfg, outs[tool])
                if tool == "mergekit":
                    shutil.rmtree(outs[tool], ignore_errors=True)
                runs[tool].append(measure(cmd, f"{name} {method} {tool} #{rep + 1}", work / f"log-{tool}.txt"))
        entry: dict = {"config": cfg.read_text(), "runs": runs}
        entry["compare"] = run_child(
            "compare", {"a": str(outs["skillgraft"]), "b": str(outs["mergekit"]), "base": str(base)}, work
        )
        c = entry["compare"]
        print(
            f"    agreement: {100 * c['identical']:.6f}% bit-identical, max |Δ| {c['max_abs_diff']:.3g} "
            f"({c['worst_tensor']}), ‖sg−mk‖/‖mk−θ₀‖ {c['rel_diff_of_delta']:.3g}, "
            f"‖Δ_sg‖/‖Δ_mk‖ {c['delta_norm_ratio']:.4f}",
            flush=True,
        )
        res["methods"][method] = entry
        if method == "ties" and a.mk_bf16:
            cfg16 = cfgs / "ties.mergekit-bf16.yaml"
            cfg16.write_text(mk_yaml("ties", base, tunes, compute="bfloat16"))
            out16 = work / f"out-{name}-ties-mk16"
            shutil.rmtree(out16, ignore_errors=True)
            r16 = measure(tools.mk_cmd(cfg16, out16), f"{name} ties mergekit dtype=bf16", work / "log-mk16.txt")
            c16 = run_child("compare", {"a": str(outs["skillgraft"]), "b": str(out16), "base": str(base)}, work)
            res["ties_mk_bf16"] = {"config": cfg16.read_text(), "run": r16, "compare": c16}
            shutil.rmtree(out16, ignore_errors=True)
        if method == "ties" and a.own_yaml:
            own_params = {  # result key -> (label, parameters): skillgraft's own YAMLs, compared with mergekit's
                "ties_own_yaml": ("own YAML (paper)", {"density": DENSITY}),
                # mergekit's semantics with ties at the k-th magnitude taken in index order (no sort)
                "ties_position": (
                    "mergekit mode, tie_break position",
                    {"density": DENSITY, "mode": "mergekit", "tie_break": "position", "normalize": True},
                ),
            }
            for key, (label, params) in own_params.items():
                own = cfgs / f"{key}.yaml"
                own.write_text(sg_yaml("ties", base, tunes, WEIGHTS, params))
                out_own = work / f"out-{name}-{key}"
                r_own = measure(tools.sg_cmd(own, out_own), f"{name} ties skillgraft {label}", work / "log-own.txt")
                c_own = run_child("compare", {"a": str(out_own), "b": str(outs["mergekit"]), "base": str(base)}, work)
                res[key] = {"config": own.read_text(), "run": r_own, "compare": c_own}
                shutil.rmtree(out_own, ignore_errors=True)
        for d in outs.values():
            shutil.rmtree(d, ignore_errors=True)
    return res


def profile_ties(name: str, work: Path, tools: Tools) -> dict:
    """py-spy (sampling, all threads, native frames off) on one skillgraft TIES run; top functions by self and
    inclusive samples."""
    cfg = work / f"cfg-{name}" / "ties.mergekit.yaml"
    out, raw = work / f"out-{name}-prof", work / f"profile-{name}-ties.txt"
    cmd = [tools.pyspy, "record", "--format", "raw", "-r", "50", "-o", str(raw), "--", *tools.sg_cmd(cfg, out)]
    try:
        m = measure(cmd, f"{name} ties skillgraft under py-spy", work / "log-pyspy.txt")
    except SystemExit as e:
        return {"error": str(e)[:500]}
    shutil.rmtree(out, ignore_errors=True)
    self_s: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = [f for f in stack.split(";") if f]
        keys = []
        for f in frames:
            # "function (file:line)" → "file:function"
            fn, _, loc = f.partition(" (")
            file = loc.rstrip(")").rsplit(":", 1)[0]
            keys.append(f"{_short(file)}:{fn}")
        if keys:
            self_s[keys[-1]] = self_s.get(keys[-1], 0) + n
        for k in set(keys):
            incl[k] = incl.get(k, 0) + n

    def top(d: dict[str, int]) -> list[tuple[str, float]]:
        return [(k, v / total) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:15]]

    ours = {k: v for k, v in incl.items() if k.startswith("skillgraft/") and "/cli/" not in k}
    return {"run": m, "samples": total, "self": top(self_s), "inclusive": top(ours), "raw": str(raw)}


def _short(file: str) -> str:
    for marker in ("site-packages/", "src/", "lib/python3"):
        if marker in file:
            return file.split(marker, 1)[1]
    return file


# ---------------------------------------------------------------------------------------------------------
# Parts
# ---------------------------------------------------------------------------------------------------------
def part_synth(work: Path, a: argparse.Namespace, tools: Tools) -> dict:
    print("== synthetic 1.1B (base + 2 fine-tunes)", flush=True)
    base, tunes = work / "syn1b-base", [work / "syn1b-ft1", work / "syn1b-ft2"]
    stamp = work / "syn1b.json"
    want = {"config": SIZES[a.size], "rel": a.rel, "noise": a.noise, "seed": a.seed, "version": GEN_VERSION}
    info = json.loads(stamp.read_text()) if stamp.exists() else {}
    if info.get("recipe") != want or not all((d / "config.json").exists() for d in (base, *tunes)):
        g = run_child("generate", {**want, "base": str(base), "tunes": list(map(str, tunes))}, work)
        info = {"recipe": want, "params": g["params"], "generate_s": g["_wall"], "generate_peak_rss": g["_peak_rss"]}
        stamp.write_text(json.dumps(info, indent=1))
    info["stored_bytes"] = _dir_bytes(base)
    info["shards"] = len(list(base.glob("*.safetensors")))
    res = {"model": info, **compare_tools("1b", base, tunes, work, a, tools, a.repeats_1b)}
    ties = res["methods"].get("ties")
    if ties and (a.profile or _ratio(ties, "wall") < 5):
        res["profile"] = profile_ties("1b", work, tools)
    if not a.keep_inputs:
        for d in (base, *tunes):
            shutil.rmtree(d, ignore_errors=True)
        stamp.unlink(missing_ok=True)
    return res


def part_dense(work: Path, a: argparse.Namespace, tools: Tools) -> dict:
    print("== dense deltas: synthetic ~0.13B (base + 2 fine-tunes changing most bf16 entries), TIES", flush=True)
    base, tunes = work / "dense-base", [work / "dense-ft1", work / "dense-ft2"]
    stamp = work / "dense.json"
    want = {"config": SIZE_100M, **DENSE, "seed": a.seed, "version": GEN_VERSION}
    info = json.loads(stamp.read_text()) if stamp.exists() else {}
    if info.get("recipe") != want or not all((d / "config.json").exists() for d in (base, *tunes)):
        g = run_child("generate", {**want, "base": str(base), "tunes": list(map(str, tunes))}, work)
        info = {"recipe": want, "params": g["params"], "generate_s": g["_wall"], "generate_peak_rss": g["_peak_rss"]}
        stamp.write_text(json.dumps(info, indent=1))
    info["stored_bytes"] = _dir_bytes(base)
    info["shards"] = len(list(base.glob("*.safetensors")))
    changed = run_child("compare", {"a": str(tunes[0]), "b": str(base), "base": str(base)}, work)
    info["changed_fraction"] = 1 - changed["identical"]  # entries of fine-tune 1 that differ from the base
    dense_args = argparse.Namespace(**{**vars(a), "methods": ["ties"], "mk_bf16": False, "own_yaml": True})
    res = {"model": info, **compare_tools("dense", base, tunes, work, dense_args, tools, a.repeats_1b)}
    # the same YAML with dtype: bfloat16, as most published configs give it: both tools compute in bf16
    bf16_args = argparse.Namespace(**{**vars(dense_args), "own_yaml": False, "compute": "bfloat16"})
    res["bf16"] = compare_tools("dense", base, tunes, work, bf16_args, tools, a.repeats_1b)
    if not a.keep_inputs:
        for d in (base, *tunes):
            shutil.rmtree(d, ignore_errors=True)
        stamp.unlink(missing_ok=True)
    return res


def part_7b(work: Path, a: argparse.Namespace, tools: Tools) -> dict:
    print("== Llama-2-7B shape: base + 3 rank-16 skill packs, TIES (skillgraft only)", flush=True)
    base = work / "syn7b-base"
    packs = [work / f"syn7b-{k}.skill" for k in range(3)]
    stamp = work / "syn7b.json"
    want = {"config": SIZE_7B, "seed": a.seed, "version": GEN_VERSION}
    info = json.loads(stamp.read_text()) if stamp.exists() else {}
    if info.get("recipe") != want or not (base / "config.json").exists():
        g = run_child("generate", {**want, "rel": a.rel, "noise": a.noise, "base": str(base), "tunes": []}, work)
        info = {"recipe": want, "params": g["params"], "generate_s": g["_wall"], "generate_peak_rss": g["_peak_rss"]}
        stamp.write_text(json.dumps(info, indent=1))
    p = run_child(
        "packs", {"base": str(base), "packs": list(map(str, packs)), "rank": a.rank, "rel": a.rel, "seed": a.seed}, work
    )
    info.update(
        stored_bytes=_dir_bytes(base),
        pack_bytes=p["pack_bytes"],
        matrices=p["matrices"],
        packs_s=p["_wall"],
        rank=a.rank,
    )
    cfg = work / "cfg-7b-ties.yaml"
    cfg.write_text(sg_yaml("ties", base, packs, (1.0, 0.7, 0.5), {"density": DENSITY}))
    out = work / "out-7b-ties"
    warm_s = warm([base, *packs])
    runs = []
    for rep in range(a.repeats_7b):
        runs.append(measure(tools.sg_cmd(cfg, out), f"7b ties skillgraft #{rep + 1}", work / "log-7b.txt"))
        runs[-1]["out_bytes"] = _dir_bytes(out)
        shutil.rmtree(out, ignore_errors=True)
    if not a.keep_inputs:
        shutil.rmtree(base, ignore_errors=True)
        stamp.unlink(missing_ok=True)
    for pk in packs:
        pk.unlink(missing_ok=True)
    return {"model": info, "config": cfg.read_text(), "warm_s": warm_s, "runs": runs}


def part_smollm(work: Path, a: argparse.Namespace, tools: Tools) -> dict:
    print("== SmolLM2-135M-Instruct (real, bf16) + 2 synthetic fine-tunes", flush=True)
    shared = HERE / "_work" / "smollm2-135m-base"
    base = work / "smollm2-135m-base"
    if not (base / "model.safetensors").exists():
        f = shared / "model.safetensors"
        if f.exists() and time.time() - f.stat().st_mtime > 60:  # reuse extract_apply.py's copy once complete
            shutil.copytree(shared, base, dirs_exist_ok=True)
        else:
            run_child("smollm_base", {"out": str(base)}, work)
    tunes = [work / "smollm2-ft1", work / "smollm2-ft2"]
    stamp = work / "smollm2.json"
    want = {"rel": a.rel, "noise": a.noise, "seed": a.seed, "version": GEN_VERSION}
    info = json.loads(stamp.read_text()) if stamp.exists() else {}
    if info.get("recipe") != want or not all((d / "config.json").exists() for d in tunes):
        g = run_child("tunes", {**want, "base": str(base), "tunes": list(map(str, tunes))}, work)
        info = {"recipe": want, "params": g["params"]}
        stamp.write_text(json.dumps(info, indent=1))
    cfg = json.loads((base / "config.json").read_text())
    info.update(stored_bytes=_dir_bytes(base), tie_word_embeddings=cfg.get("tie_word_embeddings"))
    return {"model": info, **compare_tools("smollm", base, tunes, work, a, tools, a.repeats)}


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
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


def _best(runs: list[dict], key: str) -> float:
    return min(r[key] for r in runs)


def _ratio(entry: dict, key: str) -> float:
    return _best(entry["runs"]["mergekit"], key) / _best(entry["runs"]["skillgraft"], key)


def _gib(b: float) -> str:
    return f"{b / GiB:.2f}"


def _runs(runs: list[dict], key: str, fmt) -> str:
    return " / ".join(fmt(r[key]) for r in runs)


def render_compare(title: str, res: dict, lines: list[str]) -> None:
    lines += [
        f"### {title}: time and memory",
        "",
        "| method | skillgraft wall (s) | mergekit wall (s) | **speed-up** (mk/sg) | skillgraft peak RSS "
        "(GiB) | mergekit peak RSS (GiB) | **RSS ratio** (mk/sg) | anon sg / mk (GiB) | CPU s sg / mk |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method, e in res["methods"].items():
        sg, mk = e["runs"]["skillgraft"], e["runs"]["mergekit"]
        lines.append(
            f"| {method} | {_runs(sg, 'wall', lambda v: f'{v:.1f}')} | {_runs(mk, 'wall', lambda v: f'{v:.1f}')} | "
            f"**{_ratio(e, 'wall'):.1f}×** | {_runs(sg, 'peak_rss', _gib)} | {_runs(mk, 'peak_rss', _gib)} | "
            f"**{_ratio(e, 'peak_rss'):.2f}×** | {_gib(_best(sg, 'peak_anon'))} / {_gib(_best(mk, 'peak_anon'))} | "
            f"{_best(sg, 'cpu'):.0f} / {_best(mk, 'cpu'):.0f} |"
        )
    extra = []
    if "ties_own_yaml" in res:
        r = res["ties_own_yaml"]["run"]
        extra.append(
            f"skillgraft on its own YAML (TIES, default `mode: paper`, kthvalue trim): {r['wall']:.1f} s, "
            f"peak RSS {_gib(r['peak_rss'])} GiB"
        )
    if "ties_position" in res:
        r = res["ties_position"]["run"]
        extra.append(
            f"skillgraft TIES in mergekit mode with `tie_break: position` (no sort): {r['wall']:.1f} s, "
            f"peak RSS {_gib(r['peak_rss'])} GiB"
        )
    if "ties_mk_bf16" in res:
        r = res["ties_mk_bf16"]["run"]
        extra.append(
            f"mergekit TIES with `dtype: bfloat16` (computes in bf16; its lightest setting): "
            f"{r['wall']:.1f} s, peak RSS {_gib(r['peak_rss'])} GiB"
        )
    lines += [""] + [f"* {x}" for x in extra] + ([""] if extra else [])
    lines += [
        f"### {title}: output agreement (skillgraft `mode: mergekit` vs mergekit, streamed per tensor)",
        "",
        "| comparison | bit-identical elements | tensors fully identical | max abs diff (tensor) | "
        "median per-tensor max abs diff | ‖sg−mk‖ / ‖mk−θ₀‖ | ‖Δ_sg‖ / ‖Δ_mk‖ | elements changed vs θ₀ sg / mk |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = [(m, e["compare"]) for m, e in res["methods"].items()]
    if "ties_own_yaml" in res:
        rows.append(("ties, skillgraft own YAML (paper mode) vs mergekit", res["ties_own_yaml"]["compare"]))
    if "ties_position" in res:
        rows.append(("ties, mergekit mode with tie_break position vs mergekit", res["ties_position"]["compare"]))
    if "ties_mk_bf16" in res:
        rows.append(("ties, skillgraft vs mergekit `dtype: bfloat16`", res["ties_mk_bf16"]["compare"]))
    for label, c in rows:
        lines.append(
            f"| {label} | {100 * c['identical']:.6f}% | {c['tensors_identical']}/{c['tensors']} | "
            f"{c['max_abs_diff']:.3g} (`{c['worst_tensor']}`) | {c['median_tensor_max_abs_diff']:.3g} | "
            f"{c['rel_diff_of_delta']:.3g} | {c['delta_norm_ratio']:.4f} | "
            f"{100 * c['changed_frac'][0]:.2f}% / {100 * c['changed_frac'][1]:.2f}% |"
        )
    lines.append("")


def _measured(part: dict) -> list[str]:
    m = part.get("measured")
    if not m:
        return ["Measured: in an earlier run (this part's machine and date were not recorded).", ""]
    return [
        f"Measured: {m['cpu']}, {m['cores']} cores, {m['date']}" + (f" ({m['note']})" if m.get("note") else "") + ".",
        "",
    ]


def render(data: dict) -> str:
    m = data["machine"]
    lines = [
        "# Merging: skillgraft vs mergekit — measured",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM; Python {m['python']}, torch "
        f"{m['torch']}; mergekit {data['mergekit_version']} in its own venv. Date: {m['date']} (the last "
        "run; each part below says when and where it was measured).",
        f"Command: `{data['command']}`. mergekit flags: `{' '.join(MK_FLAGS)} --random-seed 0` (CPU, "
        "default threads); skillgraft: `skillgraft merge CONFIG -o OUT --overwrite --seed 0`.",
        f"Inputs weighted {WEIGHTS[0]} / {WEIGHTS[1]}, density {DENSITY}; mergekit YAML with `dtype: float32` "
        "(the compute dtype skillgraft uses) and `out_dtype: bfloat16`. Synthetic fine-tune: ‖Δ‖/‖W‖ = "
        f"{data['args']['rel']:g} per tensor, low rank 8–16 + dense noise ({100 * data['args']['noise']:.0f}% "
        "of ‖Δ‖²). Each merge is a separate process; inputs are read once beforehand (warm page cache); runs "
        f"interleaved sg, mk, mk, sg … (1.1B: {data['args']['repeats_1b']}, SmolLM2: "
        f"{data['args']['repeats']} each); ratios use the best run of each tool. "
        "The machine is shared with other jobs: expect ±20% noise on any single time.",
        "",
    ]
    if "synth" in data:
        s = data["synth"]
        mi = s["model"]
        lines += [
            f"## Synthetic Llama, {mi['params'] / 1e9:.2f} B parameters (TinyLlama-1.1B shape, bf16, "
            f"{_gib(mi['stored_bytes'])} GiB in {mi['shards']} shards each), base + 2 fine-tunes",
            "",
            *_measured(s),
        ]
        render_compare("1.1B", s, lines)
        if "profile" in s:
            p = s["profile"]
            if "error" in p:
                lines += [f"Profile failed: {p['error']}", ""]
            else:
                lines += [
                    "### Profile of one skillgraft TIES run (py-spy, all threads, % of samples)",
                    "",
                    f"{p['samples']} samples at 50 Hz, run took {p['run']['wall']:.1f} s under py-spy.",
                    "",
                    "| function (self time) | % | skillgraft function (inclusive) | % |",
                    "|---|---:|---|---:|",
                ]
                for (f1, v1), (f2, v2) in zip(p["self"][:12], p["inclusive"][:12]):
                    lines.append(f"| `{f1}` | {100 * v1:.1f} | `{f2}` | {100 * v2:.1f} |")
                lines.append("")
    if "dense" in data:
        s = data["dense"]
        mi = s["model"]
        lines += [
            f"## Dense deltas: synthetic Llama, {mi['params'] / 1e9:.2f} B parameters (bf16, base + 2 fine-tunes, "
            f"‖Δ‖/‖W‖ = {mi['recipe']['rel']:g}, all dense noise: {100 * mi['changed_fraction']:.1f}% of fine-tune "
            "1's entries differ from the base)",
            "",
            *_measured(s),
        ]
        render_compare("dense", s, lines)
        if "bf16" in s:
            lines += ["", "### The same YAML with `dtype: bfloat16` (both tools compute in bf16)", ""]
            render_compare("dense", s["bf16"], lines)
    if "7b" in data:
        s = data["7b"]
        mi = s["model"]
        lines += [
            f"## Llama-2-7B shape ({mi['params'] / 1e9:.2f} B parameters, {_gib(mi['stored_bytes'])} GiB "
            f"bf16) + 3 rank-{mi['rank']} skill packs → full checkpoint, TIES (skillgraft only)",
            "",
            *_measured(s),
            f"Packs: {', '.join(f'{b / 1e6:.0f} MB' for b in mi['pack_bytes'])} ({mi['matrices']} matrices "
            "each). Own YAML, default `mode: paper`, weights 1.0 / 0.7 / 0.5.",
            "",
            "| run | wall (s) | CPU (s) | peak RSS (GiB) | peak anon (GiB) | output (GiB) |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for i, r in enumerate(s["runs"]):
            lines.append(
                f"| #{i + 1} | {r['wall']:.1f} | {r['cpu']:.0f} | {_gib(r['peak_rss'])} | "
                f"{_gib(r['peak_anon'])} | {_gib(r['out_bytes'])} |"
            )
        lines.append("")
    if "smollm" in data:
        s = data["smollm"]
        mi = s["model"]
        lines += [
            f"## SmolLM2-135M-Instruct (real weights, bf16, {mi['stored_bytes'] / 1e6:.0f} MB, tied "
            f"embeddings: {mi['tie_word_embeddings']}) + 2 synthetic fine-tunes",
            "",
            *_measured(s),
        ]
        render_compare("SmolLM2-135M", s, lines)
    lines += [
        "Peak RSS is the kernel's `ru_maxrss` (includes mmapped checkpoint pages that were touched); anon is "
        "the highest sampled `RssAnon` (heap only). ‖sg−mk‖/‖mk−θ₀‖ is the difference between the outputs "
        "relative to the size of mergekit's merged delta.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="synth,7b,smollm", help="comma-separated: synth, dense, 7b, smollm")
    p.add_argument("--workdir", type=Path, default=HERE / "_work", help="models and outputs go in WORKDIR/merge")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--mk-venv", type=Path, default=None, help="venv with mergekit (default WORKDIR/mkvenv)")
    p.add_argument("--size", default="1b", choices=sorted(SIZES), help="synthetic model of the synth part")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--repeats", type=int, default=2, help="SmolLM2: runs per tool and method (interleaved)")
    p.add_argument("--repeats-1b", type=int, default=1, help="synthetic 1.1B: runs per tool and method")
    p.add_argument("--repeats-7b", type=int, default=1)
    p.add_argument("--rel", type=float, default=1e-3, help="‖Δ‖_F/‖W‖_F of the synthetic fine-tunes")
    p.add_argument("--noise", type=float, default=0.2, help="fraction of ‖Δ‖² in dense noise")
    p.add_argument("--rank", type=int, default=16, help="rank of the 7B skill packs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-mk-bf16",
        dest="mk_bf16",
        action="store_false",
        help="skip the extra mergekit TIES run with dtype bfloat16",
    )
    p.add_argument(
        "--no-own-yaml", dest="own_yaml", action="store_false", help="skip the skillgraft TIES run on its own YAML"
    )
    p.add_argument("--profile", action="store_true", help="py-spy one skillgraft TIES run even if it is ≥5× faster")
    p.add_argument("--update", action="store_true", help="keep other parts' results from the existing .json")
    p.add_argument("--keep-inputs", action="store_true", help="keep the generated checkpoints for a rerun")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        kind, args = a.child[0], json.loads(a.child[1])
        Path(args["_result"]).write_text(json.dumps(CHILDREN[kind](args)))
        return 0
    a.mk_venv = a.mk_venv or a.workdir / "mkvenv"
    a.methods = [m for m in a.methods.split(",") if m]
    parts = [x for x in a.parts.split(",") if x]
    work = a.workdir / "merge"
    work.mkdir(parents=True, exist_ok=True)
    tools = Tools(a)
    if ("synth" in parts or "smollm" in parts or "dense" in parts) and not Path(tools.mk).exists():
        p.error(
            f"{tools.mk} not found: python3 -m venv {a.mk_venv} && {a.mk_venv}/bin/pip install "
            "torch==2.13.0 mergekit==0.1.5"
        )
    mkv = subprocess.run(
        [str(a.mk_venv / "bin" / "python"), "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
        capture_output=True,
        text=True,
    )
    data: dict = {
        "command": " ".join(["python", "benchmarks/merge_vs_mergekit.py", *(argv or sys.argv[1:])]),
        "machine": machine(),
        "mergekit_version": mkv.stdout.strip() or "?",
        "args": {
            "rel": a.rel,
            "noise": a.noise,
            "seed": a.seed,
            "repeats": a.repeats,
            "repeats_1b": a.repeats_1b,
            "rank": a.rank,
            "methods": a.methods,
            "weights": WEIGHTS,
            "density": DENSITY,
            "mk_flags": MK_FLAGS,
        },
    }
    a.results.mkdir(parents=True, exist_ok=True)
    prev = a.results / "merge_vs_mergekit.json"
    if a.update and prev.exists():  # keep the parts of an earlier run that this run does not redo
        old = json.loads(prev.read_text())
        data.update({k: v for k, v in old.items() if k in ("synth", "dense", "smollm", "7b") and k not in parts})
        data["command"] = old.get("command", "") + " ; " + data["command"]

    def save() -> None:
        (a.results / "merge_vs_mergekit.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
        (a.results / "merge_vs_mergekit.md").write_text(render(data))

    for part, fn in (("synth", part_synth), ("dense", part_dense), ("smollm", part_smollm), ("7b", part_7b)):
        if part in parts:
            data[part] = fn(work, a, tools)
            data[part]["measured"] = machine()  # --update keeps parts of earlier runs: each says when and where
            save()
    save()
    print(render(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
