"""Each merge method on a tiny example whose expected numbers are derived by hand in the comments."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.testing import assert_close

from skillgraft.merge import steps
from skillgraft.merge.registry import TensorJob, get_method


def merge(method: str, deltas: list[list[float]], weights: list[float] | None = None, **kw: Any) -> torch.Tensor:
    job_kw = {k: kw.pop(k) for k in ("base", "rng", "thresholds", "stats", "layer", "num_layers") if k in kw}
    info = get_method(method)
    d = torch.tensor(deltas, dtype=torch.float32)
    w = torch.tensor(weights if weights is not None else [1.0] * len(deltas))
    return info.fn(TensorJob("t", d, w, **job_kw), info.make_params(kw))


def t(*v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


# --- TIES ----------------------------------------------------------------------------------------------------------
D1, D2 = [0.5, -0.1, 0.2, -0.4], [-0.3, 0.2, 0.1, -0.6]


def test_ties_paper_trim_elect_mean() -> None:
    # density 0.5 → k = 2 per input: Δ1 → [0.5, 0, 0, -0.4], Δ2 → [-0.3, 0, 0, -0.6]
    # unweighted sum [0.2, 0, 0, -1.0] → signs [+, +, +, −]
    # e0: only Δ1 (+0.5) agrees → 0.5/1; e1, e2: nothing kept → 0; e3: (−0.4 − 0.6)/2 = −0.5; then λ = 2
    assert_close(merge("ties", [D1, D2], density=0.5, **{"lambda": 2.0}), t(1.0, 0, 0, -1.0))


def test_ties_global_trim_uses_engine_thresholds() -> None:
    # thresholds 0.45, 0.25: Δ1 → [0.5, 0, 0, 0], Δ2 → [−0.3, 0, 0, −0.6]; sums [0.2, 0, 0, −0.6]
    # e0 +: 0.5; e3 −: −0.6/1
    out = merge("ties", [D1, D2], density=0.5, trim_scope="global", thresholds=(0.45, 0.25))
    assert_close(out, t(0.5, 0, 0, -0.6))


def test_ties_paper_and_mergekit_differ_each_matching_its_definition() -> None:
    # The REFERENCES point: PEFT/paper TIES and mergekit TIES give different numbers. density 1 (no trim),
    # Δ1 = [1, −2, 3, 0], Δ2 = [−3, 1, 3, 2], w = [1, 0.25].
    a, b, w = [1.0, -2.0, 3.0, 0.0], [-3.0, 1.0, 3.0, 2.0], [1.0, 0.25]
    # paper: unweighted sum [−2, −1, 6, 2] → signs [−, −, +, +]; Σ wᵢmᵢΔᵢ / count:
    #   e0: only Δ2 → 0.25·(−3)/1 = −0.75; e1: only Δ1 → −2; e2: (3 + 0.75)/2 = 1.875; e3: Δ1 = 0 never agrees → 0.5
    paper = merge("ties", [a, b], w, density=1.0, mode="paper")
    assert_close(paper, t(-0.75, -2.0, 1.875, 0.5))
    # mergekit: weighted Δ = [1, −2, 3, 0], [−0.75, 0.25, 0.75, 0.5]; sum [0.25, −1.75, 3.75, 0.5] → [+, −, +, +];
    #   Σ wᵢmᵢΔᵢ / Σ wᵢmᵢ: e0: 1/1 = 1; e1: −2/1; e2: 3.75/1.25 = 3; e3: 0.5/0.25 = 2
    mk = merge("ties", [a, b], w, density=1.0, mode="mergekit")
    assert_close(mk, t(1.0, -2.0, 3.0, 2.0))
    assert not torch.allclose(paper, mk)


def test_trim_tie_breaking_kthvalue_vs_argsort() -> None:
    # |Δ| = [0.3, 0.3, 0.3, 0.1], density 0.5 → k = 2. The kthvalue threshold (2nd largest = 0.3) keeps all three
    # tied entries; the argsort (mergekit) trim keeps exactly two of them.
    d = t(0.3, -0.3, 0.3, 0.1)
    assert_close(merge("magnitude_prune", [d.tolist()], [1.0], density=0.5), t(0.3, -0.3, 0.3, 0.0))
    exact = merge("magnitude_prune", [d.tolist()], [1.0], density=0.5, mode="mergekit")
    assert int((exact != 0).sum()) == 2 and set(exact.abs()[exact != 0].tolist()) == {0.30000001192092896}


def test_magnitude_prune_is_trim_then_weighted_sum() -> None:
    # trims as above: [0.5, 0, 0, −0.4] and [−0.3, 0, 0, −0.6]; 1·first + 0.5·second = [0.35, 0, 0, −0.7]
    assert_close(merge("magnitude_prune", [D1, D2], [1.0, 0.5], density=0.5), t(0.35, 0, 0, -0.7))


# --- DARE ----------------------------------------------------------------------------------------------------------
def test_dare_rescale_rules() -> None:
    d, m = t(1, 2, 3, 4), t(1, 0, 1, 0)
    # paper: survivors ÷ density (0.5) → [2, 0, 6, 0]
    assert_close(steps.rescale_inverse_prob(d, m, 0.5), t(2, 0, 6, 0))
    # mergekit: masked [1, 0, 3, 0] has L1 4, original 10 → × 2.5 → [2.5, 0, 7.5, 0]
    assert_close(steps.rescale_l1(d, m), t(2.5, 0, 7.5, 0))


def test_dare_linear_uses_rng_draws_in_input_order() -> None:
    deltas = [[1.0, -2.0, 3.0, 0.5, 0.25, -1.0], [0.5, 0.5, -1.0, 2.0, 1.0, 1.0]]
    out = merge("dare_linear", deltas, [1.0, 0.5], density=0.4, rng=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)  # the same draws by hand: one Bernoulli(0.4) mask per input, in order
    m1, m2 = (torch.bernoulli(torch.full((6,), 0.4), generator=g) for _ in range(2))
    assert_close(out, torch.tensor(deltas[0]) * m1 / 0.4 + 0.5 * torch.tensor(deltas[1]) * m2 / 0.4)


def test_dare_density_one_is_plain_merge() -> None:
    # nothing dropped. dare_linear: 1·[1, 2] + 0.5·[2, −2] = [2, 1]
    assert_close(merge("dare_linear", [[1.0, 2.0], [2.0, -2.0]], [1.0, 0.5], density=1.0), t(2.0, 1.0))
    # dare_ties (paper, sum): unweighted sums [3, 0] → [+, +] (0 counts as +); e0: 1 + 0.5·2 = 2;
    # e1: Δ1 = 2 agrees, Δ2 = −2 does not → 2
    out = merge("dare_ties", [[1.0, 2.0], [2.0, -2.0]], [1.0, 0.5], density=1.0, normalize=False)
    assert_close(out, t(2.0, 2.0))


# --- Breadcrumbs ---------------------------------------------------------------------------------------------------
B = [0.1, -0.9, 0.3, 0.5, -0.2, 0.05, 0.7, 0.4]


def test_breadcrumbs_drops_outliers_and_smallest() -> None:
    # n = 8, density 0.5 → keep 4, gamma 0.125 → n_top = 1, n_bot = 8 − 4 − 1 = 3.
    # ascending |Δ|: 0.05, 0.1, 0.2 | 0.3, 0.4, 0.5, 0.7 | 0.9 → keep the middle four
    assert_close(merge("breadcrumbs", [B], density=0.5, gamma=0.125), t(0, 0, 0.3, 0.5, 0, 0, 0.7, 0.4))


def test_breadcrumbs_small_gamma_does_not_zero_the_tensor() -> None:
    # gamma·n = 0.08 < 1 → n_top = 0, n_bot = 4: the top four survive (the old mergekit bug zeroed everything)
    assert_close(merge("breadcrumbs", [B], density=0.5, gamma=0.01), t(0, -0.9, 0, 0.5, 0, 0, 0.7, 0.4))


def test_breadcrumbs_ties_resolves_signs() -> None:
    # Δ2 = −Δ1/2 has the same ranks → same mask; kept sums have Δ1's sign, so only Δ1's entries agree:
    # breadcrumbs_ties (sum) = masked Δ1; breadcrumbs = masked Δ1 + masked Δ2 = masked Δ1 / 2
    b2 = [-x / 2 for x in B]
    masked = t(0, 0, 0.3, 0.5, 0, 0, 0.7, 0.4)
    assert_close(merge("breadcrumbs_ties", [B, b2], density=0.5, gamma=0.125), masked)
    assert_close(merge("breadcrumbs", [B, b2], density=0.5, gamma=0.125), masked / 2)


# --- DELLA ---------------------------------------------------------------------------------------------------------
def test_della_keep_probabilities_follow_magnitude_rank() -> None:
    # |Δ| = [0.1, 0.4, 0.3, 0.2] → ranks [0, 3, 2, 1]; p = (0.5 − 0.15) + rank/3 · 0.3 = [0.35, 0.65, 0.55, 0.45]
    assert_close(steps.della_keep_probs(t(0.1, -0.4, 0.3, 0.2), 0.5, 0.15), t(0.35, 0.65, 0.55, 0.45))


def test_della_paper_rescales_by_each_keep_probability() -> None:
    d = [0.1, -0.4, 0.3, 0.2]
    out = merge("della_linear", [d], density=0.5, epsilon=0.15, rng=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    p = t(0.35, 0.65, 0.55, 0.45)
    m = torch.bernoulli(p, generator=g)
    assert_close(out, torch.tensor(d) * m / p)  # survivors ÷ their own keep probability


# --- PCB, consensus --------------------------------------------------------------------------------------------------
def test_pcb_single_input_keeps_top_scores() -> None:
    # Δ = [4, −1, 2, 3], n = 1, pcb_ratio 0.5. |Δ| sorted [1, 2, 3, 4]; clamp to s[0] = 1 and s[int(4·0.9999) − 1]
    # = s[2] = 3 → Δ̂ = [3, −1, 2, 3]. intra = exp(minmax([3, 1, 2, 3])²) = exp([1, 0, 0.25, 1]);
    # inter = tanh(Δ·ΣΔ) = tanh([16, 1, 4, 9]); score = [e·tanh16, tanh1, e^¼·tanh4, e·tanh9]
    # ≈ [2.71828, 0.76159, 1.28317, 2.71828]; clamp from below at s[int(4·0.5)] = s[2] = e·tanh9 (< e·tanh16)
    # → minmax → [1, 0, 0, 0]. Merged = 1.2·Δ̂·s / s = [3.6, 0, 0, 0]
    assert_close(merge("pcb", [[4.0, -1.0, 2.0, 3.0]], pcb_ratio=0.5), t(3.6, 0, 0, 0))


def test_consensus_keeps_entries_two_tasks_need() -> None:
    # τ_MTL = [2.5, −1.8, 0.2, 3]. mᵢ = |τᵢ| ≥ 0.6·|τ_MTL − τᵢ|:
    #   τ1 = [1, 0.1, −1, 0]:  1≥0.9 ✓, 0.1≥1.14 ✗, 1≥0.72 ✓, 0≥1.8 ✗
    #   τ2 = [1, −2, 1, 0]:    1≥0.9 ✓, 2≥0.12 ✓,  1≥0.48 ✓, 0≥1.8 ✗
    #   τ3 = [0.5, 0.1, 0.2, 3]: 0.5≥1.2 ✗, 0.1≥1.14 ✗, 0.2≥0 ✓, 3≥0 ✓
    # votes [2, 1, 3, 1] ≥ 2 → keep e0, e2 of τ_MTL
    out = merge("consensus", [[1, 0.1, -1, 0], [1, -2, 1, 0], [0.5, 0.1, 0.2, 3]])
    assert_close(out, t(2.5, 0, 0.2, 0))


# --- SLERP, layer swap -----------------------------------------------------------------------------------------------
def test_slerp_quarter_circle() -> None:
    # base [1, 1]; θ1 = [1, 0], θ2 = [0, 1]: Ω = 90°, t = 0.5 → sin 45°·(θ1 + θ2) = [√½, √½]; Δ = θ − base
    h = math.sqrt(0.5)
    out = merge("slerp", [[0.0, -1.0], [-1.0, 0.0]], base=t(1.0, 1.0))
    assert_close(out, t(h - 1, h - 1))


def test_slerp_colinear_falls_back_to_linear() -> None:
    # θ2 = 2·θ1 (cos Ω = 1): linear in delta form: 0.75·[1, 2] + 0.25·[2, 4] = [1.25, 2.5]
    assert_close(merge("slerp", [[1.0, 2.0], [2.0, 4.0]], base=t(0.0, 0.0), t=0.25), t(1.25, 2.5))


def test_layer_swap_picks_input_by_layer() -> None:
    d = [[1.0, 1.0], [2.0, 2.0]]
    ranges = [{"layers": [0, 2], "input": 1}]
    assert_close(merge("layer_swap", d, ranges=ranges, layer=1), t(2.0, 2.0))  # block 1 ∈ [0, 2) → input 1
    assert_close(merge("layer_swap", d, ranges=ranges, layer=2), t(1.0, 1.0))  # outside → default 0
    assert_close(merge("layer_swap", d, ranges=ranges, layer=None), t(1.0, 1.0))  # embeddings → default


# --- Fisher, RegMean -------------------------------------------------------------------------------------------------
def test_fisher_weighted_average() -> None:
    d = [[1.0, 2.0], [3.0, -2.0]]
    # raw Fisher F1 = [3, 1], F2 = [1, 1]: e0 (3·1 + 1·3)/4 = 1.5; e1 (1·2 + 1·(−2))/2 = 0
    assert_close(merge("fisher", d, normalize="none", stats=(t(3, 1), t(1, 1))), t(1.5, 0.0))
    # per-tensor normalised: F1 = [3, 4]/5 = [0.6, 0.8], F2 = [0, 2]/2 = [0, 1] → floor → [1e-6, 1]
    # e0 (0.6·1 + 1e-6·3)/(0.6 + 1e-6); e1 (0.8·2 + 1·(−2))/1.8 = −0.4/1.8
    out = merge("fisher", d, stats=(t(3, 4), t(0, 2)))
    assert_close(out, t((0.6 + 3e-6) / (0.6 + 1e-6), -0.4 / 1.8))
    # no Fisher for an input → weighted mean ([1, 2] + [3, −2])/2
    assert_close(merge("fisher", d, stats=None), t(2.0, 0.0))


def test_regmean_closed_form() -> None:
    d = [[[1.0, 0.0]], [[0.0, 1.0]]]  # two ΔW of shape [out 1, in 2]
    g1, g2 = torch.tensor([[2.0, 1.0], [1.0, 2.0]]), torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    # alpha 1: ΣG = [[3, 1], [1, 5]], ΣΔG = [2, 1] + [0, 3] = [2, 4]; (ΣG)⁻¹ = [[5, −1], [−1, 3]]/14
    # ΔW = [2·5 − 4, −2 + 4·3]/14 = [6, 10]/14 = [3/7, 5/7]
    assert_close(merge("regmean", d, alpha=1.0, stats=(g1, g2)), torch.tensor([[3 / 7, 5 / 7]]))
    # alpha 0.5: off-diagonals halved: ΣG̃ = [[3, 0.5], [0.5, 5]], ΣΔG̃ = [2, 0.5] + [0, 3] = [2, 3.5];
    # det 14.75 → ΔW = [2·5 − 3.5·0.5, −2·0.5 + 3.5·3]/14.75 = [8.25, 9.5]/14.75
    out = merge("regmean", d, alpha=0.5, stats=(g1, g2))
    assert_close(out, torch.tensor([[8.25 / 14.75, 9.5 / 14.75]]))


def test_regmean_without_gram_is_weighted_mean() -> None:
    # a bias vector: (1·[1, 2] + 3·[3, 2]) / 4 = [2.5, 2]
    assert_close(merge("regmean", [[1.0, 2.0], [3.0, 2.0]], [1.0, 3.0]), t(2.5, 2.0))


def test_model_stock_interpolates_by_the_mean_pairwise_cosine() -> None:
    # Δ1 = [1, 0], Δ2 = [1, 1]: cos = 1/√2, N = 2 → t = 2c / (1 + c) = √2 / (1 + 1/√2) = 2 / (√2 + 1) = 2(√2 − 1)
    # mean Δ = [1, 0.5] → Δ = t·[1, 0.5]; user weights play no part
    t_ = 2 * (2**0.5 - 1)
    assert_close(merge("model_stock", [[1.0, 0.0], [1.0, 1.0]], [0.3, 5.0]), t(t_, t_ / 2))
    # orthogonal deltas: cos 0 → t 0 → the base; opposite deltas: 1 + (N − 1)·cos = 0 → t 0 → the base
    assert_close(merge("model_stock", [[1.0, 0.0], [0.0, 2.0]]), t(0.0, 0.0))
    assert_close(merge("model_stock", [[1.0, 2.0], [-1.0, -2.0]]), t(0.0, 0.0))
    # three inputs, pairwise cosines 1, 1, 1 (parallel): t = 3 / (1 + 2) = 1 → their mean
    assert_close(merge("model_stock", [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]), t(2.0, 2.0))


def test_model_stock_filter_wise_has_one_ratio_per_row() -> None:
    # row 0: Δ1 = [1, 0], Δ2 = [1, 0] → cos 1, t 1 → mean [1, 0]; row 1: [0, 1] vs [1, 0] → cos 0 → t 0 → [0, 0]
    d = [[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]]]
    assert_close(merge("model_stock", d, filter_wise=True), torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    # whole tensor: cos = (1 + 0) / (√2·√2) = 0.5 → t = 1 / 1.5 = 2/3; mean = [[1, 0], [0.5, 0.5]]
    assert_close(merge("model_stock", d), torch.tensor([[2 / 3, 0.0], [1 / 3, 1 / 3]]))


def test_nearswap_caps_each_entry_s_move_at_t() -> None:
    # t = 0.1: |Δ| ≤ t keeps Δ (w = 1); larger |Δ| is scaled to w·Δ = t·sign(Δ); Δ = 0 stays 0
    assert_close(merge("nearswap", [[0.05, -0.1, 0.4, -2.0, 0.0]], t=0.1), t(0.05, -0.1, 0.1, -0.1, 0.0))
    assert_close(merge("nearswap", [[0.05, -0.4]], t=0.0), t(0.0, 0.0))
