"""NuSLERP: SLERP between two inputs with the ratio taken from their weights, over the whole tensor, its rows or
its columns; around the base (the deltas are interpolated) or around zero (the full weights are)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from skillgraft.errors import InputError
from skillgraft.merge.methods.multislerp import as_delta, check_origin, sphere_points
from skillgraft.merge.registry import TensorJob, merge_method

# (1 − cos²) at most this counts as colinear: in fp32 (and bf16) only a cosine that rounds to ±1
COLINEAR = 1e-16


@dataclass(frozen=True)
class NuslerpParams:
    nuslerp_row_wise: bool = False
    nuslerp_flatten: bool = True
    origin: str = "base"

    def __post_init__(self) -> None:
        for key in ("nuslerp_row_wise", "nuslerp_flatten"):
            if not isinstance(getattr(self, key), bool):
                raise InputError(f"nuslerp: {key} must be true or false, not {getattr(self, key)!r}")
        check_origin("nuslerp", self.origin)


def weight_ratio(weights: torch.Tensor) -> float:
    """t = w₂ / (w₁ + w₂), in double precision; 0.5 when |w₁ + w₂| < 1e-6."""
    w1, w2 = weights.tolist()
    total = w1 + w2
    return 0.5 if abs(total) < 1e-6 else w2 / total


def slerp_last_axis(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SLERP of ``a`` and ``b`` along their last axis, vector by vector: with Ω the angle between the vectors
    (each normalised by max(‖·‖, 1e-7), so a zero vector counts as orthogonal to everything),
    (sin((1−t)Ω)·a + sin(tΩ)·b) / sin Ω; (1−t)·a + t·b where the two are colinear (cos Ω rounds to ±1)."""
    ua = a / torch.linalg.vector_norm(a, dim=-1, keepdim=True).clamp(min=1e-7)
    ub = b / torch.linalg.vector_norm(b, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (ua * ub).sum(-1, keepdim=True).clamp(-1, 1)  # [..., 1]
    colinear = (1 - cos.square()) <= COLINEAR
    angle = torch.acos(torch.where(colinear, 0, cos))  # finite on both branches
    spherical = (torch.sin((1 - t) * angle) * a + torch.sin(t * angle) * b) / torch.sin(angle)
    return torch.where(colinear, (1 - t) * a + t * b, spherical)


@merge_method("nuslerp", NuslerpParams, needs_base=True, min_inputs=2, max_inputs=2)
def nuslerp(job: TensorJob, p: NuslerpParams) -> torch.Tensor:
    """NuSLERP of x₁, x₂ (Δᵢ, or θᵢ with ``origin: zero``) at t = w₂ / (w₁ + w₂): SLERP (see ``slerp_last_axis``).

    The ratio comes from the two weights (t = 0 is input 1; 0.5 when |w₁ + w₂| < 1e-6); weights outside [0, 1]
    extrapolate. Vectors: the whole flattened tensor (``nuslerp_flatten``, default), else each row (the last axis)
    or, with ``nuslerp_row_wise``, each column (the first axis; a 1-D tensor is one vector). ``origin: base``
    (default) interpolates the deltas, as mergekit does with a base_model; ``zero`` the full weights (mergekit
    without one), returned as x − θ₀. Defaults nuslerp_flatten true, nuslerp_row_wise false (mergekit's).
    Unlike ``slerp``, colinear vectors fall back to the linear mix only when cos Ω rounds to ±1 (slerp: beyond
    0.9995), per vector, and the angle is in the compute dtype. Edge cases: parallel inputs → (1 − t)x₁ + t·x₂;
    antiparallel at equal weights → 0; a zero vector against v → sin(tπ/2)·v (it counts as orthogonal);
    all-zero deltas → 0; equal inputs → that input. Exactly two inputs; swapping them with their weights gives
    the same merge.
    Compute dtype fp32, or a 16-bit compute dtype (a mergekit YAML's ``dtype: bfloat16``) as mergekit computes in
    it: x₁, x₂, every step and the merged weights in it; whole tensor at once. Reference: Shoemake 1985;
    mergekit ``nuslerp`` (same operations in the same order).
    """
    if job.n != 2:
        raise InputError(f"nuslerp merges exactly 2 inputs, got {job.n}")
    x = sphere_points(job, p.origin)  # [2, *shape]
    a, b = x[0], x[1]
    if p.nuslerp_flatten:
        a, b = a.reshape(-1), b.reshape(-1)
    elif p.nuslerp_row_wise:
        a, b = a.transpose(0, -1), b.transpose(0, -1)
    merged = slerp_last_axis(weight_ratio(job.weights), a, b)
    if p.nuslerp_row_wise and not p.nuslerp_flatten:
        merged = merged.transpose(0, -1)
    return as_delta(job, merged.reshape(job.deltas.shape[1:]), p.origin)
