"""Content-addressed blob storage of the skill library: ``blobs/sha256/<2 hex>/<sha256>.skill``.

Blobs are staged in a temp file on the same filesystem, fsynced, then renamed into place with ``os.replace``,
so a reader never sees a partial blob. Blobs are made read-only to discourage editing them in place.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tempfile
from pathlib import Path

CHUNK = 4 * 1024 * 1024
BLOB_SUFFIX = ".skill"


def hash_file(path: Path) -> tuple[str, int]:
    """SHA-256 hex digest and size of a file, read in chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform can open a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class BlobStore:
    """The ``blobs/sha256`` tree under a library root."""

    def __init__(self, root: Path) -> None:
        self.root = root / "blobs" / "sha256"

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / f"{sha256}{BLOB_SUFFIX}"

    def stage(self, source: Path) -> tuple[Path, str, int]:
        """Copy ``source`` into a temp file inside the store, hashing it on the way.

        Returns ``(temp path, sha256, size)``; pass the temp path to :meth:`commit` or :meth:`discard`.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".incoming-", suffix=".partial", dir=self.root)
        tmp = Path(name)
        h = hashlib.sha256()
        size = 0
        try:
            with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
                while chunk := src.read(CHUNK):
                    h.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                out.flush()
                os.fsync(out.fileno())
        except OSError as e:
            tmp.unlink(missing_ok=True)
            if Path(source).exists() and not os.access(source, os.R_OK):
                raise
            from skillgraft.io.safetensors_file import write_error

            raise write_error(self.root / "library blob", e) from e
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp, h.hexdigest(), size

    def commit(self, tmp: Path, sha256: str) -> Path:
        """Rename a staged file into place (replacing an existing blob of the same content heals it)."""
        final = self.path(sha256)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(tmp, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        return final

    @staticmethod
    def discard(tmp: Path) -> None:
        tmp.unlink(missing_ok=True)

    def remove(self, sha256: str) -> None:
        final = self.path(sha256)
        final.unlink(missing_ok=True)
        _fsync_dir(final.parent)
        with contextlib.suppress(OSError):  # drop the fan-out directory once empty
            final.parent.rmdir()
