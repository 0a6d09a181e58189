"""Property-based fuzzing of the skill pack and safetensors readers (issue 15): 10,000+ damaged files per run
(4 strategies × 2,500 examples), and reading any of them raises nothing but skillgraft's own error type.

Each damaged file is opened the way every command opens it — ``SkillPack`` (manifest and part checks) then
``delta`` of every tensor (decoding, finite check), or ``read_header`` then ``MappedFile.get`` of every
tensor — so a traceback or a silently wrong decode path anywhere in the readers fails the test.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skillgraft.errors import SkillgraftError
from skillgraft.io.safetensors_file import MappedFile, read_header
from skillgraft.skill.encoding import encode_dense, encode_lowrank, encode_sparse
from skillgraft.skill.pack import MANIFEST_KEY, BaseIdentity, Manifest, PackWriter, SkillPack

EXAMPLES = 2500
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _valid_pack(path: Path) -> bytes:
    g = torch.Generator().manual_seed(0)
    w = PackWriter(path)
    d = torch.randn(6, 5, generator=g)
    for name, (parts, fields) in {
        "a.weight": encode_dense(d, None, None),
        "b.weight": encode_lowrank(torch.randn(6, 2, generator=g), torch.randn(2, 5, generator=g)),
        "c.weight": encode_lowrank(torch.randn(6, 2, generator=g), torch.randn(2, 5, generator=g), int8=True),
        "d.weight": encode_sparse(d, 7),
    }.items():
        w.add(name, parts, {**fields, "shape": [6, 5], "dtype": "float32", "rel_error": 0.0})
    w.close(Manifest(name="fuzz", version=1, base=BaseIdentity("b", None, None), tensors={}, tags=("x",)))
    return path.read_bytes()


@pytest.fixture(scope="module")
def seed_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    pack = _valid_pack(root / "seed.skill")
    with SkillPack(root / "seed.skill") as p:  # the seed itself must read cleanly
        assert len([p.delta(n) for n in p.names]) == 4
    (n,) = struct.unpack("<Q", pack[:8])
    return {"pack": pack, "header": json.loads(pack[8 : 8 + n]), "data": pack[8 + n :], "dir": root}


def _read_all(path: Path) -> None:
    """Open as a pack and decode everything; also read it as a plain safetensors file."""
    try:
        with SkillPack(path) as p:
            for name in p.names:
                p.delta(name)
    except SkillgraftError:
        pass
    try:
        read_header(path)
        f = MappedFile(path)
        try:
            for name in f.tensors:
                f.get(name)
        finally:
            f.close()
    except SkillgraftError:
        pass


def _pack_bytes(header: dict, data: bytes) -> bytes:
    hb = json.dumps(header, allow_nan=True).encode()
    return struct.pack("<Q", len(hb)) + hb + data


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=8,
)


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=8))
def test_byte_flips(seed_files, flips):
    raw = bytearray(seed_files["pack"])
    for pos, x in flips:
        raw[pos % len(raw)] ^= x
    path = seed_files["dir"] / "flip.skill"
    path.write_bytes(bytes(raw))
    _read_all(path)


@FUZZ
@given(cut=st.integers(0, 10**6), tail=st.binary(max_size=64))
def test_truncated_or_extended(seed_files, cut, tail):
    raw = seed_files["pack"]
    path = seed_files["dir"] / "cut.skill"
    path.write_bytes(raw[: cut % (len(raw) + 1)] + tail)
    _read_all(path)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


@FUZZ
@given(data=st.data())
def test_manifest_mutations(seed_files, data):
    header = json.loads(json.dumps(seed_files["header"]))
    manifest = json.loads(header["__metadata__"][MANIFEST_KEY])
    for _ in range(data.draw(st.integers(1, 3))):
        paths = [p for p in _paths(manifest) if p]
        where = data.draw(st.sampled_from(paths))
        parent = manifest
        for k in where[:-1]:
            parent = parent[k]
        if data.draw(st.booleans()) and isinstance(parent, dict):
            del parent[where[-1]]
        else:
            parent[where[-1]] = data.draw(json_values)
    header["__metadata__"][MANIFEST_KEY] = json.dumps(manifest, allow_nan=True)
    path = seed_files["dir"] / "manifest.skill"
    path.write_bytes(_pack_bytes(header, seed_files["data"]))
    _read_all(path)


@FUZZ
@given(data=st.data())
def test_safetensors_header_mutations(seed_files, data):
    header = json.loads(json.dumps(seed_files["header"]))
    names = [k for k in header if k != "__metadata__"]
    for _ in range(data.draw(st.integers(1, 3))):
        name = data.draw(st.sampled_from(names))
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", None]))
        if field is None:
            header[name] = data.draw(json_values)
        elif data.draw(st.booleans()):
            value = data.draw(
                st.sampled_from(["F32", "F16", "BF16", "I8", "I32", "I64", "F8_E4M3", "F8_E5M2", "U8", "BOOL"])
                if field == "dtype"
                else st.lists(st.integers(-4, 64), max_size=3)
            )
            if isinstance(header[name], dict):
                header[name][field] = value
        elif isinstance(header[name], dict):
            header[name][field] = data.draw(json_values)
    path = seed_files["dir"] / "header.skill"
    path.write_bytes(_pack_bytes(header, seed_files["data"]))
    _read_all(path)
