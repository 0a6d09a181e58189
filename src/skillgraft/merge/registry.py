"""The merge-method registry: ``@merge_method`` turns a pure function into a registered, typed method.

A method is ``fn(job: TensorJob, params: P) -> Tensor`` where ``P`` is a frozen dataclass of its parameters
(validated in ``__post_init__``) and the returned tensor is the merged *delta* for ``job.name``. ``P`` may define
``check_plan(n_inputs, num_layers)`` for checks that need the merge's input count or the model's block count (run
by ``plan_merge`` before any tensor is read) and ``supplier(layer) -> int`` when each tensor comes from one input.
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

    @property
    def n(self) -> int:
        return int(self.deltas.shape[0])

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
class Chunked:
    """How a method merges a tensor slice by slice, so the engine never holds its temporaries whole.

    ``prepare(job, params)`` sees the whole tensor once (``job.deltas`` flattened to ``[n, numel]``) and returns
    per-tensor quantities (trim thresholds, kept-entry masks, norms) or None; ``apply(job, params, ctx, sl)``
    merges the flat slice ``sl`` (``job.deltas`` is ``[n, len]``, ``job.base`` the matching slice) and must give,
    slice by slice in order, exactly what one call over the whole tensor gives. Per-input generators are drawn
    from in slice order. The method's own function is ``apply`` over one slice holding everything
    (:func:`whole`), so both paths run the same code.
    """

    prepare: Callable[[TensorJob, Any], Any] | None
    apply: Callable[[TensorJob, Any, Any, slice], torch.Tensor]
    # Whether ``prepare`` reads the deltas for these parameters; when false the engine passes ``[n, 0]`` deltas
    # (e.g. TIES with whole-model thresholds only needs ``job.thresholds``) and never materialises the tensor.
    needs_whole: Callable[[Any], bool] = lambda params: True


def whole(job: TensorJob, params: Any, chunked: Chunked) -> torch.Tensor:
    """Run a chunked method over a whole tensor in one slice; returns the merged delta in the tensor's shape."""
    shape = job.deltas.shape[1:]
    flat = dataclasses.replace(
        job,
        deltas=job.deltas.reshape(job.n, -1),
        base=None if job.base is None else job.base.reshape(-1),
    )
    ctx = chunked.prepare(flat, params) if chunked.prepare else None
    numel = flat.deltas.shape[1]
    return chunked.apply(flat, params, ctx, slice(0, numel)).reshape(shape)


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
    stats: str | None = None  # "fisher" | "gram" | None
    global_trim: bool = False  # may use engine-computed whole-model thresholds
    chunked: Chunked | None = None  # the engine may merge slice by slice
    min_inputs: int = 1
    max_inputs: int | None = None
    aliases: tuple[str, ...] = ()

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
            hint = f"did you mean {near[0]!r}?" if near else f"{self.name} takes: {', '.join(sorted(fields)) or 'none'}"
            raise InputError(f"unknown parameter {unknown[0]!r} for merge method {self.name!r}", hint=hint)
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


REGISTRY: dict[str, MethodInfo] = {}
_ALIASES: dict[str, str] = {}


def merge_method(
    name: str,
    params: type = NoParams,
    *,
    needs_base: bool = False,
    randomized: bool = False,
    stats: str | None = None,
    global_trim: bool = False,
    chunked: Chunked | None = None,
    min_inputs: int = 1,
    max_inputs: int | None = None,
    aliases: tuple[str, ...] = (),
) -> Callable[[MethodFn], MethodFn]:
    """Register ``fn`` as merge method ``name``; a second registration of a name or alias is an error."""

    def register(fn: MethodFn) -> MethodFn:
        for key in (name, *aliases):
            if key in REGISTRY or key in _ALIASES:
                raise RuntimeError(f"merge method name {key!r} registered twice")
        info = MethodInfo(
            name, fn, params, needs_base, randomized, stats, global_trim, chunked, min_inputs, max_inputs, aliases
        )
        REGISTRY[name] = info
        _ALIASES.update({a: name for a in aliases})
        return fn

    return register


def get_method(name: str) -> MethodInfo:
    """Look a method up by name or alias; unknown names get a "did you mean" hint."""
    _load_methods()
    key = _ALIASES.get(name, name)
    if key not in REGISTRY:
        near = difflib.get_close_matches(name, sorted([*REGISTRY, *_ALIASES]), n=1)
        hint = f"did you mean {near[0]!r}?" if near else f"known methods: {', '.join(sorted(REGISTRY))}"
        raise InputError(f"unknown merge method {name!r}", hint=hint)
    return REGISTRY[key]


def all_methods() -> list[MethodInfo]:
    _load_methods()
    return [REGISTRY[k] for k in sorted(REGISTRY)]


def _load_methods() -> None:
    import skillgraft.merge.methods  # noqa: F401  (registers every method on import)
