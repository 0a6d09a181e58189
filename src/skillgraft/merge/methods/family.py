"""Parameter checks shared by the merge methods, and the per-input map of the sparsify-then-merge family.

A family member (TIES, DARE, Breadcrumbs, DELLA) sparsifies each Δᵢ with its own step, then calls
``ties.combine`` (optional sign election + merge + λ).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from skillgraft.errors import InputError

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


def per_input(deltas: torch.Tensor, fn: Any) -> torch.Tensor:
    """Apply a one-tensor step ``fn(Δᵢ, i)`` to each input and stack the results."""
    return torch.stack([fn(deltas[i], i) for i in range(deltas.shape[0])])
