"""mergekit-moe configs parsed into a frozen ``MoeConfig``: every key, gate mode and value checked up front.

Only shapes and types are checked here; :func:`skillgraft.merge.moe.assemble.plan_moe` checks what needs the
files (architectures, tensor names and shapes, the tokenizer) before any weight is read.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skillgraft.errors import InputError, UnsupportedError
from skillgraft.merge.config import DTYPE_ALIASES, DTYPES, read_yaml

KEYS = {"base_model", "experts", "gate_mode", "dtype", "experts_per_token", "shared_experts", "architecture"}
EXPERT_KEYS = {"source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale"}
# mergekit's gate modes; "hidden" and "hidden_last" take the last prompt token's hidden state, "hidden_avg" the
# mean over the (padded) sequence
GATE_MODES = ("hidden", "hidden_last", "hidden_avg", "cheap_embed", "random", "uniform_random")
PROMPT_MODES = {"hidden", "hidden_last", "hidden_avg", "cheap_embed"}
# mergekit-moe's output architectures (matched, as mergekit matches them, by a prefix of the lower-cased name)
ARCHITECTURES = ("Mixtral", "DeepSeek MoE", "Qwen MoE", "Qwen3 MoE")
SUPPORTED_ARCHITECTURE = "Mixtral"


@dataclass(frozen=True)
class MoeExpert:
    """One dense fine-tune whose MLPs become expert ``i`` of every layer."""

    source: str  # a Hugging Face model directory
    positive_prompts: tuple[str, ...] = ()
    negative_prompts: tuple[str, ...] = ()
    noise_scale: float | None = None  # Gaussian noise of this std added to the expert's MLP weights
    residual_scale: float | None = None  # the expert's down_proj multiplied by this


@dataclass(frozen=True)
class MoeConfig:
    """A complete mixture-of-experts request (paths as given; nothing is opened here)."""

    base: str
    experts: tuple[MoeExpert, ...]
    gate_mode: str = "hidden"  # mergekit's default
    dtype: str | None = None  # None: the base config's dtype, else each tensor's own
    experts_per_token: int = 2
    source_file: str | None = None

    def resolve_paths(self, root: Path) -> MoeConfig:
        """Relative paths in a config file are relative to that file's directory."""

        def fix(p: str) -> str:
            q = Path(p)
            return str(root / q) if not q.is_absolute() and (root / q).exists() else p

        experts = tuple(dataclasses.replace(e, source=fix(e.source)) for e in self.experts)
        return dataclasses.replace(self, base=fix(self.base), experts=experts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "base_model": self.base,
            "gate_mode": self.gate_mode,
            "dtype": self.dtype,
            "experts_per_token": self.experts_per_token,
            "experts": [dataclasses.asdict(e) for e in self.experts],
        }


def _unknown(keys: set, allowed: set[str], where: str) -> None:
    extra = sorted(map(str, keys - allowed))
    if extra:
        close = difflib.get_close_matches(extra[0], allowed, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise InputError(
            f"{where}: unknown key(s) {', '.join(map(repr, extra))} in a mergekit-moe config",
            hint=f"{hint}supported: {', '.join(sorted(allowed))}",
        )


def _model(value: Any, where: str) -> str:
    if isinstance(value, dict):
        raise UnsupportedError(
            f"{where}: a model given as a mapping (revision, LoRA, override) is not supported",
            hint="give the model as a path to a Hugging Face model directory",
        )
    if not isinstance(value, str) or not value:
        raise InputError(f"{where}: expected a model directory path, not {value!r}")
    if "+" in value and not Path(value).exists():
        raise UnsupportedError(
            f"{where}: {value!r} looks like mergekit's 'model+lora' reference, which is not supported",
            hint="merge the LoRA into its model first (skillgraft apply / merge), then list that directory",
        )
    return value


def _prompts(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise InputError(f"{where}: expected a list of strings, not {value!r}", hint='e.g. ["Solve 2 + 3", "x = ?"]')
    return tuple(value)


def _number(value: Any, where: str, minimum: float | None = None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{where}: must be a finite number, not {value!r}")
    if minimum is not None and value < minimum:
        raise InputError(f"{where}: must be ≥ {minimum}, not {value!r}")
    return float(value)


def _expert(item: Any, where: str) -> MoeExpert:
    if not isinstance(item, dict) or "source_model" not in item:
        raise InputError(f"{where}: expected a mapping with 'source_model'", hint="e.g. {source_model: ./math-ft}")
    _unknown(set(item), EXPERT_KEYS, where)
    return MoeExpert(
        _model(item["source_model"], f"{where}.source_model"),
        _prompts(item.get("positive_prompts"), f"{where}.positive_prompts"),
        _prompts(item.get("negative_prompts"), f"{where}.negative_prompts"),
        _number(item.get("noise_scale"), f"{where}.noise_scale", 0.0),
        _number(item.get("residual_scale"), f"{where}.residual_scale"),
    )


def _dtype(value: Any) -> str | None:
    if value is None:
        return None
    v = str(value).removeprefix("torch.")
    v = DTYPE_ALIASES.get(v, v)
    if v not in DTYPES:
        raise InputError(f"dtype: {value!r} is not supported", hint=f"use one of {', '.join(DTYPES)}")
    return v


def _architecture(value: Any) -> None:
    """mergekit picks the output architecture whose lower-cased name starts with ``architecture``."""
    if value is None:
        return
    if not isinstance(value, str) or not value:
        raise InputError(f"architecture: expected a name, not {value!r}", hint=f"one of {', '.join(ARCHITECTURES)}")
    matches = [a for a in ARCHITECTURES if a.lower().startswith(value.lower())]
    if not matches:
        raise InputError(
            f"architecture: no mergekit-moe output architecture is called {value!r}",
            hint=f"mergekit's are {', '.join(ARCHITECTURES)}; skillgraft writes {SUPPORTED_ARCHITECTURE}",
        )
    if SUPPORTED_ARCHITECTURE not in matches:
        raise UnsupportedError(
            f"architecture: {matches[0]!r} output is not supported (skillgraft writes {SUPPORTED_ARCHITECTURE} only)",
            hint=f"drop 'architecture' or set it to {SUPPORTED_ARCHITECTURE.lower()}, or use mergekit-moe",
        )


def _check_prompts(experts: tuple[MoeExpert, ...], mode: str) -> None:
    """Prompt-routed gates need positive prompts per expert, and prompts that tell the experts apart."""
    if mode not in PROMPT_MODES:
        return
    for i, e in enumerate(experts):
        if not e.positive_prompts:
            raise InputError(
                f"experts[{i}]: gate_mode {mode} needs positive_prompts (what should be routed to this expert)",
                hint="add a few example prompts per expert, or use gate_mode random",
            )
    if len(experts) > 1 and len({(e.positive_prompts, e.negative_prompts) for e in experts}) == 1:
        raise InputError(
            "experts: every expert has the same prompts, so every gate would be the same",
            hint="give each expert prompts that show what should be routed to it",
        )


def parse_moe_config(d: Any, source_file: str | None = None) -> MoeConfig:
    """Parse and validate a mergekit-moe config mapping; any problem is a one-line error naming it."""
    if not isinstance(d, dict):
        raise InputError("a mergekit-moe config must be a YAML mapping")
    if "merge_method" in d:
        raise InputError(
            "this is a mergekit merge config (it has merge_method), not a mergekit-moe one",
            hint="run it with skillgraft merge",
        )
    _unknown(set(d), KEYS, "config")
    for key in ("base_model", "experts"):
        if key not in d:
            raise InputError(f"config: missing required key {key!r}", hint="see docs/merging.md (mixture of experts)")
    if d.get("shared_experts"):
        raise UnsupportedError(
            "shared_experts: shared experts need a Qwen MoE or DeepSeek MoE output, which skillgraft does not write",
            hint="drop shared_experts (a Mixtral output), or build this model with mergekit-moe",
        )
    _architecture(d.get("architecture"))
    if not isinstance(d["experts"], list) or not d["experts"]:
        raise InputError("experts: must be a non-empty list of {source_model, positive_prompts, ...}")
    experts = tuple(_expert(item, f"experts[{i}]") for i, item in enumerate(d["experts"]))
    mode = d.get("gate_mode", "hidden")
    if mode not in GATE_MODES:
        close = difflib.get_close_matches(str(mode), GATE_MODES, n=1)
        raise InputError(
            f"gate_mode: {mode!r} is not a mergekit-moe gate mode",
            hint=(f"did you mean {close[0]!r}? " if close else "") + f"use one of {', '.join(GATE_MODES)}",
        )
    k = d.get("experts_per_token", 2)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InputError(f"experts_per_token: must be a positive integer, not {k!r}")
    if k > len(experts):
        raise InputError(
            f"experts_per_token: {k} is more than the {len(experts)} expert(s) listed",
            hint="list more experts or lower experts_per_token",
        )
    _check_prompts(experts, mode)
    return MoeConfig(_model(d["base_model"], "base_model"), experts, mode, _dtype(d.get("dtype")), k, source_file)


def load_moe_config(config: str | Path | dict | MoeConfig) -> MoeConfig:
    """A YAML path (relative paths resolve against its directory), a mapping, or a parsed config."""
    if isinstance(config, MoeConfig):
        return config
    if isinstance(config, dict):
        return parse_moe_config(config)
    path = Path(config)
    return parse_moe_config(read_yaml(path, "mergekit-moe config"), str(path)).resolve_paths(path.parent)
