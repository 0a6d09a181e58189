"""Atomic writers: a checkpoint directory or a single file appears under its final name only when complete.

``CheckpointWriter`` streams tensors into size-bounded safetensors shards inside a temporary sibling directory,
writes the index and copies config/tokenizer files, then renames the directory into place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from skillgraft.errors import OutputExistsError
from skillgraft.io.safetensors_file import PlannedSafetensorsWriter, SafetensorsWriter

DEFAULT_SHARD_BYTES = 2 * 1024**3


def check_output(path: Path, overwrite: bool) -> None:
    """Refuse an existing output unless ``overwrite``; call before any heavy work."""
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path}: output already exists", hint="choose another path or pass --overwrite")
    if not path.parent.exists():
        raise OutputExistsError(f"{path.parent}: output's parent directory does not exist")


def _replace(tmp: Path, final: Path) -> None:
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        os.replace(tmp, final)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(final: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary file path next to ``final``; rename it over ``final`` if the block succeeds."""
    final = Path(final)
    check_output(final, overwrite)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the user's usual mode
        _replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


class CheckpointWriter:
    """Write a Hugging Face checkpoint directory atomically, one tensor at a time.

    Use as a context manager; on an exception the temporary directory is removed and nothing appears at
    ``out_dir``.
    """

    def __init__(
        self,
        out_dir: str | Path,
        overwrite: bool = False,
        max_shard_bytes: int = DEFAULT_SHARD_BYTES,
        copy_from: Path | None = None,
        config_updates: dict | None = None,
        plan: list[tuple[str, torch.dtype, tuple[int, ...]]] | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        check_output(self.out_dir, overwrite)
        self.max_shard_bytes = max_shard_bytes
        self.copy_from = copy_from
        self.config_updates = config_updates or {}
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.", suffix=".partial", dir=self.out_dir.parent))
        self._shards: list[tuple[str, SafetensorsWriter]] = []
        self._weight_map: dict[str, int] = {}
        self.total_bytes = 0
        self._planned: list[PlannedSafetensorsWriter] = []
        self._planned_names: list[str] = []
        if plan is not None:
            self._open_planned(plan)

    def _open_planned(self, plan: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> None:
        """With every tensor known up front, shard by size now and write each shard's header first."""
        groups: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
        size = 0
        for item in plan:
            n = item[1].itemsize
            for d in item[2]:
                n *= d
            if groups[-1] and size + n > self.max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(item)
            size += n
        count = len(groups)
        self._planned_names = self._shard_names(count)
        for i, group in enumerate(groups):
            self._planned.append(PlannedSafetensorsWriter(self.tmp / self._planned_names[i], group, {"format": "pt"}))
            self._weight_map.update({name: i for name, _, _ in group})
        self._route = {name: i for name, i in self._weight_map.items()}

    @staticmethod
    def _shard_names(n: int) -> list[str]:
        return ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._planned:
            self._planned[self._route[name]].add(name, tensor)
            self.total_bytes += tensor.numel() * tensor.element_size()
            return
        size = tensor.numel() * tensor.element_size()
        if not self._shards or (
            self._shards[-1][1].nbytes and self._shards[-1][1].nbytes + size > self.max_shard_bytes
        ):
            fname = f"shard-{len(self._shards):05d}.safetensors"
            self._shards.append((fname, SafetensorsWriter(self.tmp / fname)))
        self._shards[-1][1].add(name, tensor)
        self._weight_map[name] = len(self._shards) - 1
        self.total_bytes += size

    def _finish(self) -> None:
        if self._planned:
            for pw in self._planned:
                pw.close()
            names = self._planned_names
        else:
            names = self._shard_names(len(self._shards))
            for (tmpname, w), final in zip(self._shards, names):
                w.close({"format": "pt"})
                os.replace(self.tmp / tmpname, self.tmp / final)
        if len(names) > 1:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": {k: names[i] for k, i in sorted(self._weight_map.items())},
            }
            (self.tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        self._copy_aux()
        _replace(self.tmp, self.out_dir)

    def _copy_aux(self) -> None:
        if self.copy_from is not None:
            from skillgraft.io.checkpoint import AUX_FILES

            for f in AUX_FILES:
                if (self.copy_from / f).exists():
                    shutil.copy2(self.copy_from / f, self.tmp / f)
        cfg = self.tmp / "config.json"
        if self.config_updates and cfg.exists():
            data = json.loads(cfg.read_text())
            data.update(self.config_updates)
            cfg.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._finish()
        finally:
            for _, w in self._shards:
                w.abort() if not w._data.closed else None
            for pw in self._planned:
                pw.abort()
            if self.tmp.exists():
                shutil.rmtree(self.tmp, ignore_errors=True)
