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
    if job.compute_dtype.itemsize < 4:  # mergekit's arithmetic, in the compute dtype, on the parameters
        assert job.base is not None
        low = job.compute_dtype
        a, b = job.base.to(low), (job.base + d).to(low)  # θ₀ and θ₁ exactly (each was read in ``low``)
        weight = (p.t / (a - b).abs().clamp(min=1e-6)).clamp(min=0, max=1)
        return (weight * b + (1 - weight) * a).float() - job.base  # exact in fp32: the engine's θ₀ + Δ is θ
    weight = (p.t / d.abs().clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * d


NEARSWAP = Steps(None, _nearswap_apply)


@merge_method("nearswap", NearswapParams, steps=NEARSWAP, needs_base=True, min_inputs=1, max_inputs=1)
def nearswap(job: TensorJob, p: NearswapParams) -> torch.Tensor:
    """NearSwap: Δ = w ⊙ Δ₁ with w = clamp(t / max(|Δ₁|, 1e-6), 0, 1), elementwise, for one fine-tune.

    Equivalently θ = w·θ₁ + (1 − w)·θ₀: entries where the fine-tune moved less than ``t`` from the base take the
    fine-tune's value whole (w = 1); entries that moved further are pulled back to the base, the more the
    further (w = t/|Δ|, so each merged entry moves by at most t). ``t`` is required (as in mergekit), a finite
    number ≥ 0; user weights are ignored; exactly one input besides the base. Edge cases: t = 0 → the base;
    t ≥ max |Δ| → the input unchanged; all-zero deltas → 0 (|Δ| is clamped to 1e-6 before dividing).
    Compute dtype fp32; returned as a delta, so it can differ from mergekit's w·θ₁ + (1 − w)·θ₀ by fp32 rounding.
    With a 16-bit compute dtype (a mergekit YAML's ``dtype: bfloat16``) it computes w·θ₁ + (1 − w)·θ₀ as
    mergekit does, in that dtype.
    Reference: alchemonaut, "QuartetAnemoi-70B-t0.0001" (the method's model card); mergekit ``nearswap``.
    """
    return whole(job, p, NEARSWAP)
