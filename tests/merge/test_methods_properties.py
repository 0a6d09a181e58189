"""Properties of the merge methods checked on generated inputs (hypothesis, few examples each)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from skillgraft.merge.registry import TensorJob, get_method

FAST = settings(max_examples=30, deadline=None)
seeds = st.integers(min_value=0, max_value=2**31 - 1)


def run(method: str, deltas: torch.Tensor, weights: torch.Tensor, rng: torch.Generator | None = None, **kw: Any):
    info = get_method(method)
    return info.fn(TensorJob("t", deltas, weights, rng=rng), info.make_params(kw))


def randn(seed: int, *shape: int, scale: float = 0.01) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


@FAST
@given(seed=seeds, w=st.floats(min_value=-2, max_value=2, allow_nan=False), lam=st.floats(min_value=0.1, max_value=2))
def test_adding_then_removing_a_skill_returns_the_base(seed: int, w: float, lam: float) -> None:
    skill, other = randn(seed, 2, 8, 4)
    base = randn(seed + 1, 8, 4, scale=1.0)
    merged = base + run("task_arithmetic", torch.stack([other, skill, skill]), torch.tensor([1.0, w, -w]), lambda_=lam)
    expected = base + run("task_arithmetic", other.unsqueeze(0), torch.tensor([1.0]), lambda_=lam)
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-6)


@FAST
@given(seed=seeds, density=st.floats(min_value=0.05, max_value=0.95))
def test_dare_keeps_about_density_of_the_entries(seed: int, density: float) -> None:
    delta = randn(seed, 1, 100, 100) + 1e-3  # no exact zeros
    out = run("dare_linear", delta, torch.ones(1), torch.Generator().manual_seed(seed), density=density)
    kept = float((out != 0).float().mean())
    assert abs(kept - density) < 0.02  # 10,000 Bernoulli draws: sd ≤ 0.005


@settings(max_examples=10, deadline=None)
@given(seed=seeds, density=st.floats(min_value=0.2, max_value=0.9))
def test_dare_paper_rescale_is_unbiased(seed: int, density: float) -> None:
    delta = randn(seed, 1, 64, scale=1.0).abs()  # positive, so a missing rescale would show as a big bias
    k = 400
    outs = [
        run("dare_linear", delta, torch.ones(1), torch.Generator().manual_seed(seed * 1000 + i), density=density)
        for i in range(k)
    ]
    mean_sum = float(torch.stack(outs).sum(dim=1).mean())
    # Var(Σ of one draw) = Σ Δ²·(1 − p)/p; averaged over k draws → sd = sqrt(Σ Δ²·(1 − p)/(p·k)); allow 5 sd.
    # Without the 1/p rescale the mean would be p·ΣΔ, off by (1 − p)·ΣΔ ≈ 10–40 sd here.
    sd = (float((delta**2).sum()) * (1 - density) / (density * k)) ** 0.5
    assert abs(mean_sum - float(delta.sum())) < 5 * sd


@FAST
@given(seed=seeds, density=st.floats(min_value=0.05, max_value=0.95))
def test_dare_mergekit_rescale_keeps_l1_norm(seed: int, density: float) -> None:
    delta = randn(seed, 1, 32, 16)
    out = run(
        "dare_linear", delta, torch.ones(1), torch.Generator().manual_seed(seed), density=density, mode="mergekit"
    )
    torch.testing.assert_close(out.abs().sum(), delta.abs().sum(), rtol=1e-5, atol=0)


@FAST
@given(seed=seeds, n=st.integers(min_value=1, max_value=4))
def test_ties_density_one_all_positive_is_the_mean(seed: int, n: int) -> None:
    deltas = randn(seed, n, 5, 3).abs() + 1e-4
    weights = torch.rand(n, generator=torch.Generator().manual_seed(seed)) + 0.1
    # paper: weights scale the task vectors, mean over the count → Σ wᵢΔᵢ / n; equal weights → the plain mean
    paper = run("ties", deltas, weights, density=1.0)
    torch.testing.assert_close(paper, (weights[:, None, None] * deltas).sum(0) / n)
    torch.testing.assert_close(run("ties", deltas, torch.ones(n), density=1.0), deltas.mean(0))
    # mergekit: the weighted mean Σ wᵢΔᵢ / Σ wᵢ
    mk = run("ties", deltas, weights, density=1.0, mode="mergekit")
    torch.testing.assert_close(mk, (weights[:, None, None] * deltas).sum(0) / weights.sum())


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3000), st.floats(0.001, 1.0), st.integers(0, 2**31 - 1), st.booleans())
def test_radix_kth_largest_matches_kthvalue(n, frac, seed, bf16):
    from skillgraft.merge.steps import kth_largest_abs

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 10 ** float(torch.randint(-6, 2, (1,), generator=g))
    if bf16:  # many exact ties
        x = x.bfloat16().float()
    k = max(1, int(frac * n))
    assert kth_largest_abs(x, k) == float(torch.kthvalue(x.abs(), n - k + 1).values)


@pytest.mark.parametrize("layout", ["random", "sorted", "hidden_from_the_sample", "mostly_zero"])
@pytest.mark.parametrize("frac", [1e-6, 0.2, 0.5, 0.999])
def test_kth_largest_on_large_tensors(layout, frac):
    """Above 2¹⁸ entries a strided sample brackets the answer; layouts that fool the sample fall back to radix."""
    from skillgraft.merge import steps

    n = 700_001
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(n, generator=g) * 1e-3).bfloat16().float()  # bf16 deltas: large groups of equal magnitudes
    if layout == "sorted":
        x = x.sort().values
    elif layout == "mostly_zero":  # as real bf16 fine-tunes: most entries round to Δ = 0
        x[torch.rand(n, generator=g) < 0.78] = 0.0
    elif layout == "hidden_from_the_sample":  # every sampled position (multiples of the stride) holds 0
        x[:: n // (1 << 16)] = 0.0
    k = max(1, int(frac * n))
    expected = float(torch.kthvalue(x.abs(), n - k + 1).values)
    assert steps.kth_largest_abs(x, k) == expected
    assert steps._radix_kth_largest_abs(x, k) == expected


@pytest.mark.parametrize("density", [0.05, 0.3, 0.5, 0.9, 0.999])
def test_block_keep_fraction_and_slicing(density: float) -> None:
    """The engine's counter-based keep draws: P(keep) = density, and any block-aligned slicing (including an
    odd-length tail) gives the same mask as one call over the whole range."""
    from skillgraft.merge import steps

    n = 3 * steps.SLICE + 12345  # three full blocks and an odd tail
    whole = steps.block_keep(7, 0, n, density)
    assert whole.dtype == torch.uint8 and set(whole.unique().tolist()) <= {0, 1}
    sd = (density * (1 - density) / n) ** 0.5
    assert abs(float(whole.float().mean()) - density) < 6 * sd + 1e-6
    pieces = [steps.block_keep(7, lo, min(lo + steps.SLICE, n), density) for lo in range(0, n, steps.SLICE)]
    assert torch.equal(torch.cat(pieces), whole)
    assert torch.equal(steps.block_keep(7, steps.SLICE, n, density), whole[steps.SLICE :])
    assert not torch.equal(steps.block_keep(8, 0, n, density), whole)  # another seed, other draws
    with pytest.raises(ValueError, match="multiple"):
        steps.block_keep(7, 5, n, density)


def test_dare_with_per_input_generators_keeps_density() -> None:
    """With the engine's per-input generators each input draws its own counter-based mask."""
    deltas = randn(1, 2, 300, 300) + 1e-3
    rngs = tuple(torch.Generator().manual_seed(s) for s in (11, 12))
    info = get_method("dare_linear")
    out = [
        info.fn(
            TensorJob("t", deltas[i : i + 1], torch.ones(1), rng=rngs[i : i + 1]), info.make_params({"density": 0.3})
        )
        for i in range(2)
    ]
    kept = [float((o != 0).float().mean()) for o in out]
    assert all(abs(k - 0.3) < 0.01 for k in kept)  # 90,000 draws: sd 0.0015
    assert not torch.equal(out[0] != 0, out[1] != 0)


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("slice_size", [1 << 10, 1 << 18])
def test_position_trim_is_a_stable_sorts_top_k(density: float, slice_size: int, monkeypatch) -> None:
    """mergekit's exactly-k trim with ties broken by index: the set a stable descending sort's first k keeps,
    slice by slice (ties counted across slices) or whole; bf16 deltas have many ties at the k-th magnitude."""
    from skillgraft.merge import steps

    monkeypatch.setattr(steps, "SLICE", slice_size)
    g = torch.Generator().manual_seed(3)
    delta = (torch.randn(50_000, generator=g) * 1e-3).bfloat16().float()
    k = steps.keep_count(density, delta.numel())
    want = torch.zeros_like(delta)
    keep = torch.sort(delta.abs(), descending=True, stable=True).indices[:k]
    want[keep] = delta[keep]
    plan = steps.position_trim_plan(delta, density)
    assert int((delta.abs() == plan[0]).sum()) > 1  # the case that matters: several ties at the threshold
    whole = steps.position_trim(delta, plan, slice(0, delta.numel()))
    assert torch.equal(whole, want) and int((whole != 0).sum()) == k
    parts = [
        steps.position_trim(delta[lo : lo + slice_size], plan, slice(lo, min(lo + slice_size, delta.numel())))
        for lo in range(0, delta.numel(), slice_size)
    ]
    assert torch.equal(torch.cat(parts), want)


def test_tie_break_position_differs_from_argsort_only_at_ties() -> None:
    from skillgraft.merge import steps

    g = torch.Generator().manual_seed(4)
    deltas = (torch.randn(2, 64, 64, generator=g) * 1e-3).bfloat16().float()
    w = torch.tensor([0.6, 0.4])
    exact = run("ties", deltas, w, density=0.5, mode="mergekit")
    fast = run("ties", deltas, w, density=0.5, mode="mergekit", tie_break="position")
    ties = torch.zeros(64, 64, dtype=torch.bool)
    for d in deltas:
        t = steps.kth_largest_abs(d, steps.keep_count(0.5, d.numel()))
        ties |= d.abs() == t
    assert torch.equal(exact[~ties], fast[~ties]) and not torch.equal(exact, fast)
    continuous = torch.randn(2, 64, 64, generator=g)  # no ties: the same result
    assert torch.equal(
        run("ties", continuous, w, density=0.3, mode="mergekit"),
        run("ties", continuous, w, density=0.3, mode="mergekit", tie_break="position"),
    )
    with pytest.raises(Exception, match="mode 'mergekit'"):
        run("ties", deltas, w, density=0.5, tie_break="position")
    with pytest.raises(Exception, match="tie_break must be"):
        run("ties", deltas, w, density=0.5, mode="mergekit", tie_break="random")


@pytest.mark.parametrize("zeros", [0.3, 0.7])
def test_mergekit_trim_skips_the_sort_only_when_it_cannot_matter(zeros: float) -> None:
    """mode mergekit (argsort ties) equals argsort's exactly-k trim bit for bit, whether the k-th magnitude is 0
    (the fast path: tied entries are zeros) or not (the sort runs)."""
    from skillgraft.merge import steps
    from skillgraft.merge.methods.ties import combine

    g = torch.Generator().manual_seed(5)
    deltas = (torch.randn(2, 96, 64, generator=g) * 1e-3).bfloat16().float()
    deltas[torch.rand(deltas.shape, generator=g) < zeros] = 0.0
    w = torch.tensor([0.6, 0.4])
    got = run("ties", deltas, w, density=0.5, mode="mergekit")
    trimmed = torch.stack([d * steps.exact_keep_mask(d, 0.5).reshape_as(d) for d in deltas])
    want = combine(trimmed, w, consensus=True, mode="mergekit", normalize=True, lambda_=1.0)
    assert torch.equal(got, want)
    t = [steps.kth_largest_abs(d, steps.keep_count(0.5, d.numel())) for d in deltas]
    assert all(x == 0 for x in t) if zeros > 0.5 else all(x > 0 for x in t)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_sum0_is_torchs_dim0_sum_bit_for_bit(dtype, n):
    from skillgraft.merge.steps import sum0

    g = torch.Generator().manual_seed(n)
    # mixed scales, so the fp32 accumulation and the single rounding both matter
    x = (torch.randn(n, 4096, generator=g) * torch.logspace(-6, 2, 4096)).to(dtype)
    assert torch.equal(sum0(x), x.sum(dim=0))
