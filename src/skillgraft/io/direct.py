"""Big sequential writes that skip the page cache, and reusable page-aligned buffers.

Writing a multi-GB checkpoint through the page cache costs about as much CPU as the merge itself on a small
machine (ext4 here: 4.8 s of kernel time to ``write`` 2.3 GB; 0.15 s with ``O_DIRECT``, at 1.9 GB/s).
:class:`StreamFile` stages bytes in a page-aligned buffer and writes whole blocks with ``O_DIRECT`` where the
filesystem supports it, falling back to plain writes where it does not (tmpfs, some network filesystems).
"""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

import torch

BLOCK = 4096


def aligned_buffer(nbytes: int) -> tuple[mmap.mmap, torch.Tensor]:
    """A zero-filled, page-aligned ``uint8`` tensor of ``nbytes`` (anonymous mmap; huge pages where offered).

    Keep the returned mmap object alive as long as the tensor is used.
    """
    flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)  # not MAP_SHARED (shmem)
    mm = mmap.mmap(-1, max(nbytes, 1), flags=flags) if flags else mmap.mmap(-1, max(nbytes, 1))
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None and nbytes >= 2 << 20:
        try:
            mm.madvise(advice)
        except OSError:
            pass
    return mm, torch.frombuffer(mm, dtype=torch.uint8, count=nbytes) if nbytes else torch.empty(0, dtype=torch.uint8)


def keep_freed_memory(nbytes: int = 512 << 20) -> None:
    """Ask glibc to keep up to ``nbytes`` of freed heap for reuse instead of returning it to the kernel at
    once, and to serve blocks up to 32 MiB from the heap: otherwise every slice's temporaries come back as
    fresh pages that the kernel zeroes again. Process-wide; a no-op off glibc."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, nbytes)  # M_TRIM_THRESHOLD
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD (glibc's maximum)
    except (OSError, AttributeError):
        pass


def write_all(fd: int, data: memoryview) -> None:
    """``os.write`` until every byte of ``data`` is written (raises ``OSError``, e.g. ENOSPC)."""
    done = 0
    while done < len(data):
        done += os.write(fd, data[done:])


class StreamFile:
    """Append-only writer for a new file; ``O_DIRECT`` when possible (``direct`` tells which).

    ``write`` accepts a flat ``uint8`` tensor or bytes; ``close`` writes the tail (padded to a block, then
    truncated to the true size) and fsyncs. Errors are ``OSError`` as from ``os.write``.
    """

    STAGE = 32 << 20  # a multiple of BLOCK

    def __init__(self, path: Path, direct: bool = True) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        o_direct = getattr(os, "O_DIRECT", 0) if direct else 0
        self.direct = bool(o_direct)
        try:
            self.fd = os.open(path, flags | o_direct, 0o666)
        except OSError as e:
            if not o_direct or e.errno != errno.EINVAL:
                raise
            self.fd = os.open(path, flags, 0o666)
            self.direct = False
        self.size = 0
        self._fill = 0
        if self.direct:
            self._mm, self._stage = aligned_buffer(self.STAGE)

    def write(self, data: torch.Tensor | bytes) -> None:
        src = data if isinstance(data, torch.Tensor) else torch.frombuffer(bytearray(data), dtype=torch.uint8)
        n = src.numel()
        if n == 0:
            return
        self.size += n
        if not self.direct:
            write_all(self.fd, src.numpy().data)
            return
        pos = 0
        while pos < n:
            take = min(n - pos, self.STAGE - self._fill)
            self._stage[self._fill : self._fill + take].copy_(src[pos : pos + take])  # releases the GIL
            self._fill += take
            pos += take
            if self._fill == self.STAGE:
                self._flush(self.STAGE)

    def _flush(self, nbytes: int) -> None:
        try:
            write_all(self.fd, memoryview(self._mm)[:nbytes])
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            # This filesystem accepted O_DIRECT at open but refuses the write: go on buffered.
            self._drop_direct()
            write_all(self.fd, memoryview(self._mm)[:nbytes])
        self._fill = 0

    def _drop_direct(self) -> None:
        import fcntl

        fl = fcntl.fcntl(self.fd, fcntl.F_GETFL)
        fcntl.fcntl(self.fd, fcntl.F_SETFL, fl & ~getattr(os, "O_DIRECT", 0))
        self.direct = False

    def close(self) -> None:
        """Write what is staged, set the exact size, fsync and close."""
        if self.fd < 0:
            return
        try:
            if self.direct and self._fill:
                padded = -(-self._fill // BLOCK) * BLOCK
                self._stage[self._fill : padded].zero_()
                self._flush(padded)
                os.ftruncate(self.fd, self.size)
            elif self._fill:
                write_all(self.fd, memoryview(self._mm)[: self._fill])
            os.fsync(self.fd)
        finally:
            self.abort()

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
