"""SLERP: spherical linear interpolation between two fine-tunes, tensor by tensor.

Interpolates the full parameters θᵢ = θ₀ + Δᵢ on the sphere and returns the merged delta.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from skillgraft.errors import InputError
from skillgraft.merge.methods import family
from skillgraft.merge.registry import TensorJob, merge_method

DOT_THRESHOLD = 0.9995


@dataclass(frozen=True)
class SlerpParams:
    t: float | tuple[float, ...] = 0.5

    def __post_init__(self) -> None:
        values = self.t if isinstance(self.t, (list, tuple)) else (self.t,)
        if not values:
            raise InputError("slerp: t must be a number or a non-empty list of numbers")
        for v in values:
            family.check_number("slerp", "t", v, 0.0, 1.0)
        if isinstance(self.t, list):
            object.__setattr__(self, "t", tuple(self.t))


def t_at(t: float | tuple[float, ...], layer: int | None, num_layers: int | None) -> float:
    """``t`` for one tensor: a scalar as is; a list is a gradient, piecewise linear over the relative layer
    position layer/(num_layers − 1); tensors outside the layer stack (embeddings, final norm) use its first value."""
    if not isinstance(t, tuple):
        return float(t)
    if len(t) == 1 or layer is None or not num_layers or num_layers < 2:
        return float(t[0])
    x = min(max(layer / (num_layers - 1), 0.0), 1.0) * (len(t) - 1)
    i = min(int(x), len(t) - 2)
    return float(t[i] + (x - i) * (t[i + 1] - t[i]))


def slerp_tensors(t: float, v0: torch.Tensor, v1: torch.Tensor, eps: float = 1e-8) -> torch.Tensor | None:
    """sin((1−t)Ω)/sin Ω·v0 + sin(tΩ)/sin Ω·v1 over the flattened tensors, Ω the angle between them; ``None``
    when they are nearly colinear (|cos Ω| > 0.9995) or one is ~0, where the caller interpolates linearly."""
    a, b = v0.reshape(-1), v1.reshape(-1)
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    if na <= eps or nb <= eps:
        return None
    dot = float(torch.dot(a / na, b / nb).clamp(-1, 1))
    if abs(dot) > DOT_THRESHOLD:
        return None
    omega = torch.acos(torch.tensor(dot, dtype=torch.float64))
    s = torch.sin(omega)
    c0, c1 = float(torch.sin((1 - t) * omega) / s), float(torch.sin(t * omega) / s)
    return c0 * v0 + c1 * v1


@merge_method("slerp", SlerpParams, needs_base=True, min_inputs=2, max_inputs=2)
def slerp(job: TensorJob, p: SlerpParams) -> torch.Tensor:
    """SLERP of θ₁ = θ₀ + Δ₁ and θ₂ = θ₀ + Δ₂: θ = sin((1−t)Ω)/sin Ω·θ₁ + sin(tΩ)/sin Ω·θ₂, returned as θ − θ₀.

    Ω is the angle between the flattened tensors θ₁ and θ₂ (whole tensor, not per row). When |cos Ω| > 0.9995 or a
    tensor is ~0, linear interpolation is used, computed in delta form (1−t)Δ₁ + tΔ₂ so equal inputs give their Δ
    exactly. t = 0 gives input 1, t = 1 input 2; a list of t values is a gradient over layers (see ``t_at``).
    User weights are ignored; exactly two inputs, and the order matters (swapping them means t → 1 − t).
    Default t 0.5. Edge cases: all-zero deltas → linear branch → 0; Δ₁ = Δ₂ → that Δ. Angles and coefficients in
    fp64, tensors fp32. Reference: Shoemake 1985; mergekit ``slerp`` (mergekit interpolates the base with one model;
    here both ends are fine-tunes of the same base).
    """
    if job.base is None:
        raise InputError(f"{job.name}: slerp needs the base model's tensor")
    if job.n != 2:
        raise InputError(f"slerp merges exactly 2 inputs, got {job.n}")
    t = t_at(p.t, job.layer, job.num_layers)
    d0, d1 = job.deltas[0], job.deltas[1]
    merged = slerp_tensors(t, job.base + d0, job.base + d1)
    if merged is None:
        return (1 - t) * d0 + t * d1
    return merged - job.base
