"""Which entries land at ranks ``[start, stop)`` of torch's CPU ``sort``, without sorting everything.

mergekit's TIES (``magnitude``) and Breadcrumbs trims keep the entries at a range of ranks of an *unstable*
``torch.sort`` / ``argsort`` of |Δ|. Where many entries share the boundary magnitude (dense bf16 deltas: 10⁵
entries of a 4096² tensor equal the k-th), which of them are kept is decided by the sort's order of equal keys,
so bit-exact parity with mergekit needs that order, and the full sort (n log n, single-threaded) dominated both
tools' run time.

On the torch builds we run (Linux x86-64 wheels), a 1-D float32 CPU sort is libstdc++'s ``std::sort`` over
(key, index) pairs (``aten/src/ATen/native/cpu/SortingKernel.cpp``; the comparator orders NaN first, then by key):
introsort with a median-of-three pivot moved to the front, Hoare's unguarded partition, a depth limit of
2⌊log₂ n⌋, and one insertion sort over the array once every part is ≤ 16 entries. A quicksort's partition of one
part never looks at another part, so the entries that end at ranks ``[start, stop)`` follow from the partitions of
the parts that hold a rank boundary strictly inside — a quickselect along at most two paths, O(n) instead of
O(n log n). ``rank_mask`` replays exactly those partitions (same pivot rule, same swaps, same stopping rule,
then the stable insertion sort of the last ≤ 16-entry parts) and returns the same set bit for bit. The loops are
C (``_sortreplay.c``, an optional extension built at install, called through ctypes without the GIL).

How we know it is the same set: by construction (the steps above), by a self-check against ``torch.sort`` on
tie-heavy inputs the first time it runs in a process, and by property tests. Where the check fails (another
torch build: x86-simd-sort, macOS's libc++, …), where a part would fall back to heapsort (the depth limit), where
a key is NaN, or where the C extension was not built (no compiler at install), ``rank_mask`` runs the real
sort — slower, never different.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any

import numpy as np
import torch

THRESHOLD = 16  # parts this small are left to std::sort's final insertion sort (as in _sortreplay.c)
REPLAY_MIN = 1 << 16  # smaller tensors sort (well under a millisecond)
KEEP_SCRATCH = 1 << 25  # entries (~270 MiB of scratch per thread at most)
_CHECK_LOCK = threading.Lock()
_LOCAL = threading.local()
_STATE: dict[str, Any] = {}


def _kernels() -> Any:
    """``sg_rank_mask`` of the compiled ``_sortreplay`` extension through ctypes (which releases the GIL for the
    call); None where the extension was not built (the install had no C compiler)."""
    try:
        from skillgraft.merge import _sortreplay  # type: ignore[attr-defined]
    except ImportError:
        return None
    fn = ctypes.CDLL(_sortreplay.__file__).sg_rank_mask
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    fn.argtypes = [p, i32, i64, i64, i64, i32, i32, p, p, p, i32]
    fn.restype = i64
    return fn


def _sorted_mask(w: torch.Tensor, start: int, stop: int, descending: bool, magnitude: bool) -> torch.Tensor:
    """The reference: a real (unstable) ``torch.sort`` of ``w`` (of |w| in fp32 with ``magnitude``)."""
    mask = torch.zeros(w.numel(), dtype=torch.bool)
    keys = w.abs().float() if magnitude else w
    mask[torch.sort(keys, descending=descending).indices[start:stop]] = True
    return mask


def _replayed_mask(
    w: torch.Tensor, start: int, stop: int, descending: bool, magnitude: bool, trim: bool = False
) -> torch.Tensor | None:
    """The mask by replay (``w`` is left as it is), or with ``trim`` ``w × mask`` in w's dtype; None where the
    replay cannot decide (NaN, the depth limit; with ``trim`` also an infinite entry, or a dtype other than fp32 and
    bf16).

    The replay arranges a copy of the keys so that positions ``[start, stop)`` hold the entries of those ranks; an
    entry whose key lies strictly between their lowest and highest key is inside the range whatever the order, so
    the mask is that comparison, plus the entries equal to a boundary key that the replay put inside. Keys are
    ``w``, ``|w|`` with ``magnitude``, negated where ``descending`` (descending by ``>`` is ascending by ``<`` of the
    negated keys: negation is exact and keeps ties); bf16 is read as its bits, other dtypes cast to fp32 first
    (exact, as mergekit's ``.float()``)."""
    n = w.numel()
    native = w.dtype in (torch.float32, torch.bfloat16)
    if n >= 1 << 31 or trim and not native:
        return None  # int32 positions; the trim writes fp32 or bf16 only
    src = w if native else w.float()
    key, idx = _scratch(n)
    out = torch.empty(n, dtype=w.dtype) if trim else torch.from_numpy(np.empty(n, dtype=np.bool_))
    count = _STATE["kernels"](
        src.data_ptr(), src.dtype == torch.bfloat16, n, start, stop, magnitude, descending,
        key.ctypes.data, idx.ctypes.data, out.data_ptr(), trim,
    )  # fmt: skip
    return out if count >= 0 else None


def _scratch(n: int) -> tuple[np.ndarray, np.ndarray]:
    """A float32 key buffer and an int32 index buffer for n entries (8 bytes per entry). Kept per thread and grown
    as needed up to ``KEEP_SCRATCH`` entries (fresh pages cost about as much as the replay); larger tensors get
    buffers of their own, freed after."""
    if n > KEEP_SCRATCH:
        return np.empty(n, dtype=np.float32), np.empty(n, dtype=np.int32)
    have = getattr(_LOCAL, "bufs", None)
    if have is None or have[0].size < n:
        size = max(n, 1 << 16)
        have = _LOCAL.bufs = (np.empty(size, dtype=np.float32), np.empty(size, dtype=np.int32))
    return have[0][:n], have[1][:n]


def _self_check() -> bool:
    """Does this process's torch sort the way ``_replayed_mask`` replays? Checked on tie-heavy inputs (few
    distinct values, signed, sizes across the insertion-sort threshold and several partition levels)."""
    g = torch.Generator().manual_seed(0)
    for n, levels in ((40, 3), (300, 7), (3000, 2), (3000, 40), (20_000, 300)):
        w = (torch.randint(0, 2 * levels, (n,), generator=g) - levels).float().mul_(0.125)
        for start, stop in ((0, n // 2), (n // 3, n - n // 5), (0, 17), (n - 1, n)):
            for descending in (True, False):
                for magnitude, x in ((False, w), (True, w), (True, w.bfloat16())):
                    got = _replayed_mask(x, start, stop, descending, magnitude)
                    if got is None or not torch.equal(got, _sorted_mask(x, start, stop, descending, magnitude)):
                        return False
    return True


def replay_available() -> bool:
    """True where ``rank_mask`` replays the sort (the C extension built and the self-check passed), else it sorts."""
    with _CHECK_LOCK:
        if "ok" not in _STATE:
            kernels = _kernels()
            _STATE["kernels"] = kernels
            _STATE["ok"] = kernels is not None and _self_check()
        return bool(_STATE["ok"])


def rank_mask(w: torch.Tensor, start: int, stop: int, *, descending: bool, magnitude: bool = False) -> torch.Tensor:
    """Flat bool mask of the entries ``torch.sort(keys, descending=descending).indices[start:stop]`` names, where
    ``keys`` is ``w`` (1-D contiguous float32), or with ``magnitude`` ``w.abs().float()`` (``w`` 1-D contiguous, any
    floating dtype: mergekit's ``tensor.abs().float()``, without making it). Exactly the real sort's set (see the
    module docstring), in O(n)."""
    n = w.numel()
    start, stop = max(0, min(start, n)), max(0, min(stop, n))
    if w.dim() != 1 or not w.is_contiguous() or not (w.dtype == torch.float32 or magnitude and w.is_floating_point()):
        need = "a floating" if magnitude else "a float32"
        raise ValueError(f"rank_mask: {need} 1-D contiguous tensor, not {w.dtype} of shape {tuple(w.shape)}")
    if stop <= start:
        return torch.zeros(n, dtype=torch.bool)
    if stop - start == n:
        return torch.ones(n, dtype=torch.bool)
    if n >= REPLAY_MIN and replay_available():
        got = _replayed_mask(w, start, stop, descending, magnitude)
        if got is not None:
            return got
    return _sorted_mask(w, start, stop, descending, magnitude)


def rank_trim(w: torch.Tensor, start: int, stop: int, *, descending: bool, magnitude: bool = False) -> torch.Tensor:
    """``w × m`` in w's dtype, m = ``rank_mask(w, start, stop, ...)`` as 0/1 — bit for bit what that product gives
    (kept entries as they are, the others zeros of their own sign), in one pass of the replay where it runs."""
    n = w.numel()
    lo, hi = max(0, min(start, n)), max(0, min(stop, n))
    if w.dim() == 1 and w.is_contiguous() and 0 < hi - lo < n and n >= REPLAY_MIN and replay_available():
        got = _replayed_mask(w, lo, hi, descending, magnitude, trim=True)
        if got is not None:
            return got
    mask = rank_mask(w, start, stop, descending=descending, magnitude=magnitude)
    return w * mask.view(torch.uint8).to(w.dtype)
