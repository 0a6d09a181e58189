"""The plan of a Mixtral checkpoint built from a Llama/Mistral base and dense fine-tunes of it: every output
tensor, where it comes from, and every check that needs the files — all before any weight is read.

Attention, norms, embeddings and the head come from the base; layer i's expert e is expert e's MLP of layer i; the
routers come from the gate mode (``gates.py``). ``assemble.py`` writes the plan.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from skillgraft.errors import InputError, MismatchError, UnsupportedError
from skillgraft.io import Checkpoint
from skillgraft.io.checkpoint import TOKENIZER_FILES
from skillgraft.io.writer import DEFAULT_SHARD_BYTES, check_output
from skillgraft.merge.moe.config import PROMPT_MODES, MoeConfig
from skillgraft.merge.moe.gates import gate_dtype

INPUT_TYPES = ("llama", "mistral")
LAYOUTS = ("fused", "per_expert")
PROJ = ("gate_proj", "down_proj", "up_proj")  # mergekit's order: also the order noise is drawn in
LEGACY = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
# the base tensors a Mixtral model has a place for (its MLPs become experts)
KEEP = re.compile(
    r"model\.embed_tokens\.weight|model\.norm\.weight|lm_head\.weight"
    r"|model\.layers\.\d+\.(input_layernorm|post_attention_layernorm)\.weight"
    r"|model\.layers\.\d+\.self_attn\.[qkvo]_proj\.weight"
)
MLP = re.compile(r"model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight")
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class MoeOptions:
    out: Path
    overwrite: bool = False
    seed: int = 0  # random gate modes and noise_scale
    layout: str = "fused"  # transformers ≥ 5 (what mergekit-moe 0.1.5 writes), or per_expert (w1/w2/w3)
    allow_identical_experts: bool = False
    max_shard_bytes: int = DEFAULT_SHARD_BYTES
    dry_run: bool = False


@dataclass(frozen=True)
class OutTensor:
    """One output tensor: ``kind`` is base (a copy of ``source``), gate, gate_up / down (one layer's experts
    stacked) or expert (one expert's ``proj``)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    kind: str
    layer: int = -1
    source: str = ""
    expert: int = -1
    proj: str = ""


@dataclass
class MoePlan:
    config: MoeConfig
    opts: MoeOptions
    base: Checkpoint
    experts: list[Checkpoint]  # one per config expert (the same object where a model is listed twice)
    layers: int
    hidden: int
    intermediate: int
    tensors: list[OutTensor]
    out_config: dict
    warnings: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {
            "architecture": "MixtralForCausalLM",
            "layout": self.opts.layout,
            "experts": [e.source for e in self.config.experts],
            "experts_per_token": self.config.experts_per_token,
            "gate_mode": self.config.gate_mode,
            "layers": self.layers,
            "tensors": [
                {
                    "tensor": t.name,
                    "shape": list(t.shape),
                    "dtype": str(t.dtype).removeprefix("torch."),
                    "from": _from(t),
                }
                for t in self.tensors
            ],
            "expected_output_bytes": sum(nbytes(t.dtype, t.shape) for t in self.tensors),
            "warnings": list(self.warnings),
        }

    def close(self) -> None:
        for c in {id(c): c for c in [self.base, *self.experts]}.values():
            c.close()


def nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    n = dtype.itemsize
    for s in shape:
        n *= s
    return n


def _from(t: OutTensor) -> str:
    if t.kind == "base":
        return "base_model"
    if t.kind == "gate":
        return "gate"
    if t.kind == "expert":
        return f"experts[{t.expert}] {t.proj}"
    return "every expert's " + ("gate_proj + up_proj" if t.kind == "gate_up" else "down_proj")


def _out_dtype(config: MoeConfig, base: Checkpoint) -> torch.dtype | None:
    """The config's dtype, else the base config's (as mergekit picks it), else None (each tensor's own)."""
    name = config.dtype or base.config.get("dtype") or base.config.get("torch_dtype")
    return TORCH_DTYPES.get(str(name).removeprefix("torch.")) if name else None


def _check_models(config: MoeConfig, base: Checkpoint, experts: list[Checkpoint], opts: MoeOptions) -> None:
    types = [base.config.get("model_type"), *(e.config.get("model_type") for e in experts)]
    if types[0] not in INPUT_TYPES:
        raise UnsupportedError(
            f"base_model is a {types[0] or 'model without a model_type'}: a Mixtral MoE takes Llama or Mistral models",
            hint="mergekit-moe's Qwen / DeepSeek outputs (for qwen2, qwen3, shared experts) are not supported",
        )
    for i, t in enumerate(types[1:]):
        if t != types[0]:
            raise MismatchError(
                f"experts[{i}] is a {t} model and base_model a {types[0]} one: every model must share one architecture",
                hint="use fine-tunes of base_model as experts",
            )
    sources = [str(Path(e.source).resolve()) for e in config.experts]
    if len(sources) > 1 and len(set(sources)) == 1 and not opts.allow_identical_experts:
        raise InputError(
            "experts: every expert is the same model, so the MoE would compute what that model computes, slower",
            hint="list different fine-tunes, or pass --allow-identical-experts if you will train the MoE further",
        )
    if config.gate_mode in PROMPT_MODES and not any((base.path / f).exists() for f in TOKENIZER_FILES):
        raise InputError(
            f"gate_mode {config.gate_mode} needs the base's tokenizer, and {base.path} has no tokenizer files",
            hint="copy the tokenizer files into base_model, or use gate_mode random",
        )
    if config.gate_mode == "cheap_embed" and "model.embed_tokens.weight" not in base:
        raise MismatchError(f"{base.path}: no model.embed_tokens.weight for gate_mode cheap_embed")


def _base_layout(base: Checkpoint) -> tuple[int, list[str]]:
    """The number of layers and the base tensors to copy; anything a Mixtral model has no place for is refused."""
    layers = base.config.get("num_hidden_layers")
    found = {int(m.group(1)) for n in base.names() if (m := MLP.fullmatch(n))}
    if not isinstance(layers, int) or layers < 1:
        layers = max(found, default=-1) + 1
    if layers < 1:
        raise MismatchError(f"{base.path}: no MLP tensors (model.layers.N.mlp.*_proj.weight) found")
    keep = []
    for n in base.names():
        if MLP.fullmatch(n):
            continue
        if not KEEP.fullmatch(n):
            raise UnsupportedError(
                f"{base.path}: tensor {n!r} has no place in a Mixtral model (biases, extra modules)",
                hint="only bias-free Llama/Mistral models can become Mixtral MoEs",
            )
        keep.append(n)
    return layers, keep


def _check_experts(config: MoeConfig, base: Checkpoint, experts: list[Checkpoint], layers: int) -> None:
    """Every expert has every layer's gate/up/down projection in the base's shape (no weight is read)."""
    for layer in range(layers):
        for proj in PROJ:
            name = f"model.layers.{layer}.mlp.{proj}.weight"
            if name not in base:
                raise MismatchError(f"{base.path}: base_model has no {name}")
            for i, (e, ckpt) in enumerate(zip(config.experts, experts)):
                if name not in ckpt:
                    raise MismatchError(
                        f"experts[{i}] ({e.source}): no tensor {name}", hint="is it a fine-tune of base_model?"
                    )
                if ckpt.shape(name) != base.shape(name):
                    raise MismatchError(
                        f"experts[{i}] ({e.source}): {name} is {list(ckpt.shape(name))}, the base's is "
                        f"{list(base.shape(name))}",
                        hint="experts must be fine-tunes of base_model (same sizes)",
                    )


def _mixtral_config(base: Checkpoint, config: MoeConfig, dtype: torch.dtype | None) -> dict:
    """The base's config.json as a Mixtral one (the keys mergekit-moe's MixtralConfig adds, with its values)."""
    out = {k: v for k, v in base.config.items() if k not in ("auto_map", "_name_or_path")}
    out.update(
        architectures=["MixtralForCausalLM"],
        model_type="mixtral",
        num_local_experts=len(config.experts),
        num_experts_per_tok=config.experts_per_token,
        sliding_window=None,
        output_router_logits=False,
        router_aux_loss_coef=0.001,
        router_jitter_noise=0.0,
    )
    if dtype is not None:
        out["dtype"] = str(dtype).removeprefix("torch.")
        if "torch_dtype" in out:  # transformers < 5 reads this one
            out["torch_dtype"] = out["dtype"]
    return out


def _layer_tensors(
    base: Checkpoint,
    experts: list[Checkpoint],
    dtype: torch.dtype | None,
    gate_dt: torch.dtype,
    layout: str,
    layer: int,
) -> list[OutTensor]:
    """Layer ``layer``'s router and experts in ``layout``; ``dtype`` None keeps the inputs' (promoted) dtypes."""
    e_count = len(experts)
    (inter, hidden) = base.shape(f"model.layers.{layer}.mlp.gate_proj.weight")

    def dt(proj: str) -> torch.dtype:
        if dtype is not None:
            return dtype
        found = [c.dtype(f"model.layers.{layer}.mlp.{proj}.weight") for c in experts]
        out = found[0]
        for d in found[1:]:
            out = torch.promote_types(out, d)
        return out

    prefix = f"model.layers.{layer}"
    if layout == "fused":
        gate = OutTensor(f"{prefix}.mlp.gate.weight", dtype or gate_dt, (e_count, hidden), "gate", layer)
        up_dt = torch.promote_types(dt("gate_proj"), dt("up_proj"))
        return [
            gate,
            OutTensor(f"{prefix}.mlp.experts.gate_up_proj", up_dt, (e_count, 2 * inter, hidden), "gate_up", layer),
            OutTensor(f"{prefix}.mlp.experts.down_proj", dt("down_proj"), (e_count, hidden, inter), "down", layer),
        ]
    moe = f"{prefix}.block_sparse_moe"
    out = [OutTensor(f"{moe}.gate.weight", dtype or gate_dt, (e_count, hidden), "gate", layer)]
    for e, ckpt in enumerate(experts):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            name = f"{prefix}.mlp.{proj}.weight"
            out.append(
                OutTensor(
                    f"{moe}.experts.{e}.{LEGACY[proj]}.weight",
                    dtype or ckpt.dtype(name),
                    tuple(ckpt.shape(name)),
                    "expert",
                    layer,
                    expert=e,
                    proj=proj,
                )
            )
    return out


def plan_moe(config: MoeConfig, opts: MoeOptions) -> MoePlan:
    """Open every model and check everything (architectures, names, shapes, tokenizer, output path) without
    reading a weight; the returned plan lists every output tensor. Close it (``plan.close()``) when done."""
    if opts.layout not in LAYOUTS:
        raise InputError(f"layout: {opts.layout!r} is not one of {', '.join(LAYOUTS)}")
    if not opts.dry_run:
        check_output(Path(opts.out), opts.overwrite)
    opened: dict[str, Checkpoint] = {}

    def open_model(path: str) -> Checkpoint:
        key = str(Path(path).resolve())
        if key not in opened:
            opened[key] = Checkpoint(path)
        return opened[key]

    try:
        base = open_model(config.base)
        experts = [open_model(e.source) for e in config.experts]
        _check_models(config, base, experts, opts)
        layers, keep = _base_layout(base)
        _check_experts(config, base, experts, layers)
    except BaseException:
        for c in opened.values():
            c.close()
        raise
    dtype = _out_dtype(config, base)
    gate_dt = gate_dtype(config.gate_mode)
    per_layer = {layer: _layer_tensors(base, experts, dtype, gate_dt, opts.layout, layer) for layer in range(layers)}
    tensors: list[OutTensor] = []
    placed: set[int] = set()
    for n in base.names():  # the base's order, each layer's MoE block where its MLP was
        m = MLP.fullmatch(n)
        if m is None and n in keep:
            tensors.append(OutTensor(n, dtype or base.dtype(n), tuple(base.shape(n)), "base", source=n))
        elif m is not None and int(m.group(1)) not in placed:
            placed.add(int(m.group(1)))
            tensors.extend(per_layer[int(m.group(1))])
    inter, hidden = base.shape("model.layers.0.mlp.gate_proj.weight")
    warnings = []
    if len(config.experts) & (len(config.experts) - 1):
        warnings.append(f"{len(config.experts)} experts is not a power of two: llama.cpp cannot run this model")
    return MoePlan(
        config, opts, base, experts, layers, hidden, inter, tensors, _mixtral_config(base, config, dtype), warnings
    )
