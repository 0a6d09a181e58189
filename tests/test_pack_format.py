"""The skill pack file: manifest round trip, and a corpus of broken packs that must all fail cleanly."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from skillgraft.errors import FormatError, NumericError
from skillgraft.skill.encoding import encode_dense, encode_lowrank, encode_sparse
from skillgraft.skill.pack import MANIFEST_KEY, BaseIdentity, Manifest, PackWriter, SkillPack


def _manifest(**kw):
    return Manifest(name="t", version=1, base=BaseIdentity("b", None, None), tensors={}, **kw)


def _write(path, tensors=None):
    tensors = tensors or {"w": torch.randn(8, 6)}
    w = PackWriter(path)
    for name, t in tensors.items():
        parts, fields = encode_dense(t, None, None)
        w.add(name, parts, {**fields, "shape": list(t.shape), "dtype": "float32", "rel_error": 0.0})
    w.close(_manifest(tags=("a", "b"), description="d"))
    return path


def test_round_trip(tmp_path):
    t = torch.randn(8, 6)
    with SkillPack(_write(tmp_path / "x.skill", {"w": t})) as p:
        assert p.manifest.name == "t" and p.manifest.tags == ("a", "b")
        assert torch.equal(p.delta("w"), t)
        assert p.manifest.tensors["w"]["bytes"] == 8 * 6 * 4


def test_encodings_decode_to_their_approximation():
    d = torch.randn(20, 12)
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    up, down = u[:, :3] * s[:3], vh[:3]
    from skillgraft.skill.encoding import decode

    parts, f = encode_lowrank(up, down, dtype=torch.float32)
    torch.testing.assert_close(decode({**f, "shape": [20, 12]}, parts.__getitem__), up @ down)
    parts, f = encode_lowrank(up, down, int8=True)
    approx = decode({**f, "shape": [20, 12]}, parts.__getitem__)
    assert (approx - up @ down).norm() / (up @ down).norm() < 0.02
    parts, f = encode_sparse(d, 10)
    got = decode({**f, "shape": [20, 12]}, parts.__getitem__)
    assert (got != 0).sum() == 10
    kept = got.abs()[got != 0].min()
    assert (d.abs() > kept + 1e-3).sum() <= 10  # the largest magnitudes are the ones kept


def _raw_safetensors(path, header: dict, data: bytes = b""):
    hb = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + data)
    return path


BROKEN = {
    "empty": lambda p: p.write_bytes(b""),
    "random_bytes": lambda p: p.write_bytes(b"\x00\x01garbage" * 10),
    "huge_header_len": lambda p: p.write_bytes(struct.pack("<Q", 2**40) + b"{}"),
    "bad_json": lambda p: p.write_bytes(struct.pack("<Q", 5) + b"{not}"),
    "no_manifest": lambda p: save_file({"w": torch.zeros(2)}, str(p)),
    "wrong_format_key": lambda p: save_file(
        {"w": torch.zeros(2)}, str(p), metadata={MANIFEST_KEY: json.dumps({"format": "other"})}
    ),
    "manifest_not_json": lambda p: save_file({"w": torch.zeros(2)}, str(p), metadata={MANIFEST_KEY: "{"}),
    "future_version": lambda p: save_file(
        {"w": torch.zeros(2)},
        str(p),
        metadata={MANIFEST_KEY: json.dumps({"format": "skillgraft.skill", "format_version": 99})},
    ),
    "offsets_outside_file": lambda p: _raw_safetensors(
        p, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8
    ),
    "wrong_length": lambda p: _raw_safetensors(
        p, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, b"\0" * 16
    ),
}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_broken_packs_fail_cleanly(tmp_path, kind):
    p = tmp_path / f"{kind}.skill"
    BROKEN[kind](p)
    with pytest.raises(FormatError):
        SkillPack(p)


def test_truncated_pack(tmp_path):
    p = _write(tmp_path / "x.skill")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 10])
    with pytest.raises(FormatError, match="truncated"):
        SkillPack(p)


def test_missing_part(tmp_path):
    good = _write(tmp_path / "x.skill")
    with SkillPack(good) as pk:
        meta = json.loads(pk.manifest.to_json())
    meta["tensors"]["w"].update(encoding="lowrank", rank=2, quant=None)  # claims parts that are not stored
    save_file({"w::dense": torch.zeros(8, 6)}, str(tmp_path / "y.skill"), metadata={MANIFEST_KEY: json.dumps(meta)})
    with pytest.raises(FormatError, match="lacks its stored part"):
        SkillPack(tmp_path / "y.skill")


def test_nan_in_stored_delta_is_refused_on_read(tmp_path):
    good = _write(tmp_path / "x.skill")
    with SkillPack(good) as pk:
        meta = pk.manifest.to_json()
    bad = torch.zeros(8, 6)
    bad[1, 2] = float("nan")
    save_file({"w::dense": bad}, str(tmp_path / "nan.skill"), metadata={MANIFEST_KEY: meta})
    with SkillPack(tmp_path / "nan.skill") as pk, pytest.raises(NumericError, match="NaN"):
        pk.delta("w")


def test_writer_refuses_nan_and_leaves_nothing(tmp_path):
    w = PackWriter(tmp_path / "x.skill")
    with pytest.raises(NumericError):
        w.add("w", {"dense": torch.tensor([float("inf")])}, {"encoding": "dense", "shape": [1]})
    w.abort()
    assert list(tmp_path.iterdir()) == []
