"""TIES merging (trim, elect sign, disjoint merge) and plain magnitude pruning, all of it in this file.

Both trim each Δᵢ by magnitude; ``mode`` picks the paper's or mergekit 0.1.5's exact rules. The pieces, in the
order the engine runs them: ``global_thresholds`` (the whole-model pass, ``trim_scope: global`` only), then per
tensor ``prepare_trim`` (thresholds or exactly-k keep plans), then per slice ``apply_trim`` and ``combine`` (sign
election + disjoint merge + λ, shared with DARE, Breadcrumbs and DELLA). The numeric kernels (k-th magnitude,
position trim) are in ``merge/steps.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from skillgraft.errors import InputError
from skillgraft.merge import steps
from skillgraft.merge.methods import family
from skillgraft.merge.registry import ModelPass, Steps, TensorJob, merge_method, whole
from skillgraft.progress import ProgressFn


@dataclass(frozen=True)
class TiesParams:
    density: float = 0.2
    lambda_: float = 1.0
    mode: str = "paper"
    trim_scope: str = "tensor"
    normalize: bool = True
    tie_break: str = "argsort"

    def __post_init__(self) -> None:
        family.check_density("ties", self.density)
        family.check_number("ties", "lambda", self.lambda_)
        family.check_mode("ties", self.mode)
        if self.trim_scope not in ("tensor", "global"):
            raise InputError(f"ties: trim_scope must be 'tensor' or 'global', not {self.trim_scope!r}")
        if self.trim_scope == "global" and self.mode == "mergekit":
            raise InputError("ties: mergekit trims per tensor; trim_scope 'global' needs mode 'paper'")
        family.check_optional_bool("ties", "normalize", self.normalize)
        check_tie_break("ties", self.tie_break, self.mode)


def check_tie_break(method: str, tie_break: Any, mode: str) -> None:
    if tie_break not in ("argsort", "position"):
        raise InputError(f"{method}: tie_break must be 'argsort' or 'position', not {tie_break!r}")
    if tie_break == "position" and mode != "mergekit":
        raise InputError(f"{method}: tie_break applies to mode 'mergekit' (the paper trim keeps every tie)")


def prepare_trim(
    job: TensorJob, density: float, mode: str, trim_scope: str = "tensor", tie_break: str = "argsort"
) -> Any:
    """Per-tensor part of the trim, on flat ``[n, numel]`` deltas: ``("threshold", [tᵢ])`` keeps |Δᵢ| ≥ tᵢ —
    the k-th largest magnitude per tensor (paper) or the engine's whole-model ``job.thresholds`` (global);
    ``("exact", [eᵢ])`` keeps exactly k entries per input (mergekit): eᵢ is either a ``steps.position_trim``
    plan (ties at the k-th magnitude taken in index order) or the flat Δᵢ already trimmed to the entries
    ``argsort`` picks;
    None keeps everything.

    With ``tie_break: argsort`` the tie order is looked at only where it can matter: when the k-th largest |Δᵢ|
    is 0 the tied entries are zeros, the same value kept or dropped (bf16 fine-tunes often change fewer than half
    their entries), and the position plan gives argsort's result bit for bit; otherwise ``sortpath`` replays the
    sort's partitions (``steps.exact_trim_plan``)."""
    if trim_scope == "global":
        if job.thresholds is None or len(job.thresholds) != job.n:
            raise InputError(f"{job.name}: trim_scope 'global' needs whole-model thresholds from the merge engine")
        return ("threshold", _column(job.thresholds))
    if density >= 1:
        return None
    rows = list(job.deltas)
    if mode == "mergekit":
        if tie_break == "position":
            return ("exact", job.each(lambda d: steps.position_trim_plan(d, density), rows))
        plan = lambda d: steps.exact_trim_plan(d, density)  # noqa: E731
        # A replay holds ~9 bytes per entry: side by side only while that stays small (peak memory over speed).
        return ("exact", job.each(plan, rows) if job.deltas[0].numel() <= 1 << 25 else [plan(d) for d in rows])
    return ("threshold", _column(job.each(lambda d: steps.magnitude_threshold(d, density), rows)))


def _column(thresholds: Any) -> torch.Tensor:
    """Per-input thresholds as an ``[n, 1]`` fp32 column that broadcasts over ``[n, len]`` deltas."""
    return torch.tensor(list(thresholds), dtype=torch.float32).reshape(-1, 1)


def apply_trim(job: TensorJob, ctx: Any, sl: slice) -> torch.Tensor:
    """Trim the slice ``sl`` of every Δᵢ as ``prepare_trim`` decided."""
    if ctx is None:
        return job.deltas
    kind, per_input = ctx
    if kind == "exact":
        return torch.stack(
            [
                e[sl] if isinstance(e, torch.Tensor) else steps.position_trim(job.deltas[i], e, sl)
                for i, e in enumerate(per_input)
            ]
        )
    return steps.trim_by_threshold(job.deltas, per_input)


def combine(
    deltas: torch.Tensor, weights: torch.Tensor, *, consensus: bool, mode: str, normalize: bool, lambda_: float
) -> torch.Tensor:
    """Merge sparsified ``deltas`` ``[n, *shape]``; the rules of each ``mode``:

    * consensus, paper: sign elected on *unweighted* deltas; Σ wᵢmᵢΔᵢ, divided by the count Σ mᵢ when ``normalize``.
    * consensus, mergekit: sign elected on (and agreement judged by) *weighted* deltas; Σ wᵢmᵢΔᵢ, divided by
      Σ wᵢmᵢ when ``normalize``.
    * no consensus (both): Σ wᵢΔᵢ, divided by Σ wᵢ when ``normalize``.
    Then × λ. A zero divisor counts as 1, so entries nobody keeps merge to 0.
    """
    if consensus:
        weighted = None
        if mode == "mergekit":  # sign and agreement both on the weighted deltas wᵢΔᵢ
            weighted = deltas * weights.reshape(-1, *([1] * (deltas.dim() - 1)))
            mask = steps.agreement_mask(weighted, steps.elect_sign(weighted))
        else:
            mask = steps.agreement_mask(deltas, steps.elect_sign(deltas))
        divide_by = "weight" if mode == "mergekit" else "count"
        reduce = "mean" if normalize else "sum"
        merged = steps.disjoint_merge(deltas, mask, weights, reduce, divide_by, weighted=weighted)
    else:
        merged = steps.weighted_total(deltas, weights, normalize)
    return merged * lambda_ if lambda_ != 1 else merged


class Thresholds(ModelPass):
    """Per-input whole-model trim thresholds, given to every tensor's job as ``job.thresholds``."""

    def __init__(self, values: list[float]) -> None:
        self.values = tuple(values)

    def fields(self, name: str) -> dict:
        return {"thresholds": self.values}


def global_thresholds(plan: Any, density: float, progress: ProgressFn) -> Thresholds:
    """Per input, the magnitude t such that |Δᵢ| ≥ t keeps ``density`` of the whole model's entries.

    One streaming pass over every tensor builds a histogram of the top 16 bits of each |Δ| in fp32 (sign,
    exponent, 7 mantissa bits): the threshold is exact to bf16 resolution, so slightly more than k entries may pass.
    """
    n = len(plan.sources)
    hist = [torch.zeros(1 << 15, dtype=torch.int64) for _ in range(n)]
    total = 0
    for k, t in enumerate(plan.tensors):
        progress("trim thresholds", k, len(plan.tensors))
        total += t.numel
        if not t.users:
            continue
        base = plan.base.get(t.name)
        for i in t.users:
            bits = plan.sources[i].delta(t.name, base).abs().reshape(-1).view(torch.int32) >> 16
            hist[i] += torch.bincount(bits, minlength=1 << 15)
    progress("trim thresholds", len(plan.tensors), len(plan.tensors))
    keep = max(1, int(density * total))
    out = []
    for h in hist:
        from_top = torch.cumsum(h.flip(0), 0)  # entries at or above each bin, highest bin first
        idx = int(torch.searchsorted(from_top, keep))
        b = (1 << 15) - 1 - min(idx, (1 << 15) - 1)
        out.append(float(torch.tensor([b << 16], dtype=torch.int32).view(torch.float32)))
    return Thresholds(out)


def _ties_model_pass(plan: Any, p: TiesParams, progress: ProgressFn) -> Thresholds | None:
    return global_thresholds(plan, p.density, progress) if p.trim_scope == "global" else None


def _ties_prepare(job: TensorJob, p: TiesParams) -> Any:
    return prepare_trim(job, p.density, p.mode, p.trim_scope, p.tie_break)


def _ties_apply(job: TensorJob, p: TiesParams, ctx: Any, sl: slice) -> torch.Tensor:
    trimmed = apply_trim(job, ctx, sl)
    return combine(trimmed, job.weights, consensus=True, mode=p.mode, normalize=p.normalize, lambda_=p.lambda_)


TIES = Steps(_ties_prepare, _ties_apply, lambda p: p.trim_scope != "global" and p.density < 1, _ties_model_pass)


@merge_method("ties", TiesParams, steps=TIES, low_precision=True)
def ties(job: TensorJob, p: TiesParams) -> torch.Tensor:
    """TIES: Δ = λ · disjoint_merge(elect_sign(trim(Δᵢ))).

    * **paper** (Yadav et al.; also PEFT's per-tensor variant): trim keeps |Δᵢ| ≥ the k-th largest magnitude,
      k = max(1, ⌊density·numel⌋) (``kthvalue``; ties at the threshold all kept), per tensor or — with
      ``trim_scope: global`` — over the whole model using the engine's per-input thresholds ``job.thresholds``.
      Sign elected from Σᵢ of the *unweighted* trimmed deltas (+ where the sum ≥ 0). Disjoint **mean**: Σ wᵢmᵢΔᵢ
      over the agreeing non-zero entries, divided by their count (``normalize: false`` → the sum, as FusionBench's
      ``merge_func: sum``). User weights scale each task vector; weights 1 give the paper exactly.
    * **mergekit** (0.1.5, bit-exact): per-tensor trim of exactly k entries by ``argsort(|Δ|, descending)`` order;
      sign elected on *weighted* deltas wᵢΔᵢ (sum ≥ 0 counts as +); agreement judged on wᵢΔᵢ; Σ wᵢmᵢΔᵢ divided by
      Σ wᵢmᵢ when ``normalize`` (a weighted disjoint mean), else the sum. Which entries tied at the k-th
      magnitude survive is argsort's choice: where that magnitude is 0 they are zeros (kept or dropped alike),
      elsewhere ``merge/sortpath.py`` replays the partitions of torch's CPU sort that decide them (O(n), the same
      set; the real sort where the replay cannot follow). ``tie_break: position`` keeps the same exactly-k rule
      but takes the tied entries in index order instead (what a stable sort keeps): a little faster, and
      different from mergekit in which of the tied entries survive.
    Then × λ (no rescale). Defaults: density 0.2 (paper's k = 20 %; mergekit's own default 1.0 disables trimming),
    λ 1 (mergekit's default; the paper searched 0.8–2.5), normalize true.
    Edge cases: density 1 keeps everything (TIES then only resolves sign conflicts); all-zero deltas → 0 (zeros
    never agree; a zero divisor counts as 1); one input → the trimmed Δ₁ in paper mode (w₁·trim(Δ₁)), and in
    mergekit mode trim(Δ₁) for any w₁ > 0. Entries no input keeps merge to 0. Compute dtype fp32.
    The two modes differ in general: with weights ≠ 1 the elected sign and the divisor change (see the tests).
    Reference: Yadav et al. 2023, "TIES-Merging" (arXiv:2306.01708); mergekit ``ties``.
    """
    return whole(job, p, TIES)


@dataclass(frozen=True)
class MagnitudePruneParams:
    density: float = 0.2
    lambda_: float = 1.0
    mode: str = "paper"
    normalize: bool = False
    tie_break: str = "argsort"

    def __post_init__(self) -> None:
        family.check_density("magnitude_prune", self.density)
        family.check_number("magnitude_prune", "lambda", self.lambda_)
        family.check_mode("magnitude_prune", self.mode)
        family.check_optional_bool("magnitude_prune", "normalize", self.normalize)
        check_tie_break("magnitude_prune", self.tie_break, self.mode)


def _prune_apply(job: TensorJob, p: MagnitudePruneParams, ctx: Any, sl: slice) -> torch.Tensor:
    trimmed = apply_trim(job, ctx, sl)
    return combine(trimmed, job.weights, consensus=False, mode=p.mode, normalize=p.normalize, lambda_=p.lambda_)


PRUNE = Steps(
    lambda job, p: prepare_trim(job, p.density, p.mode, tie_break=p.tie_break),
    _prune_apply,
    lambda p: p.density < 1,
)


@merge_method("magnitude_prune", MagnitudePruneParams, steps=PRUNE)
def magnitude_prune(job: TensorJob, p: MagnitudePruneParams) -> torch.Tensor:
    """Magnitude pruning then task arithmetic: Δ = λ · Σ wᵢ·trim(Δᵢ) (÷ Σ wᵢ when ``normalize``). No sign election.

    Trim per tensor to the top ``density`` fraction of |Δᵢ|: paper mode by ``kthvalue`` threshold (ties kept),
    mergekit mode exactly k = max(1, ⌊density·numel⌋) entries in ``argsort`` order (mergekit's ``magnitude``
    sparsifier with task-arithmetic merging; ``tie_break: position`` takes ties at the k-th magnitude in index
    order, as in ``ties``). No rescale. Defaults density 0.2, λ 1, normalize false.
    Edge cases: density 1 → task arithmetic; all-zero deltas → 0; one input at weight 1 → trim(Δ₁).
    Compute dtype fp32. Reference: the "trim" step of TIES (Yadav et al. 2023); mergekit ``sparsify.magnitude``.
    """
    return whole(job, p, PRUNE)
