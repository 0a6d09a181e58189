"""Layer swapping: each transformer block comes whole from one chosen input; no arithmetic between inputs.

Ranges of block indices name the input that supplies them; everything else comes from ``default``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from skillgraft.errors import InputError
from skillgraft.merge.registry import PlanFacts, TensorJob, merge_method


@dataclass(frozen=True)
class LayerSwapParams:
    ranges: tuple[Any, ...] = ()
    default: int = 0

    def __post_init__(self) -> None:
        if not _is_index(self.default):
            raise InputError(f"layer_swap: default must be an input index (integer ≥ 0), not {self.default!r}")
        if not isinstance(self.ranges, (list, tuple)):
            raise InputError("layer_swap: ranges must be a list of {layers: [start, end], input: i}")
        parsed = tuple(_parse_range(r) for r in self.ranges)
        spans = sorted(parsed)
        for (s0, e0, _), (s1, e1, _) in zip(spans, spans[1:]):
            if s1 < e0:
                raise InputError(f"layer_swap: layer ranges [{s0}, {e0}) and [{s1}, {e1}) overlap")
        object.__setattr__(self, "ranges", parsed)

    def check_plan(self, facts: PlanFacts) -> None:
        """Every index names an input and every range lies within the model's blocks."""
        n_inputs, num_layers = facts.n_inputs, facts.num_layers
        hint = f"inputs are numbered from 0 to {n_inputs - 1}, in config order"
        if self.default >= n_inputs:
            raise InputError(f"layer_swap: default is input {self.default}, but there are {n_inputs} inputs", hint=hint)
        for start, end, idx in self.ranges:
            if idx >= n_inputs:
                raise InputError(
                    f"layer_swap: range [{start}, {end}) takes input {idx}, but there are {n_inputs} inputs", hint=hint
                )
            if num_layers is None:
                raise InputError(
                    "layer_swap: the base's block count is unknown (no num_hidden_layers / n_layer in config.json, "
                    "no numbered blocks in its tensor names)",
                    hint="layer ranges need a model with numbered transformer blocks",
                )
            if end > num_layers:
                raise InputError(
                    f"layer_swap: layer range [{start}, {end}) goes past the model's {num_layers} layers",
                    hint=f"ranges are [start, end) with end ≤ {num_layers} (blocks 0 to {num_layers - 1})",
                )

    def supplier(self, layer: int | None) -> int:
        """The input that supplies a tensor of block ``layer``."""
        return source_input(layer, self.ranges, self.default)


def _is_index(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _parse_range(r: Any) -> tuple[int, int, int]:
    """``{"layers": [start, end], "input": i}`` (or an already parsed ``(start, end, i)``) → ``(start, end, i)``."""
    if isinstance(r, tuple) and len(r) == 3:
        start, end, idx = r
    elif isinstance(r, Mapping) and set(r) == {"layers", "input"}:
        layers, idx = r["layers"], r["input"]
        if not isinstance(layers, (list, tuple)) or len(layers) != 2:
            raise InputError(f"layer_swap: layers must be [start, end], not {layers!r}")
        start, end = layers
    else:
        raise InputError(f"layer_swap: each range must be {{layers: [start, end], input: i}}, not {r!r}")
    if not (_is_index(start) and _is_index(end) and _is_index(idx)) or end <= start:
        raise InputError(f"layer_swap: bad range {r!r} (need 0 ≤ start < end and an input index ≥ 0)")
    return int(start), int(end), int(idx)


def source_input(layer: int | None, ranges: tuple[tuple[int, int, int], ...], default: int) -> int:
    """Which input supplies a tensor of block ``layer`` (None → not in a block → ``default``)."""
    if layer is not None:
        for start, end, idx in ranges:
            if start <= layer < end:
                return idx
    return default


@merge_method("layer_swap", LayerSwapParams)
def layer_swap(job: TensorJob, p: LayerSwapParams) -> torch.Tensor:
    """Layer swapping: Δ = Δ_s with s = the input whose range holds ``job.layer``, else ``default``.

    ``ranges`` is a list of ``{layers: [start, end], input: i}``; ``[start, end)`` is half-open (end excluded, as
    mergekit's ``layer_range``), 0-based block indices, no overlaps. Tensors outside any range or outside the block
    stack (embeddings, final norm, lm_head: ``job.layer`` is None) take input ``default`` (0). User weights are
    ignored: the chosen Δ is copied unchanged, and only that input is read for the tensor. Edge cases: one input
    with default 0 → Δ₁; all-zero deltas → 0. Refused before any tensor is read: an input index ≥ the number of
    inputs, and a range ending past the model's block count (config.json's ``num_hidden_layers`` / ``n_layer``, else
    the highest block index in the tensor names + 1). Order matters (indices name inputs). Compute dtype fp32.
    Reference: Bandarkar et al. 2024, "Layer Swapping for Zero-Shot Cross-Lingual Transfer" (arXiv:2410.01335).
    """
    idx = p.supplier(job.layer)
    if idx >= job.n:  # plan_merge refuses this; kept for direct callers
        raise InputError(f"layer_swap: input index {idx} but only {job.n} inputs")
    return job.deltas[idx].clone()
