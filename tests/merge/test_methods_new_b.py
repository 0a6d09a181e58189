"""karcher, multislerp and nuslerp on tiny tensors with expected numbers derived by hand in the comments, their
edge cases and bad parameters, and how a mergekit YAML's base_model and weights reach them."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch.testing import assert_close

from skillgraft.errors import InputError
from skillgraft.merge.config import from_dict
from skillgraft.merge.registry import PlanFacts, TensorJob, get_method

R2 = 1 / math.sqrt(2)


def merge(method: str, deltas: list, weights: list[float] | None = None, base: list | None = None, **kw: Any):
    info = get_method(method)
    d = torch.tensor(deltas, dtype=torch.float32)
    b = torch.zeros(d.shape[1:]) if base is None else torch.tensor(base, dtype=torch.float32)
    w = torch.tensor(weights if weights is not None else [1.0] * len(deltas))
    return info.fn(TensorJob("t", d, w, base=b), info.make_params(kw))


def t(*v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


# --- karcher: the points are the full weights θᵢ = θ₀ + Δᵢ ---------------------------------------------------------


def test_karcher_two_orthogonal_inputs_meet_on_the_bisector_scaled_by_the_mean_norm() -> None:
    # θ₁ = [2, 0], θ₂ = [0, 1]: directions [1, 0], [0, 1] → Karcher mean [1, 1]/√2 (symmetric, the first step is
    # already there); scale (2 + 1)/2 = 1.5 → [1.5/√2, 1.5/√2]. The Euclidean average would be [1, 0.5].
    assert_close(merge("karcher", [[2.0, 0.0], [0.0, 1.0]]), t(1.5 * R2, 1.5 * R2))


def test_karcher_is_the_intrinsic_mean_not_the_normalised_average() -> None:
    # directions at 0°, 0°, 90° on a circle: the Karcher mean is the mean angle 30° → [cos 30°, sin 30°] (norms 1);
    # the normalised Euclidean mean [2, 1]/√5 (26.6°) is where the iteration starts: max_iter 0 stays there.
    pts = [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
    assert_close(merge("karcher", pts), t(math.cos(math.pi / 6), 0.5))
    assert_close(merge("karcher", pts, max_iter=0), t(2 / math.sqrt(5), 1 / math.sqrt(5)))


def test_karcher_averages_weights_not_deltas_and_returns_a_delta() -> None:
    # base [1, 1]: Δ₁ = [1, −1], Δ₂ = [−1, 0] are θ₁ = [2, 0], θ₂ = [0, 1] → θ = [1.5/√2, 1.5/√2], Δ = θ − [1, 1]
    out = merge("karcher", [[1.0, -1.0], [-1.0, 0.0]], base=[1.0, 1.0])
    assert_close(out, t(1.5 * R2 - 1, 1.5 * R2 - 1))


def test_karcher_ignores_weights() -> None:
    pts = [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
    assert torch.equal(merge("karcher", pts, [5.0, 0.1, 0.0]), merge("karcher", pts))


def test_karcher_antiparallel_inputs_keep_the_first_direction() -> None:
    # [2, 0] and [−1, 0]: the directions average to 0 (shorter than tol), so the first direction [1, 0] is the start;
    # the second is at angle π, where u − cos·m = 0 contributes nothing: m stays [1, 0], scale (2 + 1)/2
    assert_close(merge("karcher", [[2.0, 0.0], [-1.0, 0.0]]), t(1.5, 0.0))


def test_karcher_zero_norm_input_counts_in_the_scale_only() -> None:
    # θ₂ = 0 (‖θ₂‖ ≤ tol) takes no part in the direction [1, 0] but its norm 0 counts with 1/2: scale 3/2
    assert_close(merge("karcher", [[3.0, 0.0], [0.0, 0.0]]), t(1.5, 0.0))
    # base [−2, 0]: θ₁ = [−2, 0], θ₂ = 0 → θ = ½·2·[−1, 0], Δ = θ − θ₀ = [1, 0]
    assert_close(merge("karcher", [[0.0, 0.0], [2.0, 0.0]], base=[-2.0, 0.0]), t(1.0, 0.0))
    # every ‖θᵢ‖ ≤ tol: θ = 0, i.e. Δ = −θ₀
    tiny = merge("karcher", [[0.0, 0.0], [-1e-6, 0.0]], base=[1e-6, 0.0])
    assert torch.equal(tiny, t(-1e-6, 0.0))
    assert torch.equal(merge("karcher", [[0.0, 0.0], [-1e-6, 0.0]], base=[1e-6, 0.0], tol=1e-7), t(-5e-7, 0.0))


def test_karcher_equal_or_single_inputs_are_returned_exactly() -> None:
    d = [[0.3, -0.7, 0.1]]
    base = [1.3, 0.2, -2.0]
    assert torch.equal(merge("karcher", d, base=base), t(*d[0]))
    assert torch.equal(merge("karcher", d * 3, base=base), t(*d[0]))
    assert torch.equal(merge("karcher", [[0.0] * 3] * 2, base=base), t(0.0, 0.0, 0.0))


@pytest.mark.parametrize("values", [{"max_iter": -1}, {"max_iter": 1.5}, {"max_iter": True}, {"max_iter": "3"}])
def test_karcher_max_iter_must_be_a_count(values: dict) -> None:
    with pytest.raises(InputError, match="max_iter"):
        get_method("karcher").make_params(values)


@pytest.mark.parametrize("tol", [-1e-5, float("nan"), "small"])
def test_karcher_tol_must_be_a_number_at_least_zero(tol: object) -> None:
    with pytest.raises(InputError, match="tol"):
        get_method("karcher").make_params({"tol": tol})


# --- multislerp ------------------------------------------------------------------------------------------------------


def test_multislerp_is_the_normalised_weighted_mean_direction_times_the_mean_norm() -> None:
    # Δ₁ = [2, 0], Δ₂ = [0, 1], w = [3, 1] → [¾, ¼]: Σ wᵢuᵢ = [¾, ¼] → m = [3, 1]/√10; the tangent step is 0
    # (m is Σ wᵢuᵢ's own direction); scale ¾·2 + ¼·1 = 1.75 → 1.75·[3, 1]/√10
    out = merge("multislerp", [[2.0, 0.0], [0.0, 1.0]], [3.0, 1.0])
    assert_close(out, t(1.75 * 3 / math.sqrt(10), 1.75 / math.sqrt(10)))
    # not the SLERP point at t = ¼ (22.5° from Δ₁): 18.4°
    assert math.isclose(math.degrees(math.atan2(float(out[1]), float(out[0]))), 18.43, abs_tol=0.01)


def test_multislerp_without_normalising_scales_by_the_raw_weights() -> None:
    # same direction [3, 1]/√10; scale 3·2 + 1·1 = 7
    out = merge("multislerp", [[2.0, 0.0], [0.0, 1.0]], [3.0, 1.0], normalize_weights=False)
    assert_close(out, t(21 / math.sqrt(10), 7 / math.sqrt(10)))


def test_multislerp_three_inputs() -> None:
    # units [1, 0], [0, 1], [1, 0] (Δ₃ = [4, 0]) at ⅓ each: Σ wᵢuᵢ = [⅔, ⅓] → m = [2, 1]/√5;
    # scale (1 + 2 + 4)/3 = 7/3
    out = merge("multislerp", [[1.0, 0.0], [0.0, 2.0], [4.0, 0.0]])
    assert_close(out, t(7 / 3 * 2 / math.sqrt(5), 7 / 3 / math.sqrt(5)))


def test_multislerp_balanced_antipodal_inputs_fall_back_to_the_weighted_sum() -> None:
    # units [1, 0], [−1, 0] at ½ each cancel: Σ wᵢΔᵢ = ½·[1, 0] + ½·[−3, 0] = [−1, 0]
    assert_close(merge("multislerp", [[1.0, 0.0], [-3.0, 0.0]]), t(-1.0, 0.0))
    # three inputs (mergekit raises here): [1, 0], [−2, 0], 0 at ⅓: units cancel → (1 − 2 + 0)/3
    assert_close(merge("multislerp", [[1.0, 0.0], [-2.0, 0.0], [0.0, 0.0]]), t(-1 / 3, 0.0))


def test_multislerp_zero_norm_input_keeps_its_weight_in_the_scale() -> None:
    # Δ₂ = 0 has no direction: m = [1, 0]; scale ½·2 + ½·0 = 1
    assert_close(merge("multislerp", [[2.0, 0.0], [0.0, 0.0]]), t(1.0, 0.0))


def test_multislerp_edge_cases() -> None:
    assert torch.equal(merge("multislerp", [[0.0, 0.0]] * 3, [1.0, 2.0, 3.0]), t(0.0, 0.0))
    # one input: returned whatever its weight (mergekit's shortcut)
    assert torch.equal(merge("multislerp", [[0.3, -0.2]], [0.25], normalize_weights=False), t(0.3, -0.2))
    # weights summing to 0: zeros when called directly, refused by the plan
    assert torch.equal(merge("multislerp", [[1.0, 0.0], [0.0, 1.0]], [1.0, -1.0]), t(0.0, 0.0))
    params = get_method("multislerp").make_params({})
    with pytest.raises(InputError, match="sum to 0") as e:
        params.check_plan(PlanFacts(2, None, (1.0, -1.0)))
    assert "normalize_weights: false" in (e.value.hint or "")
    get_method("multislerp").make_params({"normalize_weights": False}).check_plan(PlanFacts(2, None, (1.0, -1.0)))


def test_multislerp_origin_zero_interpolates_the_full_weights() -> None:
    # base [1, 1]; Δ₁ = [1, −1], Δ₂ = [−1, 0]: θ₁ = [2, 0], θ₂ = [0, 1] → θ = 1.75·[3, 1]/√10, returned as θ − θ₀
    out = merge("multislerp", [[1.0, -1.0], [-1.0, 0.0]], [3.0, 1.0], base=[1.0, 1.0], origin="zero")
    assert_close(out, t(1.75 * 3 / math.sqrt(10) - 1, 1.75 / math.sqrt(10) - 1))
    # around the base the same deltas give another point: m = [¾·u₁ + ¼·u₂]/‖·‖, u₁ = [1, −1]/√2, u₂ = [−1, 0]
    around = merge("multislerp", [[1.0, -1.0], [-1.0, 0.0]], [3.0, 1.0], base=[1.0, 1.0])
    mean = 0.75 * torch.tensor([R2, -R2]) + 0.25 * torch.tensor([-1.0, 0.0])
    assert_close(around, mean / mean.norm() * (0.75 * math.sqrt(2) + 0.25))


@pytest.mark.parametrize(
    "values",
    [{"eps": 0}, {"eps": -1e-8}, {"eps": float("inf")}, {"normalize_weights": "yes"}, {"origin": "centre"}],
)
def test_multislerp_bad_parameters(values: dict) -> None:
    with pytest.raises(InputError, match=next(iter(values))):
        get_method("multislerp").make_params(values)


# --- nuslerp ----------------------------------------------------------------------------------------------------------


def test_nuslerp_ratio_comes_from_the_weights() -> None:
    # orthogonal [1, 0], [0, 1] (Ω = π/2, sin Ω = 1): weights 1, 1 → t = ½ → [sin π/4, sin π/4];
    # weights 3, 1 → t = ¼ → [sin(¾·π/2), sin(¼·π/2)] = [cos π/8, sin π/8]
    d = [[1.0, 0.0], [0.0, 1.0]]
    assert_close(merge("nuslerp", d), t(R2, R2))
    assert_close(merge("nuslerp", d, [3.0, 1.0]), t(math.cos(math.pi / 8), math.sin(math.pi / 8)))
    # t = 0 and t = 1 are the inputs; all-zero weights → t = ½; w = [2, −1] → t = −1 extrapolates:
    # sin(2·π/2)·[1, 0] + sin(−π/2)·[0, 1] = [0, −1]
    assert_close(merge("nuslerp", d, [1.0, 0.0]), t(1.0, 0.0))
    assert_close(merge("nuslerp", d, [0.0, 1.0]), t(0.0, 1.0))
    assert torch.equal(merge("nuslerp", d, [0.0, 0.0]), merge("nuslerp", d))
    assert_close(merge("nuslerp", d, [2.0, -1.0]), t(0.0, -1.0), atol=1e-6, rtol=0)


def test_nuslerp_keeps_the_norms_in_the_mix() -> None:
    # [2, 0], [0, 1] at t = ½: (sin π/4·[2, 0] + sin π/4·[0, 1]) / sin π/2
    assert_close(merge("nuslerp", [[2.0, 0.0], [0.0, 1.0]]), t(2 * R2, R2))


def test_nuslerp_colinear_and_zero_vectors() -> None:
    # parallel: cos Ω = 1 → (1 − t)·a + t·b = ¾·[1, 0] + ¼·[3, 0]
    assert_close(merge("nuslerp", [[1.0, 0.0], [3.0, 0.0]], [3.0, 1.0]), t(1.5, 0.0))
    # antiparallel: cos Ω = −1 → linear too: ½ − ½ = 0 at equal weights, ¾ − ¼ at 3, 1
    assert torch.equal(merge("nuslerp", [[1.0, 0.0], [-1.0, 0.0]]), t(0.0, 0.0))
    assert_close(merge("nuslerp", [[1.0, 0.0], [-1.0, 0.0]], [3.0, 1.0]), t(0.5, 0.0))
    # a zero vector counts as orthogonal (Ω = π/2): sin(½·π/2)·[0, 2]
    assert_close(merge("nuslerp", [[0.0, 0.0], [0.0, 2.0]]), t(0.0, 2 * R2))
    assert torch.equal(merge("nuslerp", [[0.0, 0.0], [0.0, 0.0]]), t(0.0, 0.0))


# Δ₁ = [[1, 0], [0, 1]], Δ₂ = [[0, 1], [0, 1]] at t = ½
M1, M2 = [[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [0.0, 1.0]]


def test_nuslerp_flattened_rows_and_columns() -> None:
    # flattened (default): cos Ω = 1/(√2·√2) = ½, Ω = π/3: sin(π/6)/sin(π/3)·(Δ₁ + Δ₂) = (1/√3)·[[1, 1], [0, 2]]
    k = 1 / math.sqrt(3)
    flat = merge("nuslerp", [M1, M2])
    assert_close(flat, torch.tensor([[k, k], [0.0, 2 * k]]))
    # rows: row 0 [1, 0] vs [0, 1] → [1/√2, 1/√2]; row 1 [0, 1] vs [0, 1] colinear → [0, 1]
    rows = merge("nuslerp", [M1, M2], nuslerp_flatten=False)
    assert_close(rows, torch.tensor([[R2, R2], [0.0, 1.0]]))
    # columns: col 0 [1, 0] vs [0, 0] (orthogonal by convention) → sin(π/4)·[1, 0]; col 1 [0, 1] vs [1, 1]
    # (Ω = π/4) → sin(π/8)/sin(π/4)·[1, 2]
    c = math.sin(math.pi / 8) / math.sin(math.pi / 4)
    cols = merge("nuslerp", [M1, M2], nuslerp_flatten=False, nuslerp_row_wise=True)
    assert_close(cols, torch.tensor([[R2, c], [0.0, 2 * c]]))
    # flatten wins over row_wise
    assert torch.equal(merge("nuslerp", [M1, M2], nuslerp_row_wise=True), flat)


def test_nuslerp_swapping_inputs_with_their_weights_changes_nothing() -> None:
    a = merge("nuslerp", [M1, M2], [0.7, 0.2])
    assert_close(merge("nuslerp", [M2, M1], [0.2, 0.7]), a)


def test_nuslerp_origin_zero_interpolates_the_full_weights() -> None:
    # base [1, 1]; θ₁ = [1, 0], θ₂ = [0, 1] (Δ₁ = [0, −1], Δ₂ = [−1, 0]): θ = [1/√2, 1/√2], Δ = θ − [1, 1];
    # around the base the deltas are orthogonal too: Δ = [−1/√2, −1/√2]
    d, base = [[0.0, -1.0], [-1.0, 0.0]], [1.0, 1.0]
    assert_close(merge("nuslerp", d, base=base, origin="zero"), t(R2 - 1, R2 - 1))
    assert_close(merge("nuslerp", d, base=base), t(-R2, -R2))


def test_nuslerp_needs_exactly_two_inputs() -> None:
    with pytest.raises(InputError, match="exactly 2"):
        merge("nuslerp", [[1.0], [2.0], [3.0]])


@pytest.mark.parametrize(
    "values", [{"nuslerp_row_wise": "yes"}, {"nuslerp_flatten": 1}, {"origin": "middle"}, {"t": 0.5}]
)
def test_nuslerp_bad_parameters(values: dict) -> None:
    with pytest.raises(InputError, match=next(iter(values))):
        get_method("nuslerp").make_params(values)


# --- mergekit YAMLs: base_model and weights ------------------------------------------------------------------------


def mk(method: str, models: list, base: str | None = "b", **params: Any):
    d: dict = {"merge_method": method, "models": [{"model": m, "parameters": p} for m, p in models]}
    if base is not None:
        d["base_model"] = base
    if params:
        d["parameters"] = params
    return from_dict(d)


W = {"weight": 0.5}


def test_mergekit_karcher_averages_base_model_too() -> None:
    # mergekit appends an unlisted base_model as the last input; a listed one stays where it is
    cfg = mk("karcher", [("x", {}), ("y", {})])
    assert (cfg.base, [i.source for i in cfg.inputs]) == ("b", ["x", "y", "b"])
    assert [i.source for i in mk("karcher", [("b", {}), ("x", {})]).inputs] == ["b", "x"]
    # without base_model only the models: the first stands in as the base (Δ = 0)
    cfg = mk("karcher", [("x", {}), ("y", {})], base=None, max_iter=3, tol=1e-4)
    assert (cfg.base, [i.source for i in cfg.inputs], cfg.parameters) == ("x", ["x", "y"], {"max_iter": 3, "tol": 1e-4})


def test_mergekit_multislerp_and_nuslerp_centre_on_base_model_or_zero() -> None:
    cfg = mk("multislerp", [("b", {}), ("x", W), ("y", {"weight": 0.25})], normalize_weights=False)
    assert [(i.source, i.weight) for i in cfg.inputs] == [("x", 0.5), ("y", 0.25)]
    assert cfg.parameters == {"normalize_weights": False}
    cfg = mk("nuslerp", [("x", W), ("y", W)], base=None, nuslerp_flatten=False)
    assert (cfg.base, [i.source for i in cfg.inputs]) == ("x", ["x", "y"])
    assert cfg.parameters == {"nuslerp_flatten": False, "origin": "zero"}


def test_mergekit_multislerp_and_nuslerp_need_every_weight() -> None:
    # as mergekit ("Missing required parameter weight"); the base needs none, a top-level weight serves all
    with pytest.raises(InputError, match="'y' has none"):
        mk("nuslerp", [("x", W), ("y", {})])
    assert len(mk("multislerp", [("b", {}), ("x", W), ("y", W)]).inputs) == 2
    assert len(mk("multislerp", [("x", {}), ("y", {})], weight=0.5).inputs) == 2


def test_mergekit_yaml_cannot_set_our_origin() -> None:
    with pytest.raises(InputError, match="origin"):
        mk("nuslerp", [("x", W), ("y", W)], origin="zero")


# --- a 16-bit compute dtype (a mergekit YAML's dtype: bfloat16): mergekit's arithmetic in it ----------------------


@pytest.mark.parametrize(
    ("method", "kw"),
    [
        ("karcher", {}),
        ("multislerp", {}),
        ("multislerp", {"origin": "zero"}),
        ("nuslerp", {}),
        ("nuslerp", {"origin": "zero"}),
    ],
)
def test_bf16_compute_forms_the_merged_weights_in_bf16(method: str, kw: dict) -> None:
    g = torch.Generator().manual_seed(3)
    base = torch.randn(4, 8, generator=g).bfloat16().float()
    models = [(base + 0.05 * torch.randn(4, 8, generator=g)).bfloat16().float() for _ in range(2)]
    info, params = get_method(method), get_method(method).make_params(kw)
    deltas, w = torch.stack([m - base for m in models]), torch.tensor([0.6, 0.4])

    def run(dtype: torch.dtype) -> torch.Tensor:
        return info.fn(TensorJob("t", deltas, w, base=base, compute_dtype=dtype), params)

    low, fp32 = run(torch.bfloat16), run(torch.float32)
    assert low.dtype == torch.float32
    theta = base + low  # the engine's θ₀ + Δ: a bf16 value, exactly
    assert torch.equal(theta.bfloat16().float(), theta)
    assert not torch.equal(low, fp32)  # the arithmetic differs ...
    assert_close(theta, base + fp32, rtol=0.02, atol=1e-3)  # ... by a few bf16 roundings (each ≤ 2⁻⁸ of |θ|)
