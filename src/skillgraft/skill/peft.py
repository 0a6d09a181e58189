"""PEFT LoRA adapters ↔ skill packs: exact import of an adapter's factors, export of a pack as an adapter.

Works on the files (``adapter_config.json`` + ``adapter_model.safetensors``); peft is not needed at run time.
Variants whose merge is not ``W + B·A·scale`` (DoRA, LoRA bias, aLoRA, …) are refused by name.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from skillgraft.errors import (
    FormatError,
    InputError,
    MismatchError,
    NotFoundError,
    UnsafeFormatError,
    UnsupportedError,
)
from skillgraft.io.checkpoint import Checkpoint
from skillgraft.io.safetensors_file import MappedFile, SafetensorsWriter
from skillgraft.io.writer import _replace, check_output
from skillgraft.skill.encoding import dtype_name, encode_lowrank, rel_error
from skillgraft.skill.fingerprint import fingerprint_checkpoint, fingerprint_tokenizer
from skillgraft.skill.modules import module_kind
from skillgraft.skill.pack import BaseIdentity, Manifest, PackWriter, SkillPack, validate_name
from skillgraft.skill.provenance import provenance
from skillgraft.skill.svd import balanced_factors, top_singular

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFE = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
DEFAULT_EXPORT_RANK = 16
MERGE_HINT = "merge it with peft's merge_and_unload(), save the model, and use `skillgraft extract` instead"
# (config field, feature name); a truthy value means the adapter is not plain W + B·A·scale.
REFUSED_FIELDS = (
    ("use_dora", "DoRA (use_dora)"),
    ("lora_bias", "LoRA bias (lora_bias)"),
    ("modules_to_save", "modules_to_save (fully trained extra modules)"),
    ("trainable_token_indices", "trainable tokens (trainable_token_indices)"),
    ("use_qalora", "QA-LoRA (use_qalora)"),
    ("alora_invocation_tokens", "activated LoRA (alora_invocation_tokens)"),
    ("velora_config", "VeLoRA (velora_config)"),
    ("monteclora_config", "MonteCLoRA (monteclora_config)"),
    ("use_bdlora", "block-diagonal LoRA (use_bdlora)"),
    ("arrow_config", "Arrow routing (arrow_config)"),
    ("kasa_config", "KaSA (kasa_config)"),
    ("layer_replication", "layer replication (layer_replication)"),
    ("target_parameters", "LoRA on raw parameters (target_parameters)"),
    ("megatron_config", "Megatron-parallel LoRA (megatron_config)"),
)
# Initialisations that rewrite the base weight: the saved factors are relative to a residual base.
BASE_REWRITING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")
# Tensor-name fragments of non-LoRA content, named in the refusal.
FOREIGN_KEYS = (
    ("lora_magnitude_vector", "DoRA (lora_magnitude_vector)"),
    (".lora_B.bias", "LoRA bias (lora_B.bias)"),
    ("hada_", "LoHa"),
    ("lokr_", "LoKr"),
    ("modules_to_save", "modules_to_save"),
    ("trainable_tokens", "trainable tokens"),
    ("lora_diag", "KaSA (lora_diag)"),
)
FACTOR_SUFFIXES = {
    ".lora_A.weight": ("linear", "a"),
    ".lora_B.weight": ("linear", "b"),
    ".lora_embedding_A": ("embedding", "a"),
    ".lora_embedding_B": ("embedding", "b"),
}
BASE_COPY_SUFFIX = ".base_layer.weight"  # peft's save_embedding_layers: a full copy of the (maybe resized) base weight
OUTPUT_HEAD = re.compile(r"(^|\.)(lm_head|embed_out|output)$")


def pattern_key(pattern_keys, name: str) -> str:
    """peft's ``get_pattern_key``: the first key that, as a regex, matches a dotted suffix of ``name``."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return name


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: ``a`` [r, in] and ``b`` [out, r] (embeddings: [r, num_embeddings], [dim, r])."""

    name: str
    layer: str  # "linear" or "embedding"
    a: torch.Tensor
    b: torch.Tensor
    scale: float
    fan_in_fan_out: bool

    @property
    def transposed(self) -> bool:
        """True when ΔW in the parameter's layout is (B·A)ᵀ·scale (Conv1D weights and embeddings)."""
        return self.layer == "embedding" or self.fan_in_fan_out

    @property
    def param_shape(self) -> tuple[int, int]:
        out, inp = self.b.shape[0], self.a.shape[1]
        return (inp, out) if self.transposed else (out, inp)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(up, down) in the parameter's layout with ΔW = up @ down; the scale is folded into ``up``."""
        up, down = (self.a.T, self.b.T) if self.transposed else (self.b, self.a)
        scaled = up.float() * self.scale
        if self.scale == 1.0 or torch.equal(scaled.to(up.dtype).float(), scaled):
            return scaled.to(up.dtype), down  # exact in the adapter's own dtype
        return scaled, down.float()  # keep exactness: fp32 holds the adapter's values and the scaled ones


@dataclass(frozen=True)
class LoraAdapter:
    """A PEFT LoRA adapter read from disk (config as written, modules in file order)."""

    path: Path
    config: dict
    modules: dict[str, LoraModule]
    base_copies: dict[str, torch.Tensor]  # param name -> full weight copy peft stored beside the factors


def _read_config(adapter_dir: Path) -> dict:
    if not adapter_dir.is_dir():
        raise NotFoundError(f"{adapter_dir}: no such adapter directory")
    cfg_path = adapter_dir / ADAPTER_CONFIG
    if not cfg_path.exists():
        raise NotFoundError(f"{cfg_path}: missing", hint="give a PEFT adapter directory (adapter_config.json)")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise FormatError(f"{cfg_path}: not valid JSON ({e.msg} at line {e.lineno})") from e
    if not isinstance(config, dict):
        raise FormatError(f"{cfg_path}: not a JSON object")
    return config


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _rank(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


_CONFIG_TYPES = {
    "r": ("an integer >= 1", _rank),
    "lora_alpha": ("a finite number", _number),
    "use_rslora": ("true or false", lambda v: isinstance(v, bool)),
    "fan_in_fan_out": ("true or false", lambda v: isinstance(v, bool)),
    "peft_type": ("a string", lambda v: isinstance(v, str)),
    "rank_pattern": (
        "an object of module → integer >= 1",
        lambda v: isinstance(v, dict) and all(map(_rank, v.values())),
    ),
    "alpha_pattern": ("an object of module → number", lambda v: isinstance(v, dict) and all(map(_number, v.values()))),
}


def check_config_types(config: dict) -> None:
    """The fields the merge reads must have their JSON types (``"lora_alpha": "16"`` would scale by a string)."""
    for key, (kind, ok) in _CONFIG_TYPES.items():
        value = config.get(key)
        if value is not None and not ok(value):
            raise FormatError(
                f"{ADAPTER_CONFIG}: {key} must be {kind}, not {type(value).__name__} {value!r:.40}",
                hint=f"fix {key} in {ADAPTER_CONFIG} (peft writes it as a JSON number/boolean)",
            )


def check_config(config: dict) -> None:
    """Refuse, by name, every adapter type or LoRA variant whose merge is not W + B·A·scale."""
    check_config_types(config)
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise UnsupportedError(f"adapter type {peft_type!r} is not supported (only peft_type LORA)", MERGE_HINT)
    if config.get("bias", "none") != "none":
        raise UnsupportedError(f"LoRA bias (bias={config['bias']!r}) is not supported", MERGE_HINT)
    for field, feature in REFUSED_FIELDS:
        if config.get(field):
            raise UnsupportedError(f"{feature} is not supported: merging it is not W + B·A·scale", MERGE_HINT)
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
        raise UnsupportedError(
            f"init_lora_weights={init!r} rewrites the base weights: adapter is relative to a residual base",
            hint="save it with peft's path_initial_model_for_weight_conversion, then import that adapter",
        )


def _read_tensors(adapter_dir: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    safe, pickled = adapter_dir / ADAPTER_SAFE, adapter_dir / ADAPTER_PICKLE
    if safe.exists():
        f = MappedFile(safe)
        try:
            return {n: f.get(n) for n in f.tensors}
        finally:
            f.close()
    if pickled.exists():
        if not allow_pickle:
            raise UnsafeFormatError(
                f"{pickled}: only a pickle adapter is present; pickle files can run code",
                hint="convert it to safetensors, or pass --allow-pickle if you trust its source",
            )
        try:
            return dict(torch.load(pickled, map_location="cpu", weights_only=True))
        except Exception as e:  # torch raises several types for corrupt or unsafe pickles
            raise FormatError(f"{pickled}: cannot load with weights_only=True ({e})") from e
    raise NotFoundError(f"{adapter_dir}: no adapter weights ({ADAPTER_SAFE} or {ADAPTER_PICKLE})")


def _split_key(key: str) -> tuple[str, str, str] | None:
    """(module, layer, factor) of a LoRA factor key, or None for a full base-weight copy."""
    for fragment, feature in FOREIGN_KEYS:
        if fragment in key:
            raise UnsupportedError(f"{feature} is not supported (adapter tensor {key!r})", MERGE_HINT)
    if not key.startswith(KEY_PREFIX):
        raise FormatError(f"adapter tensor {key!r} does not start with {KEY_PREFIX!r}")
    body = key[len(KEY_PREFIX) :]
    if body.endswith(BASE_COPY_SUFFIX):
        return None
    for suffix, (layer, factor) in FACTOR_SUFFIXES.items():
        if body.endswith(suffix):
            return body[: -len(suffix)], layer, factor
    raise UnsupportedError(f"adapter tensor {key!r} is not a LoRA factor", MERGE_HINT)


def _module_scale(config: dict, module: str, rank: int) -> float:
    """peft's per-module scaling: rank/alpha from rank_pattern/alpha_pattern, then alpha/r or alpha/√r."""
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    r = ranks.get(pattern_key(ranks, module), config.get("r", 8))
    alpha = alphas.get(pattern_key(alphas, module), config.get("lora_alpha", 8))
    if r != rank:
        raise FormatError(f"adapter module {module!r} has rank {rank} but its config says r={r}")
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def read_adapter(adapter_dir: str | Path, allow_pickle: bool = False) -> LoraAdapter:
    """Read and validate a PEFT LoRA adapter directory."""
    adapter_dir = Path(adapter_dir)
    config = _read_config(adapter_dir)
    check_config(config)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    layers: dict[str, str] = {}
    copies: dict[str, torch.Tensor] = {}
    for key, t in _read_tensors(adapter_dir, allow_pickle).items():
        split = _split_key(key)
        if split is None:
            copies[key[len(KEY_PREFIX) : -len(BASE_COPY_SUFFIX)] + ".weight"] = t
            continue
        module, layer, factor = split
        parts.setdefault(module, {})[factor] = t
        layers[module] = layer
    modules = {}
    fifo = bool(config.get("fan_in_fan_out"))
    for module, ab in parts.items():
        if set(ab) != {"a", "b"}:
            raise FormatError(f"adapter module {module!r} lacks its lora_{'B' if 'a' in ab else 'A'} factor")
        a, b = ab["a"], ab["b"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise UnsupportedError(
                f"adapter module {module!r}: factors {list(a.shape)}, {list(b.shape)} are no 2-D LoRA pair "
                "(convolution LoRA is not supported)"
            )
        scale = _module_scale(config, module, a.shape[0])
        modules[module] = LoraModule(module, layers[module], a, b, scale, fifo and layers[module] == "linear")
    if not modules:
        raise FormatError(f"{adapter_dir}: adapter holds no LoRA factors")
    return LoraAdapter(adapter_dir, config, modules, copies)


def _base_identity(
    adapter: LoraAdapter, base: Path | None, allow_pickle: bool, force: bool = False
) -> tuple[BaseIdentity, dict]:
    """Check the adapter against the base (names, shapes, stored weight copies); identity and dtypes."""
    if base is None:
        if adapter.base_copies:
            name = next(iter(adapter.base_copies))
            raise UnsupportedError(
                f"adapter stores a full copy of {name!r} (peft save_embedding_layers) that cannot be checked",
                hint="pass --base so the copy can be compared with the base model",
            )
        label = adapter.config.get("base_model_name_or_path") or "unknown"
        return BaseIdentity(name=str(label), fingerprint=None, structure=None), {}
    with Checkpoint(base, allow_pickle) as ckpt:
        dtypes = {}
        for m in adapter.modules.values():
            param = f"{m.name}.weight"
            if param not in ckpt:
                raise MismatchError(f"base {ckpt.path} has no tensor {param!r} that the adapter modifies")
            if tuple(ckpt.shape(param)) != m.param_shape:
                raise MismatchError(
                    f"tensor {param!r} has shape {list(ckpt.shape(param))} in the base but the adapter's "
                    f"ΔW is {list(m.param_shape)}"
                )
            dtypes[param] = dtype_name(ckpt.dtype(param))
        for param, copy in adapter.base_copies.items():
            if param not in ckpt or not torch.equal(copy.to(ckpt.dtype(param)), ckpt.get(param)):
                raise UnsupportedError(
                    f"adapter's stored copy of {param!r} differs from the base (resized or trained weight)",
                    MERGE_HINT,
                )
        fp = fingerprint_checkpoint(ckpt)
        name = str(ckpt.config.get("_name_or_path") or adapter.config.get("base_model_name_or_path") or base.resolve())
        tok, own = fingerprint_tokenizer(ckpt.path), fingerprint_tokenizer(adapter.path)
        if tok and own and tok != own and not force:
            raise MismatchError(
                f"the adapter's tokenizer files (fingerprint {own}) differ from the base's ({tok}): the adapter "
                "may have been trained with another vocabulary or added tokens",
                hint="import against the base it was trained on, or pass --force if both encode the same vocabulary",
            )
        return BaseIdentity(name, fp.content, fp.structure, tok), dtypes


def _source(config: dict) -> dict:
    keys = (
        "peft_type",
        "task_type",
        "r",
        "lora_alpha",
        "use_rslora",
        "fan_in_fan_out",
        "target_modules",
        "rank_pattern",
        "alpha_pattern",
        "base_model_name_or_path",
        "peft_version",
    )
    return {"kind": "peft_lora", **{k: config.get(k) for k in keys}}


def import_lora(
    adapter_dir: str | Path,
    out_path: str | Path,
    *,
    name: str | None = None,
    base: str | Path | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    description: str = "",
    tags: tuple[str, ...] = (),
    command: str = "",
    force: bool = False,
) -> Manifest:
    """Write a skill pack holding the adapter's factors exactly (a lowrank entry per module, scale folded in).

    Applying the pack reproduces peft's ``merge_and_unload``. With ``base`` every module is checked against
    the base model and its fingerprint is recorded; without it the base is named from the adapter config.
    """
    out = Path(out_path)
    check_output(out, overwrite)
    skill_name = validate_name(name or out.name.removesuffix(".skill"))
    adapter = read_adapter(adapter_dir, allow_pickle)
    identity, dtypes = _base_identity(adapter, Path(base) if base is not None else None, allow_pickle, force)
    writer = PackWriter(out, overwrite)
    try:
        for m in adapter.modules.values():
            up, down = m.factors()
            param, shape = f"{m.name}.weight", list(m.param_shape)
            parts, fields = encode_lowrank(up, down, dtype=up.dtype)
            fields.update(
                shape=shape,
                dtype=dtypes.get(param, dtype_name(m.a.dtype)),
                rel_error=0.0,
                kind=module_kind(param, tuple(shape)),
                module_type=m.layer,
                lora_scale=m.scale,
            )
            if m.fan_in_fan_out:
                fields["layout"] = "fan_in_fan_out"
            writer.add(param, parts, fields)
        manifest = Manifest(
            name=skill_name,
            version=1,
            base=identity,
            tensors={},
            description=description,
            tags=tuple(tags),
            provenance=provenance(command, sources=[str(adapter_dir)] + ([str(base)] if base else [])),
            source=_source(adapter.config),
        )
        writer.close(manifest)
    except BaseException:
        writer.abort()
        raise
    return manifest.replace(tensors=writer.entries)


# -- export -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportedModule:
    """One module of an exported adapter: its rank and the relative error of B·A against the pack's delta."""

    module: str
    layer: str
    rank: int
    rel_error: float
    encoding: str  # the pack entry's encoding it came from


@dataclass(frozen=True)
class ExportReport:
    """What ``export_lora`` wrote: per-module ranks and errors, and the tensors it left out."""

    out_dir: Path
    modules: tuple[ExportedModule, ...]
    dropped: tuple[str, ...]
    fan_in_fan_out: bool

    @property
    def max_rel_error(self) -> float:
        return max((m.rel_error for m in self.modules), default=0.0)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out_dir"], d["max_rel_error"] = str(self.out_dir), self.max_rel_error
        return d


def _is_embedding(module: str, entry: dict) -> bool:
    if "module_type" in entry:
        return entry["module_type"] == "embedding"
    kind = entry.get("kind") or module_kind(module + ".weight", tuple(entry["shape"]))
    return kind == "embedding" and not OUTPUT_HEAD.search(module)


def _plan_export(manifest: Manifest, drop: bool) -> tuple[dict[str, str], tuple[str, ...], bool]:
    """({param: layer}, dropped params, fan_in_fan_out) or an UnsupportedError naming the problem."""
    targets: dict[str, str] = {}
    dropped = []
    for param, entry in manifest.tensors.items():
        if not param.endswith(".weight") or len(entry["shape"]) != 2:
            if not drop:
                raise UnsupportedError(
                    f"tensor {param!r} (shape {entry['shape']}): only 2-D .weight matrices can be a LoRA",
                    hint="pass --drop-unrepresentable to leave it out of the adapter (it is reported)",
                )
            dropped.append(param)
            continue
        targets[param] = "embedding" if _is_embedding(param.removesuffix(".weight"), entry) else "linear"
    layouts = {manifest.tensors[p].get("layout") == "fan_in_fan_out" for p, k in targets.items() if k == "linear"}
    if len(layouts) > 1:
        raise UnsupportedError(
            "pack mixes fan_in_fan_out (Conv1D) and Linear weight layouts; a PEFT adapter has one such flag",
            hint="export the two groups of tensors as separate skills",
        )
    if not targets:
        raise UnsupportedError("pack has no 2-D weight matrix that a LoRA adapter could represent")
    return targets, tuple(dropped), layouts == {True}


def _stored_factors(pack: SkillPack, param: str, entry: dict) -> tuple[torch.Tensor, torch.Tensor]:
    up, down = pack.part(param, "up"), pack.part(param, "down")
    if entry.get("quant") == "int8":
        up = up.float() * pack.part(param, "up_scale")[:, None]
        down = down.float() * pack.part(param, "down_scale")[:, None]
    return up, down


def _truncate(up: torch.Tensor, down: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-k factors of up @ down via QR of each factor and an SVD of the small core (no m×n matrix)."""
    qu, ru = torch.linalg.qr(up.float())  # [m, r], [r, r]
    qd, rd = torch.linalg.qr(down.float().T)  # [n, r], [r, r]
    u, s, vh = torch.linalg.svd(ru @ rd.T)
    total = s.square().sum().item()
    err = math.sqrt(s[k:].square().sum().item() / total) if total > 0 else 0.0
    new_up, new_down = balanced_factors(qu @ u, s, vh @ qd.T, k)
    return new_up, new_down, err


def _factors_for(pack: SkillPack, param: str, rank: int | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(up, down, rel_error) in the parameter's layout for one pack entry."""
    entry = pack.manifest.tensors[param]
    if entry["encoding"] == "lowrank":
        up, down = _stored_factors(pack, param, entry)
        if rank is None or up.shape[1] <= rank:
            return up, down, 0.0
        return _truncate(up, down, rank)
    delta = pack.delta(param)
    k = min(rank or DEFAULT_EXPORT_RANK, *delta.shape)
    u, s, vh = top_singular(delta, k, seed=0)
    up, down = balanced_factors(u, s, vh, k)
    return up, down, rel_error(delta, up @ down)


def _pattern_keys(ranks: dict[str, int], default: int) -> dict[str, int]:
    """rank_pattern for modules whose rank is not ``default``; regex-escaped keys if plain names collide."""
    pattern = {m: r for m, r in sorted(ranks.items(), key=lambda kv: -len(kv[0])) if r != default}
    if all(pattern.get(pattern_key(pattern, m), default) == r for m, r in ranks.items()):
        return pattern
    return {re.escape(m): r for m, r in pattern.items()}


def _adapter_config(manifest: Manifest, ranks: dict[str, int], fifo: bool) -> dict:
    r = max(Counter(ranks.values()).most_common(), key=lambda rc: (rc[1], rc[0]))[0]
    pattern = _pattern_keys(ranks, r)
    return {
        "peft_type": "LORA",
        "task_type": manifest.source.get("task_type"),
        "base_model_name_or_path": manifest.base.name,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks),
        "fan_in_fan_out": fifo,
        "bias": "none",
        "lora_dropout": 0.0,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }


def _write_factors(pack: SkillPack, targets: dict[str, str], rank: int | None, fifo: bool, writer) -> list:
    rows = []
    for param, layer in targets.items():
        module = param.removesuffix(".weight")
        up, down, err = _factors_for(pack, param, rank)
        # ΔW = B·A (Linear) or (B·A)ᵀ (Conv1D with fan_in_fan_out, embeddings) in the parameter's layout
        a, b = (up.T, down.T) if (fifo or layer == "embedding") else (down, up)
        names = ("lora_embedding_A", "lora_embedding_B") if layer == "embedding" else ("lora_A.weight", "lora_B.weight")
        writer.add(f"{KEY_PREFIX}{module}.{names[0]}", a.contiguous())
        writer.add(f"{KEY_PREFIX}{module}.{names[1]}", b.contiguous())
        rows.append(ExportedModule(module, layer, a.shape[0], err, pack.manifest.tensors[param]["encoding"]))
    return rows


def export_lora(
    pack_path: str | Path,
    out_dir: str | Path,
    *,
    rank: int | None = None,
    drop_unrepresentable: bool = False,
    overwrite: bool = False,
) -> ExportReport:
    """Write a PEFT LoRA adapter directory equivalent to the pack (scale 1: ``lora_alpha = r`` per module).

    Low-rank entries keep their factors (SVD-truncated when ``rank`` is smaller); dense and sparse entries are
    factorised by truncated SVD in fp32 to ``rank`` (default 16), with each tensor's relative error reported.
    """
    out = Path(out_dir)
    check_output(out, overwrite)
    if rank is not None and rank < 1:
        raise InputError(f"rank must be at least 1 (got {rank})")
    with SkillPack(pack_path) as pack:
        targets, dropped, fifo = _plan_export(pack.manifest, drop_unrepresentable)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
        writer = SafetensorsWriter(tmp / ADAPTER_SAFE)
        try:
            rows = _write_factors(pack, targets, rank, fifo, writer)
            writer.close({"format": "pt"})
            config = _adapter_config(pack.manifest, {m.module: m.rank for m in rows}, fifo)
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            _replace(tmp, out)
        except BaseException:
            writer.abort()
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return ExportReport(out, tuple(rows), dropped, fifo)
