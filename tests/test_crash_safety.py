"""Writes that cannot leave a half-written output: a real subprocess killed with SIGKILL in the middle of
writing, and a file-size limit standing in for a full disk (issue 15). Marked slow: each case starts Python."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time

import pytest
from conftest import build, finetune_like, llama_config, save

from skillgraft.cli.main import main

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-c", "from skillgraft.cli.main import run; run()"]


@pytest.fixture(scope="module")
def big_pair(tmp_path_factory):
    """A ~60 MB fp32 Llama pair: large enough that writing it takes a visible fraction of a second."""
    root = tmp_path_factory.mktemp("big")
    cfg = llama_config(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, vocab_size=4096)
    base = build(cfg, seed=0)
    base_dir = save(base, root / "base")
    finetune_like(base, seed=3)
    return base_dir, save(base, root / "tuned")


def _partials(directory):
    """Non-empty files of a write in progress: ``*.partial`` files, a pack's ``*.data.tmp`` side file, and any
    file inside a ``*.partial`` directory (a checkpoint being written)."""
    found = []
    for p in directory.rglob("*"):
        try:
            in_partial_dir = any(part.endswith(".partial") for part in p.relative_to(directory).parts[:-1])
            if (p.name.endswith((".partial", ".tmp")) or in_partial_dir) and p.is_file() and p.stat().st_size > 0:
                found.append(p)
        except FileNotFoundError:  # renamed away while we looked
            pass
    return found


def _kill_mid_write(argv, watch, env=None):
    """Start the CLI, SIGKILL it as soon as a non-empty temporary file appears under ``watch``."""
    proc = subprocess.Popen([*CLI, *map(str, argv)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    seen = False
    while time.monotonic() < deadline and proc.poll() is None:
        if _partials(watch):
            proc.send_signal(signal.SIGKILL)
            seen = True
            break
        time.sleep(0.002)
    proc.wait()
    assert seen and proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr.read().decode()[-2000:])


def test_sigkill_mid_write_leaves_nothing_under_the_final_name(big_pair, tmp_path, capsys):
    base, tuned = big_pair
    packs, models, lib = tmp_path / "packs", tmp_path / "models", tmp_path / "lib"
    packs.mkdir()
    models.mkdir()
    pack = packs / "s.skill"
    _kill_mid_write(["-q", "extract", base, tuned, "-o", pack, "--dense"], packs)
    assert not pack.exists()
    assert main(["-q", "extract", str(base), str(tuned), "-o", str(pack), "--dense"]) == 0  # leftovers don't block
    merged = models / "merged"
    _kill_mid_write(["-q", "apply", base, pack, "-o", merged], models)
    assert not merged.exists()
    _kill_mid_write(["-q", "library", "add", pack, "--library", lib], lib)
    assert main(["library", "verify", "--library", str(lib)]) == 0
    assert main(["library", "list", "--library", str(lib), "--json"]) == 0
    assert '"ref"' not in capsys.readouterr().out  # the killed add indexed nothing
    assert main(["-q", "library", "add", str(pack), "--library", str(lib)]) == 0
    assert main(["library", "verify", "--library", str(lib)]) == 0


def _limit_file_size(limit):
    def set_limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return set_limit


@pytest.mark.parametrize("command", ["extract", "apply", "export-lora", "library add"])
def test_full_disk_is_a_clean_error_and_leaves_nothing(big_pair, tmp_path, command):
    """RLIMIT_FSIZE makes every write past 4 MB fail (EFBIG), as a full disk fails with ENOSPC."""
    base, tuned = big_pair
    pack = tmp_path / "s.skill"
    assert main(["-q", "extract", str(base), str(tuned), "-o", str(pack), "--rank", "64"]) == 0
    out = tmp_path / "out"
    out.mkdir()
    argv = {
        "extract": ["extract", base, tuned, "-o", out / "x.skill", "--dense"],
        "apply": ["apply", base, pack, "-o", out / "merged"],
        "export-lora": ["export-lora", pack, "-o", out / "adapter", "--drop-unrepresentable"],
        "library add": ["library", "add", out / "x.skill", "--library", out / "lib"],
    }[command]
    if command == "library add":  # a pack bigger than the limit, written before the limit applies
        assert main(["-q", "extract", str(base), str(tuned), "-o", str(out / "x.skill"), "--dense"]) == 0
    before = sorted(p.name for p in out.iterdir())
    res = subprocess.run(
        [*CLI, *map(str, argv)], capture_output=True, text=True, preexec_fn=_limit_file_size(4 << 20), env=os.environ
    )
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.returncode == 10 and len(errors) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "cannot write" in errors[0]
    after = sorted(p.name for p in out.iterdir())
    assert after == before or (command == "library add" and set(after) - set(before) <= {"lib"})
    if command == "library add":
        assert main(["library", "verify", "--library", str(out / "lib")]) == 0
        assert not list((out / "lib").rglob("*.partial"))


def test_library_rm_while_another_process_applies_the_skill(big_pair, tmp_path):
    """The applying process holds the pack open, so removing its library entry mid-apply changes nothing
    in its output; the next apply of the removed reference is a clean not-found error."""
    from safetensors.torch import load_file

    base, tuned = big_pair
    pack, lib = tmp_path / "s.skill", tmp_path / "lib"
    assert main(["-q", "extract", str(base), str(tuned), "-o", str(pack), "--dense"]) == 0
    assert main(["-q", "library", "add", str(pack), "--name", "sk", "--library", str(lib)]) == 0
    ref_out = tmp_path / "ref"
    assert main(["-q", "apply", str(base), str(pack), "-o", str(ref_out)]) == 0
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    proc = subprocess.Popen(
        [*CLI, "-q", "apply", str(base), "sk", "-o", str(out), "--library", str(lib)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not _partials(work):
        time.sleep(0.002)
    assert proc.poll() is None, "apply finished before the rm could race it"
    assert main(["-q", "library", "rm", "sk", "--library", str(lib)]) == 0
    assert proc.wait() == 0, proc.stderr.read().decode()[-2000:]
    got, want = load_file(str(out / "model.safetensors")), load_file(str(ref_out / "model.safetensors"))
    assert all(got[k].equal(want[k]) for k in want)
    argv = [*CLI, "apply", str(base), "sk", "-o", str(tmp_path / "o2"), "--library", str(lib)]
    res = subprocess.run(argv, capture_output=True, text=True)
    assert res.returncode == 3 and "error:" in res.stderr and "Traceback" not in res.stderr, res.stderr
