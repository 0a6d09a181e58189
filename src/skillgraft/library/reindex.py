"""Rebuild a library's SQLite index from what survives a damaged one: the journal and the stored blobs.

The journal (``journal.jsonl``) holds every add and rm with the row it wrote, so names given with ``--name``,
versions and extra tags come back as they were. A blob the journal does not name (a library made before the
journal existed, or a damaged journal line) is indexed under its manifest's name and version (the next free
version when that one is taken). Rows whose blob is missing or no longer hashes to its name are dropped and
reported. The new index is written to a temporary file and renamed over the old one, which is kept beside it
as ``index.sqlite.damaged-<time>``. Run it while no other skillgraft process uses the library.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from skillgraft.errors import SkillgraftError
from skillgraft.library.blobs import BLOB_SUFFIX, hash_file


@dataclass
class ReindexReport:
    """What ``Library.reindex`` restored and dropped."""

    from_journal: list[str] = field(default_factory=list)  # refs restored from the journal
    from_blobs: list[str] = field(default_factory=list)  # refs rebuilt from a blob's own manifest
    dropped: list[str] = field(default_factory=list)  # "ref: why" for journal rows that could not be kept
    kept_old: str | None = None  # where the damaged index was moved

    def to_dict(self) -> dict:
        return {
            "from_journal": self.from_journal,
            "from_blobs": self.from_blobs,
            "dropped": self.dropped,
            "damaged_index_kept_at": self.kept_old,
        }


def _replay(journal: Path) -> dict[tuple[str, int], dict]:
    rows: dict[tuple[str, int], dict] = {}
    if not journal.exists():
        return rows
    for line in journal.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            e = json.loads(line)
            if e["op"] == "add":
                row = e["row"]
                rows[(str(row["name"]), int(row["version"]))] = row
            elif e["op"] == "rm":
                rows.pop((str(e["name"]), int(e["version"])), None)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue  # a torn last line (killed mid-append) or damage: the blobs still cover it
    return rows


def rebuild_index(root: Path, blobs_root: Path) -> ReindexReport:
    from skillgraft.library.store import COLUMN_NAMES, COLUMNS, JOURNAL, SCHEMA, _now
    from skillgraft.skill.pack import SkillPack

    report = ReindexReport()
    digests: dict[str, str] = {}
    for blob in sorted(blobs_root.glob(f"*/*{BLOB_SUFFIX}")):
        sha = blob.name.removesuffix(BLOB_SUFFIX)
        actual, _ = hash_file(blob)
        if actual == sha:
            digests[sha] = str(blob)
    rows: dict[tuple[str, int], dict] = {}
    for key, row in sorted(_replay(root / JOURNAL).items()):
        if row.get("sha256") in digests:
            rows[key] = row
            report.from_journal.append(f"{key[0]}@{key[1]}")
        else:
            report.dropped.append(f"{key[0]}@{key[1]}: its stored file is missing or modified")
    used = {r["sha256"] for r in rows.values()}
    for sha, blob in sorted(digests.items()):
        if sha in used:
            continue
        try:
            with SkillPack(blob) as pack:
                m = pack.manifest
        except SkillgraftError as e:
            report.dropped.append(f"{blob}: not a readable skill pack ({e.message})")
            continue
        version = max(1, m.version)
        while (m.name, version) in rows:
            version += 1
        rows[(m.name, version)] = {
            "name": m.name,
            "version": version,
            "sha256": sha,
            "size": Path(blob).stat().st_size,
            "tags": json.dumps(sorted(m.tags)),
            "description": m.description,
            "base_name": m.base.name or "",
            "base_fingerprint": m.base.fingerprint,
            "base_structure": m.base.structure,
            "created": _now(),
        }
        report.from_blobs.append(f"{m.name}@{version}")
    fd, tmp_name = tempfile.mkstemp(prefix=".index-", suffix=".sqlite", dir=root)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        conn = sqlite3.connect(tmp, isolation_level=None)
        conn.executescript("BEGIN;" + SCHEMA + "COMMIT;")
        conn.execute("BEGIN")
        for row in rows.values():
            marks = ", ".join("?" * len(COLUMN_NAMES))
            conn.execute(f"INSERT INTO skills ({COLUMNS}) VALUES ({marks})", [row.get(c) for c in COLUMN_NAMES])
        conn.execute("COMMIT")
        conn.close()
        index = root / "index.sqlite"
        if index.exists():
            kept = root / f"index.sqlite.damaged-{time.strftime('%Y%m%dT%H%M%S')}"
            os.replace(index, kept)
            report.kept_old = str(kept)
        for side in ("-wal", "-shm"):  # the old index's write-ahead log must not be replayed into the new one
            (root / f"index.sqlite{side}").unlink(missing_ok=True)
        os.replace(tmp, index)
    finally:
        tmp.unlink(missing_ok=True)
    return report
