"""SCE merging: select the entries the inputs disagree on most, weight each input by its energy, erase minority signs.

``prepare`` works on the whole tensor (the variance top-k and the per-input weights); the merge itself is
elementwise and runs slice by slice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from skillgraft.errors import InputError
from skillgraft.merge import steps
from skillgraft.merge.registry import Steps, TensorJob, merge_method, whole


@dataclass(frozen=True)
class SceParams:
    select_topk: float = 1.0

    def __post_init__(self) -> None:
        v = self.select_topk
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:  # NaN fails the range too
            raise InputError(
                f"sce: select_topk must be a number in (0, 1], not {self.select_topk!r}",
                hint="select_topk is the fraction of entries kept (those varying most across inputs); 1 keeps all",
            )


def variance_topk_mask(deltas: torch.Tensor, fraction: float) -> torch.Tensor:
    """Flat 0/1 mask (the deltas' dtype) of the k entries whose Δ varies most across inputs (population
    variance over the first axis of ``deltas`` ``[n, *shape]``); k = ⌊fraction · #(variance ≠ 0)⌋, the product
    taken in fp32 as mergekit takes it (90 × 0.7 gives 63 there, not 62); ties go as ``torch.topk`` orders them."""
    var = torch.var(deltas, dim=0, unbiased=False).reshape(-1).abs()  # abs: −0.0 → 0, as mergekit ranks it
    k = int(torch.count_nonzero(var).to(torch.float32) * fraction)
    mask = torch.zeros(var.shape, dtype=deltas.dtype)
    if k > 0:
        mask[torch.topk(var, k).indices] = 1
    return mask


def energy_weights(deltas: torch.Tensor) -> torch.Tensor:
    """Per-input weights ``[n, 1]``: mean(Δᵢ²) / Σⱼ mean(Δⱼ²); 1/n each when that sum is below 1e-6."""
    energy = deltas.square().reshape(deltas.shape[0], -1).mean(dim=1)
    total = float(energy.sum())
    weights = torch.ones_like(energy) / energy.numel() if abs(total) < 1e-6 else energy / total
    return weights.reshape(-1, 1)


def _sce_prepare(job: TensorJob, p: SceParams) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The top-k mask (None at select_topk 1) and the weights, from the whole tensor."""
    mask = variance_topk_mask(job.deltas, p.select_topk) if p.select_topk < 1 else None
    selected = job.deltas if mask is None else job.deltas * mask.reshape(job.deltas.shape[1:])
    return mask, energy_weights(selected)


def _sce_apply(job: TensorJob, p: SceParams, ctx: Any, sl: slice) -> torch.Tensor:
    mask, weights = ctx
    d = job.deltas if mask is None else job.deltas * mask[sl]  # [n, len]
    agree = steps.agreement_mask(d, steps.elect_sign(d)).to(d.dtype)  # sign elected on the unweighted sum
    kept = weights.to(d.dtype) * agree  # wᵢ where Δᵢ has the elected sign, else 0
    return (d * kept).sum(dim=0).div_(kept.sum(dim=0).clamp_(min=1e-6))


SCE = Steps(_sce_prepare, _sce_apply)


@merge_method("sce", SceParams, steps=SCE, low_precision=True)
def sce(job: TensorJob, p: SceParams) -> torch.Tensor:
    """SCE: Δ = Σᵢ wᵢmᵢΔ'ᵢ / max(Σᵢ wᵢmᵢ, 1e-6), Δ'ᵢ = Δᵢ ⊙ s, wᵢ = mean(Δ'ᵢ²) / Σⱼ mean(Δ'ⱼ²).

    Select: with ``select_topk`` < 1 only the ⌊select_topk · #(variance ≠ 0)⌋ entries whose Δ varies most
    across the inputs (population variance; the count in fp32, as mergekit counts) are kept (s = 1 there, 0
    elsewhere), the same entries for every input; at 1 (the default, mergekit's) every entry is kept.
    Calculate: each input's weight is its mean squared selected Δ over the tensor, normalised to sum 1 (1/n each
    when the total is below 1e-6). Erase: the sign is elected per entry on the *unweighted* sum Σᵢ Δ'ᵢ (+ where
    ≥ 0); mᵢ = 1 where Δ'ᵢ has that sign (zeros never agree). Then the weighted mean of the agreeing entries.
    The user's weights are ignored (mergekit's ``sce`` ignores them too); no λ. Edge cases: one input → Δ₁
    (select_topk 1) or 0 (select_topk < 1: one input has no variance, nothing is selected); all-zero deltas → 0;
    entries no input keeps → 0 (the 1e-6 floor divides 0). select_topk must be in (0, 1] (mergekit accepts ≤ 0,
    which keeps nothing, and > 1, which is 1). The top-k and the weights need the whole tensor (``prepare``); the
    merge itself runs slice by slice. The same operations in the same order as mergekit, bit-identical with it.
    Compute dtype fp32, or the merge's 16-bit compute dtype (a mergekit YAML's ``dtype: bfloat16``), in which
    mergekit computes too.
    Reference: Wan et al. 2024, "FuseChat: Knowledge Fusion of Chat Models" (arXiv:2408.07990); mergekit ``sce``.
    """
    return whole(job, p, SCE)
