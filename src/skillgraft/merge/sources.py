"""Merge inputs as delta sources: skill packs, PEFT LoRA adapters, and full fine-tuned checkpoints.

Each source answers which parameters it changes, their shapes, and Δ for one name in fp32 — read lazily,
one tensor at a time (a LoRA's ΔW = B·A·scale is formed per module, never A and B mixed across inputs).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from skillgraft.errors import MismatchError, NotFoundError
from skillgraft.io.checkpoint import Checkpoint
from skillgraft.skill.pack import SkillPack


class DeltaSource:
    """One merge input. ``names`` are the parameters it may change."""

    label: str
    kind: str

    def names(self) -> set[str]:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def delta(self, name: str, base: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def describe(self, name: str) -> str:
        return self.kind

    def close(self) -> None:
        pass


class SkillSource(DeltaSource):
    kind = "skill"

    def __init__(self, pack: SkillPack, label: str) -> None:
        self.pack, self.label = pack, label

    def names(self) -> set[str]:
        return set(self.pack.manifest.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.pack.manifest.tensors[name]["shape"])

    def delta(self, name: str, base: torch.Tensor | None) -> torch.Tensor:
        return self.pack.delta(name)

    def describe(self, name: str) -> str:
        e = self.pack.manifest.tensors[name]
        level = e.get("rank") or e.get("nnz")
        return f"skill:{e['encoding']}" + (f"({level})" if level else "")

    def close(self) -> None:
        self.pack.close()


class LoraSource(DeltaSource):
    kind = "lora"

    def __init__(self, adapter_dir: Path, label: str, allow_pickle: bool = False) -> None:
        from skillgraft.skill.peft import read_adapter

        self.adapter = read_adapter(adapter_dir, allow_pickle)
        self.label = label
        self._by_param = {m.name + ".weight": m for m in self.adapter.modules.values()}

    def names(self) -> set[str]:
        return set(self._by_param)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._by_param[name].param_shape)

    def delta(self, name: str, base: torch.Tensor | None) -> torch.Tensor:
        up, down = self._by_param[name].factors()
        return up.float() @ down.float()

    def describe(self, name: str) -> str:
        return f"lora(r={self._by_param[name].a.shape[0]})"


class CheckpointSource(DeltaSource):
    """A full fine-tune of the base: Δ = θ_tuned − θ₀, computed per tensor on the fly."""

    kind = "checkpoint"

    def __init__(self, path: Path, label: str, allow_pickle: bool = False) -> None:
        self.ckpt = Checkpoint(path, allow_pickle)
        self.label = label

    @classmethod
    def of(cls, ckpt: Any, label: str) -> CheckpointSource:
        """A source over an opened checkpoint or checkpoint-like view (a layer layout's, ``merge/layout.py``)."""
        src = cls.__new__(cls)
        src.ckpt, src.label = ckpt, label
        return src

    def names(self) -> set[str]:
        return set(self.ckpt.names())

    def shape(self, name: str) -> tuple[int, ...]:
        return self.ckpt.shape(name)

    def delta(self, name: str, base: torch.Tensor | None) -> torch.Tensor:
        assert base is not None
        return self.ckpt.get(name).float() - base.float()

    def close(self) -> None:
        self.ckpt.close()


@dataclass(frozen=True)
class SourceRef:
    """Where an input comes from, before it is opened."""

    ref: str
    kind: str  # "skill" | "lora" | "checkpoint"


def detect(ref: str, library: Path | None = None) -> SourceRef:
    """Classify an input: a directory with adapter_config.json is a LoRA, another directory a checkpoint, an
    existing file a skill pack. Anything else is a library reference (``name``, ``name@3``) unless it looks like a
    path (a path separator, or ending in ``.skill``): then it is a path that does not exist."""
    p = Path(ref)
    if p.is_dir():
        return SourceRef(ref, "lora" if (p / "adapter_config.json").exists() else "checkpoint")
    if p.exists():
        return SourceRef(ref, "skill")
    if ref.endswith(".skill") or "/" in ref or os.sep in ref:
        raise missing_model(ref, "skill pack" if ref.endswith(".skill") else "file or directory")
    from skillgraft.library import Library

    Library(library).get(ref)  # raises NotFoundError with a "did you mean" hint
    return SourceRef(ref, "skill")


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def missing_model(ref: str, what: str = "model directory") -> NotFoundError:
    """The error for a model reference that is not on disk, naming what cannot apply offline: mergekit's
    ``model+lora`` and ``model@revision`` references, and Hugging Face Hub ids (nothing is downloaded here)."""
    if "+" in ref and not Path(ref).exists():
        return NotFoundError(
            f"{ref}: no such {what}; mergekit's 'model+lora' reference (a LoRA applied to a model) is not supported",
            hint="merge the adapter into its model first (skillgraft lora merge), or list the adapter directory "
            "as its own input in a skillgraft config",
        )
    if "@" in ref and not Path(ref).exists():
        return NotFoundError(
            f"{ref}: no such {what}; a 'model@revision' reference names a Hub revision, and skillgraft reads local "
            "directories only",
            hint="download that revision and give its local path",
        )
    if HUB_ID.match(ref):
        return NotFoundError(
            f"{ref}: no such {what}; it looks like a Hugging Face Hub id, and skillgraft reads local checkpoints "
            "only (it downloads nothing)",
            hint=f"download it first (huggingface-cli download {ref} --local-dir DIR) and give DIR",
        )
    return NotFoundError(
        f"{ref}: no such {what}",
        hint="a relative input path is looked up next to the config file, then in the current directory",
    )


def open_source(ref: SourceRef, library: Path | None = None, allow_pickle: bool = False) -> DeltaSource:
    if ref.kind == "lora":
        return LoraSource(Path(ref.ref), ref.ref, allow_pickle)
    if ref.kind == "checkpoint":
        return CheckpointSource(Path(ref.ref), ref.ref, allow_pickle)
    from skillgraft.skill.apply import open_skill

    return SkillSource(open_skill(ref.ref, library), ref.ref)


def check_source_fits(src: DeltaSource, shapes: dict[str, tuple[int, ...]]) -> None:
    """Every parameter the input changes exists in the base with the same shape; a full checkpoint must also
    hold every base tensor (else it is another architecture, or ties embeddings differently)."""
    if src.kind == "checkpoint" and src.names() < set(shapes):
        missing = sorted(set(shapes) - src.names())
        raise MismatchError(
            f"input {src.label} lacks {len(missing)} tensor(s) of the base, e.g. {missing[0]!r}",
            hint="inputs must be fine-tunes of the same base architecture (and tie embeddings alike)",
        )
    same_arch = "inputs must be fine-tunes of the same base architecture"
    for name in sorted(src.names()):
        if name not in shapes:
            raise MismatchError(f"input {src.label} changes {name!r}, which the base does not have", hint=same_arch)
        if tuple(src.shape(name)) != tuple(shapes[name]):
            got, want = list(src.shape(name)), list(shapes[name])
            vocab = "vocabulary resized? merge inputs must share the base's vocabulary"
            hint = vocab if got[1:] == want[1:] else same_arch
            raise MismatchError(f"input {src.label}: {name!r} has shape {got}, the base's is {want}", hint=hint)
