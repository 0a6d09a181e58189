"""Build a ``FusedModel`` from paths: ``--base LARGE --expert SMALL_TUNED:SMALL_BASE[:ALPHA]``.

SMALL_TUNED may also be a skill pack (path or library reference) applied in memory to SMALL_BASE. Models and
tokenizers load once each, even when several experts share a small base.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skillgraft.errors import InputError, NotFoundError
from skillgraft.transfer.combine import METHODS
from skillgraft.transfer.fused import ExpertPair, FusedModel, check_modes


@dataclass(frozen=True)
class ExpertSpec:
    expert: str  # a model directory, or a skill pack / library reference applied to ``base``
    base: str
    alpha: float = 1.0
    explicit_alpha: bool = False  # given as TUNED:BASE:ALPHA (dlf refuses it: it chooses α itself)

    @classmethod
    def parse(cls, text: str) -> ExpertSpec:
        """``TUNED:BASE`` or ``TUNED:BASE:ALPHA``."""
        parts = text.split(":")
        alpha = 1.0
        if len(parts) == 3:
            try:
                alpha = float(parts[2])
            except ValueError:
                raise InputError(f"--expert {text!r}: alpha {parts[2]!r} is not a number") from None
            if not math.isfinite(alpha):
                raise InputError(f"--expert {text!r}: alpha must be a finite number, not {parts[2]!r}")
            parts = parts[:2]
        if len(parts) != 2 or not all(parts):
            raise InputError(f"--expert {text!r}: expected SMALL_TUNED:SMALL_BASE[:ALPHA]")
        return cls(parts[0], parts[1], alpha, explicit_alpha=len(text.split(":")) == 3)


@dataclass(frozen=True)
class TransferSpec:
    large: str
    experts: tuple[ExpertSpec, ...]
    method: str = "proxy"
    dlf_grid: int = 11
    library: Path | None = None
    speculate: int = 0  # draft tokens per round (greedy only); 0: the plain loop
    gate: bool = False  # weight several experts per prompt (combine.prompt_gate)
    parallel: bool = False  # the small models decode in a second process (transfer/parallel.py)
    chat: bool = False  # each model formats every prompt with its own tokenizer's chat template
    route: str | None = None  # a router (route.routers) picks one expert per prompt: arrow | centroid | classifier
    examples: tuple[
        tuple[str, tuple[str, ...]], ...
    ] = ()  # (expert name, its labelled prompts) for centroid/classifier

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"unknown transfer method {self.method!r}", hint=f"use one of {', '.join(METHODS)}")
        if self.route is not None:
            from skillgraft.route.routers import METHODS as ROUTERS

            if self.route not in ROUTERS:
                raise InputError(f"unknown router {self.route!r} for experts", hint=f"use one of {', '.join(ROUTERS)}")
            if self.gate:
                raise InputError("the prompt gate and a router both choose experts", hint="drop --gate or --route")
        elif self.examples:
            raise InputError("--examples label prompts for a router", hint="add --route centroid (or classifier)")
        if self.method == "dlf":
            given = [e for e in self.experts if e.explicit_alpha]
            if given:
                raise InputError(
                    f"--method dlf chooses α at every step, so the α in --expert {given[0].expert}:…:{given[0].alpha:g}"
                    " would be ignored",
                    hint="drop :ALPHA from --expert (dlf searches --dlf-grid values in [0, 2]), or use proxy/eft",
                )


class _Loader:
    def __init__(self, library: Path | None) -> None:
        self.models: dict[str, Any] = {}
        self.tokenizers: dict[str, Any] = {}
        self.library = library

    def model(self, path: str) -> Any:
        from transformers import AutoModelForCausalLM

        if path not in self.models:
            if not Path(path).is_dir():
                raise NotFoundError(f"{path}: no such model directory")
            self.models[path] = AutoModelForCausalLM.from_pretrained(path).eval()
        return self.models[path]

    def tokenizer(self, path: str) -> Any:
        from transformers import AutoTokenizer

        if path not in self.tokenizers:
            self.tokenizers[path] = AutoTokenizer.from_pretrained(path)
        return self.tokenizers[path]

    def expert(self, spec: ExpertSpec) -> tuple[Any, str]:
        """A fine-tuned small model: a directory, or base + skill pack (a fresh copy of the base, patched)."""
        if Path(spec.expert).is_dir():
            return self.model(spec.expert), spec.expert
        from transformers import AutoModelForCausalLM

        from skillgraft.skill.apply import apply

        model = AutoModelForCausalLM.from_pretrained(spec.base).eval()
        apply(model, [spec.expert], library=self.library)
        return model, spec.base


def _validate(spec: TransferSpec) -> None:
    """Every model directory exists and every skill expert resolves, before any model is loaded."""
    from skillgraft.skill.apply import open_skill

    for path in [spec.large, *(e.base for e in spec.experts)]:
        if not Path(path).is_dir():
            raise NotFoundError(f"{path}: no such model directory")
    for e in spec.experts:
        if not Path(e.expert).is_dir():
            open_skill(e.expert, spec.library).close()  # raises NotFoundError / FormatError


def load_fused(spec: TransferSpec) -> FusedModel:
    """Load every model once and check they share one vocabulary (before any decoding)."""
    if not spec.experts:
        raise InputError("no experts given", hint="pass --expert SMALL_TUNED:SMALL_BASE[:ALPHA]")
    check_modes(spec.speculate, spec.gate, spec.parallel, spec.chat)  # as FusedModel does, but before loading
    _validate(spec)
    ld = _Loader(spec.library)
    large = ld.model(spec.large)
    pairs, toks = [], {}
    own = {id(large): ld.tokenizer(spec.large)}  # each model's tokenizer, for chat templates
    for i, e in enumerate(spec.experts):
        expert, tok_dir = ld.expert(e)
        base = ld.model(e.base)
        pairs.append(ExpertPair(expert, base, e.alpha, label=e.expert))
        toks[f"expert {i + 1} ({e.expert})"] = own.setdefault(id(expert), ld.tokenizer(tok_dir))
        toks[f"expert base {i + 1} ({e.base})"] = own.setdefault(id(base), ld.tokenizer(e.base))
    router = _expert_router(spec, ld, large) if spec.route else None
    return FusedModel(
        large,
        ld.tokenizer(spec.large),
        pairs,
        spec.method,
        spec.dlf_grid,
        toks,
        spec.speculate,
        spec.gate,
        parallel=spec.parallel,
        chat=spec.chat,
        model_tokenizers=own,
        router=router,
    )


def expert_key(e: ExpertSpec) -> str:
    """How a router names an expert: a model directory's name, a library reference as given, a pack's stem."""
    p = Path(e.expert)
    return p.name if p.is_dir() else (p.stem if p.suffix == ".skill" else e.expert)


def _expert_router(spec: TransferSpec, ld: _Loader, large: Any) -> Any:
    """The experts' router as a FusedModel gate. Centroid/classifier score the large base's hidden states on
    labelled prompts (``spec.examples``, else the examples saved with the library's router of that method);
    Arrow scores the small base's module inputs against each LoRA-form skill expert's prototypes."""
    from skillgraft.route.routers import METHODS as ROUTERS
    from skillgraft.route.routers import build_router, read_router
    from skillgraft.route.runtime import SkillRuntime

    if spec.route not in ROUTERS:
        raise InputError(f"unknown router {spec.route!r}", hint=f"use one of {', '.join(ROUTERS)}")
    keys = [expert_key(e) for e in spec.experts]
    if len(set(keys)) != len(keys):
        raise InputError(f"two experts share the name {keys!r}; a router needs them told apart")
    if spec.route == "arrow":
        bases = {e.base for e in spec.experts}
        if len(bases) != 1 or any(Path(e.expert).is_dir() for e in spec.experts):
            raise InputError(
                "--route arrow needs every expert to be a LoRA skill of one small base (SKILL:SMALL_BASE)",
                hint="use --route centroid with --examples NAME=PROMPTS.jsonl",
            )
        (small,) = bases
        rt = SkillRuntime(ld.model(small), ld.tokenizer(small))
        for e, k in zip(spec.experts, keys):
            rt.load(e.expert, key=k, library=ld.library)
        router = build_router("arrow", rt, {k: rt.skills[k].sha256 for k in keys})
    else:
        examples = {name: list(prompts) for name, prompts in spec.examples}
        if not examples and ld.library is not None:
            saved = read_router(ld.library, spec.route)
            examples = saved.examples if saved else {}
        rt = SkillRuntime(large, ld.tokenizer(spec.large))
        names = {k: k.split("@")[0] for k in keys}
        router = build_router(spec.route, rt, dict.fromkeys(keys, ""), examples, name_of=names)
    return router.gate(rt, keys)
