"""DARE (drop and rescale) merging, linear and with TIES sign election.

Each Δᵢ loses entries at random with probability 1 − density; survivors are rescaled (paper 1/density, mergekit L1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from skillgraft.merge import steps
from skillgraft.merge.methods import family
from skillgraft.merge.methods.ties import combine
from skillgraft.merge.registry import Steps, TensorJob, merge_method, whole


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


def _dare_prepare(job: TensorJob, p: DareParams) -> Any:
    """mergekit's L1 rescale needs whole-tensor norms, so its masks are drawn here, once, slice by slice (the
    same draws as ``_drop`` takes), with per-slice fp32 norms summed in float64; other modes draw in ``_drop``."""
    if not _dare_needs_whole(p):
        return None

    def one(i: int) -> tuple[torch.Tensor, float | None]:
        delta = job.deltas[i].reshape(-1)
        mask = torch.empty(delta.numel(), dtype=torch.uint8)
        before = after = 0.0
        for start in range(0, delta.numel(), steps.SLICE):
            sl = slice(start, min(start + steps.SLICE, delta.numel()))
            mask[sl] = keep = job.keep(i, sl, p.density)  # the draws _drop takes
            magnitude = delta[sl].abs()
            before += float(magnitude.sum())  # per-slice fp32 sums, accumulated in float64
            after += float(torch.dot(magnitude, keep.to(magnitude.dtype)))
        return mask, (None if before < 1e-7 or after < 1e-7 else before / after)

    # Inputs with their own generators draw in parallel (the generator is single-threaded); a shared one in order.
    parallel = isinstance(job.rng, tuple) and len(set(map(id, job.rng))) == job.n
    results = job.each(one, list(range(job.n))) if parallel else [one(i) for i in range(job.n)]
    return [m for m, _ in results], [s for _, s in results]


def _drop(job: TensorJob, p: DareParams, ctx: Any, sl: slice) -> torch.Tensor:
    """DARE on the slice ``sl`` of every Δᵢ, input by input from ``job.keep(i, sl, density)``: keep each entry
    with probability ``density``; survivors ×1/density
    (paper) or scaled to keep Δᵢ's L1 norm (mergekit, see ``steps.rescale_l1``); ``rescale: false`` leaves
    them as they are."""
    if p.density >= 1:
        return job.deltas
    out = torch.empty_like(job.deltas)
    for i in range(job.n):
        delta = job.deltas[i]
        if ctx is not None:
            masks, scales = ctx
            masked = torch.mul(delta, masks[i][sl].to(delta.dtype), out=out[i])
            if scales[i] is not None:
                masked.mul_(scales[i])  # fp32 × the ratio rounded to fp32
            continue
        mask = job.keep(i, sl, p.density).to(delta.dtype)
        out[i] = steps.rescale_inverse_prob(delta, mask, p.density) if p.rescale else delta * mask
    return out


def _linear_apply(job: TensorJob, p: DareParams, ctx: Any, sl: slice) -> torch.Tensor:
    normalize = bool(p.normalize) if p.normalize is not None else False
    return combine(
        _drop(job, p, ctx, sl), job.weights, consensus=False, mode=p.mode, normalize=normalize, lambda_=p.lambda_
    )


def _ties_apply(job: TensorJob, p: DareParams, ctx: Any, sl: slice) -> torch.Tensor:
    normalize = p.normalize if p.normalize is not None else p.mode == "paper"
    return combine(
        _drop(job, p, ctx, sl), job.weights, consensus=True, mode=p.mode, normalize=normalize, lambda_=p.lambda_
    )


def _dare_needs_whole(p: DareParams) -> bool:
    return p.density < 1 and p.rescale and p.mode == "mergekit"


DARE_LINEAR = Steps(_dare_prepare, _linear_apply, _dare_needs_whole)
DARE_TIES = Steps(_dare_prepare, _ties_apply, _dare_needs_whole)


@merge_method("dare_linear", DareParams, randomized=True, steps=DARE_LINEAR, low_precision=True)
def dare_linear(job: TensorJob, p: DareParams) -> torch.Tensor:
    """DARE + task arithmetic: Δ = λ · Σ wᵢ·DARE(Δᵢ) (÷ Σ wᵢ when ``normalize``; default false in both modes).

    DARE(Δ) = m⊙Δ·s with m ~ Bernoulli(density) per entry (``density`` is the *keep* probability, 1 − p) from
    ``job.keep`` (the engine's: counter-based per input, independent of slicing and threads; one shared
    generator: ``rand < density`` from its stream, input by input, as mergekit's ``bernoulli``).
    Rescale s: **paper** (Yu et al.; PEFT, FusionBench) 1/density, which keeps E[DARE(Δ)] = Δ; **mergekit**
    ‖Δ‖₁/‖m⊙Δ‖₁ per tensor (per-slice fp32 norms summed in float64, so the ratio may differ from mergekit's
    sums in the last bits; no rescale when either norm < 1e-7).
    No sign election.
    Defaults density 0.5, λ 1, rescale true. Edge cases: density 1 → task arithmetic, exactly; all-zero deltas → 0;
    one input at weight 1 returns Δ₁ only in expectation (paper) or in L1 norm (mergekit). Randomized: results
    depend on the seed, and on the order of inputs within one tensor (draws are taken input by input).
    Compute dtype fp32. Reference: Yu et al. 2024, "Language Models are Super Mario" (arXiv:2311.03099);
    mergekit ``dare_linear``.
    """
    return whole(job, p, DARE_LINEAR)


@merge_method("dare_ties", DareParams, randomized=True, steps=DARE_TIES, low_precision=True)
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
    return whole(job, p, DARE_TIES)
