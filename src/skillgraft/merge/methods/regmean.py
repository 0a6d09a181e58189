"""RegMean: merge linear layers by matching their outputs on each input's own activations (closed form).

Uses per-input Gram matrices of the layer's inputs; other tensors fall back to the weighted mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from skillgraft.merge import steps
from skillgraft.merge.methods import family
from skillgraft.merge.registry import TensorJob, merge_method
from skillgraft.merge.stats import statistics_pass


@dataclass(frozen=True)
class RegMeanParams:
    alpha: float = 0.95

    def __post_init__(self) -> None:
        family.check_number("regmean", "alpha", self.alpha, 0.0, 1.0)


def shrink_gram(g: torch.Tensor, alpha: float) -> torch.Tensor:
    """G̃ = α·G + (1 − α)·diag(G): off-diagonals scaled by α, the diagonal kept."""
    return alpha * g + (1 - alpha) * torch.diag_embed(torch.diagonal(g))


@merge_method("regmean", RegMeanParams, stats="gram", model_pass=statistics_pass)
def regmean(job: TensorJob, p: RegMeanParams) -> torch.Tensor:
    """RegMean: ΔW = (Σᵢ wᵢΔᵢG̃ᵢ)(Σᵢ wᵢG̃ᵢ)⁻¹ for a Linear weight W ``[out, in]``; G̃ᵢ = shrunk Gram XᵢᵀXᵢ ``[in, in]``.

    Derivation for y = x·Wᵀ: minimise Σᵢ ‖XᵢWᵀ − XᵢWᵢᵀ‖²_F. The gradient in Wᵀ is 2 Σᵢ XᵢᵀXᵢ(Wᵀ − Wᵢᵀ) = 0, so
    (Σ Gᵢ)Wᵀ = Σ GᵢWᵢᵀ and, G symmetric, W = (Σ WᵢGᵢ)(Σ Gᵢ)⁻¹. With Wᵢ = W₀ + Δᵢ the W₀ terms give W₀ back, so
    ΔW = (Σ ΔᵢGᵢ)(Σ Gᵢ)⁻¹. Solved without an inverse: ``torch.linalg.solve(Σ G̃ᵢ, Σ G̃ᵢΔᵢᵀ)`` is ΔWᵀ (falls back to
    least squares if Σ G̃ᵢ is singular, e.g. an input feature never active). Off-diagonals of each Gram are scaled
    by ``alpha`` (default 0.95) — the paper's regularisation towards the simple average (alpha 0 → a per-column
    diagonal-weighted mean, alpha 1 → the exact solution). User weights multiply the Grams (weights 1 → the paper).
    Fallback: tensors that are not 2-D or have no Gram (embeddings, norms, biases — ``job.stats`` missing, any
    entry None, or a shape other than ``[in, in]``) take the weighted mean Σ wᵢΔᵢ/Σ wᵢ, as the paper averages
    non-linear parameters. Edge cases: one input → Δ₁ (up to solver rounding); all-zero deltas → 0.
    Compute dtype fp32 (the solve in fp64 for accuracy, result cast to fp32).
    Reference: Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models" (ICLR).
    """
    stats, deltas = job.stats, job.deltas
    in_dim = deltas.shape[-1]
    usable = (
        deltas.dim() == 3
        and stats is not None
        and len(stats) == job.n
        and all(g is not None and tuple(g.shape) == (in_dim, in_dim) for g in stats)
    )
    if not usable:
        return steps.weighted_total(deltas, job.weights, normalize=True)
    assert stats is not None
    grams = torch.stack([shrink_gram(g.double(), p.alpha) for g in stats])  # [n, in, in]
    grams = grams * job.weights.double().reshape(-1, 1, 1)
    lhs = grams.sum(dim=0)  # Σ w G̃   [in, in]
    rhs = torch.einsum("nij,noj->io", grams, deltas.double())  # Σ w G̃ Δᵀ   [in, out]
    try:
        sol = torch.linalg.solve(lhs, rhs)
    except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError: singular Σ G̃
        sol = torch.linalg.lstsq(lhs, rhs).solution
    return sol.T.to(torch.float32).contiguous()  # ΔW [out, in]
