"""The local skill library: content-addressed ``.skill`` blobs plus a SQLite index of names and versions.

``Library`` adds, lists, finds, removes and verifies skills; ``resolve_skill`` lets every command take a
library reference (``name`` or ``name@3``) wherever it takes a ``.skill`` path.
"""

from __future__ import annotations

import builtins
import contextlib
import difflib
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from skillgraft.errors import (
    InputError,
    LibraryError,
    NotFoundError,
    OutputExistsError,
    SkillgraftError,
    WriteError,
)
from skillgraft.library.blobs import BlobStore, hash_file
from skillgraft.library.record import Problem, SkillRecord, SkillRef, check_version, parse_ref
from skillgraft.progress import ProgressFn, no_progress

if TYPE_CHECKING:
    from skillgraft.library.reindex import ReindexReport

ENV_VAR = "SKILLGRAFT_LIBRARY"
JOURNAL = "journal.jsonl"  # every add and rm, appended inside its transaction: `library reindex` replays it
REINDEX = "run `skillgraft library reindex` to rebuild the index from the stored files and the journal"
SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 60_000
COLUMNS = "name, version, sha256, size, tags, description, base_name, base_fingerprint, base_structure, created"
COLUMN_NAMES = tuple(c.strip() for c in COLUMNS.split(","))
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS skills (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    version INTEGER NOT NULL CHECK (version >= 1),
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    tags TEXT NOT NULL DEFAULT '[]',
    description TEXT NOT NULL DEFAULT '',
    base_name TEXT NOT NULL DEFAULT '',
    base_fingerprint TEXT,
    base_structure TEXT,
    created TEXT NOT NULL,
    UNIQUE (name, version)
);
CREATE INDEX IF NOT EXISTS skills_by_sha ON skills (sha256);
CREATE INDEX IF NOT EXISTS skills_by_base ON skills (base_fingerprint);
PRAGMA user_version = {SCHEMA_VERSION};
"""


def default_root() -> Path:
    """``$SKILLGRAFT_LIBRARY`` when set, else ``<user data dir>/skillgraft/library`` (XDG on Linux)."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("skillgraft")) / "library"


def _record(row: tuple) -> SkillRecord:
    name, version, sha, size, tags, desc, bname, bfp, bstruct, created = row
    return SkillRecord(name, int(version), sha, int(size), tuple(json.loads(tags)), desc, bname, bfp, bstruct, created)


def append_journal(root: Path, entry: dict) -> None:
    """Append one change to the library's journal and fsync it (called inside the index's write transaction)."""
    with open(root / JOURNAL, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _setup_index(conn: sqlite3.Connection, root: Path) -> None:
    """Switch a fresh index to WAL and create (or check) its schema; safe to repeat."""
    if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
        conn.execute("PRAGMA journal_mode = WAL")  # persistent: only the first opener of a new index does this
    conn.execute("PRAGMA synchronous = NORMAL")
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        conn.close()
        raise LibraryError(
            f"{root}: library index has schema version {version}, newer than this skillgraft's",
            hint="upgrade skillgraft",
        )
    if version < SCHEMA_VERSION:
        conn.executescript("BEGIN IMMEDIATE;" + SCHEMA + "COMMIT;")  # idempotent: IF NOT EXISTS


def _open_index(conn: sqlite3.Connection, root: Path, timeout_s: float = BUSY_TIMEOUT_MS / 1000) -> None:
    """Run :func:`_setup_index`, retrying while SQLite answers "database is locked".

    SQLite's busy handler does not cover every lock an opener can meet: switching a new index to WAL
    needs an exclusive lock and fails at once (SQLITE_BUSY, no wait) while a second process opens the
    same new file. Those races last milliseconds, so a short backoff settles them.
    """
    deadline = time.monotonic() + timeout_s
    delay = 0.002
    while True:
        try:
            _setup_index(conn, root)
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) and "busy" not in str(e) or time.monotonic() > deadline:
                raise
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            time.sleep(delay)
            delay = min(2 * delay, 0.1)


class Library:
    """A skill library rooted at ``root`` (see :func:`default_root`).

    >>> lib = Library()                      # doctest: +SKIP
    >>> rec = lib.add("math.skill")          # doctest: +SKIP
    >>> lib.path("math@1")                   # doctest: +SKIP
    """

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_root()
        if self.root.exists() and not self.root.is_dir():
            raise LibraryError(f"{self.root}: library root is not a directory", hint=f"set ${ENV_VAR} or --library")
        self.blobs = BlobStore(self.root)
        self._conn: sqlite3.Connection | None = None

    # -- connection ---------------------------------------------------------------------------------
    @property
    def db(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = self._connect()
        return self._conn

    def _connect(self) -> sqlite3.Connection:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.root / "index.sqlite", timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            _open_index(conn, self.root)
        except sqlite3.DatabaseError as e:
            raise LibraryError(
                f"{self.root / 'index.sqlite'}: cannot open the library index ({e})", hint=REINDEX
            ) from e
        except OSError as e:
            raise LibraryError(f"{self.root}: cannot create the library ({e.strerror})") from e
        return conn

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction holding SQLite's write lock from the start (waits for other writers)."""
        db = self.db
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            raise LibraryError(f"{self.root}: library index is locked ({e})", hint="retry later") from e
        try:
            yield db
            db.execute("COMMIT")
        except SkillgraftError:
            db.execute("ROLLBACK")
            raise
        except (sqlite3.OperationalError, OSError) as e:  # disk full while writing the index or the journal
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise WriteError(
                f"{self.root}: cannot write the library index ({e})",
                hint="free some space and retry; the library is unchanged",
            ) from e
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Library:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- queries ------------------------------------------------------------------------------------
    def _select(self, where: str = "", args: Iterable = ()) -> builtins.list[SkillRecord]:
        sql = f"SELECT {COLUMNS} FROM skills {where} ORDER BY name, version"
        try:
            return [_record(r) for r in self.db.execute(sql, tuple(args))]
        except sqlite3.DatabaseError as e:
            raise LibraryError(f"{self.root / 'index.sqlite'}: the library index is damaged ({e})", hint=REINDEX) from e

    def list(self, base: str | Path | None = None) -> builtins.list[SkillRecord]:
        """Every stored skill version, by name then version; with ``base``, only those made against that model
        directory (same content fingerprint)."""
        if base is None:
            return self._select()
        from skillgraft.io.checkpoint import Checkpoint
        from skillgraft.skill.fingerprint import fingerprint_checkpoint

        with Checkpoint(base) as ckpt:
            fp = fingerprint_checkpoint(ckpt).content
        return self._select("WHERE base_fingerprint = ?", (fp,))

    def get(self, ref: str) -> SkillRecord:
        """The record a reference names: ``name@3`` is version 3, ``name`` (or ``name@latest``) the latest."""
        r = parse_ref(ref)
        if r.version is None:
            rows = self._select("WHERE name = ?", (r.name,))
            if rows:
                return rows[-1]
        else:
            rows = self._select("WHERE name = ? AND version = ?", (r.name, r.version))
            if rows:
                return rows[0]
        raise self._not_found(r)

    def _not_found(self, r: SkillRef) -> NotFoundError:
        versions = [
            v for (v,) in self.db.execute("SELECT version FROM skills WHERE name = ? ORDER BY version", (r.name,))
        ]
        if versions:
            return NotFoundError(
                f"skill {r.name!r} has no version {r.version} in the library",
                hint=f"stored versions: {', '.join(map(str, versions))}",
            )
        names = [n for (n,) in self.db.execute("SELECT DISTINCT name FROM skills")]
        close = difflib.get_close_matches(r.name, names, n=3, cutoff=0.6)
        hint = (
            "did you mean " + " or ".join(repr(c) for c in close) + "?"
            if close
            else "see `skillgraft library list`, or give a path to a .skill file"
        )
        return NotFoundError(f"no skill {str(r)!r} in the library ({self.root})", hint=hint)

    def path(self, ref: str) -> Path:
        """The blob file of a reference (raises LibraryError when the index points at a missing blob)."""
        rec = self.get(ref)
        p = self.blobs.path(rec.sha256)
        if not p.is_file():
            raise LibraryError(
                f"{rec.ref}: its stored file {p} is missing",
                hint="run `skillgraft library verify`, then re-add it",
            )
        return p

    def search(self, query: str) -> builtins.list[SkillRecord]:
        """Records whose name, a tag or the description contains ``query`` (case-insensitive)."""
        q = query.casefold()
        return [
            r
            for r in self._select()
            if q in r.name.casefold() or q in r.description.casefold() or any(q in t.casefold() for t in r.tags)
        ]

    # -- changes ------------------------------------------------------------------------------------
    def add(
        self,
        path: str | Path,
        name: str | None = None,
        version: int | None = None,
        tags: Iterable[str] = (),
        replace: bool = False,
    ) -> SkillRecord:
        """Store a ``.skill`` file and index it as ``name@version``; returns its record.

        The file must be a valid skill pack. ``name`` defaults to the manifest's name; tags are the manifest's
        tags plus ``tags``. Version rule:

        * ``version`` given: use it. If that version holds identical content, nothing changes; if it holds
          other content, raise OutputExistsError unless ``replace`` (then the row is overwritten).
        * ``version`` None: if identical content is already stored under ``name`` (any version), nothing
          changes and that record is returned. Otherwise the manifest's version is used when free, else the
          next free number (highest stored version + 1). With ``replace``, the manifest's version is
          overwritten instead.

        Adding is safe from several processes at once: versions are picked inside one write transaction.
        """
        from skillgraft.skill.pack import SkillPack, validate_name

        source = Path(path).expanduser()
        with SkillPack(source) as pack:
            manifest = pack.manifest
        name = validate_name(manifest.name if name is None else name)
        if version is not None:
            check_version(version)
        all_tags = tuple(sorted({*manifest.tags, *(_check_tag(t) for t in tags)}))
        tmp, sha, size = self.blobs.stage(source)
        try:
            with self._write() as db:
                existing, target = self._choose_version(name, version, max(1, manifest.version), sha, replace)
                if existing is not None:
                    return existing
                self.blobs.commit(tmp, sha)
                old = self._select("WHERE name = ? AND version = ?", (name, target))
                db.execute("DELETE FROM skills WHERE name = ? AND version = ?", (name, target))
                base = manifest.base
                values = (
                    name,
                    target,
                    sha,
                    size,
                    json.dumps(all_tags),
                    manifest.description,
                    base.name or "",
                    base.fingerprint,
                    base.structure,
                    _now(),
                )
                db.execute(f"INSERT INTO skills ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", values)
                append_journal(self.root, {"op": "add", "row": dict(zip(COLUMN_NAMES, values))})
                for rec in old:
                    self._drop_blob_if_unused(rec.sha256)
        finally:
            self.blobs.discard(tmp)
        return self.get(f"{name}@{target}")

    def _choose_version(
        self, name: str, version: int | None, manifest_version: int, sha: str, replace: bool
    ) -> tuple[SkillRecord | None, int]:
        """``(existing record, version)``: an existing record means the add is a no-op (see :meth:`add`)."""
        rows = self._select("WHERE name = ?", (name,))
        if version is None and not replace:
            same = [r for r in rows if r.sha256 == sha]
            if same:
                return same[-1], same[-1].version
        want = manifest_version if version is None else version
        taken = next((r for r in rows if r.version == want), None)
        if taken is None or replace:
            return (taken if taken is not None and taken.sha256 == sha else None), want
        if taken.sha256 == sha:
            return taken, want
        if version is not None:
            raise OutputExistsError(
                f"{name}@{want} is already in the library with different content",
                hint="pass --replace to overwrite it, or leave out --version to take the next free one",
            )
        return None, max(r.version for r in rows) + 1

    def _drop_blob_if_unused(self, sha256: str) -> None:
        """Delete a blob no row uses; call inside a write transaction so no add can race it."""
        (uses,) = self.db.execute("SELECT COUNT(*) FROM skills WHERE sha256 = ?", (sha256,)).fetchone()
        if uses == 0:
            self.blobs.remove(sha256)

    def rm(self, ref: str) -> SkillRecord:
        """Remove one version (``name`` alone means the latest); its blob goes when no other row uses it."""
        with self._write() as db:
            rec = self.get(ref)
            db.execute("DELETE FROM skills WHERE name = ? AND version = ?", (rec.name, rec.version))
            append_journal(self.root, {"op": "rm", "name": rec.name, "version": rec.version})
            self._drop_blob_if_unused(rec.sha256)
        return rec

    def reindex(self) -> ReindexReport:
        """Rebuild the SQLite index from the journal and the stored files (see ``library/reindex.py``)."""
        from skillgraft.library.reindex import rebuild_index

        self.close()
        self.root.mkdir(parents=True, exist_ok=True)
        return rebuild_index(self.root, self.blobs.root)

    def verify(self, progress: ProgressFn = no_progress) -> builtins.list[Problem]:
        """Re-hash every blob; report missing or modified blobs (one problem per row) and a bad index."""
        problems: builtins.list[Problem] = []
        try:
            check = [msg for (msg,) in self.db.execute("PRAGMA integrity_check")]
        except sqlite3.DatabaseError as e:
            check = [str(e)]
        if check != ["ok"]:
            detail = "; ".join(check[:3]) + " (run `skillgraft library reindex` to rebuild it)"
            problems.append(Problem("index", "", "", self.root / "index.sqlite", detail))
            return problems
        records = self._select()
        digests: dict[str, str | None] = {}
        for i, rec in enumerate(records):
            blob = self.blobs.path(rec.sha256)
            if rec.sha256 not in digests:
                digests[rec.sha256] = hash_file(blob)[0] if blob.is_file() else None
            actual = digests[rec.sha256]
            if actual is None:
                problems.append(Problem("missing", rec.ref, rec.sha256, blob, "stored file is missing"))
            elif actual != rec.sha256:
                detail = f"stored file was modified (its content hashes to {actual[:12]}…)"
                problems.append(Problem("modified", rec.ref, rec.sha256, blob, detail))
            progress("verify", i + 1, len(records))
        return problems


def _check_tag(tag: str) -> str:
    if not isinstance(tag, str) or not tag.strip() or len(tag) > 64:
        raise InputError(f"invalid tag {tag!r}", hint="tags are non-empty words of at most 64 characters")
    return tag.strip()


def resolve_skill(ref_or_path: str | Path, library: Library | None = None) -> Path:
    """The ``.skill`` file a command argument names: an existing file path, else a library reference.

    A string that looks like a path (ends in ``.skill`` or contains a path separator) never falls back to the
    library, so a mistyped path gets a NotFoundError naming the path.
    """
    text = str(ref_or_path)
    path = Path(text).expanduser()
    looks_like_path = isinstance(ref_or_path, Path) or text.endswith(".skill") or os.sep in text or "/" in text
    if path.is_file() or (looks_like_path and path.exists()):
        return path
    if looks_like_path:
        raise NotFoundError(
            f"{text}: no such skill pack",
            hint="give an existing .skill file, or a library reference such as math@1",
        )
    if library is not None:
        return library.path(text)
    with Library() as lib:
        return lib.path(text)
