"""Logit-arithmetic transfer: identities that pin the semantics, batching, and the shared-vocabulary check."""

from __future__ import annotations

import pytest
import torch
from conftest import build, finetune_like, llama_config

from skillgraft.errors import InputError, MismatchError
from skillgraft.transfer import ExpertPair, FusedModel, GenerationSpec

PROMPTS = ["abc>", "ba hd>", "hgfedcb>", "a>"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from skillgraft.bench.tokenizer import make_tokenizer

    tok = make_tokenizer()
    v = len(tok)
    large = build(llama_config(vocab_size=v + 3, hidden_size=96), seed=1)  # padded output layer
    small = build(llama_config(vocab_size=v), seed=2)
    expert = build(llama_config(vocab_size=v), seed=2)
    finetune_like(expert, seed=9, scale=0.5)
    return tok, large, small, expert


def _hf_greedy(model, tok, prompts, n):
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    out = model.generate(
        **enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id
    )
    return [tok.decode(_cut(row.tolist(), tok), skip_special_tokens=True) for row in out[:, enc.input_ids.shape[1] :]]


def _cut(ids, tok):
    return ids[: ids.index(tok.eos_token_id)] if tok.eos_token_id in ids else ids


@pytest.mark.parametrize("method", ["proxy", "eft", "dlf"])
def test_alpha_zero_is_the_large_base(models, method):
    """α = 0 gives the large base. DLF chooses α itself (in [0, 2]), so its analogue is an expert that equals
    its small base: whatever α it picks, the steer is zero and the output is the large base's."""
    tok, large, small, expert = models
    pair = ExpertPair(small, small, alpha=1.0) if method == "dlf" else ExpertPair(expert, small, alpha=0.0)
    fused = FusedModel(large, tok, [pair], method=method, dlf_grid=11)
    got = fused.generate(PROMPTS, GenerationSpec(max_new_tokens=6))
    assert got == _hf_greedy(large, tok, PROMPTS, 6)
    if method == "dlf":
        assert fused.last_alphas and all(((a >= 0) & (a <= 2)).all() for a in fused.last_alphas)


def test_dlf_refuses_an_explicit_alpha_and_non_finite_alphas_are_refused():
    from skillgraft.transfer.load import ExpertSpec, TransferSpec

    with pytest.raises(InputError, match="dlf chooses α at every step"):
        TransferSpec("large", (ExpertSpec.parse("tuned:base:0.5"),), method="dlf")
    TransferSpec("large", (ExpertSpec.parse("tuned:base"),), method="dlf")  # no α given: fine
    TransferSpec("large", (ExpertSpec.parse("tuned:base:0.5"),), method="proxy")
    for bad in ("inf", "nan", "-inf"):
        with pytest.raises(InputError, match="finite"):
            ExpertSpec.parse(f"tuned:base:{bad}")


@pytest.mark.parametrize("method", ["proxy", "eft"])
def test_small_base_as_large_with_alpha_one_is_the_expert(models, method):
    tok, _, small, expert = models
    fused = FusedModel(small, tok, [ExpertPair(expert, small, alpha=1.0)], method=method)
    assert fused.generate(PROMPTS, GenerationSpec(max_new_tokens=6)) == _hf_greedy(expert, tok, PROMPTS, 6)


def test_batched_equals_one_by_one(models):
    tok, large, small, expert = models
    fused = FusedModel(large, tok, [ExpertPair(expert, small, alpha=0.8)], method="dlf")
    batched = fused.generate(PROMPTS, GenerationSpec(max_new_tokens=6))
    single = [fused.generate([p], GenerationSpec(max_new_tokens=6))[0] for p in PROMPTS]
    assert batched == single


@pytest.mark.parametrize("method,k", [("proxy", 1), ("proxy", 4), ("eft", 3), ("dlf", 2), ("dlf", 5)])
def test_speculative_equals_plain_greedy(models, method, k):
    """Drafting and one-forward verification change how many positions a large forward covers, never the
    tokens: the output equals the plain loop's, token for token (batched, with a stop string and max tokens)."""
    tok, large, small, expert = models
    pairs = [ExpertPair(expert, small, alpha=0.8)]
    for spec in (GenerationSpec(max_new_tokens=11), GenerationSpec(max_new_tokens=9, stop=("b",))):
        plain = FusedModel(large, tok, pairs, method=method).generate(PROMPTS, spec)
        fast = FusedModel(large, tok, pairs, method=method, speculate=k)
        assert fast.generate(PROMPTS, spec) == plain
        rounds, accepted = fast.draft_stats  # accepted drafts are summed over rows
        assert rounds >= 1 and 0 <= accepted <= rounds * k * len(PROMPTS)


def test_speculative_accepts_every_draft_when_drafts_are_exact(models):
    """With the small base standing in for the large model and α = 1, the draft (the expert) is the fused
    distribution itself, so every row accepts every draft: 12 tokens take ⌈11 / (k + 1)⌉ rounds."""
    tok, _, small, expert = models
    eos = tok.eos_token_id
    tok.eos_token_id = None  # decode all 12 tokens
    try:
        fused = FusedModel(small, tok, [ExpertPair(expert, small, alpha=1.0)], method="proxy", speculate=3)
        out = fused.generate(PROMPTS, GenerationSpec(max_new_tokens=12))
    finally:
        tok.eos_token_id = eos
    assert fused.draft_stats == (3, (3 + 3 + 2) * len(PROMPTS))  # rounds of 4, 4 and 3 tokens after the first
    assert fused.tokens_generated == 12 * len(PROMPTS) and len(out) == len(PROMPTS)


def test_speculative_refuses_sampling(models):
    tok, large, small, expert = models
    fused = FusedModel(large, tok, [ExpertPair(expert, small)], method="proxy", speculate=2)
    with pytest.raises(InputError, match="greedy only"):
        fused.generate(PROMPTS, GenerationSpec(max_new_tokens=4, temperature=0.7))


def test_sampling_is_seeded(models):
    tok, large, small, expert = models
    fused = FusedModel(large, tok, [ExpertPair(expert, small)], method="proxy")
    spec = GenerationSpec(max_new_tokens=8, temperature=1.0, top_p=0.9, top_k=10, seed=3)
    assert fused.generate(PROMPTS, spec) == fused.generate(PROMPTS, spec)


def test_loglik_alpha_zero_matches_large_model(models):
    tok, large, small, expert = models
    fused = FusedModel(large, tok, [ExpertPair(expert, small, alpha=0.0)], method="eft")
    ((total, n),) = fused.loglik([("ab c>", "cba")])
    ids = tok("ab c>cba", add_special_tokens=False).input_ids
    with torch.no_grad():
        lp = torch.log_softmax(large(input_ids=torch.tensor([ids])).logits[0, :, : len(tok)], -1)
    expected = sum(float(lp[i - 1, ids[i]]) for i in range(len(ids) - 3, len(ids)))
    assert n == 3 and total == pytest.approx(expected, abs=1e-4)


def test_mismatched_tokenizers_refused(models, tmp_path):
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tm
    from transformers import PreTrainedTokenizerFast

    tok, large, small, expert = models
    vocab = dict(tok.get_vocab())
    a, b = sorted(vocab, key=vocab.get)[5:7]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    t = Tokenizer(tm.WordLevel(vocab, unk_token="<pad>"))
    t.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    other = PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", eos_token="<eos>")
    with pytest.raises(MismatchError, match="tokenizers differ at id"):
        FusedModel(large, tok, [ExpertPair(expert, small)], tokenizers={"expert": other})


def test_cli_generate_with_skill_expert(models, tmp_path, capsys):
    import json

    from skillgraft import ExtractSpec, extract
    from skillgraft.cli.main import main

    tok, large, small, expert = models
    for name, m in (("large", large), ("small", small), ("expert", expert)):
        m.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    extract(ExtractSpec(base=tmp_path / "small", tuned=tmp_path / "expert", out=tmp_path / "e.skill", dense=True))
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS))
    outs = []
    # a model directory, or a skill pack applied to the small base in memory (also in the second process of
    # --parallel); then speculative decoding
    runs = (("expert", []), ("e.skill", []), ("e.skill", ["--parallel"]), ("expert", ["--speculate", "3"]))
    for e, extra in runs:
        argv = [
            "-q",
            "generate",
            "--base",
            str(tmp_path / "small"),
            "--expert",
            f"{tmp_path / e}:{tmp_path / 'small'}:1",
            "--prompts",
            str(tmp_path / "p.jsonl"),
            "--max-new-tokens",
            "6",
            "--json",
            *extra,
        ]
        assert main(argv) == 0
        report = json.loads(capsys.readouterr().out)
        outs.append([r["output"] for r in report["results"]])
    assert outs[0] == outs[1] == outs[2] == outs[3] == _hf_greedy(expert, tok, PROMPTS, 6)
    assert report["draft_rounds"] >= 1 and report["drafts_accepted"] >= 1
    assert main([*argv, "--temperature", "0.5"]) == 2  # argv ends with --speculate 3: refused before loading
    assert "greedy only" in capsys.readouterr().err
    small = str(tmp_path / "small")
    for bad, text in ((f"nope.skill:{small}", "nope.skill"), (f"{small}:missing-dir", "missing-dir")):
        argv = ["generate", "--base", str(tmp_path / "large"), "--expert", bad, "--prompts", str(tmp_path / "p.jsonl")]
        assert main(argv) == 3
        assert text in capsys.readouterr().err


def test_eval_with_experts_uses_the_fused_model(models, tmp_path, capsys):
    """`skillgraft eval LARGE --expert …` measures transfer with the same harness: with the small base as LARGE
    and α = 1 the fused scores equal the expert's own scores."""
    import json

    from skillgraft.cli.main import main

    tok, _, small, expert = models
    for name, m in (("small", small), ("expert", expert)):
        m.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    rows = [{"prompt": p, "target": "ab"} for p in PROMPTS]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    common = ["-q", "eval", "--tasks", str(tmp_path / "t.jsonl"), "--json", "--samples"]
    assert main([*common[:2], str(tmp_path / "expert"), *common[2:]]) == 0
    direct = json.loads(capsys.readouterr().out)
    argv = [
        *common[:2],
        str(tmp_path / "small"),
        *common[2:],
        "--expert",
        f"{tmp_path / 'expert'}:{tmp_path / 'small'}:1",
    ]
    assert main([*argv, "--method", "eft"]) == 0
    fused = json.loads(capsys.readouterr().out)
    (d,), (f,) = direct["tasks"].values(), fused["tasks"].values()
    assert [s["prediction"] for s in d["samples"]] == [s["prediction"] for s in f["samples"]]
    assert f["mean_loglik"] == pytest.approx(d["mean_loglik"], abs=1e-3)


def test_prompt_gate_is_the_likelihood_gain_posterior(models):
    """Several experts: each row's gate is softmax over experts of Σ log p_expert − log p_base over its own prompt
    tokens, left padding excluded (checked against unpadded forwards, one prompt at a time)."""
    from skillgraft.transfer.combine import prompt_gate

    tok, large, small, expert = models
    other = build(llama_config(vocab_size=len(tok)), seed=4)
    fused = FusedModel(large, tok, [ExpertPair(expert, small), ExpertPair(other, small)], method="dlf", gate=True)
    fused.generate(PROMPTS, GenerationSpec(max_new_tokens=2))
    got = fused._gate
    for r, p in enumerate(PROMPTS):
        ids = torch.tensor([tok(p).input_ids])
        z = {m: m(input_ids=ids).logits for m in (small, expert, other)}
        want = prompt_gate(ids, torch.ones_like(ids), [z[expert], z[other]], [z[small], z[small]])[0]
        torch.testing.assert_close(got[r], want, rtol=1e-4, atol=1e-5)
    assert torch.allclose(got.sum(1), torch.ones(len(PROMPTS)))


def test_gate_keeps_single_expert_results_and_speculation(models):
    tok, large, small, expert = models
    one = [ExpertPair(expert, small, alpha=0.8)]
    spec = GenerationSpec(max_new_tokens=8)
    plain = FusedModel(large, tok, one, method="dlf").generate(PROMPTS, spec)
    assert FusedModel(large, tok, one, method="dlf", gate=True).generate(PROMPTS, spec) == plain  # gate ≡ 1
    two = [ExpertPair(expert, small), ExpertPair(build(llama_config(vocab_size=len(tok)), seed=4), small)]
    gated = FusedModel(large, tok, two, method="dlf", gate=True).generate(PROMPTS, spec)
    assert FusedModel(large, tok, two, method="dlf", gate=True, speculate=3).generate(PROMPTS, spec) == gated


@pytest.mark.parametrize("method", ["proxy", "dlf"])
def test_parallel_equals_sequential(models, method):
    """The small models decoding in a second process give the same tokens as the one-process loop (greedy and
    seeded sampling, two experts sharing a base, a stop string), and the worker survives several batches."""
    tok, large, small, expert = models
    pairs = [ExpertPair(expert, small, alpha=0.8), ExpertPair(small, expert, alpha=0.3)]
    specs = [
        GenerationSpec(max_new_tokens=9),
        GenerationSpec(max_new_tokens=7, stop=("b",)),
        GenerationSpec(max_new_tokens=8, temperature=0.9, top_p=0.95, seed=4),
    ]
    plain = FusedModel(large, tok, pairs, method=method)
    threads = torch.get_num_threads()
    with FusedModel(large, tok, pairs, method=method, parallel=True) as fast:
        for spec in specs:
            assert fast.generate(PROMPTS, spec) == plain.generate(PROMPTS, spec)
        assert fast.generate(PROMPTS[:1], specs[0]) == plain.generate(PROMPTS[:1], specs[0])
        assert torch.get_num_threads() == threads  # restored after each call
    assert fast._worker is None  # closed on exit


def test_parallel_refuses_speculation_and_gate(models):
    tok, large, small, expert = models
    for kw in ({"speculate": 2}, {"gate": True}):
        with pytest.raises(InputError, match="parallel decoding does not combine"):
            FusedModel(large, tok, [ExpertPair(expert, small)], parallel=True, **kw)


def test_parallel_worker_failure_is_one_error(models):
    """A worker that cannot run its models reports the failure instead of hanging."""
    from skillgraft.transfer.parallel import WorkerError

    tok, large, small, expert = models
    with FusedModel(large, tok, [ExpertPair(expert, small)], parallel=True) as fast:
        fast.generate(PROMPTS[:2], GenerationSpec(max_new_tokens=2))
        worker = fast._worker[0]
        worker._proc.kill()
        worker._proc.join()
        with pytest.raises(WorkerError, match="small-model process"):
            fast.generate(PROMPTS[:2], GenerationSpec(max_new_tokens=2))


# Chat templates: each model formats the prompt with its own tokenizer's template (here: different task tags).
LARGE_CHAT = "{% for m in messages %}[rev] {{ m['content'] }}{% endfor %}{% if add_generation_prompt %}>{% endif %}"
SMALL_CHAT = "{% for m in messages %}[rot] {{ m['content'] }}{% endfor %}{% if add_generation_prompt %}>{% endif %}"
CHAT_PROMPTS = ["abc", "ba hd", "hgfedcb", "a"]


@pytest.fixture(scope="module")
def chat_toks(models):
    import copy

    tok = models[0]
    large_tok, small_tok = copy.deepcopy(tok), copy.deepcopy(tok)
    large_tok.chat_template, small_tok.chat_template = LARGE_CHAT, SMALL_CHAT
    return large_tok, small_tok


def test_chat_each_model_formats_its_own_prompt(models, chat_toks):
    """α = 0 gives the large model's greedy output on *its* template; the small base as the large model with α = 1
    gives the expert's on the small template; the two templates reach the models as different tokens."""
    tok, large, small, expert = models
    large_tok, small_tok = chat_toks
    own = {id(large): large_tok, id(small): small_tok, id(expert): small_tok}
    spec = GenerationSpec(max_new_tokens=6)
    fused = FusedModel(large, tok, [ExpertPair(expert, small, alpha=0.0)], chat=True, model_tokenizers=own)
    assert fused.generate(CHAT_PROMPTS, spec) == _hf_greedy(large, tok, [f"[rev] {p}>" for p in CHAT_PROMPTS], 6)
    enc = fused._encodings(CHAT_PROMPTS[:1], [large, small])
    assert tok.decode(enc[id(large)][0][0]) != tok.decode(enc[id(small)][0][0])
    as_expert = FusedModel(small, tok, [ExpertPair(expert, small, alpha=1.0)], chat=True, model_tokenizers=own)
    assert as_expert.generate(CHAT_PROMPTS, spec) == _hf_greedy(expert, tok, [f"[rot] {p}>" for p in CHAT_PROMPTS], 6)
    # log-likelihoods use the same per-model formatting
    ((total, n),) = FusedModel(large, tok, [ExpertPair(expert, small, 0.0)], "eft", chat=True, model_tokenizers=own
                               ).loglik([("ab c", "cba")])  # fmt: skip
    ((plain, m),) = FusedModel(large, tok, [ExpertPair(expert, small, 0.0)], "eft").loglik([("[rev] ab c>", "cba")])
    assert n == m == 3 and total == pytest.approx(plain, abs=1e-5)


def test_chat_parallel_equals_sequential_and_refusals(models, chat_toks):
    tok, large, small, expert = models
    large_tok, small_tok = chat_toks
    own = {id(large): large_tok, id(small): small_tok, id(expert): small_tok}
    pairs = [ExpertPair(expert, small, alpha=0.7)]
    spec = GenerationSpec(max_new_tokens=7)
    plain = FusedModel(large, tok, pairs, chat=True, model_tokenizers=own).generate(CHAT_PROMPTS, spec)
    with FusedModel(large, tok, pairs, chat=True, model_tokenizers=own, parallel=True) as fast:
        assert fast.generate(CHAT_PROMPTS, spec) == plain
    with pytest.raises(InputError, match="has no chat template"):
        FusedModel(large, tok, pairs, chat=True).generate(CHAT_PROMPTS, spec)  # the bare tokenizer has none
    with pytest.raises(InputError, match="chat-formatted prompts do not combine"):
        FusedModel(large, tok, pairs, chat=True, speculate=2)


def test_cli_generate_chat_uses_each_models_saved_template(models, chat_toks, tmp_path, capsys):
    import json

    from skillgraft.cli.main import main

    tok, large, small, expert = models
    large_tok, small_tok = chat_toks
    for name, m, t in (("large", large, large_tok), ("small", small, small_tok), ("expert", expert, small_tok)):
        m.save_pretrained(tmp_path / name)
        t.save_pretrained(tmp_path / name)
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in CHAT_PROMPTS))
    argv = ["-q", "generate", "--base", str(tmp_path / "large"), "--expert",
            f"{tmp_path / 'expert'}:{tmp_path / 'small'}:0", "--prompts", str(tmp_path / "p.jsonl"),
            "--max-new-tokens", "5", "--json", "--chat"]  # fmt: skip
    assert main(argv) == 0
    outs = [r["output"] for r in json.loads(capsys.readouterr().out)["results"]]
    assert outs == _hf_greedy(large, tok, [f"[rev] {p}>" for p in CHAT_PROMPTS], 5)
    assert main([*argv, "--speculate", "2"]) == 2  # refused before any model loads
    assert "chat-formatted prompts do not combine" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "large"), "--tasks", str(tmp_path / "p.jsonl"), "--chat"]) == 2
    assert "--chat and --parallel apply to transfer only" in capsys.readouterr().err
