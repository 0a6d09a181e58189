"""Fisher merging: a per-entry weighted average with each input's diagonal Fisher information as the weight.

Inputs without a Fisher estimate make the tensor fall back to the weighted mean (``linear``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from skillgraft.errors import InputError
from skillgraft.merge import steps
from skillgraft.merge.methods import family
from skillgraft.merge.registry import TensorJob, merge_method
from skillgraft.merge.stats import statistics_pass


@dataclass(frozen=True)
class FisherParams:
    normalize: str = "tensor"
    floor: float = 1e-6

    def __post_init__(self) -> None:
        if self.normalize not in ("tensor", "none"):
            raise InputError(f"fisher: normalize must be 'tensor' or 'none', not {self.normalize!r}")
        family.check_number("fisher", "floor", self.floor, 0.0)


@merge_method("fisher", FisherParams, stats="fisher", model_pass=statistics_pass)
def fisher(job: TensorJob, p: FisherParams) -> torch.Tensor:
    """Fisher merging: Δ = Σᵢ wᵢF̃ᵢ⊙Δᵢ / Σᵢ wᵢF̃ᵢ, F̃ᵢ = max(Fᵢ/‖Fᵢ‖₂, floor) elementwise.

    From θ = Σ wᵢF̃ᵢθᵢ / Σ wᵢF̃ᵢ with θᵢ = θ₀ + Δᵢ, the θ₀ terms cancel, leaving the delta form above.
    ``job.stats[i]`` is input i's diagonal Fisher (same shape as the tensor, e.g. mean squared gradients over ~256
    examples). Normalisation: ``normalize: tensor`` (default) divides each Fᵢ by its L2 norm *over this tensor* so
    inputs whose Fisher was estimated at different scales count equally — FusionBench's ``normalize_fisher_weight``
    uses the norm over the whole model instead, which a per-tensor method cannot see; ``none`` is Matena & Raffel's
    default (raw Fisher). Floor 1e-6 after normalisation (Matena & Raffel's ``fisher_floor``), so an input with zero
    Fisher still gets a tiny weight and the denominator stays positive for positive weights.
    Fallback: when ``job.stats`` is missing or any Fᵢ is None, the tensor is merged by the weighted mean Σ wᵢΔᵢ/Σ wᵢ.
    A zero Σ wᵢF̃ᵢ entry (only possible with negative weights) gives 0. Edge cases: one input → Δ₁ (up to rounding);
    all-zero deltas → 0. Compute dtype fp32. Reference: Matena & Raffel 2022, "Merging Models with Fisher-Weighted
    Averaging" (NeurIPS); FusionBench ``fisher_merging``.
    """
    stats = job.stats
    if stats is None or any(f is None for f in stats):
        return steps.weighted_total(job.deltas, job.weights, normalize=True)
    if len(stats) != job.n or any(tuple(f.shape) != tuple(job.deltas.shape[1:]) for f in stats):
        raise InputError(f"{job.name}: Fisher statistics do not match the tensor's inputs or shape")
    f = torch.stack([s.float() for s in stats])  # [n, *shape]
    if p.normalize == "tensor":
        norms = torch.linalg.vector_norm(f.reshape(job.n, -1), dim=1).clamp_min(1e-30)
        f = f / norms.reshape(-1, *([1] * (f.dim() - 1)))
    f = f.clamp_min(p.floor) * job.weights.reshape(-1, *([1] * (f.dim() - 1)))
    den = f.sum(dim=0)
    num = (f * job.deltas).sum(dim=0)
    return torch.where(den != 0, num / torch.where(den != 0, den, 1.0), torch.zeros_like(num))
