"""The ``skillgraft evolve`` config: the frozen ``EvolveSpec``, parsed and checked from YAML with one-line errors.

Parsing checks shape, types and ranges only; :func:`skillgraft.compose.evolve.check_spec` then opens the files
(base, inputs, task JSONL) — all before any model is loaded. See docs/evolve.md for the schema.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skillgraft.errors import InputError

DEFAULT_METHODS = ("task_arithmetic", "ties", "dare_ties")
KEYS = {
    "base",
    "inputs",
    "tasks",
    "limit",
    "methods",
    "layer_groups",
    "weight",
    "density",
    "select_inputs",
    "population",
    "generations",
    "seed",
    "sigma",
    "batch_size",
    "threads_per_worker",
}
# Keys that do not change which candidates are drawn or how they score: a run may be resumed (extended) with
# another value. Only ``generations``: a run with more generations replays the stored ones and goes on.
RESUMABLE_KEYS = ("generations",)


@dataclass(frozen=True)
class EvolveSpec:
    """A complete search request (paths absolute after :func:`load_spec`; nothing is opened here).

    ``weight`` and ``density`` are inclusive ``(low, high)`` bounds; ``sigma`` is CMA-ES's initial step size in
    gene space, where every gene's useful range is [0, 1] (see ``compose/genome.py``).
    """

    base: str
    inputs: tuple[str, ...]
    tasks: tuple[str, ...]
    limit: int | None = 16
    methods: tuple[str, ...] = DEFAULT_METHODS
    layer_groups: int = 1
    weight: tuple[float, float] = (0.0, 1.5)
    density: tuple[float, float] = (0.1, 1.0)
    select_inputs: bool = False
    population: int = 8
    generations: int = 6
    seed: int = 0
    sigma: float = 0.25
    batch_size: int = 64
    threads_per_worker: int = 1

    def to_dict(self) -> dict[str, Any]:
        """The normalized config (every key, defaults filled in), as stored in the checkpoint and evolve.json."""
        return {
            "base": self.base,
            "inputs": list(self.inputs),
            "tasks": list(self.tasks),
            "limit": self.limit,
            "methods": list(self.methods),
            "layer_groups": self.layer_groups,
            "weight": list(self.weight),
            "density": list(self.density),
            "select_inputs": self.select_inputs,
            "population": self.population,
            "generations": self.generations,
            "seed": self.seed,
            "sigma": self.sigma,
            "batch_size": self.batch_size,
            "threads_per_worker": self.threads_per_worker,
        }

    def search_hash(self, task_digests: list[str]) -> str:
        """A hash of everything that decides the run's results, so ``--resume`` can refuse a changed config:
        the normalized config without ``generations`` plus each task file's content digest."""
        d = {k: v for k, v in self.to_dict().items() if k not in RESUMABLE_KEYS}
        d["task_digests"] = task_digests
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _int(d: dict, key: str, default: int | None, lo: int, allow_none: bool = False) -> int | None:
    v = d.get(key, default)
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise InputError(f"config: {key} must be an integer >= {lo}, not {v!r}", hint=f"e.g. {key}: {default or lo}")
    return v


def _bounds(d: dict, key: str, default: tuple[float, float], lo: float, hi: float) -> tuple[float, float]:
    v = d.get(key, list(default))
    ok = isinstance(v, (list, tuple)) and len(v) == 2
    ok = ok and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)
    if not ok:
        raise InputError(
            f"config: {key} must be a [low, high] pair of numbers, not {v!r}", hint=f"e.g. {key}: {list(default)}"
        )
    a, b = float(v[0]), float(v[1])
    if a > b:
        raise InputError(f"config: {key} bounds are reversed ({a} > {b})", hint=f"write {key}: [{b}, {a}]")
    if a < lo or b > hi or (key == "density" and a <= 0):
        span = "(0, 1]" if key == "density" else f"[{lo}, {hi}]"
        raise InputError(f"config: {key} bounds {[a, b]} leave the range {span}")
    return a, b


def _paths(d: dict, key: str) -> tuple[str, ...]:
    v = d.get(key)
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not v or not all(isinstance(x, str) and x for x in v):
        raise InputError(f"config: {key} must be a non-empty list of paths", hint=f"e.g. {key}: [./a, ./b]")
    if len(set(v)) != len(v):
        raise InputError(f"config: {key} lists the same path twice", hint="drop the duplicate")
    return tuple(v)


def _methods(d: dict) -> tuple[str, ...]:
    v = d.get("methods", list(DEFAULT_METHODS))
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not v or not all(isinstance(x, str) for x in v):
        raise InputError(
            "config: methods must be a non-empty list of merge method names", hint="e.g. [ties, dare_ties]"
        )
    if len(set(v)) != len(v):
        raise InputError("config: methods lists a method twice", hint="drop the duplicate")
    return tuple(v)


def from_dict(d: Any, root: Path | None = None) -> EvolveSpec:
    """Parse and range-check a config mapping; relative paths resolve against ``root`` (the config's directory)."""
    if not isinstance(d, dict):
        raise InputError("an evolve config must be a YAML mapping", hint="see docs/evolve.md for the schema")
    extra = sorted(set(d) - KEYS)
    if extra:
        import difflib

        near = difflib.get_close_matches(str(extra[0]), sorted(KEYS), n=1)
        hint = f"did you mean {near[0]!r}?" if near else f"supported: {', '.join(sorted(KEYS))}"
        raise InputError(f"config: unknown key {extra[0]!r}", hint=hint)
    for key in ("base", "inputs", "tasks"):
        if key not in d:
            raise InputError(f"config: missing required key {key!r}", hint="see docs/evolve.md for the schema")
    if not isinstance(d["base"], str) or not d["base"]:
        raise InputError("config: base must be a path to the base model directory")
    select = d.get("select_inputs", False)
    if not isinstance(select, bool):
        raise InputError(f"config: select_inputs must be true or false, not {select!r}")
    seed = d.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"config: seed must be a non-negative integer, not {seed!r}")
    sigma = d.get("sigma", 0.25)
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0 < sigma <= 1:
        raise InputError(f"config: sigma must be a number in (0, 1], not {sigma!r}", hint="e.g. sigma: 0.25")

    def fix(p: str) -> str:
        q = Path(p).expanduser()
        return str((root / q if root is not None and not q.is_absolute() else q).resolve())

    def fix_input(p: str) -> str:  # like merge configs: a path next to the config, else as given (library refs)
        q = Path(p).expanduser()
        if root is not None and (root / q).exists():
            return str((root / q).resolve())
        return str(q.resolve()) if q.exists() else p

    spec = EvolveSpec(
        base=fix(d["base"]),
        inputs=tuple(fix_input(p) for p in _paths(d, "inputs")),
        tasks=tuple(fix(p) for p in _paths(d, "tasks")),
        limit=_int(d, "limit", 16, 1, allow_none=True),
        methods=_methods(d),
        layer_groups=_int(d, "layer_groups", 1, 1),  # type: ignore[arg-type]
        weight=_bounds(d, "weight", (0.0, 1.5), -math.inf, math.inf),
        density=_bounds(d, "density", (0.1, 1.0), 0.0, 1.0),
        select_inputs=select,
        population=_int(d, "population", 8, 2),  # type: ignore[arg-type]
        generations=_int(d, "generations", 6, 1),  # type: ignore[arg-type]
        seed=seed,
        sigma=float(sigma),
        batch_size=_int(d, "batch_size", 64, 1),  # type: ignore[arg-type]
        threads_per_worker=_int(d, "threads_per_worker", 1, 1),  # type: ignore[arg-type]
    )
    if len(set(spec.tasks)) != len(spec.tasks):
        raise InputError("config: tasks name the same file twice", hint="drop the duplicate")
    return spec


def load_spec(path: str | Path) -> EvolveSpec:
    """Read an evolve YAML; relative paths resolve against the file's directory."""
    from skillgraft.merge.config import read_yaml

    path = Path(path)
    return from_dict(read_yaml(path, "evolve config"), path.parent.resolve())
