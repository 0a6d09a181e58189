"""Planning a merge: open every input (headers, manifests, adapter configs — no weights) and validate the whole
request before any tensor is read. :mod:`skillgraft.merge.engine` runs the plan.

Nothing here names a method or a parameter: methods check what they need through their parameters'
``check_plan(PlanFacts)`` and say through ``supplier(layer)`` when each tensor comes from one input.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from skillgraft.errors import InputError
from skillgraft.io.checkpoint import Checkpoint
from skillgraft.io.writer import check_output
from skillgraft.merge.config import MergeConfig
from skillgraft.merge.registry import MethodInfo, ModelPass, PlanFacts, get_method
from skillgraft.merge.sources import (
    CheckpointSource,
    DeltaSource,
    check_source_fits,
    detect,
    missing_model,
    open_source,
)
from skillgraft.skill.apply import check_fit
from skillgraft.skill.fingerprint import fingerprint_checkpoint, fingerprint_tokenizer

OUT_FORMATS = ("hf", "skill", "lora")
LAYER_RE = re.compile(r"\.(?:layers|h|blocks|layer|block)\.(\d+)\.")
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class MergeOptions:
    """How to run a merge (everything that is not the merge itself)."""

    out: Path | None  # None: in memory (:func:`skillgraft.merge.engine.merge_in_memory`)
    out_format: str = "hf"
    rank: int | None = None  # for out_format="lora"
    overwrite: bool = False
    force: bool = False  # apply skills made for another base
    seed: int | None = None  # overrides the config's seed
    library: Path | None = None
    allow_pickle: bool = False
    # --dry-run: read no weights, so skill packs' base fingerprints (a hash of every base weight) go unchecked
    dry_run: bool = False
    max_shard_bytes: int = 2 * 1024**3
    threads: int | None = None  # None: the cores this process may run on
    compute_dtype: str | None = None  # overrides the config's (``float32`` for full-precision arithmetic)


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    in_dtype: torch.dtype
    out_dtype: torch.dtype
    users: tuple[int, ...]  # indices of the inputs that change this tensor
    weights: tuple[float, ...] = ()  # each input's weight for this tensor
    params: Any = None  # the method's parameters for this tensor (the merge's, unless they vary per tensor)
    # Inputs are rounded to this dtype as they are read; methods that compute in their inputs' precision
    # (MethodInfo.low_precision) compute in it, the others in fp32; the merged tensor is rounded to it, then
    # cast to ``out_dtype``. fp32 (no rounding) unless the config asks (a mergekit YAML's ``dtype``).
    compute_dtype: torch.dtype = torch.float32

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def out_bytes(self) -> int:
        return self.numel * self.out_dtype.itemsize


@dataclass
class MergePlan:
    config: MergeConfig
    method: MethodInfo
    params: Any
    base: Checkpoint
    sources: list[DeltaSource]
    tensors: list[TensorPlan]
    num_layers: int | None
    seed: int
    unchecked_fingerprints: tuple[str, ...] = ()  # skill inputs whose base fingerprint a dry run did not check
    warnings: tuple[str, ...] = ()  # what could not be checked at all (a pack without a base fingerprint)
    model_pass: ModelPass | None = None  # what the method's whole-model pass found (set by the engine)
    resources: list[Any] = field(default_factory=list)  # temp dirs and files released with the plan

    @property
    def out_bytes(self) -> int:
        return sum(t.out_bytes for t in self.tensors)

    def describe(self) -> dict:
        """The dry-run report: per-tensor sources, method and output size (no weights read)."""
        rows = []
        for t in self.tensors:
            srcs = [f"{self.sources[i].label}:{self.sources[i].describe(t.name)}" for i in t.users]
            rows.append(
                {
                    "tensor": t.name,
                    "shape": list(t.shape),
                    "out_dtype": str(t.out_dtype).split(".")[-1],
                    "compute_dtype": str(t.compute_dtype).split(".")[-1],
                    "inputs": srcs,
                    "action": "merge" if t.users else "copy base",
                    "bytes": t.out_bytes,
                }
            )
        return {
            "method": self.method.name,
            "parameters": dataclasses.asdict(self.params),
            "inputs": [
                {**i.to_dict(), "source": s.label, "kind": s.kind} for s, i in zip(self.sources, self.config.inputs)
            ],
            "tensors": rows,
            "merged_tensors": sum(1 for t in self.tensors if t.users),
            "total_tensors": len(self.tensors),
            "expected_output_bytes": self.out_bytes,
            "fingerprints_not_checked": list(self.unchecked_fingerprints),
            "warnings": list(self.warnings),
        }

    def close(self) -> None:
        for s in self.sources:
            s.close()
        if self.model_pass is not None:
            self.model_pass.close()
            self.model_pass = None
        for r in self.resources:
            r.cleanup() if hasattr(r, "cleanup") else r.close()
        self.resources.clear()
        self.base.close()


def _check_counts(info: MethodInfo, config: MergeConfig) -> None:
    n = len(config.inputs)
    if n < info.min_inputs or (info.max_inputs is not None and n > info.max_inputs):
        want = f"exactly {info.min_inputs}" if info.min_inputs == info.max_inputs else f"at least {info.min_inputs}"
        raise InputError(f"merge method {info.name!r} takes {want} input(s), the config gives {n}")


def plan_merge(config: MergeConfig, opts: MergeOptions) -> MergePlan:
    """Validate the whole merge before reading any tensor; returns the plan (inputs opened lazily)."""
    if opts.out_format not in OUT_FORMATS:
        raise InputError(f"unknown output format {opts.out_format!r}", hint=f"use one of {', '.join(OUT_FORMATS)}")
    if opts.out_format == "lora" and (opts.rank is None or opts.rank < 1):
        raise InputError("--out-format lora needs --rank R (R >= 1)")
    if opts.threads is not None and opts.threads < 1:
        raise InputError(f"threads must be at least 1, not {opts.threads}")
    info = get_method(config.method)
    params = info.make_params(config.parameters_for("", 0.0))
    _check_counts(info, config)
    if info.stats and not config.examples:
        raise InputError(f"merge method {info.name!r} needs examples", hint="set 'examples: FILE.jsonl' in the config")
    if config.examples and not Path(config.examples).exists():
        raise InputError(f"examples file {config.examples} does not exist")
    if opts.out is not None:
        check_output(Path(opts.out), opts.overwrite)
    layout = None
    if config.layout is not None:
        if opts.out_format != "hf":
            raise InputError("a layer layout (mergekit 'slices') writes a full model", hint="use --out-format hf")
        from skillgraft.merge.layout import Layout

        layout = Layout(config.layout, lambda model: _open_model(model, opts.allow_pickle))
    else:
        refs = [detect(i.source, opts.library) for i in config.inputs]
    try:
        # with a layout: the base model's block of each slice (passthrough: each slice's one source). A view
        # (layout.RenamedCheckpoint, vocab.VocabCheckpoint) answers the same calls as a Checkpoint.
        base: Any = (
            _open_model(config.base, opts.allow_pickle)
            if layout is None
            else layout.view(config.base if config.inputs else 0, config.base)
        )
    except BaseException:
        if layout is not None:
            layout.close()
        raise
    sources: list[DeltaSource] = []
    vocab = None
    try:
        if config.tokenizer is not None:  # mergekit's tokenizer keys: vocabulary-re-indexed views (merge/vocab.py)
            from skillgraft.merge.vocab import Vocabulary

            if opts.out_format != "hf":
                raise InputError("a mergekit tokenizer merge writes a full model", hint="use --out-format hf")
            vocab = Vocabulary(config.tokenizer, opts.compute_dtype or config.compute_dtype, opts.allow_pickle)
            base = vocab.view(base, config.base)
        num_layers = count_layers(base)
        per_tensor = _tensor_settings(config, info, params, base.names(), num_layers)
        facts = PlanFacts(len(config.inputs), num_layers, tuple(i.weight for i in config.inputs))
        for p in {id(p): p for _, p in per_tensor.values()}.values():
            check_plan = getattr(p, "check_plan", None)  # checks that need the inputs or the model's size
            if check_plan is not None:
                check_plan(facts)
        shapes = {n: base.shape(n) for n in base.names()}
        fp = None
        unchecked: list[str] = []
        notes: list[str] = []
        tokenizer = fingerprint_tokenizer(base.path)  # read once, not per input
        for k, inp in enumerate(config.inputs):
            if layout is not None:
                src: DeltaSource = CheckpointSource.of(layout.view(inp.source, config.base), inp.source)
            else:
                src = open_source(refs[k], opts.library, opts.allow_pickle)
            if vocab is not None:
                src = vocab.source(src, inp.source)
            sources.append(src)
            check_source_fits(src, shapes)
            if src.kind == "skill":
                pack = src.pack  # type: ignore[attr-defined]
                if not opts.force and pack.manifest.base.fingerprint:
                    if opts.dry_run:
                        unchecked.append(src.label)  # names and shapes are still checked below
                    else:
                        fp = fp or fingerprint_checkpoint(base).content
                notes += check_fit(pack, shapes, fp, opts.force, tokenizer)
        tensors = []
        compute = opts.compute_dtype or config.compute_dtype
        for name in base.names():
            in_dtype = base.dtype(name)
            out_dtype = TORCH_DTYPES[config.out_dtype] if config.out_dtype and in_dtype.is_floating_point else in_dtype
            users = tuple(i for i, s in enumerate(sources) if name in s.names())
            compute_dtype = _compute_dtype(compute, name, base, [sources[i] for i in users])
            weights, tensor_params = per_tensor[name]
            # A method that takes each tensor from one input (layer_swap) names it; only that input is read.
            supplier = getattr(tensor_params, "supplier", None)
            if supplier is not None:
                users = tuple(i for i in users if i == supplier(layer_of(name)))
            tensors.append(
                TensorPlan(name, shapes[name], in_dtype, out_dtype, users, weights, tensor_params, compute_dtype)
            )
    except BaseException:
        for s in sources:
            s.close()
        base.close()
        if layout is not None:
            layout.close()
        if vocab is not None:
            vocab.close()
        raise
    seed = config.seed if opts.seed is None else opts.seed
    plan = MergePlan(config, info, params, base, sources, tensors, num_layers, seed)
    if layout is not None:
        plan.resources.append(layout)
    if vocab is not None:
        plan.resources.append(vocab)
        notes += vocab.warnings
    plan.unchecked_fingerprints = tuple(unchecked)
    if config.ignored:
        why = "mergekit ignores them too"
        if any("[" in k for k in config.ignored):
            why += "; a condition with no 'filter' it reads matches every tensor"
        notes.append(f"mergekit config: ignored key(s) {', '.join(map(repr, config.ignored))} ({why})")
    plan.warnings = tuple(notes)
    return plan


def _open_model(path: str, allow_pickle: bool) -> Checkpoint:
    if not Path(path).is_dir():
        raise missing_model(path)
    return Checkpoint(path, allow_pickle)


def _compute_dtype(compute: str | None, name: str, base: Checkpoint, sources: list[DeltaSource]) -> torch.dtype:
    """A tensor's compute dtype: the one asked for; ``stored`` (a mergekit YAML without ``dtype``): the stored
    dtypes of the base and the checkpoint inputs, promoted (mergekit's); None: fp32."""
    if compute is None or not base.dtype(name).is_floating_point:
        return torch.float32
    if compute != "stored":
        return TORCH_DTYPES[compute]
    dtype = base.dtype(name)
    for s in sources:
        if isinstance(s, CheckpointSource):
            dtype = torch.promote_types(dtype, s.ckpt.dtype(name))
    return dtype


def layer_position(name: str, num_layers: int | None, layout: tuple | None = None) -> float:
    """Where tensor ``name`` sits in the block stack, for gradients: block i of n is i / (n − 1) (a single block
    is 1); tensors outside the blocks (embeddings, final norm, head) are at 0 — mergekit's positions. With a
    layer layout, blocks are counted within their slice (mergekit resolves gradients per slice)."""
    layer = layer_of(name)
    if layer is None or not num_layers:
        return 0.0
    if layout is not None:
        from skillgraft.merge.layout import block_position

        return block_position(layer, layout)
    return layer / (num_layers - 1) if num_layers > 1 else 1.0


def _tensor_settings(
    config: MergeConfig, info: MethodInfo, params: Any, names: Any, num_layers: int | None
) -> dict[str, tuple[tuple[float, ...], Any]]:
    """Each tensor's input weights and method parameters, all resolved and validated before any weight is read;
    tensors whose parameters resolve alike share one parameter object."""
    overall = config.parameters_for("", 0.0)  # what ``params`` was made from
    cache: dict[str, Any] = {repr(sorted(overall.items())): params}
    out = {}
    for name in names:
        pos = layer_position(name, num_layers, config.layout)
        weights = tuple(config.weights_for(name, pos))
        for i, w in enumerate(weights):
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
                raise InputError(f"input {i}: weight for tensor {name!r} must be a finite number, not {w!r}")
        values = config.parameters_for(name, pos)
        key = repr(sorted(values.items()))
        if key not in cache:
            try:
                cache[key] = info.make_params(values)
            except InputError as e:
                raise InputError(f"tensor {name!r}: {e.message}", hint=e.hint) from e
        out[name] = (weights, cache[key])
    return out


def count_layers(base: Checkpoint) -> int | None:
    """The number of transformer blocks: config.json's ``num_hidden_layers`` / ``n_layer``, else one more than the
    highest block index in the tensor names (None when no name has one)."""
    n = base.config.get("num_hidden_layers") or base.config.get("n_layer")
    if isinstance(n, int) and n > 0:
        return n
    layers = [i for i in map(layer_of, base.names()) if i is not None]
    return max(layers) + 1 if layers else None


def layer_of(name: str) -> int | None:
    """The transformer block index in a tensor name (None for embeddings, the final norm, …)."""
    m = LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed from the run's seed and the tensor name: reproducible and order independent."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def input_rngs(seed: int, name: str, n: int) -> tuple[torch.Generator, ...]:
    """One generator per input for tensor ``name``: draws depend on neither tensor order nor slicing."""
    return tuple(torch.Generator().manual_seed(tensor_seed(seed, f"{name}\0{i}")) for i in range(n))
