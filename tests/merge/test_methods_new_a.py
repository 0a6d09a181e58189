"""SCE, RAM and Arcee Fusion: hand-computed goldens, edge cases, bad parameters, and slice-by-slice runs."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import build, finetune_like, llama_config, load, save
from torch.testing import assert_close

from skillgraft.errors import InputError
from skillgraft.io.checkpoint import Checkpoint
from skillgraft.merge.config import from_dict
from skillgraft.merge.engine import MergeOptions, merge
from skillgraft.merge.methods.sce import variance_topk_mask
from skillgraft.merge.registry import TensorJob, get_method


def run(method: str, deltas: Any, weights: list[float] | None = None, base: Any = None, **params: Any) -> torch.Tensor:
    info = get_method(method)
    d = torch.as_tensor(deltas, dtype=torch.float32)
    w = torch.tensor(weights if weights is not None else [1.0] * d.shape[0])
    b = None if base is None else torch.as_tensor(base, dtype=torch.float32)
    return info.fn(TensorJob("t", d, w, base=b), info.make_params(params))


def t(*v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


# --- RAM -----------------------------------------------------------------------------------------------------------
R1, R2 = [0.5, 0.0, 0.25, 1e-6, -0.5], [0.25, 0.125, 0.0, 0.0, -0.25]


def test_ram_keeps_unique_entries_and_averages_shared_ones() -> None:
    # e0: both changed → (0.5 + 0.25)/2; e1: only Δ2 → 0.125; e2: only Δ1 → 0.25; e3: 1e-6 ≤ ε = 1e-5, nobody
    # changed it → 0; e4: both → (−0.5 − 0.25)/2
    assert_close(run("ram", [R1, R2]), t(0.375, 0.125, 0.25, 0.0, -0.375), rtol=0, atol=0)


def test_ram_ignores_weights_and_input_order() -> None:
    assert torch.equal(run("ram", [R1, R2], [5.0, 0.1]), run("ram", [R2, R1]))


def test_ram_epsilon_is_a_strict_threshold() -> None:
    # ε = 0.25: |Δ| must exceed it. Δ1 counts at e0 and e4 (0.5) but not at e2 (0.25); Δ2 nowhere (0.25 is not
    # > 0.25), so e0 and e4 are Δ1's alone, whole
    assert_close(run("ram", [R1, R2], epsilon=0.25), t(0.5, 0.0, 0.0, 0.0, -0.5), rtol=0, atol=0)
    # ε = 0: every nonzero entry counts, e3's 1e-6 included (only Δ1 changed it)
    assert_close(run("ram", [R1, R2], epsilon=0.0), t(0.375, 0.125, 0.25, 1e-6, -0.375), rtol=0, atol=0)


def test_ram_divides_by_the_number_of_inputs_that_changed_each_entry() -> None:
    # three inputs change e0 (mean of 0.3, 0.6, 0.9); two change e1 (Δ3's 0 is not counted): (0.2 + 0.4)/2
    out = run("ram", [[0.3, 0.2], [0.6, 0.4], [0.9, 0.0]])
    assert_close(out, t(0.6, 0.3))


def test_ram_one_input_zeroes_only_its_tiny_entries() -> None:
    assert_close(run("ram", [[0.5, -2e-6, -0.25]]), t(0.5, 0.0, -0.25), rtol=0, atol=0)


@pytest.mark.parametrize("epsilon", [-1e-5, "small", True, None])
def test_ram_bad_epsilon_is_refused(epsilon: Any) -> None:
    with pytest.raises(InputError, match="ram: epsilon"):
        get_method("ram").make_params({"epsilon": epsilon})


# --- SCE -----------------------------------------------------------------------------------------------------------
S1, S2 = [1.0, -2.0, 3.0, 0.0], [-1.0, 1.0, 1.0, 2.0]


def test_sce_weights_inputs_by_energy_and_erases_minority_signs() -> None:
    # energies mean(Δ²): (1 + 4 + 9 + 0)/4 = 3.5 and (1 + 1 + 1 + 4)/4 = 1.75 → weights 2/3, 1/3
    # unweighted sums [0, −1, 4, 2] → signs [+, −, +, +] (a zero sum elects +)
    # e0: only Δ1 (+1) agrees → 1; e1: only Δ1 (−2) → −2; e2: (3·2/3 + 1·1/3)/(2/3 + 1/3) = 7/3;
    # e3: Δ1 = 0 never agrees, Δ2 → 2
    assert_close(run("sce", [S1, S2]), t(1.0, -2.0, 7 / 3, 2.0))


def test_sce_ignores_user_weights() -> None:
    assert torch.equal(run("sce", [S1, S2], [1.0, 100.0]), run("sce", [S1, S2], [0.0, 0.0]))


def test_sce_select_topk_keeps_the_entries_that_vary_most() -> None:
    # Δ1 = [1, −2, 3, 0], Δ2 = [0, −5, 2, 2]: population variances ((a − b)/2)² = [0.25, 2.25, 0.25, 1], all 4
    # nonzero → k = ⌊0.5·4⌋ = 2: e1 and e3. Selected Δ'1 = [0, −2, 0, 0], Δ'2 = [0, −5, 0, 2]
    # energies 4/4 = 1 and (25 + 4)/4 = 7.25 → weights 4/33, 29/33 (on the selected entries)
    # e1: sum −7 → −, both agree: (−2·4/33 − 5·29/33)/1 = −153/33 = −51/11; e3: only Δ2 → 2; e0, e2: 0
    out = run("sce", [[1.0, -2.0, 3.0, 0.0], [0.0, -5.0, 2.0, 2.0]], select_topk=0.5)
    assert_close(out, t(0.0, -51 / 11, 0.0, 2.0))


def test_sce_topk_count_is_taken_in_fp32_as_mergekit_takes_it() -> None:
    # 90 entries vary (distinct variances (i/2)²): 0.7 × 90 = 62.99999999999999 in double but 63.0 in fp32
    deltas = torch.stack([torch.arange(1.0, 91.0), torch.zeros(90)])
    mask = variance_topk_mask(deltas, 0.7)
    assert int(mask.sum()) == 63 and torch.equal(mask, (torch.arange(90) >= 27).float())


def test_sce_counts_only_entries_that_vary() -> None:
    # only e0, e1 vary (e2 is equal in both inputs) → k = ⌊0.5·2⌋ = 1: e1 (variance 4 > 1)
    mask = variance_topk_mask(torch.tensor([[2.0, 4.0, 7.0], [0.0, 0.0, 7.0]]), 0.5)
    assert torch.equal(mask, t(0.0, 1.0, 0.0))


def test_sce_tiny_energies_fall_back_to_equal_weights() -> None:
    # energies 1e-8 and (9e-8 + 1e-8)/2 = 5e-8 sum below 1e-6 → weights 1/2, 1/2 (energy weights would be 1/6, 5/6)
    # e0: both +: (1e-4 + 3e-4)/2 = 2e-4; e1: sum 0 elects +, only Δ1 agrees → 1e-4
    out = run("sce", [[1e-4, 1e-4], [3e-4, -1e-4]])
    assert_close(out, t(2e-4, 1e-4))


def test_sce_edge_cases() -> None:
    d = [[0.5, -0.25, 0.0]]
    assert_close(run("sce", d), t(0.5, -0.25, 0.0))  # one input, select_topk 1: Δ1
    assert torch.equal(run("sce", d, select_topk=0.5), torch.zeros(3))  # one input has no variance: nothing kept
    # select_topk 0.2 of 3 varying entries is k = 0: nothing kept, the base
    assert torch.equal(run("sce", [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], select_topk=0.2), torch.zeros(3))
    # opposite deltas of equal mass: sum 0 elects +, only the positive one agrees and keeps its full value
    assert_close(run("sce", [[0.5, -0.5], [-0.5, 0.5]]), t(0.5, 0.5))


@pytest.mark.parametrize("value", [0, -0.5, 1.5, float("nan"), "all", True])
def test_sce_bad_select_topk_is_refused(value: Any) -> None:
    with pytest.raises(InputError, match="'?select_topk'? must be") as e:  # NaN: make_params says "finite"
        get_method("sce").make_params({"select_topk": value})
    assert e.value.hint


# --- Arcee Fusion --------------------------------------------------------------------------------------------------
def test_arcee_fusion_keeps_entries_past_the_outlier_fence_of_importance() -> None:
    # base 0. Row 0: Δ = [1, 2, 4, 5] changes the row's softmax, KL k > 0, importances k·[1, 2, 4, 5].
    # Row 1: Δ = 10 everywhere, a uniform shift the softmax does not see: KL 0, importances 0.
    # Sorted [0, 0, 0, 0, k, 2k, 4k, 5k], N = 8: Q1 = s[⌊7/4⌋ = 1] = 0, median s[3] = 0, Q3 s[5] = 2k
    # → threshold 0 + 1.5·2k = 3k: only 4 and 5 move; the largest change (row 1) keeps the base
    delta = [[1.0, 2.0, 4.0, 5.0], [10.0, 10.0, 10.0, 10.0]]
    out = run("arcee_fusion", [delta], base=torch.zeros(2, 4))
    assert torch.equal(out, torch.tensor([[0.0, 0.0, 4.0, 5.0], [0.0, 0.0, 0.0, 0.0]]))


def test_arcee_fusion_one_row_thresholds_on_magnitude() -> None:
    # a 1-D tensor is one row: one KL k > 0, importances k·|Δ|. Sorted |Δ| [0.01, 0.02, 0.03, 0.04, 1], N = 5:
    # Q1 = s[1], median s[2], Q3 s[3] → threshold k·(0.03 + 1.5·0.02) = 0.06k: only 1.0 moves
    out = run("arcee_fusion", [[0.01, -0.02, 0.03, 0.04, 1.0]], base=[0.1, 0.0, -0.1, 0.2, 0.0])
    assert torch.equal(out, t(0.0, 0.0, 0.0, 0.0, 1.0))


def test_arcee_fusion_edge_cases() -> None:
    base = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(run("arcee_fusion", torch.zeros(1, 3, 4), base=base), torch.zeros(3, 4))
    # one row, equal |Δ| everywhere: equal importances, Q1 = Q3 = median = the threshold, every entry moves
    assert torch.equal(run("arcee_fusion", [[0.5] * 6], base=[0.0, 1.0] * 3), torch.full((6,), 0.5))


def test_arcee_fusion_takes_no_parameters() -> None:
    with pytest.raises(InputError, match="unknown parameter 'density'"):
        get_method("arcee_fusion").make_params({"density": 0.5})


# --- slice by slice and through the engine ---------------------------------------------------------------------------
STEPPED = [("sce", {}), ("sce", {"select_topk": 0.3}), ("ram", {}), ("ram", {"epsilon": 0.01})]


@pytest.mark.parametrize("method,params", STEPPED, ids=[f"{m}-{p}" for m, p in STEPPED])
def test_slices_give_what_one_call_gives(method: str, params: dict) -> None:
    """``prepare`` on the whole tensor, ``apply`` on slices of 7 entries: bit for bit the method's own result."""
    info = get_method(method)
    g = torch.Generator().manual_seed(3)
    deltas = (torch.randn(3, 9, 10, generator=g) * 0.05).bfloat16().float()  # bf16 steps: many equal values
    job, p = TensorJob("t", deltas, torch.ones(3)), info.make_params(params)
    want = info.fn(job, p).reshape(-1)
    ctx = info.steps.prepare(job, p) if info.steps.prepare else None
    flat = deltas.reshape(3, -1)
    got = torch.cat(
        [
            info.steps.apply(dataclasses.replace(job, deltas=flat[:, s : s + 7]), p, ctx, slice(s, min(s + 7, 90)))
            for s in range(0, 90, 7)
        ]
    )
    assert torch.equal(got, want)


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A tiny Llama base (tied embeddings) and two full fine-tunes of it."""
    root = tmp_path_factory.mktemp("family_new_a")
    base = save(build(llama_config()), root / "base")
    fts = []
    for seed in (21, 22):
        m = load(base)
        finetune_like(m, seed=seed)
        fts.append(save(m, root / f"ft{seed}"))
    return base, fts[0], fts[1]


def _state(path: Path) -> dict[str, torch.Tensor]:
    with Checkpoint(path) as c:
        return {n: c.get(n) for n in c.names()}


ENGINE = [("sce", {"select_topk": 0.5}, 2), ("ram", {}, 2), ("arcee_fusion", {}, 1)]


@pytest.mark.parametrize("method,params,n", ENGINE, ids=[m for m, _, _ in ENGINE])
def test_engine_equals_the_method_on_whole_tensors(family, tmp_path, monkeypatch, method, params, n) -> None:
    """The engine (slices of 1000 entries, two threads) gives bit for bit base + the method on each whole tensor."""
    from skillgraft.merge import steps

    base, *fts = family
    fts = fts[:n]
    cfg = from_dict({"base": str(base), "method": method, "parameters": params,
                     "inputs": [{"source": str(f), "weight": 0.6} for f in fts]})  # fmt: skip
    monkeypatch.setattr(steps, "SLICE", 1000)
    monkeypatch.setattr("skillgraft.merge.engine.SLICE", 1000)
    merge(cfg, MergeOptions(out=tmp_path / "out", threads=2))
    got, b, states = _state(tmp_path / "out"), _state(base), [_state(f) for f in fts]
    info = get_method(method)
    changed = 0
    for name, b_t in b.items():
        b32 = b_t.float()
        deltas = torch.stack([s[name].float() - b32 for s in states])
        job = TensorJob(name, deltas, torch.full((n,), 0.6), base=b32 if info.needs_base else None)
        want = (b32 + info.fn(job, info.make_params(params))).to(b_t.dtype)
        assert torch.equal(got[name], want), name
        changed += not torch.equal(got[name], b_t)
    assert changed > 0


def test_arcee_fusion_with_two_inputs_is_refused_before_reading(family, tmp_path) -> None:
    from skillgraft.merge.plan import plan_merge

    base, ft1, ft2 = family
    cfg = from_dict({"base": str(base), "method": "arcee_fusion", "inputs": [str(ft1), str(ft2)]})
    with pytest.raises(InputError, match="arcee_fusion"):
        plan_merge(cfg, MergeOptions(out=tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_mergekit_yaml_maps_the_three_methods(family) -> None:
    base, ft1, ft2 = family
    models = [{"model": str(ft1), "parameters": {"weight": 0.6, "select_topk": 0.4}}, {"model": str(ft2)}]
    with pytest.raises(InputError, match="select_topk"):  # a per-model value must be the same for all models
        from_dict({"merge_method": "sce", "base_model": str(base), "models": models})
    sce = from_dict({"merge_method": "sce", "base_model": str(base), "models": [{"model": str(ft1)}],
                     "parameters": {"select_topk": 0.4, "int8_mask": True}})  # fmt: skip
    assert (sce.method, sce.parameters) == ("sce", {"select_topk": 0.4})
    ram = from_dict({"merge_method": "ram", "base_model": str(base), "models": [{"model": str(ft1)}],
                     "parameters": {"epsilon": 1e-4}})  # fmt: skip
    assert (ram.method, ram.parameters) == ("ram", {"epsilon": 1e-4})
    fusion = from_dict({"merge_method": "arcee_fusion", "base_model": str(base),
                        "models": [{"model": str(base)}, {"model": str(ft1)}]})  # fmt: skip
    assert fusion.method == "arcee_fusion" and [i.source for i in fusion.inputs] == [str(ft1)]
