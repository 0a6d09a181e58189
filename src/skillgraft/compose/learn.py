"""``skillgraft compose``: fit per-skill (per-block) merge coefficients from a few examples, then write the merged
model and the plain merge YAML that reproduces it.

Three ways to fit λ (``K`` skills × ``B`` blocks, bounded to ``[lo, hi]`` through a sigmoid, L2-regularised towards
the starting value):

- ``blockwise`` (aTLAS-style): Adam on the target cross-entropy of a few labelled rows per skill, back-propagated
  through the composite model to the coefficients only;
- ``entropy`` (AdaMerging-style): Adam on the entropy of the model's own next-token predictions on unlabelled
  prompts (the last prompt position and the first greedy answer tokens, refreshed as λ moves);
- ``search`` (LoraHub-style): CMA-ES over the coefficients (one per skill by default), scored by target loss or
  greedy exact match on the rows, with LoraHub's L1 penalty — no backpropagation.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from skillgraft.compose.blocks import GRANULARITIES, Blocks, merge_config
from skillgraft.errors import InputError, NumericError
from skillgraft.progress import ProgressFn, no_progress

LEARN = ("blockwise", "entropy", "search")
SCORES = ("loss", "em")


@dataclass(frozen=True)
class ComposeSpec:
    """A complete ``compose`` request (validated here without I/O; files are checked by :func:`check_inputs`)."""

    base: str
    inputs: tuple[tuple[str, str], ...]  # (skill name, source: pack, LoRA dir or fine-tuned checkpoint)
    data: tuple[tuple[str, str], ...]  # (skill name, JSONL of {"prompt", "target"}; targets unused by entropy)
    out: Path
    learn: str = "blockwise"
    examples: int = 16  # rows per skill
    granularity: str | None = None  # None: "block" for blockwise/entropy, "skill" for search
    init: float = 0.3
    bounds: tuple[float, float] = (0.0, 1.0)
    steps: int = 40  # optimizer steps (blockwise/entropy) or candidate evaluations (search)
    lr: float = 0.05
    reg: float = 0.01
    batch: int = 16
    score: str = "loss"  # search only
    gen_tokens: int = 4  # entropy only: greedy answer tokens whose predictions are scored
    seed: int = 0
    overwrite: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # library / force / allow_pickle, passed to the engine

    def __post_init__(self) -> None:
        if self.learn not in LEARN:
            raise InputError(f"unknown --learn {self.learn!r}", hint=f"use one of {', '.join(LEARN)}")
        if self.granularity is not None and self.granularity not in GRANULARITIES:
            raise InputError(
                f"unknown --granularity {self.granularity!r}", hint=f"use one of {', '.join(GRANULARITIES)}"
            )
        if self.score not in SCORES:
            raise InputError(f"unknown --score {self.score!r}", hint=f"use one of {', '.join(SCORES)}")
        if len(self.inputs) < 1:
            raise InputError("compose needs at least one input skill")
        names = [n for n, _ in self.inputs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise InputError(f"two inputs are named {dup[0]!r}", hint="name them: NAME=PATH")
        for skill, _ in self.data:
            if skill not in names:
                raise InputError(
                    f"examples given for skill {skill!r}, which is not among the inputs ({', '.join(names)})",
                    hint="name each --data after an input: --data NAME=FILE.jsonl",
                )
        if not self.data:
            raise InputError("compose needs examples", hint="pass --data NAME=FILE.jsonl for the skills")
        lo, hi = self.bounds
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise InputError(f"--bounds {lo},{hi}: need finite lo < hi", hint="e.g. --bounds 0,1")
        if not (math.isfinite(self.init) and lo < self.init < hi):
            raise InputError(f"--init {self.init} is not strictly inside --bounds {lo},{hi}")
        for key in ("examples", "steps", "batch"):
            if getattr(self, key) < 1:
                raise InputError(f"--{key} must be at least 1, not {getattr(self, key)}")
        for key in ("lr", "reg"):
            v = getattr(self, key)
            if not math.isfinite(v) or v < 0 or (key == "lr" and v == 0):
                raise InputError(f"--{key} must be a finite {'positive' if key == 'lr' else 'non-negative'} number")
        if self.gen_tokens < 0:
            raise InputError("--gen-tokens must be >= 0")

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.inputs]

    @property
    def blocks_kind(self) -> str:
        return self.granularity or ("skill" if self.learn == "search" else "block")


@dataclass(frozen=True)
class ComposeResult:
    out: Path
    config_path: Path
    learn: str
    coefficients: dict[str, dict[str, float]]  # skill -> block -> λ
    curve: list[float]  # objective per step (or per CMA-ES generation's best)
    examples: dict[str, int]
    seconds: float
    merge_seconds: float

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["out"], d["config_path"] = str(self.out), str(self.config_path)
        return d


# ---------------------------------------------------------------- inputs


def read_rows(spec: ComposeSpec) -> dict[str, list[dict[str, str]]]:
    """The first ``examples`` rows of each skill's JSONL; ``target`` required unless fitting entropy."""
    from skillgraft.eval.tasks import read_jsonl

    rows: dict[str, list[dict[str, str]]] = {}
    for skill, path in spec.data:
        if spec.learn == "entropy":
            got = _read_prompts(Path(path))
        else:  # names the file and line of a missing key or malformed row
            got = [{"prompt": e.prompt, "target": e.target} for e in read_jsonl(path)]
        rows.setdefault(skill, []).extend(got[: spec.examples])
    return rows


def _read_prompts(path: Path) -> list[dict[str, str]]:
    """Unlabelled rows: ``{"prompt": …}`` a line (other keys, a target included, are ignored)."""
    from skillgraft.errors import FormatError
    from skillgraft.eval.tasks import json_lines

    out = []
    for i, obj in json_lines(path, "examples file"):
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise FormatError(f"{path}:{i}: expected an object with a string 'prompt'")
        out.append({"prompt": obj["prompt"], "target": ""})
    if not out:
        raise FormatError(f"{path}: no examples", hint='write one {"prompt": ...} object a line')
    return out


def check_inputs(spec: ComposeSpec) -> dict[str, list[dict[str, str]]]:
    """Everything that can be checked before loading weights: the output, the rows, the inputs against the base."""
    from skillgraft.io.writer import check_output
    from skillgraft.merge.config import from_dict
    from skillgraft.merge.engine import MergeOptions, plan_merge

    check_output(spec.out, spec.overwrite)
    rows = read_rows(spec)
    cfg = from_dict({"base": spec.base, "method": "task_arithmetic", "inputs": [s for _, s in spec.inputs]})
    plan_merge(cfg, MergeOptions(out=None, dry_run=True, **spec.extra)).close()  # paths, shapes, kinds
    return rows


def load_deltas(spec: ComposeSpec) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Each changed tensor's deltas stacked ``[K, *shape]`` (fp32; zero where a skill leaves it alone)."""
    from skillgraft.merge.config import from_dict
    from skillgraft.merge.engine import MergeOptions, plan_merge

    cfg = from_dict({"base": spec.base, "method": "task_arithmetic", "inputs": [s for _, s in spec.inputs]})
    plan = plan_merge(cfg, MergeOptions(out=None, **spec.extra))
    try:
        out = {}
        for t in plan.tensors:
            if not t.users:
                continue
            base = plan.base.get(t.name).float()
            d = torch.zeros((len(plan.sources), *t.shape), dtype=torch.float32)
            for i in t.users:
                d[i] = plan.sources[i].delta(t.name, base)
            out[t.name] = d
        return out, [s.label for s in plan.sources]
    finally:
        plan.close()


# ---------------------------------------------------------------- fitting


class Coefficients(torch.nn.Module):
    """λ = lo + (hi − lo)·σ(u): bounded by construction; starts at ``init`` everywhere."""

    def __init__(self, k: int, b: int, init: float, bounds: tuple[float, float]) -> None:
        super().__init__()
        self.lo, self.hi = bounds
        p = (init - self.lo) / (self.hi - self.lo)
        self.u = torch.nn.Parameter(torch.full((k, b), math.log(p / (1 - p))))
        self.init = init

    def forward(self) -> torch.Tensor:
        return self.lo + (self.hi - self.lo) * torch.sigmoid(self.u)

    def penalty(self) -> torch.Tensor:
        return ((self() - self.init) ** 2).mean()


def _finite(step: int, value: float, lam: torch.Tensor) -> None:
    if not math.isfinite(value) or not bool(torch.isfinite(lam).all()):
        raise NumericError(
            f"the objective diverged (NaN/Inf) at step {step}; nothing was written",
            hint="lower --lr, or check the inputs for NaN/Inf weights",
        )


def _balanced_batches(rows: dict[str, list[Any]], batch: int, rng: random.Random) -> list[Any]:
    """One batch: ``batch`` rows drawn round-robin over skills (each skill's rows shuffled, cycling)."""
    pools = {s: rng.sample(r, len(r)) for s, r in rows.items() if r}
    skills = sorted(pools)
    out, i = [], 0
    while len(out) < batch:
        s = skills[i % len(skills)]
        out.append(pools[s][(i // len(skills)) % len(pools[s])])
        i += 1
    return out


def fit_gradient(comp: Any, tok: Any, rows: dict[str, list[dict[str, str]]], spec: ComposeSpec, progress: ProgressFn):
    """Adam on the target loss (blockwise) or the prediction entropy (entropy); returns (λ, curve)."""
    from skillgraft.bench.train import _batch, encode
    from skillgraft.compose.objective import greedy_continuations, prediction_entropy, target_loss

    k, b = next(iter(comp.deltas.values())).shape[0], len(comp.blocks)
    coef = Coefficients(k, b, spec.init, spec.bounds)
    opt = torch.optim.Adam(coef.parameters(), lr=spec.lr)
    rng = random.Random(spec.seed)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    encoded = {s: encode(tok, r) for s, r in rows.items()}
    prompts = {s: [ids[:n] for ids, n in e] for s, e in encoded.items()}
    conts: dict[tuple[int, ...], list[int]] = {}
    curve: list[float] = []
    for step in range(1, spec.steps + 1):
        if spec.learn == "blockwise":
            obj = target_loss(comp, coef(), _batch(_balanced_batches(encoded, spec.batch, rng), pad))
        else:
            chosen = _balanced_batches(prompts, spec.batch, rng)
            if step == 1 or (step - 1) % 10 == 0:  # refresh the answers the entropy is measured on
                conts = {}
            todo = [p for p in chosen if tuple(p) not in conts]
            if todo:
                got = greedy_continuations(comp, coef(), todo, spec.gen_tokens, pad, tok.eos_token_id)
                conts.update({tuple(p): c for p, c in zip(todo, got)})
            obj = prediction_entropy(comp, coef(), chosen, [conts[tuple(p)] for p in chosen], pad)
        loss = obj + spec.reg * coef.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        curve.append(float(obj.detach()))
        _finite(step, curve[-1], coef())
        progress(f"compose ({spec.learn}): steps", step, spec.steps)
    return coef().detach(), curve


def fit_search(comp: Any, tok: Any, rows: dict[str, list[dict[str, str]]], spec: ComposeSpec, progress: ProgressFn):
    """CMA-ES over λ (seeded); objective = target loss (or 1 − exact match) + reg·mean|λ|. Returns (λ, curve)."""
    import cma
    import numpy as np

    from skillgraft.bench.train import _batch, encode
    from skillgraft.compose.objective import target_loss

    k, b = next(iter(comp.deltas.values())).shape[0], len(comp.blocks)
    lo, hi = spec.bounds
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    all_rows = [r for s in sorted(rows) for r in rows[s]]
    batches = [_batch(encode(tok, all_rows[i : i + 32]), pad) for i in range(0, len(all_rows), 32)]
    # each row weighs the same (target_loss is a mean over rows), whatever its batch

    def objective(x: Any) -> float:
        lam = torch.tensor(np.asarray(x), dtype=torch.float32).view(k, b)
        if spec.score == "loss":
            with torch.no_grad():
                value = sum(float(target_loss(comp, lam, bt)) * bt[0].shape[0] for bt in batches) / len(all_rows)
        else:
            value = 1.0 - _exact_match(comp, lam, tok, rows)
        return value + spec.reg * float(lam.abs().mean())

    es = cma.CMAEvolutionStrategy(
        [spec.init] * (k * b), (hi - lo) / 4, {"bounds": [lo, hi], "seed": spec.seed + 1, "verbose": -9}
    )
    curve: list[float] = []
    evals = 0
    while evals < spec.steps:
        xs = es.ask()
        fs = [objective(x) for x in xs]
        for f in fs:
            _finite(evals, f, torch.zeros(1))
        es.tell(xs, fs)
        evals += len(xs)
        curve.append(min(fs))
        progress("compose (search): evaluations", min(evals, spec.steps), spec.steps)
    best = es.result.xbest if es.result.xbest is not None else es.ask()[0]
    return torch.tensor(np.asarray(best), dtype=torch.float32).view(k, b), curve


def _exact_match(comp: Any, lam: torch.Tensor, tok: Any, rows: dict[str, list[dict[str, str]]]) -> float:
    from skillgraft.eval.harness import evaluate_model
    from skillgraft.eval.tasks import Example, task_from_examples

    comp.load(lam)
    try:
        tasks = [task_from_examples(s, [Example(r["prompt"], r["target"]) for r in rows[s]]) for s in sorted(rows)]
        tasks = [dataclasses.replace(t, metrics=("exact_match",)) for t in tasks]
        res = evaluate_model(comp.model, tok, tasks, batch_size=32)
        return sum(r.exact_match or 0.0 for r in res) / len(res)
    finally:
        comp.reset()


# ---------------------------------------------------------------- the whole command


def compose(spec: ComposeSpec, progress: ProgressFn = no_progress) -> ComposeResult:
    """Validate, fit λ, then merge with the engine from the written YAML; nothing is left at ``spec.out`` on error."""
    import yaml

    from skillgraft.compose.objective import Composite
    from skillgraft.eval.harness import load_model
    from skillgraft.merge import merge

    t0 = time.perf_counter()
    rows = check_inputs(spec)
    deltas, labels = load_deltas(spec)
    blocks = Blocks.of(deltas, spec.blocks_kind)
    model, tok = load_model(spec.base)
    model.float()
    torch.manual_seed(spec.seed)
    comp = Composite(model, deltas, blocks)
    fit = fit_search if spec.learn == "search" else fit_gradient
    lam, curve = fit(comp, tok, rows, spec, progress)
    fit_seconds = time.perf_counter() - t0
    bases = str(Path(spec.base).resolve()) if Path(spec.base).exists() else spec.base
    sources = [str(Path(s).resolve()) if Path(s).exists() else s for _, s in spec.inputs]
    config = merge_config(bases, sources, lam.tolist(), blocks, spec.seed)
    coefficients = {n: dict(zip(blocks.names, map(float, row))) for n, row in zip(spec.names, lam.tolist())}
    tmp = spec.out.with_name(f".{spec.out.name}.compose-partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        t1 = time.perf_counter()
        merge(config, tmp / "model", **{k: v for k, v in spec.extra.items() if k != "dry_run"}, progress=progress)
        merge_seconds = time.perf_counter() - t1
        for f in (tmp / "model").iterdir():
            f.rename(tmp / f.name)
        (tmp / "model").rmdir()
        (tmp / "merge.yaml").write_text(
            "# Written by `skillgraft compose --learn " + spec.learn + "`; reproduce with `skillgraft merge "
            "merge.yaml -o DIR`.\n" + yaml.safe_dump(config, sort_keys=False)
        )
        result = ComposeResult(
            spec.out,
            spec.out / "merge.yaml",
            spec.learn,
            coefficients,
            curve,
            {s: len(r) for s, r in rows.items()},
            time.perf_counter() - t0,
            merge_seconds,
        )
        record = _record(spec, result, labels, fit_seconds)
        (tmp / "compose.json").write_text(json.dumps(record, indent=1))
        if spec.out.exists():
            shutil.rmtree(spec.out)
        tmp.rename(spec.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def _record(spec: ComposeSpec, result: ComposeResult, labels: list[str], fit_seconds: float) -> dict[str, Any]:
    """compose.json: a study-results document with one ``compose`` row, so ``skillgraft report`` shows it."""
    from skillgraft.study.common import machine

    row = {
        "learn": spec.learn,
        "granularity": spec.blocks_kind,
        "inputs": dict(zip(spec.names, labels)),
        "examples": result.examples,
        "settings": {
            "init": spec.init,
            "bounds": list(spec.bounds),
            "steps": spec.steps,
            "lr": spec.lr,
            "reg": spec.reg,
            "batch": spec.batch,
            "score": spec.score,
            "gen_tokens": spec.gen_tokens,
            "seed": spec.seed,
        },  # fmt: skip
        "coefficients": result.coefficients,
        "curve": result.curve,
        "fit_seconds": fit_seconds,
        "seconds": result.seconds,
    }
    return {"kind": "skillgraft-study", "version": 1, "machine": machine(), "skills": spec.names, "compose": [row]}
