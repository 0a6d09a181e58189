"""Every bad input gets a one-line error naming the problem, a non-zero exit code and no output left behind."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import build, leftovers, llama_config, save
from safetensors.torch import load_file, save_file

from skillgraft.cli.main import main


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(("error:", "hint:"))]
    return rc, err, lines


def _assert_clean_error(rc, err, lines, code, text, out):
    assert rc == code, err
    assert lines and lines[0].startswith("error:") and text in lines[0], err
    assert "Traceback" not in err
    assert not out.exists()
    assert not leftovers(out.parent)


@pytest.fixture(scope="module")
def skill(llama_pair, tmp_path_factory):
    base, tuned = llama_pair
    out = tmp_path_factory.mktemp("skill") / "s.skill"
    assert main(["-q", "extract", str(base), str(tuned), "-o", str(out), "--rank", "4"]) == 0
    return out


def test_fingerprint_mismatch_then_force(capsys, skill, other_base, tmp_path):
    out = tmp_path / "m"
    rc, err, lines = run(capsys, "apply", other_base, skill, "-o", out)
    _assert_clean_error(rc, err, lines, 5, "made for another base", out)
    assert any(line.startswith("hint:") and "--force" in line for line in lines)
    assert main(["-q", "apply", str(other_base), str(skill), "-o", str(out), "--force"]) == 0
    assert out.is_dir()


def test_extra_and_missing_tensors(capsys, llama_pair, tmp_path):
    base, tuned = llama_pair
    for case in ("extra", "missing"):
        bad = tmp_path / case
        shutil.copytree(tuned, bad)
        sd = load_file(str(bad / "model.safetensors"))
        if case == "extra":
            sd["model.extra.weight"] = torch.zeros(3)
        else:
            sd.pop("model.norm.weight")
        save_file(sd, str(bad / "model.safetensors"))
        out = tmp_path / f"{case}.skill"
        rc, err, lines = run(capsys, "extract", base, bad, "-o", out)
        _assert_clean_error(rc, err, lines, 5, "tensor", out)
        assert ("fine-tuned model lacks" in lines[0]) == (case == "missing")


def test_shape_mismatch(capsys, skill, tmp_path):
    wider = save(build(llama_config(hidden_size=96, intermediate_size=128)), tmp_path / "wider")
    out = tmp_path / "m"
    rc, err, lines = run(capsys, "apply", wider, skill, "-o", out, "--force")
    _assert_clean_error(rc, err, lines, 5, "shape", out)


def test_vocab_resize_refused(capsys, llama_pair, tmp_path):
    base, _ = llama_pair
    m = build(llama_config())
    m.resize_token_embeddings(130)
    big = save(m, tmp_path / "big")
    out = tmp_path / "v.skill"
    rc, err, lines = run(capsys, "extract", base, big, "-o", out)
    _assert_clean_error(rc, err, lines, 7, "vocabulary resized", out)


def test_nan_in_delta(capsys, llama_pair, tmp_path):
    base, tuned = llama_pair
    bad = tmp_path / "nan"
    shutil.copytree(tuned, bad)
    sd = load_file(str(bad / "model.safetensors"))
    sd["model.norm.weight"][3] = float("nan")
    save_file(sd, str(bad / "model.safetensors"))
    out = tmp_path / "n.skill"
    rc, err, lines = run(capsys, "extract", base, bad, "-o", out, "--dense")
    _assert_clean_error(rc, err, lines, 6, "NaN", out)


def test_nan_in_a_pack_stops_apply(capsys, skill, llama_pair, tmp_path):
    from safetensors import safe_open

    base, _ = llama_pair
    with safe_open(str(skill), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    key = sorted(k for k in tensors if k.endswith("::up"))[0]
    tensors[key][0, 0] = float("nan")
    bad = tmp_path / "nan.skill"
    save_file(tensors, str(bad), metadata=meta)
    out = tmp_path / "m"
    rc, err, lines = run(capsys, "apply", base, bad, "-o", out)
    _assert_clean_error(rc, err, lines, 6, "NaN or Inf", out)
    rc, err, lines = run(capsys, "apply", base, f"{skill}:inf", "-o", out)
    _assert_clean_error(rc, err, lines, 2, "weight", out)


def test_truncated_checkpoint_and_pack(capsys, llama_pair, skill, tmp_path):
    base, tuned = llama_pair
    bad = tmp_path / "trunc"
    shutil.copytree(tuned, bad)
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    out = tmp_path / "t.skill"
    rc, err, lines = run(capsys, "extract", base, bad, "-o", out)
    _assert_clean_error(rc, err, lines, 4, "truncated", out)
    tskill = tmp_path / "trunc.skill"
    tskill.write_bytes(skill.read_bytes()[:-50])
    out = tmp_path / "m"
    rc, err, lines = run(capsys, "apply", base, tskill, "-o", out)
    _assert_clean_error(rc, err, lines, 4, "truncated", out)


def test_not_a_skill_pack(capsys, llama_pair, tmp_path):
    base, tuned = llama_pair
    out = tmp_path / "m"
    rc, err, lines = run(capsys, "apply", base, tuned / "model.safetensors", "-o", out)
    _assert_clean_error(rc, err, lines, 4, "not a skill pack", out)
    rc, err, lines = run(capsys, "apply", base, tuned / "config.json", "-o", out)
    _assert_clean_error(rc, err, lines, 4, "not a safetensors file", out)


def test_pickle_checkpoint_needs_explicit_flag(capsys, llama_pair, tmp_path):
    base, tuned = llama_pair
    pk = tmp_path / "pickled"
    pk.mkdir()
    shutil.copy(tuned / "config.json", pk / "config.json")
    torch.save(load_file(str(tuned / "model.safetensors")), pk / "pytorch_model.bin")
    out = tmp_path / "p.skill"
    rc, err, lines = run(capsys, "extract", base, pk, "-o", out)
    _assert_clean_error(rc, err, lines, 4, "pickle", out)
    assert any("--allow-pickle" in line for line in lines)
    assert main(["-q", "extract", str(base), str(pk), "-o", str(out), "--dense", "--allow-pickle"]) == 0
    assert out.exists()


def test_unknown_library_reference(capsys, llama_pair, tmp_path):
    base, _ = llama_pair
    out = tmp_path / "m"
    rc, err, lines = run(capsys, "apply", base, "nosuchskill@3", "-o", out, "--library", tmp_path / "lib")
    _assert_clean_error(rc, err, lines, 3, "nosuchskill", out)


@pytest.mark.parametrize("name", ["a/b", "..", "x..y"])
def test_bad_skill_names(capsys, llama_pair, tmp_path, name):
    base, tuned = llama_pair
    out = tmp_path / "n.skill"
    rc, err, lines = run(capsys, "extract", base, tuned, "-o", out, "--name", name)
    _assert_clean_error(rc, err, lines, 2, "invalid skill name", out)


def test_output_exists(capsys, llama_pair, skill, tmp_path):
    base, tuned = llama_pair
    out = tmp_path / "exists.skill"
    out.write_text("keep me")
    rc, err, lines = run(capsys, "extract", base, tuned, "-o", out)
    assert rc == 8 and "already exists" in lines[0] and out.read_text() == "keep me"
    assert main(["-q", "extract", str(base), str(tuned), "-o", str(out), "--overwrite", "--rank", "2"]) == 0
    outdir = tmp_path / "model"
    outdir.mkdir()
    rc, err, lines = run(capsys, "apply", base, skill, "-o", outdir)
    assert rc == 8 and "already exists" in lines[0]


def test_bad_options(capsys, llama_pair, tmp_path):
    base, tuned = llama_pair
    out = tmp_path / "o.skill"
    for args, text in [
        (["--budget", "150%"], "outside (0, 1]"),
        (["--budget", "lots"], "cannot read"),
        (["--rank", "4", "--density", "0.1"], "choose one"),
        (["--density", "0"], "outside (0, 1]"),
    ]:
        rc, err, lines = run(capsys, "extract", base, tuned, "-o", out, *args)
        _assert_clean_error(rc, err, lines, 2, text, out)


def test_interrupted_apply_leaves_nothing(monkeypatch, skill, llama_pair, tmp_path):
    from skillgraft.skill import pack as pack_mod

    base, _ = llama_pair
    calls = {"n": 0}
    real = pack_mod.SkillPack.delta

    def flaky(self, name, check_finite=True):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, name, check_finite)

    monkeypatch.setattr(pack_mod.SkillPack, "delta", flaky)
    out = tmp_path / "m"
    assert main(["-q", "apply", str(base), str(skill), "-o", str(out)]) == 130
    assert not out.exists() and not leftovers(tmp_path)


def test_missing_paths(capsys, llama_pair, tmp_path):
    base, _ = llama_pair
    out = tmp_path / "x.skill"
    rc, err, lines = run(capsys, "extract", tmp_path / "nope", base, "-o", out)
    _assert_clean_error(rc, err, lines, 3, "no such model directory", out)


def _resave_pack(src, dst, change):
    import json

    from skillgraft.skill.pack import MANIFEST_KEY, SkillPack

    with SkillPack(src) as p:
        meta = json.loads(p.manifest.to_json())
    change(meta)
    save_file(load_file(str(src)), str(dst), metadata={MANIFEST_KEY: json.dumps(meta), "format": "pt"})
    return dst


def test_pack_without_base_fingerprint_applies_with_a_warning(capsys, skill, llama_pair, tmp_path):
    bare = _resave_pack(skill, tmp_path / "bare.skill", lambda m: m["base"].update(fingerprint=None, structure=None))
    out = tmp_path / "out"
    assert main(["-q", "apply", str(llama_pair[0]), str(bare), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "records no base fingerprint" in err and out.is_dir()
    cfg = tmp_path / "m.yaml"
    cfg.write_text(f"merge_method: task_arithmetic\nbase_model: {llama_pair[0]}\nmodels:\n  - model: {bare}\n")
    assert main(["-q", "merge", str(cfg), "-o", str(tmp_path / "merged")]) == 0
    assert "records no base fingerprint" in capsys.readouterr().err
    assert main(["-q", "apply", str(llama_pair[0]), str(skill), "-o", str(tmp_path / "out2")]) == 0
    assert "warning:" not in capsys.readouterr().err  # a pack with a fingerprint: checked, nothing to say


def test_tokenizer_fingerprint_is_compared(capsys, llama_pair, tmp_path):
    base, tuned = (shutil.copytree(p, tmp_path / p.name) for p in llama_pair)
    for d in (base, tuned):
        (d / "tokenizer.json").write_text('{"model": {"vocab": {"a": 0}}}')
    pack = tmp_path / "s.skill"
    assert main(["-q", "extract", str(base), str(tuned), "-o", str(pack), "--rank", "2"]) == 0
    (base / "tokenizer.json").write_text('{"model": {"vocab": {"b": 0}}}')  # same weights, other vocabulary
    out = tmp_path / "out"
    rc, err, lines = run(capsys, "apply", base, pack, "-o", out)
    _assert_clean_error(rc, err, lines, 5, "another tokenizer", out)
    assert any(line.startswith("hint:") and "--force" in line for line in lines)
    assert main(["-q", "apply", str(base), str(pack), "-o", str(out), "--force"]) == 0


def test_dry_run_validates_every_value(capsys, llama_pair, tmp_path):
    for params, text in (("lambda: .inf", "'lambda' must be finite"), ("density: .nan", "'density' must be finite")):
        method = "task_arithmetic" if "lambda" in params else "ties"
        cfg = tmp_path / "m.yaml"
        cfg.write_text(
            f"merge_method: {method}\nbase_model: {llama_pair[0]}\nmodels:\n  - model: {llama_pair[1]}\n"
            f"parameters:\n  {params}\n"
        )
        out = tmp_path / "out"
        for extra in (["--dry-run"], []):
            rc, err, lines = run(capsys, "merge", cfg, "-o", out, *extra)
            _assert_clean_error(rc, err, lines, 2, text, out)


def test_generate_refuses_dlf_with_alpha_and_non_finite_alpha(capsys, llama_pair, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n')
    base, tuned = llama_pair
    for expert, method, text in (
        (f"{tuned}:{base}:0.5", "dlf", "dlf chooses α at every step"),
        (f"{tuned}:{base}:inf", "proxy", "finite"),
        (f"{tuned}:{base}:nan", "eft", "finite"),
    ):
        rc = main(["generate", "--base", str(base), "--expert", expert, "--method", method, "--prompts", str(prompts)])
        err = capsys.readouterr().err
        assert rc == 2 and text in err and "Traceback" not in err, err
