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


def _hand_stats(model_dir, tok_dir, examples, n, name):
    """Reference statistics computed here by hand on the model loaded from disk: the diagonal Fisher of ``name``
    (mean over rows of the squared gradient of the target tokens' loss) and the Gram XᵀX of the inputs of the
    Linear layer owning ``name`` (every token of prompt + target)."""
    from transformers import AutoTokenizer

    from skillgraft.merge.stats import read_examples

    tok = AutoTokenizer.from_pretrained(tok_dir)
    model = load(model_dir).float()
    param = dict(model.named_parameters())[name]
    module = model.get_submodule(name.removesuffix(".weight"))
    fisher, xs = torch.zeros_like(param), []
    handle = module.register_forward_hook(lambda m, inp, out: xs.append(inp[0].detach().reshape(-1, inp[0].shape[-1])))
    for prompt, target in read_examples(examples, n):
        p_ids = tok(prompt, add_special_tokens=False).input_ids
        ids = torch.tensor([p_ids + tok(target, add_special_tokens=False).input_ids])
        labels = ids.clone()
        labels[0, : len(p_ids)] = -100
        model.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        fisher += param.grad**2
    handle.remove()
    x = torch.cat(xs)
    return fisher / n, x.T @ x


def test_fisher_and_gram_statistics_match_a_hand_computation(setup, tmp_path):
    base, fts, ex = setup
    name = "model.layers.1.mlp.up_proj.weight"
    for method in ("fisher", "regmean"):
        plan = plan_merge(_cfg(setup, method), MergeOptions(out=tmp_path / "o"))
        try:
            stats = compute_stats(plan)
            for i, ft in enumerate(fts):
                fisher, gram = _hand_stats(ft, base, ex, 8, name)
                want = fisher if method == "fisher" else gram
                assert want.abs().sum() > 0
                torch.testing.assert_close(stats[i].get(name), want, rtol=2e-4, atol=1e-7)
        finally:
            plan.close()


def test_fisher_and_regmean_merge_match_their_formulas(setup, tmp_path):
    """The merged weights equal the documented formulas applied to the hand-computed statistics:
    Fisher Σ F̃ᵢθᵢ / Σ F̃ᵢ (F̃ = max(F/‖F‖, 1e-6)), RegMean W₀ + (Σ ΔᵢG̃ᵢ)(Σ G̃ᵢ)⁻¹ (G̃ off-diagonals × 0.95)."""
    base, fts, ex = setup
    name = "model.layers.1.mlp.up_proj.weight"
    for method in ("fisher", "regmean", "linear"):
        merge(_cfg(setup, method), MergeOptions(out=tmp_path / method))
    with Checkpoint(base) as b, Checkpoint(fts[0]) as a1, Checkpoint(fts[1]) as a2:
        w0, ws = b.get(name).double(), [a1.get(name).double(), a2.get(name).double()]
    hand = [_hand_stats(ft, base, ex, 8, name) for ft in fts]
    f = [(fi / fi.norm()).clamp_min(1e-6).double() for fi, _ in hand]
    fisher_want = (f[0] * ws[0] + f[1] * ws[1]) / (f[0] + f[1])
    g = [0.95 * gi.double() + 0.05 * torch.diag_embed(torch.diagonal(gi.double())) for _, gi in hand]
    regmean_want = w0 + ((ws[0] - w0) @ g[0] + (ws[1] - w0) @ g[1]) @ torch.linalg.inv(g[0] + g[1])
    with (
        Checkpoint(tmp_path / "fisher") as fi,
        Checkpoint(tmp_path / "regmean") as rm,
        Checkpoint(tmp_path / "linear") as lin,
    ):
        torch.testing.assert_close(fi.get(name).double(), fisher_want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(rm.get(name).double(), regmean_want, rtol=1e-4, atol=1e-4)
        avg = lin.get(name).double()
        # and neither is the plain average: the statistics moved them by more than the tolerance above
        spread = (ws[0] - ws[1]).abs().max()
        for other in (fisher_want, regmean_want):
            assert (other - avg).abs().max() > 0.01 * spread


def test_missing_examples_refused(setup, tmp_path):
    base, fts, _ = setup
    cfg = from_dict({"base": str(base), "method": "fisher", "inputs": [str(f) for f in fts]})
    with pytest.raises(ValueError, match="needs examples"):
        plan_merge(cfg, MergeOptions(out=tmp_path / "o"))
