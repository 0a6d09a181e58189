"""Consensus merging with TALL masks: keep only the entries that at least k tasks rely on.

Per-task masks compare each task vector with the rest of the multi-task vector.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from skillgraft.errors import InputError
from skillgraft.merge.methods import family
from skillgraft.merge.registry import PlanFacts, TensorJob, merge_method


@dataclass(frozen=True)
class ConsensusParams:
    mask_lambda: float = 0.6
    k: int = 2
    lambda_: float = 1.0

    def __post_init__(self) -> None:
        family.check_number("consensus", "mask_lambda", self.mask_lambda, 0.0)
        family.check_number("consensus", "lambda", self.lambda_)
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
            raise InputError(f"consensus: k must be an integer ≥ 1, not {self.k!r}")

    def check_plan(self, facts: PlanFacts) -> None:
        """k tasks must be able to agree: with k > the number of inputs the merge would return the base."""
        n_inputs = facts.n_inputs
        if self.k > n_inputs:
            raise InputError(
                f"consensus: k = {self.k} but there are {n_inputs} inputs, so no entry could reach consensus "
                "(the merge would return the base)",
                hint=f"set k between 1 and {n_inputs}",
            )


def tall_masks(task_vectors: torch.Tensor, mask_lambda: float) -> torch.Tensor:
    """TALL masks ``[n, *shape]``: mᵢ = |τᵢ| ≥ λ·|τ_MTL − τᵢ| with τ_MTL = Σⱼ τⱼ (0/1 fp32)."""
    mtl = task_vectors.sum(dim=0, keepdim=True)
    return (task_vectors.abs() >= mask_lambda * (mtl - task_vectors).abs()).float()


@merge_method("consensus", ConsensusParams)
def consensus(job: TensorJob, p: ConsensusParams) -> torch.Tensor:
    """Consensus merging: Δ = λ · (Σᵢ τᵢ) ⊙ [Σᵢ mᵢ ≥ k], τᵢ = wᵢΔᵢ, mᵢ = |τᵢ| ≥ mask_lambda·|Σⱼτⱼ − τᵢ|.

    The task-arithmetic sum keeps only entries that at least ``k`` tasks' TALL masks select ("consensus"); entries
    only one task relies on ("selfish") and entries no task relies on ("catastrophic") are dropped. Masks use the
    weighted task vectors (weights 1 give the paper). No trimming, sign election or rescale.
    Defaults mask_lambda 0.6 (the paper tunes it per task in [0.2, 0.6]; one value for all tasks here), k 2, λ 1.
    Edge cases: k > the number of inputs is refused before any tensor is read (no entry could reach consensus, so
    the merge would be the base; one input needs k 1, which keeps Δ₁); all-zero deltas → 0; an entry where all
    τᵢ are 0 has mᵢ = 1 but contributes 0. Compute dtype fp32.
    Reference: Wang et al. 2024, "Localizing Task Information for Improved Model Merging and Compression"
    (ICML; arXiv:2405.07813).
    """
    tau = job.deltas * job.weights.reshape(-1, *([1] * (job.deltas.dim() - 1)))
    keep = tall_masks(tau, p.mask_lambda).sum(dim=0) >= p.k
    return p.lambda_ * torch.where(keep, tau.sum(dim=0), torch.zeros_like(tau[0]))
