"""The base fingerprint detects a different base: names, shapes, dtypes and content."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from skillgraft.io.checkpoint import Checkpoint
from skillgraft.skill.fingerprint import fingerprint_checkpoint, fingerprint_state, model_state


def _fp(tmp_path, tensors, name="m"):
    d = tmp_path / name
    d.mkdir()
    save_file(tensors, str(d / "model.safetensors"))
    with Checkpoint(d) as c:
        return fingerprint_checkpoint(c)


def test_detects_each_kind_of_difference(tmp_path):
    g = torch.Generator().manual_seed(0)
    ref = {"a.weight": torch.randn(4, 3, generator=g), "b.weight": torch.randn(5, generator=g)}
    base = _fp(tmp_path, ref, "ref")
    assert _fp(tmp_path, {k: v.clone() for k, v in ref.items()}, "same") == base
    renamed = {"a.weight": ref["a.weight"], "c.weight": ref["b.weight"]}
    reshaped = {"a.weight": ref["a.weight"].reshape(3, 4), "b.weight": ref["b.weight"]}
    recast = {"a.weight": ref["a.weight"].double(), "b.weight": ref["b.weight"]}
    one_bit = {k: v.clone() for k, v in ref.items()}
    one_bit["b.weight"][2] = torch.nextafter(one_bit["b.weight"][2], torch.tensor(10.0))
    for i, variant in enumerate([renamed, reshaped, recast]):
        fp = _fp(tmp_path, variant, f"v{i}")
        assert fp.structure != base.structure and fp.content != base.content
    fp = _fp(tmp_path, one_bit, "bit")
    assert fp.structure == base.structure and fp.content != base.content


def test_independent_of_sharding_and_matches_in_memory(tmp_path, llama_pair):
    from conftest import load

    base, _ = llama_pair
    model = load(base)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    with Checkpoint(base) as a, Checkpoint(tmp_path / "sharded") as b:
        fa, fb = fingerprint_checkpoint(a), fingerprint_checkpoint(b)
    assert fa == fb
    assert fingerprint_state(model_state(model)) == fa
    assert "lm_head.weight" not in model_state(model)  # tied alias dropped, as save_pretrained does
