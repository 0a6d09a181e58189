"""Multi-SLERP: barycentric interpolation of any number of inputs on a hypersphere, tensor by tensor.

Also the steps the spherical methods (multislerp, nuslerp, karcher) share: the sphere's centre (``origin``: the
base, so the deltas are interpolated, or zero, so the full weights are), the points, and back to a delta.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from skillgraft.errors import InputError
from skillgraft.merge.methods import family
from skillgraft.merge.registry import PlanFacts, TensorJob, merge_method

ORIGINS = ("base", "zero")


def check_origin(method: str, origin: object) -> None:
    if origin not in ORIGINS:
        raise InputError(
            f"{method}: origin must be 'base' or 'zero', not {origin!r}",
            hint="base interpolates the deltas θᵢ − θ₀; zero the full weights θᵢ (mergekit without base_model)",
        )


def low_dtype(job: TensorJob) -> torch.dtype | None:
    """The merge's 16-bit compute dtype (a mergekit YAML's ``dtype: bfloat16``, or its checkpoints' own without
    one), in which the spherical methods compute as mergekit does; None for fp32."""
    return job.compute_dtype if job.compute_dtype.itemsize < 4 else None


def sphere_points(job: TensorJob, origin: str) -> torch.Tensor:
    """The vectors a spherical method interpolates, ``[n, *shape]``: Δᵢ (origin base) or θᵢ = θ₀ + Δᵢ (zero).

    In a 16-bit compute dtype they are mergekit's: θᵢ in it (exact: each input was read in it) and, around the
    base, θᵢ − θ₀ rounded to it."""
    low = low_dtype(job)
    if origin == "base" and low is None:
        return job.deltas
    if job.base is None:
        raise InputError(f"{job.name}: the spherical methods need the base model's tensor here")
    points = job.base.unsqueeze(0) + job.deltas
    if low is None:
        return points
    points = points.to(low)
    return points - job.base.to(low) if origin == "base" else points


def as_delta(job: TensorJob, merged: torch.Tensor, origin: str) -> torch.Tensor:
    """A merged point (in ``sphere_points``' space) as the merged delta. In a 16-bit compute dtype the merged
    weights are formed in it (around the base: merged + θ₀, as mergekit adds it) and their Δ in the deltas'
    dtype is exact, so the engine's θ₀ + Δ gives them back."""
    low = low_dtype(job)
    if job.base is None or (origin == "base" and low is None):  # ``sphere_points`` needed the base otherwise
        return merged
    if low is None:
        return merged - job.base
    theta = merged + job.base.to(low) if origin == "base" else merged
    return theta.to(job.deltas.dtype) - job.base


@dataclass(frozen=True)
class MultislerpParams:
    normalize_weights: bool = True
    eps: float = 1e-8
    origin: str = "base"

    def __post_init__(self) -> None:
        if not isinstance(self.normalize_weights, bool):
            raise InputError(f"multislerp: normalize_weights must be true or false, not {self.normalize_weights!r}")
        family.check_number("multislerp", "eps", self.eps, 0.0)
        if self.eps == 0:
            raise InputError(
                "multislerp: eps must be > 0, not 0",
                hint="eps keeps zero-norm inputs and the exponential map finite (mergekit's default 1e-8)",
            )
        check_origin("multislerp", self.origin)

    def check_plan(self, facts: PlanFacts) -> None:
        if self.normalize_weights and abs(sum(facts.weights)) < 1e-12:
            raise InputError(
                "multislerp with normalize_weights: the weights sum to 0", hint="set normalize_weights: false"
            )


@merge_method("multislerp", MultislerpParams, needs_base=True)
def multislerp(job: TensorJob, p: MultislerpParams) -> torch.Tensor:
    """Multi-SLERP of the inputs xᵢ (Δᵢ, or θᵢ with ``origin: zero``), weights wᵢ (÷ Σ wᵢ with normalize_weights):

        uᵢ = xᵢ / (‖xᵢ‖ + eps),  m = Σ wᵢuᵢ / ‖Σ wᵢuᵢ‖,  v = Σ wᵢ(uᵢ − (uᵢ·m)·m),  s = ‖v‖ + eps,
        x = (cos s · m + sin s / s · v) · Σ wᵢ‖xᵢ‖

    over the flattened tensor: the inputs are projected to the tangent space at their normalised weighted mean,
    averaged there, mapped back by the exponential map and scaled by the weighted mean norm. Since m is the
    direction of Σ wᵢuᵢ, v = Σ wᵢuᵢ − ‖Σ wᵢuᵢ‖·m is 0 in exact arithmetic (only rounding and eps remain), so the
    result is the normalised weighted mean of the directions times Σ wᵢ‖xᵢ‖ — for two inputs not the SLERP
    point (orthogonal unit inputs at weights ¾, ¼ land at atan(1/3) = 18.4°, SLERP at 22.5°). ``origin: base``
    (default) centres the sphere on the base, as mergekit does with a base_model; ``zero`` interpolates the full
    weights (mergekit without one) and returns x − θ₀. Defaults normalize_weights true, eps 1e-8 (mergekit's).
    Edge cases: one input → its Δ whatever its weight (mergekit's shortcut; the formula agrees when
    normalize_weights is on); ‖Σ wᵢuᵢ‖ < eps (all-zero deltas, antipodal inputs with balancing weights) → the
    weighted sum Σ wᵢxᵢ (mergekit does this for two inputs and raises for more); a zero-norm input has uᵢ = 0
    but keeps its weight in Σ wᵢ‖xᵢ‖; with normalize_weights, Σ wᵢ = 0 is refused before any tensor is read
    (called directly it returns zeros). Compute dtype fp32, or a 16-bit compute dtype (a mergekit YAML's
    ``dtype: bfloat16``) as mergekit computes in it: inputs, Δᵢ, weights and every step rounded to it, the merged
    weights formed in it; whole tensor at once.
    Reference: C. Goddard, "multislerp" (goddard.blog/posts/multislerp-wow-what-a-cool-idea); mergekit
    ``multislerp`` (same operations in the same order).
    """
    if p.normalize_weights and float(job.weights.sum()) == 0:
        return torch.zeros_like(job.deltas[0])
    if job.n == 1:
        return job.deltas[0].clone()
    x = sphere_points(job, p.origin).reshape(job.n, -1)  # [n, numel]
    w = job.weights.to(x.dtype)
    if p.normalize_weights:
        w = w / w.sum()
    w = w.view(-1, 1)  # [n, 1]
    norms = torch.linalg.vector_norm(x, dim=-1, keepdim=True)  # [n, 1]
    units = x / (norms + p.eps)
    mean = (units * w).sum(0)  # [numel]
    length = torch.linalg.vector_norm(mean)
    if length < p.eps:
        merged = (x * w).sum(0)
    else:
        mean = mean / length
        tangents = units - (units * mean).sum(-1, keepdim=True) * mean  # [n, numel], each ⟂ mean
        step = (tangents * w).sum(0)
        size = torch.linalg.vector_norm(step) + p.eps
        scale = (norms.squeeze(-1) * w.squeeze(-1)).sum()  # Σ wᵢ‖xᵢ‖
        merged = (mean * torch.cos(size) + step * (torch.sin(size) / size)) * scale
    return as_delta(job, merged.reshape(job.deltas.shape[1:]), p.origin)
