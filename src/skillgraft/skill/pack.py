"""The skill pack file: one safetensors file whose metadata holds a JSON manifest (spec: docs/skillpack.md).

``SkillPack`` opens and validates a pack lazily; ``PackWriter`` streams encoded tensors into a new pack that
appears under its final name only when complete.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from skillgraft.errors import FormatError, NotFoundError, NumericError
from skillgraft.io.safetensors_file import MappedFile, SafetensorsWriter
from skillgraft.io.writer import atomic_path
from skillgraft.skill.encoding import check_parts, decode, stored_parts
from skillgraft.skill.manifest_check import check_manifest, validate_name  # noqa: F401 (validate_name is re-exported)

FORMAT_NAME = "skillgraft.skill"
FORMAT_VERSION = 1
MANIFEST_KEY = "skillgraft.manifest"
_REMAKE = "the pack is damaged or was not written by skillgraft: extract or download it again"


@dataclass(frozen=True)
class BaseIdentity:
    """Which base model a skill was made against."""

    name: str
    fingerprint: str | None  # content fingerprint (names, shapes, dtypes and bytes); None when unknown
    structure: str | None  # structure-only fingerprint (names, shapes, dtypes)
    tokenizer: str | None = None  # fingerprint of the tokenizer files, None when the base had none


@dataclass(frozen=True)
class Manifest:
    """Everything a pack says about itself. ``tensors`` maps a parameter name to its entry (see the spec)."""

    name: str
    version: int
    base: BaseIdentity
    tensors: dict[str, dict]
    description: str = ""
    tags: tuple[str, ...] = ()
    provenance: dict = field(default_factory=dict)
    evaluations: tuple[dict, ...] = ()
    source: dict = field(default_factory=dict)  # e.g. the LoRA config it was imported from
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d = {"format": FORMAT_NAME, **d, "tags": list(self.tags), "evaluations": list(self.evaluations)}
        return json.dumps(d, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str, where: str) -> Manifest:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise FormatError(f"{where}: skill manifest is not valid JSON ({e.msg})") from e
        if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
            raise FormatError(f"{where}: not a skill pack (manifest format is not {FORMAT_NAME!r})")
        if type(d.get("format_version")) is not int or d["format_version"] != FORMAT_VERSION:
            raise FormatError(
                f"{where}: skill pack format version {d.get('format_version')} is not supported "
                f"(this skillgraft reads version {FORMAT_VERSION})",
                hint="upgrade skillgraft",
            )
        d = check_manifest(d, where)
        b = d["base"]
        return cls(
            name=d["name"],
            version=d["version"],
            base=BaseIdentity(b["name"], b.get("fingerprint"), b.get("structure"), b.get("tokenizer")),
            tensors=d["tensors"],
            description=d.get("description", ""),
            tags=tuple(d.get("tags", ())),
            provenance=d.get("provenance", {}),
            evaluations=tuple(d.get("evaluations", ())),
            source=d.get("source", {}),
        )

    def replace(self, **changes) -> Manifest:
        return dataclasses.replace(self, **changes)

    @property
    def total_bytes(self) -> int:
        return sum(int(e.get("bytes", 0)) for e in self.tensors.values())


def part_key(name: str, part: str) -> str:
    return f"{name}::{part}"


class SkillPack:
    """A skill pack opened for reading. Tensors are decoded on demand (fp32 deltas)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise NotFoundError(f"{self.path}: no such skill pack", hint="give a .skill file or a library name")
        if self.path.is_dir():
            raise FormatError(f"{self.path}: is a directory, not a skill pack (.skill file)")
        self._file = MappedFile(self.path)
        text = self._file.metadata.get(MANIFEST_KEY)
        if text is None:
            self._file.close()
            raise FormatError(f"{self.path}: not a skill pack (a safetensors file without a skillgraft manifest)")
        self.manifest = Manifest.from_json(text, str(self.path))
        try:
            for name, entry in self.manifest.tensors.items():
                infos = {}
                for part in stored_parts(entry):
                    info = self._file.tensors.get(part_key(name, part))
                    if info is None:
                        raise FormatError(f"{self.path}: tensor {name!r} lacks its stored part {part!r}", hint=_REMAKE)
                    infos[part] = info
                check_parts(name, entry, {p: (i.dtype, i.shape) for p, i in infos.items()}, str(self.path))
        except FormatError:
            self._file.close()
            raise

    @property
    def names(self) -> list[str]:
        return list(self.manifest.tensors)

    def delta(self, name: str, check_finite: bool = True) -> torch.Tensor:
        """The fp32 delta of parameter ``name``."""
        entry = dict(self.manifest.tensors[name], name=name)
        out = decode(entry, lambda part: self._file.get(part_key(name, part)))
        if check_finite and not torch.isfinite(out).all():
            raise NumericError(f"{self.path}: delta of {name!r} contains NaN or Inf", hint="re-extract the skill")
        return out

    def part(self, name: str, part: str) -> torch.Tensor:
        return self._file.get(part_key(name, part))

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SkillPack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PackWriter:
    """Write a new skill pack atomically. ``add`` encoded parts per tensor, then ``close(manifest)``."""

    def __init__(self, path: str | Path, overwrite: bool = False) -> None:
        self.path = Path(path)
        self._ctx = atomic_path(self.path, overwrite)
        self._tmp = self._ctx.__enter__()
        self._writer = SafetensorsWriter(self._tmp)
        self.entries: dict[str, dict] = {}

    def add(self, name: str, parts: dict[str, torch.Tensor], fields: dict) -> dict:
        """Store one tensor's parts; returns its manifest entry (with ``bytes`` filled in)."""
        for p, t in parts.items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise NumericError(f"delta of {name!r} contains NaN or Inf", hint="check the fine-tuned checkpoint")
            self._writer.add(part_key(name, p), t)
        entry = dict(fields)
        entry["bytes"] = sum(t.numel() * t.element_size() for t in parts.values())
        for k, v in entry.items():
            if isinstance(v, float) and not math.isfinite(v):
                entry[k] = None
        self.entries[name] = entry
        return entry

    def close(self, manifest: Manifest) -> int:
        """Finish the file; returns its size in bytes."""
        manifest = manifest.replace(tensors=self.entries)
        size = self._writer.close({MANIFEST_KEY: manifest.to_json(), "format": "pt"})
        self._ctx.__exit__(None, None, None)
        return size

    def abort(self) -> None:
        self._writer.abort()
        try:
            self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)
        except RuntimeError:
            pass
