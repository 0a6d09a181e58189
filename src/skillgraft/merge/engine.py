"""The streaming merge engine: the one loop that reads inputs, runs a method and writes outputs.

:func:`plan_merge` (``merge/plan.py``) validates the whole request first; :func:`run_merge` then runs the method's
whole-model pass, if it has one, and streams one tensor at a time: a read-ahead thread maps the inputs, the method's
``prepare`` sees the tensor once, its ``apply`` merges slice after slice on the engine's threads into a reused output
buffer, and a write-behind thread hands the result to the output (a checkpoint, a skill pack, a LoRA adapter or
memory). Peak memory is a few tensors, independent of model size. The engine names no method and no parameter:
everything a method needs comes through its :class:`~skillgraft.merge.registry.Steps`.

Why reused buffers: on a small machine, fresh multi-GB allocations cost more than the arithmetic — the kernel
zeroes every new page (44 % of a 1.1B task-arithmetic merge's CPU time went to ``clear_page`` before this path).
"""

from __future__ import annotations

import dataclasses
import gc
import math
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from skillgraft.errors import NumericError
from skillgraft.io.direct import aligned_buffer, keep_freed_memory
from skillgraft.machine import cpu_count
from skillgraft.merge.config import MergeConfig
from skillgraft.merge.plan import (
    MergeOptions,
    MergePlan,
    TensorPlan,
    input_rngs,
    layer_of,
    plan_merge,
)
from skillgraft.merge.registry import TensorJob
from skillgraft.merge.sources import CheckpointSource
from skillgraft.merge.steps import SLICE
from skillgraft.progress import ProgressFn, no_progress

__all__ = ["MergeOptions", "MergeResult", "merge", "merge_in_memory", "plan_merge", "run_merge"]

# Output buffers of the largest tensor's size, so the writer may lag a few tensors behind (1.1B: 3 → 5 saved
# 0.3 s of waiting): 5 while they fit in 1 GiB, never fewer than 3 (a 70B embedding alone is 2 GiB).
SLOTS, SLOTS_BYTES = (3, 5), 1 << 30


class Closed(Exception):
    """Raised in a thread waiting on :class:`Slots` after the merge stopped."""


class Slots:
    """A fixed set of reusable buffer groups handed out in turn; ``take`` blocks until one is given back."""

    def __init__(self, count: int, sizes: list[int]) -> None:
        self._keep: list = []
        self._free: queue.Queue = queue.Queue()
        self._closed = threading.Event()
        for _ in range(count):
            group = []
            for size in sizes:
                mm, buf = aligned_buffer(size)
                self._keep.append(mm)
                group.append(buf)
            self._free.put(group)
        # Pages are zeroed on first touch, by the lanes. Faulting them all in up front on a helper thread
        # (MADV_POPULATE_WRITE) was tried: it holds the address-space lock that the read-ahead thread's mmap
        # calls need, which delayed the first tensor by 1.2 s and raised peak RSS by 0.4 GiB (1.1B task
        # arithmetic, 3 runs each: 11.7 s vs 13.0 s mean wall).

    def take(self) -> list[torch.Tensor]:
        while True:
            if self._closed.is_set():
                raise Closed()
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                continue

    def give(self, group: list[torch.Tensor]) -> None:
        self._free.put(group)

    def close(self) -> None:
        self._closed.set()


@dataclass
class RawItem:
    plan: TensorPlan
    base: torch.Tensor  # stored dtype, mapped from the file
    inputs: dict[int, tuple[torch.Tensor, bool]]  # input index -> (tensor, is_raw_checkpoint_tensor)


def read_raw(plan: MergePlan) -> Iterator[RawItem]:
    """Map each tensor's base and checkpoint inputs (no copy); other inputs give their Δ (read-ahead thread)."""
    for t in plan.tensors:
        base = plan.base.map(t.name)
        inputs: dict[int, tuple[torch.Tensor, bool]] = {}
        for i in t.users:
            src = plan.sources[i]
            if isinstance(src, CheckpointSource):
                inputs[i] = (src.ckpt.map(t.name), True)
            else:
                inputs[i] = (src.delta(t.name, base).float(), False)
        yield RawItem(t, base, inputs)


class TensorMerger:
    """Merges one tensor at a time: ``prepare`` once, then ``apply`` slice by slice on ``threads`` lanes.

    Threads: the lanes (and a method's per-input work through ``TensorJob.each``) run on one pool of ``threads``
    workers, each with one torch thread (torch's own threads on top would oversubscribe the cores: 1.1B task
    arithmetic took 4.9 s with one torch thread per lane, 9.4 s with two); ``prepare`` runs on the calling thread
    with ``threads`` torch threads, for methods whose whole-tensor work is one large op (a solve, a sort).
    """

    def __init__(self, plan: MergePlan, threads: int) -> None:
        self.plan, self.info = plan, plan.method
        steps = plan.method.steps
        assert steps is not None, f"merge method {plan.method.name} has no steps"
        self.steps = steps
        self.n = len(plan.sources)
        distinct = {id(t.params): t.params for t in plan.tensors if t.users}.values()
        self.reads_whole = steps.prepare is not None and any(steps.reads_whole(p) for p in distinct)
        numel_max = max((t.numel for t in plan.tensors if t.users), default=0)
        self._whole_mm, self._whole = aligned_buffer(4 * self.n * numel_max if self.reads_whole else 0)
        self.threads = threads
        # One slice size for every method: 2¹⁸ entries (1 MB fp32 per input) keeps a slice's buffers in L2.
        # Linear / task arithmetic once took 4× larger slices to save per-slice Python (≈ 5 % on an Intel
        # Xeon); on an AMD EPYC host that was 2× slower (8.6 vs 4.2 ms per 2²⁰ entries, working set past L2).
        self.step = SLICE
        self._work: dict[tuple[int, torch.dtype], torch.Tensor] = {}  # (lane, dtype) -> [n, step] buffer
        self._torch_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        self._pool = _single_threaded_pool(threads) if threads > 1 else None
        keep_freed_memory()

    def _map(self, fn: Any, items: list) -> list:
        assert self._pool is not None
        return list(self._pool.map(fn, items))

    def _buffer(self, lane: int, dtype: torch.dtype) -> torch.Tensor:
        key = (lane, dtype)
        if key not in self._work:
            self._work[key] = torch.empty((self.n, self.step), dtype=dtype)
        return self._work[key]

    def _fill(self, d: torch.Tensor, item: RawItem, b: torch.Tensor, sl: slice) -> None:
        """Δ for slice ``sl`` of every input into ``d`` (``[n, len]``, the work dtype; ``b`` the base slice in it);
        inputs that keep the base give 0. Checkpoint inputs are rounded to the compute dtype first."""
        rounding = item.plan.compute_dtype
        for i in range(self.n):
            if i not in item.inputs:
                d[i].zero_()
                continue
            x, raw = item.inputs[i]
            d[i].copy_(rounded(x.reshape(-1)[sl], rounding, d.dtype) if raw else x.reshape(-1)[sl])
            if raw:
                d[i].sub_(b)

    def merge(self, item: RawItem, out: torch.Tensor) -> None:
        """Merge ``item`` into ``out`` (flat, the output dtype)."""
        t = item.plan
        base = item.base.reshape(-1)
        if not t.users:
            out.copy_(base)
            return
        numel, step = t.numel, self.step
        slices = [slice(s, min(s + step, numel)) for s in range(0, numel, step)]
        extra = self.plan.model_pass.fields(t.name) if self.plan.model_pass is not None else {}
        # The work dtype: fp32, or the compute dtype itself for methods that compute in their inputs' precision
        # (mergekit's task-arithmetic family); inputs are rounded to the compute dtype either way.
        rounding = t.compute_dtype
        # (fp8 has too few CPU kernels to compute in: its arithmetic is fp32, rounded to fp8 at the end)
        work = rounding if self.info.low_precision and rounding.itemsize >= 2 else torch.float32
        common = dict(
            name=t.name,
            weights=torch.tensor(t.weights, dtype=work),
            rng=input_rngs(self.plan.seed, t.name, self.n) if self.info.randomized else None,
            layer=layer_of(t.name),
            num_layers=self.plan.num_layers,
            pool=self._map if self._pool is not None else None,
            compute_dtype=rounding,
            **extra,
        )
        params = t.params
        reads_whole = self.steps.prepare is not None and self.steps.reads_whole(params)
        ctx = None
        if self.steps.prepare is not None:
            if reads_whole:
                whole = self._whole[: work.itemsize * self.n * numel].view(work).view(self.n, numel)

                def fill(lane: list[slice], _: int) -> None:
                    for sl in lane:
                        self._fill(whole[:, sl], item, rounded(base[sl], rounding, work), sl)

                self._lanes(fill, slices)
                deltas = whole.view(self.n, *t.shape)
            else:
                deltas = torch.empty((self.n, 0), dtype=work)
            b = rounded(base, rounding, work).reshape(t.shape) if self.info.needs_base and reads_whole else None
            torch.set_num_threads(self.threads)
            try:
                ctx = self.steps.prepare(TensorJob(deltas=deltas, base=b, **common), params)  # type: ignore[arg-type]
            finally:
                torch.set_num_threads(1)

        copied = not base.dtype == rounding == work  # ``rounded(base[sl], …)`` is then a fresh tensor

        def run(lane: list[slice], k: int) -> None:
            buffer = self._buffer(k, work)
            for sl in lane:
                b = rounded(base[sl], rounding, work)
                if reads_whole:
                    d = whole[:, sl]
                else:
                    d = buffer[:, : sl.stop - sl.start]
                    self._fill(d, item, b, sl)
                job = TensorJob(deltas=d, base=b if self.info.needs_base else None, **common)  # type: ignore[arg-type]
                delta = self.steps.apply(job, params, ctx, sl)
                # in place only into a copy: for checkpoints in the work dtype ``b`` is the base's mapped memory
                merged = b.add_(delta) if copied else torch.add(b, delta)
                if merged.dtype != rounding and rounding.itemsize >= 2:  # in the compute dtype, then the output's
                    merged = merged.to(rounding)  # (mergekit's order); checked after, so an fp16 overflow is caught
                lo, hi = torch.aminmax(merged)  # (no fp8 aminmax on CPU: fp8 is checked before its rounding)
                if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
                    raise NumericError(
                        f"merge produced NaN or Inf in tensor {t.name!r}", hint="check weights and parameters"
                    )
                if merged.dtype != rounding:
                    merged = merged.to(rounding)
                out[sl].copy_(merged)

        self._lanes(run, slices)

    def _lanes(self, fn: Any, slices: list[slice]) -> None:
        """``fn(lane_slices, lane_index)`` over every slice, split across the lanes (in order on one)."""
        if self._pool is None or len(slices) < 2:
            fn(slices, 0)
            return
        futures = [self._pool.submit(fn, slices[k :: self.threads], k) for k in range(self.threads)]
        for f in futures:
            f.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        torch.set_num_threads(self._torch_threads)


def rounded(x: torch.Tensor, rounding: torch.dtype, work: torch.dtype) -> torch.Tensor:
    """``x`` rounded to the compute dtype ``rounding`` (as mergekit loads every tensor in its config's ``dtype``),
    then held in the work dtype; ``x`` itself when it already is both."""
    if x.dtype != rounding and rounding != work:
        x = x.to(rounding)
    return x if x.dtype == work else x.to(work)


def _single_threaded_pool(threads: int) -> ThreadPoolExecutor:
    """A pool of ``threads`` workers, all started now, each fixed at one torch thread.

    torch reads its thread count into each OS thread once, on that thread's first parallel op; starting every
    worker while the count is 1 (and having it read the count at once) keeps it at 1, whatever the calling
    thread sets later for ``prepare``.
    """
    ready = threading.Barrier(threads)

    def start() -> None:
        torch.get_num_threads()  # fixes this thread's count at the current 1
        ready.wait()

    pool = ThreadPoolExecutor(threads)
    for f in [pool.submit(start) for _ in range(threads)]:
        f.result()
    return pool


class MemoryOutput:
    """Every merged tensor kept in memory (the output dtype), for :func:`merge_in_memory`."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def add(self, t: TensorPlan, tensor: torch.Tensor, base: torch.Tensor) -> None:
        self.tensors[t.name] = tensor.clone()  # the engine reuses its output buffers

    def finish(self) -> dict:
        return {"format": "memory", "tensors": len(self.tensors)}

    def abort(self) -> None:
        self.tensors.clear()


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


def _stream(plan: MergePlan, out: Any, threads: int, progress: ProgressFn) -> dict:
    """The one merge loop: the method's whole-model pass, then every tensor into ``out``; returns its details.
    On any error ``out.abort()`` runs and nothing is left half-written."""
    from skillgraft.merge.pipeline import WriteBehind, prefetch

    merger = None
    slots = None
    try:
        if plan.method.steps is not None and plan.method.steps.model_pass is not None and plan.model_pass is None:
            plan.model_pass = plan.method.steps.model_pass(plan, plan.params, progress)
        merger = TensorMerger(plan, threads)
        largest = max((t.out_bytes for t in plan.tensors), default=0)
        slots = Slots(max(SLOTS[0], min(SLOTS[1], SLOTS_BYTES // max(largest, 1))), [largest])

        def sink(t: TensorPlan, result: torch.Tensor, base: torch.Tensor, slot: list[torch.Tensor]) -> None:
            try:
                out.add(t, result, base)
            finally:
                slots.give(slot)

        writer = WriteBehind(sink)
        total = plan.out_bytes
        done_bytes = 0
        gc_was_on = gc.isenabled()
        gc.disable()  # the loop makes few objects and no cycles; collections only cost time (≈ 2 % of a fast merge)
        try:
            for done, item in enumerate(prefetch(read_raw(plan), depth=2), 1):
                t = item.plan
                slot = slots.take()
                result = slot[0][: t.out_bytes].view(t.out_dtype)
                merger.merge(item, result)
                item.inputs.clear()  # unmap the inputs now
                writer.put(t, result.reshape(t.shape), item.base, slot)
                done_bytes += t.out_bytes
                progress("merge [bytes]", done_bytes, total)
                progress("merge: tensors", done, len(plan.tensors))
            writer.close()
        except BaseException:
            try:
                writer.close()
            except BaseException:
                pass
            raise
        finally:
            if gc_was_on:
                gc.enable()
        return out.finish()
    except BaseException:
        out.abort()
        raise
    finally:
        if slots is not None:
            slots.close()
        if merger is not None:
            merger.close()


def run_merge(
    plan: MergePlan, opts: MergeOptions, progress: ProgressFn = no_progress, command: str = ""
) -> MergeResult:
    """Stream every tensor through the method into the output; nothing is left at ``opts.out`` on error."""
    from skillgraft.merge.outputs import make_output

    start = time.perf_counter()
    out = make_output(plan, opts, command)
    details = _stream(plan, out, opts.threads or cpu_count(), progress)
    read = sum(plan.base.nbytes(t.name) * (1 + len(t.users)) for t in plan.tensors)
    return MergeResult(
        Path(opts.out),  # type: ignore[arg-type]
        opts.out_format,
        plan.method.name,
        len(plan.tensors),
        sum(1 for t in plan.tensors if t.users),
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
    threads: int | None = None,
    progress: ProgressFn = no_progress,
) -> dict[str, torch.Tensor]:
    """Run a merge into memory: every tensor of the merged model (the base's dtype, or ``out_dtype``), for
    searches that score many candidates (``skillgraft evolve``) without writing a checkpoint for each. The same
    validation and the same loop as :func:`merge`."""
    opts = MergeOptions(out=None, force=force, library=library, allow_pickle=allow_pickle, threads=threads)
    plan = plan_merge(config, opts)
    try:
        out = MemoryOutput()
        _stream(plan, out, threads or cpu_count(), progress)
        return out.tensors
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
