"""sortpath.rank_mask: the ranks an unstable torch.sort gives, without the full sort, bit for bit."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from skillgraft.merge import sortpath, steps


@pytest.fixture(autouse=True)
def replay_small_tensors(monkeypatch):  # noqa: ANN001, ANN201
    """rank_mask sorts tensors under REPLAY_MIN entries; the tests replay from 17 entries up."""
    monkeypatch.setattr(sortpath, "REPLAY_MIN", sortpath.THRESHOLD + 1)


def sorted_mask(w: torch.Tensor, start: int, stop: int, descending: bool) -> torch.Tensor:
    mask = torch.zeros(w.numel(), dtype=torch.bool)
    mask[torch.sort(w, descending=descending).indices[start:stop]] = True
    return mask


def test_replay_is_available_here() -> None:
    # CI and this machine run Linux x86-64 torch wheels, whose CPU sort the replay follows; were the self-check
    # to fail, rank_mask would still be right (it sorts), but every mergekit TIES on dense deltas would be slow.
    assert sortpath.replay_available()


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(1, 4000),
    levels=st.integers(1, 60),
    a=st.floats(0, 1),
    b=st.floats(0, 1),
    descending=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_rank_mask_is_the_sorts_set(n: int, levels: int, a: float, b: float, descending: bool, seed: int) -> None:
    """Few distinct values: most ranks sit inside runs of equal keys, where only the sort's own order decides."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(0, levels, (n,), generator=g).float().mul_(0.25)
    start, stop = sorted((int(a * n), int(b * n)))
    assert torch.equal(
        sortpath.rank_mask(w, start, stop, descending=descending), sorted_mask(w, start, stop, descending)
    )


def test_dense_bf16_delta_at_the_median() -> None:
    """The case the replay is for: |Δ| of a dense bf16 delta, k = half, ~10⁴ entries tied at the k-th value."""
    g = torch.Generator().manual_seed(0)
    delta = (torch.randn(1 << 20, generator=g) * 0.02).bfloat16()
    w = delta.float().abs()
    k = w.numel() // 2
    kth = torch.kthvalue(w, w.numel() - k + 1).values
    assert int((w == kth).sum()) > 1000 and int((w > kth).sum()) < k  # the kept set cuts through a run of ties
    expected = sorted_mask(w, 0, k, True)
    assert torch.equal(steps.exact_keep_mask(delta, 0.5), expected)
    assert torch.equal(sortpath.rank_mask(w, 0, k, descending=True), expected)
    lo, hi = w.numel() // 10, w.numel() - w.numel() // 100  # breadcrumbs' ranks: both ends cut through ties
    assert torch.equal(sortpath.rank_mask(w, lo, hi, descending=False), sorted_mask(w, lo, hi, False))


def test_nan_keys_fall_back_to_the_sort() -> None:
    w = torch.tensor([0.5, float("nan"), 0.5, 0.25] * 10)
    for start, stop in ((0, 7), (3, 30)):
        for descending in (True, False):
            got = sortpath.rank_mask(w, start, stop, descending=descending)
            assert torch.equal(got, sorted_mask(w, start, stop, descending))


def test_depth_limit_falls_back_to_the_sort(monkeypatch) -> None:  # noqa: ANN001
    """Where the replay cannot decide (a part would reach std::sort's heapsort), the answer is the real sort's."""
    calls = []
    monkeypatch.setattr(sortpath, "_replayed_mask", lambda *a: calls.append(a) or None)
    w = torch.randint(0, 5, (500,), generator=torch.Generator().manual_seed(1)).float()
    assert torch.equal(sortpath.rank_mask(w, 0, 250, descending=True), sorted_mask(w, 0, 250, True))
    assert calls  # the replay was asked, declined, and the sort answered


def test_edges_and_bad_input() -> None:
    w = torch.arange(40, dtype=torch.float32) % 3
    assert not sortpath.rank_mask(w, 5, 5, descending=True).any()
    assert sortpath.rank_mask(w, 0, 40, descending=True).all()
    assert torch.equal(sortpath.rank_mask(w, 0, 12, descending=True), sorted_mask(w, 0, 12, True))
    try:
        sortpath.rank_mask(w.double(), 0, 3, descending=True)
    except ValueError as e:
        assert "float32" in str(e)
    else:
        raise AssertionError("a float64 tensor was accepted")


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(20_000, 200_000),
    levels=st.integers(1, 400),
    a=st.floats(0, 1),
    b=st.floats(0, 1),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    descending=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_long_parts_in_every_source_dtype(
    n: int, levels: int, a: float, b: float, dtype: torch.dtype, descending: bool, seed: int
) -> None:
    """Parts of many scan blocks, signed keys read as |w| from fp32, bf16 (bits shifted) and fp16 (cast) sources,
    both zeros (+0 and −0 tie under the sort's comparison)."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randint(0, 2 * levels + 1, (n,), generator=g) - levels).float().mul_(0.5 / levels).to(dtype)
    w[torch.randint(0, n, (n // 50,), generator=g)] = -0.0
    start, stop = sorted((int(a * n), int(b * n)))
    got = sortpath.rank_mask(w, start, stop, descending=descending, magnitude=True)
    assert torch.equal(got, sortpath._sorted_mask(w, start, stop, descending, True))
    signed = w.float()
    got = sortpath.rank_mask(signed, start, stop, descending=descending)
    assert torch.equal(got, sorted_mask(signed, start, stop, descending))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(17, 30_000),
    levels=st.integers(1, 300),
    density=st.floats(0.01, 0.99),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**31),
)
def test_rank_trim_is_delta_times_the_mask(n: int, levels: int, density: float, dtype: torch.dtype, seed: int) -> None:
    """TIES's trimmed Δ: Δ × (0/1 mask) bit for bit — kept entries unchanged, dropped ones zeros of their sign."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randint(0, 2 * levels + 1, (n,), generator=g) - levels).float().mul_(0.01 / levels).to(dtype)
    k = max(1, int(density * n))
    mask = sortpath._sorted_mask(w, 0, k, True, True)
    want = w * mask.view(torch.uint8).to(dtype)
    got = sortpath.rank_trim(w, 0, k, descending=True, magnitude=True)
    assert got.dtype == dtype and torch.equal(got.view(torch.uint8), want.view(torch.uint8))  # signs of zeros too


def test_rank_trim_with_an_infinite_entry_multiplies() -> None:
    w = torch.tensor([0.5, -0.25, float("inf"), -0.5, 0.25] * 20)
    got = sortpath.rank_trim(w, 0, 30, descending=True, magnitude=True)
    want = w * sortpath._sorted_mask(w, 0, 30, True, True).float()
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())
