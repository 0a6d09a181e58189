"""Small named, pure steps the merge-method families are built from: trim, elect a sign, disjoint merge, drop, rescale.

Every step takes fp32 tensors and returns new tensors; randomness comes only from the ``rng`` argument.
"""

from __future__ import annotations

import math

import torch

from skillgraft.merge import sortpath

# --- trimming by magnitude ----------------------------------------------------------------------------------------


def keep_count(density: float, numel: int) -> int:
    """How many entries a ``density`` keeps: ``max(1, int(density·numel))`` (mergekit's rule), 0 for empty."""
    return 0 if numel == 0 else min(numel, max(1, int(density * numel)))


SLICE = 1 << 18  # entries per slice: temporaries (1 MB per input row) that stay in L2 and that malloc reuses


def kth_largest_abs(x: torch.Tensor, k: int) -> float:
    """The exact k-th largest |x| (1 ≤ k ≤ numel), streamed in slices, without sorting ``x``.

    A sorted strided sample of 2¹⁶ entries brackets the answer [lo, hi] (± 4 binomial standard deviations);
    one pass counts |x| > hi and |x| in [lo, hi]; when the bracket is one value (bf16 deltas: often 0 or one ulp)
    that is the answer, else a second pass collects the candidates, whose own k-th value is exact. Should the
    bracket miss (rare, adversarial layouts) or hold over 1/8 of the entries, radix select decides: histograms
    of the top and then the low 16 bits of the fp32 patterns (non-negative fp32 values order like their int32
    bit patterns).
    """
    flat = x.detach().reshape(-1)
    n = flat.numel()
    if n > 1 << 18:
        step = n // (1 << 16)
        sample = flat[::step].float().abs().sort(descending=True).values
        m = sample.numel()
        margin = 4 * math.sqrt(m * (k / n) * (1 - k / n)) + 8
        hi = float(sample[max(0, math.floor(k / n * m - margin))])
        lo = float(sample[min(m - 1, math.ceil(k / n * m + margin))])
        above = at_least_lo = 0
        for part in flat.split(SLICE):
            a = part.float().abs()
            above += int(mask01(torch.gt, a, hi).sum())  # fp32 sums of ≤ SLICE ones: exact
            at_least_lo += int(mask01(torch.ge, a, lo).sum())
        inside = at_least_lo - above  # entries in [lo, hi]
        need = k - above
        if 1 <= need <= inside:
            if lo == hi:  # one value (bf16 deltas: often 0 or one ulp) holds the k-th rank
                return hi
            if inside <= n // 8:
                got = torch.cat([a[(a >= lo) & (a <= hi)] for a in (p.float().abs() for p in flat.split(SLICE))])
                return float(torch.kthvalue(got, got.numel() - need + 1).values)
    return _radix_kth_largest_abs(flat, k)


def _radix_kth_largest_abs(flat: torch.Tensor, k: int) -> float:
    hist = torch.zeros(1 << 15, dtype=torch.int64)
    for part in flat.split(SLICE):
        hist += torch.bincount(part.float().abs().view(torch.int32) >> 16, minlength=1 << 15)
    from_top = torch.cumsum(hist.flip(0), 0)
    i = int(torch.searchsorted(from_top, k))  # first bin (from the top) reaching k entries
    b = (1 << 15) - 1 - i
    above = int(from_top[i - 1]) if i > 0 else 0
    low = torch.zeros(1 << 16, dtype=torch.int64)
    for part in flat.split(SLICE):
        bits = part.float().abs().view(torch.int32)
        low += torch.bincount(bits[(bits >> 16) == b] & 0xFFFF, minlength=1 << 16)
    j = int(torch.searchsorted(torch.cumsum(low.flip(0), 0), k - above))
    v = (b << 16) | ((1 << 16) - 1 - j)
    return float(torch.tensor([v], dtype=torch.int32).view(torch.float32))


def magnitude_threshold(delta: torch.Tensor, density: float) -> float:
    """The k-th largest |Δ| with k = ``keep_count`` (exact, by radix select: O(n), not a full sort)."""
    k = keep_count(density, delta.numel())
    if k == 0:
        return float("inf")
    return kth_largest_abs(delta, k)


def mask01(compare, a: torch.Tensor, b: torch.Tensor | float) -> torch.Tensor:  # noqa: ANN001
    """``compare(a, b)`` (``torch.ge``, ``torch.gt``, …) as a 0/1 mask in ``a``'s shape and floating dtype (fp32
    for integer ``a``), so masked products stay in the deltas' dtype.

    Written straight into a float tensor: on CPU a bool mask, ``torch.where`` with scalars and bool × float all take
    slow non-vectorised paths (5–12× slower than one fp32 op per entry); the comparison with an fp32 ``out``
    runs as fast as a multiply.
    """
    return compare(a, b, out=torch.empty(a.shape, dtype=a.dtype if a.is_floating_point() else torch.float32))


def trim_by_threshold(delta: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    """Keep entries with |Δ| ≥ ``threshold`` (ties at the threshold are all kept), zero the rest. A tensor
    threshold broadcasts (``[n, 1]`` for per-input thresholds of stacked ``[n, len]`` deltas). Dropped negative
    entries become −0.0, which every later step treats as 0."""
    return delta * mask01(torch.ge, delta.abs(), threshold)


def exact_keep_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Flat boolean mask of the k = ``keep_count`` entries that ``argsort(|Δ|, descending=True)[:k]`` picks.

    mergekit's rule, ties included: torch's CPU argsort is unstable and bf16 deltas have many equal magnitudes,
    so which tied entries are kept is the sort's choice. ``sortpath.rank_mask`` reproduces that choice without
    the full sort (a replay of the partitions that decide it), or sorts where it cannot.
    """
    k = keep_count(density, delta.numel())
    return sortpath.rank_mask(delta.reshape(-1), 0, k, descending=True, magnitude=True)


def exact_trim_plan(delta: torch.Tensor, density: float) -> tuple[float, int, list[int]] | torch.Tensor:
    """mergekit's exactly-k trim of one Δ (``argsort`` order, ties included): a ``position_trim`` plan where the
    k-th largest |Δ| is 0 (the tied entries are zeros: kept or dropped, the same numbers), else the trimmed flat Δ
    itself (Δ × the keep mask as 0/1, bit for bit: ``sortpath.rank_trim``).

    The trimmed Δ is right in every case; the plan is the cheaper answer for sparse deltas. A strided sample that
    holds clearly more nonzeros than the density keeps skips looking for the k-th magnitude (dense deltas)."""
    k = keep_count(density, delta.numel())
    flat = delta.reshape(-1)
    trimmed = lambda: sortpath.rank_trim(flat, 0, k, descending=True, magnitude=True)  # noqa: E731
    if flat.numel() > 1 << 18:
        sample = flat[:: flat.numel() // (1 << 16)]
        if int(torch.count_nonzero(sample)) > 1.25 * sample.numel() * k / flat.numel() + 64:
            return trimmed()
    t = kth_largest_abs(delta, k) if k else float("inf")
    if t == 0:
        return position_trim_plan(delta, density, t)
    return trimmed()


def position_trim_plan(delta: torch.Tensor, density: float, t: float | None = None) -> tuple[float, int, list[int]]:
    """What ``position_trim`` needs for one flat Δ: the k-th largest |Δ| t (k = ``keep_count``; pass it when
    known), how many entries equal to t to keep (k − #{|Δ| > t}), and the count of entries equal to t before each
    ``SLICE`` block."""
    k = keep_count(density, delta.numel())
    t = kth_largest_abs(delta, k) if t is None else t
    greater, before = 0, [0]
    for part in delta.reshape(-1).split(SLICE):
        a = part.float().abs()
        greater += int(mask01(torch.gt, a, t).sum())  # fp32 sums of ≤ SLICE ones: exact
        before.append(before[-1] + int(mask01(torch.eq, a, t).sum()))
    return t, k - greater, before


def position_trim(delta: torch.Tensor, plan: tuple[float, int, list[int]], sl: slice) -> torch.Tensor:
    """Exactly-k trim of the flat slice ``sl`` of one Δ (``delta`` holds that slice): keep |Δ| > t, and of the
    entries equal to t the first ``m`` in index order — what a *stable* descending sort's first k would keep.
    ``sl.start`` must be a multiple of ``SLICE`` (the plan counts ties per block)."""
    t, m, before = plan
    if sl.start % SLICE:
        raise ValueError(f"position_trim: slice start {sl.start} is not a multiple of {SLICE}")
    a = delta.abs()
    keep = mask01(torch.gt, a, t)
    tie = mask01(torch.eq, a, t)
    rank = torch.cumsum(tie, 0, dtype=torch.int64).add_(before[sl.start // SLICE])  # 1-based rank of each tie
    keep.add_(tie.mul_(mask01(torch.le, rank, m)))
    return delta * keep


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
    keep = sortpath.rank_mask(delta.reshape(-1), n_bot, n_bot + target, descending=False, magnitude=True)
    return as01(keep, delta.dtype).reshape_as(delta)


# --- random dropping (DARE, DELLA) -------------------------------------------------------------------------------


def bernoulli_mask(probs: torch.Tensor, rng: torch.Generator | None) -> torch.Tensor:
    """A 0/1 fp32 mask with P(1) = ``probs`` elementwise, drawn from ``rng``."""
    return torch.bernoulli(probs.float(), generator=rng)


def block_keep(seed: int, start: int, stop: int, density: float) -> torch.Tensor:
    """A uint8 0/1 keep mask, P(1) = ``density``, for entries ``[start, stop)`` of a counter-based stream.

    Block b (entries ``[b·SLICE, (b+1)·SLICE)``) comes from its own generator, seeded by mixing ``seed`` and b
    (splitmix64), so slices that start on a block boundary get the same draws whatever the slicing, order or
    thread; a block cut short (the tensor's end) draws only its own length. Each int64 ``random_()`` draw (63
    random bits, two mt19937 outputs: 2× the throughput of ``rand``) decides two entries: its low 32-bit word is
    uniform over int32 and keeps its entry when below ⌊density·2³²⌋ − 2³¹; its high word is uniform over
    [0, 2³¹) and keeps when below ⌊density·2³¹⌋. So P(keep) is ``density`` to within 2⁻³¹.
    """
    if start % SLICE:
        raise ValueError(f"block_keep: start {start} is not a multiple of {SLICE}")
    limits = torch.tensor([[math.floor(density * 2**32) - 2**31, math.floor(density * 2**31)]], dtype=torch.int32)
    out = torch.empty(stop - start, dtype=torch.uint8)
    for lo in range(start, stop, SLICE):
        n = min(SLICE, stop - lo)
        g = torch.Generator().manual_seed(_splitmix64(seed, lo // SLICE))
        words = torch.empty((n + 1) // 2, dtype=torch.int64).random_(generator=g).view(torch.int32).view(-1, 2)
        dest = out[lo - start : lo - start + n]
        if n % 2 == 0:
            torch.lt(words, limits, out=dest.view(-1, 2))
        else:
            dest.copy_(torch.lt(words, limits).view(-1)[:n])
    return out


def _splitmix64(seed: int, counter: int) -> int:
    """A 63-bit seed for block ``counter`` of stream ``seed`` (one splitmix64 step; distinct inputs, spread bits)."""
    z = (seed + (counter + 1) * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) >> 1


def as01(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A bool mask as 0/1 in ``dtype`` (through ``uint8``: 3× faster than ``bool.float()`` on CPU)."""
    return mask.view(torch.uint8).to(dtype)


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
    mass = sum0(deltas * _expand(weights, deltas)) if weights is not None else sum0(deltas)
    return torch.copysign(torch.ones(()), mass.add_(0.0))  # + 0.0 turns −0.0 into +0.0, so 0 elects +1


def agreement_mask(deltas: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """``[n, *shape]`` 0/1 mask of entries whose sign equals the elected one (Δ·sign > 0); zeros never agree."""
    return mask01(torch.gt, deltas * sign, 0.0)


def disjoint_merge(
    deltas: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor | None,
    reduce: str,
    divide_by: str = "count",
    weighted: torch.Tensor | None = None,
) -> torch.Tensor:
    """Merge the masked entries: ``reduce="sum"`` → Σ wᵢmᵢΔᵢ; ``"mean"`` → that sum over a divisor.

    ``divide_by="count"`` divides by Σ mᵢ (paper, PEFT); ``"weight"`` by Σ wᵢmᵢ (mergekit); a zero divisor becomes 1.
    Operation order mirrors mergekit's (weight, mask, sum, divide) so mergekit mode is bit-exact.
    """
    w = _expand(weights, deltas) if weights is not None else None
    if weighted is None:  # callers that already hold wᵢΔᵢ pass it
        weighted = deltas * w if w is not None else deltas
    total = sum0(weighted * mask)
    if reduce == "sum":
        return total
    if divide_by == "weight" and w is not None:
        divisor = sum0(w * mask)
        divisor.add_(mask01(torch.eq, divisor, 0.0))  # 0 → 1; any other value + 0 is itself
    else:
        divisor = sum0(mask).clamp_(min=1)  # a count: 0 → 1
    return total.div_(divisor)


def weighted_total(deltas: torch.Tensor, weights: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Σ wᵢΔᵢ, divided by Σ wᵢ when ``normalize`` (a |Σ wᵢ| < 1e-8 divisor counts as 1, as in mergekit)."""
    total = sum0(deltas * _expand(weights, deltas))
    if normalize:
        s = weights.sum()
        total = total / (s if s.abs() >= 1e-8 else torch.ones_like(s))
    return total


def sum0(x: torch.Tensor) -> torch.Tensor:
    """``x.sum(dim=0)``, bit for bit, faster for 16-bit ``x``: torch sums bf16/fp16 in fp32 and rounds once, and
    its 16-bit dim-0 reduction kernel is ~4× slower than these equivalents (two rows: one add, computed in fp32
    and rounded; more: the fp32 sum, rounded)."""
    if x.dtype not in (torch.bfloat16, torch.float16):
        return x.sum(dim=0)
    if x.shape[0] == 2:
        return x[0] + x[1]
    return x.float().sum(dim=0).to(x.dtype)


def _expand(weights: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    assert weights is not None
    return weights.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))
