"""Lazy, read-only view of a Hugging Face model directory.

Supports ``model.safetensors``, sharded safetensors with ``model.safetensors.index.json``, and — only when the
caller opts in — pickle ``pytorch_model.bin`` checkpoints loaded with ``weights_only=True``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from skillgraft.errors import FormatError, NotFoundError, UnsafeFormatError
from skillgraft.io.safetensors_file import MappedFile

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
AUX_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
TOKENIZER_FILES = tuple(f for f in AUX_FILES if f not in ("config.json", "generation_config.json"))


def read_weight_map(index: Path) -> dict[str, str]:
    """The ``weight_map`` of a shard index, validated: tensor name → a shard file inside the model directory."""
    hint = "the index is damaged: copy it again, or remove it if the directory holds one model.safetensors"
    try:
        doc = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{index}: not valid JSON ({getattr(e, 'msg', e)})", hint=hint) from e
    if not isinstance(doc, dict) or not isinstance(doc.get("weight_map"), dict):
        got = type(doc.get("weight_map")).__name__ if isinstance(doc, dict) else f"a JSON {type(doc).__name__}"
        raise FormatError(
            f"{index}: not a shard index (needs an object with a 'weight_map' object; got {got})", hint=hint
        )
    root = index.parent.resolve()
    for name, fname in doc["weight_map"].items():
        if not isinstance(fname, str) or not fname:
            raise FormatError(f"{index}: tensor {name!r} maps to {fname!r}, not a shard file name", hint=hint)
        where = (index.parent / fname).resolve()
        if Path(fname).is_absolute() or ".." in Path(fname).parts or not where.is_relative_to(root):
            raise FormatError(
                f"{index}: shard {fname!r} of tensor {name!r} lies outside the model directory",
                hint="shard paths must be file names inside the model directory; skillgraft reads nothing outside it",
            )
    return doc["weight_map"]


class Checkpoint:
    """A model directory whose tensors are read one at a time.

    >>> ckpt = Checkpoint("path/to/model")          # doctest: +SKIP
    >>> for name in ckpt.names(): w = ckpt.get(name)  # doctest: +SKIP
    """

    def __init__(self, path: str | Path, allow_pickle: bool = False) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise NotFoundError(f"{self.path}: no such model directory")
        if not self.path.is_dir():
            raise FormatError(f"{self.path}: expected a Hugging Face model directory (config.json + *.safetensors)")
        self.config: dict = self._read_config()
        self._files: dict[str, MappedFile] = {}
        self._where: dict[str, str] = {}
        self._pickled: dict[str, torch.Tensor] | None = None
        self._open(allow_pickle)

    # -- construction -------------------------------------------------------------------------------
    def _read_config(self) -> dict:
        cfg = self.path / "config.json"
        if not cfg.exists():
            return {}
        try:
            config = json.loads(cfg.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FormatError(f"{cfg}: not valid JSON ({getattr(e, 'msg', e)})") from e
        if not isinstance(config, dict):
            raise FormatError(f"{cfg}: must hold a JSON object, not a {type(config).__name__}")
        return config

    def _open(self, allow_pickle: bool) -> None:
        index = self.path / SAFE_INDEX
        if index.exists():
            weight_map = read_weight_map(index)
            for fname in sorted(set(weight_map.values())):
                shard = self.path / fname
                if not shard.exists():
                    raise NotFoundError(f"{shard}: shard listed in {SAFE_INDEX} is missing")
                self._files[fname] = MappedFile(shard)
            for name, fname in weight_map.items():
                if name not in self._files[fname].tensors:
                    raise FormatError(f"{index}: tensor {name!r} is not in shard {fname}")
                self._where[name] = fname
            return
        single = self.path / SAFE_SINGLE
        if single.exists():
            self._files[SAFE_SINGLE] = MappedFile(single)
            self._where = {n: SAFE_SINGLE for n in self._files[SAFE_SINGLE].tensors}
            return
        others = sorted(self.path.glob("*.safetensors"))
        if others:
            for shard in others:
                self._files[shard.name] = MappedFile(shard)
                self._where.update({n: shard.name for n in self._files[shard.name].tensors})
            return
        pickles = [p for p in (PICKLE_SINGLE, PICKLE_INDEX) if (self.path / p).exists()]
        if pickles:
            if not allow_pickle:
                raise UnsafeFormatError(
                    f"{self.path}: only a pickle checkpoint ({pickles[0]}) is present; pickle files can run code",
                    hint="convert it to safetensors, or pass --allow-pickle if you trust its source",
                )
            self._load_pickle()
            return
        raise FormatError(f"{self.path}: no model weights found (expected {SAFE_SINGLE} or {SAFE_INDEX})")

    def _load_pickle(self) -> None:
        index = self.path / PICKLE_INDEX
        files = sorted(set(read_weight_map(index).values())) if index.exists() else [PICKLE_SINGLE]
        tensors: dict[str, torch.Tensor] = {}
        for fname in files:
            try:
                sd = torch.load(self.path / fname, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # torch raises several types for corrupt or unsafe pickles
                raise FormatError(f"{self.path / fname}: cannot load with weights_only=True ({e})") from e
            tensors.update(sd)
        self._pickled = tensors

    # -- queries ------------------------------------------------------------------------------------
    @property
    def tied_embeddings(self) -> bool:
        """True when the config ties the output head to the input embedding."""
        tie = self.config.get("tie_word_embeddings")
        if tie is None and isinstance(self.config.get("text_config"), dict):
            tie = self.config["text_config"].get("tie_word_embeddings")
        return bool(tie) if tie is not None else self.config.get("model_type") == "gpt2"

    def names(self) -> list[str]:
        """Stored tensor names in a stable order (file order, then offset)."""
        if self._pickled is not None:
            return list(self._pickled)
        return sorted(self._where, key=lambda n: (self._where[n], self._files[self._where[n]].tensors[n].begin))

    def __contains__(self, name: str) -> bool:
        return name in (self._pickled if self._pickled is not None else self._where)

    def __len__(self) -> int:
        return len(self.names())

    def shape(self, name: str) -> tuple[int, ...]:
        if self._pickled is not None:
            return tuple(self._pickled[name].shape)
        return self._info(name).shape

    def dtype(self, name: str) -> torch.dtype:
        if self._pickled is not None:
            return self._pickled[name].dtype
        return self._info(name).dtype

    def nbytes(self, name: str) -> int:
        n = 1
        for s in self.shape(name):
            n *= s
        return n * self.dtype(name).itemsize

    def _info(self, name: str):
        try:
            return self._files[self._where[name]].tensors[name]
        except KeyError:
            raise NotFoundError(f"{self.path}: no tensor named {name!r}") from None

    def get(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read one tensor (a fresh CPU tensor in its stored dtype), or into ``out``, a flat ``uint8`` buffer of
        at least ``nbytes(name)`` (then a view of it is returned)."""
        if self._pickled is not None:
            if name not in self._pickled:
                raise NotFoundError(f"{self.path}: no tensor named {name!r}")
            return self._pickled[name].clone()
        self._info(name)
        return self._files[self._where[name]].get(name, out)

    def map(self, name: str) -> torch.Tensor:
        """Tensor ``name`` mapped from its file without a copy (see ``MappedFile.map``); pickled checkpoints
        return a copy."""
        if self._pickled is not None:
            return self.get(name)
        self._info(name)
        return self._files[self._where[name]].map(name)

    def chunks(self, name: str) -> Iterator[memoryview | bytes]:
        """The stored bytes of one tensor, in chunks (for hashing without holding the tensor)."""
        if self._pickled is not None:
            t = self._pickled[name].contiguous()
            yield t.view(torch.uint8).reshape(-1).numpy().tobytes() if t.numel() else b""
            return
        self._info(name)
        yield from self._files[self._where[name]].chunks(name)

    def total_bytes(self) -> int:
        return sum(self.nbytes(n) for n in self.names())

    def aux_files(self) -> Iterator[Path]:
        """Config, generation config and tokenizer files present in the directory."""
        for f in AUX_FILES:
            if (self.path / f).exists():
                yield self.path / f

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
