"""numba kernels of ``merge.sortpath`` (imported only when a sort replay is needed: importing numba costs
~0.3 s). They replay libstdc++'s ``std::sort`` (comp ``<``) on the parts of the array that hold a rank boundary;
``sortpath``'s docstring says why that gives the real sort's set."""

# ruff: noqa: ANN001, ANN201, ANN202

import numpy as np
from numba import njit

THRESHOLD = 16  # libstdc++'s _S_threshold: parts this small are left to the final insertion sort
BLOCK = 1024  # entries scanned at a time per side of a partition


@njit(cache=True, nogil=True)
def partition(key, idx, lo, hi, lbuf, rbuf):
    """libstdc++ ``__unguarded_partition_pivot`` on ``[lo, hi)`` with comp = ``<``; returns the cut.

    Hoare's loop pairs the i-th left stop (key ≥ pivot, ascending) with the i-th right stop (key ≤ pivot,
    descending) while the left one is before the right one; both lists are built branch-free first, the
    number of swaps m is where they cross (monotone: binary search), and the cut is where the left scan stops
    after the last swap: L[m], or R[m−1] when the swapped-in entry there stops it first."""
    a, b, c = lo + 1, lo + (hi - lo) // 2, hi - 1  # __move_median_to_first(lo, lo+1, mid, hi-1)
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
    p = key[lo]
    # Left stops (not key < p) ascending from lo+1, right stops (not p < key) descending from hi-1, scanned in
    # blocks, extending the shorter list, until the pairs cross (then every pair that swaps is known) or the left
    # scan runs out. The pivot at lo is the right scan's sentinel, so the pairs always cross before it runs out.
    nl = nr = 0
    i, j = lo + 1, hi - 1
    while True:
        if nl <= nr:
            if i >= hi:
                break
            e = min(i + BLOCK, hi)
            for q in range(i, e):
                lbuf[nl] = q
                nl += not key[q] < p
            i = e
        else:
            e = max(j - BLOCK, lo - 1)
            for q in range(j, e, -1):
                rbuf[nr] = q
                nr += not p < key[q]
            j = e
        c = min(nl, nr)
        if c > 0 and lbuf[c - 1] >= rbuf[c - 1]:
            break
    x, y = 0, min(nl, nr)  # m = the first i with L[i] >= R[i] (monotone: L rises, R falls), else min(nl, nr)
    while x < y:
        mid = (x + y) // 2
        if lbuf[mid] >= rbuf[mid]:
            y = mid
        else:
            x = mid + 1
    m = x
    for i in range(m):
        f, g = lbuf[i], rbuf[i]
        key[f], key[g] = key[g], key[f]
        idx[f], idx[g] = idx[g], idx[f]
    if m == 0:
        return np.int64(lbuf[0])
    if m >= nl or rbuf[m - 1] < lbuf[m]:
        return np.int64(rbuf[m - 1])
    return np.int64(lbuf[m])


@njit(cache=True, nogil=True)
def select(key, idx, start, stop, lbuf, rbuf):
    """Arrange ``key``/``idx`` as std::sort would at every rank in ``[start, stop)``; False where a key is NaN or
    a part on a boundary's path would hit the depth limit (heapsort there): the caller sorts for real."""
    n = key.size
    nan = False
    for j in range(n):
        idx[j] = j
        nan |= key[j] != key[j]
    if nan:  # torch orders NaN first; the real sort handles it
        return False
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
            return False
        cut = partition(key, idx, lo, hi, lbuf, rbuf)
        if cut < 0:
            return False
        for a, b in ((lo, cut), (cut, hi)):
            if (a < start < b) or (a < stop < b):
                todo.append((a, b, d - 1))
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
    return True


@njit(cache=True, nogil=True)
def boundary_ties(key, idx, start, stop, check_lo, check_hi):
    """Move to ``idx[:count]`` the first positions of the entries at ranks ``[start, stop)`` whose key equals the
    lowest (when ``check_lo``) or highest (when ``check_hi``) key there; returns count, the lowest and the highest
    key. (Positions ``[start, stop)`` hold exactly those ranks after ``select``, though not in order; the
    compaction writes at or before where it reads, so ``idx`` is its own output.)"""
    lo_v, hi_v = key[start], key[start]
    for j in range(start, stop):
        v = key[j]
        lo_v = min(lo_v, v)
        hi_v = max(hi_v, v)
    count = 0
    for j in range(start, stop):
        v = key[j]
        if (check_lo and v == lo_v) or (check_hi and v == hi_v):
            idx[count] = idx[j]
            count += 1
    return count, lo_v, hi_v
