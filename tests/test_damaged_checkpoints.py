"""Damaged or unusual checkpoint directories (issue 15): shard indexes that are not what they claim, shard paths
that leave the model directory, corrupt safetensors headers, and fp8 tensors (a standard safetensors dtype)."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from conftest import leftovers
from safetensors.torch import load_file, save_file

from skillgraft.cli.main import main
from skillgraft.errors import FormatError
from skillgraft.io.checkpoint import Checkpoint
from skillgraft.io.safetensors_file import read_header


def _sharded(src, dst):
    """``src`` (one model.safetensors) re-saved as two shards with an index."""
    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    (dst / "model.safetensors").unlink()
    names = sorted(sd)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    weight_map = {}
    for fname, keys in shards.items():
        save_file({k: sd[k] for k in keys}, str(dst / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in keys})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def _extract_fails(capsys, base, tuned, tmp_path, text):
    out = tmp_path / "x.skill"
    rc = main(["extract", str(base), str(tuned), "-o", str(out), "--rank", "2"])
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert rc == 4 and len(lines) == 1 and text in lines[0] and "Traceback" not in err, err
    assert not out.exists() and not leftovers(tmp_path)


@pytest.mark.parametrize(
    "index,text",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "not a shard index"),
        ('{"weight_map": ["a"]}', "not a shard index"),
        ('{"metadata": {}}', "not a shard index"),
        ('{"weight_map": {"model.norm.weight": 3}}', "not a shard file name"),
    ],
)
def test_malformed_index(capsys, llama_pair, tmp_path, index, text):
    tuned = _sharded(llama_pair[1], tmp_path / "tuned")
    (tuned / "model.safetensors.index.json").write_text(index)
    _extract_fails(capsys, llama_pair[0], tuned, tmp_path, text)


@pytest.mark.parametrize("where", ["../outside.safetensors", "/etc/outside.safetensors", "sub/../../x.safetensors"])
def test_shard_paths_that_leave_the_model_directory(capsys, llama_pair, tmp_path, where):
    tuned = _sharded(llama_pair[1], tmp_path / "models" / "tuned")
    # a real shard exists at the relative target, so only the check stops the read
    shutil.copy(tuned / "model-00001-of-00002.safetensors", tmp_path / "models" / "outside.safetensors")
    idx = json.loads((tuned / "model.safetensors.index.json").read_text())
    first = next(iter(idx["weight_map"]))
    idx["weight_map"][first] = where
    (tuned / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(FormatError, match="outside the model directory"):
        Checkpoint(tuned)
    _extract_fails(capsys, llama_pair[0], tuned, tmp_path / "models", "outside the model directory")


def _raw(path, header, data=b""):
    hb = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + data)
    return path


@pytest.mark.parametrize(
    "header,text",
    [
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]}}, "corrupt header entry"),
        ({"w": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, "corrupt header entry"),
        ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, "negative dimension"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 9]}}, "corrupt header entry"),
        ({"w": {"dtype": "F4", "shape": [2], "data_offsets": [0, 8]}}, "dtype 'F4'"),
        ({"w": "F32"}, "not an object"),
        ({"__metadata__": {"a": 1}, "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, "__metadata__"),
        ({"__metadata__": ["a"], "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, "__metadata__"),
    ],
)
def test_corrupt_headers(tmp_path, header, text):
    with pytest.raises(FormatError, match=text):
        read_header(_raw(tmp_path / "x.safetensors", header, b"\0" * 8))


def _to_fp8(src, dst, dtype):
    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    save_file({k: v.to(dtype) for k, v in sd.items()}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_checkpoints_extract_apply_and_merge(llama_pair, tmp_path, dtype):
    """F8_E4M3 / F8_E5M2 are read (they were refused as a corrupt header); a dense pack reproduces the fp8
    fine-tune's values exactly, and a merge writes fp8 again."""
    base = _to_fp8(llama_pair[0], tmp_path / "base", dtype)
    tuned = _to_fp8(llama_pair[1], tmp_path / "tuned", dtype)
    pack, out = tmp_path / "s.skill", tmp_path / "applied"
    assert main(["-q", "extract", str(base), str(tuned), "-o", str(pack), "--dense"]) == 0
    assert main(["-q", "apply", str(base), str(pack), "-o", str(out)]) == 0
    got, want = load_file(str(out / "model.safetensors")), load_file(str(tuned / "model.safetensors"))
    assert set(got) == set(want)
    for k in want:
        # equal values (fp8 rounds many small weights to ±0, and base + 0 gives +0 where the fine-tune kept -0)
        assert got[k].dtype == dtype and torch.equal(got[k].float(), want[k].float()), k
    cfg = tmp_path / "m.yaml"
    cfg.write_text(
        f"merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {tuned}\n    parameters: {{weight: 0.5}}\n"
    )
    assert main(["-q", "merge", str(cfg), "-o", str(tmp_path / "merged")]) == 0
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    b = load_file(str(base / "model.safetensors"))
    for k in want:
        ref = (0.5 * b[k].float() + 0.5 * want[k].float()).to(dtype)
        assert merged[k].dtype == dtype
        # the merge may compute in another precision than this reference: at most one fp8 step apart
        assert (merged[k].float() - ref.float()).abs().max() <= ref.float().abs().max() * 0.25 + 1e-3, k
