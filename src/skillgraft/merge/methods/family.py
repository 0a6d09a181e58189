"""The shared tail of the sparsify-then-merge family (TIES, DARE, Breadcrumbs, DELLA) and parameter checks.

A family member sparsifies each Δᵢ with its own step, then calls ``combine`` (optional sign election + merge + λ).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from skillgraft.errors import InputError
from skillgraft.merge import steps

MODES = ("paper", "mergekit")


def check_mode(method: str, mode: Any) -> None:
    if mode not in MODES:
        raise InputError(f"{method}: mode must be 'paper' or 'mergekit', not {mode!r}")


def check_density(method: str, density: Any) -> None:
    if not _is_number(density) or not 0 < density <= 1:
        raise InputError(
            f"{method}: density must be a number in (0, 1], not {density!r}",
            hint="density is the fraction of each input's entries kept (e.g. 0.2); 1 keeps them all",
        )


def check_number(method: str, key: str, value: Any, lo: float | None = None, hi: float | None = None) -> None:
    """``value`` must be a finite number within [lo, hi] (either bound optional)."""
    ok = _is_number(value) and (lo is None or value >= lo) and (hi is None or value <= hi)
    if not ok:
        bounds = f" in [{lo}, {hi}]" if lo is not None and hi is not None else (f" ≥ {lo}" if lo is not None else "")
        raise InputError(f"{method}: {key} must be a finite number{bounds}, not {value!r}")


def check_optional_bool(method: str, key: str, value: Any) -> None:
    if value is not None and not isinstance(value, bool):
        raise InputError(f"{method}: {key} must be true or false, not {value!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def combine(
    deltas: torch.Tensor, weights: torch.Tensor, *, consensus: bool, mode: str, normalize: bool, lambda_: float
) -> torch.Tensor:
    """Merge sparsified ``deltas`` ``[n, *shape]``; the rules of each ``mode``:

    * consensus, paper: sign elected on *unweighted* deltas; Σ wᵢmᵢΔᵢ, divided by the count Σ mᵢ when ``normalize``.
    * consensus, mergekit: sign elected on (and agreement judged by) *weighted* deltas; Σ wᵢmᵢΔᵢ, divided by
      Σ wᵢmᵢ when ``normalize``.
    * no consensus (both): Σ wᵢΔᵢ, divided by Σ wᵢ when ``normalize``.
    Then × λ. A zero divisor counts as 1, so entries nobody keeps merge to 0.
    """
    if consensus:
        weighted = None
        if mode == "mergekit":  # sign and agreement both on the weighted deltas wᵢΔᵢ
            weighted = deltas * weights.reshape(-1, *([1] * (deltas.dim() - 1)))
            mask = steps.agreement_mask(weighted, steps.elect_sign(weighted))
        else:
            mask = steps.agreement_mask(deltas, steps.elect_sign(deltas))
        divide_by = "weight" if mode == "mergekit" else "count"
        reduce = "mean" if normalize else "sum"
        merged = steps.disjoint_merge(deltas, mask, weights, reduce, divide_by, weighted=weighted)
    else:
        merged = steps.weighted_total(deltas, weights, normalize)
    return merged * lambda_ if lambda_ != 1 else merged


def per_input(deltas: torch.Tensor, fn: Any) -> torch.Tensor:
    """Apply a one-tensor step ``fn(Δᵢ, i)`` to each input and stack the results."""
    return torch.stack([fn(deltas[i], i) for i in range(deltas.shape[0])])


def threads(fn: Any, items: list) -> list:
    """Map ``fn`` over ``items`` in threads (torch releases the GIL; sorts, histograms and seeded draws are
    single-threaded, so per-input work runs side by side)."""
    if len(items) < 2:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(len(items), 4)) as pool:
        return list(pool.map(fn, items))
