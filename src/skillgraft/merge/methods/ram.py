"""RAM (Reinforced Agent Merging): keep what one input alone changed, average what several changed.

Elementwise, so it merges slice by slice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from skillgraft.merge.methods import family
from skillgraft.merge.registry import Steps, TensorJob, merge_method, whole


@dataclass(frozen=True)
class RamParams:
    epsilon: float = 1e-5

    def __post_init__(self) -> None:
        family.check_number("ram", "epsilon", self.epsilon, 0.0)


def _ram_apply(job: TensorJob, p: RamParams, ctx: Any, sl: slice) -> torch.Tensor:
    d = job.deltas  # [n, len]
    active = (d.abs() > p.epsilon).view(torch.uint8).to(d.dtype)  # 0/1: input i changed this entry
    count = active.sum(dim=0).clamp_(min=1)  # [len]: how many inputs changed it (0 → 1: nothing to divide)
    # Each contribution is divided before the inputs are summed (mergekit's order): Σᵢ (mᵢΔᵢ / c).
    return (d * active).div_(count).sum(dim=0)


RAM = Steps(None, _ram_apply)


@merge_method("ram", RamParams, steps=RAM, low_precision=True)
def ram(job: TensorJob, p: RamParams) -> torch.Tensor:
    """RAM: Δ = Σᵢ mᵢΔᵢ / max(Σᵢ mᵢ, 1), mᵢ = [|Δᵢ| > ε], elementwise.

    An entry only one input changed (by more than ``epsilon``) takes that input's Δ whole ("unique"); an entry
    several inputs changed takes the mean of their Δs ("shared"), the inputs that left it within ε of the base
    not counted; an entry none changed stays at the base. Each term mᵢΔᵢ is divided by the count before the
    terms are summed in input order, as mergekit does, so the result is bit-identical with mergekit's. User
    weights are ignored (mergekit's ``ram`` takes none). Default epsilon 1e-5 (mergekit's), a finite number
    ≥ 0, compared in the deltas' dtype. Edge cases: one input → Δ₁ with its entries |Δ₁| ≤ ε zeroed; all-zero
    deltas → 0; epsilon 0 → every nonzero entry counts. Compute dtype fp32, or the merge's 16-bit compute dtype
    (a mergekit YAML's ``dtype: bfloat16``), in which mergekit computes too.
    Reference: "Reinforced Agent Merging" (arXiv:2601.13572); mergekit ``ram`` (its ``ramplus_tl``, which
    rescales the unique entries, is not provided).
    """
    return whole(job, p, RAM)
