"""``export vllm``: each exported adapter, loaded by peft on the base, equals the skill applied; serve.sh is right."""

from __future__ import annotations

import copy
import json
import os
import stat
import subprocess

import peft
import pytest
import torch
from conftest import build, finetune_like, leftovers, llama_config, save

from skillgraft.cli.main import main
from skillgraft.errors import InputError, NotFoundError, OutputExistsError
from skillgraft.library import Library
from skillgraft.route.vllm import VLLM_MAX_LORA_RANKS, export_vllm, vllm_rank
from skillgraft.skill.apply import apply
from skillgraft.skill.extract import ExtractSpec, extract
from skillgraft.skill.peft import import_lora

FAKE_VLLM = '#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n'  # prints its argv, one per line


def _adapter(model, out, seed, **kw):
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(out)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A library with LoRA skills a (rank 4) and b (rank 8, o_proj 12), dense d, and c made for another base."""
    root = tmp_path_factory.mktemp("vllm")
    base = build(llama_config(), seed=3)
    base_dir = save(base, root / "base")
    other = build(llama_config(), seed=4)
    other_dir = save(other, root / "other")
    specs = [
        ("a", base, base_dir, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
        (
            "b",
            base,
            base_dir,
            dict(r=8, lora_alpha=4, target_modules=["k_proj", "o_proj"], rank_pattern={"o_proj": 12}),
        ),
        ("c", other, other_dir, dict(r=4, lora_alpha=4, target_modules=["q_proj"])),
    ]
    lib_dir = root / "lib"
    with Library(lib_dir) as lib:
        for name, model, model_dir, kw in specs:
            _adapter(model, root / f"{name}-adapter", seed=len(name) + ord(name), **kw)
            import_lora(root / f"{name}-adapter", root / f"{name}.skill", base=model_dir)
            lib.add(root / f"{name}.skill")
        tuned = copy.deepcopy(base)
        finetune_like(tuned, seed=5, scale=0.3)
        extract(ExtractSpec(base=base_dir, tuned=save(tuned, root / "tuned"), out=root / "d.skill", dense=True))
        lib.add(root / "d.skill")
        records = {r.name: r for r in lib.list()}
    return base.eval(), base_dir, lib_dir, records, root


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _fake_vllm_path(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "vllm").write_text(FAKE_VLLM)
    (bin_dir / "vllm").chmod(0o755)
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}"


def test_rank_rounds_up_to_a_value_vllm_accepts():
    assert [vllm_rank(r) for r in (1, 8, 9, 12, 64, 65, 300, 512)] == [8, 8, 16, 16, 64, 128, 320, 512]
    assert set(VLLM_MAX_LORA_RANKS) == {8, 16, 32, 64, 128, 256, 320, 512}


def test_export_adapters_equal_the_applied_skills(setup, tmp_path):
    base, base_dir, lib_dir, records, _ = setup
    out = tmp_path / "vllm"
    result = export_vllm(lib_dir, out, base=base_dir)
    assert [a.name for a in result.adapters] == ["a", "b"]
    skipped = {s.ref: s.reason for s in result.skipped}
    assert set(skipped) == {"c@1", "d@1"}
    assert "another base" in skipped["c@1"] and "not LoRA-form" in skipped["d@1"]
    assert [a.rank for a in result.adapters] == [4, 12] and result.max_lora_rank == 16 and result.max_loras == 2
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "a", "b", "serve.sh", "skills.json"]
    assert leftovers(tmp_path) == []

    ids = torch.randint(0, base.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    for name in "ab":
        assert sorted(p.name for p in (out / name).iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
        served = peft.PeftModel.from_pretrained(copy.deepcopy(base), out / name).eval()
        applied = copy.deepcopy(base)
        apply(applied, [(name, 1.0)], library=lib_dir)
        got, want = _logits(served, ids), _logits(applied, ids)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
        assert not torch.allclose(want, _logits(base, ids), atol=1e-3)  # the skill changes the output

    index = json.loads((out / "skills.json").read_text())
    assert index["base_fingerprint"] == records["a"].base_fingerprint and index["max_lora_rank"] == 16
    by_name = {s["name"]: s for s in index["skills"]}
    assert by_name["a"] == {
        "name": "a",
        "version": 1,
        "ref": "a@1",
        "sha256": records["a"].sha256,
        "rank": 4,
        "target_modules": ["down_proj", "q_proj", "v_proj"],
        "adapter_dir": "a",
    }
    assert by_name["b"]["target_modules"] == ["k_proj", "o_proj"] and by_name["b"]["rank"] == 12
    assert {s["ref"] for s in index["skipped"]} == {"c@1", "d@1"}
    readme = (out / "README.md").read_text()
    assert '"model": "<name>"' in readme and "`a`" in readme and "d@1" in readme


def test_serve_script_runs_the_command_for_every_adapter(setup, tmp_path):
    _, base_dir, lib_dir, _, _ = setup
    out = tmp_path / "vllm"
    result = export_vllm(lib_dir, out, base=base_dir, max_loras=1)
    script = out / "serve.sh"
    assert script.stat().st_mode & stat.S_IXUSR
    subprocess.run(["sh", "-n", str(script)], check=True)
    env = {**os.environ, "PATH": _fake_vllm_path(tmp_path)}
    env.pop("BASE_MODEL", None)
    ran = subprocess.run([str(script), "--port", "8001"], env=env, capture_output=True, text=True, check=True)
    argv = ran.stdout.splitlines()
    expect = ["serve", str(base_dir.resolve()), "--enable-lora", "--max-lora-rank", "16", "--max-loras", "1"]
    expect += ["--max-cpu-loras", "2"]  # one GPU slot, both adapters cached
    expect += ["--lora-modules", f"a={out.resolve()}/a", f"b={out.resolve()}/b", "--port", "8001"]
    assert argv == expect
    assert list(result.command) == ["vllm", *expect[:-2]]
    # moved elsewhere, the script finds its adapters next to itself; BASE_MODEL overrides the base path
    moved = tmp_path / "moved"
    out.rename(moved)
    env["BASE_MODEL"] = "org/base"
    argv = subprocess.run([str(moved / "serve.sh")], env=env, capture_output=True, text=True, check=True)
    assert argv.stdout.splitlines()[1] == "org/base" and f"a={moved.resolve()}/a" in argv.stdout.splitlines()


def test_cli_without_base_writes_the_placeholder(setup, tmp_path, capsys):
    _, _, lib_dir, _, _ = setup
    out = tmp_path / "vllm"
    rc = main(["-q", "export", "vllm", "--library", str(lib_dir), "-o", str(out), "-s", "a", "-s", "d", "--json"])
    assert rc == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert [a["name"] for a in report["adapters"]] == ["a"] and report["base"] is None
    assert report["skipped"][0]["ref"] == "d@1" and report["max_lora_rank"] == 8
    assert report["command"].startswith("vllm serve BASE_MODEL --enable-lora --max-lora-rank 8 --max-loras 1")
    env = {**os.environ, "PATH": _fake_vllm_path(tmp_path)}
    env.pop("BASE_MODEL", None)
    ran = subprocess.run([str(out / "serve.sh")], env=env, capture_output=True, text=True)
    assert ran.returncode != 0 and "BASE_MODEL" in ran.stderr  # refuses to start without a base
    assert "BASE_MODEL" in (out / "README.md").read_text()


def _error(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[0].startswith("error: ") and len(lines) <= 2 and all(ln.startswith("hint: ") for ln in lines[1:])
    return lines


def test_bad_input_is_one_error_and_leaves_nothing(setup, tmp_path, capsys):
    _, base_dir, lib_dir, _, root = setup
    out = tmp_path / "vllm"
    missing = tmp_path / "no-lib"
    assert main(["export", "vllm", "--library", str(missing), "-o", str(out)]) == NotFoundError.exit_code
    assert "no skill library" in _error(capsys)[0]
    assert not missing.exists() and not out.exists()

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc = main(["export", "vllm", "--library", str(lib_dir), "-o", str(out), "--base", str(base_dir)])
    assert rc == OutputExistsError.exit_code and "not empty" in _error(capsys)[0]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    fresh = tmp_path / "fresh"
    assert main(["export", "vllm", "--library", str(lib_dir), "-o", str(fresh), "-s", "d"]) == InputError.exit_code
    assert "no skill can be exported" in _error(capsys)[0] and not fresh.exists()
    # the library holds skills for two bases: without --base the export refuses to mix them
    assert main(["export", "vllm", "--library", str(lib_dir), "-o", str(fresh)]) == InputError.exit_code
    assert "different base models" in _error(capsys)[0] and not fresh.exists()
    assert main(["export", "vllm", "--library", str(lib_dir), "-o", str(fresh), "-s", "aa"]) == NotFoundError.exit_code
    assert "did you mean 'a'" in "\n".join(_error(capsys))
    assert leftovers(tmp_path) == []

    rc = main(["-q", "export", "vllm", "--library", str(lib_dir), "-o", str(out), "--base", str(base_dir), "--force"])
    assert rc == 0 and sorted(p.name for p in out.iterdir()) == ["README.md", "a", "b", "serve.sh", "skills.json"]
    assert leftovers(tmp_path) == [] and "wrote" in capsys.readouterr().out
