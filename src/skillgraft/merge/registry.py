"""The merge-method registry: ``@merge_method`` turns a pure function into a registered, typed method.

A method is ``fn(job: TensorJob, params: P) -> Tensor`` where ``P`` is a frozen dataclass of its parameters
(validated in ``__post_init__``) and the returned tensor is the merged *delta* for ``job.name``; its
:class:`Steps` say how the engine runs it slice by slice. ``P`` may define ``check_plan(facts: PlanFacts)`` for
checks that need the merge's inputs, weights or the model's block count (run by ``plan_merge`` before any tensor
is read) and ``supplier(layer) -> int`` when each tensor comes from one input.
"""

from __future__ import annotations

import dataclasses
import difflib
import keyword
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from skillgraft.errors import InputError
from skillgraft.merge import steps


@dataclass(frozen=True)
class TensorJob:
    """Everything a method may look at for one tensor name.

    ``deltas`` is ``[n_inputs, *shape]`` fp32 (Δᵢ = θᵢ − θ₀); ``weights`` is ``[n_inputs]`` fp32 (the user's
    per-input weights). ``base`` (fp32 θ₀) is given only to methods registered with ``needs_base``; ``rng``
    only to ``randomized`` ones: one generator per input (the engine seeds input i's from the run's seed, the
    tensor name and i; chunked methods draw through :meth:`keep`, counter-based, so draws depend on neither
    tensor order, slicing nor threads), or one generator shared by all inputs, drawn from input by input
    (mergekit's single stream); see :meth:`rng_for`.
    ``thresholds`` holds per-input magnitude thresholds for whole-model trimming when the engine computed
    them; ``stats`` holds per-input statistics (diagonal Fisher, input Gram matrix) when the method asks.
    ``layer`` is the transformer block index parsed from the name (None for embeddings, final norm, …).
    ``pool`` is the engine's ``map(fn, items)`` for per-input work side by side (see :meth:`each`); methods never
    start threads of their own. ``compute_dtype`` is the merge's compute dtype (see ``TensorPlan``): ``deltas`` are
    in it for ``low_precision`` methods, in fp32 otherwise; a method that follows mergekit's arithmetic in a
    16-bit dtype looks at it.
    """

    name: str
    deltas: torch.Tensor
    weights: torch.Tensor
    base: torch.Tensor | None = None
    rng: torch.Generator | tuple[torch.Generator, ...] | None = None
    thresholds: tuple[float, ...] | None = None
    stats: tuple[torch.Tensor, ...] | None = None
    layer: int | None = None
    num_layers: int | None = None
    pool: Callable[[Callable[[Any], Any], list], list] | None = None
    compute_dtype: torch.dtype = torch.float32  # the merge's compute dtype; the inputs were rounded to it

    @property
    def n(self) -> int:
        return int(self.deltas.shape[0])

    def each(self, fn: Callable[[Any], Any], items: list) -> list:
        """``[fn(x) for x in items]``, on the engine's threads when it gave some (torch releases the GIL; sorts,
        histograms and seeded draws are single-threaded, so per-input work runs side by side)."""
        if self.pool is None or len(items) < 2:
            return [fn(x) for x in items]
        return self.pool(fn, items)

    def rng_for(self, i: int) -> torch.Generator | None:
        """The generator input ``i`` draws from."""
        return self.rng[i] if isinstance(self.rng, tuple) else self.rng

    def keep(self, i: int, sl: slice, density: float) -> torch.Tensor:
        """A uint8 0/1 mask, P(1) = ``density``, over the flat entries ``sl`` of input ``i``'s Δ.

        With per-input generators (the engine's) the draws are counter-based (``steps.block_keep`` keyed by
        the generator's seed): the same for any ``SLICE``-aligned slicing, in any order, on any thread. With one
        shared generator (or None: torch's global one) the mask is ``rand < density`` from the next entries of
        that one stream, in call order — mergekit's draws (``bernoulli``) when seeded alike.
        """
        if isinstance(self.rng, tuple):
            return steps.block_keep(self.rng[i].initial_seed(), sl.start, sl.stop, density)
        return (torch.rand(sl.stop - sl.start, generator=self.rng) < density).view(torch.uint8)


@dataclass(frozen=True)
class Steps:
    """The one contract every method is run through: ``prepare`` once per tensor, then ``apply`` per slice.

    ``prepare(job, params)`` sees the whole tensor (``job.deltas`` ``[n, *shape]``, ``job.base`` the tensor) and
    returns per-tensor quantities (trim thresholds, kept-entry masks, norms, or — for a method that needs the
    whole tensor at once — the merged delta itself, flattened) or None. ``apply(job, params, ctx, sl)`` merges the
    flat slice ``sl`` (``job.deltas`` is ``[n, len]``, ``job.base`` the matching slice) and must give, slice by
    slice in order, exactly what one call over the whole tensor gives. Per-input generators are drawn from in
    slice order. The method's own function is ``apply`` over one slice holding everything (:func:`whole`), so the
    engine and a direct call run the same code.

    ``reads_whole(params)``: whether ``prepare`` reads the deltas for these parameters; when false the engine
    passes ``[n, 0]`` deltas and never materialises the tensor (e.g. TIES with whole-model thresholds).
    ``model_pass(plan, params, progress)``: an optional pass over the whole model before any tensor is merged
    (whole-model trim thresholds, Fisher or Gram statistics); it returns None or a :class:`ModelPass` whose
    ``fields(name)`` become extra :class:`TensorJob` fields for that tensor.
    """

    prepare: Callable[[TensorJob, Any], Any] | None
    apply: Callable[[TensorJob, Any, Any, slice], torch.Tensor]
    reads_whole: Callable[[Any], bool] = lambda params: True
    model_pass: Callable[[Any, Any, Any], ModelPass | None] | None = None
    whole_tensor: bool = False  # ``prepare`` computes the whole merged delta (see :func:`whole_tensor`)


class ModelPass:
    """What a method's whole-model pass found: per-tensor job fields, and resources to release at the end."""

    def fields(self, name: str) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


def whole(job: TensorJob, params: Any, method: Steps) -> torch.Tensor:
    """Run a method over a whole tensor as one slice; returns the merged delta in the tensor's shape."""
    shape = job.deltas.shape[1:]
    ctx = method.prepare(job, params) if method.prepare else None
    flat = dataclasses.replace(
        job,
        deltas=job.deltas.reshape(job.n, -1),
        base=None if job.base is None else job.base.reshape(-1),
    )
    return method.apply(flat, params, ctx, slice(0, flat.deltas.shape[1])).reshape(shape)


def _take(job: TensorJob, params: Any, ctx: torch.Tensor, sl: slice) -> torch.Tensor:
    return ctx[sl]


def whole_tensor(fn: Callable[[TensorJob, Any], torch.Tensor], model_pass: Any = None) -> Steps:
    """The contract for a method that needs the whole tensor at once: ``prepare`` runs ``fn`` and keeps the
    flattened result; ``apply`` hands out its slices."""
    return Steps(lambda job, params: fn(job, params).reshape(-1), _take, model_pass=model_pass, whole_tensor=True)


@dataclass(frozen=True)
class PlanFacts:
    """What a parameter object's ``check_plan`` may look at: known once the inputs are opened, before any
    tensor is read."""

    n_inputs: int
    num_layers: int | None
    weights: tuple[float, ...]  # each input's weight (its default, for inputs with per-block weights)


@dataclass(frozen=True)
class NoParams:
    """For methods without parameters."""


MethodFn = Callable[[TensorJob, Any], torch.Tensor]


@dataclass(frozen=True)
class MethodInfo:
    name: str
    fn: MethodFn
    params: type
    needs_base: bool = False
    randomized: bool = False
    stats: str | None = None  # "fisher" | "gram" | None: the examples-based statistics its model pass computes
    steps: Steps | None = None  # how the engine runs it (every registered method has one)
    min_inputs: int = 1
    max_inputs: int | None = None
    # computes in its inputs' precision when the merge's compute dtype is below fp32 (mergekit's task-arithmetic
    # family does: Δ, products, sums and the final add in bf16 for a bf16 config); otherwise fp32 throughout
    low_precision: bool = False

    @property
    def doc(self) -> str:
        return (self.fn.__doc__ or "").strip()

    def make_params(self, values: dict[str, Any]) -> Any:
        """Build the frozen parameter object, naming unknown keys and bad values in one-line errors."""
        values = {(k + "_" if keyword.iskeyword(k) else k): v for k, v in values.items()}
        fields = {f.name for f in dataclasses.fields(self.params)}
        unknown = sorted(set(values) - fields)
        if unknown:
            near = difflib.get_close_matches(unknown[0], sorted(fields), n=1)
            keys = sorted(map(config_key, fields))
            hint = (
                f"did you mean {config_key(near[0])!r}?" if near else f"{self.name} takes: {', '.join(keys) or 'none'}"
            )
            raise InputError(f"unknown parameter {config_key(unknown[0])!r} for merge method {self.name!r}", hint=hint)
        for key, value in values.items():
            for v in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    continue
                if not math.isfinite(v):
                    raise InputError(
                        f"merge method {self.name!r}: parameter {key.rstrip('_')!r} must be finite, not {v}",
                        hint="give a finite number (YAML reads .inf and .nan as infinity and not-a-number)",
                    )
        try:
            return self.params(**values)
        except TypeError as e:
            raise InputError(f"bad parameters for merge method {self.name!r}: {e}") from e


def config_key(field: str) -> str:
    """A parameter's name as written in a config: ``lambda_`` (a Python keyword plus ``_``) is ``lambda``."""
    bare = field.removesuffix("_")
    return bare if bare != field and keyword.iskeyword(bare) else field


REGISTRY: dict[str, MethodInfo] = {}


def merge_method(
    name: str,
    params: type = NoParams,
    *,
    needs_base: bool = False,
    randomized: bool = False,
    stats: str | None = None,
    steps: Steps | None = None,
    model_pass: Any = None,
    min_inputs: int = 1,
    max_inputs: int | None = None,
    low_precision: bool = False,
) -> Callable[[MethodFn], MethodFn]:
    """Register ``fn`` (the method on a whole tensor) as merge method ``name``.

    ``steps`` is how the engine runs it slice by slice (``fn`` then is ``whole(job, params, steps)``); without it
    the method needs the whole tensor at once and runs as :func:`whole_tensor` (with ``model_pass``, if given).
    ``low_precision``: see :attr:`MethodInfo.low_precision`. A second registration of a name is an error."""

    def register(fn: MethodFn) -> MethodFn:
        if name in REGISTRY:
            raise RuntimeError(f"merge method name {name!r} registered twice")
        run = steps if steps is not None else whole_tensor(fn, model_pass)
        REGISTRY[name] = MethodInfo(
            name, fn, params, needs_base, randomized, stats, run, min_inputs, max_inputs, low_precision
        )
        return fn

    return register


def get_method(name: str) -> MethodInfo:
    """Look a method up by name; unknown names get a "did you mean" hint."""
    _load_methods()
    if name not in REGISTRY:
        near = difflib.get_close_matches(name, sorted(REGISTRY), n=1)
        hint = f"did you mean {near[0]!r}?" if near else f"known methods: {', '.join(sorted(REGISTRY))}"
        raise InputError(f"unknown merge method {name!r}", hint=hint)
    return REGISTRY[name]


def all_methods() -> list[MethodInfo]:
    _load_methods()
    return [REGISTRY[k] for k in sorted(REGISTRY)]


def _load_methods() -> None:
    import skillgraft.merge.methods  # noqa: F401  (registers every method on import)
