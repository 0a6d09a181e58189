"""Extract a skill pack from a (base, fine-tuned) pair of checkpoints, streaming tensor by tensor.

Modes: a byte budget (default 2% of the dense delta, allocated across tensors), a fixed rank, a fixed density,
or dense. Under a budget, pass 1 profiles every changed tensor (spectrum, magnitude curve) and spills its
top singular factors to a temp dir; allocation picks an encoding per tensor; pass 2 encodes and measures.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from skillgraft.errors import InputError, MismatchError, NumericError, UnsupportedError
from skillgraft.io.checkpoint import Checkpoint
from skillgraft.io.writer import check_output
from skillgraft.progress import ProgressFn, no_progress
from skillgraft.skill.budget import Options, allocate
from skillgraft.skill.encoding import decode, encode_dense, encode_lowrank, encode_sparse, rel_error, sq_norm
from skillgraft.skill.fingerprint import fingerprint_checkpoint, fingerprint_tokenizer
from skillgraft.skill.modules import layout, module_kind
from skillgraft.skill.pack import BaseIdentity, Manifest, PackWriter, validate_name
from skillgraft.skill.provenance import provenance
from skillgraft.skill.svd import balanced_factors, top_singular

SPARSE_GRID = np.geomspace(1e-4, 0.5, 28)
SAMPLE = 1 << 20
TIED_EMBEDDING_WEIGHT = 2.0  # error weight of a tied embedding in the allocation: it acts twice
FILE_OVERHEAD = 4096  # safetensors header basics + manifest top-level fields (provenance added on top)


@dataclass(frozen=True)
class ExtractSpec:
    """What to extract. Exactly one of ``budget``, ``rank``, ``density``, ``dense`` selects the mode."""

    base: Path
    tuned: Path
    out: Path
    budget: float | None = 0.02
    rank: int | None = None
    density: float | None = None
    dense: bool = False
    int8: bool = False
    name: str | None = None
    version: int = 1
    description: str = ""
    tags: tuple[str, ...] = ()
    allow_pickle: bool = False
    overwrite: bool = False
    seed: int = 0
    command: str = ""

    def validate(self) -> ExtractSpec:
        modes = [self.rank is not None, self.density is not None, self.dense]
        if sum(modes) > 1:
            raise InputError("choose one of --rank, --density and --dense")
        budget = None if any(modes) else (self.budget if self.budget is not None else 0.02)
        if budget is not None and not 0 < budget <= 1:
            raise InputError(f"budget {budget} is outside (0, 1]", hint="write it as a percentage, e.g. --budget 2%")
        if self.rank is not None and self.rank < 1:
            raise InputError(f"rank {self.rank} must be >= 1")
        if self.density is not None and not 0 < self.density <= 1:
            raise InputError(f"density {self.density} is outside (0, 1]")
        if self.int8 and self.density is not None:
            raise InputError("--int8 applies to low-rank factors; it cannot be combined with --density")
        name = validate_name(self.name or Path(self.out).name.removesuffix(".skill"))
        return ExtractSpec(**{**self.__dict__, "budget": budget, "name": name})


@dataclass(frozen=True)
class TensorReport:
    name: str
    kind: str
    encoding: str
    level: int
    nbytes: int
    rel_error: float
    energy: float

    @property
    def retained(self) -> float:
        return max(0.0, 1.0 - self.rel_error**2)


@dataclass(frozen=True)
class ExtractResult:
    manifest: Manifest
    path: Path
    file_bytes: int
    dense_delta_bytes: int
    budget_bytes: int | None
    tensors: tuple[TensorReport, ...] = field(default_factory=tuple)
    omitted: tuple[str, ...] = ()

    def by_kind(self) -> dict[str, dict]:
        """Per-module-kind totals: stored bytes and fraction of delta energy retained."""
        out: dict[str, dict] = {}
        for t in self.tensors:
            d = out.setdefault(t.kind, {"tensors": 0, "bytes": 0, "energy": 0.0, "err": 0.0})
            d["tensors"] += 1
            d["bytes"] += t.nbytes
            d["energy"] += t.energy
            d["err"] += t.energy * t.rel_error**2
        for d in out.values():
            d["retained"] = 1.0 - d["err"] / d["energy"] if d["energy"] > 0 else 1.0
            del d["err"]
        return out


def _check_pair(base: Checkpoint, tuned: Checkpoint) -> list[str]:
    bn, tn = set(base.names()), set(tuned.names())
    if tn - bn:
        extra = sorted(tn - bn)
        raise MismatchError(
            f"the fine-tuned model has {len(extra)} tensor(s) the base lacks, e.g. {extra[0]!r}",
            hint="check that BASE is the model TUNED was fine-tuned from (and that both tie embeddings alike)",
        )
    if bn - tn:
        missing = sorted(bn - tn)
        raise MismatchError(
            f"the fine-tuned model lacks {len(missing)} tensor(s) of the base, e.g. {missing[0]!r}",
            hint="check that BASE is the model TUNED was fine-tuned from (and that both tie embeddings alike)",
        )
    for n in base.names():
        bs, ts = base.shape(n), tuned.shape(n)
        if bs == ts:
            continue
        if module_kind(n, bs) == "embedding" and bs[1:] == ts[1:]:
            raise UnsupportedError(
                f"vocabulary resized: {n} has {bs[0]} rows in the base and {ts[0]} in the fine-tune",
                hint="resize the base's embeddings the same way (model.resize_token_embeddings) and save it, "
                "then extract against that base",
            )
        raise MismatchError(f"tensor {n!r} has shape {list(bs)} in the base but {list(ts)} in the fine-tune")
    return base.names()


def _delta(base: Checkpoint, tuned: Checkpoint, name: str) -> torch.Tensor | None:
    b, t = base.get(name), tuned.get(name)
    fp8 = t.is_floating_point() and t.element_size() == 1  # torch has few fp8 kernels: check in fp32, compare bytes
    if t.is_floating_point() and not torch.isfinite(t.float() if fp8 else t).all():
        raise NumericError(f"tensor {name!r} of the fine-tuned model contains NaN or Inf")
    if b.dtype == t.dtype and (torch.equal(b.view(torch.uint8), t.view(torch.uint8)) if fp8 else torch.equal(b, t)):
        return None
    return t.float() - b.float()


def lowrank_bytes(m: int, n: int, r: int, int8: bool) -> int:
    """Stored bytes of a rank-r factor pair: fp16 factors, or int8 factors plus fp32 per-row scales."""
    return r * (m + n) + 4 * (m + r) if int8 else 2 * r * (m + n)


def _options(
    name: str, delta: torch.Tensor, kind: str, itemsize: int, cap: int, spill: Path, spec: ExtractSpec
) -> Options:
    """Profile one tensor: its candidate encodings with byte costs and estimated squared errors."""
    numel = delta.numel()
    energy = sq_norm(delta)
    over = 2 * len(name) + 400  # header entries + manifest entry
    dense_bytes = numel * _dense_dtype(delta, itemsize).itemsize + over
    if kind == "norm" or delta.dim() < 2:
        # Norm scales and biases are tiny but multiply activations: small in bytes, large in effect, so
        # they are always kept, exactly enough (their cost is charged to the budget first).
        return Options(name, ("dense",), np.zeros(1, dtype=np.int64), np.array([dense_bytes]), np.zeros(1))
    enc, lev, nb, err = ["omit", "dense"], [0, 0], [0, dense_bytes], [energy, 0.0]

    def add(encoding: str, level: int, nbytes: int, error: float) -> None:
        enc.append(encoding)
        lev.append(level)
        nb.append(nbytes)
        err.append(error)

    if delta.dim() == 2:
        m, n = delta.shape
        k = min(cap, m, n)
        u, s, vh = top_singular(delta, k, seed=spec.seed)
        up, down = balanced_factors(u, s, vh, k)
        save_file({"up": up, "down": down}, str(spill))
        cum = np.cumsum(s.double().pow(2).numpy())
        for r in range(1, k + 1):
            add("lowrank", r, lowrank_bytes(m, n, r, spec.int8) + over, max(0.0, energy - float(cum[r - 1])))
    if numel > 64:
        flat = delta.reshape(-1)
        if numel > SAMPLE:  # estimate the magnitude curve from a seeded sample
            g = torch.Generator().manual_seed(spec.seed)
            flat = flat[torch.randint(0, numel, (SAMPLE,), generator=g)]
        curve = torch.cumsum(torch.sort(flat.double().pow(2), descending=True).values, 0)
        total = float(curve[-1])
        idx_bytes = 4 if numel < 2**31 else 8
        for d in SPARSE_GRID:
            kk = max(1, int(d * numel))
            kept = float(curve[max(1, int(d * len(curve))) - 1]) / total if total > 0 else 1.0
            add("sparse", kk, kk * (idx_bytes + 2) + over, energy * max(0.0, 1.0 - kept))
    return Options(name, tuple(enc), np.array(lev), np.array(nb, dtype=np.int64), np.array(err))


def _dense_dtype(delta: torch.Tensor, itemsize: int) -> torch.dtype:
    return torch.float16 if itemsize == 2 and float(delta.abs().max()) < 30000 else torch.float32


def _encode(delta: torch.Tensor, choice: tuple[str, int], ctx: dict) -> tuple[dict, dict]:
    """Encode one delta as chosen: ("dense"|"dense-exact"|"lowrank"|"sparse", level)."""
    enc, level = choice
    spec: ExtractSpec = ctx["spec"]
    if enc == "dense-exact":
        return encode_dense(delta, ctx["b"], ctx["t"])
    if enc == "dense":
        dt = _dense_dtype(delta, ctx["itemsize"])
        return {"dense": delta.to(dt)}, {"encoding": "dense", "value_dtype": str(dt).removeprefix("torch.")}
    if enc == "lowrank":
        if ctx.get("spill") is not None:
            f = load_file(str(ctx["spill"]))
            up, down = f["up"][:, :level], f["down"][:level]
        else:
            u, s, vh = top_singular(delta, level, seed=spec.seed)
            up, down = balanced_factors(u, s, vh, level)
        return encode_lowrank(up, down, int8=spec.int8)
    if enc == "sparse":
        return encode_sparse(delta, level)
    raise AssertionError(enc)


def _fixed_choice(spec: ExtractSpec, delta: torch.Tensor, kind: str) -> tuple[str, int]:
    if spec.dense or kind == "norm" or delta.dim() < 2:
        return ("dense-exact", 0)
    if spec.rank is not None:
        return ("lowrank", min(spec.rank, *delta.shape)) if delta.dim() == 2 else ("dense-exact", 0)
    assert spec.density is not None
    return ("sparse", max(1, math.ceil(spec.density * delta.numel())))


def _base_identity(base: Checkpoint) -> BaseIdentity:
    fp = fingerprint_checkpoint(base)
    return BaseIdentity(
        name=str(base.config.get("_name_or_path") or base.path.resolve()),
        fingerprint=fp.content,
        structure=fp.structure,
        tokenizer=fingerprint_tokenizer(base.path),
    )


def extract(spec: ExtractSpec, progress: ProgressFn = no_progress) -> ExtractResult:
    """Extract ``spec.tuned − spec.base`` into a skill pack at ``spec.out``; nothing is left there on error."""
    spec = spec.validate()
    out = Path(spec.out)
    check_output(out, spec.overwrite)
    with Checkpoint(spec.base, spec.allow_pickle) as base, Checkpoint(spec.tuned, spec.allow_pickle) as tuned:
        names = _check_pair(base, tuned)
        identity = _base_identity(base)
        model_type = base.config.get("model_type")
        with tempfile.TemporaryDirectory(prefix="skillgraft-extract-") as tmp:
            plan, dense_bytes, omit_reports = _plan(spec, base, tuned, names, Path(tmp), progress)
            writer = PackWriter(out, spec.overwrite)
            try:
                reports = _write(spec, base, tuned, plan, writer, model_type, progress)
                prov = provenance(spec.command, sources=[str(spec.base), str(spec.tuned)])
                manifest = Manifest(
                    name=spec.name or "skill",
                    version=spec.version,
                    base=identity,
                    tensors={},
                    description=spec.description,
                    tags=tuple(spec.tags),
                    provenance=prov,
                    source={"kind": "finetune", "mode": _mode(spec), "dense_delta_bytes": dense_bytes},
                )
                size = writer.close(manifest)
            except BaseException:
                writer.abort()
                raise
    omitted = tuple(n for n, (c, _) in plan.items() if c[0] == "omit")
    reports = [*reports, *(omit_reports[n] for n in omitted)]  # omitted tensors count as energy lost
    budget_bytes = None if spec.budget is None else int(spec.budget * dense_bytes)
    with_entries = manifest.replace(tensors=writer.entries)
    return ExtractResult(with_entries, out, size, dense_bytes, budget_bytes, tuple(reports), omitted)


def _mode(spec: ExtractSpec) -> dict:
    if spec.dense:
        return {"dense": True}
    if spec.rank is not None:
        return {"rank": spec.rank, "int8": spec.int8}
    if spec.density is not None:
        return {"density": spec.density}
    return {"budget": spec.budget, "int8": spec.int8}


def _plan(spec, base, tuned, names, tmp: Path, progress: ProgressFn):
    """Pass 1: find changed tensors; under a budget, profile them and allocate bytes."""
    plan: dict[str, tuple[tuple[str, int], Path | None]] = {}
    opts: list[Options] = []
    dense_bytes = 0
    omit_reports: dict[str, TensorReport] = {}  # what an omitted tensor loses: all of its energy
    for i, name in enumerate(names):
        progress("scan" if spec.budget is None else "profile", i, len(names))
        delta = _delta(base, tuned, name)
        if delta is None:
            continue
        itemsize = base.dtype(name).itemsize
        dense_bytes += delta.numel() * itemsize
        kind = module_kind(name, tuple(delta.shape))
        if spec.budget is None:
            plan[name] = (_fixed_choice(spec, delta, kind), None)
            continue
        spill = tmp / f"{len(opts)}.safetensors"
        m, n = (delta.shape[0], delta[0].numel()) if delta.dim() >= 2 else (1, delta.numel())
        uniform = spec.budget * delta.numel() * itemsize / (2 * (m + n))
        cap = min(1024, max(16, math.ceil(8 * uniform)))
        omit_reports[name] = TensorReport(name, kind, "omit", 0, 0, 1.0, sq_norm(delta))
        o = _options(name, delta, kind, itemsize, cap, spill, spec)
        if kind == "embedding" and base.tied_embeddings:  # a tied embedding is also the output head
            o = Options(o.name, o.encodings, o.levels, o.nbytes, o.err * TIED_EMBEDDING_WEIGHT)
        opts.append(o)
        plan[name] = (("omit", 0), spill if spill.exists() else None)
    progress("scan" if spec.budget is None else "profile", len(names), len(names))
    if spec.budget is not None:
        budget = int(spec.budget * dense_bytes) - FILE_OVERHEAD - len(spec.command) - len(spec.description)
        picks = allocate(opts, max(0, budget))
        for o, i in zip(opts, picks):
            enc, level, _, _ = o.choice(i)
            plan[o.name] = ((enc, level), plan[o.name][1])
    return plan, dense_bytes, omit_reports


def _write(spec, base, tuned, plan, writer: PackWriter, model_type, progress: ProgressFn) -> list[TensorReport]:
    """Pass 2: encode every planned tensor, measure its error, stream it into the pack."""
    reports = []
    todo = [n for n, (c, _) in plan.items() if c[0] != "omit"]
    for i, name in enumerate(todo):
        progress("encode", i, len(todo))
        (choice, spill) = plan[name]
        b, t = base.get(name), tuned.get(name)
        delta = t.float() - b.float()
        ctx = {"spec": spec, "b": b, "t": t, "itemsize": b.dtype.itemsize, "spill": spill}
        parts, fields = _encode(delta, choice, ctx)
        shape = list(delta.shape)
        approx = decode({**fields, "shape": shape, "name": name}, parts.__getitem__)
        err = rel_error(delta, approx)
        kind = module_kind(name, tuple(shape))
        fields.update(shape=shape, dtype=str(b.dtype).removeprefix("torch."), rel_error=err, kind=kind)
        if choice[0] == "dense-exact":
            fields["exact"] = torch.equal((b.float() + approx).to(b.dtype), t.to(b.dtype))
        if lay := layout(name, model_type):
            fields["layout"] = lay
        entry = writer.add(name, parts, fields)
        level = fields.get("rank") or fields.get("nnz") or 0
        energy = sq_norm(delta)
        reports.append(TensorReport(name, kind, fields["encoding"], level, entry["bytes"], err, energy))
    progress("encode", len(todo), len(todo))
    return reports
