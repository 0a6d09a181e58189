"""DARE (drop and rescale) merging, linear and with TIES sign election.

Each Δᵢ loses entries at random with probability 1 − density; survivors are rescaled (paper 1/density, mergekit L1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from skillgraft.merge import steps
from skillgraft.merge.methods import family
from skillgraft.merge.registry import TensorJob, merge_method


@dataclass(frozen=True)
class DareParams:
    density: float = 0.5
    lambda_: float = 1.0
    mode: str = "paper"
    rescale: bool = True
    normalize: bool | None = None  # None: the mode's default (see the method docstring)

    def __post_init__(self) -> None:
        family.check_density("dare", self.density)
        family.check_number("dare", "lambda", self.lambda_)
        family.check_mode("dare", self.mode)
        family.check_optional_bool("dare", "rescale", self.rescale)
        family.check_optional_bool("dare", "normalize", self.normalize)


def drop_and_rescale(job: TensorJob, density: float, mode: str, rescale: bool) -> torch.Tensor:
    """DARE per input, in input order from ``job.rng``: keep each entry with probability ``density``; survivors
    ×1/density (paper) or scaled to keep the L1 norm (mergekit); ``rescale: false`` leaves them as they are."""

    def one(delta: torch.Tensor, _: int) -> torch.Tensor:
        if density >= 1:
            return delta.clone()
        mask = steps.bernoulli_mask(torch.full_like(delta, density), job.rng)
        if not rescale:
            return delta * mask
        if mode == "mergekit":
            return steps.rescale_l1(delta, mask)
        return steps.rescale_inverse_prob(delta, mask, density)

    return family.per_input(job.deltas, one)


@merge_method("dare_linear", DareParams, randomized=True)
def dare_linear(job: TensorJob, p: DareParams) -> torch.Tensor:
    """DARE + task arithmetic: Δ = λ · Σ wᵢ·DARE(Δᵢ) (÷ Σ wᵢ when ``normalize``; default false in both modes).

    DARE(Δ) = m⊙Δ·s with m ~ Bernoulli(density) per entry (``density`` is the *keep* probability, 1 − p) drawn from
    ``job.rng``. Rescale s: **paper** (Yu et al.; PEFT, FusionBench) 1/density, which keeps E[DARE(Δ)] = Δ;
    **mergekit** ‖Δ‖₁/‖m⊙Δ‖₁ per tensor (no rescale when either norm < 1e-7). No sign election.
    Defaults density 0.5, λ 1, rescale true. Edge cases: density 1 → task arithmetic, exactly; all-zero deltas → 0;
    one input at weight 1 returns Δ₁ only in expectation (paper) or in L1 norm (mergekit). Randomized: results
    depend on the seed, and on the order of inputs within one tensor (draws are taken input by input).
    Compute dtype fp32. Reference: Yu et al. 2024, "Language Models are Super Mario" (arXiv:2311.03099);
    mergekit ``dare_linear``.
    """
    dropped = drop_and_rescale(job, p.density, p.mode, p.rescale)
    normalize = bool(p.normalize) if p.normalize is not None else False
    return family.combine(dropped, job.weights, consensus=False, mode=p.mode, normalize=normalize, lambda_=p.lambda_)


@merge_method("dare_ties", DareParams, randomized=True)
def dare_ties(job: TensorJob, p: DareParams) -> torch.Tensor:
    """DARE + TIES sign election: Δ = λ · disjoint_merge(elect_sign(DARE(Δᵢ))); DARE replaces the TIES trim.

    DARE as in ``dare_linear``. **paper** (as PEFT's ``dare_ties``): sign elected on the *unweighted* dropped deltas,
    disjoint **mean** over the count of agreeing entries (``normalize`` default true), rescale 1/density.
    **mergekit** (0.1.5): sign elected and agreement judged on *weighted* deltas, Σ wᵢmᵢΔᵢ (``normalize`` default
    false; when true ÷ Σ wᵢmᵢ), L1 rescale. Defaults density 0.5, λ 1, rescale true.
    Edge cases: density 1 → TIES without trimming; all-zero deltas → 0; one input returns Δ₁ only in expectation.
    Randomized (see ``dare_linear``). Compute dtype fp32.
    Reference: Yu et al. 2024 (arXiv:2311.03099); mergekit ``dare_ties``.
    """
    dropped = drop_and_rescale(job, p.density, p.mode, p.rescale)
    normalize = p.normalize if p.normalize is not None else p.mode == "paper"
    return family.combine(dropped, job.weights, consensus=True, mode=p.mode, normalize=normalize, lambda_=p.lambda_)
