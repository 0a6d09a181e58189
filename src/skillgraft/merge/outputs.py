"""Where a merge goes: a full HF checkpoint, a new skill pack, or a PEFT LoRA adapter (ΔW merge + truncated SVD).

Each output takes ``add(t, tensor, base)`` per tensor — the merged tensor in its output dtype and the base's tensor
as stored — then ``finish()`` or ``abort()``. Every output is written under a temporary name and appears at its
final path only when complete.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from skillgraft.io.writer import CheckpointWriter
from skillgraft.skill.encoding import encode_dense
from skillgraft.skill.fingerprint import fingerprint_checkpoint, fingerprint_tokenizer
from skillgraft.skill.modules import layout, module_kind
from skillgraft.skill.pack import BaseIdentity, Manifest, PackWriter, validate_name
from skillgraft.skill.provenance import provenance


class HFOutput:
    def __init__(self, plan: Any, opts: Any) -> None:
        updates = (
            {"torch_dtype": plan.config.out_dtype, "dtype": plan.config.out_dtype} if plan.config.out_dtype else {}
        )
        updates.update(getattr(plan.base, "config_updates", {}))  # a layer layout's block count
        layout = [(t.name, t.out_dtype, t.shape) for t in plan.tensors]
        copy_from = getattr(plan.base, "aux_dir", plan.base.path)  # a tokenizer merge's config.json and tokenizer
        self.writer = CheckpointWriter(opts.out, opts.overwrite, opts.max_shard_bytes, copy_from, updates, layout)

    def add(self, t: Any, tensor: torch.Tensor, base: torch.Tensor) -> None:
        self.writer.add(t.name, tensor)

    def finish(self) -> dict:
        self.writer.__exit__(None, None, None)
        return {"format": "hf", "bytes": self.writer.total_bytes}

    def abort(self) -> None:
        self.writer.__exit__(RuntimeError, None, None)


class SkillOutput:
    """The merged deltas as a dense skill pack (each delta in the smallest exactly-reproducing dtype)."""

    def __init__(self, plan: Any, opts: Any, path: Path | None = None, command: str = "") -> None:
        self.plan = plan
        self.path = Path(path or opts.out)
        self.writer = PackWriter(self.path, opts.overwrite if path is None else True)
        self.model_type = plan.base.config.get("model_type")
        self.command = command
        self.changed = 0

    def add(self, t: Any, tensor: torch.Tensor, base: torch.Tensor) -> None:
        if not t.users:
            return
        target = tensor
        delta = target.float() - base.float()
        if not delta.any():
            return
        self.changed += 1
        parts, fields = encode_dense(delta, base.to(t.out_dtype), target)
        fields.update(
            shape=list(t.shape),
            dtype=str(t.out_dtype).removeprefix("torch."),
            rel_error=0.0,
            kind=module_kind(t.name, t.shape),
        )
        if lay := layout(t.name, self.model_type):
            fields["layout"] = lay
        self.writer.add(t.name, parts, fields)

    def finish(self) -> dict:
        plan = self.plan
        fp = fingerprint_checkpoint(plan.base)
        base = BaseIdentity(
            str(plan.base.config.get("_name_or_path") or plan.base.path.resolve()),
            fp.content,
            fp.structure,
            fingerprint_tokenizer(plan.base.path),
        )
        name = validate_name(self.path.name.removesuffix(".skill").removeprefix(".") or "merged")
        source = {
            "kind": "merge",
            "method": plan.method.name,
            "parameters": plan.describe()["parameters"],
            "inputs": [{**i.to_dict(), "source": s.label} for s, i in zip(plan.sources, plan.config.inputs)],
        }
        manifest = Manifest(
            name=name[:128],
            version=1,
            base=base,
            tensors={},
            description=f"{plan.method.name} merge",
            provenance=provenance(self.command, [s.label for s in plan.sources]),
            source=source,
        )
        size = self.writer.close(manifest)
        return {"format": "skill", "bytes": size}

    def abort(self) -> None:
        self.writer.abort()


class LoraOutput:
    """Merge in ΔW space into a temporary dense pack, then factorise each matrix by truncated SVD."""

    def __init__(self, plan: Any, opts: Any) -> None:
        self.opts = opts
        self.tmp = tempfile.TemporaryDirectory(prefix="skillgraft-lora-")
        self.inner = SkillOutput(plan, opts, Path(self.tmp.name) / "merged.skill")

    def add(self, t: Any, tensor: torch.Tensor, base: torch.Tensor) -> None:
        self.inner.add(t, tensor, base)

    def finish(self) -> dict:
        from skillgraft.skill.peft import export_lora

        try:
            self.inner.finish()
            report = export_lora(
                self.inner.path,
                self.opts.out,
                rank=self.opts.rank,
                drop_unrepresentable=True,
                overwrite=self.opts.overwrite,
            )
        finally:
            self.tmp.cleanup()
        return {
            "format": "lora",
            "rank": self.opts.rank,
            "max_rel_error": report.max_rel_error,
            "dropped": list(report.dropped),
            "modules": len(report.modules),
        }

    def abort(self) -> None:
        self.inner.abort()
        self.tmp.cleanup()


def make_output(plan: Any, opts: Any, command: str = "") -> HFOutput | SkillOutput | LoraOutput:
    if opts.out_format == "skill":
        return SkillOutput(plan, opts, command=command)
    if opts.out_format == "lora":
        return LoraOutput(plan, opts)
    return HFOutput(plan, opts)
