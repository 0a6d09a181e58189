"""Karcher mean: the Riemannian centre of mass of the inputs' weights on the unit hypersphere, tensor by tensor.

Directions are averaged on the sphere by fixed-point iteration; the result is rescaled by the mean norm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from skillgraft.errors import InputError
from skillgraft.merge.methods import family
from skillgraft.merge.methods.multislerp import as_delta, sphere_points
from skillgraft.merge.registry import TensorJob, merge_method


@dataclass(frozen=True)
class KarcherParams:
    max_iter: int = 10
    tol: float = 1e-5

    def __post_init__(self) -> None:
        if isinstance(self.max_iter, bool) or not isinstance(self.max_iter, int) or self.max_iter < 0:
            raise InputError(
                f"karcher: max_iter must be an integer ≥ 0, not {self.max_iter!r}",
                hint="the number of fixed-point steps on the sphere (mergekit's default 10; 0 keeps the first guess)",
            )
        family.check_number("karcher", "tol", self.tol, 0.0)


def norm_dtype(x: torch.Tensor) -> torch.dtype:
    """Norms are taken in fp64 for fp64 tensors and in fp32 otherwise (so bf16 inputs get fp32 norms)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def karcher_direction(units: list[torch.Tensor], p: KarcherParams) -> torch.Tensor:
    """The uniform Karcher mean of unit vectors ``units`` (each 1-D, none zero): start at their normalised
    Euclidean mean (the first unit if that mean is shorter than tol), then step along the mean of the logarithm
    maps, Σ αᵢ·θᵢ/sin θᵢ·(uᵢ − cos θᵢ·m) with αᵢ = 1/k and θᵢ = ∠(m, uᵢ) (inputs within tol of m contribute 0),
    through the exponential map m ← cos‖v‖·m + sin‖v‖·v/‖v‖, renormalising, until ‖v‖ < tol or max_iter steps."""
    acc = norm_dtype(units[0])
    alpha = (1.0 / len(units)) / sum(1.0 / len(units) for _ in units)  # mergekit's renormalised 1/k
    mean = torch.zeros_like(units[0])
    for u in units:
        mean += alpha * u
    length = torch.linalg.vector_norm(mean.to(acc))
    mean = units[0].clone() if length.item() < p.tol else (mean / length).to(mean.dtype)
    for _ in range(p.max_iter):
        step = torch.zeros_like(mean)
        for u in units:
            cos = torch.clamp(torch.dot(mean, u), -1.0, 1.0)
            angle = torch.arccos(cos)
            if angle.item() < p.tol:
                continue
            step += alpha * (angle / torch.sin(angle)) * (u - cos * mean)
        size = torch.linalg.vector_norm(step.to(acc))
        if size.item() < p.tol:
            break
        mean = (torch.cos(size) * mean + torch.sin(size) * (step / size)).to(mean.dtype)
        length = torch.linalg.vector_norm(mean.to(acc))
        if length.item() > p.tol:
            mean = (mean / length).to(mean.dtype)
    return mean


@merge_method("karcher", KarcherParams, needs_base=True)
def karcher(job: TensorJob, p: KarcherParams) -> torch.Tensor:
    """Karcher mean of the inputs' weights θᵢ = θ₀ + Δᵢ: θ = (Σᵢ ‖θᵢ‖ / N) · m, returned as θ − θ₀.

    m is the uniform Karcher (Fréchet) mean of the directions θᵢ/‖θᵢ‖ on the unit sphere of the flattened tensor
    (``karcher_direction``): at most ``max_iter`` fixed-point steps, stopping once the mean log-map is shorter
    than ``tol``. Inputs with ‖θᵢ‖ ≤ tol take no part in m (their norm still counts, with 1/N, in the scale).
    The points are the full weights, not the deltas, as in mergekit: the base is not one of them (list the base
    model as an input to include it; a mergekit YAML's ``base_model`` is included so, as mergekit does). User
    weights are ignored (every input counts 1/N). Defaults max_iter 10, tol 1e-5 (mergekit's).
    Edge cases: one input → its Δ; inputs all equal (all-zero deltas too) → that Δ exactly (mergekit: the same
    within fp32 rounding); every ‖θᵢ‖ ≤ tol → θ = 0; directions averaging to ~0 (antipodal pairs) start from
    the first input's direction. Compute dtype fp32, or a 16-bit compute dtype (a mergekit YAML's
    ``dtype: bfloat16``) as mergekit computes in it: θᵢ, directions, the iteration and θ in it, norms in fp32
    (fp64 for fp64 inputs); whole tensor at once. Reference: Karcher 1977; arXiv:2603.04972; mergekit
    ``karcher`` (same operations in the same order).
    """
    if job.base is None:
        raise InputError(f"{job.name}: karcher needs the base model's tensor")
    if job.n == 1 or all(torch.equal(job.deltas[0], job.deltas[i]) for i in range(1, job.n)):
        return job.deltas[0].clone()
    points = sphere_points(job, "zero").reshape(job.n, -1)  # [n, numel]: θᵢ
    acc = norm_dtype(points)
    norms = [torch.linalg.vector_norm(x.to(acc)) for x in points]
    units = [x / n for x, n in zip(points, norms) if n.item() > p.tol]  # [numel] each, unit length
    if not units:
        merged = torch.zeros_like(points[0])  # θ = 0
    else:
        scale = sum((1.0 / job.n) * n for n in norms)
        merged = scale * karcher_direction(units, p)
    return as_delta(job, merged.reshape(job.base.shape), "zero")
