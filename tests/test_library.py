"""Tests of the skill library (``skillgraft.library``) and its ``skillgraft library`` commands.

Packs and base models are built inside the tests from a few small random tensors.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from skillgraft.cli.main import main
from skillgraft.errors import InputError, NotFoundError, OutputExistsError
from skillgraft.io.checkpoint import Checkpoint
from skillgraft.library import Library, SkillRecord, resolve_skill
from skillgraft.skill.encoding import encode_dense
from skillgraft.skill.fingerprint import fingerprint_checkpoint
from skillgraft.skill.pack import BaseIdentity, Manifest, PackWriter

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_pack(
    path: Path,
    name: str = "math",
    version: int = 1,
    seed: int = 0,
    tags: tuple[str, ...] = (),
    description: str = "",
    base_fp: str | None = None,
) -> Path:
    """A tiny valid skill pack: two dense fp32 deltas drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    writer = PackWriter(path)
    for tname, shape in (("layer.0.weight", (4, 3)), ("layer.0.bias", (4,))):
        parts, fields = encode_dense(torch.randn(shape, generator=g), None, None)
        writer.add(tname, parts, {**fields, "shape": list(shape), "dtype": "float32", "rel_error": 0.0})
    base = BaseIdentity(name="tiny-base", fingerprint=base_fp, structure=None)
    manifest = Manifest(name=name, version=version, base=base, tensors={}, description=description, tags=tags)
    writer.close(manifest)
    return path


def make_base(path: Path, seed: int) -> Path:
    path.mkdir()
    g = torch.Generator().manual_seed(seed)
    save_file({"layer.0.weight": torch.randn(4, 3, generator=g)}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "tiny"}))
    return path


@pytest.fixture
def lib(tmp_path: Path) -> Library:
    with Library(tmp_path / "lib") as library:
        yield library


def run_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    rc = main(args)
    out, err = capsys.readouterr()
    return rc, out, err


# -- adding and version rules -----------------------------------------------------------------------
def test_add_stores_blob_and_row(lib: Library, tmp_path: Path) -> None:
    pack = make_pack(tmp_path / "m.skill", tags=("arith",), description="Adds numbers")
    rec = lib.add(pack, tags=["extra"])
    assert isinstance(rec, SkillRecord)
    assert (rec.name, rec.version, rec.tags) == ("math", 1, ("arith", "extra"))
    blob = lib.path("math@1")
    assert blob == lib.root / "blobs" / "sha256" / rec.sha256[:2] / f"{rec.sha256}.skill"
    assert blob.read_bytes() == pack.read_bytes() and rec.size == pack.stat().st_size
    assert json.loads(json.dumps(rec.to_dict()))["ref"] == "math@1"
    mode = lib.db.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_version_rules(lib: Library, tmp_path: Path) -> None:
    a = make_pack(tmp_path / "a.skill", seed=1)
    b = make_pack(tmp_path / "b.skill", seed=2)  # same manifest name@version, other content
    first = lib.add(a)
    assert lib.add(a) == first  # identical content: no-op
    assert lib.add(b).version == 2  # manifest version taken: next free one
    assert lib.add(b).version == 2  # identical to an existing version: no-op
    assert lib.add(a, version=7).version == 7
    assert lib.get("math").version == 7 and lib.get("math@latest").version == 7
    with pytest.raises(OutputExistsError):
        lib.add(b, version=7)
    replaced = lib.add(b, version=7, replace=True)
    assert replaced.sha256 == lib.get("math@2").sha256
    assert lib.add(a, name="algebra").ref == "algebra@1"
    assert [r.ref for r in lib.list()] == ["algebra@1", "math@1", "math@2", "math@7"]
    with pytest.raises(InputError):
        lib.add(a, version=0)


def test_add_refuses_non_pack(lib: Library, tmp_path: Path) -> None:
    from skillgraft.errors import FormatError

    junk = tmp_path / "junk.skill"
    save_file({"x": torch.zeros(2)}, str(junk))
    with pytest.raises(FormatError):
        lib.add(junk)
    assert lib.list() == []
    assert not list(lib.root.rglob("*.skill"))


@pytest.mark.parametrize("bad", ["a/b", "../evil", "a..b", "..", "x/../y"])
def test_bad_names_refused(lib: Library, tmp_path: Path, bad: str) -> None:
    pack = make_pack(tmp_path / "m.skill")
    with pytest.raises(InputError):
        lib.add(pack, name=bad)
    with pytest.raises(InputError):
        lib.get(bad)
    assert lib.list() == []


# -- lookup, search, rm -------------------------------------------------------------------------------
def test_unknown_reference_suggests(lib: Library, tmp_path: Path) -> None:
    lib.add(make_pack(tmp_path / "m.skill"))
    with pytest.raises(NotFoundError) as e:
        lib.get("mathh")
    assert "mathh" in e.value.message and "'math'" in (e.value.hint or "")
    with pytest.raises(NotFoundError) as e:
        lib.get("math@5")
    assert "stored versions: 1" in (e.value.hint or "")
    with pytest.raises(InputError):
        lib.get("math@two")


def test_search_is_case_insensitive_substring(lib: Library, tmp_path: Path) -> None:
    lib.add(make_pack(tmp_path / "1.skill", "math", seed=1, tags=("Arithmetic",)))
    lib.add(make_pack(tmp_path / "2.skill", "poetry", seed=2, description="Writes SONNETS"))
    lib.add(make_pack(tmp_path / "3.skill", "code", seed=3))
    assert [r.name for r in lib.search("arith")] == ["math"]
    assert [r.name for r in lib.search("sonnet")] == ["poetry"]
    assert [r.name for r in lib.search("OD")] == ["code"]
    assert lib.search("nothing") == []


def test_rm_deletes_blob_only_when_unused(lib: Library, tmp_path: Path) -> None:
    pack = make_pack(tmp_path / "m.skill")
    a = lib.add(pack)
    lib.add(pack, name="copy")
    blob = lib.path("math@1")
    assert lib.rm("math").ref == a.ref
    assert blob.exists() and lib.path("copy") == blob
    lib.rm("copy@1")
    assert not blob.exists() and lib.list() == []
    with pytest.raises(NotFoundError):
        lib.rm("copy")


def test_list_by_base(lib: Library, tmp_path: Path) -> None:
    base = make_base(tmp_path / "base", seed=0)
    other = make_base(tmp_path / "other", seed=1)
    with Checkpoint(base) as ckpt:
        fp = fingerprint_checkpoint(ckpt).content
    lib.add(make_pack(tmp_path / "1.skill", "fits", seed=1, base_fp=fp))
    lib.add(make_pack(tmp_path / "2.skill", "elsewhere", seed=2, base_fp="sg1:" + "0" * 32))
    assert [r.name for r in lib.list(base=base)] == ["fits"]
    assert lib.list(base=other) == []
    assert len(lib.list()) == 2


def test_resolve_skill(lib: Library, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pack = make_pack(tmp_path / "m.skill")
    rec = lib.add(pack)
    assert resolve_skill(str(pack), lib) == pack
    assert resolve_skill("math@1", lib) == lib.blobs.path(rec.sha256)
    assert resolve_skill("math", lib) == lib.blobs.path(rec.sha256)
    with pytest.raises(NotFoundError):
        resolve_skill(str(tmp_path / "missing.skill"), lib)
    with pytest.raises(NotFoundError):
        resolve_skill("nope", lib)
    monkeypatch.setenv("SKILLGRAFT_LIBRARY", str(lib.root))  # default library comes from the env
    assert resolve_skill("math") == lib.blobs.path(rec.sha256)
    assert Library().root == lib.root


# -- verify -------------------------------------------------------------------------------------------
def test_verify_detects_modified_and_missing(lib: Library, tmp_path: Path) -> None:
    a = lib.add(make_pack(tmp_path / "a.skill", "alpha", seed=1))
    b = lib.add(make_pack(tmp_path / "b.skill", "beta", seed=2))
    assert lib.verify() == []
    blob_a = lib.blobs.path(a.sha256)
    blob_a.chmod(0o644)
    data = bytearray(blob_a.read_bytes())
    data[-1] ^= 0xFF
    blob_a.write_bytes(bytes(data))
    lib.blobs.path(b.sha256).unlink()
    problems = {p.ref: p.kind for p in lib.verify()}
    assert problems == {"alpha@1": "modified", "beta@1": "missing"}


# -- CLI ----------------------------------------------------------------------------------------------
def test_cli_add_list_show_search_rm(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = str(tmp_path / "lib")
    pack = make_pack(tmp_path / "m.skill", tags=("arith",), description="Adds numbers")
    rc, out, _ = run_cli(["library", "add", str(pack), "--tag", "x", "--library", root], capsys)
    assert rc == 0 and "added math@1" in out
    rc, out, _ = run_cli(["library", "add", str(pack), "--library", root, "--json"], capsys)
    assert rc == 0 and json.loads(out)["added"] is False
    rc, out, _ = run_cli(["library", "list", "--library", root, "--json"], capsys)
    listed = json.loads(out)
    assert rc == 0 and [r["ref"] for r in listed] == ["math@1"] and listed[0]["tags"] == ["arith", "x"]
    rc, out, _ = run_cli(["library", "list", "--library", root], capsys)
    assert rc == 0 and "math@1" in out
    rc, out, _ = run_cli(["library", "show", "math", "--library", root, "--json"], capsys)
    assert rc == 0 and Path(json.loads(out)["path"]).is_file()
    rc, out, _ = run_cli(["library", "show", "math@1", "--library", root], capsys)
    assert rc == 0 and "Adds numbers" in out
    rc, out, _ = run_cli(["library", "search", "ARITH", "--library", root, "--json"], capsys)
    assert rc == 0 and [r["name"] for r in json.loads(out)] == ["math"]
    rc, out, _ = run_cli(["library", "verify", "--library", root], capsys)
    assert rc == 0 and "OK" in out
    rc, out, _ = run_cli(["library", "rm", "math@1", "--library", root], capsys)
    assert rc == 0 and "removed math@1" in out
    rc, out, _ = run_cli(["library", "list", "--library", root, "--json"], capsys)
    assert json.loads(out) == []


def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = str(tmp_path / "lib")
    run_cli(["library", "add", str(make_pack(tmp_path / "m.skill")), "--library", root], capsys)
    rc, _, err = run_cli(["library", "show", "mth", "--library", root], capsys)
    assert rc == NotFoundError.exit_code and "error: no skill 'mth'" in err and "did you mean 'math'" in err
    rc, _, err = run_cli(["library", "rm", "../etc", "--library", root], capsys)
    assert rc == InputError.exit_code and "invalid skill name" in err
    rc, _, err = run_cli(["library", "add", str(tmp_path / "none.skill"), "--library", root], capsys)
    assert rc == NotFoundError.exit_code and "error:" in err


def test_cli_verify_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "lib"
    run_cli(["library", "add", str(make_pack(tmp_path / "m.skill")), "--library", str(root)], capsys)
    next(root.rglob("*.skill")).unlink()
    rc, out, _ = run_cli(["library", "verify", "--library", str(root), "--json"], capsys)
    report = json.loads(out)
    assert rc == 1 and report["ok"] is False and report["problems"][0]["kind"] == "missing"


def test_cli_uses_env_library(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch) -> None:
    monkeypatch.setenv("SKILLGRAFT_LIBRARY", str(tmp_path / "envlib"))
    rc, _, _ = run_cli(["library", "add", str(make_pack(tmp_path / "m.skill"))], capsys)
    assert rc == 0 and (tmp_path / "envlib" / "index.sqlite").is_file()


# -- concurrency --------------------------------------------------------------------------------------
WORKER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from skillgraft.library import Library
    root, go, packs = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    while not go.exists():
        time.sleep(0.005)
    with Library(root) as lib:
        for p in packs:
            lib.add(p)
    """
)


def test_concurrent_adds_from_two_processes(tmp_path: Path) -> None:
    root, go = tmp_path / "lib", tmp_path / "go"
    batches = [
        [str(make_pack(tmp_path / f"p{w}_{i}.skill", f"skill{i}", seed=100 * w + i)) for i in range(10)]
        for w in range(2)
    ]  # both workers use the same ten names, so they also race for version numbers
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(root), str(go), *b], stderr=subprocess.PIPE)
        for b in batches
    ]
    go.touch()
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err.decode()
    with Library(root) as lib:
        records = lib.list()
        assert len(records) == 20
        assert {(r.name, r.version) for r in records} == {(f"skill{i}", v) for i in range(10) for v in (1, 2)}
        assert lib.verify() == []
    conn = sqlite3.connect(root / "index.sqlite")
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()


OPENER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from skillgraft.library import Library
    for root in sys.argv[1:]:
        go = Path(root + ".go")
        while not go.exists():
            time.sleep(0.0005)
        with Library(root) as lib:
            lib.list()
    """
)


def test_four_processes_opening_a_new_library_at_once(tmp_path: Path) -> None:
    # The first opener switches a new index to WAL; SQLite refuses that switch at once (no busy wait)
    # while another process opens the same new file. Before openers retried, ~6% of them failed here.
    roots = [str(tmp_path / f"lib{i}") for i in range(25)]
    procs = [subprocess.Popen([sys.executable, "-c", OPENER, *roots], stderr=subprocess.PIPE) for _ in range(4)]
    time.sleep(1.0)  # the workers are waiting on the first go-file
    for root in roots:
        Path(root + ".go").touch()
        time.sleep(0.05)
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    for root in roots:
        conn = sqlite3.connect(Path(root) / "index.sqlite")
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.close()


def _corrupt(index: Path) -> None:
    with open(index, "r+b") as f:  # keep SQLite's 100-byte header, overwrite the pages after it
        f.seek(100)
        f.write(b"\xff" * 3000)


def test_damaged_index_is_reported_and_reindex_rebuilds_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A corrupted index.sqlite: verify and list say so (exit 9, naming the fix); `library reindex` rebuilds
    it from the journal, keeping names given with --name, versions, extra tags and removals."""
    root = tmp_path / "lib"
    a = make_pack(tmp_path / "a.skill", "alpha", tags=("t",))
    b = make_pack(tmp_path / "b.skill", "beta", seed=1)
    c = make_pack(tmp_path / "c.skill", "gamma", seed=2)
    for args in (
        [a, "--name", "renamed", "--tag", "extra"],
        [b, "--version", "4"],
        [c],
    ):
        assert main(["-q", "library", "add", *map(str, args), "--library", str(root)]) == 0
    assert main(["-q", "library", "rm", "gamma", "--library", str(root)]) == 0
    with Library(root) as lib:
        before = {r.ref: (r.sha256, r.tags) for r in lib.list()}
    assert set(before) == {"renamed@1", "beta@4"}
    _corrupt(root / "index.sqlite")
    for cmd in ("verify", "list"):
        rc, _, err = run_cli(["library", cmd, "--library", str(root)], capsys)
        assert rc == 9 and "error:" in err and "library reindex" in err and "Traceback" not in err, err
    rc, out, err = run_cli(["library", "reindex", "--library", str(root), "--json"], capsys)
    assert rc == 0, err
    report = json.loads(out)
    assert sorted(report["from_journal"]) == ["beta@4", "renamed@1"] and report["from_blobs"] == []
    assert Path(report["damaged_index_kept_at"]).is_file()
    with Library(root) as lib:
        assert {r.ref: (r.sha256, r.tags) for r in lib.list()} == before
        assert lib.verify() == []


def test_reindex_without_a_journal_uses_the_packs_own_manifests(tmp_path: Path, capsys) -> None:
    root = tmp_path / "lib"
    with Library(root) as lib:
        lib.add(make_pack(tmp_path / "a.skill", "alpha", version=2))
        lib.add(make_pack(tmp_path / "b.skill", "alpha", version=2, seed=1))  # takes alpha@3
    (root / "journal.jsonl").unlink()  # a library from before the journal
    (root / "index.sqlite").unlink()
    rc, out, err = run_cli(["library", "reindex", "--library", str(root), "--json"], capsys)
    assert rc == 0, err
    assert sorted(json.loads(out)["from_blobs"]) == ["alpha@2", "alpha@3"]
    with Library(root) as lib:
        assert [r.ref for r in lib.list()] == ["alpha@2", "alpha@3"] and lib.verify() == []
