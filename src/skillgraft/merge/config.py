"""Merge configs: skillgraft's own YAML schema and mergekit's, both parsed into one frozen ``MergeConfig``.

Parsing checks shape and types only; :func:`skillgraft.merge.engine.plan_merge` validates everything that needs
the files (paths, shapes, fingerprints) before any tensor is read. See docs/merging.md for the schema.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from skillgraft.errors import FormatError, InputError, NotFoundError

DTYPES = ("float32", "float16", "bfloat16")
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32"}
OUR_KEYS = {"base", "method", "parameters", "inputs", "out_dtype", "compute_dtype", "seed", "examples", "num_examples"}
INPUT_KEYS = {"source", "weight", "blocks"}
MERGEKIT_KEYS = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype"}
MERGEKIT_TOKENIZER_KEYS = {"tokenizer_source", "tokenizer", "chat_template"}  # merge/vocab.py
# mergekit's own top-level keys that skillgraft does not take yet: refused by name (any other top-level key,
# such as ``out_path``, mergekit ignores, and so do we, with a warning)
MERGEKIT_UNSUPPORTED = {"modules"}
MERGEKIT_MODEL_KEYS = {"model", "parameters"}
MERGEKIT_PARAMS = {
    "weight",
    "density",
    "gamma",
    "epsilon",
    "lambda",
    "normalize",
    "t",
    "int8_mask",
    "filter_wise",
    "max_iter",
    "tol",
    "normalize_weights",
    "eps",
    "nuslerp_row_wise",
    "nuslerp_flatten",
    "select_topk",
}
# mergekit's sparsifying methods keep every entry unless ``density`` is given (its default is 1.0, not ours)
MERGEKIT_DENSITY_METHODS = {
    "ties",
    "dare_ties",
    "dare_linear",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
}
MERGEKIT_METHODS = {
    "linear": "linear",
    "task_arithmetic": "task_arithmetic",
    "ties": "ties",
    "dare_ties": "dare_ties",
    "dare_linear": "dare_linear",
    "breadcrumbs": "breadcrumbs",
    "breadcrumbs_ties": "breadcrumbs_ties",
    "della": "della",
    "della_linear": "della_linear",
    "slerp": "slerp",
    "model_stock": "model_stock",
    "nearswap": "nearswap",
    "passthrough": "passthrough",
    "karcher": "karcher",
    "multislerp": "multislerp",
    "nuslerp": "nuslerp",
    "sce": "sce",
    "ram": "ram",
    "arcee_fusion": "arcee_fusion",
}


@dataclass(frozen=True)
class MergeInput:
    """One input and its weight. ``blocks`` holds per-block weights as ``(glob, weight)`` pairs over tensor names
    (``model.layers.3.mlp.*``): the first glob that matches a tensor name gives its weight, ``weight`` the rest.
    ``skillgraft compose`` writes them; any method that takes weights uses them per tensor."""

    source: str  # a .skill path, a library reference, a PEFT adapter dir or a fine-tuned checkpoint dir
    weight: float = 1.0
    blocks: tuple[tuple[str, float], ...] = ()
    setting: Any = None  # a mergekit weight given as a gradient or filter list (see :func:`resolve_setting`)

    def weight_for(self, name: str, position: float = 0.0) -> float:
        if self.setting is not None:
            return float(resolve_setting(self.setting, name, position, self.weight))
        for pattern, w in self.blocks:
            if fnmatch.fnmatchcase(name, pattern):
                return w
        return self.weight

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"source": self.source, "weight": self.weight}
        if self.blocks:
            d["blocks"] = dict(self.blocks)
        return d


@dataclass(frozen=True)
class MergeConfig:
    """A complete merge request (paths are as given; nothing is opened here)."""

    base: str
    method: str
    inputs: tuple[MergeInput, ...]
    parameters: dict[str, Any] = field(default_factory=dict)
    out_dtype: str | None = None  # None: each tensor keeps the base's dtype
    seed: int = 0
    examples: str | None = None  # JSONL of {"prompt", "target"} or {"text"} for fisher / regmean
    num_examples: int = 256
    dialect: str = "skillgraft"  # or "mergekit"
    source_file: str | None = None
    # None: fp32 arithmetic on the inputs as stored; a dtype: inputs rounded to it, and methods that compute in
    # their inputs' precision compute in it; "stored": the inputs' own (promoted) dtype — a mergekit YAML's
    # ``dtype``, or mergekit's behaviour without one (see merge/plan.py)
    compute_dtype: str | None = None
    ignored: tuple[str, ...] = ()  # top-level keys of a mergekit YAML that mergekit ignores (``out_path``)
    layout: tuple | None = None  # mergekit ``slices``: a tuple of merge.layout.OutputSlice (None: layer for layer)
    # mergekit ``tokenizer_source`` / ``tokenizer`` / ``chat_template``: a merge.vocab.TokenizerSpec (None: the
    # base's tokenizer files are copied as they are)
    tokenizer: Any = None

    def weights_for(self, name: str, position: float = 0.0) -> list[float]:
        """Each input's weight for tensor ``name`` (its block weight where one matches; a mergekit gradient or
        filter list resolved at ``name`` and the relative layer ``position``)."""
        return [i.weight_for(name, position) for i in self.inputs]

    def parameters_for(self, name: str, position: float = 0.0) -> dict[str, Any]:
        """The method's parameters for tensor ``name``: a mergekit config's gradients and filter lists resolved
        there (a setting that resolves to nothing leaves the parameter at its default); our own configs' values as
        given (their lists, such as slerp's ``t`` or layer_swap's ``ranges``, are the methods' own)."""
        if self.dialect != "mergekit":
            return dict(self.parameters)
        out = {}
        for key, setting in self.parameters.items():
            value = resolve_setting(setting, name, position, None)
            if value is not None:
                out[key] = value
        return out

    def resolve_paths(self, root: Path) -> MergeConfig:
        """Relative paths in a config file are relative to that file's directory (library refs stay as is)."""

        def fix(p: str) -> str:
            q = Path(p)
            return str(root / q) if not q.is_absolute() and (root / q).exists() else p

        inputs = tuple(dataclasses.replace(i, source=fix(i.source)) for i in self.inputs)
        ex = fix(self.examples) if self.examples else None
        layout = self.layout
        if layout is not None:
            layout = tuple(
                dataclasses.replace(s, sources=tuple(dataclasses.replace(x, model=fix(x.model)) for x in s.sources))
                for s in layout
            )
        tok = self.tokenizer.with_paths(fix) if self.tokenizer is not None else None
        return dataclasses.replace(self, base=fix(self.base), inputs=inputs, examples=ex, layout=layout, tokenizer=tok)


def resolve_setting(setting: Any, name: str, position: float, default: Any) -> Any:
    """A mergekit parameter setting's value for tensor ``name`` at relative layer ``position`` (block i of n is
    i / (n − 1); a single block is 1; tensors outside the blocks are 0), as mergekit resolves it:

    * a scalar is itself;
    * a list of numbers is a gradient: at x = position·(len − 1), (1 − f)·v[⌊x⌋] + f·v[⌊x⌋ + 1] with f = x − ⌊x⌋
      (the last value at position 1); a list of other scalars picks v[⌊x⌋];
    * a list of ``{filter, value}`` conditions (or one): the first whose filter is absent, ``*`` or a substring
      of ``name`` gives its value (itself a scalar or a gradient); none matching gives ``default``.
    """
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list):
        return setting
    if not setting:
        return default
    if all(not isinstance(v, (dict, list)) for v in setting):
        x = position * (len(setting) - 1)
        i0 = int(x)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting):
            return setting[i0]
        i1 = min(len(setting) - 1, i0 + 1)
        f = x - i0
        return (1 - f) * setting[i0] + f * setting[i1]
    for cond in setting:
        flt = cond.get("filter")
        if flt is None or flt == "*" or (name and flt in name):
            return resolve_setting(cond["value"], name, position, default)
    return default


def check_setting(setting: Any, where: str, ignored: list[str] | None = None) -> None:
    """A mergekit parameter setting is a scalar, a gradient (a list of scalars), or a list of ``{filter, value}``
    conditions whose value is a scalar or a gradient; anything else is named in a one-line error. Other keys of a
    condition (``pattern``, an older spelling) mergekit ignores — the condition then matches every tensor —: with
    ``ignored`` given they are appended to it (and ignored alike), else refused."""
    scalar = (bool, int, float, str)
    if isinstance(setting, scalar):
        return
    conds = [setting] if isinstance(setting, dict) else setting
    if isinstance(conds, list) and all(isinstance(v, scalar) for v in conds) and conds:
        return
    if isinstance(conds, list) and conds and all(isinstance(c, dict) for c in conds):
        for i, c in enumerate(conds):
            extra = sorted(set(c) - {"filter", "value"})
            if extra and ignored is not None and "value" in c:
                ignored.extend(f"{where}[{i}].{k}" for k in extra)
            elif extra or "value" not in c:
                raise InputError(
                    f"{where}[{i}]: a condition takes 'value' and optionally 'filter', not {sorted(c)}",
                    hint="e.g. [{filter: self_attn, value: [0, 0.5, 1]}, {value: 0.5}]",
                )
            if c.get("filter") is not None and not isinstance(c["filter"], str):
                raise InputError(f"{where}[{i}].filter must be a string (a substring of tensor names)")
            v = c["value"]
            if not (isinstance(v, scalar) or (isinstance(v, list) and v and all(isinstance(x, scalar) for x in v))):
                raise InputError(f"{where}[{i}].value must be a number or a list of numbers, not {v!r}")
        return
    raise InputError(
        f"{where}: expected a number, a gradient (list of numbers) or a list of {{filter, value}}, not {setting!r}"
    )


def check_dtype(value: Any, key: str) -> str | None:
    if value is None:
        return None
    v = DTYPE_ALIASES.get(str(value), str(value))
    if v not in DTYPES:
        raise InputError(f"{key}: unknown dtype {value!r}", hint=f"use one of {', '.join(DTYPES)}")
    return v


def _weight(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{where}: weight must be a finite number, not {value!r}")
    return float(value)


def _blocks(value: Any, where: str) -> tuple[tuple[str, float], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict) or not all(isinstance(k, str) and k for k in value):
        raise InputError(
            f"{where}: expected a mapping of tensor-name globs to weights", hint="e.g. 'model.layers.0.mlp.*': 0.5"
        )
    return tuple((k, _weight(v, f"{where}[{k!r}]")) for k, v in value.items())


def _unknown(keys: set[str], allowed: set[str], where: str, dialect: str) -> None:
    extra = sorted(keys - allowed)
    if extra:
        raise InputError(
            f"{where}: unsupported key(s) {', '.join(map(repr, extra))} in a {dialect} config",
            hint=f"supported: {', '.join(sorted(allowed))}",
        )


def from_dict(d: dict, source_file: str | None = None) -> MergeConfig:
    """Parse either dialect (mergekit when ``merge_method`` is present)."""
    if not isinstance(d, dict):
        raise InputError("a merge config must be a YAML mapping")
    if "merge_method" in d:
        return from_mergekit(d, source_file)
    if "experts" in d and "base" not in d:
        raise InputError(
            "this is a mergekit-moe config (it lists 'experts'), not a merge config",
            hint="build the mixture of experts with: skillgraft moe CONFIG -o OUT",
        )
    _unknown(set(d), OUR_KEYS, "config", "skillgraft")
    for key in ("base", "method", "inputs"):
        if key not in d:
            raise InputError(f"config: missing required key {key!r}", hint="see docs/merging.md for the schema")
    if not isinstance(d["inputs"], list):  # how many a method takes is checked against it when planning
        raise InputError("config: 'inputs' must be a list")
    inputs = []
    for i, item in enumerate(d["inputs"]):
        item = {"source": item} if isinstance(item, str) else item
        if not isinstance(item, dict) or "source" not in item:
            raise InputError(f"inputs[{i}]: expected a path/reference or a mapping with 'source'")
        _unknown(set(item), INPUT_KEYS, f"inputs[{i}]", "skillgraft")
        blocks = _blocks(item.get("blocks"), f"inputs[{i}].blocks")
        inputs.append(MergeInput(str(item["source"]), _weight(item.get("weight", 1.0), f"inputs[{i}]"), blocks))
    params = d.get("parameters") or {}
    if not isinstance(params, dict):
        raise InputError("config: 'parameters' must be a mapping")
    seed = d.get("seed", 0)
    if not isinstance(seed, int):
        raise InputError(f"config: seed must be an integer, not {seed!r}")
    n = d.get("num_examples", 256)
    if not isinstance(n, int) or n < 1:
        raise InputError(f"config: num_examples must be a positive integer, not {n!r}")
    return MergeConfig(
        str(d["base"]),
        str(d["method"]),
        tuple(inputs),
        dict(params),
        check_dtype(d.get("out_dtype"), "out_dtype"),
        seed,
        d.get("examples"),
        n,
        "skillgraft",
        source_file,
        check_dtype(d.get("compute_dtype"), "compute_dtype"),
    )


def _conds(setting: Any) -> list:
    if isinstance(setting, dict):
        return [setting]
    if isinstance(setting, list) and setting and all(isinstance(c, dict) for c in setting):
        return list(setting)
    return [{"value": setting}]


def _chain(first: Any, then: Any) -> Any:
    """One setting that resolves ``first`` and, where none of its conditions matches, ``then``."""
    if then is None:
        return first
    if isinstance(first, dict) or (isinstance(first, list) and first and all(isinstance(c, dict) for c in first)):
        return _conds(first) + _conds(then)
    return first  # a scalar or a gradient always resolves


def _mk_input(source: str, own: Any, shared: Any, i: int, ignored: list[str]) -> MergeInput:
    """A mergekit model's input: its weight (a number, or a gradient / filter list resolved per tensor; its own
    setting first, then the top-level one, then 1.0)."""
    setting = _chain(own, shared) if own is not None else shared
    if setting is None:
        return MergeInput(source, 1.0)
    check_setting(setting, f"models[{i}].parameters.weight", ignored)
    if isinstance(setting, (int, float)) and not isinstance(setting, bool):
        return MergeInput(source, _weight(setting, f"models[{i}]"))
    nominal = resolve_setting(setting, "", 0.0, 1.0)
    return MergeInput(source, _weight(nominal, f"models[{i}]"), setting=setting)


def _lift(per_model: list[dict], key: str) -> Any:
    """A per-model parameter other than weight must be the same for every model; return that value."""
    values = [p[key] for p in per_model if key in p]
    if not values:
        return None
    if any(v != values[0] for v in values) or len(values) != len(per_model):
        raise InputError(
            f"mergekit config: per-model {key!r} differs between models",
            hint=f"skillgraft takes one {key} per merge: move it to the top-level parameters",
        )
    return values[0]


def from_mergekit(d: dict, source_file: str | None = None) -> MergeConfig:
    """Translate a mergekit YAML (the subset both tools support); unsupported keys are named."""
    unsupported = sorted(MERGEKIT_UNSUPPORTED & set(d))
    if unsupported:
        raise InputError(
            f"mergekit config: key(s) {', '.join(map(repr, unsupported))} not supported by skillgraft yet",
            hint="remove them, or merge this config with mergekit itself (docs/merging.md lists what is supported)",
        )
    ignored = sorted(set(d) - MERGEKIT_KEYS - MERGEKIT_TOKENIZER_KEYS)
    method = MERGEKIT_METHODS.get(d["merge_method"])
    if method is None:
        raise InputError(
            f"mergekit method {d['merge_method']!r} is not supported in mergekit configs",
            hint=f"supported: {', '.join(sorted(MERGEKIT_METHODS))}",
        )
    layout = None
    if "slices" in d:
        if d.get("models"):
            raise InputError("mergekit config: give 'models' or 'slices', not both (mergekit's rule)")
        slice_models, layout = _from_slices(d["slices"], method)
        d = {**d, "models": slice_models}
    models = d.get("models") or []
    if not isinstance(models, list) or not all(isinstance(m, dict) and "model" in m for m in models):
        raise InputError("mergekit config: 'models' must be a list of mappings with a 'model' key")
    tokenizer = _tokenizer_spec(d, models, layout)
    if method == "passthrough":
        return dataclasses.replace(_passthrough(d, models, layout, tuple(ignored), source_file), tokenizer=tokenizer)
    base = d.get("base_model")
    # mergekit's linear averages every listed model, base_model included (its Δ is 0 but its weight counts in the
    # normalizer), so a listed base stays an input; the other methods leave base_model out of their inputs.
    # karcher, multislerp, nuslerp: see the branch below.
    keep_base = method in ("slerp", "linear", "karcher")
    entries = [m for m in models if not (base and str(m["model"]) == str(base) and not keep_base)]
    if base is not None and method == "linear" and not any(str(m["model"]) == str(base) for m in models):
        raise InputError(
            "mergekit config: linear averages every model, and base_model is not among 'models' (mergekit "
            "refuses this: it needs a weight for it)",
            hint="list base_model under 'models' with a weight, or drop 'base_model'",
        )
    # The spherical methods: karcher averages the full weights of every model, base_model included (mergekit
    # appends it when it is not listed); multislerp and nuslerp centre their sphere on base_model, or on zero
    # without one (they then interpolate the full weights: ``origin: zero``). Without base_model the first model
    # stands in as the base (its Δ is 0) and stays an input, as for linear.
    spherical = method in ("karcher", "multislerp", "nuslerp")
    baseless = base is None
    if base is None:  # mergekit's linear needs no base: the first model serves (Δ₁ = 0), result unchanged
        if (method != "linear" and not spherical) or not models:
            raise InputError(f"mergekit config: {d['merge_method']} needs a base_model")
        base = models[0]["model"]
    elif method == "karcher" and not any(str(m["model"]) == str(base) for m in models):
        entries = [*entries, {"model": base}]
    if method == "slerp" and len(entries) == 1:
        entries = [{"model": base}, *entries]  # mergekit's slerp goes from base_model (t=0) to the other model
    per_model = []
    for i, m in enumerate(entries):
        _unknown(set(m), MERGEKIT_MODEL_KEYS, f"models[{i}]", "mergekit")
        p = m.get("parameters") or {}
        _unknown(set(p), MERGEKIT_PARAMS, f"models[{i}].parameters", "mergekit")
        per_model.append(p)
    global_params = dict(d.get("parameters") or {})
    _unknown(set(global_params), MERGEKIT_PARAMS, "parameters", "mergekit")
    for key in MERGEKIT_PARAMS - {"weight"}:
        lifted = _lift(per_model, key)
        if lifted is not None:  # mergekit looks at a model's own setting first, then the top-level one
            global_params[key] = _chain(lifted, global_params.get(key))
    for key, value in global_params.items():
        check_setting(value, f"parameters.{key}", ignored)
    int8_mask = global_params.pop("int8_mask", False)  # mergekit stores its masks as int8: no number changes
    if not isinstance(int8_mask, bool):
        raise InputError(f"mergekit config: int8_mask must be true or false, not {int8_mask!r}")
    if method in MERGEKIT_DENSITY_METHODS:
        global_params.setdefault("density", 1.0)
    default_w = global_params.pop("weight", None)
    inputs = tuple(
        _mk_input(str(m["model"]), p.get("weight"), default_w, i, ignored)
        for i, (m, p) in enumerate(zip(entries, per_model))
    )
    if method == "slerp":
        inputs = tuple(MergeInput(i.source, 1.0) for i in inputs)
    if method in ("multislerp", "nuslerp"):  # mergekit requires a weight for every model but the base
        unweighted = [str(m["model"]) for m, p in zip(entries, per_model) if p.get("weight") is None]
        if unweighted and default_w is None:
            raise InputError(
                f"mergekit config: {method} needs a weight for every model; {unweighted[0]!r} has none",
                hint="give each model parameters.weight (or one top-level parameters.weight)",
            )
        if baseless:
            global_params["origin"] = "zero"
    if "mode" in _param_fields(method):  # mergekit's YAML means mergekit's rules
        global_params["mode"] = "mergekit"
    return MergeConfig(
        str(base),
        method,
        inputs,
        global_params,
        check_dtype(d.get("out_dtype") or d.get("dtype"), "out_dtype"),
        0,
        None,
        256,
        "mergekit",
        source_file,
        check_dtype(d.get("dtype"), "dtype") or "stored",  # mergekit computes in its inputs' (promoted) dtype
        tuple(ignored),
        layout,
        tokenizer,
    )


def _tokenizer_spec(d: dict, models: list, layout: tuple | None) -> Any:
    """mergekit's tokenizer keys (merge/vocab.py); the models whose rows are re-indexed in mergekit's order: those
    listed, then base_model where it is not."""
    if not MERGEKIT_TOKENIZER_KEYS & set(d):
        return None
    from skillgraft.merge.vocab import parse_tokenizer

    if layout is not None and (d.get("tokenizer_source") is not None or d.get("tokenizer") is not None):
        raise InputError(
            "mergekit config: 'tokenizer_source' / 'tokenizer' with 'slices' is not supported yet",
            hint="merge with 'models' to build a tokenizer, or drop the tokenizer keys",
        )
    names = list(dict.fromkeys(str(m["model"]) for m in models))
    base = d.get("base_model")
    if base is not None and str(base) not in names:
        names.append(str(base))
    if not names:
        raise InputError("mergekit config: a tokenizer needs at least one model")
    return parse_tokenizer(d, names, str(base) if base is not None else None)


def _from_slices(slices: Any, method: str) -> tuple[list[dict], tuple]:
    """mergekit ``slices`` as the models they merge (each with its parameters) and the layout. A merge's slices
    must all merge the same models (each over its own layer range); passthrough's take one source each."""
    from skillgraft.merge.layout import OutputSlice, SliceSource, check_layout

    if not isinstance(slices, list) or not slices:
        raise InputError("mergekit config: 'slices' must be a non-empty list of {sources: [...]}")
    out: list = []
    params_of: dict[str, dict] = {}
    for k, s in enumerate(slices):
        if not isinstance(s, dict) or not isinstance(s.get("sources"), list) or not s["sources"]:
            raise InputError(f"mergekit config: slices[{k}] must be a mapping with a non-empty 'sources' list")
        _unknown(set(s), {"sources"}, f"slices[{k}]", "mergekit")
        sources = []
        for j, src in enumerate(s["sources"]):
            where = f"slices[{k}].sources[{j}]"
            if not isinstance(src, dict) or "model" not in src or "layer_range" not in src:
                raise InputError(f"mergekit config: {where} needs 'model' and 'layer_range'")
            _unknown(set(src), {"model", "layer_range", "parameters"}, where, "mergekit")
            lr = src["layer_range"]
            if not (isinstance(lr, list) and len(lr) == 2 and all(type(x) is int for x in lr)):
                raise InputError(f"mergekit config: {where}.layer_range must be two integers [first, end)")
            model, p = str(src["model"]), src.get("parameters") or {}
            if params_of.setdefault(model, p) != p:
                raise InputError(
                    f"mergekit config: {where}: {model}'s parameters differ from another slice's",
                    hint="skillgraft takes one set of parameters per model across slices",
                )
            sources.append(SliceSource(model, lr[0], lr[1]))
        out.append(OutputSlice(tuple(sources)))
    layout = tuple(out)
    check_layout(layout)
    first = [x.model for x in layout[0].sources]
    for k, s in enumerate(layout):
        if method == "passthrough" and len(s.sources) != 1:
            raise InputError(f"mergekit config: slices[{k}]: passthrough takes exactly one source per slice")
        if method != "passthrough" and [x.model for x in s.sources] != first:
            raise InputError(
                f"mergekit config: slices[{k}] merges other models than slices[0]",
                hint="every slice of a merge must list the same models in the same order (or use passthrough)",
            )
    return [{"model": m, "parameters": p} for m, p in params_of.items()], layout


def _passthrough(d: dict, models: list, layout: tuple | None, ignored: tuple, source_file: str | None) -> MergeConfig:
    """passthrough copies tensors: one model as it is, or the blocks that ``slices`` name (a frankenmerge)."""
    if layout is None and len(models) != 1:
        raise InputError(
            f"mergekit config: passthrough copies one model, the config lists {len(models)}",
            hint="list exactly one model, or stack layers with 'slices'",
        )
    for i, m in enumerate(models):
        _unknown(set(m), MERGEKIT_MODEL_KEYS, f"models[{i}]", "mergekit")
        if m.get("parameters"):
            raise InputError(
                f"mergekit config: passthrough parameters ({', '.join(map(repr, m['parameters']))}) are not "
                "supported yet",
                hint="remove them (passthrough's 'scale' is not implemented in skillgraft)",
            )
    if d.get("parameters"):
        raise InputError("mergekit config: passthrough takes no parameters here", hint="remove 'parameters'")
    return MergeConfig(
        str(d.get("base_model") or models[0]["model"]),  # whose config.json the output takes (mergekit's)
        "passthrough",
        (),
        {},
        check_dtype(d.get("out_dtype") or d.get("dtype"), "out_dtype"),
        dialect="mergekit",
        source_file=source_file,
        compute_dtype=check_dtype(d.get("dtype"), "dtype") or "stored",
        ignored=ignored,
        layout=layout,
    )


def _param_fields(method: str) -> set[str]:
    import dataclasses

    from skillgraft.merge.registry import get_method

    return {f.name for f in dataclasses.fields(get_method(method).params)}


def read_yaml(path: str | Path, what: str) -> Any:
    """A YAML file's content; a missing file or invalid YAML is a one-line error naming the file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"{path}: no such {what}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise FormatError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from e


def load_config(path: str | Path) -> MergeConfig:
    """Read a YAML merge config (either dialect); relative paths resolve against the file's directory."""
    path = Path(path)
    return from_dict(read_yaml(path, "merge config"), str(path)).resolve_paths(path.parent)
