"""Damaged skill packs (issue 15): wrong manifest types, missing fields, bad names, sparse indices and part
shapes that do not fit. Each is a one-line ``error:`` from the CLI, a non-zero exit and nothing written."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import leftovers
from safetensors.torch import load_file, save_file

from skillgraft.cli.main import main
from skillgraft.errors import FormatError
from skillgraft.library import Library
from skillgraft.skill.pack import MANIFEST_KEY, SkillPack


@pytest.fixture(scope="module")
def packs(llama_pair, tmp_path_factory):
    """One pack per encoding from the same (base, tuned) pair: dense, lowrank and sparse entries."""
    base, tuned = llama_pair
    root = tmp_path_factory.mktemp("packs")
    out = {}
    for mode, flags in {"dense": ["--dense"], "lowrank": ["--rank", "4"], "sparse": ["--density", "0.05"]}.items():
        out[mode] = root / f"{mode}.skill"
        assert main(["-q", "extract", str(base), str(tuned), "-o", str(out[mode]), *flags]) == 0
    return out


def _load(path):
    with SkillPack(path) as p:
        meta = json.loads(p.manifest.to_json())
    return load_file(str(path)), meta


def _save(path, tensors, meta):
    save_file(tensors, str(path), metadata={MANIFEST_KEY: json.dumps(meta), "format": "pt"})
    return path


def _entry(meta, encoding):
    return next((k, e) for k, e in meta["tensors"].items() if e["encoding"] == encoding)


def _apply_fails(capsys, base, pack, tmp_path, text, code=4):
    out = tmp_path / "merged"
    rc = main(["apply", str(base), str(pack), "-o", str(out)])
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert rc == code, err
    assert len(lines) == 1 and text in lines[0], err
    assert "Traceback" not in err
    assert not out.exists() and not leftovers(tmp_path)


def test_fixture_packs_have_each_encoding(packs):
    for mode, path in packs.items():
        with SkillPack(path) as p:
            assert any(e["encoding"] == mode for e in p.manifest.tensors.values()), mode


WRONG_TYPES = [
    (("name",), 7, "'name' must be string"),
    (("version",), "1", "'version' must be int >= 1"),
    (("version",), True, "'version' must be int >= 1"),
    (("version",), 0, "'version' must be int >= 1"),
    (("tensors",), [], "'tensors' must be object"),
    (("base",), "llama", "'base' must be object"),
    (("tags",), "a,b", "'tags' must be list of strings"),
    (("evaluations",), [1], "'evaluations' must be list of objects"),
    (("base", "fingerprint"), 12, "'fingerprint' must be string or null"),
    (("base", "name"), None, "'name' must be string"),
    (("entry", "shape"), "64,32", "'shape' must be list of ints >= 0"),
    (("entry", "shape"), [-64, -32], "'shape' must be list of ints >= 0"),
    (("entry", "bytes"), "4096", "'bytes' must be int >= 0"),
    (("entry", "rel_error"), "0", "'rel_error' must be finite number or null"),
    (("entry", "dtype"), 32, "'dtype' must be string"),
    (("entry", "encoding"), "zip", "unknown encoding 'zip'"),
    (("entry",), "dense", "manifest entry must be an object"),
]


@pytest.mark.parametrize("where,value,text", WRONG_TYPES, ids=[f"{'.'.join(w)}={v!r}" for w, v, _ in WRONG_TYPES])
def test_wrong_manifest_types(capsys, packs, llama_pair, tmp_path, where, value, text):
    tensors, meta = _load(packs["dense"])
    if where[0] == "entry":
        name, entry = _entry(meta, "dense")
        if len(where) == 1:
            meta["tensors"][name] = value
        else:
            entry[where[1]] = value
    elif len(where) == 2:
        meta[where[0]][where[1]] = value
    else:
        meta[where[0]] = value
    bad = _save(tmp_path / "x.skill", tensors, meta)
    with pytest.raises(FormatError, match=text.replace("(", r"\(").replace(")", r"\)")):
        SkillPack(bad)
    _apply_fails(capsys, llama_pair[0], bad, tmp_path, text)


@pytest.mark.parametrize(
    "where",
    [
        ("name",),
        ("version",),
        ("base",),
        ("tensors",),
        ("base", "name"),
        ("entry", "shape"),
        ("entry", "dtype"),
        ("entry", "bytes"),
        ("lowrank", "rank"),
        ("sparse", "nnz"),
    ],
)
def test_missing_required_fields(capsys, packs, llama_pair, tmp_path, where):
    mode = where[0] if where[0] in ("lowrank", "sparse") else "dense"
    tensors, meta = _load(packs[mode])
    if where[0] in ("entry", "lowrank", "sparse"):
        _entry(meta, mode)[1].pop(where[1])
    elif len(where) == 2:
        meta[where[0]].pop(where[1])
    else:
        meta.pop(where[0])
    bad = _save(tmp_path / "x.skill", tensors, meta)
    _apply_fails(capsys, llama_pair[0], bad, tmp_path, f"lacks the required field {where[-1]!r}")


def test_unknown_fields_are_ignored(packs, tmp_path):
    tensors, meta = _load(packs["lowrank"])
    meta["future_field"] = {"x": 1}
    meta["base"]["future"] = "y"
    name, entry = _entry(meta, "lowrank")
    entry["future"] = [1, 2]
    with SkillPack(_save(tmp_path / "x.skill", tensors, meta)) as p, SkillPack(packs["lowrank"]) as ref:
        assert torch.equal(p.delta(name), ref.delta(name))


@pytest.mark.parametrize("name", ["../evil", "a/b", "x..y", "", "-lead"])
def test_bad_names_in_manifest(capsys, packs, llama_pair, tmp_path, name):
    tensors, meta = _load(packs["dense"])
    meta["name"] = name
    bad = _save(tmp_path / "x.skill", tensors, meta)
    _apply_fails(capsys, llama_pair[0], bad, tmp_path, "invalid skill name")
    lib = tmp_path / "lib"
    rc = main(["library", "add", str(bad), "--library", str(lib)])
    assert rc == 4, capsys.readouterr().err
    with Library(lib) as library:
        assert library.list() == [] and library.verify() == []


def _sparse_case(packs, tmp_path, change):
    tensors, meta = _load(packs["sparse"])
    name, entry = _entry(meta, "sparse")
    idx = tensors[f"{name}::idx"].clone()
    assert idx.numel() >= 3
    tensors[f"{name}::idx"] = change(idx, entry)
    return _save(tmp_path / "x.skill", tensors, meta), name


SPARSE = {
    "negative": (lambda i, e: torch.cat([torch.tensor([-1], dtype=i.dtype), i[1:]]), "negative"),
    "out of range": (lambda i, e: torch.cat([i[:-1], torch.tensor([10**6], dtype=i.dtype)]), "out of range"),
    "unsorted": (lambda i, e: i.flip(0), "unsorted or duplicated"),
    "duplicated": (lambda i, e: torch.cat([i[:1], i[:-1]]), "unsorted or duplicated"),
}


@pytest.mark.parametrize("case", list(SPARSE))
def test_bad_sparse_indices(capsys, packs, llama_pair, tmp_path, case):
    change, text = SPARSE[case]
    bad, name = _sparse_case(packs, tmp_path, change)
    with SkillPack(bad) as p, pytest.raises(FormatError, match=text):
        p.delta(name)
    _apply_fails(capsys, llama_pair[0], bad, tmp_path, text)


def test_dense_part_stored_transposed(capsys, packs, llama_pair, tmp_path):
    """A [n, m] part for an [m, n] tensor has the right byte count but would decode into the wrong weights."""
    tensors, meta = _load(packs["dense"])
    name = next(
        k
        for k, e in meta["tensors"].items()
        if e["encoding"] == "dense" and e["shape"][0] != e["shape"][-1] and len(e["shape"]) == 2
    )
    tensors[f"{name}::dense"] = tensors[f"{name}::dense"].t().contiguous()
    bad = _save(tmp_path / "x.skill", tensors, meta)
    with pytest.raises(FormatError, match="needs"):
        SkillPack(bad)
    _apply_fails(capsys, llama_pair[0], bad, tmp_path, "needs")


@pytest.mark.parametrize("change", ["rank", "up", "bytes"])
def test_lowrank_parts_that_do_not_fit(capsys, packs, llama_pair, tmp_path, change):
    tensors, meta = _load(packs["lowrank"])
    name, entry = _entry(meta, "lowrank")
    if change == "rank":
        entry["rank"] += 1
    elif change == "up":
        up = tensors[f"{name}::up"]
        tensors[f"{name}::up"] = torch.cat([up, up[:1]])
        entry["bytes"] += up[:1].numel() * up.element_size()
    else:
        entry["bytes"] += 2
    bad = _save(tmp_path / "x.skill", tensors, meta)
    _apply_fails(capsys, llama_pair[0], bad, tmp_path, "bytes" if change == "bytes" else "needs")


def test_user_text_with_rich_markup_is_printed_literally(capsys, llama_pair, tmp_path):
    """Paths, descriptions and tags holding ``[/]`` or ``[bold]`` are user text, not markup (was MarkupError)."""
    base, tuned = llama_pair
    odd = tmp_path / "a[bold]b[/]"
    (odd / "c[/]d").mkdir(parents=True)
    pack = odd / "c[/]d" / "s.skill"
    rc = main(["extract", str(base), str(tuned), "-o", str(pack), "--rank", "2", "--description", "x [/] [bold]y"])
    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["inspect", str(pack)]) == 0
    assert "x [/] [bold]y" in capsys.readouterr().out
    lib = tmp_path / "lib"
    assert main(["library", "add", str(pack), "--tag", "[/]", "--library", str(lib)]) == 0
    assert main(["library", "list", "--library", str(lib)]) == 0
    assert "[/]" in capsys.readouterr().out
    rc = main(["apply", str(base), str(odd / "[red]missing[/].skill"), "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 3 and "[red]missing[/].skill" in err and "Traceback" not in err
