"""DELLA merging: magnitude-ranked random dropping (MagPrune) with rescale, linear or with TIES signs.

Keep probabilities come from ``steps.della_keep_probs``; the merge tail is ``ties.combine``.
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
class DellaParams:
    density: float = 0.5
    epsilon: float = 0.15
    lambda_: float = 1.0
    mode: str = "paper"
    rescale: bool = True
    normalize: bool | None = None  # None: the method's default (see its docstring)

    def __post_init__(self) -> None:
        family.check_density("della", self.density)
        family.check_number("della", "epsilon", self.epsilon, 0.0, 1.0)
        family.check_number("della", "lambda", self.lambda_)
        family.check_mode("della", self.mode)
        family.check_optional_bool("della", "rescale", self.rescale)
        family.check_optional_bool("della", "normalize", self.normalize)
        if self.density < 1 and not (0 < self.density - self.epsilon and self.density + self.epsilon < 1):
            raise InputError(
                f"della: density ± epsilon must lie in (0, 1), got density {self.density} and epsilon {self.epsilon}"
            )


def magprune(job: TensorJob, p: DellaParams) -> torch.Tensor:
    """MagPrune every Δᵢ (draws from ``job.rng``, input by input): keep with probability pⱼ from the magnitude rank;
    survivors ÷ pⱼ (paper) or scaled to keep the L1 norm (mergekit); ``rescale: false`` leaves them."""

    def one(delta: torch.Tensor, i: int) -> torch.Tensor:
        if p.density >= 1:
            return delta.clone()
        probs = steps.della_keep_probs(delta, p.density, p.epsilon)
        mask = steps.bernoulli_mask(probs, job.rng_for(i))
        if not p.rescale:
            return delta * mask
        return steps.rescale_l1(delta, mask) if p.mode == "mergekit" else steps.rescale_inverse_prob(delta, mask, probs)

    return family.per_input(job.deltas, one)


_SHARED_DOC = """
    MagPrune: within each row (first axis of a ≥ 2-D tensor; a 1-D tensor is one row) entries are ranked by |Δᵢ|
    (double ``argsort``, ties by position) and kept with probability linear in the rank, from density − ε (smallest)
    to density + ε (largest); mean keep rate = density. Rescale: **paper** divides each survivor by its own keep
    probability (unbiased); **mergekit** (0.1.5) scales the tensor to keep its L1 norm. A row of one entry is kept
    with probability density (mergekit would divide 0 by 0 there). Randomized: draws come from ``job.rng``, input
    by input. Defaults density 0.5, ε 0.15 (density ± ε must lie in (0, 1) unless density is 1), λ 1, rescale true.
    Edge cases: density 1 → no dropping; all-zero deltas → 0; one input returns Δ₁ only in expectation.
    Compute dtype fp32. Reference: Deep et al. 2024, "DELLA-Merging" (arXiv:2406.11617); mergekit ``della`` /
    ``della_linear``."""


@merge_method("della", DellaParams, randomized=True, low_precision=True)
def della(job: TensorJob, p: DellaParams) -> torch.Tensor:
    normalize = p.normalize if p.normalize is not None else True
    return combine(magprune(job, p), job.weights, consensus=True, mode=p.mode, normalize=normalize, lambda_=p.lambda_)


@merge_method("della_linear", DellaParams, randomized=True, low_precision=True)
def della_linear(job: TensorJob, p: DellaParams) -> torch.Tensor:
    normalize = p.normalize if p.normalize is not None else False
    return combine(magprune(job, p), job.weights, consensus=False, mode=p.mode, normalize=normalize, lambda_=p.lambda_)


della.__doc__ = (
    "DELLA: Δ = λ · disjoint_merge(elect_sign(MagPrune(Δᵢ))) — drop, elect, fuse. Sign elected on unweighted\n"
    "    deltas with a count mean (paper) or on weighted deltas with a Σ wᵢmᵢ mean (mergekit); ``normalize``\n"
    "    default true (mean) in both modes.\n" + _SHARED_DOC
)
della_linear.__doc__ = (
    "DELLA + task arithmetic: Δ = λ · Σ wᵢ·MagPrune(Δᵢ) (÷ Σ wᵢ when ``normalize``, default false). No sign\n"
    "    election.\n" + _SHARED_DOC
)
