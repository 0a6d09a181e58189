"""Scoring one merge recipe: merge in memory with the engine, load every merged tensor into a model, and measure
greedy exact match on the tasks with the evaluation harness — the fitness ``skillgraft evolve`` maximizes.

A ``Scorer`` loads the base model once and overwrites all its weights for each candidate, so a score depends only
on the recipe (and the thread count it pins), never on what the scorer evaluated before or which worker it is.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from skillgraft.errors import InputError, MismatchError, NumericError
from skillgraft.eval.tasks import Task, read_jsonl, task_from_examples


def load_tasks(paths: Sequence[str], names: Sequence[str], limit: int | None) -> tuple[Task, ...]:
    """Exact-match-only tasks from JSONL files (first ``limit`` rows each), named ``names``."""
    tasks = []
    for path, name in zip(paths, names):
        task = task_from_examples(name, read_jsonl(path)).head(limit)
        tasks.append(dataclasses.replace(task, metrics=("exact_match",)))
    return tuple(tasks)


def task_names(paths: Sequence[str]) -> list[str]:
    """Short unique names for task files: the file stem, or ``parent/stem`` where two stems collide
    (``data/a/val.jsonl`` and ``data/b/val.jsonl`` → ``a/val``, ``b/val``)."""
    stems = [Path(p).stem for p in paths]
    names = [s if stems.count(s) == 1 else f"{Path(p).parent.name}/{s}" for p, s in zip(paths, stems)]
    return [n if names.count(n) == 1 else str(p) for n, p in zip(names, paths)]


def load_state(model: Any, state: dict[str, Any]) -> None:
    """Copy a full merged state dict into ``model``: every tensor the checkpoint holds must be a model key, and
    the model keys it lacks must be tied to one it has (the LM head tied to the embeddings)."""
    import torch

    with torch.no_grad():
        result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise MismatchError(f"merged tensor {result.unexpected_keys[0]!r} is not in the model")
    sd = model.state_dict()
    loaded = {sd[k].data_ptr() for k in state if k in sd}
    untied = [k for k in result.missing_keys if sd[k].data_ptr() not in loaded]
    if untied:
        raise MismatchError(f"the merged checkpoint lacks tensor {untied[0]!r} of the model")


class Scorer:
    """Scores recipes on ``tasks`` with one loaded copy of ``base``; used in-process and as a Ray actor.

    ``threads`` pins torch's intra-op threads during each evaluation (restored afterwards), because float
    reductions — and so, rarely, a greedy token — can change with the thread count.
    """

    def __init__(self, base: str, tasks: Sequence[Task], batch_size: int, threads: int) -> None:
        import os

        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        from skillgraft.eval.harness import load_model

        self.tasks, self.batch_size, self.threads = tuple(tasks), batch_size, threads
        with self._threads():
            self.model, self.tok = load_model(base)

    def _threads(self) -> Any:
        import contextlib

        import torch

        @contextlib.contextmanager
        def pinned() -> Any:
            before = torch.get_num_threads()
            torch.set_num_threads(self.threads)
            try:
                yield
            finally:
                torch.set_num_threads(before)

        return pinned()

    def score(self, recipe: dict[str, Any]) -> dict[str, Any]:
        """``{"fitness", "scores": {task: exact match}, "seconds", "error"}`` for one recipe. A recipe the
        engine refuses for its numbers (NaN in the merge, linear weights summing to 0) scores 0 with its
        message in ``error``."""
        from skillgraft.merge.config import from_dict
        from skillgraft.merge.engine import merge_in_memory

        t0 = time.perf_counter()
        with self._threads():
            try:
                state = merge_in_memory(from_dict(recipe))
            except (InputError, NumericError) as e:  # this recipe's numbers (bad files fail check_spec first)
                zeros = {t.name: 0.0 for t in self.tasks}
                return {"fitness": 0.0, "scores": zeros, "seconds": time.perf_counter() - t0, "error": str(e)}
            load_state(self.model, state)
            del state
            scores = self.evaluate()
        return {"fitness": fitness(scores), "scores": scores, "seconds": time.perf_counter() - t0, "error": None}

    def evaluate(self) -> dict[str, float]:
        """Exact match of the model as loaded now on every task."""
        return evaluate_tasks(self.model, self.tok, self.tasks, self.batch_size)


def evaluate_tasks(model: Any, tok: Any, tasks: Sequence[Task], batch_size: int) -> dict[str, float]:
    """Greedy exact match per task through the evaluation harness (the tasks are already cut to ``limit``)."""
    from skillgraft.eval.harness import evaluate_model

    results = evaluate_model(model, tok, list(tasks), batch_size=batch_size)
    return {r.name: float(r.exact_match or 0.0) for r in results}


def fitness(scores: dict[str, float]) -> float:
    """The mean exact match over tasks."""
    return sum(scores.values()) / len(scores)
