"""Layer layouts: mergekit's ``slices`` (frankenmerges, per-range merges) as renamed views of the input checkpoints.

A layout lists output slices; each takes the same number of consecutive blocks from each of its sources. The
output's blocks are numbered in order, so a slice's block ``start + k`` of a source becomes output block
``offset + k``. The engine needs no change: the base and every input become :class:`RenamedCheckpoint` views
whose tensor names are the output's, mapped lazily onto the source files (nothing is copied).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from skillgraft.errors import InputError, MismatchError, NotFoundError
from skillgraft.io.checkpoint import Checkpoint

BLOCK_RE = re.compile(r"\.(layers|h|blocks|layer|block)\.(\d+)\.")


@dataclass(frozen=True)
class SliceSource:
    model: str
    start: int
    end: int  # exclusive, as mergekit's ``layer_range``


@dataclass(frozen=True)
class OutputSlice:
    sources: tuple[SliceSource, ...]

    @property
    def length(self) -> int:
        return self.sources[0].end - self.sources[0].start


def check_layout(slices: tuple[OutputSlice, ...]) -> None:
    """Ranges well formed, and every source of a slice the same length (as mergekit requires)."""
    if not slices:
        raise InputError("mergekit config: 'slices' is empty", hint="give at least one slice with sources")
    for k, s in enumerate(slices):
        for src in s.sources:
            if src.start < 0 or src.end <= src.start:
                raise InputError(
                    f"slices[{k}]: layer_range [{src.start}, {src.end}] of {src.model} is empty or negative",
                    hint="layer_range is [first, end) with end > first ≥ 0",
                )
        if len({src.end - src.start for src in s.sources}) != 1:
            raise InputError(
                f"slices[{k}]: its sources take different numbers of layers",
                hint="every source of a slice must cover the same number of layers (mergekit's rule)",
            )


def block_position(layer: int, slices: tuple[OutputSlice, ...]) -> float:
    """Where output block ``layer`` sits for gradients: k / (n − 1) within its slice of n blocks (1 for a
    one-block slice) — mergekit resolves gradients per slice, not over the whole output."""
    offset = 0
    for s in slices:
        if layer < offset + s.length:
            return (layer - offset) / (s.length - 1) if s.length > 1 else 1.0
        offset += s.length
    raise IndexError(layer)


class RenamedCheckpoint:
    """A read-only checkpoint whose tensors are other checkpoints' tensors under new names (the output's)."""

    def __init__(self, path: Path, config: dict, mapping: dict[str, tuple[Checkpoint, str]], updates: dict) -> None:
        self.path = path
        self.config = config
        self.config_updates = updates  # what the output's config.json changes (num_hidden_layers)
        self._map = mapping

    @property
    def tied_embeddings(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", self.config.get("model_type") == "gpt2"))

    def names(self) -> list[str]:
        return list(self._map)

    def __contains__(self, name: str) -> bool:
        return name in self._map

    def __len__(self) -> int:
        return len(self._map)

    def _at(self, name: str) -> tuple[Checkpoint, str]:
        try:
            return self._map[name]
        except KeyError:
            raise NotFoundError(f"{self.path}: no tensor named {name!r} in this layout") from None

    def shape(self, name: str) -> tuple[int, ...]:
        ckpt, src = self._at(name)
        return ckpt.shape(src)

    def dtype(self, name: str) -> torch.dtype:
        ckpt, src = self._at(name)
        return ckpt.dtype(src)

    def nbytes(self, name: str) -> int:
        ckpt, src = self._at(name)
        return ckpt.nbytes(src)

    def get(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        ckpt, src = self._at(name)
        return ckpt.get(src, out)

    def map(self, name: str) -> torch.Tensor:
        ckpt, src = self._at(name)
        return ckpt.map(src)

    def chunks(self, name: str) -> Any:
        ckpt, src = self._at(name)
        return ckpt.chunks(src)

    def total_bytes(self) -> int:
        return sum(self.nbytes(n) for n in self._map)

    def aux_files(self) -> Any:
        return Checkpoint.aux_files(self)  # type: ignore[arg-type]

    def close(self) -> None:
        pass  # the checkpoints belong to the :class:`Layout` that made this view


class Layout:
    """The opened source checkpoints of a layout and the views over them; close it once, at the end."""

    def __init__(self, slices: tuple[OutputSlice, ...], open_ckpt: Any) -> None:
        check_layout(slices)
        self.slices = slices
        self._open = open_ckpt
        self._ckpts: dict[str, Checkpoint] = {}
        self._split: dict[str, tuple[list[str], list[str]]] = {}  # model -> its tensors before / after the blocks
        try:
            for s in slices:
                for src in s.sources:
                    if src.model not in self._ckpts:
                        self._ckpts[src.model] = open_ckpt(src.model)
            for k, s in enumerate(slices):
                for src in s.sources:
                    have = self.blocks(src.model)
                    if src.end > have:
                        raise MismatchError(
                            f"slices[{k}]: layer_range [{src.start}, {src.end}] of {src.model} is past its "
                            f"{have} layers",
                            hint=f"use a range within [0, {have}]",
                        )
        except BaseException:
            self.close()
            raise
        self.num_layers = sum(s.length for s in slices)

    def blocks(self, model: str) -> int:
        ckpt = self._ckpts[model]
        layers = [int(m.group(2)) for n in ckpt.names() if (m := BLOCK_RE.search(n))]
        return max(layers) + 1 if layers else 0

    def view(self, column: int | str, config_from: str) -> RenamedCheckpoint:
        """The output's tensors, each from one source per slice: source number ``column`` of every slice, or —
        a model name — the source of every slice that is that model (the base of a per-slice merge). Tensors
        outside the blocks (embeddings, final norm, head) come from the first slice's source (those before the
        blocks in the model) and the last slice's (those after), as mergekit takes them."""
        mapping: dict[str, tuple[Checkpoint, str]] = {}
        picks = [self._pick(s, column, k) for k, s in enumerate(self.slices)]
        first, last = self._ckpts[picks[0].model], self._ckpts[picks[-1].model]
        before, _ = self._outside(picks[0].model)
        for name in before:
            mapping[name] = (first, name)
        offset = 0
        for s, src in zip(self.slices, picks):
            ckpt = self._ckpts[src.model]
            for name in ckpt.names():
                m = BLOCK_RE.search(name)
                if m and src.start <= int(m.group(2)) < src.end:
                    layer = offset + int(m.group(2)) - src.start
                    out = f"{name[: m.start()]}.{m.group(1)}.{layer}.{name[m.end() :]}"
                    mapping[out] = (ckpt, name)
            offset += s.length
        for name in self._outside(picks[-1].model)[1]:
            mapping[name] = (last, name)
        if config_from not in self._ckpts:  # a base_model no slice takes blocks from: its config.json only
            self._ckpts[config_from] = self._open(config_from)
        base = self._ckpts[config_from]
        key = "num_hidden_layers" if "num_hidden_layers" in base.config else "n_layer"
        updates = {key: self.num_layers}
        return RenamedCheckpoint(base.path, {**base.config, **updates}, mapping, updates)

    def _outside(self, model: str) -> tuple[list[str], list[str]]:
        """``_outside_blocks`` once per model (it builds the model's module tree on the meta device)."""
        if model not in self._split:
            self._split[model] = _outside_blocks(self._ckpts[model])
        return self._split[model]

    def _pick(self, s: OutputSlice, column: int | str, k: int) -> SliceSource:
        if isinstance(column, str):
            found = [src for src in s.sources if src.model == column]
            if not found:
                raise InputError(
                    f"slices[{k}]: base_model {column} is not among the slice's sources",
                    hint="list base_model with a layer_range in every slice (mergekit merges a slice's sources only)",
                )
            return found[0]
        return s.sources[column]

    def close(self) -> None:
        for c in self._ckpts.values():
            c.close()
        self._ckpts.clear()


def _outside_blocks(ckpt: Checkpoint) -> tuple[list[str], list[str]]:
    """The checkpoint's tensors outside the blocks, split into those the model runs before its blocks
    (embeddings) and after (final norm, head): the order of transformers' own module tree, built on the meta
    device from config.json."""
    outside = [n for n in ckpt.names() if not BLOCK_RE.search(n)]
    order = _module_order(ckpt.config)
    if order is None:  # an architecture transformers cannot build: embeddings first, the rest after
        before = [n for n in outside if "embed" in n or n.split(".")[-2:-1] in (["wte"], ["wpe"])]
    else:
        first_block = min((i for i, n in enumerate(order) if BLOCK_RE.search(n)), default=len(order))
        rank = {n: i for i, n in enumerate(order)}
        before = [n for n in outside if rank.get(n, len(order)) < first_block]
    return before, [n for n in outside if n not in before]


def _module_order(config: dict) -> list[str] | None:
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        kwargs = {k: v for k, v in config.items() if k != "model_type"}
        cfg = AutoConfig.for_model(config["model_type"], **kwargs)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
        return [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    except Exception:  # noqa: BLE001 — any failure means "unknown order", handled by the caller
        return None
