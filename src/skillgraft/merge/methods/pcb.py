"""PCB merging (Parameter Competition Balancing): per-entry importance from intra- and inter-task balance.

Scores decide how much of each Δᵢ enters a normalised weighted average; no sign election.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from skillgraft.errors import InputError
from skillgraft.merge.methods import family
from skillgraft.merge.registry import TensorJob, merge_method


@dataclass(frozen=True)
class PcbParams:
    pcb_ratio: float = 0.1
    lambdas: float | tuple[float, ...] = 1.2

    def __post_init__(self) -> None:
        family.check_number("pcb", "pcb_ratio", self.pcb_ratio, 0.0, 1.0)
        if self.pcb_ratio == 0:
            raise InputError("pcb: pcb_ratio must be in (0, 1], not 0")
        values = self.lambdas if isinstance(self.lambdas, (list, tuple)) else (self.lambdas,)
        for v in values:
            family.check_number("pcb", "lambdas", v)
        if isinstance(self.lambdas, list):
            object.__setattr__(self, "lambdas", tuple(self.lambdas))


def quantile_clamp(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Clamp each row of ``x`` ``[n, d]`` to its sorted values at ⌊d·low⌋ and ⌊d·(1−high)⌋ − 1 (PCB's ``clamp``)."""
    d = x.shape[1]
    s = x.sort(dim=1).values
    lo = s[:, min(d - 1, int(d * low))].unsqueeze(1)
    hi = s[:, max(0, int(d * (1 - high)) - 1)].unsqueeze(1)
    return torch.maximum(torch.minimum(x, hi), lo)


def minmax(x: torch.Tensor) -> torch.Tensor:
    """Per-row min-max normalisation to [0, 1]; a constant row becomes 0."""
    lo = x.min(dim=1, keepdim=True).values
    span = x.max(dim=1, keepdim=True).values - lo
    return torch.where(span > 0, (x - lo) / torch.where(span > 0, span, 1.0), torch.zeros_like(x))


@merge_method("pcb", PcbParams)
def pcb(job: TensorJob, p: PcbParams) -> torch.Tensor:
    """PCB: Δ = Σᵢ λᵢwᵢ·Δ̂ᵢ⊙sᵢ / Σᵢ sᵢ (a zero Σ sᵢ counts as 1e-12, giving 0), per tensor.

    On the stacked, flattened deltas D ``[n, d]``: Δ̂ᵢ = sign(Δᵢ)·clamp(|Δᵢ|) to the per-row 0.0001 / 0.9999
    quantiles; intra-balance = exp(n·minmax(|Δ̂ᵢ|)²); inter-balance = tanh(Δᵢ⊙Σⱼ Δⱼ); score = intra⊙inter;
    sᵢ = minmax(score clamped from below at its (1 − pcb_ratio) quantile), so only the top ``pcb_ratio`` fraction
    per input gets a non-zero share. User weights wᵢ multiply λᵢ. No sign election, no rescale.
    Scope: the reference code flattens the whole model; here it is per tensor (quantiles and min-max per tensor),
    which keeps the method a pure per-tensor function. Defaults pcb_ratio 0.1, λᵢ 1.2 for every input (a list gives
    one per input; the paper's optional evolutionary search of λᵢ in [0.8, 1.3] is not done).
    Edge cases: one input → 1.2·Δ̂₁ on its top-``pcb_ratio`` scores and 0 elsewhere (not the identity); all-zero
    deltas → 0; a tensor of one entry scores 0 (min-max of a constant) → 0. Compute dtype fp32.
    Reference: Du et al. 2024, "Parameter Competition Balancing for Model Merging" (NeurIPS; arXiv:2410.02396).
    """
    n = job.n
    lambdas = _lambdas(p.lambdas, n, job.name)
    flat = job.deltas.reshape(n, -1)  # [n, d]
    clipped_abs = quantile_clamp(flat.abs(), 0.0001, 0.0001)
    clipped = torch.sign(flat) * clipped_abs
    intra = torch.exp(n * minmax(clipped_abs) ** 2)
    inter = torch.tanh(flat * flat.sum(dim=0, keepdim=True))
    score = minmax(quantile_clamp(intra * inter, 1 - p.pcb_ratio, 0.0))  # [n, d]
    coef = (lambdas * job.weights).unsqueeze(1)
    merged = (coef * clipped * score).sum(dim=0) / torch.clamp(score.sum(dim=0), min=1e-12)
    return merged.reshape(job.deltas.shape[1:])


def _lambdas(value: float | tuple[float, ...], n: int, name: str) -> torch.Tensor:
    if isinstance(value, tuple):
        if len(value) != n:
            raise InputError(f"{name}: pcb lambdas has {len(value)} values for {n} inputs")
        return torch.tensor(value, dtype=torch.float32)
    return torch.full((n,), float(value))
