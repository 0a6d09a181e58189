"""Write a planned Mixtral checkpoint tensor by tensor: the gates first, then each tensor read, stacked and cast
as the plan says, into a temporary directory renamed into place when complete (``io.CheckpointWriter``).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from skillgraft.io import CheckpointWriter
from skillgraft.io.checkpoint import TOKENIZER_FILES
from skillgraft.merge.moe.gates import degenerate_layers, gate_weights
from skillgraft.merge.moe.plan import PROJ, MoePlan, OutTensor, nbytes
from skillgraft.progress import ProgressFn, no_progress


@dataclass(frozen=True)
class MoeResult:
    out: Path
    layout: str
    experts: int
    experts_per_token: int
    layers: int
    gate_mode: str
    tensors: int
    bytes: int
    seconds: float
    warnings: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["out"], d["warnings"] = str(self.out), list(self.warnings)
        return d


class _ExpertReader:
    """Expert MLP tensors, noised and scaled as the config says. With noise, a layer's tensors are all read when
    the layer is first asked for, in mergekit's order (expert, then gate/down/up), so the draws from the run's
    generator are mergekit-moe's, and kept until the next layer; without noise each is read when asked for."""

    def __init__(self, plan: MoePlan, generator: torch.Generator) -> None:
        self.plan = plan
        self.generator = generator
        self.ordered = any(e.noise_scale is not None for e in plan.config.experts)
        self.layer = -1
        self.cache: dict[tuple[int, str], torch.Tensor] = {}

    def _read(self, layer: int, expert: int, proj: str) -> torch.Tensor:
        spec = self.plan.config.experts[expert]
        t = self.plan.experts[expert].get(f"model.layers.{layer}.mlp.{proj}.weight")
        if spec.noise_scale is not None:
            t = t + torch.randn(t.shape, dtype=t.dtype, generator=self.generator) * spec.noise_scale
        if proj == "down_proj" and spec.residual_scale is not None:
            t = t * spec.residual_scale
        return t

    def get(self, layer: int, expert: int, proj: str) -> torch.Tensor:
        if not self.ordered:
            return self._read(layer, expert, proj)
        if layer != self.layer:
            self.cache = {}
            for e in range(len(self.plan.experts)):
                for p in PROJ:
                    self.cache[(e, p)] = self._read(layer, e, p)
            self.layer = layer
        return self.cache[(expert, proj)]


def _make(t: OutTensor, plan: MoePlan, gates: torch.Tensor, experts: _ExpertReader) -> torch.Tensor:
    if t.kind == "base":
        return plan.base.get(t.source).to(t.dtype)
    if t.kind == "gate":
        return gates[t.layer].to(t.dtype).contiguous()
    if t.kind == "expert":
        return experts.get(t.layer, t.expert, t.proj).to(t.dtype)
    out = torch.empty(t.shape, dtype=t.dtype)
    for e in range(len(plan.experts)):
        if t.kind == "gate_up":  # (E, 2I, H): expert e's gate_proj rows, then its up_proj rows
            out[e, : plan.intermediate].copy_(experts.get(t.layer, e, "gate_proj"))
            out[e, plan.intermediate :].copy_(experts.get(t.layer, e, "up_proj"))
        else:  # (E, H, I)
            out[e].copy_(experts.get(t.layer, e, "down_proj"))
    return out


def _write_aux(plan: MoePlan, tmp: Path) -> None:
    """config.json (Mixtral), and the base's generation config and tokenizer files as they are."""
    (tmp / "config.json").write_text(json.dumps(plan.out_config, indent=2, sort_keys=True) + "\n")
    for f in ("generation_config.json", *TOKENIZER_FILES):
        if (plan.base.path / f).exists():
            shutil.copy2(plan.base.path / f, tmp / f)


def run_moe(plan: MoePlan, progress: ProgressFn = no_progress) -> MoeResult:
    """Compute the gates, then stream every output tensor into the checkpoint at ``plan.opts.out``."""
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(plan.opts.seed)  # gates first, then noise: mergekit's order
    gates = gate_weights(plan.config, plan.base, plan.layers, generator, progress)
    warnings = list(plan.warnings)
    if bad := degenerate_layers(gates):
        warnings.append(
            f"layer(s) {', '.join(map(str, bad))} have nearly identical gates (condition number > 5): "
            "some experts will rarely be picked; make the experts' prompts more distinct"
        )
    opts = plan.opts
    layout = [(t.name, t.dtype, t.shape) for t in plan.tensors]
    total = sum(nbytes(t.dtype, t.shape) for t in plan.tensors)
    reader = _ExpertReader(plan, generator)
    done = 0
    with CheckpointWriter(opts.out, opts.overwrite, opts.max_shard_bytes, plan=layout) as writer:
        for t in plan.tensors:
            writer.add(t.name, _make(t, plan, gates, reader))
            done += nbytes(t.dtype, t.shape)
            progress("assemble [bytes]", done, total)
        _write_aux(plan, writer.tmp)
    return MoeResult(
        Path(opts.out),
        opts.layout,
        len(plan.experts),
        plan.config.experts_per_token,
        plan.layers,
        plan.config.gate_mode,
        len(plan.tensors),
        writer.total_bytes,
        time.perf_counter() - start,
        tuple(warnings),
    )
