"""The safetensors container, read and written at the byte level.

Reading parses and validates the header (so truncated or corrupt files fail with a clear error before any
tensor is touched); writing streams tensor bytes to disk so a file is never held in memory.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from skillgraft.errors import FormatError, WriteError
from skillgraft.io.direct import StreamFile

DTYPE_TO_ST = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",  # safetensors' names for the two standard fp8 formats
    torch.float8_e5m2: "F8_E5M2",
    torch.uint16: "U16",
    torch.uint32: "U32",
    torch.uint64: "U64",
}
ST_TO_DTYPE = {v: k for k, v in DTYPE_TO_ST.items()}
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives inside a safetensors file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


_DAMAGED = "the file is damaged or incomplete: copy or download it again (compare its size with the source's)"


def _int(v: object) -> int:
    """A JSON integer (``int("7")`` or ``int(7.5)`` would accept a corrupt header)."""
    if not isinstance(v, int) or isinstance(v, bool):
        raise ValueError(f"{v!r:.20} is not an integer")
    return v


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header; returns (tensors, metadata)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise FormatError(
                    f"{path}: not a safetensors file (shorter than its 8-byte header length)", hint=_DAMAGED
                )
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER or 8 + n > size:
                raise FormatError(
                    f"{path}: not a safetensors file or truncated (header length {n} > file size)", hint=_DAMAGED
                )
            header_bytes = f.read(n)
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror})") from e
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: corrupt safetensors header ({e.__class__.__name__})", hint=_DAMAGED) from e
    if not isinstance(header, dict):
        raise FormatError(f"{path}: corrupt safetensors header (not a JSON object)", hint=_DAMAGED)
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise FormatError(
            f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)", hint=_DAMAGED
        )
    data_start = 8 + n
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise FormatError(f"{path}: corrupt header entry for tensor {name!r} (not an object)", hint=_DAMAGED)
        if isinstance(entry.get("dtype"), str) and entry["dtype"] not in ST_TO_DTYPE:
            raise FormatError(
                f"{path}: tensor {name!r} has dtype {entry['dtype']!r:.20}, which skillgraft cannot read",
                hint=f"convert the checkpoint to one of {', '.join(sorted(ST_TO_DTYPE))}",
            )
        try:
            dtype = ST_TO_DTYPE[entry["dtype"]]
            shape = tuple(_int(s) for s in entry["shape"])
            begin, end = (_int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise FormatError(f"{path}: corrupt header entry for tensor {name!r} ({err})", hint=_DAMAGED) from err
        if any(d < 0 for d in shape):
            raise FormatError(
                f"{path}: corrupt header entry for tensor {name!r} (negative dimension in its shape)", hint=_DAMAGED
            )
        numel = 1
        for s in shape:
            numel *= s
        if end - begin != numel * dtype.itemsize or begin < 0 or data_start + end > size:
            raise FormatError(
                f"{path}: tensor {name!r} lies outside the file or has the wrong byte length (truncated file?)",
                hint=_DAMAGED,
            )
        out[name] = TensorInfo(name, dtype, shape, data_start + begin, data_start + end)
    return out, meta


class MappedFile:
    """One safetensors file opened for reading; tensors are read with ``preadv`` into fresh buffers.

    Positional reads (not an mmap held for the file's lifetime) keep the pages of a checkpoint out of this
    process's resident set: peak RSS stays at the tensors in flight, whatever the model size.
    """

    CHUNK = 64 << 20

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tensors, self.metadata = read_header(path)
        self._file = open(path, "rb")
        self._fd = self._file.fileno()

    def _read_into(self, buf: memoryview, offset: int) -> None:
        done = 0
        while done < len(buf):
            n = os.preadv(self._fd, [buf[done:]], offset + done)
            if n <= 0:
                raise FormatError(f"{self.path}: file ended early (truncated while open?)", hint=_DAMAGED)
            done += n

    def chunks(self, name: str) -> Iterator[memoryview]:
        """The stored bytes of one tensor in chunks of at most 64 MiB (a reused buffer: consume each at once)."""
        info = self.tensors[name]
        buf = bytearray(min(self.CHUNK, info.nbytes))
        view = memoryview(buf)
        pos = info.begin
        while pos < info.end:
            n = min(len(buf), info.end - pos)
            self._read_into(view[:n], pos)
            yield view[:n]
            pos += n

    def get(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Return tensor ``name`` as a fresh (writable) CPU tensor, or read it into the flat ``uint8`` buffer
        ``out`` (at least the tensor's size) and return a view of that."""
        info = self.tensors[name]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        if out is not None:
            view = out[: info.nbytes]
            self._read_into(memoryview(view.numpy()), info.begin)  # type: ignore[arg-type]
            return view.view(info.dtype).reshape(info.shape)
        buf = bytearray(info.nbytes)
        self._read_into(memoryview(buf), info.begin)
        return torch.frombuffer(buf, dtype=info.dtype).reshape(info.shape)

    def map(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as a private copy-on-write mapping of the file: no copy, pages come straight from the
        page cache (populated up front) and leave the resident set when the tensor is dropped. Used by the merge
        engine's slice path, where each tensor is read once; the file must not shrink while mapped."""
        info = self.tensors[name]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        start = info.begin - info.begin % mmap.ALLOCATIONGRANULARITY
        mm = mmap.mmap(self._fd, info.end - start, offset=start, access=mmap.ACCESS_COPY)
        try:
            mm.madvise(MADV_POPULATE_READ)
        except (OSError, ValueError):  # kernels before 5.14: pages fault in on first touch instead
            pass
        raw = torch.frombuffer(mm, dtype=torch.uint8)[info.begin - start :]
        try:
            return raw.view(info.dtype).reshape(info.shape)
        except RuntimeError:  # an offset not aligned to the element size: read a copy instead
            return self.get(name)

    def close(self) -> None:
        self._file.close()


MADV_POPULATE_READ = 22  # linux/mman.h


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous().cpu()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).reshape(-1).numpy())  # type: ignore[arg-type]


def write_error(path: Path, e: OSError) -> WriteError:
    what = "disk full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
    return WriteError(
        f"cannot write {path.name} in {path.parent}: {what}",
        hint="free some space or write the output elsewhere; nothing was left under its name",
    )


class SafetensorsWriter:
    """Stream tensors into one safetensors file; the file appears at ``path`` only on :meth:`close`.

    Tensor bytes go to a side file as they arrive; ``close`` writes the header (whose metadata may depend on
    what was written, e.g. a manifest with measured errors), appends the data and renames into place.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._data_path = self.path.with_name(f".{self.path.name}.data.tmp")
        self._data = open(self._data_path, "wb")
        self._entries: dict[str, dict] = {}
        self.nbytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._entries:
            raise ValueError(f"duplicate tensor name {name!r}")
        if tensor.dtype not in DTYPE_TO_ST:
            raise ValueError(f"dtype {tensor.dtype} cannot be stored in safetensors")
        data = _tensor_bytes(tensor)
        try:
            self._data.write(data)
        except OSError as e:
            raise write_error(self.path, e) from e
        self._entries[name] = {
            "dtype": DTYPE_TO_ST[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [self.nbytes, self.nbytes + len(data)],
        }
        self.nbytes += len(data)

    def names(self) -> Iterator[str]:
        return iter(self._entries)

    def close(self, metadata: dict[str, str] | None = None) -> int:
        """Write the final file; returns its size in bytes."""
        self._data.close()
        header: dict = dict(self._entries)
        if metadata:
            header["__metadata__"] = metadata
        hb = json.dumps(header, separators=(",", ":")).encode()
        hb += b" " * (-len(hb) % 8)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            with open(tmp, "wb") as out, open(self._data_path, "rb") as src:
                out.write(struct.pack("<Q", len(hb)))
                out.write(hb)
                while chunk := src.read(64 << 20):
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except OSError as e:
            raise write_error(self.path, e) from e
        finally:
            self._data_path.unlink(missing_ok=True)
            tmp.unlink(missing_ok=True)
        return 8 + len(hb) + self.nbytes

    def abort(self) -> None:
        self._data.close()
        self._data_path.unlink(missing_ok=True)


class PlannedSafetensorsWriter:
    """Write a safetensors file whose tensors (names, dtypes, shapes, order) are known up front: the header is
    written first and tensor bytes go straight to their place — one write of the data, no side file, through
    ``O_DIRECT`` where the filesystem allows (:class:`~skillgraft.io.direct.StreamFile`).

    The caller owns atomicity (the file lives in a temporary directory that is renamed at the end).
    """

    def __init__(self, path: Path, plan: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]):
        self.path = Path(path)
        header: dict = {}
        offset = 0
        for name, dtype, shape in plan:
            n = dtype.itemsize
            for d in shape:
                n *= d
            header[name] = {"dtype": DTYPE_TO_ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        header["__metadata__"] = metadata
        hb = json.dumps(header, separators=(",", ":")).encode()
        hb += b" " * (-len(hb) % 8)
        self._order = [name for name, _, _ in plan]
        self._sizes = {
            name: e["data_offsets"][1] - e["data_offsets"][0] for name, e in header.items() if name != "__metadata__"
        }
        self._next = 0
        self.nbytes = 0
        try:
            self._file = StreamFile(self.path)
            self._file.write(struct.pack("<Q", len(hb)) + hb)
        except OSError as e:
            raise write_error(self.path, e) from e

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._order) or self._order[self._next] != name:
            raise ValueError(f"tensor {name!r} written out of the planned order")
        data = tensor.detach().contiguous().cpu().view(torch.uint8).reshape(-1) if tensor.numel() else None
        size = 0 if data is None else data.numel()
        if size != self._sizes[name]:
            raise ValueError(f"tensor {name!r} has {size} bytes, the plan says {self._sizes[name]}")
        try:
            if data is not None:
                self._file.write(data)
        except OSError as e:
            raise write_error(self.path, e) from e
        self._next += 1
        self.nbytes += size

    def close(self) -> None:
        if self._next != len(self._order):
            raise ValueError(f"{self.path}: {len(self._order) - self._next} planned tensors were not written")
        try:
            self._file.close()
        except OSError as e:
            raise write_error(self.path, e) from e

    def abort(self) -> None:
        self._file.abort()
