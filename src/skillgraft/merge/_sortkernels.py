"""numba kernels of ``merge.sortpath`` (imported only when a sort replay is needed: importing numba costs
~0.3 s). They replay libstdc++'s ``std::sort`` (comp ``<``) on the parts of the array that hold a rank boundary;
``sortpath``'s docstring says why that gives the real sort's set.

Keys are handled as float32 bit patterns (``uint32`` views): a bf16 value is its 16 bits shifted up (exactly
``.float()``), |x| clears the sign bit and −x flips it (exactly ``abs`` and ``neg``), so one pass reads Δ in its own
dtype and writes the keys the sort compares."""

# ruff: noqa: ANN001, ANN201, ANN202

import numpy as np
from numba import njit

THRESHOLD = 16  # libstdc++'s _S_threshold: parts this small are left to the final insertion sort
BLOCK = 256  # entries scanned at a time per side of a partition (the stop buffers' size)
SIGN = np.uint32(0x80000000)
ABS = np.uint32(0x7FFFFFFF)
INF = np.uint32(0x7F800000)
INSIDE_START, INSIDE_STOP = 1, 2  # select's flags: the boundary lies strictly inside a final (sorted) part


@njit(cache=True, nogil=True)
def _bits(src, j, shift, magnitude, negate):
    """The key's float32 bits for ``src[j]`` (uint16 bf16 bits with shift 16, or uint32 float32 bits)."""
    b = np.uint32(np.uint32(src[j]) << shift)
    if magnitude:
        b = np.uint32(b & ABS)
    if negate:
        b = np.uint32(b ^ SIGN)
    return b


@njit(cache=True, nogil=True)
def load_keys(src, shift, magnitude, negate, keybits, idx):
    """keybits[j] = the key of src[j], idx[j] = j; True where a key is NaN (torch orders NaN first: the caller
    sorts for real)."""
    nan = False
    for j in range(src.size):
        b = _bits(src, j, shift, magnitude, negate)
        keybits[j] = b
        idx[j] = j
        nan |= (b & ABS) > INF
    return nan


@njit(cache=True, nogil=True)
def _median_to_first(key, idx, lo, hi):
    """libstdc++ ``__move_median_to_first(lo, lo+1, mid, hi-1)``."""
    a, b, c = lo + 1, lo + (hi - lo) // 2, hi - 1
    if key[a] < key[b]:
        if key[b] < key[c]:
            s = b
        elif key[a] < key[c]:
            s = c
        else:
            s = a
    elif key[a] < key[c]:
        s = a
    elif key[b] < key[c]:
        s = c
    else:
        s = b
    key[lo], key[s] = key[s], key[lo]
    idx[lo], idx[s] = idx[s], idx[lo]


@njit(cache=True, nogil=True)
def partition(key, idx, lo, hi, lbuf, rbuf):
    """libstdc++ ``__unguarded_partition_pivot`` on ``[lo, hi)`` with comp = ``<``; returns the cut.

    Hoare's loop swaps its i-th left stop (key ≥ pivot, ascending) with its i-th right stop (key ≤ pivot,
    descending) while the left one is before the right one. Block phase: blocks of ``BLOCK`` entries are scanned
    branch-free from both ends into the stop buffers and the buffered pairs swapped at once, as long as the left
    region scanned, ``[lo+1, i)``, and the right one, ``(j, hi−1]``, stay apart: then every buffered left stop is
    before every buffered right stop, no scanned entry has been moved by the other side, and the pairs are Hoare's
    own, swapped in his order. When less than a block is left between the regions, Hoare's loop itself finishes
    from the state after the last swap (it scans again at most about three blocks)."""
    _median_to_first(key, idx, lo, hi)
    p = key[lo]
    i, j = lo + 1, hi - 1
    nl = nr = pl = pr = 0
    first, last = lo + 1, hi
    while True:
        if pl == nl:
            if j - i + 1 < BLOCK:
                break
            nl = pl = 0
            for q in range(i, i + BLOCK):
                lbuf[nl] = q
                nl += not key[q] < p
            i += BLOCK
        if pr == nr:
            if j - i + 1 < BLOCK:
                break
            nr = pr = 0
            for q in range(j, j - BLOCK, -1):
                rbuf[nr] = q
                nr += not p < key[q]
            j -= BLOCK
        m = min(nl - pl, nr - pr)
        if m > 0:
            for t in range(pl, pl + m):
                f, g = lbuf[t], rbuf[t - pl + pr]
                key[f], key[g] = key[g], key[f]
                idx[f], idx[g] = idx[g], idx[f]
            pl += m
            pr += m
            first, last = lbuf[pl - 1] + 1, rbuf[pr - 1]
    while True:  # Hoare's loop (unguarded: the pivot at lo and the median rule stop both scans)
        while key[first] < p:
            first += 1
        last -= 1
        while p < key[last]:
            last -= 1
        if not first < last:
            return np.int64(first)
        key[first], key[last] = key[last], key[first]
        idx[first], idx[last] = idx[last], idx[first]
        first += 1


@njit(cache=True, nogil=True)
def select(key, idx, start, stop, lbuf, rbuf):
    """Arrange ``key``/``idx`` as std::sort would at every rank in ``[start, stop)``. Returns -1 where a part on a
    boundary's path would hit the depth limit (heapsort there: the caller sorts for real), else the flags
    ``INSIDE_START`` / ``INSIDE_STOP`` of the boundaries that ended strictly inside a final part (which is then
    sorted, so the lowest key at ranks ≥ start is ``key[start]``, the highest below stop ``key[stop − 1]``)."""
    n = key.size
    depth, m = 0, n
    while m > 1:
        m >>= 1
        depth += 1
    # parts holding a boundary strictly inside: (lo, hi, depth left); at most two at a time
    todo = [(0, n, 2 * depth)]
    done = []
    while len(todo) > 0:
        lo, hi, d = todo.pop()
        if hi - lo <= THRESHOLD:
            done.append((lo, hi))
            continue
        if d == 0:
            return -1
        cut = partition(key, idx, lo, hi, lbuf, rbuf)
        for a, b in ((lo, cut), (cut, hi)):
            if (a < start < b) or (a < stop < b):
                todo.append((a, b, d - 1))
    flags = 0
    for lo, hi in done:  # the final insertion sort (stable for equal keys) of each boundary part
        for i in range(lo + 1, hi):
            v, x = key[i], idx[i]
            j = i
            while j > lo and v < key[j - 1]:
                key[j] = key[j - 1]
                idx[j] = idx[j - 1]
                j -= 1
            key[j] = v
            idx[j] = x
        if lo < start < hi:
            flags |= INSIDE_START
        if lo < stop < hi:
            flags |= INSIDE_STOP
    return flags


@njit(cache=True, nogil=True)
def boundary_ties(key, idx, start, stop, flags):
    """The lowest and highest key at ranks ``[start, stop)`` (from ``select``'s flags where it can, else by a scan),
    and the positions of the entries there equal to the lowest (when start > 0) or the highest (when stop < n)
    moved to ``idx[:count]``; returns (count, lowest, highest). Positions ``[start, stop)`` hold exactly those
    ranks after ``select``, though not in order; the compaction writes at or before where it reads."""
    n = key.size
    lo_v, hi_v = key[start], key[stop - 1]
    if not flags & INSIDE_START or not flags & INSIDE_STOP:
        for j in range(start, stop):
            v = key[j]
            lo_v = v if v < lo_v else lo_v
            hi_v = v if v > hi_v else hi_v
    check_lo, check_hi = start > 0, stop < n
    count = 0
    for j in range(start, stop):
        v = key[j]
        if (check_lo and v == lo_v) or (check_hi and v == hi_v):
            idx[count] = idx[j]
            count += 1
    return count, lo_v, hi_v


@njit(cache=True, nogil=True)
def fill_mask(src, shift, magnitude, negate, has_lo, lo_v, has_hi, hi_v, ties, count, out):
    """out[j] = lo_v < key(src[j]) < hi_v (a bound that is absent is no bound), then out[ties[:count]] = True:
    the strict inside of the ranks, where order cannot matter, plus the tied entries the replay put inside."""
    for j in range(src.size):
        v = np.uint32(_bits(src, j, shift, magnitude, negate)).view(np.float32)
        out[j] = (not has_lo or v > lo_v) and (not has_hi or v < hi_v)
    for t in range(count):
        out[ties[t]] = True
