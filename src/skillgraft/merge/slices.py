"""The engine's slice-by-slice path: chunked methods (see ``registry.Chunked``) writing a full checkpoint.

Inputs are read into a few reused, page-aligned buffers; Δ and the merge are computed one slice of
``SLICE`` entries at a time (temporaries of a few MB, which malloc recycles); the result is cast into a reused
output buffer that the writer thread streams out. Nothing proportional to a tensor is allocated per tensor.

Why: on a 2-core machine, fresh multi-GB allocations cost more than the arithmetic — the kernel zeroes every
new page (44 % of a 1.1B task-arithmetic merge's CPU time went to ``clear_page`` before this path existed).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from skillgraft.errors import NumericError
from skillgraft.io.direct import aligned_buffer, keep_freed_memory
from skillgraft.merge.registry import TensorJob
from skillgraft.merge.sources import CheckpointSource
from skillgraft.merge.steps import SLICE

LANES = 2  # threads that merge slices of one tensor side by side


class Closed(Exception):
    """Raised in a thread waiting on :class:`Slots` after the merge stopped."""


class Slots:
    """A fixed set of reusable buffer groups handed out in turn; ``take`` blocks until one is given back."""

    def __init__(self, count: int, sizes: list[int]) -> None:
        self._keep: list = []
        self._free: queue.Queue = queue.Queue()
        self._closed = threading.Event()
        self._buffers: list[torch.Tensor] = []
        for _ in range(count):
            group = []
            for size in sizes:
                mm, buf = aligned_buffer(size)
                self._keep.append(mm)
                group.append(buf)
            self._buffers += group
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
    plan: Any  # TensorPlan (engine.py imports this module)
    base: torch.Tensor  # stored dtype, mapped from the file
    inputs: dict[int, tuple[torch.Tensor, bool]]  # input index -> (tensor, is_raw_checkpoint_tensor)


def read_raw(plan) -> Iterator[RawItem]:  # noqa: ANN001
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


class SliceMerger:
    """Merges one tensor at a time, slice by slice, into output buffers from ``out_slots``."""

    def __init__(self, plan, thresholds: list[float] | None) -> None:  # noqa: ANN001
        from skillgraft.merge.engine import _layer, input_rngs

        self.plan, self.info, self.params = plan, plan.method, plan.params
        self.chunked = plan.method.chunked
        assert self.chunked is not None
        self.n = len(plan.sources)
        self.thresholds = tuple(thresholds) if thresholds else None
        self.whole = self.chunked.prepare is not None and self.chunked.needs_whole(self.params)
        numel_max = max((_numel(t.shape) for t in plan.tensors if t.users), default=0)
        self._whole_mm, self._whole = aligned_buffer(4 * self.n * numel_max if self.whole else 0)
        # Slices merge on LANES threads (torch kernels release the GIL). Randomized methods draw through
        # ``TensorJob.uniform``, counter-based per slice, so their draws do not depend on scheduling.
        self.lanes = LANES
        # One slice size for every method: 2¹⁸ entries (1 MB fp32 per input) keeps a slice's buffers in L2.
        # Linear / task arithmetic once took 4× larger slices to save per-slice Python (≈ 5 % on an Intel
        # Xeon); on an AMD EPYC host that was 2× slower (8.6 vs 4.2 ms per 2²⁰ entries, working set past L2).
        self.step = SLICE
        self._work = [torch.empty((self.n, self.step), dtype=torch.float32) for _ in range(LANES)]
        self._pool = ThreadPoolExecutor(LANES) if LANES > 1 else None
        keep_freed_memory()
        self._layer, self._rngs = _layer, input_rngs

    def _fill(self, d: torch.Tensor, item: RawItem, b32: torch.Tensor, sl: slice) -> None:
        """Δ for slice ``sl`` of every input into ``d`` (``[n, len]``); inputs that keep the base give 0."""
        for i in range(self.n):
            if i not in item.inputs:
                d[i].zero_()
                continue
            x, raw = item.inputs[i]
            d[i].copy_(x.reshape(-1)[sl])  # widens to fp32 (faster than one mixed-dtype sub here)
            if raw:
                d[i].sub_(b32)

    def merge(self, item: RawItem, out: torch.Tensor) -> None:
        """Merge ``item`` into ``out`` (flat, the output dtype)."""
        t = item.plan
        base = item.base.reshape(-1)
        numel = base.numel()
        if not t.users:
            out.copy_(base)
            return
        step = self.step
        slices = [slice(s, min(s + step, numel)) for s in range(0, numel, step)]
        rng = self._rngs(self.plan.seed, t.name, self.n) if self.info.randomized else None
        common = dict(
            name=t.name, weights=torch.tensor(self.plan.config.weights_for(t.name)), rng=rng,
            thresholds=self.thresholds,
            layer=self._layer(t.name), num_layers=self.plan.num_layers,
        )  # fmt: skip
        ctx = None
        whole = None
        if self.whole:
            whole = self._whole[: 4 * self.n * numel].view(torch.float32).view(self.n, numel)

            def fill(lane: list[slice], _: torch.Tensor) -> None:
                for sl in lane:
                    self._fill(whole[:, sl], item, base[sl].float(), sl)

            self._lanes(fill, slices, parallel=True)
        if self.chunked.prepare is not None:
            deltas = whole if whole is not None else torch.empty((self.n, 0))
            ctx = self.chunked.prepare(TensorJob(deltas=deltas, **common), self.params)  # type: ignore[arg-type]

        def run(lane: list[slice], work: torch.Tensor) -> None:
            for sl in lane:
                b32 = base[sl].float()
                if whole is not None:
                    d = whole[:, sl]
                else:
                    d = work[:, : sl.stop - sl.start]
                    self._fill(d, item, b32, sl)
                job = TensorJob(deltas=d, base=b32 if self.info.needs_base else None, **common)  # type: ignore[arg-type]
                merged = b32.add_(self.chunked.apply(job, self.params, ctx, sl))
                lo, hi = torch.aminmax(merged)
                if not (torch.isfinite(lo) and torch.isfinite(hi)):
                    raise NumericError(
                        f"merge produced NaN or Inf in tensor {t.name!r}", hint="check weights and parameters"
                    )
                out[sl].copy_(merged)

        self._lanes(run, slices, parallel=self.lanes > 1)

    def _lanes(self, fn, slices: list[slice], parallel: bool) -> None:  # noqa: ANN001
        """``fn(lane_slices, work_buffer)`` over every slice: split across the lanes, or in order on one."""
        if self._pool is None or not parallel or len(slices) < 2:
            fn(slices, self._work[0])
            return
        futures = [self._pool.submit(fn, slices[k :: self.lanes], self._work[k]) for k in range(self.lanes)]
        for f in futures:
            f.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
