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
then the stable insertion sort of the last ≤ 16-entry parts) and returns the same set bit for bit.

How we know it is the same set: by construction (the steps above), by a self-check against ``torch.sort`` on
tie-heavy inputs the first time it runs in a process, and by property tests. Where the check fails (another
torch build: x86-simd-sort, macOS's libc++, …), where a part would fall back to heapsort (the depth limit), where
a key is NaN, or where numba is missing, ``rank_mask`` runs the real sort — slower, never different.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch

THRESHOLD = 16  # parts this small are left to std::sort's final insertion sort (as in _sortkernels)
KEEP_SCRATCH = 1 << 25
_CHECK_LOCK = threading.Lock()
_LOCAL = threading.local()
_STATE: dict[str, Any] = {}


def _kernels() -> Any:
    """The numba kernels (compiled, or loaded from numba's cache, on first use); None without numba."""
    try:
        from skillgraft.merge import _sortkernels
    except ImportError:  # pragma: no cover - numba is a dependency; kept so a broken install still merges
        return None
    return _sortkernels.select, _sortkernels.boundary_ties


def _sorted_mask(w: torch.Tensor, start: int, stop: int, descending: bool) -> torch.Tensor:
    """The reference: a real (unstable) ``torch.sort``."""
    mask = torch.zeros(w.numel(), dtype=torch.bool)
    mask[torch.sort(w, descending=descending).indices[start:stop]] = True
    return mask


def _replayed_mask(w: torch.Tensor, start: int, stop: int, descending: bool) -> torch.Tensor | None:
    """The mask by replay (``w``: 1-D contiguous float32, left as it is); None where the replay cannot decide.

    The replay arranges a copy of the keys so that positions ``[start, stop)`` hold the entries of those ranks; an
    entry whose key lies strictly between their lowest and highest key is inside the range whatever the order, so
    the mask is that comparison on ``w``, plus the entries equal to a boundary key that the replay put inside."""
    select, boundary_ties = _STATE["kernels"]
    n = w.numel()
    key, idx, lbuf, rbuf = _scratch(n)
    # descending order by comp ">" is ascending order of the negated keys by "<" (negation is exact, keeps ties)
    torch.neg(w, out=key) if descending else key.copy_(w)
    if not select(key.numpy(), idx, start, stop, lbuf, rbuf):
        return None
    count, lo_v, hi_v = boundary_ties(key.numpy(), idx, start, stop, start > 0, stop < n, lbuf)
    lo_v, hi_v = float(lo_v), float(hi_v)
    if descending:  # key = −w: key > lo_v ⟺ w < −lo_v
        inside = _between(w, -hi_v if stop < n else None, -lo_v if start > 0 else None)
    else:
        inside = _between(w, lo_v if start > 0 else None, hi_v if stop < n else None)
    inside[torch.from_numpy(lbuf[:count]).long()] = True
    return inside


def _between(w: torch.Tensor, above: float | None, below: float | None) -> torch.Tensor:
    """Bool mask of ``above < w < below`` (a bound of None is no bound)."""
    if above is None and below is None:
        return torch.ones(w.shape, dtype=torch.bool)
    if above is None:
        return w < below
    if below is None:
        return w > above
    return (w > above) & (w < below)


def _scratch(n: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray]:
    """A float32 key buffer and three index buffers of n entries. Kept per thread up to ``KEEP_SCRATCH`` entries
    (fresh pages cost about as much as the replay of a large tensor), allocated per call above that."""
    if n > KEEP_SCRATCH:
        itype = np.int32 if n < 1 << 31 else np.int64
        return (torch.empty(n), *(np.empty(n, dtype=itype) for _ in range(3)))  # type: ignore[return-value]
    have = getattr(_LOCAL, "bufs", None)
    if have is None or have[0].numel() < n:
        size = max(n, 1 << 16)
        have = _LOCAL.bufs = (torch.empty(size), *(np.empty(size, dtype=np.int32) for _ in range(3)))
    return (have[0][:n], *(b[:n] for b in have[1:]))  # type: ignore[return-value]


def _self_check() -> bool:
    """Does this process's torch sort the way ``_replayed_mask`` replays? Checked on tie-heavy float32 inputs
    (few distinct values, sizes across the insertion-sort threshold and several partition levels)."""
    g = torch.Generator().manual_seed(0)
    for n, levels in ((40, 3), (300, 7), (3000, 2), (3000, 40), (20_000, 300)):
        w = torch.randint(0, levels, (n,), generator=g).float().mul_(0.125)
        for start, stop in ((0, n // 2), (n // 3, n - n // 5), (0, 17), (n - 1, n)):
            for descending in (True, False):
                got = _replayed_mask(w, start, stop, descending)
                if got is None or not torch.equal(got, _sorted_mask(w, start, stop, descending)):
                    return False
    return True


def replay_available() -> bool:
    """True where ``rank_mask`` replays the sort (numba present and the self-check passed), else it sorts."""
    with _CHECK_LOCK:
        if "ok" not in _STATE:
            kernels = _kernels()
            _STATE["kernels"] = kernels
            _STATE["ok"] = kernels is not None and _self_check()
        return bool(_STATE["ok"])


def rank_mask(w: torch.Tensor, start: int, stop: int, *, descending: bool) -> torch.Tensor:
    """Flat bool mask of the entries ``torch.sort(w, descending=descending).indices[start:stop]`` names.

    ``w``: a 1-D contiguous float32 CPU tensor. Exactly the real sort's set (see the module docstring), in O(n)."""
    n = w.numel()
    start, stop = max(0, min(start, n)), max(0, min(stop, n))
    if w.dtype != torch.float32 or w.dim() != 1 or not w.is_contiguous():
        raise ValueError(f"rank_mask: a 1-D contiguous float32 tensor, not {w.dtype} of shape {tuple(w.shape)}")
    if stop <= start:
        return torch.zeros(n, dtype=torch.bool)
    if stop - start == n:
        return torch.ones(n, dtype=torch.bool)
    if n > THRESHOLD and replay_available():
        got = _replayed_mask(w, start, stop, descending)
        if got is not None:
            return got
    return _sorted_mask(w, start, stop, descending)
