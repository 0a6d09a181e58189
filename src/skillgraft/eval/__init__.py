"""Evaluation harness: tasks from JSONL files, SkillBench or GSM8K, scored by exact match, multiple-choice
accuracy and target log-likelihood on a base with skills applied in memory.
"""

from skillgraft.eval.harness import EvalResult, EvalSpec, TaskResult, evaluate, evaluate_model, load_model
from skillgraft.eval.tasks import (
    TASK_SOURCES,
    Example,
    GenerationSettings,
    Task,
    read_jsonl,
    resolve_task,
    resolve_tasks,
    task_source,
)

__all__ = [
    "TASK_SOURCES",
    "EvalResult",
    "EvalSpec",
    "Example",
    "GenerationSettings",
    "Task",
    "TaskResult",
    "evaluate",
    "evaluate_model",
    "load_model",
    "read_jsonl",
    "resolve_task",
    "resolve_tasks",
    "task_source",
]
