"""Model Breadcrumbs: drop each Δᵢ's largest outliers and smallest entries, then sum (optionally with TIES signs).

The mask is ``steps.breadcrumbs_mask``; the merge tail is ``ties.combine``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from skillgraft.errors import InputError
from skillgraft.merge import steps
from skillgraft.merge.methods import family
from skillgraft.merge.methods.ties import combine
from skillgraft.merge.registry import TensorJob, merge_method


@dataclass(frozen=True)
class BreadcrumbsParams:
    density: float = 0.9
    gamma: float = 0.01
    lambda_: float = 1.0
    mode: str = "paper"
    rescale: bool = False
    normalize: bool = False

    def __post_init__(self) -> None:
        family.check_density("breadcrumbs", self.density)
        family.check_number("breadcrumbs", "gamma", self.gamma, 0.0, 1.0)
        if self.density < 1 and self.density + self.gamma > 1 + 1e-9:
            raise InputError(
                f"breadcrumbs: density {self.density} + gamma {self.gamma} > 1: cannot keep {self.density:.0%} of "
                f"the entries after dropping the largest {self.gamma:.0%} as outliers",
                hint=f"set gamma ≤ 1 − density ({1 - self.density:.3g}), or density 1 to turn the mask off",
            )
        family.check_number("breadcrumbs", "lambda", self.lambda_)
        family.check_mode("breadcrumbs", self.mode)
        family.check_optional_bool("breadcrumbs", "rescale", self.rescale)
        family.check_optional_bool("breadcrumbs", "normalize", self.normalize)


def crumbs(job: TensorJob, p: BreadcrumbsParams) -> torch.Tensor:
    """Apply the Breadcrumbs mask to every Δᵢ (L1 rescale only when ``rescale``, as mergekit's option)."""

    def one(delta: torch.Tensor, _: int) -> torch.Tensor:
        if p.density >= 1:
            return delta.clone()
        mask = steps.breadcrumbs_mask(delta, p.density, p.gamma)
        return steps.rescale_l1(delta, mask) if p.rescale else delta * mask

    return family.per_input(job.deltas, one)


_SHARED_DOC = """
    Mask per tensor and input: with n = numel, drop the ``int(gamma·n)`` largest |Δᵢ| (outliers) and the smallest,
    keeping ``int(density·n)`` entries (ascending ranks ``[n_bot, n_bot + int(density·n))``, ``n_bot = max(0,
    n − int(density·n) − int(gamma·n))``). density + gamma > 1 (with density < 1) is refused: the kept and the
    dropped fractions cannot both be honoured (mergekit silently drops fewer outliers). Ties broken by
    ``torch.sort`` of |Δ|, as mergekit. No rescale by default (``rescale: true`` keeps each Δᵢ's L1 norm, as
    mergekit's option).
    **mode**: paper and mergekit give the same numbers here. REFERENCES records a mergekit bug zeroing the whole
    tensor when gamma·numel < 1 (a ``[n_bot:-n_top]`` slice with ``n_top = 0``); the mergekit 0.1.5 source
    (``sparsify.magnitude_outliers``) slices ``[n_bot : n_bot + target_n]`` and does not have it, so neither mode
    zeroes: gamma·numel < 1 just drops no outlier. mergekit leaves the tensor untouched at density ≥ 1 (gamma
    ignored); so do we. Defaults density 0.9, gamma 0.01, λ 1, normalize false.
    Edge cases: density 1 → no masking; all-zero deltas → 0; one input at weight 1 → Δ₁ masked (identity only at
    density 1). Compute dtype fp32. Reference: Davari & Belilovsky 2024, "Model Breadcrumbs" (arXiv:2312.06795);
    mergekit ``breadcrumbs`` / ``breadcrumbs_ties``."""


@merge_method("breadcrumbs", BreadcrumbsParams, low_precision=True)
def breadcrumbs(job: TensorJob, p: BreadcrumbsParams) -> torch.Tensor:
    return combine(crumbs(job, p), job.weights, consensus=False, mode=p.mode, normalize=p.normalize, lambda_=p.lambda_)


@merge_method("breadcrumbs_ties", BreadcrumbsParams, low_precision=True)
def breadcrumbs_ties(job: TensorJob, p: BreadcrumbsParams) -> torch.Tensor:
    return combine(crumbs(job, p), job.weights, consensus=True, mode=p.mode, normalize=p.normalize, lambda_=p.lambda_)


breadcrumbs.__doc__ = (
    "Breadcrumbs + task arithmetic: Δ = λ · Σ wᵢ·(mᵢ⊙Δᵢ) (÷ Σ wᵢ when ``normalize``). No sign election.\n" + _SHARED_DOC
)
breadcrumbs_ties.__doc__ = (
    "Breadcrumbs + TIES sign election: Δ = λ · disjoint_merge(elect_sign(mᵢ⊙Δᵢ)). Sign elected on unweighted\n"
    "    deltas with a count mean (paper) or on weighted deltas with a Σ wᵢmᵢ mean (mergekit); ``normalize``\n"
    "    (default false) picks mean over sum.\n" + _SHARED_DOC
)
