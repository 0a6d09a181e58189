"""SkillRuntime: rows with different skills in one forward pass give each skill's own merged model's outputs."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from conftest import build, finetune_like, gpt2_config, llama_config, save

from skillgraft.errors import InputError, NotFoundError
from skillgraft.eval.generate import GenerateParams, generate, loglikelihood
from skillgraft.route.runtime import ARROW_MIX, SkillRuntime
from skillgraft.skill.apply import apply, unapply
from skillgraft.skill.extract import ExtractSpec, extract
from skillgraft.skill.peft import import_lora

PROMPTS = ["abc>", "ba hd>", "hgfedcb>", "a>", "dd>", "cab>"]


def _adapter(model, out, seed, **kw):
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(out)
    return pm.merge_and_unload().eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from skillgraft.bench.tokenizer import make_tokenizer

    root = tmp_path_factory.mktemp("rt")
    tok = make_tokenizer()
    base = build(llama_config(vocab_size=len(tok)), seed=3)
    base_dir = save(base, root / "base")
    merged, packs = {}, {}
    for name, seed, kw in [
        ("a", 1, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
        ("b", 2, dict(r=8, lora_alpha=8, target_modules=["k_proj", "o_proj", "up_proj"])),
    ]:
        merged[name] = _adapter(base, root / f"{name}-adapter", seed, **kw)
        import_lora(root / f"{name}-adapter", root / f"{name}.skill", base=base_dir)
        packs[name] = root / f"{name}.skill"
    tuned = copy.deepcopy(base)
    finetune_like(tuned, seed=5, scale=0.3)
    tuned_dir = save(tuned, root / "tuned")
    extract(ExtractSpec(base=base_dir, tuned=tuned_dir, out=root / "d.skill", budget=None, dense=True))
    packs["d"] = root / "d.skill"
    merged["d"] = tuned.eval()
    return tok, base.eval(), base_dir, merged, packs


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_mixed_rows_equal_each_skills_merged_model(setup):
    tok, base, _, merged, packs = setup
    rt = SkillRuntime(copy.deepcopy(base), tok)
    rt.load(packs["a"], key="a")
    rt.load(packs["b"], key="b")
    assert rt.lora_keys == ["a", "b"]
    ids = torch.randint(0, len(tok), (4, 7), generator=torch.Generator().manual_seed(0))
    with rt.rows([(("a", 1.0),), (("b", 1.0),), (), (("a", 1.0),)]):
        got = _logits(rt.model, ids)
    torch.testing.assert_close(got[0], _logits(merged["a"], ids[:1])[0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got[3], _logits(merged["a"], ids[3:])[0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got[1], _logits(merged["b"], ids[1:2])[0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got[2], _logits(base, ids)[2], atol=0, rtol=0)  # base row: + 0 exactly
    assert not torch.allclose(got[0], got[2], atol=1e-3)  # the skill does change the output
    # outside rows() the model is the base again
    torch.testing.assert_close(_logits(rt.model, ids), _logits(base, ids), atol=0, rtol=0)


def test_weighted_mix_is_one_slot_and_exact(setup):
    tok, base, _, _, packs = setup
    rt = SkillRuntime(copy.deepcopy(base), tok)
    rt.load(packs["a"], key="a")
    rt.load(packs["b"], key="b")
    ids = torch.randint(0, len(tok), (2, 5), generator=torch.Generator().manual_seed(1))
    mix = (("a", 0.5), ("b", -1.0))
    with rt.rows([mix, ()]):
        got = _logits(rt.model, ids)
    ref = copy.deepcopy(base)
    apply(ref, [(str(packs["a"]), 0.5), (str(packs["b"]), -1.0)], force=True)
    torch.testing.assert_close(got[0], _logits(ref, ids[:1])[0], atol=2e-5, rtol=1e-4)


def test_generate_and_loglik_mix_lora_rows_and_hot_swapped_dense(setup):
    tok, base, _, merged, packs = setup
    rt = SkillRuntime(copy.deepcopy(base), tok)
    for k in "abd":
        rt.load(packs[k], key=k)
    assert not rt.skills["d"].lora and rt.skills["a"].lora
    before = {n: t.clone() for n, t in rt.model.state_dict().items()}
    keys = ["a", "b", None, "d", "a", "d"]
    mixes = [((k, 1.0),) if k else () for k in keys]
    params = GenerateParams(max_new_tokens=5, batch_size=4)
    got = rt.generate(PROMPTS, mixes, params)
    for p, k, g in zip(PROMPTS, keys, got):
        ref = merged[k] if k else base
        assert g == generate(ref, tok, [p], params)[0]
    pairs = [(p, "xyz") for p in PROMPTS]
    ll = rt.loglik(pairs, mixes, batch_size=4)
    for pair, k, got_ll in zip(pairs, keys, ll):
        ref = merged[k] if k else base
        assert got_ll.total == pytest.approx(loglikelihood(ref, tok, [pair])[0].total, abs=1e-3)
    after = rt.model.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before)  # hot swap restored the base bit for bit


def test_unload_and_errors(setup):
    tok, base, _, _, packs = setup
    rt = SkillRuntime(copy.deepcopy(base), tok)
    rt.load(packs["a"], key="a")
    rt.load(packs["b"], key="b")
    with rt.rows([(("a", 0.3), ("b", 1.0))]):
        pass
    rt.unload("a")
    assert rt.lora_keys == ["b"] and all("a" not in dict(m) for m in rt._slots)
    with pytest.raises(NotFoundError, match="not loaded"):
        rt.generate(["a>"], [(("a", 1.0),)], GenerateParams(2))
    with pytest.raises(InputError, match="not a finite number"):
        rt.generate(["a>"], [(("b", float("nan")),)], GenerateParams(2))
    with pytest.raises(InputError, match="2 prompts but 1"):
        rt.generate(["a>", "b>"], [()], GenerateParams(2))
    rt.unload("b")
    assert not rt._hooks  # no skill left: no hook on any module


def test_arrow_token_routing_top1_equals_the_skill_on_its_own_direction(setup):
    """With top-1 Arrow and one skill loaded, every token picks it (softmax of one score is 1): the row equals
    the skill's merged model. With two, each token's choice follows |⟨v, x⟩|, and the output differs from both."""
    tok, base, _, merged, packs = setup
    rt = SkillRuntime(copy.deepcopy(base), tok, arrow_top_k=1)
    rt.load(packs["a"], key="a")
    ids = torch.randint(0, len(tok), (2, 6), generator=torch.Generator().manual_seed(2))
    with rt.rows([ARROW_MIX, ()]):
        got = _logits(rt.model, ids)
    torch.testing.assert_close(got[0], _logits(merged["a"], ids[:1])[0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got[1], _logits(base, ids)[1], atol=0, rtol=0)


def test_gpt2_conv1d_rows(tmp_path):
    base = build(gpt2_config(), seed=4).eval()
    base_dir = save(base, tmp_path / "base")
    m = _adapter(base, tmp_path / "ad", 3, r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    import_lora(tmp_path / "ad", tmp_path / "g.skill", base=base_dir)
    rt = SkillRuntime(copy.deepcopy(base), _Tok())
    assert rt.load(tmp_path / "g.skill", key="g").lora
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    with rt.rows([(("g", 1.0),), ()]):
        got = _logits(rt.model, ids)
    torch.testing.assert_close(got[0], _logits(m, ids[:1])[0], atol=2e-5, rtol=1e-4)
    unapply(rt.model)


class _Tok:
    pad_token_id = 0
    eos_token_id = 0


def _stack_bytes(rt, slots):
    """What the per-slot stacks must hold: per patched module, ``slots`` × (in + out) × the widest rank."""
    total = 0
    for name, m in rt._modules.items():
        rank = max(rt.skills[k].factors[name].rank for k in rt.lora_keys if name in rt.skills[k].factors)
        total += slots * (m.shape[0] + m.shape[1]) * rank * torch.finfo(m.dtype).bits // 8
    return total


def test_runtime_bytes_follow_the_skills_not_the_requests(setup):
    """The stacks hold one slot per LoRA skill (plus the base's zeros) and per weighted mix seen: serving more
    requests with the same skills adds nothing; a new weighted mix adds one slot; drop_mixes gives it back."""
    tok, base, _, _, packs = setup
    rt = SkillRuntime(copy.deepcopy(base), tok)
    rt.load(packs["a"], key="a")
    own = rt.nbytes()
    assert own == rt.skills["a"].nbytes  # stacks are built on first use
    rt.load(packs["b"], key="b")
    mixes = [(("a", 1.0),), (("b", 1.0),), ()] * 2
    params = GenerateParams(max_new_tokens=3, batch_size=6)
    rt.generate(PROMPTS, mixes, params)
    factors = rt.skills["a"].nbytes + rt.skills["b"].nbytes
    served = rt.nbytes()
    assert rt.mixes == 3 and served == factors + _stack_bytes(rt, 3)
    for _ in range(3):  # more requests, same skills: not a byte more
        rt.generate(PROMPTS[::-1], mixes[::-1], params)
    assert rt.nbytes() == served
    rt.generate(PROMPTS[:1], [(("a", 0.5), ("b", 0.5))], params)
    assert rt.mixes == 4 and rt.nbytes() == factors + _stack_bytes(rt, 4)
    rt.drop_mixes()
    rt.generate(PROMPTS, mixes, params)
    assert rt.mixes == 3 and rt.nbytes() == served
