"""The streaming merge engine: the only code that iterates tensor names, reads inputs and writes outputs.

``plan_merge`` opens every input (headers, manifests, adapter configs — no weights) and validates the whole
request; ``run_merge`` then streams one tensor name at a time through a reader thread, the method, and a
writer thread, so peak memory is a few tensors × the number of inputs, independent of model size.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from skillgraft.errors import InputError, NumericError
from skillgraft.io.checkpoint import Checkpoint
from skillgraft.io.writer import check_output
from skillgraft.merge.config import MergeConfig
from skillgraft.merge.registry import MethodInfo, TensorJob, get_method
from skillgraft.merge.sources import DeltaSource, check_source_fits, detect, open_source
from skillgraft.progress import ProgressFn, no_progress
from skillgraft.skill.apply import check_fit
from skillgraft.skill.fingerprint import fingerprint_checkpoint, fingerprint_tokenizer

OUT_FORMATS = ("hf", "skill", "lora")
LAYER_RE = re.compile(r"\.(?:layers|h|blocks|layer|block)\.(\d+)\.")
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class MergeOptions:
    """How to run a merge (everything that is not the merge itself)."""

    out: Path | None  # None: in memory (:func:`merge_in_memory`)
    out_format: str = "hf"
    rank: int | None = None  # for out_format="lora"
    overwrite: bool = False
    force: bool = False  # apply skills made for another base
    seed: int | None = None  # overrides the config's seed
    library: Path | None = None
    allow_pickle: bool = False
    # --dry-run: read no weights, so skill packs' base fingerprints (a hash of every base weight) go unchecked
    dry_run: bool = False
    max_shard_bytes: int = 2 * 1024**3


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    in_dtype: torch.dtype
    out_dtype: torch.dtype
    users: tuple[int, ...]  # indices of the inputs that change this tensor

    @property
    def out_bytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.out_dtype.itemsize


@dataclass
class MergePlan:
    config: MergeConfig
    method: MethodInfo
    params: Any
    base: Checkpoint
    sources: list[DeltaSource]
    tensors: list[TensorPlan]
    num_layers: int | None
    seed: int
    stats: list[Any] = field(default_factory=list)  # per input: LazyStats (get(name) -> Tensor | None)
    stats_dir: Any = None
    unchecked_fingerprints: tuple[str, ...] = ()  # skill inputs whose base fingerprint a dry run did not check
    warnings: tuple[str, ...] = ()  # what could not be checked at all (a pack without a base fingerprint)

    @property
    def out_bytes(self) -> int:
        return sum(t.out_bytes for t in self.tensors)

    def describe(self) -> dict:
        """The dry-run report: per-tensor sources, method and output size (no weights read)."""
        rows = []
        for t in self.tensors:
            srcs = [f"{self.sources[i].label}:{self.sources[i].describe(t.name)}" for i in t.users]
            rows.append(
                {
                    "tensor": t.name,
                    "shape": list(t.shape),
                    "out_dtype": str(t.out_dtype).split(".")[-1],
                    "inputs": srcs,
                    "action": "merge" if t.users else "copy base",
                    "bytes": t.out_bytes,
                }
            )
        return {
            "method": self.method.name,
            "parameters": dataclasses.asdict(self.params),
            "inputs": [
                {**i.to_dict(), "source": s.label, "kind": s.kind} for s, i in zip(self.sources, self.config.inputs)
            ],
            "tensors": rows,
            "merged_tensors": sum(1 for t in self.tensors if t.users),
            "total_tensors": len(self.tensors),
            "expected_output_bytes": self.out_bytes,
            "fingerprints_not_checked": list(self.unchecked_fingerprints),
            "warnings": list(self.warnings),
        }

    def close(self) -> None:
        for s in self.sources:
            s.close()
        for st in self.stats:
            if st is not None:
                st.file.close()
        if self.stats_dir is not None:
            self.stats_dir.cleanup()
        self.base.close()


def _params(info: MethodInfo, config: MergeConfig) -> Any:
    values = dict(config.parameters)
    fields = {f.name for f in dataclasses.fields(info.params)}
    if config.dialect == "mergekit" and "mode" in fields:
        values.setdefault("mode", "mergekit")
    return info.make_params(values)


def _check_counts(info: MethodInfo, config: MergeConfig) -> None:
    n = len(config.inputs)
    if n < info.min_inputs or (info.max_inputs is not None and n > info.max_inputs):
        want = f"exactly {info.min_inputs}" if info.min_inputs == info.max_inputs else f"at least {info.min_inputs}"
        raise InputError(f"merge method {info.name!r} takes {want} input(s), the config gives {n}")
    if info.name == "linear" and getattr(_params_defaults(info, config), "normalize", False):
        if abs(sum(i.weight for i in config.inputs)) < 1e-12:
            raise InputError("linear merge with normalize: the weights sum to 0", hint="set normalize: false")


def _params_defaults(info: MethodInfo, config: MergeConfig) -> Any:
    return _params(info, config)


def plan_merge(config: MergeConfig, opts: MergeOptions) -> MergePlan:
    """Validate the whole merge before reading any tensor; returns the plan (inputs opened lazily)."""
    if opts.out_format not in OUT_FORMATS:
        raise InputError(f"unknown output format {opts.out_format!r}", hint=f"use one of {', '.join(OUT_FORMATS)}")
    if opts.out_format == "lora" and (opts.rank is None or opts.rank < 1):
        raise InputError("--out-format lora needs --rank R (R >= 1)")
    info = get_method(config.method)
    params = _params(info, config)
    _check_counts(info, config)
    if info.stats and not config.examples:
        raise InputError(f"merge method {info.name!r} needs examples", hint="set 'examples: FILE.jsonl' in the config")
    if config.examples and not Path(config.examples).exists():
        raise InputError(f"examples file {config.examples} does not exist")
    if opts.out is not None:
        check_output(Path(opts.out), opts.overwrite)
    refs = [detect(i.source, opts.library) for i in config.inputs]
    base = Checkpoint(config.base, opts.allow_pickle)
    sources: list[DeltaSource] = []
    try:
        num_layers = _num_layers(base)
        check_plan = getattr(params, "check_plan", None)  # checks that need the inputs or the model's size
        if check_plan is not None:
            check_plan(len(config.inputs), num_layers)
        # A method that takes each tensor from one input (layer_swap) names it; only that input is read.
        supplier = getattr(params, "supplier", None)
        shapes = {n: base.shape(n) for n in base.names()}
        fp = None
        unchecked: list[str] = []
        notes: list[str] = []
        tokenizer = fingerprint_tokenizer(base.path)  # read once, not per input
        for ref in refs:
            src = open_source(ref, opts.library, opts.allow_pickle)
            sources.append(src)
            check_source_fits(src, shapes)
            if src.kind == "skill":
                pack = src.pack  # type: ignore[attr-defined]
                if not opts.force and pack.manifest.base.fingerprint:
                    if opts.dry_run:
                        unchecked.append(src.label)  # names and shapes are still checked below
                    else:
                        fp = fp or fingerprint_checkpoint(base).content
                notes += check_fit(pack, shapes, fp, opts.force, tokenizer)
        tensors = []
        for name in base.names():
            in_dtype = base.dtype(name)
            out_dtype = TORCH_DTYPES[config.out_dtype] if config.out_dtype and in_dtype.is_floating_point else in_dtype
            users = tuple(i for i, s in enumerate(sources) if name in s.names())
            if supplier is not None:
                users = tuple(i for i in users if i == supplier(_layer(name)))
            tensors.append(TensorPlan(name, shapes[name], in_dtype, out_dtype, users))
    except BaseException:
        for s in sources:
            s.close()
        base.close()
        raise
    seed = config.seed if opts.seed is None else opts.seed
    plan = MergePlan(config, info, params, base, sources, tensors, num_layers, seed)
    plan.unchecked_fingerprints = tuple(unchecked)
    plan.warnings = tuple(notes)
    return plan


def _num_layers(base: Checkpoint) -> int | None:
    """The number of transformer blocks: config.json's ``num_hidden_layers`` / ``n_layer``, else one more than the
    highest block index in the tensor names (None when no name has one)."""
    n = base.config.get("num_hidden_layers") or base.config.get("n_layer")
    if isinstance(n, int) and n > 0:
        return n
    layers = [i for i in map(_layer, base.names()) if i is not None]
    return max(layers) + 1 if layers else None


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed from the run's seed and the tensor name: reproducible and order independent."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def input_rngs(seed: int, name: str, n: int) -> tuple[torch.Generator, ...]:
    """One generator per input for tensor ``name``: draws depend on neither tensor order nor slicing."""
    return tuple(torch.Generator().manual_seed(tensor_seed(seed, f"{name}\0{i}")) for i in range(n))


def _layer(name: str) -> int | None:
    m = LAYER_RE.search(name)
    return int(m.group(1)) if m else None


@dataclass
class _Item:
    plan: TensorPlan
    base: torch.Tensor  # as stored
    deltas: torch.Tensor | None
    base32: torch.Tensor | None = None  # fp32 copy, made once per tensor


def _read(plan: MergePlan) -> Iterator[_Item]:
    n = len(plan.sources)
    for t in plan.tensors:
        base = plan.base.get(t.name)
        if not t.users:
            yield _Item(t, base, None)
            continue
        base32 = base.float()
        alloc = torch.empty if len(t.users) == n else torch.zeros  # rows no input writes must be zero
        deltas = alloc((n, *t.shape), dtype=torch.float32)
        for i in t.users:
            deltas[i] = plan.sources[i].delta(t.name, base32)
        yield _Item(t, base, deltas, base32)


def merge_tensor(plan: MergePlan, item: _Item, thresholds: list[float] | None) -> torch.Tensor:
    """Run the method on one tensor's inputs; returns the merged parameter in fp32."""
    t, info = item.plan, plan.method
    assert item.deltas is not None
    weights = torch.tensor(plan.config.weights_for(t.name), dtype=torch.float32)
    stats = None
    if info.stats:
        stats = tuple(s.get(t.name) if s is not None else None for s in plan.stats)
    job = TensorJob(
        name=t.name,
        deltas=item.deltas,
        weights=weights,
        base=item.base32 if info.needs_base else None,
        rng=input_rngs(plan.seed, t.name, item.deltas.shape[0]) if info.randomized else None,
        thresholds=tuple(thresholds) if thresholds else None,
        stats=stats,  # type: ignore[arg-type]
        layer=_layer(t.name),
        num_layers=plan.num_layers,
    )
    merged = info.fn(job, plan.params)
    if tuple(merged.shape) != t.shape:
        raise AssertionError(f"method {info.name} returned shape {tuple(merged.shape)} for {t.name} {t.shape}")
    assert item.base32 is not None
    out = torch.add(item.base32, merged)
    if not _finite(out):
        raise NumericError(f"merge produced NaN or Inf in tensor {t.name!r}", hint="check weights and parameters")
    return out


def _finite(t: torch.Tensor) -> bool:
    """No NaN or Inf, by one min/max reduction (NaN propagates through both) instead of a boolean tensor."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def global_thresholds(plan: MergePlan, density: float, progress: ProgressFn = no_progress) -> list[float]:
    """Per input, the magnitude t such that |Δᵢ| ≥ t keeps ``density`` of the whole model's entries.

    One streaming pass builds a histogram of the top 16 bits of each |Δ| in fp32 (sign, exponent, 7 mantissa
    bits): the threshold is exact to bf16 resolution, so slightly more than k entries may pass.
    """
    n = len(plan.sources)
    hist = [torch.zeros(1 << 15, dtype=torch.int64) for _ in range(n)]
    total = 0
    for k, t in enumerate(plan.tensors):
        progress("trim thresholds", k, len(plan.tensors))
        numel = 1
        for d in t.shape:
            numel *= d
        total += numel
        if not t.users:
            continue
        base = plan.base.get(t.name)
        for i in t.users:
            bits = plan.sources[i].delta(t.name, base).abs().reshape(-1).view(torch.int32) >> 16
            hist[i] += torch.bincount(bits, minlength=1 << 15)
    progress("trim thresholds", len(plan.tensors), len(plan.tensors))
    keep = max(1, int(density * total))
    out = []
    for h in hist:
        from_top = torch.cumsum(h.flip(0), 0)  # entries at or above each bin, highest bin first
        idx = int(torch.searchsorted(from_top, keep))
        b = (1 << 15) - 1 - min(idx, (1 << 15) - 1)
        out.append(float(torch.tensor([b << 16], dtype=torch.int32).view(torch.float32)))
    return out


def _sliced(plan: MergePlan, opts: MergeOptions) -> bool:
    """Chunked methods writing a full checkpoint take the slice path (``merge/slices.py``)."""
    return opts.out_format == "hf" and plan.method.chunked is not None and not plan.method.stats


class _TensorSteps:
    """Whole tensors: the method sees ``[n, *shape]`` deltas; every output format."""

    depth = 2

    def __init__(self, plan: MergePlan, thresholds: list[float] | None, out: Any) -> None:
        self.plan, self.thresholds, self.sink = plan, thresholds, out.add

    def read(self) -> Iterator[_Item]:
        return _read(self.plan)

    def merge(self, item: _Item, writer: Any) -> int:
        result = None if item.deltas is None else merge_tensor(self.plan, item, self.thresholds)
        writer.put(item.plan, item.base, result)
        return result is not None

    def close(self) -> None:
        pass


# Output buffers of the largest tensor's size, so the writer may lag a few tensors behind (1.1B: 3 → 5 saved
# 0.3 s of waiting): 5 while they fit in 1 GiB, never fewer than 3 (a 70B embedding alone is 2 GiB).
SLOTS, SLOTS_BYTES = (3, 5), 1 << 30


class _SliceSteps:
    """Slice by slice into reused buffers (see ``merge/slices.py``)."""

    depth = 2

    def __init__(self, plan: MergePlan, thresholds: list[float] | None, out: Any) -> None:
        from skillgraft.merge.slices import SliceMerger, Slots

        self.plan, self.out = plan, out
        self.merger = SliceMerger(plan, thresholds)
        largest = max((t.out_bytes for t in plan.tensors), default=0)
        self.out_slots = Slots(max(SLOTS[0], min(SLOTS[1], SLOTS_BYTES // max(largest, 1))), [largest])
        # Lanes already use both cores; torch's own threads on top would oversubscribe them (measured: 1.1B
        # task arithmetic 4.9 s with one torch thread per lane, 9.4 s with two).
        self.torch_threads = torch.get_num_threads()
        if self.merger.lanes > 1:
            torch.set_num_threads(1)

    def read(self) -> Iterator[Any]:
        from skillgraft.merge.slices import read_raw

        return read_raw(self.plan)

    def merge(self, item: Any, writer: Any) -> int:
        t = item.plan
        slot = self.out_slots.take()
        result = slot[0][: t.out_bytes].view(t.out_dtype)
        self.merger.merge(item, result)
        item.inputs.clear()  # unmap the inputs now
        writer.put(t, result.reshape(t.shape), slot)
        return bool(t.users)

    def sink(self, t: TensorPlan, result: torch.Tensor, slot: list[torch.Tensor]) -> None:
        try:
            self.out.add_final(t, result, changed=bool(t.users))
        finally:
            self.out_slots.give(slot)

    def close(self) -> None:
        self.out_slots.close()
        self.merger.close()
        torch.set_num_threads(self.torch_threads)


@dataclass(frozen=True)
class MergeResult:
    out: Path
    out_format: str
    method: str
    tensors: int
    merged: int
    seconds: float
    bytes_read: int
    details: dict

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["out"] = str(self.out)
        return d


def run_merge(
    plan: MergePlan, opts: MergeOptions, progress: ProgressFn = no_progress, command: str = ""
) -> MergeResult:
    """Stream every tensor through the method into the output; nothing is left at ``opts.out`` on error."""
    from skillgraft.merge.outputs import make_output
    from skillgraft.merge.pipeline import WriteBehind, prefetch

    start = time.perf_counter()
    thresholds = None
    if plan.method.global_trim and getattr(plan.params, "trim_scope", "tensor") == "global":
        thresholds = global_thresholds(plan, float(plan.params.density), progress)
    if plan.method.stats:
        from skillgraft.merge.stats import compute_stats

        plan.stats = compute_stats(plan, progress)
    out = make_output(plan, opts, command)
    total = sum(t.out_bytes for t in plan.tensors)
    step = _SliceSteps(plan, thresholds, out) if _sliced(plan, opts) else _TensorSteps(plan, thresholds, out)
    writer = WriteBehind(step.sink)
    done_bytes, merged, done = 0, 0, 0
    gc_was_on = gc.isenabled()
    gc.disable()  # the loop makes few objects and no cycles; collections only cost time (≈ 2 % of a fast merge)
    try:
        for item in prefetch(step.read(), depth=step.depth):
            merged += step.merge(item, writer)
            done_bytes += item.plan.out_bytes
            done += 1
            progress("merge [bytes]", done_bytes, total)
            progress("merge: tensors", done, len(plan.tensors))
        writer.close()
        details = out.finish()
    except BaseException:
        step.close()
        try:
            writer.close()
        except BaseException:
            pass
        out.abort()
        raise
    finally:
        if gc_was_on:
            gc.enable()
    step.close()
    read = sum(plan.base.nbytes(t.name) * (1 + len(t.users)) for t in plan.tensors)
    return MergeResult(
        Path(opts.out),
        opts.out_format,
        plan.method.name,
        len(plan.tensors),
        merged,
        time.perf_counter() - start,
        read,
        details,
    )


def merge_in_memory(
    config: MergeConfig,
    *,
    library: Path | None = None,
    force: bool = False,
    allow_pickle: bool = False,
    progress: ProgressFn = no_progress,
) -> dict[str, torch.Tensor]:
    """Run a merge into memory: every tensor of the merged model (the base's dtype, or ``out_dtype``), for
    searches that score many candidates (``skillgraft evolve``) without writing a checkpoint for each. The same
    validation and per-tensor path as :func:`merge`, one tensor at a time, no threads."""
    plan = plan_merge(config, MergeOptions(out=None, force=force, library=library, allow_pickle=allow_pickle))
    try:
        thresholds = None
        if plan.method.global_trim and getattr(plan.params, "trim_scope", "tensor") == "global":
            thresholds = global_thresholds(plan, float(plan.params.density), progress)
        if plan.method.stats:
            from skillgraft.merge.stats import compute_stats

            plan.stats = compute_stats(plan, progress)
        out: dict[str, torch.Tensor] = {}
        for done, item in enumerate(_read(plan), 1):
            t = item.plan
            result = item.base if item.deltas is None else merge_tensor(plan, item, thresholds)
            out[t.name] = result.to(t.out_dtype)
            progress("merge: tensors", done, len(plan.tensors))
        return out
    finally:
        plan.close()


def merge(
    config: MergeConfig, opts: MergeOptions, progress: ProgressFn = no_progress, command: str = ""
) -> MergeResult:
    """Validate, then run a merge (the API behind ``skillgraft merge``)."""
    plan = plan_merge(config, opts)
    try:
        return run_merge(plan, opts, progress, command)
    finally:
        plan.close()
