"""NearSwap: take the fine-tune's value where it is near the base, keep the base's where they are far apart.

Elementwise, so it merges slice by slice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from skillgraft.merge.methods import family
from skillgraft.merge.registry import Steps, TensorJob, merge_method, whole


@dataclass(frozen=True)
class NearswapParams:
    t: float

    def __post_init__(self) -> None:
        family.check_number("nearswap", "t", self.t, 0.0)


def _nearswap_apply(job: TensorJob, p: NearswapParams, ctx: Any, sl: slice) -> torch.Tensor:
    d = job.deltas[0]
    weight = (p.t / d.abs().clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * d


NEARSWAP = Steps(None, _nearswap_apply)


@merge_method("nearswap", NearswapParams, steps=NEARSWAP, min_inputs=1, max_inputs=1)
def nearswap(job: TensorJob, p: NearswapParams) -> torch.Tensor:
    """NearSwap: Δ = w ⊙ Δ₁ with w = clamp(t / max(|Δ₁|, 1e-6), 0, 1), elementwise, for one fine-tune.

    Equivalently θ = w·θ₁ + (1 − w)·θ₀: entries where the fine-tune moved less than ``t`` from the base take the
    fine-tune's value whole (w = 1); entries that moved further are pulled back to the base, the more the
    further (w = t/|Δ|, so each merged entry moves by at most t). ``t`` is required (as in mergekit), a finite
    number ≥ 0; user weights are ignored; exactly one input besides the base. Edge cases: t = 0 → the base;
    t ≥ max |Δ| → the input unchanged; all-zero deltas → 0 (|Δ| is clamped to 1e-6 before dividing).
    Compute dtype fp32; returned as a delta, so it can differ from mergekit's w·θ₁ + (1 − w)·θ₀ by fp32 rounding.
    Reference: alchemonaut, "QuartetAnemoi-70B-t0.0001" (the method's model card); mergekit ``nearswap``.
    """
    return whole(job, p, NEARSWAP)
