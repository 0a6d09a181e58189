"""The evaluation harness: load a base once, apply skills in memory, and score it on tasks.

``evaluate(spec)`` is what the CLI calls; ``evaluate_model(model, tokenizer, tasks)`` scores a model that is
already loaded (studies call it between ``apply``/``unapply``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from skillgraft.errors import InputError, NotFoundError
from skillgraft.eval import metrics
from skillgraft.eval.generate import GenerateParams, encode_pair, generate, loglikelihood
from skillgraft.eval.tasks import Task, resolve_tasks
from skillgraft.progress import ProgressFn, no_progress

MAX_NEW_TOKENS_MARGIN = 4  # generated beyond the longest target, so an over-long answer is seen as wrong


@dataclass(frozen=True)
class EvalSpec:
    """What to evaluate: a model directory plus ``(skill ref, weight)`` pairs, on task specs or ``Task`` objects.

    ``max_new_tokens`` overrides every task's generation limit; ``limit`` keeps each task's first N examples.
    """

    model: str | Path
    tasks: tuple[str | Task, ...]
    skills: tuple[tuple[str, float], ...] = ()
    batch_size: int = 8
    limit: int | None = None
    max_new_tokens: int | None = None
    library: Path | None = None
    force: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise InputError(f"batch size must be at least 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise InputError(f"limit must be at least 1, got {self.limit}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise InputError(f"max new tokens must be at least 1, got {self.max_new_tokens}")


@dataclass(frozen=True)
class TaskResult:
    """Scores of one task. Log-likelihoods are natural logs: ``mean_loglik`` is the mean over examples of
    ``Σ log p(target token)``; ``mean_token_loglik`` pools all target tokens. ``mc_*`` cover the examples
    with choices (``n_mc``); ``_norm`` ranks choices by per-token mean instead of the sum."""

    name: str
    n: int
    seconds: float
    exact_match: float | None = None
    mc_accuracy: float | None = None
    mc_accuracy_norm: float | None = None
    n_mc: int = 0
    mean_loglik: float | None = None
    mean_token_loglik: float | None = None
    samples: tuple[dict[str, Any], ...] = field(default=(), repr=False)

    def to_dict(self, samples: bool = False) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "samples"}
        if samples:
            d["samples"] = list(self.samples)
        return d


@dataclass(frozen=True)
class EvalResult:
    model: str
    skills: tuple[tuple[str, float], ...]
    tasks: tuple[TaskResult, ...]
    seconds: float

    def __getitem__(self, name: str) -> TaskResult:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(name)

    def to_dict(self, samples: bool = False) -> dict[str, Any]:
        return {
            "model": self.model,
            "skills": [{"ref": r, "weight": w} for r, w in self.skills],
            "tasks": {t.name: t.to_dict(samples) for t in self.tasks},
            "seconds": self.seconds,
        }


def _max_new_tokens(task: Task, tokenizer: Any, override: int | None) -> int:
    if override is not None:
        return override
    if task.generation.max_new_tokens is not None:
        return task.generation.max_new_tokens
    longest = max(len(encode_pair(tokenizer, e.prompt, e.target)[1]) for e in task.examples)
    return longest + MAX_NEW_TOKENS_MARGIN


def _exact_match(model: Any, tokenizer: Any, task: Task, opts: EvalSpec, progress: ProgressFn) -> list[dict]:
    """Generate for every example; per-example prediction and correctness."""
    ex = task.examples
    limit = _max_new_tokens(task, tokenizer, opts.max_new_tokens)
    params = GenerateParams(limit, task.generation.stop, opts.batch_size)
    preds = generate(
        model, tokenizer, [e.prompt for e in ex], params, lambda d, n: progress(f"{task.name}: generate", d, n)
    )
    hits = metrics.exact_match(preds, [e.target for e in ex], task.normalize, task.extract)
    return [{"prediction": p, "correct": h} for p, h in zip(preds, hits)]


def _logliks(model: Any, tokenizer: Any, task: Task, opts: EvalSpec, progress: ProgressFn) -> dict:
    """Log-likelihood of every target and every choice, each distinct (prompt, continuation) scored once."""
    ex = task.examples
    requests = {(e.prompt, e.target) for e in ex}
    if "mc_accuracy" in task.metrics:
        requests |= {(e.prompt, c) for e in ex for c in e.choices or ()}
    order = sorted(requests)
    lls = loglikelihood(model, tokenizer, order, opts.batch_size, lambda d, n: progress(f"{task.name}: loglik", d, n))
    return dict(zip(order, lls))


def _score_task(model: Any, tokenizer: Any, task: Task, opts: EvalSpec, progress: ProgressFn) -> TaskResult:
    t0 = time.perf_counter()
    ex = task.examples
    samples: list[dict[str, Any]] = [{"prompt": e.prompt, "target": e.target} for e in ex]
    scores: dict[str, Any] = {}
    if "exact_match" in task.metrics:
        for s, em in zip(samples, _exact_match(model, tokenizer, task, opts, progress)):
            s.update(em)
        scores["exact_match"] = sum(s["correct"] for s in samples) / len(samples)
    mc = [i for i, e in enumerate(ex) if e.choices] if "mc_accuracy" in task.metrics else []
    if "loglik" in task.metrics or mc:
        ll = _logliks(model, tokenizer, task, opts, progress)
        targets = [ll[(e.prompt, e.target)] for e in ex]
        for s, t in zip(samples, targets):
            s.update(loglik=t.total, target_tokens=t.tokens, greedy=t.greedy)
        if "loglik" in task.metrics:
            n_tok = sum(t.tokens for t in targets)
            scores["mean_loglik"] = metrics.mean([t.total for t in targets])
            scores["mean_token_loglik"] = math.fsum(t.total for t in targets) / n_tok if n_tok else None
        right = right_norm = 0
        for i in mc:
            e, choice = ex[i], [ll[(ex[i].prompt, c)] for c in ex[i].choices or ()]
            pick = metrics.mc_choice([c.total for c in choice])
            pick_norm = metrics.mc_choice([c.total for c in choice], [c.tokens for c in choice])
            right += pick == e.answer_index
            right_norm += pick_norm == e.answer_index
            samples[i].update(choice_logliks=[c.total for c in choice], pick=pick, pick_norm=pick_norm)
        if mc:
            scores.update(mc_accuracy=right / len(mc), mc_accuracy_norm=right_norm / len(mc), n_mc=len(mc))
    return TaskResult(task.name, len(ex), time.perf_counter() - t0, samples=tuple(samples), **scores)


def evaluate_model(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str | Task],
    *,
    batch_size: int = 8,
    limit: int | None = None,
    progress: ProgressFn = no_progress,
) -> list[TaskResult]:
    """Score an already loaded causal LM (in eval mode) on ``tasks`` (specs or ``Task`` objects)."""
    opts = EvalSpec(model="<loaded>", tasks=tuple(tasks), batch_size=batch_size, limit=limit)
    return _evaluate_loaded(model, tokenizer, resolve_tasks(opts.tasks), opts, progress)


def _evaluate_loaded(
    model: Any, tokenizer: Any, tasks: Sequence[Task], opts: EvalSpec, progress: ProgressFn
) -> list[TaskResult]:
    was_training = model.training
    model.eval()
    try:
        return [_score_task(model, tokenizer, t.head(opts.limit), opts, progress) for t in tasks]
    finally:
        model.train(was_training)


def load_model(path: str | Path) -> tuple[Any, Any]:
    """``AutoModelForCausalLM`` and ``AutoTokenizer`` from a directory (or a hub name, where the hub is reachable)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    if p.exists() and not (p / "config.json").is_file():
        raise NotFoundError(f"{p} is not a model directory (no config.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        if not p.exists():
            raise NotFoundError(
                f"model {path} not found", hint="pass a local model directory (config.json + weights)"
            ) from e
        raise NotFoundError(f"no tokenizer could be loaded from {path} ({str(e).splitlines()[0]})") from e
    model = AutoModelForCausalLM.from_pretrained(str(path))
    return model.eval(), tokenizer


def evaluate(spec: EvalSpec, progress: ProgressFn = no_progress) -> EvalResult:
    """Resolve the tasks, load the model once, apply the skills in memory and score every task."""
    from skillgraft.skill.apply import apply, unapply

    t0 = time.perf_counter()
    tasks = resolve_tasks(spec.tasks)  # fail on a bad task before paying for the model
    model, tokenizer = load_model(spec.model)
    if spec.skills:
        apply(model, list(spec.skills), force=spec.force, library=spec.library)
    try:
        results = _evaluate_loaded(model, tokenizer, tasks, spec, progress)
    finally:
        unapply(model)
    return EvalResult(str(spec.model), spec.skills, tuple(results), time.perf_counter() - t0)


def evaluate_fused(spec: EvalSpec, transfer: Any, progress: ProgressFn = no_progress) -> EvalResult:
    """Score a large base steered by small experts (``transfer``: a ``TransferSpec``) on the same tasks and
    metrics as :func:`evaluate` — transfer and merges are measured by one harness."""
    from skillgraft.transfer.load import load_fused

    t0 = time.perf_counter()
    tasks = resolve_tasks(spec.tasks)
    with load_fused(transfer) as fused:
        results = _evaluate_loaded(fused, fused.tok, tasks, spec, progress)
    return EvalResult(f"{spec.model} ({transfer.method})", spec.skills, tuple(results), time.perf_counter() - t0)


def evaluate_routed(
    spec: EvalSpec, route: str, examples: dict[str, list[str]] | None = None, progress: ProgressFn = no_progress
) -> tuple[EvalResult, dict[str, Any]]:
    """Score the base with its library's skills routed per prompt (``route.routed``), on the same tasks and
    metrics as :func:`evaluate`; also returns how many prompts each skill got."""
    from skillgraft.route.routed import describe, open_routed

    if spec.library is None:
        raise InputError("routed evaluation needs --library", hint="pass --library DIR (or set $SKILLGRAFT_LIBRARY)")
    t0 = time.perf_counter()
    tasks = resolve_tasks(spec.tasks)
    routed = open_routed(spec.model, spec.library, route, examples=examples)
    results = _evaluate_loaded(routed, routed.tok, tasks, spec, progress)
    res = EvalResult(f"{spec.model} (routed: {route})", (), tuple(results), time.perf_counter() - t0)
    return res, describe(routed)
