"""Fisher and RegMean merges end to end: statistics from a JSONL of examples on tiny Llama checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build, finetune_like, llama_config, load, save

from skillgraft.io.checkpoint import Checkpoint
from skillgraft.merge.config import from_dict
from skillgraft.merge.engine import MergeOptions, merge, plan_merge
from skillgraft.merge.stats import compute_stats


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from skillgraft.bench.skills import examples as bench_examples
    from skillgraft.bench.tokenizer import make_tokenizer

    root = tmp_path_factory.mktemp("stats")
    base = root / "base"
    tok = make_tokenizer()
    tok.save_pretrained(base)
    m = build(llama_config(vocab_size=len(tok)))
    save(m, base)
    fts = []
    for seed in (1, 2):
        m2 = load(base)
        finetune_like(m2, seed=seed)
        fts.append(save(m2, root / f"ft{seed}"))
    examples = root / "examples.jsonl"
    examples.write_text("\n".join(json.dumps(r) for r in bench_examples("reverse", "train", 16, 0)))
    return base, fts, examples


def _cfg(setup, method, inputs=None, **params):
    base, fts, ex = setup
    return from_dict(
        {
            "base": str(base),
            "method": method,
            "inputs": [str(f) for f in (inputs or fts)],
            "examples": str(ex),
            "num_examples": 8,
            "parameters": params,
        }
    )


def test_gram_statistics_are_input_covariances(setup, tmp_path):
    plan = plan_merge(_cfg(setup, "regmean"), MergeOptions(out=tmp_path / "o"))
    try:
        stats = compute_stats(plan)
        g = stats[0].get("model.layers.0.self_attn.q_proj.weight")
        assert g is not None and g.shape == (64, 64)
        torch.testing.assert_close(g, g.T)
        assert torch.linalg.eigvalsh(g.double()).min() > -1e-3  # positive semi-definite
        assert stats[0].get("model.norm.weight") is None  # not a Linear input
    finally:
        plan.close()


def test_regmean_single_input_returns_it(setup, tmp_path):
    base, fts, _ = setup
    merge(_cfg(setup, "regmean", inputs=fts[:1]), MergeOptions(out=tmp_path / "o"))
    with Checkpoint(fts[0]) as a, Checkpoint(tmp_path / "o") as b:
        for n in a.names():
            torch.testing.assert_close(b.get(n), a.get(n), rtol=1e-4, atol=1e-5)


def test_fisher_and_regmean_differ_from_plain_average(setup, tmp_path):
    for method in ("fisher", "regmean", "linear"):
        merge(_cfg(setup, method), MergeOptions(out=tmp_path / method))
    name = "model.layers.0.mlp.up_proj.weight"
    with (
        Checkpoint(tmp_path / "linear") as lin,
        Checkpoint(tmp_path / "fisher") as fi,
        Checkpoint(tmp_path / "regmean") as rm,
    ):
        avg = lin.get(name)
        for other in (fi.get(name), rm.get(name)):
            assert torch.isfinite(other).all()
            assert not torch.allclose(other, avg, atol=1e-6)
            # both are weighted combinations: closer to the average than the average is to the base
            assert (other - avg).norm() < avg.norm()


def test_missing_examples_refused(setup, tmp_path):
    base, fts, _ = setup
    cfg = from_dict({"base": str(base), "method": "fisher", "inputs": [str(f) for f in fts]})
    with pytest.raises(ValueError, match="needs examples"):
        plan_merge(cfg, MergeOptions(out=tmp_path / "o"))
