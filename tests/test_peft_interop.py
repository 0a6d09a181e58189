"""PEFT LoRA interop: import-lora reproduces merge_and_unload exactly, export-lora round-trips through peft.

Adapters are made with peft on tiny Llama / GPT-2 checkpoints (lora_B randomised: peft zero-initialises it).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import peft
import pytest
import torch
from conftest import leftovers, load, logits

from skillgraft import apply, apply_to_checkpoint
from skillgraft.cli.main import main
from skillgraft.errors import MismatchError, UnsupportedError
from skillgraft.skill.encoding import encode_dense
from skillgraft.skill.pack import BaseIdentity, Manifest, PackWriter, SkillPack
from skillgraft.skill.peft import export_lora, import_lora

CASES = {
    "plain": (
        "llama",
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"]),
    ),
    "rslora": ("llama", dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["k_proj", "up_proj"])),
    "patterns": (
        "llama",
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "o_proj", "gate_proj"],
            rank_pattern={"q_proj": 2, r"layers\.1\.mlp\.gate_proj": 6},
            alpha_pattern={"o_proj": 3},
        ),
    ),
    "gpt2_fan_in_fan_out": ("gpt2", dict(r=4, lora_alpha=16, target_modules=["c_attn"], fan_in_fan_out=True)),
}


def make_adapter(base: Path, out: Path, seed: int = 0, **lora_kw):
    """A peft model with random (non-zero) LoRA factors on ``base``, saved to ``out``; returns the model."""
    model = peft.get_peft_model(load(base), peft.LoraConfig(**lora_kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    model.save_pretrained(out)
    return model.eval()


def merged_deltas(model, base: Path) -> dict[str, torch.Tensor]:
    merged = copy.deepcopy(model).merge_and_unload().state_dict()
    ref = load(base).state_dict()
    return {k: merged[k] - ref[k] for k in ref}


@pytest.fixture(scope="module")
def bases(llama_pair, gpt2_pair) -> dict[str, Path]:
    return {"llama": llama_pair[0], "gpt2": gpt2_pair[0]}


@pytest.mark.parametrize("case", list(CASES))
def test_import_matches_merge_and_export_round_trips(case, bases, tmp_path):
    arch, lora_kw = CASES[case]
    base = bases[arch]
    model = make_adapter(base, tmp_path / "adapter", **lora_kw)
    manifest = import_lora(tmp_path / "adapter", tmp_path / "a.skill", base=base)
    assert manifest.base.fingerprint is not None and manifest.source["r"] == lora_kw["r"]
    expected = merged_deltas(model, base)
    with SkillPack(tmp_path / "a.skill") as pack:
        assert pack.names and all(pack.manifest.tensors[n]["encoding"] == "lowrank" for n in pack.names)
        for name in pack.names:
            torch.testing.assert_close(pack.delta(name), expected[name], rtol=1e-5, atol=1e-6)
        untouched = [k for k, d in expected.items() if k not in pack.names and d.abs().max() > 0]
    assert untouched == [] or arch == "llama" and set(untouched) == {"lm_head.weight"}  # tied to embed_tokens
    if case == "gpt2_fan_in_fan_out":
        assert all(e["layout"] == "fan_in_fan_out" for e in manifest.tensors.values())

    # apply (written checkpoint and in place) gives the same logits as peft's merge_and_unload()
    merged_model = copy.deepcopy(model).merge_and_unload().eval()
    apply_to_checkpoint(base, [(tmp_path / "a.skill", 1.0)], tmp_path / "applied")
    torch.testing.assert_close(logits(load(tmp_path / "applied")), logits(merged_model), rtol=1e-5, atol=1e-5)
    in_place = load(base)
    apply(in_place, [tmp_path / "a.skill"])
    torch.testing.assert_close(logits(in_place), logits(merged_model), rtol=1e-5, atol=1e-5)

    report = export_lora(tmp_path / "a.skill", tmp_path / "exported")
    assert report.max_rel_error == 0.0 and report.dropped == ()
    reloaded = peft.PeftModel.from_pretrained(load(base), tmp_path / "exported").eval()
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=1e-4, atol=1e-5)


def test_rank_pattern_is_resolved_like_peft(bases, tmp_path):
    arch, lora_kw = CASES["patterns"]
    make_adapter(bases[arch], tmp_path / "adapter", **lora_kw)
    manifest = import_lora(tmp_path / "adapter", tmp_path / "a.skill")  # no base: name from the config
    ranks = {n: e["rank"] for n, e in manifest.tensors.items()}
    assert ranks["model.layers.0.self_attn.q_proj.weight"] == 2
    assert ranks["model.layers.1.mlp.gate_proj.weight"] == 6
    assert ranks["model.layers.0.mlp.gate_proj.weight"] == 4
    assert manifest.tensors["model.layers.0.self_attn.o_proj.weight"]["lora_scale"] == pytest.approx(3 / 4)
    assert manifest.base.fingerprint is None
    report = export_lora(tmp_path / "a.skill", tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 4 and cfg["rank_pattern"] == cfg["alpha_pattern"]
    assert {m.module: m.rank for m in report.modules}["model.layers.1.mlp.gate_proj"] == 6


def _dense_pack(base: Path, path: Path) -> dict[str, torch.Tensor]:
    ref = load(base).state_dict()
    g = torch.Generator().manual_seed(5)
    names = [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "model.norm.weight",
    ]
    deltas = {}
    writer = PackWriter(path)
    for n in names:
        shape = ref[n].shape
        d = 0.01 * torch.randn(shape, generator=g)
        if len(shape) == 2:
            d += 0.05 * torch.randn(shape[0], 3, generator=g) @ torch.randn(3, shape[1], generator=g)
        parts, fields = encode_dense(d, None, None)
        writer.add(n, parts, {**fields, "shape": list(shape), "dtype": "float32", "rel_error": 0.0})
        deltas[n] = d
    writer.close(Manifest(name="dense", version=1, base=BaseIdentity("tiny", None, None), tensors={}))
    return deltas


def test_dense_export_reports_truncation_error(bases, tmp_path):
    deltas = _dense_pack(bases["llama"], tmp_path / "d.skill")
    with pytest.raises(UnsupportedError, match="model.norm.weight"):
        export_lora(tmp_path / "d.skill", tmp_path / "out", rank=4)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    report = export_lora(tmp_path / "d.skill", tmp_path / "out", rank=4, drop_unrepresentable=True)
    assert report.dropped == ("model.norm.weight",)
    errors = {m.module + ".weight": m.rel_error for m in report.modules}
    assert set(errors) == {n for n in deltas if n != "model.norm.weight"}
    model = peft.PeftModel.from_pretrained(load(bases["llama"]), tmp_path / "out")
    got = merged_deltas(model, bases["llama"])
    for name, err in errors.items():
        assert 0.01 < err < 0.9
        actual = (torch.linalg.norm(got[name] - deltas[name]) / torch.linalg.norm(deltas[name])).item()
        assert actual == pytest.approx(err, abs=1e-4)


def _cli_refusal(args: list[str], capsys) -> tuple[int, list[str]]:
    capsys.readouterr()
    rc = main(args)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return rc, lines


@pytest.mark.parametrize(
    ("lora_kw", "feature"),
    [(dict(use_dora=True), "DoRA"), (dict(bias="all"), "LoRA bias")],
)
def test_variants_refused_by_name(lora_kw, feature, bases, tmp_path, capsys):
    make_adapter(bases["llama"], tmp_path / "adapter", r=4, target_modules=["q_proj"], **lora_kw)
    out = tmp_path / "x.skill"
    rc, lines = _cli_refusal(["import-lora", str(tmp_path / "adapter"), "-o", str(out)], capsys)
    assert rc == UnsupportedError.exit_code
    assert lines[0].startswith("error: ") and feature in lines[0] and len(lines) <= 2
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.fixture(scope="module")
def plain_adapter(bases, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plain") / "adapter"
    make_adapter(bases["llama"], out, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return out


@pytest.mark.parametrize(
    ("change", "feature"),
    [
        ({"peft_type": "LOHA"}, "LOHA"),
        ({"use_qalora": True}, "QA-LoRA"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"init_lora_weights": "pissa"}, "pissa"),
        ({"alora_invocation_tokens": [1, 2]}, "activated LoRA"),
    ],
)
def test_config_variants_refused(change, feature, plain_adapter, tmp_path):
    adapter = shutil.copytree(plain_adapter, tmp_path / "adapter")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(UnsupportedError, match=feature):
        import_lora(adapter, tmp_path / "x.skill")
    assert not (tmp_path / "x.skill").exists()


def test_magnitude_vector_key_refused(plain_adapter, tmp_path):
    adapter = shutil.copytree(plain_adapter, tmp_path / "adapter")
    sd = {"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(64)}
    from safetensors.torch import load_file, save_file

    save_file({**load_file(adapter / "adapter_model.safetensors"), **sd}, adapter / "adapter_model.safetensors")
    with pytest.raises(UnsupportedError, match="DoRA"):
        import_lora(adapter, tmp_path / "x.skill")


def test_pickle_adapter_needs_opt_in(plain_adapter, tmp_path, capsys):
    from safetensors.torch import load_file

    adapter = shutil.copytree(plain_adapter, tmp_path / "adapter")
    torch.save(load_file(adapter / "adapter_model.safetensors"), adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    out = tmp_path / "p.skill"
    rc, lines = _cli_refusal(["import-lora", str(adapter), "-o", str(out)], capsys)
    assert rc == 4 and "pickle" in lines[0] and not out.exists()
    assert main(["import-lora", str(adapter), "-o", str(out), "--allow-pickle", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tensors"] == 4
    with SkillPack(out) as a:
        import_lora(plain_adapter, tmp_path / "s.skill")
        with SkillPack(tmp_path / "s.skill") as b:
            for n in a.names:
                assert torch.equal(a.delta(n), b.delta(n))


def test_base_shape_mismatch_names_tensor(plain_adapter, bases, tmp_path):
    with pytest.raises(MismatchError, match="q_proj"):
        import_lora(plain_adapter, tmp_path / "x.skill", base=bases["gpt2"])


def test_cli_export_json_and_overwrite(plain_adapter, tmp_path, capsys):
    assert main(["import-lora", str(plain_adapter), "-o", str(tmp_path / "a.skill"), "--name", "qv"]) == 0
    assert "exact" in capsys.readouterr().out
    args = ["export-lora", str(tmp_path / "a.skill"), "-o", str(tmp_path / "out"), "--rank", "2", "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert {m["rank"] for m in report["modules"]} == {2} and 0 < report["max_rel_error"] < 1
    rc, lines = _cli_refusal(args, capsys)
    assert rc == 8 and "already exists" in lines[0]
    assert main([*args, "--overwrite"]) == 0


@pytest.mark.parametrize(("alpha", "stored"), [(8, torch.bfloat16), (5, torch.float32)])
def test_bf16_factors_stay_exact(alpha, stored):
    from skillgraft.skill.peft import LoraModule

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 6, generator=g).bfloat16(), torch.randn(5, 4, generator=g).bfloat16()
    m = LoraModule("x", "linear", a, b, alpha / 4, fan_in_fan_out=False)
    up, down = m.factors()
    assert up.dtype == down.dtype == stored and torch.equal(down.float(), a.float())
    torch.testing.assert_close(up.float() @ down.float(), (b.float() @ a.float()) * alpha / 4)


@pytest.mark.parametrize(
    "change",
    [
        {"lora_alpha": "16"},
        {"r": "4"},
        {"r": 0},
        {"lora_alpha": float("nan")},
        {"use_rslora": "yes"},
        {"rank_pattern": {"q_proj": "2"}},
        {"alpha_pattern": []},
    ],
    ids=lambda c: next(iter(c)) + "=" + repr(next(iter(c.values()))),
)
def test_config_with_wrong_types_is_refused(change, plain_adapter, tmp_path, capsys):
    adapter = shutil.copytree(plain_adapter, tmp_path / "adapter")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
    out = tmp_path / "x.skill"
    rc = main(["import-lora", str(adapter), "-o", str(out)])
    err = capsys.readouterr().err
    key = next(iter(change))
    assert rc == 4 and f"error: adapter_config.json: {key} must be" in err and "Traceback" not in err, err
    assert not out.exists()


def test_adapter_tokenizer_differing_from_the_base_is_refused(plain_adapter, bases, tmp_path, capsys):
    adapter = shutil.copytree(plain_adapter, tmp_path / "adapter")
    base = shutil.copytree(bases["llama"], tmp_path / "base")
    (base / "tokenizer.json").write_text('{"model": {"vocab": {"a": 0}}}')
    (adapter / "tokenizer.json").write_text('{"model": {"vocab": {"a": 0, "<pad>": 1}}}')  # trainer added a token
    out = tmp_path / "x.skill"
    rc = main(["import-lora", str(adapter), "-o", str(out), "--base", str(base)])
    err = capsys.readouterr().err
    assert rc == 5 and "error: the adapter's tokenizer files" in err and "--force" in err and not out.exists(), err
    assert main(["-q", "import-lora", str(adapter), "-o", str(out), "--base", str(base), "--force"]) == 0
    (adapter / "tokenizer.json").write_text((base / "tokenizer.json").read_text())  # the same files: fine
    assert main(["-q", "import-lora", str(adapter), "-o", str(out), "--base", str(base), "--overwrite"]) == 0
    with SkillPack(out) as p:
        assert p.manifest.base.tokenizer is not None
