"""One battery of checks run over every registered merge method."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from skillgraft.errors import InputError
from skillgraft.merge.docs import render_methods_page
from skillgraft.merge.registry import MethodInfo, TensorJob, all_methods

METHODS = all_methods()
IDS = [m.name for m in METHODS]
SHAPE = (6, 5)

# Methods for which "one input at weight 1 returns it" does not hold, and why. Methods with a ``density`` are
# checked at density 1 (a trim keeps a strict subset otherwise; DARE/DELLA keep Δ only in expectation).
NOT_IDENTITY = {
    "pcb": "keeps only the top pcb_ratio scores, scaled by λ = 1.2",
    "consensus": "an entry needs k = 2 tasks' masks; one input reaches no consensus",
    "slerp": "needs exactly two inputs; checked with two equal inputs instead",
    "model_stock": "needs two or more inputs; checked with two equal inputs instead (cos 1, t 1)",
    "nuslerp": "needs exactly two inputs; checked with two equal inputs instead",
    "nearswap": "moves each entry by at most t towards the input",
    "arcee_fusion": "moves only the entries whose importance passes the outlier fence",
    "passthrough": "takes no inputs: it copies the base (or a layer layout's view of its sources)",
}
# Parameters a method requires (no default), as mergekit requires them.
REQUIRED = {"nearswap": {"t": 0.02}}
# Methods whose result depends on the order of inputs by definition.
ORDERED = {
    "slerp": "t names input 2 (swapping means t → 1 − t)",
    "layer_swap": "ranges and default name inputs by index",
}
# Methods that ignore the user's weights by design, so zero weights do not give the base.
WEIGHTLESS = {
    "slerp": "interpolates between its two inputs by t",
    "layer_swap": "copies the chosen input's Δ unchanged",
    "model_stock": "the ratio t comes from the deltas' angles, not from weights",
    "nearswap": "one input, moved by at most t",
    "karcher": "a uniform mean of the inputs' weights (mergekit's karcher takes no weights)",
    "nuslerp": "weights only set the ratio t = w₂ / (w₁ + w₂); all zero gives t = 0.5, not the base",
    "sce": "weights each input by its mean squared Δ (mergekit's sce takes no weights)",
    "ram": "keeps unique entries whole and averages shared ones (mergekit's ram takes no weights)",
    "arcee_fusion": "one input, masked by importance",
    "passthrough": "takes no inputs",
}
# Methods that compute on the full weights θᵢ = θ₀ + Δᵢ (|θ₀| up to ~3 here, 50× |Δ|): another input order rounds
# at θ's scale, so results agree within a few fp32 steps of θ (2.4e-7 each) rather than of Δ.
THETA_SPACE = {"karcher": "a mean of the inputs' full weights on the sphere"}


def params_of(info: MethodInfo, values: dict | None = None) -> Any:
    """``info``'s parameters: its defaults (and required values from REQUIRED), then ``values``."""
    return info.make_params({**REQUIRED.get(info.name, {}), **(values or {})})


def has_field(info: MethodInfo, name: str) -> bool:
    return any(f.name == name for f in dataclasses.fields(info.params))


def make_job(info: MethodInfo, deltas: torch.Tensor, weights: torch.Tensor, seed: int = 0) -> TensorJob:
    n = deltas.shape[0]
    g = torch.Generator().manual_seed(100 + n)
    stats = None
    if info.stats == "fisher":
        stats = tuple(torch.rand(SHAPE, generator=g) + 0.1 for _ in range(n))
    elif info.stats == "gram":
        xs = [torch.randn(20, SHAPE[1], generator=g) for _ in range(n)]
        stats = tuple(x.T @ x for x in xs)
    return TensorJob(
        "model.layers.1.mlp.weight",
        deltas,
        weights,
        base=torch.randn(SHAPE, generator=g),
        rng=torch.Generator().manual_seed(seed) if info.randomized else None,
        stats=stats,
        layer=1,
        num_layers=4,
    )


def inputs(info: MethodInfo, n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(info.min_inputs, min(n, info.max_inputs or n))
    g = torch.Generator().manual_seed(7)
    return torch.randn(n, *SHAPE, generator=g) * 0.05, torch.tensor([1.0, 0.6, 0.3][:n])


@pytest.mark.parametrize("info", METHODS, ids=IDS)
def test_shape_dtype_finite(info: MethodInfo) -> None:
    deltas, weights = inputs(info)
    out = info.fn(make_job(info, deltas, weights), params_of(info))
    assert out.shape == SHAPE and out.dtype == torch.float32 and torch.isfinite(out).all()


def permuted(job: TensorJob, perm: list[int]) -> TensorJob:
    """``job`` with its inputs (deltas, weights, per-input stats) in the order ``perm``, and a fresh generator."""
    return dataclasses.replace(
        job,
        deltas=job.deltas[perm],
        weights=job.weights[perm],
        stats=None if job.stats is None else tuple(job.stats[i] for i in perm),
        rng=None if job.rng is None else torch.Generator().manual_seed(job.rng.initial_seed()),  # type: ignore[union-attr]
    )


EQUAL_PAIR = ("slerp", "model_stock", "nuslerp")  # checked for identity with two equal inputs
IDENTITY = [m for m in METHODS if m.name not in NOT_IDENTITY or m.name in EQUAL_PAIR]
UNORDERED = [m for m in METHODS if m.name not in ORDERED and (m.max_inputs or 3) >= 3]
WEIGHTED = [m for m in METHODS if m.name not in WEIGHTLESS]
DETERMINISTIC_UNORDERED = [m for m in UNORDERED if not m.randomized]


@pytest.mark.parametrize("info", IDENTITY, ids=[m.name for m in IDENTITY])
def test_one_input_at_weight_one_returns_it(info: MethodInfo) -> None:
    deltas, _ = inputs(info, n=1)
    if info.name in EQUAL_PAIR:
        deltas = torch.stack([deltas[0], deltas[0]])
    weights = torch.ones(deltas.shape[0])
    params = params_of(info, {"density": 1.0} if has_field(info, "density") else {})
    out = info.fn(make_job(info, deltas, weights), params)
    torch.testing.assert_close(out, deltas[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("info", METHODS, ids=IDS)
def test_zero_deltas_give_zero(info: MethodInfo) -> None:
    deltas, weights = inputs(info)
    out = info.fn(make_job(info, torch.zeros_like(deltas), weights), params_of(info))
    assert torch.equal(out, torch.zeros(SHAPE))


@pytest.mark.parametrize("info", UNORDERED, ids=[m.name for m in UNORDERED])
def test_input_order_does_not_matter(info: MethodInfo) -> None:
    deltas, weights = inputs(info)
    params = params_of(info)
    a_job = make_job(info, deltas, weights)
    b_job = permuted(a_job, [2, 0, 1])
    a, b = info.fn(a_job, params), info.fn(b_job, params)
    if info.randomized:
        # Draws are taken input by input, so elements differ; invariants do not: same support size on average
        # and, at density 1 (no randomness), identical results.
        dense = info.make_params({"density": 1.0})
        torch.testing.assert_close(info.fn(a_job, dense), info.fn(b_job, dense), rtol=1e-6, atol=1e-7)
        assert abs(int((a != 0).sum()) - int((b != 0).sum())) <= SHAPE[0] * SHAPE[1] // 2
    else:
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 if info.name in THETA_SPACE else 1e-7)


def draw_case(data: st.DataObject, info: MethodInfo) -> tuple[torch.Tensor, torch.Tensor, Any, int]:
    """Generated deltas ``[n, *SHAPE]``, positive weights, parameters (density, mode, k where the method has
    them; defaults otherwise) and a seed, for ``info``."""
    n = data.draw(st.integers(info.min_inputs, min(info.max_inputs or 4, 4)), label="n")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    deltas = torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed)) * 0.05
    weights = torch.tensor(data.draw(st.lists(st.floats(0.1, 2.0), min_size=n, max_size=n), label="weights"))
    values: dict[str, Any] = {}
    if has_field(info, "density"):
        values["density"] = data.draw(st.sampled_from([0.3, 0.6, 0.8, 1.0]), label="density")
    if has_field(info, "mode"):
        values["mode"] = data.draw(st.sampled_from(["paper", "mergekit"]), label="mode")
    if has_field(info, "k"):
        values["k"] = data.draw(st.integers(1, n), label="k")
    return deltas, weights, params_of(info, values), seed


@pytest.mark.parametrize("info", WEIGHTED, ids=[m.name for m in WEIGHTED])
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_zero_weights_return_the_base(info: MethodInfo, data: st.DataObject) -> None:
    """Every input at weight 0 merges to Δ = 0, so the output is the base (methods in WEIGHTLESS excepted)."""
    deltas, weights, params, seed = draw_case(data, info)
    out = info.fn(make_job(info, deltas, torch.zeros_like(weights), seed), params)
    assert torch.equal(out, torch.zeros(SHAPE))


@pytest.mark.parametrize("info", DETERMINISTIC_UNORDERED, ids=[m.name for m in DETERMINISTIC_UNORDERED])
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_input_order_does_not_matter_generated(info: MethodInfo, data: st.DataObject) -> None:
    """Any permutation of the inputs (with their weights and stats) gives the same merge, up to fp32 rounding of
    sums taken in another order. Randomised methods draw input by input (see the fixed-example test above)."""
    deltas, weights, params, seed = draw_case(data, info)
    perm = data.draw(st.permutations(range(deltas.shape[0])), label="perm")
    job = make_job(info, deltas, weights, seed)
    torch.testing.assert_close(info.fn(permuted(job, perm), params), info.fn(job, params), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("info", METHODS, ids=IDS)
def test_unknown_parameter_is_an_input_error_with_hint(info: MethodInfo) -> None:
    with pytest.raises(InputError) as e:
        info.make_params({"not_a_parameter": 1})
    assert "not_a_parameter" in e.value.message and e.value.hint


@pytest.mark.parametrize("info", [m for m in METHODS if has_field(m, "density")], ids=lambda m: m.name)
@pytest.mark.parametrize("density", [0, -0.1, 1.5, float("nan"), "half"])
def test_density_outside_unit_interval_is_refused(info: MethodInfo, density: object) -> None:
    with pytest.raises(InputError, match="density"):
        info.make_params({"density": density})


@pytest.mark.parametrize("info", METHODS, ids=IDS)
def test_docstring_states_edge_cases_dtype_and_reference(info: MethodInfo) -> None:
    doc = info.doc
    assert "Edge cases" in doc and "fp32" in doc and "Reference" in doc or info.name in ("linear", "task_arithmetic")


def test_methods_page_is_up_to_date() -> None:
    page = Path(__file__).parents[2] / "docs" / "merging-methods.md"
    assert page.read_text(encoding="utf-8") == render_methods_page(), (
        "run: python -m skillgraft.merge.docs > docs/merging-methods.md"
    )


@pytest.mark.parametrize("name", sorted(ORDERED))
def test_documented_order_dependence_is_real(name: str) -> None:
    """The exceptions above are real: swapping the inputs of an ordered method changes its result."""
    info = next(m for m in METHODS if m.name == name)
    deltas, weights = inputs(info, n=2)
    params = info.make_params({"t": 0.25} if name == "slerp" else {"ranges": [{"layers": [0, 2], "input": 1}]})
    a = info.fn(make_job(info, deltas[:2], weights[:2]), params)
    b = info.fn(make_job(info, deltas[:2].flip(0), weights[:2].flip(0)), params)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("name", sorted(set(NOT_IDENTITY) - {"slerp"}))
def test_documented_non_identity_is_real(name: str) -> None:
    info = next(m for m in METHODS if m.name == name)
    deltas, _ = inputs(info, n=1)
    out = info.fn(make_job(info, deltas, torch.ones(deltas.shape[0])), params_of(info))
    assert not torch.allclose(out, deltas[0])
