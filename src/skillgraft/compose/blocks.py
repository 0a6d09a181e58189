"""Blocks: the groups of tensors that share one learned coefficient per skill, and the merge YAML that applies them.

A block is one module group of one transformer layer (``model.layers.3.self_attn``, ``model.layers.3.mlp``, …)
at ``block`` granularity, a whole layer at ``layer`` granularity, or everything at ``skill`` granularity.
Tensors outside the layers (embeddings, final norm) form the block ``rest``, which is the input's plain weight.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

GRANULARITIES = ("block", "layer", "skill")
REST = "rest"
_LAYER = re.compile(r"^(.*?\.(?:layers|h|blocks|layer|block)\.\d+)\.([^.]+)")


def block_of(name: str, granularity: str) -> str:
    """The block a tensor belongs to: ``model.layers.3.mlp`` (block), ``model.layers.3`` (layer) or ``rest``."""
    if granularity == "skill":
        return REST
    m = _LAYER.match(name)
    if m is None:
        return REST
    return f"{m.group(1)}.{m.group(2)}" if granularity == "block" else m.group(1)


def _layer_key(block: str) -> tuple[int, str]:
    m = re.search(r"\.(\d+)(?:\.|$)", block)
    return (int(m.group(1)) if m else -1, block)


@dataclass(frozen=True)
class Blocks:
    """The blocks of a set of tensor names, in model order (``rest`` first), and each name's block index."""

    names: tuple[str, ...]
    index: dict[str, int]  # tensor name -> block index

    @classmethod
    def of(cls, tensor_names: Iterable[str], granularity: str) -> Blocks:
        by_name = {t: block_of(t, granularity) for t in tensor_names}
        order = sorted(set(by_name.values()) | {REST}, key=lambda b: (-1, "") if b == REST else _layer_key(b))
        pos = {b: i for i, b in enumerate(order)}
        return cls(tuple(order), {t: pos[b] for t, b in by_name.items()})

    def __len__(self) -> int:
        return len(self.names)


def merge_config(
    base: str, sources: Sequence[str], coefficients: Sequence[Sequence[float]], blocks: Blocks, seed: int = 0
) -> dict[str, Any]:
    """A plain ``task_arithmetic`` merge config (θ₀ + Σₖ λₖ,b·Δₖ) applying ``coefficients[k][b]``: each input's
    ``weight`` is its ``rest`` coefficient and ``blocks`` maps ``<block>.*`` globs to the others."""
    inputs = []
    for source, row in zip(sources, coefficients):
        entry: dict[str, Any] = {"source": source, "weight": float(row[0])}
        per_block = {f"{b}.*": float(v) for b, v in zip(blocks.names[1:], row[1:])}
        if per_block:
            entry["blocks"] = per_block
        inputs.append(entry)
    return {"base": base, "method": "task_arithmetic", "inputs": inputs, "seed": seed}
