"""Our ``mode: mergekit`` against numbers produced by mergekit 0.1.5 itself (see data/make_mergekit_golden.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from skillgraft.merge.registry import TensorJob, get_method

GOLDEN = Path(__file__).parent / "data" / "mergekit_golden.safetensors"


def _load() -> tuple[dict[str, torch.Tensor], list[dict]]:
    with safe_open(str(GOLDEN), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["mergekit"] == "0.1.5"
    return tensors, json.loads(meta["cases"])


TENSORS, CASES = _load()


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_matches_mergekit(case: dict) -> None:
    base = TENSORS["base"]
    deltas = torch.stack([TENSORS[f"ft{i}"] - base for i in range(3)])  # as mergekit: θᵢ − θ₀ in fp32
    info = get_method(case["method"])
    values = dict(case["params"])
    if "mode" in {f for f in info.params.__dataclass_fields__}:
        values["mode"] = "mergekit"
    if case["method"] == "ties":
        values.setdefault("normalize", True)
    params = info.make_params(values)
    rng = torch.Generator().manual_seed(case["seed"]) if case["seed"] is not None else None
    job = TensorJob("t", deltas, torch.tensor(case["weights"]), base=base, rng=rng)
    ours = base + info.fn(job, params)
    expected = TENSORS[f"out.{case['name']}"]
    if case["method"] == "linear":
        # mergekit averages θᵢ (Σ wᵢθᵢ / Σ wᵢ), we average Δᵢ and add θ₀: equal up to fp32 rounding.
        torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)
    else:
        # Same operations in the same order, same Bernoulli draws from the same seed: bit-exact.
        assert torch.equal(ours, expected), (ours - expected).abs().max()
