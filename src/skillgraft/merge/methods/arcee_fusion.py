"""Arcee Fusion: take the fine-tune's change only where it is both large and in rows whose distribution moved.

Importance mixes |Δ| with a per-row KL divergence of softmaxed parameters; an outlier threshold over the whole
tensor decides which entries move, so it needs the whole tensor (and the base) at once.
"""

from __future__ import annotations

import torch

from skillgraft.merge import steps
from skillgraft.merge.registry import NoParams, TensorJob, merge_method

EPS = 1e-8  # added to both softmax distributions before the KL divergence (mergekit's)


def importance(theta: torch.Tensor, base: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """|Δ| · KL(softmax(θ₁) ‖ softmax(θ₀)) per entry; the softmax and the KL sum run along the last axis (one
    KL per row, a 1-D tensor is one row), each distribution + 1e-8."""
    p = torch.softmax(theta, dim=-1) + EPS
    q = torch.softmax(base, dim=-1) + EPS
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)  # [..., 1]
    return delta.abs() * kl


def outlier_threshold(scores: torch.Tensor) -> torch.Tensor:
    """median + 1.5·(Q3 − Q1) of ``scores``; the quartiles are order statistics, the value at position
    ⌊q·(N − 1)⌋ of the sorted scores (q = ¼, ½, ¾), taken exactly by selection (no sort)."""
    flat = scores.reshape(-1)
    last = flat.numel() - 1
    q1, median, q3 = (flat.kthvalue(last * j // 4 + 1).values for j in (1, 2, 3))
    return median + 1.5 * (q3 - q1)


@merge_method("arcee_fusion", NoParams, needs_base=True, min_inputs=1, max_inputs=1)
def arcee_fusion(job: TensorJob, p: NoParams) -> torch.Tensor:
    """Arcee Fusion: Δ = Δ₁ ⊙ [s ≥ median(s) + 1.5·(Q3(s) − Q1(s))], s = |Δ₁| · KL(softmax(θ₁) ‖ softmax(θ₀)).

    For one fine-tune θ₁ = θ₀ + Δ₁ of the base θ₀. Each entry's importance s is its |Δ₁| times the KL divergence
    between the softmax of its row of θ₁ and of θ₀ (softmax and KL along the last axis, 1e-8 added to both
    distributions; a 1-D tensor is one row). Only entries whose importance reaches the upper outlier fence of
    the tensor's importances move (the whole Δ₁ entry); the rest keep the base. Quartiles are order statistics,
    the ⌊q·(N − 1)⌋-th smallest importance. No parameters; user weights are ignored; exactly one input.
    Edge cases: all-zero Δ₁ → every importance 0 ≥ threshold 0 → 0 (unchanged base); a tensor whose importances
    are mostly equal (Q1 = Q3) keeps the entries at or above the median. θ₁ is rebuilt as θ₀ + Δ₁, the
    fine-tune's exact value whenever Δ₁ = θ₁ − θ₀ was exact (for bf16 checkpoints in fp32: unless an entry's θ₁
    and θ₀ differ in binary exponent by more than 16). Compute dtype fp32 (the deltas' dtype); with a 16-bit
    compute dtype (a mergekit YAML's ``dtype: bfloat16``) θ₁ − θ₀, the importances and the quartiles are
    computed in it, as mergekit computes them (and, as there, θ₀ + (θ₁ − θ₀)·mask in fp32).
    Differs from mergekit on tensors over 10⁶ entries: mergekit estimates the quartiles from 10⁶ entries drawn
    at random with replacement (its global generator), we take them exactly; on smaller tensors the same.
    Reference: Arcee AI, "Arcee Fusion" (mergekit ``arcee_fusion``; https://arcee.ai).
    """
    assert job.base is not None  # registered with needs_base
    delta = job.deltas[0]
    base = job.base.to(delta.dtype)
    theta0, theta1, diff = base, base + delta, delta  # θ₁ exactly (see above)
    low = job.compute_dtype if job.compute_dtype.itemsize < 4 else None
    if low is not None:  # mergekit's arithmetic in the 16-bit compute dtype, on the parameters
        theta0, theta1 = base.to(low), theta1.to(low)  # exact: both were read in ``low``
        diff = theta1 - theta0
    scores = importance(theta1, theta0, diff)
    # mergekit's 0/1 mask is fp32, so its θ₀ + (θ₁ − θ₀)·mask is an fp32 sum: the engine's θ₀ + Δ
    return diff.to(delta.dtype) * steps.as01(scores >= outlier_threshold(scores), delta.dtype)
