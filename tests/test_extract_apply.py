"""Extract → apply reproduces the fine-tune: exactly for dense packs, within the stated error otherwise."""

from __future__ import annotations

import pytest
import torch
from conftest import build, leftovers, llama_config, load, logits

from skillgraft import ExtractSpec, SkillPack, apply, apply_to_checkpoint, extract, unapply
from skillgraft.io.checkpoint import Checkpoint


def _extract(pair, tmp_path, name="s.skill", **kw):
    base, tuned = pair
    return extract(ExtractSpec(base=base, tuned=tuned, out=tmp_path / name, **kw))


def test_dense_extract_apply_is_exact(llama_pair, tmp_path):
    base, tuned = llama_pair
    res = _extract(llama_pair, tmp_path, dense=True)
    assert all(e["exact"] for e in res.manifest.tensors.values())
    out = apply_to_checkpoint(base, [(res.path, 1.0)], tmp_path / "merged")
    assert out["changed"] == len(res.manifest.tensors)
    with Checkpoint(tuned) as t, Checkpoint(tmp_path / "merged") as m:
        assert t.names() == m.names()
        for n in t.names():
            assert torch.equal(t.get(n), m.get(n)), n
    assert torch.equal(logits(load(tuned)), logits(load(tmp_path / "merged")))


def test_unchanged_tensors_are_omitted(llama_pair, tmp_path):
    res = _extract(llama_pair, tmp_path, dense=True)
    assert not any("layers.1.mlp" in n for n in res.manifest.tensors)
    assert any("layers.0.mlp" in n for n in res.manifest.tensors)


def test_dense_bf16_is_exact_and_compact(llama_pair_bf16, tmp_path):
    base, tuned = llama_pair_bf16
    res = _extract(llama_pair_bf16, tmp_path, dense=True)
    assert all(e["exact"] for e in res.manifest.tensors.values())
    # the smallest exact dtype is chosen: most bf16 deltas fit in 16 bits
    assert res.file_bytes < 1.5 * res.dense_delta_bytes
    apply_to_checkpoint(base, [(res.path, 1.0)], tmp_path / "m")
    with Checkpoint(tuned) as t, Checkpoint(tmp_path / "m") as m:
        assert all(torch.equal(t.get(n), m.get(n)) for n in t.names())


def _weight_errors(base, tuned, merged, manifest):
    with Checkpoint(base) as b, Checkpoint(tuned) as t, Checkpoint(merged) as m:
        for name, entry in manifest.tensors.items():
            delta = t.get(name).float() - b.get(name).float()
            got = m.get(name).float() - b.get(name).float()
            err = (got - delta).norm() / delta.norm()
            yield name, float(err), entry["rel_error"]


def test_budget_pack_within_budget_and_stated_error(llama_pair_bf16, tmp_path):
    base, tuned = llama_pair_bf16
    res = _extract(llama_pair_bf16, tmp_path, budget=0.1)
    assert res.file_bytes == (tmp_path / "s.skill").stat().st_size
    assert res.file_bytes <= res.budget_bytes
    assert {e["encoding"] for e in res.manifest.tensors.values()} & {"lowrank", "sparse"}
    apply_to_checkpoint(base, [(res.path, 1.0)], tmp_path / "m")
    for name, measured, claimed in _weight_errors(base, tuned, tmp_path / "m", res.manifest):
        # the merged weights are rounded to bf16, which adds at most ~one ulp per element
        assert abs(measured - claimed) < 0.02 + 0.02 * claimed, (name, measured, claimed)
    # a budgeted pack moves the base's logits most of the way towards the fine-tune's
    lb, lt, lm = logits(load(base)), logits(load(tuned)), logits(load(tmp_path / "m"))
    assert (lm - lt).norm() < 0.5 * (lb - lt).norm()


def test_budget_allocation_prefers_low_rank_for_low_rank_deltas(llama_pair_bf16, tmp_path):
    res = _extract(llama_pair_bf16, tmp_path, budget=0.1)
    mats = [e for e in res.manifest.tensors.values() if len(e["shape"]) == 2]
    assert sum(e["encoding"] == "lowrank" for e in mats) > len(mats) / 2
    assert res.file_bytes <= res.budget_bytes


def test_rank_density_int8_modes_report_their_error(llama_pair, tmp_path):
    base, tuned = llama_pair
    for i, kw in enumerate([dict(rank=4), dict(density=0.2), dict(rank=4, int8=True)]):
        res = _extract(llama_pair, tmp_path, name=f"m{i}.skill", **kw)
        with SkillPack(res.path) as pack, Checkpoint(base) as b, Checkpoint(tuned) as t:
            for name, entry in pack.manifest.tensors.items():
                delta = t.get(name).float() - b.get(name).float()
                d1, d2 = pack.delta(name), pack.delta(name)
                assert torch.equal(d1, d2)  # decoding is deterministic
                err = float((d1 - delta).norm() / delta.norm())
                assert abs(err - entry["rel_error"]) < 1e-5, (kw, name)
                if entry["encoding"] == "lowrank":
                    assert entry["rank"] == 4
                    assert entry.get("quant") == ("int8" if kw.get("int8") else None)


def test_in_place_apply_unapply_bit_exact(llama_pair, tmp_path):
    base, tuned = llama_pair
    res = _extract(llama_pair, tmp_path, rank=4)
    model = load(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    changed = apply(model, [res.path])
    assert changed and all(not torch.equal(before[n], model.state_dict()[n]) for n in changed)
    # in place equals writing a checkpoint
    apply_to_checkpoint(base, [(res.path, 1.0)], tmp_path / "m")
    assert torch.equal(logits(model), logits(load(tmp_path / "m")))
    unapply(model)
    for k, v in model.state_dict().items():
        assert torch.equal(before[k], v), k


def test_negative_weight_removes_a_skill(llama_pair, tmp_path):
    base, tuned = llama_pair
    res = _extract(llama_pair, tmp_path, dense=True)
    model = load(tuned)
    apply(model, [(res.path, -1.0)], force=True)  # tuned − Δ = base (tuned is not the skill's base)
    ref = load(base)
    for (n, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=n)


def test_two_skills_add(llama_pair, tmp_path):
    base, _ = llama_pair
    res = _extract(llama_pair, tmp_path, dense=True)
    out = apply_to_checkpoint(base, [(res.path, 0.5), (res.path, 0.5)], tmp_path / "m")
    assert out["changed"] > 0
    ref = load(base)
    apply(ref, [res.path])
    torch.testing.assert_close(logits(load(tmp_path / "m")), logits(ref), rtol=1e-5, atol=1e-5)


def test_gpt2_round_trip(gpt2_pair, tmp_path):
    base, tuned = gpt2_pair
    res = _extract(gpt2_pair, tmp_path, dense=True)
    assert res.manifest.tensors["transformer.h.0.attn.c_attn.weight"]["layout"] == "fan_in_fan_out"
    apply_to_checkpoint(base, [(res.path, 1.0)], tmp_path / "m")
    assert torch.equal(logits(load(tuned)), logits(load(tmp_path / "m")))
    assert not leftovers(tmp_path)


def test_sharded_base_and_output(tmp_path):
    from conftest import finetune_like, save

    m = build(llama_config())
    base = save(m, tmp_path / "base", max_shard_size="60KB")
    finetune_like(m)
    tuned = save(m, tmp_path / "tuned", max_shard_size="60KB")
    assert (base / "model.safetensors.index.json").exists()
    res = extract(ExtractSpec(base=base, tuned=tuned, out=tmp_path / "s.skill", dense=True))
    from skillgraft.io.writer import CheckpointWriter

    with (
        Checkpoint(base) as b,
        CheckpointWriter(tmp_path / "copy", max_shard_bytes=60_000, copy_from=base) as w,
    ):
        for n in b.names():
            w.add(n, b.get(n))
    assert (tmp_path / "copy" / "model.safetensors.index.json").exists()
    apply_to_checkpoint(tmp_path / "copy", [(res.path, 1.0)], tmp_path / "m")
    assert torch.equal(logits(load(tuned)), logits(load(tmp_path / "m")))


def test_omitted_tensors_count_as_energy_lost(llama_pair_bf16, tmp_path):
    res = _extract(llama_pair_bf16, tmp_path, budget=0.02)
    assert res.omitted, "a 2% budget on this tiny model omits some matrices"
    omitted = [t for t in res.tensors if t.name in res.omitted]
    assert len(omitted) == len(res.omitted) and all(t.retained == 0 and t.nbytes == 0 for t in omitted)
    total = sum(t.energy for t in res.tensors)
    kept = sum(t.energy * t.retained for t in res.tensors)
    by_kind = res.by_kind()
    assert sum(d["energy"] for d in by_kind.values()) == pytest.approx(total)
    assert kept / total < 1.0
