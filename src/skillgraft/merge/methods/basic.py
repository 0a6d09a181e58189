"""Weighted sums of deltas: linear averaging (model soup) and task arithmetic.

Both are exact, deterministic and order independent; negative weights subtract (task negation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from skillgraft.errors import InputError
from skillgraft.merge.registry import PlanFacts, Steps, TensorJob, merge_method, whole


def weighted_sum(deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σᵢ wᵢ·Δᵢ over the first axis (fp32): each product rounded, then summed in input order — the same
    roundings as ``(w[:, None] * Δ).sum(0)`` (mergekit's form), and about 2× faster on CPU than ``tensordot``
    (a GEMV that fuses multiply-adds, so its last bit can differ)."""
    ws = weights.tolist()
    total = deltas[0] * ws[0]
    if len(ws) > 1:
        tmp = torch.empty_like(total)
        for i in range(1, len(ws)):
            total.add_(torch.mul(deltas[i], ws[i], out=tmp))
    return total


@dataclass(frozen=True)
class LinearParams:
    normalize: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.normalize, bool):
            raise InputError(f"linear: normalize must be true or false, not {self.normalize!r}")

    def check_plan(self, facts: PlanFacts) -> None:
        if self.normalize and abs(sum(facts.weights)) < 1e-12:
            raise InputError("linear merge with normalize: the weights sum to 0", hint="set normalize: false")


def _linear_apply(job: TensorJob, p: LinearParams, ctx: Any, sl: slice) -> torch.Tensor:
    total = weighted_sum(job.deltas, job.weights)
    if p.normalize:
        s = float(job.weights.sum())
        return total / s if s != 0 else torch.zeros_like(total)
    return total


LINEAR = Steps(None, _linear_apply)


@merge_method("linear", LinearParams, steps=LINEAR)
def linear(job: TensorJob, p: LinearParams) -> torch.Tensor:
    """Weighted average of the inputs: θ = θ₀ + Σ wᵢΔᵢ / Σ wᵢ (``normalize``, default), else Σ wᵢΔᵢ.

    Averaging parameters θᵢ with weights summing to 1 is the same as averaging deltas. With ``normalize`` and
    Σ wᵢ = 0 the merge is refused before any tensor is read; called directly it returns zeros. Compute dtype fp32.
    Reference: Wortsman et al. 2022 (model soups); mergekit ``linear`` (same semantics).
    """
    return whole(job, p, LINEAR)


@dataclass(frozen=True)
class TaskArithmeticParams:
    lambda_: float = 1.0
    normalize: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.lambda_, (int, float)) or self.lambda_ != self.lambda_:
            raise InputError(f"task_arithmetic: lambda must be a number, not {self.lambda_!r}")
        if not isinstance(self.normalize, bool):
            raise InputError(f"task_arithmetic: normalize must be true or false, not {self.normalize!r}")


def _task_arithmetic_apply(job: TensorJob, p: TaskArithmeticParams, ctx: Any, sl: slice) -> torch.Tensor:
    total = weighted_sum(job.deltas, job.weights)
    if p.normalize:
        s = float(job.weights.sum())
        if abs(s) >= 1e-8:  # mergekit's rule: a divisor below 1e-8 in magnitude counts as 1
            total.div_(s)
    return total.mul_(p.lambda_) if p.lambda_ != 1 else total


TASK_ARITHMETIC = Steps(None, _task_arithmetic_apply)


@merge_method("task_arithmetic", TaskArithmeticParams, steps=TASK_ARITHMETIC, low_precision=True)
def task_arithmetic(job: TensorJob, p: TaskArithmeticParams) -> torch.Tensor:
    """θ = θ₀ + λ·Σ wᵢΔᵢ; with ``normalize`` θ₀ + λ·Σ wᵢΔᵢ / Σ wᵢ. A negative wᵢ removes skill i (task negation).

    Default λ = 1 and normalize false (mergekit's defaults); FusionBench uses λ 0.3. With ``normalize`` a
    |Σ wᵢ| below 1e-8 divides by 1 (mergekit's rule), and the quotient is taken before λ. Compute dtype fp32.
    Reference: Ilharco et al. 2023, "Editing models with task arithmetic".
    """
    return whole(job, p, TASK_ARITHMETIC)
