"""Model Stock: average the fine-tunes and pull the average towards the base by how much they agree.

The interpolation ratio comes from the angle between the fine-tunes' deltas, per tensor (or per row).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from skillgraft.errors import InputError
from skillgraft.merge.registry import TensorJob, merge_method


@dataclass(frozen=True)
class ModelStockParams:
    filter_wise: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.filter_wise, bool):
            raise InputError(f"model_stock: filter_wise must be true or false, not {self.filter_wise!r}")


def mean_pairwise_cos(rows: torch.Tensor) -> torch.Tensor:
    """Mean over input pairs a < b of cos(Δa, Δb) along the last axis of ``rows`` ``[n, …, d]``; each cosine
    is Δa·Δb / max(‖Δa‖‖Δb‖, 1e-6), clamped to [−1, 1]. Returns ``[…]``."""
    norms = torch.linalg.vector_norm(rows, dim=-1)
    cos = [
        ((rows[a] * rows[b]).sum(dim=-1) / (norms[a] * norms[b]).clamp(min=1e-6)).clamp(-1, 1)
        for a in range(rows.shape[0])
        for b in range(a + 1, rows.shape[0])
    ]
    return torch.stack(cos).mean(dim=0)


@merge_method("model_stock", ModelStockParams, needs_base=True, min_inputs=2)
def model_stock(job: TensorJob, p: ModelStockParams) -> torch.Tensor:
    """Model Stock: Δ = t · (Σᵢ Δᵢ / N), t = N·cos θ / (1 + (N − 1)·cos θ), for N ≥ 2 fine-tunes of the base.

    cos θ is the mean over pairs of the cosine between two inputs' deltas (Δa·Δb / max(‖Δa‖‖Δb‖, 1e-6), clamped
    to [−1, 1]) over the whole tensor, or — ``filter_wise: true`` — per row (the last axis; a 1-D tensor is one
    row), giving one t per row. Equivalently θ = t·mean(θᵢ) + (1 − t)·θ₀, the paper's interpolation between the
    fine-tunes' average and the base: inputs that agree (cos → 1) keep their average, orthogonal ones (cos → 0)
    fall back to the base. Where 1 + (N − 1)·cos θ is within 1e-6 of 0 (opposing updates, no finite estimate)
    t is 0: that tensor or row keeps the base. User weights are ignored. Defaults: filter_wise false
    (mergekit's). Edge cases: all-zero deltas → cos 0 → the base; identical deltas → cos 1, t 1 → that Δ.
    Compute dtype fp32; the result is returned as a delta (θ − θ₀), so it can differ from mergekit's
    t·avg + (1 − t)·θ₀ by fp32 rounding (one bf16 step at most after the cast, see the end-to-end test). With a
    16-bit compute dtype (a mergekit YAML's ``dtype: bfloat16``) it computes as mergekit does, in that dtype:
    offsets θᵢ − θ₀, cosines, t, mean(θᵢ) and t·mean + (1 − t)·θ₀ all rounded to it.
    Reference: Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned models" (arXiv:2403.19522);
    mergekit ``model_stock``.
    """
    n, shape = job.n, job.deltas.shape[1:]
    low = job.compute_dtype if job.compute_dtype.itemsize < 4 else None
    deltas = job.deltas
    if low is not None:  # mergekit's arithmetic in the compute dtype: offsets θᵢ − θ₀ rounded to it
        assert job.base is not None
        base = job.base.to(low)
        models = [(job.base + d).to(low) for d in job.deltas]  # θᵢ exactly (each was read in ``low``)
        deltas = torch.stack([m - base for m in models])
    if p.filter_wise:
        rows = deltas.reshape(n, 1, -1) if len(shape) <= 1 else deltas.reshape(n, -1, shape[-1])
    else:
        rows = deltas.reshape(n, -1)
    cos = mean_pairwise_cos(rows).unsqueeze(-1)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, 1.0, denominator))
    if low is None:
        return (t * (rows.sum(dim=0) / n)).reshape(shape)
    # θ = t·mean(θᵢ) + (1 − t)·θ₀ in ``low``, as mergekit computes it; its Δ in fp32 is exact, so the engine's
    # θ₀ + Δ gives that θ back
    rows_of = (
        (lambda x: x.reshape(1, -1) if len(shape) <= 1 else x.reshape(-1, shape[-1]))
        if p.filter_wise
        else (lambda x: x.reshape(-1))
    )
    average = sum(rows_of(m) for m in models) / n
    merged = (t * average + (1 - t) * rows_of(base)).reshape(shape)
    return merged.float() - job.base
