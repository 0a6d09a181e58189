"""The search genome of ``skillgraft evolve``: a real vector decoded deterministically into a plain merge recipe.

A recipe is the dict form of a skillgraft merge YAML (``base``, ``method``, ``parameters``, ``seed``, ``inputs``
with ``weight`` and per-layer ``blocks``), so every candidate is exactly what ``skillgraft merge`` would run.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from skillgraft.compose.evolve_spec import EvolveSpec

DECIMALS = 4  # weights and densities are rounded before scoring, so the written YAML is what was scored
LAYER_RE = re.compile(r"\.(?:layers|h|blocks|layer|block)\.(\d+)\.")  # the merge engine's layer pattern


def fold(g: float) -> float:
    """Map any real onto [0, 1] by reflection at 0 and 1 (a triangle wave of period 2): the identity on [0, 1],
    continuous everywhere, with no flat region outside the box (unlike clipping), so CMA-ES never stalls at a
    bound and needs no bound handling of its own."""
    t = math.fmod(abs(g), 2.0)
    return t if t <= 1.0 else 2.0 - t


def layer_globs(names: Sequence[str], num_layers: int) -> list[tuple[str, ...]]:
    """Per transformer block ``i < num_layers``: the globs over tensor names that select it (``*.layers.i.*``),
    built from the names themselves so GPT-2 style ``h.i`` works too."""
    globs: list[set[str]] = [set() for _ in range(num_layers)]
    for name in names:
        m = LAYER_RE.search(name)
        if m and int(m.group(1)) < num_layers:
            globs[int(m.group(1))].add(f"*{m.group(0)}*")
    return [tuple(sorted(g)) for g in globs]


@dataclass(frozen=True)
class GenomeLayout:
    """Where each gene sits and how it decodes. Gene order:

    1. ``methods`` (one gene per method, only when there are two or more): the candidate's method is the argmax
       of these raw genes, ties to the earliest listed method. CMA-ES has no categorical variables; this is the
       usual relaxation: a one-hot-by-argmax encoding. It is honest about being one: the search sees a
       piecewise-constant fitness in these genes, the covariance it learns across them means little, and a
       method is only explored while its gene is sampled highest. With few methods and a moderate sigma every
       method is drawn in the first generations; a method that loses early may never be tried again.
    2. weights: for each input, one gene per layer group (input-major). Group 0's weight is the input's
       ``weight`` (which also covers tensors outside any block: embeddings, final norm, head); groups 1… become
       ``blocks`` entries ``*.layers.i.*`` for every layer i of the group. Mapped by :func:`fold` into ``weight``.
    3. density: one gene for the whole candidate when any method takes a ``density`` (the merge engine takes
       one density per merge, not per tensor), mapped into ``density``; unused by methods without one.
    4. select: with ``select_inputs``, one gene per input: the input is kept when its folded gene ≥ 0.5; when
       none is, the one with the largest folded gene is kept (a merge needs an input).

    Decoded numbers are rounded to ``DECIMALS`` places before the merge, so a recipe written out is exactly
    the one that was scored.
    """

    spec: EvolveSpec
    groups: tuple[tuple[str, ...], ...]  # per layer group: the globs of its layers (group 0's are implicit)
    density_methods: tuple[str, ...]  # methods among spec.methods whose parameters include ``density``

    @property
    def n_methods(self) -> int:
        return len(self.spec.methods) if len(self.spec.methods) > 1 else 0

    @property
    def n_weights(self) -> int:
        return len(self.spec.inputs) * len(self.groups)

    @property
    def has_density(self) -> bool:
        return bool(self.density_methods)

    @property
    def size(self) -> int:
        n_select = len(self.spec.inputs) if self.spec.select_inputs else 0
        return self.n_methods + self.n_weights + int(self.has_density) + n_select

    def gene_names(self) -> list[str]:
        """Human-readable names of the genes, in order (stored in evolve.json)."""
        names = [f"method={m}" for m in self.spec.methods] if self.n_methods else []
        names += [
            f"weight[input {i}, group {k}]" for i in range(len(self.spec.inputs)) for k in range(len(self.groups))
        ]
        names += ["density"] if self.has_density else []
        names += [f"select[input {i}]" for i in range(len(self.spec.inputs))] if self.spec.select_inputs else []
        return names

    def initial(self) -> list[float]:
        """The CMA-ES start: every gene at 0.5, the middle of its box (equal method genes: the first method)."""
        return [0.5] * self.size

    def decode(self, x: Sequence[float]) -> dict[str, Any]:
        """The merge recipe (merge-YAML dict) that gene vector ``x`` stands for."""
        spec, pos = self.spec, 0
        if len(x) != self.size:
            raise ValueError(f"genome has {len(x)} genes, the layout {self.size}")
        method = spec.methods[0]
        if self.n_methods:
            genes = list(x[: self.n_methods])
            method = spec.methods[genes.index(max(genes))]
            pos = self.n_methods
        lo, hi = spec.weight
        weights = [round(lo + (hi - lo) * fold(g), DECIMALS) for g in x[pos : pos + self.n_weights]]
        pos += self.n_weights
        params: dict[str, Any] = {}
        if self.has_density:
            dlo, dhi = spec.density
            if method in self.density_methods:
                params["density"] = min(1.0, max(dlo, round(dlo + (dhi - dlo) * fold(x[pos]), DECIMALS)))
            pos += 1
        keep = list(range(len(spec.inputs)))
        if spec.select_inputs:
            sel = [fold(g) for g in x[pos : pos + len(spec.inputs)]]
            keep = [i for i, s in enumerate(sel) if s >= 0.5] or [sel.index(max(sel))]
        g = len(self.groups)
        inputs = []
        for i in keep:
            w = weights[i * g : (i + 1) * g]
            entry: dict[str, Any] = {"source": spec.inputs[i], "weight": w[0]}
            blocks = {glob: w[k] for k in range(1, g) for glob in self.groups[k]}
            if blocks:
                entry["blocks"] = blocks
            inputs.append(entry)
        return {"base": spec.base, "method": method, "parameters": params, "seed": spec.seed, "inputs": inputs}


def make_layout(
    spec: EvolveSpec, per_layer_globs: list[tuple[str, ...]], density_methods: tuple[str, ...]
) -> GenomeLayout:
    """Split the layers into ``spec.layer_groups`` contiguous groups (sizes differ by at most one: layer i goes
    to group ⌊i·G/L⌋) and collect each group's globs."""
    n, g = len(per_layer_globs), spec.layer_groups
    if n == 0:  # no transformer blocks found: one group, the inputs' plain weights (check_spec refuses g > 1)
        return GenomeLayout(spec, ((),), density_methods)
    groups: list[list[str]] = [[] for _ in range(g)]
    for i, globs in enumerate(per_layer_globs):
        groups[i * g // n].extend(globs)
    return GenomeLayout(spec, tuple(tuple(x) for x in groups), density_methods)
