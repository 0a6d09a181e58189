"""``skillgraft evolve``: a CMA-ES search over merge recipes, each candidate merged in memory by the engine and
scored (greedy exact match) by the evaluation harness; the best recipe is written as a plain merge YAML.

``run_evolve(spec, opts)`` validates everything (config, files, output directory, Ray) before loading a model,
writes a JSON checkpoint after every generation, and resumes by replaying it. See docs/evolve.md.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skillgraft.compose.backends import RAY_PIP, ScorerArgs, open_backend, ray_installed
from skillgraft.compose.evolve_spec import EvolveSpec
from skillgraft.compose.genome import GenomeLayout, layer_globs, make_layout
from skillgraft.errors import FormatError, InputError, NotFoundError, OutputExistsError, WorkerError
from skillgraft.progress import ProgressFn, no_progress

CHECKPOINT, RESULTS, BEST = "checkpoint.json", "evolve.json", "best.yaml"
Notify = Callable[[str], None]


@dataclass(frozen=True)
class EvolveOptions:
    """How to run a search (nothing here changes its result)."""

    out_dir: Path
    resume: bool = False
    overwrite: bool = False
    workers: int | None = 1  # 1: in this process; N > 1: N Ray actors; None with ray_address: one per CPU
    ray_address: str | None = None
    command: str = ""


@dataclass(frozen=True)
class Prepared:
    """What :func:`check_spec` found: the scoring tasks, the genome layout and the hash ``--resume`` checks."""

    spec: EvolveSpec
    tasks: tuple[Any, ...]
    layout: GenomeLayout
    search_hash: str


@dataclass(frozen=True)
class EvolveResult:
    out_dir: Path
    best: dict[str, Any]  # generation, index, fitness, scores, recipe
    curve: list[dict[str, Any]]
    candidates: int
    backend: str
    workers: int
    seconds: float
    resumed_generations: int

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["out_dir"] = str(self.out_dir)
        d["files"] = {k: str(self.out_dir / k) for k in (BEST, RESULTS, CHECKPOINT)}
        return d


def _method_checks(spec: EvolveSpec) -> tuple[str, ...]:
    """Every method must exist, need no calibration examples and take any number of inputs; returns the
    methods that take a ``density``."""
    from skillgraft.merge.registry import get_method

    with_density = []
    for i, name in enumerate(spec.methods):
        try:
            info = get_method(name)
        except InputError as e:
            raise InputError(f"methods[{i}]: {e.message}", hint=e.hint) from None
        if info.stats:
            raise InputError(
                f"methods[{i}]: {name} needs calibration examples, which evolve does not pass",
                hint="search over methods without examples (task_arithmetic, ties, dare_ties, …)",
            )
        if info.max_inputs is not None:
            raise InputError(f"methods[{i}]: {name} takes exactly {info.max_inputs} inputs", hint="drop it")
        if "density" in {f.name for f in dataclasses.fields(info.params)}:
            with_density.append(name)
    return tuple(with_density)


def check_spec(spec: EvolveSpec) -> Prepared:
    """Open every file the search needs (base headers, inputs, task rows) and check they fit; no model is
    loaded and no weight is read, except the base's fingerprint when an input is a skill pack."""
    import hashlib

    from skillgraft.compose.scoring import load_tasks, task_names
    from skillgraft.io.checkpoint import Checkpoint
    from skillgraft.merge.config import MergeConfig, MergeInput
    from skillgraft.merge.plan import MergeOptions, count_layers, plan_merge

    density_methods = _method_checks(spec)
    digests = []
    for i, path in enumerate(spec.tasks):
        if not Path(path).is_file():
            raise NotFoundError(f"tasks[{i}]: task file {path} not found", hint="paths are relative to the config")
        digests.append(hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16])
    tasks = load_tasks(spec.tasks, task_names(spec.tasks), spec.limit)
    base = Checkpoint(spec.base)
    try:
        names, num_layers = list(base.names()), count_layers(base)
    finally:
        base.close()
    if spec.layer_groups > (num_layers or 1):
        raise InputError(
            f"config: layer_groups is {spec.layer_groups} but the base has {num_layers or 'no'} transformer blocks",
            hint=f"use layer_groups <= {num_layers or 1}",
        )
    for k, method in enumerate(spec.methods):  # every input fits the base, under every method
        params = {"density": spec.density[1]} if method in density_methods else {}
        inputs = tuple(MergeInput(s) for s in spec.inputs)
        cfg = MergeConfig(spec.base, method, inputs, params, seed=spec.seed)
        plan_merge(cfg, MergeOptions(out=None, dry_run=k > 0)).close()  # the first checks pack fingerprints
    globs = layer_globs(names, num_layers or 0)
    layout = make_layout(spec, globs, density_methods)
    return Prepared(spec, tasks, layout, spec.search_hash(digests))


def _check_out_dir(prep: Prepared, opts: EvolveOptions) -> list[dict[str, Any]]:
    """Refuse an output that would mix runs; on ``--resume`` return the checkpoint's finished generations."""
    out = Path(opts.out_dir)
    ckpt = out / CHECKPOINT
    if opts.resume and opts.overwrite:
        raise InputError("--resume and --overwrite contradict each other", hint="pass one of them")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out}: exists and is not a directory")
    if not opts.resume:
        existing = [n for n in (CHECKPOINT, RESULTS, BEST) if (out / n).exists()]
        if existing and not opts.overwrite:
            raise OutputExistsError(
                f"{out} already holds an evolve run ({existing[0]})",
                hint="pass --resume to continue it, --overwrite to start again, or choose another --out-dir",
            )
        return []
    if not ckpt.is_file():
        raise NotFoundError(f"--resume: no {CHECKPOINT} in {out}", hint="run without --resume to start a search")
    try:
        state = json.loads(ckpt.read_text())
        gens, stored_hash = state["generations"], state["search_hash"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise FormatError(f"{ckpt}: not an evolve checkpoint ({e})", hint="start again with --overwrite") from None
    if stored_hash != prep.search_hash:
        raise InputError(
            f"--resume: the config changed since {ckpt} was written (search hash {stored_hash}, now "
            f"{prep.search_hash}); only 'generations' may change on resume",
            hint="restore the config, or start again with --overwrite or another --out-dir",
        )
    if len(gens) > prep.spec.generations:
        raise InputError(
            f"--resume: the checkpoint holds {len(gens)} generations, the config asks for {prep.spec.generations}",
            hint=f"set generations: {len(gens)} or more",
        )
    return list(gens)


def _check_backend(opts: EvolveOptions) -> None:
    if opts.workers is not None and opts.workers < 1:
        raise InputError(f"--workers must be at least 1, not {opts.workers}")
    if opts.workers is None and not opts.ray_address:
        raise InputError("--workers must be given without --ray-address")
    if opts.ray_address and not ray_installed():
        raise WorkerError("--ray-address needs Ray, which is not installed", hint=RAY_PIP)


def _write_json(path: Path, obj: Any) -> None:
    from skillgraft.io.writer import atomic_path

    with atomic_path(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(obj, indent=1) + "\n")


def _candidates(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"generation": g["generation"], **c} for g in history for c in g["candidates"]]


def best_candidate(history: list[dict[str, Any]]) -> dict[str, Any]:
    """The highest fitness; on a tie the earliest (generation, then index in it)."""
    best: dict[str, Any] | None = None
    for c in _candidates(history):
        if best is None or c["fitness"] > best["fitness"]:
            best = c
    assert best is not None
    return {k: best[k] for k in ("generation", "index", "fitness", "scores", "recipe")}


def curve(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows, so_far = [], float("-inf")
    for g in history:
        f = [c["fitness"] for c in g["candidates"]]
        so_far = max(so_far, *f)
        rows.append({"generation": g["generation"], "best": max(f), "mean": sum(f) / len(f), "best_so_far": so_far})
    return rows


def _write_best(path: Path, best: dict[str, Any]) -> None:
    import yaml

    from skillgraft.io.writer import atomic_path

    head = (
        f"# skillgraft evolve: best recipe, fitness {best['fitness']:.4f} (mean exact match; generation "
        f"{best['generation']}, candidate {best['index']}). Reproduce: skillgraft merge {path.name} -o ./merged\n"
    )
    with atomic_path(path, overwrite=True) as tmp:
        tmp.write_text(head + yaml.safe_dump(best["recipe"], sort_keys=False))


def _generation(backend: Any, g: int, genomes: list, prep: Prepared, progress: ProgressFn) -> dict[str, Any]:
    spec = prep.spec
    recipes = [prep.layout.decode(x) for x in genomes]
    phase = f"evolve: generation {g + 1}/{spec.generations}"
    progress(phase, 0, len(recipes))
    candidates = []
    for i, (x, recipe, r) in enumerate(zip(genomes, recipes, backend.map(recipes))):
        candidates.append({"index": i, "genome": x, "recipe": recipe, **r})
        progress(phase, i + 1, len(recipes))
    return {"generation": g, "candidates": candidates}


def _run_generations(
    prep: Prepared, opts: EvolveOptions, search: Any, history: list, progress: ProgressFn, notify: Notify
) -> dict[str, Any]:
    """Score the generations the checkpoint lacks, checkpointing after each; returns the backend used."""
    from skillgraft.compose.search import cma_version

    spec, out = prep.spec, Path(opts.out_dir)
    if len(history) >= spec.generations:
        return {"backend": "none (every generation replayed from the checkpoint)", "workers": 0}
    ckpt = {"kind": "skillgraft-evolve-checkpoint", "version": 1, "search_hash": prep.search_hash}
    ckpt.update(config=spec.to_dict(), cma=cma_version())
    args = ScorerArgs(spec.base, prep.tasks, spec.batch_size, spec.threads_per_worker)
    backend = open_backend(args, opts.workers, opts.ray_address, notify)
    try:
        out.mkdir(parents=True, exist_ok=True)  # only now: a config or backend error leaves no directory behind
        if not opts.resume:
            for name in (CHECKPOINT, RESULTS, BEST):  # --overwrite: no file of the old run may outlive it
                (out / name).unlink(missing_ok=True)
        for g in range(len(history), spec.generations):
            genomes = search.ask()
            record = _generation(backend, g, genomes, prep, progress)
            search.tell(genomes, [c["fitness"] for c in record["candidates"]])
            history.append(record)
            _write_json(out / CHECKPOINT, {**ckpt, "generations": history})
            row = curve(history)[-1]
            notify(
                f"generation {g + 1}/{spec.generations}: best {row['best']:.3f}, mean {row['mean']:.3f}, "
                f"best so far {row['best_so_far']:.3f}"
            )
    finally:
        backend.close()
    return {"backend": backend.name, "workers": backend.workers}


def _document(prep: Prepared, opts: EvolveOptions, history: list, run: dict[str, Any]) -> dict[str, Any]:
    """evolve.json: every candidate, the best, the curve, and how the run was executed (``run``)."""
    from skillgraft.compose.search import cma_version
    from skillgraft.study.common import machine

    candidates = _candidates(history)
    return {
        "kind": "skillgraft-evolve",
        "version": 1,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": opts.command,
        "config": prep.spec.to_dict(),
        "search_hash": prep.search_hash,
        "tasks": [t.name for t in prep.tasks],
        "genes": prep.layout.gene_names(),
        "candidates": candidates,
        "best": best_candidate(history),
        "curve": curve(history),
        "machine": machine(),
        "backend": run["backend"],
        "workers": run["workers"],
        "threads_per_worker": prep.spec.threads_per_worker,
        "seconds": run["seconds"],  # this invocation's wall time (a resumed run's earlier part is not included)
        "evaluation_seconds": sum(c["seconds"] for c in candidates),
        "resumed_generations": run["resumed_generations"],
        "cma": cma_version(),
    }


def run_evolve(
    spec: EvolveSpec, opts: EvolveOptions, progress: ProgressFn = no_progress, notify: Notify = lambda m: None
) -> EvolveResult:
    """Run (or resume) the search; returns the best recipe and the fitness curve. Files under ``opts.out_dir``
    are each written atomically; the checkpoint after every generation."""
    from skillgraft.compose.search import Search

    t0 = time.perf_counter()
    prep = check_spec(spec)
    _check_backend(opts)
    history = _check_out_dir(prep, opts)
    out = Path(opts.out_dir)
    search = Search(prep.layout.initial(), spec.sigma, spec.population, spec.seed)
    for gen in history:
        cands = gen["candidates"]
        search.replay(gen["generation"], [c["genome"] for c in cands], [c["fitness"] for c in cands])
    resumed = len(history)
    if resumed:
        notify(f"resumed: replayed {resumed} finished generation(s) from {out / CHECKPOINT} without scoring them")
    run = _run_generations(prep, opts, search, history, progress, notify)
    run.update(seconds=time.perf_counter() - t0, resumed_generations=resumed)
    doc = _document(prep, opts, history, run)
    _write_json(out / RESULTS, doc)
    _write_best(out / BEST, doc["best"])
    n = len(doc["candidates"])
    return EvolveResult(out, doc["best"], doc["curve"], n, run["backend"], run["workers"], run["seconds"], resumed)
