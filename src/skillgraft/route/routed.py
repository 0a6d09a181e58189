"""Routed inference over a library: one base loaded once, every fitting skill held by a :class:`SkillRuntime`,
a router choosing each prompt's skill — what ``skillgraft eval|generate --library L --route M`` run.

:class:`RoutedModel` is a harness model (``harness_generate`` / ``harness_loglik``, as ``FusedModel`` is), so
routed inference is scored by the same harness, tasks and metrics as merges and transfer.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from skillgraft.errors import InputError
from skillgraft.eval.generate import GenerateParams
from skillgraft.route.routers import METHODS, Router, load_router
from skillgraft.route.runtime import ARROW, ARROW_MIX, Mix, SkillRuntime

ROUTES = (*METHODS, "arrow-token")  # arrow-token: Arrow per token at every module (SkillRuntime's ARROW_MIX)


def base_fingerprint(base: str | Path) -> str:
    from skillgraft.io.checkpoint import Checkpoint
    from skillgraft.skill.fingerprint import fingerprint_checkpoint

    with Checkpoint(Path(base)) as ckpt:
        return str(fingerprint_checkpoint(ckpt).content)


def load_library(runtime: SkillRuntime, library_root: Path, fingerprint: str, names: Sequence[str] = ()) -> dict:
    """Load the latest version of every library skill made for the base ``fingerprint`` (only ``names``, when
    given) into ``runtime`` under its ``name@version``; returns key → content hash."""
    from skillgraft.library import Library

    with Library(Path(library_root)) as lib:
        latest = {r.name: r for r in lib.list() if r.base_fingerprint == fingerprint}  # listed by version
        if names:
            unknown = [n for n in names if n not in latest]
            if unknown:
                raise InputError(
                    f"skill {unknown[0]!r} is not in {library_root} for this base",
                    hint=f"skills for this base: {', '.join(sorted(latest)) or 'none'}",
                )
            latest = {n: latest[n] for n in names}
        if not latest:
            raise InputError(
                f"{library_root} holds no skill made for this base",
                hint="add one with `skillgraft library add`, or check --base",
            )
        for r in latest.values():
            runtime.load(lib.path(r.ref), key=r.ref)
        return {r.ref: r.sha256 for r in latest.values()}


class RoutedModel:
    """A harness model: each prompt runs with the skill its router chose (``route="arrow-token"``: Arrow per
    token among the LoRA-form skills). ``choices`` records every prompt's choice."""

    def __init__(self, runtime: SkillRuntime, router: Router | Any | None, route: str) -> None:
        if router is None and route != "arrow-token":
            raise InputError(f"route {route!r} needs a router (only arrow-token routes without one)")
        self.runtime, self.router, self.route = runtime, router, route
        self.tok = runtime.tok
        self.training = False
        self.choices: dict[str, Mix] = {}

    def mixes(self, prompts: Sequence[str]) -> list[Mix]:
        new = [p for p in dict.fromkeys(prompts) if p not in self.choices]
        if new:
            chosen = [ARROW_MIX] * len(new) if self.router is None else self.router.route(self.runtime, new)
            self.choices.update(zip(new, chosen))
        return [self.choices[p] for p in prompts]

    def choice(self, prompt: str) -> str:
        """The chosen skill's key (``arrow`` for per-token routing)."""
        mix = self.mixes([prompt])[0]
        return ARROW if mix == ARROW_MIX else mix[0][0]

    def harness_generate(self, prompts: list[str], max_new_tokens: int, stop: tuple[str, ...], batch: int) -> list:
        return self.runtime.generate(prompts, self.mixes(prompts), GenerateParams(max_new_tokens, stop, batch))

    def harness_loglik(self, pairs: list[tuple[str, str]]) -> list[tuple[float, int, bool]]:
        out = self.runtime.loglik(pairs, self.mixes([p for p, _ in pairs]))
        return [(r.total, r.tokens, r.greedy) for r in out]

    def eval(self) -> RoutedModel:
        return self

    def train(self, mode: bool = True) -> RoutedModel:
        return self


def open_routed(
    base: str | Path,
    library_root: Path,
    route: str,
    names: Sequence[str] = (),
    examples: dict[str, list[str]] | None = None,
) -> RoutedModel:
    """Load ``base`` and its library skills, then the saved router (rebuilt when the skills changed)."""
    from skillgraft.eval.harness import load_model

    if route not in ROUTES:
        raise InputError(f"unknown route {route!r}", hint=f"use one of {', '.join(ROUTES)}")
    if not Path(library_root).is_dir():
        raise InputError(f"{library_root}: no such library", hint="pass --library DIR (or set $SKILLGRAFT_LIBRARY)")
    fingerprint = base_fingerprint(base)
    model, tok = load_model(base)
    runtime = SkillRuntime(model, tok)
    shas = load_library(runtime, Path(library_root), fingerprint, names)
    if route == "arrow-token":
        if not runtime.lora_keys:
            raise InputError("arrow-token routes among LoRA-form skills, and the library has none for this base")
        return RoutedModel(runtime, None, route)
    if route == "arrow":
        shas = {k: v for k, v in shas.items() if runtime.skills[k].lora}
        if not shas:
            raise InputError("Arrow routes among LoRA-form skills, and the library has none for this base")
    router = load_router(Path(library_root), runtime, route, skills=shas, base=fingerprint, examples=examples)
    return RoutedModel(runtime, router, route)


def read_prompt_file(path: Path) -> list[str]:
    """Prompts of a JSONL file (a ``prompt`` per line)."""
    import json

    from skillgraft.errors import FormatError, NotFoundError

    if not path.is_file():
        raise NotFoundError(f"{path}: no such prompts file")
    prompts = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            prompts.append(str(json.loads(line)["prompt"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise FormatError(f"{path}:{i + 1}: expected a JSON object with a 'prompt' key") from None
    return prompts


def read_examples(specs: Sequence[str]) -> dict[str, list[str]]:
    """``NAME=FILE`` pairs (FILE: JSONL with a ``prompt`` per line) → name → prompts."""
    out: dict[str, list[str]] = {}
    for spec in specs:
        name, eq, path = spec.partition("=")
        if not eq or not name or not path:
            raise InputError(f"--examples {spec!r}: expected NAME=PROMPTS.jsonl")
        prompts = read_prompt_file(Path(path))
        if not prompts:
            raise InputError(f"--examples {spec!r}: {path} holds no prompts")
        out.setdefault(name, []).extend(prompts)
    return out


def describe(model: Any) -> dict[str, Any]:
    """How many prompts each skill got (for reports and ``--json``)."""
    counts: dict[str, int] = {}
    for mix in model.choices.values():
        key = ARROW if mix == ARROW_MIX else mix[0][0]
        counts[key] = counts.get(key, 0) + 1
    return {"route": model.route, "skills": sorted(model.runtime.skills), "chosen": counts}
