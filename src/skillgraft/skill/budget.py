"""Allocate a byte budget across tensors to minimise the total squared reconstruction error.

Each tensor offers options (omit, low rank r, sparse with k entries, dense) with a byte cost and an error;
a Lagrangian search picks one option per tensor, then a greedy pass spends what budget is left.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Options:
    """The candidate encodings of one tensor: parallel arrays (option 0 is the cheapest, usually "omit")."""

    name: str
    encodings: tuple[str, ...]  # "omit" | "lowrank" | "sparse" | "dense"
    levels: np.ndarray  # rank or number of kept entries (0 for omit/dense)
    nbytes: np.ndarray  # int64: stored bytes including per-tensor overhead
    err: np.ndarray  # float64: estimated squared Frobenius error

    def choice(self, i: int) -> tuple[str, int, int, float]:
        return self.encodings[i], int(self.levels[i]), int(self.nbytes[i]), float(self.err[i])


def _pick(opts: list[Options], lam: float) -> list[int]:
    return [int(np.argmin(o.err + lam * o.nbytes)) for o in opts]


def _total(opts: list[Options], picks: list[int]) -> int:
    return int(sum(o.nbytes[i] for o, i in zip(opts, picks)))


def allocate(opts: list[Options], budget: int) -> list[int]:
    """Indices into each tensor's options whose total bytes fit ``budget``, minimising total error."""
    if not opts:
        return []
    if _total(opts, _pick(opts, 0.0)) <= budget:
        return _pick(opts, 0.0)
    hi = 1e-30  # price per byte; a higher price buys fewer bytes
    while _total(opts, _pick(opts, hi)) > budget:
        hi *= 10.0
        if hi > 1e300:
            return [int(np.argmin(o.nbytes)) for o in opts]  # only the cheapest options fit
    lo = hi / 10.0
    for _ in range(60):  # geometric bisection: lo is over budget, hi fits
        mid = float(np.sqrt(lo * hi))
        if _total(opts, _pick(opts, mid)) <= budget:
            hi = mid
        else:
            lo = mid
    return _fill(opts, _pick(opts, hi), budget)


def _fill(opts: list[Options], picks: list[int], budget: int) -> list[int]:
    """Greedily upgrade tensors with the best error reduction per extra byte while the budget allows."""
    left = budget - _total(opts, picks)
    while left > 0:
        best, best_gain = None, 0.0
        for t, o in enumerate(opts):
            cur = picks[t]
            extra = o.nbytes - o.nbytes[cur]
            gain = o.err[cur] - o.err
            ok = (extra > 0) & (extra <= left) & (gain > 0)
            if not ok.any():
                continue
            ratio = np.where(ok, gain / np.maximum(extra, 1), -1.0)
            i = int(np.argmax(ratio))
            if ratio[i] > best_gain:
                best, best_gain = (t, i), float(ratio[i])
        if best is None:
            break
        t, i = best
        left -= int(opts[t].nbytes[i] - opts[t].nbytes[picks[t]])
        picks[t] = i
    return picks
