"""Small named, pure steps the merge-method families are built from: trim, elect a sign, disjoint merge, drop, rescale.

Every step takes fp32 tensors and returns new tensors; randomness comes only from the ``rng`` argument.
"""

from __future__ import annotations

import torch

# --- trimming by magnitude ----------------------------------------------------------------------------------------


def keep_count(density: float, numel: int) -> int:
    """How many entries a ``density`` keeps: ``max(1, int(density·numel))`` (mergekit's rule), 0 for empty."""
    return 0 if numel == 0 else min(numel, max(1, int(density * numel)))


def kth_largest_abs(x: torch.Tensor, k: int) -> float:
    """The exact k-th largest |x| (1 ≤ k ≤ numel) by radix select on fp32 bit patterns: a histogram of the top
    16 bits, then of the low 16 bits inside the one bin that holds the answer — O(n), no sort (≈2× faster than
    ``kthvalue`` here). Non-negative fp32 values order like their int32 bit patterns."""
    bits = x.detach().abs().reshape(-1).float().view(torch.int32)
    hi = bits >> 16
    from_top = torch.cumsum(torch.bincount(hi, minlength=1 << 15).flip(0), 0)
    i = int(torch.searchsorted(from_top, k))  # first bin (from the top) reaching k entries
    b = (1 << 15) - 1 - i
    above = int(from_top[i - 1]) if i > 0 else 0
    low = torch.bincount(bits[hi == b] & 0xFFFF, minlength=1 << 16)
    j = int(torch.searchsorted(torch.cumsum(low.flip(0), 0), k - above))
    v = (b << 16) | ((1 << 16) - 1 - j)
    return float(torch.tensor([v], dtype=torch.int32).view(torch.float32))


def magnitude_threshold(delta: torch.Tensor, density: float) -> float:
    """The k-th largest |Δ| with k = ``keep_count`` (exact, by radix select: O(n), not a full sort)."""
    k = keep_count(density, delta.numel())
    if k == 0:
        return float("inf")
    return kth_largest_abs(delta, k)


def trim_by_threshold(delta: torch.Tensor, threshold: float) -> torch.Tensor:
    """Keep entries with |Δ| ≥ ``threshold`` (ties at the threshold are all kept), zero the rest."""
    return torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta))


def trim_magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Paper trim of one tensor: keep the top ``density`` fraction of |Δ| via a ``kthvalue`` threshold.

    Entries tied with the k-th largest magnitude are all kept, so slightly more than k may survive.
    """
    if density >= 1:
        return delta.clone()
    return trim_by_threshold(delta, magnitude_threshold(delta, density))


def trim_magnitude_exact(delta: torch.Tensor, density: float) -> torch.Tensor:
    """mergekit-compatible trim: exactly k entries, ties broken like ``argsort(|Δ|, descending=True)[:k]``."""
    if density >= 1:
        return delta.clone()
    flat = delta.reshape(-1)
    mask = torch.zeros_like(flat)
    mask[torch.argsort(flat.abs().float(), descending=True)[: keep_count(density, flat.numel())]] = 1
    return delta * mask.reshape_as(delta)


def breadcrumbs_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs: drop the top ``gamma`` fraction of |Δ| (outliers) and the smallest, keeping ``density``.

    With n = numel, ``n_top = int(gamma·n)``, ``target = int(density·n)``, ``n_bot = max(0, n − target − n_top)``:
    keep ascending-|Δ| ranks ``[n_bot, n_bot + target)``. When ``target + n_top > n`` fewer outliers are dropped so
    that ``density`` is honoured. ``gamma·n < 1`` simply drops no outlier (no zeroing). Returns a 0/1 fp32 mask.
    """
    n = delta.numel()
    if density >= 1:
        return torch.ones_like(delta)
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    order = torch.sort(delta.abs().reshape(-1).float(), descending=False).indices
    mask = torch.zeros(n, dtype=delta.dtype)
    mask[order[n_bot : n_bot + target]] = 1
    return mask.reshape_as(delta)


# --- random dropping (DARE, DELLA) -------------------------------------------------------------------------------


def bernoulli_mask(probs: torch.Tensor, rng: torch.Generator | None) -> torch.Tensor:
    """A 0/1 fp32 mask with P(1) = ``probs`` elementwise, drawn from ``rng``."""
    return torch.bernoulli(probs.float(), generator=rng)


def rescale_inverse_prob(delta: torch.Tensor, mask: torch.Tensor, keep_prob: torch.Tensor | float) -> torch.Tensor:
    """Paper rescale: survivors divided by their keep probability (DARE: 1/(1−p)), unbiased in expectation."""
    return delta * mask / keep_prob


def rescale_l1(delta: torch.Tensor, mask: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """mergekit rescale: scale the survivors so the tensor's L1 norm is unchanged (no-op if either norm < eps)."""
    masked = delta * mask
    before = delta.abs().sum()
    after = masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def della_keep_probs(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA MagPrune keep probabilities: linear in the magnitude rank within each row, in [density−ε, density+ε].

    Rows are the first axis of a ≥ 2-D tensor (the rest flattened); a 1-D tensor is one row. Ranks come from a
    double ``argsort`` (ties broken by position, as mergekit). A row of one entry gets ``density``.
    """
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    length = rows.shape[1]
    if length < 2:
        return torch.full_like(delta, density)
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1, descending=False), dim=1).float()  # 0 … length−1
    probs = (density - epsilon) + (ranks / (length - 1)) * 2 * epsilon
    return probs.reshape_as(delta)


# --- sign election and disjoint merge ----------------------------------------------------------------------------


def elect_sign(deltas: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Elected sign per entry: sign of Σᵢ (wᵢ)Δᵢ ("mass"), +1 where the sum is ≥ 0 (mergekit's convention).

    ``deltas`` is ``[n, *shape]``; pass ``weights`` to elect on weighted deltas (mergekit), omit for the paper.
    """
    mass = (deltas * _expand(weights, deltas)).sum(dim=0) if weights is not None else deltas.sum(dim=0)
    return torch.where(mass >= 0, 1.0, -1.0)


def agreement_mask(deltas: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """``[n, *shape]`` 0/1 mask of entries whose sign equals the elected one; zeros never agree."""
    return (torch.sign(deltas) == sign).to(deltas.dtype)


def disjoint_merge(
    deltas: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor | None, reduce: str, divide_by: str = "count"
) -> torch.Tensor:
    """Merge the masked entries: ``reduce="sum"`` → Σ wᵢmᵢΔᵢ; ``"mean"`` → that sum over a divisor.

    ``divide_by="count"`` divides by Σ mᵢ (paper, PEFT); ``"weight"`` by Σ wᵢmᵢ (mergekit); a zero divisor becomes 1.
    Operation order mirrors mergekit's (weight, mask, sum, divide) so mergekit mode is bit-exact.
    """
    w = _expand(weights, deltas) if weights is not None else None
    weighted = deltas * w if w is not None else deltas
    total = (weighted * mask).sum(dim=0)
    if reduce == "sum":
        return total
    divisor = (w * mask).sum(dim=0) if (divide_by == "weight" and w is not None) else mask.sum(dim=0)
    divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return total / divisor


def weighted_total(deltas: torch.Tensor, weights: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Σ wᵢΔᵢ, divided by Σ wᵢ when ``normalize`` (a |Σ wᵢ| < 1e-8 divisor counts as 1, as in mergekit)."""
    total = (deltas * _expand(weights, deltas)).sum(dim=0)
    if normalize:
        s = weights.sum()
        total = total / (s if s.abs() >= 1e-8 else torch.ones_like(s))
    return total


def _expand(weights: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    assert weights is not None
    return weights.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))
