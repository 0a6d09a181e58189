"""The streaming merge engine end to end on tiny real-architecture checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import build, finetune_like, gpt2_config, leftovers, llama_config, load, logits, save

from skillgraft import ExtractSpec, extract
from skillgraft.cli.main import main
from skillgraft.io.checkpoint import Checkpoint
from skillgraft.merge.config import from_dict
from skillgraft.merge.engine import MergeOptions, merge


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A tiny Llama base (tied embeddings) and two full fine-tunes of it."""
    root = tmp_path_factory.mktemp("family")
    m = build(llama_config())
    base = save(m, root / "base")
    ft = []
    for seed in (11, 12):
        m2 = load(base)
        finetune_like(m2, seed=seed)
        ft.append(save(m2, root / f"ft{seed}"))
    return base, ft[0], ft[1]


def _write(tmp_path: Path, cfg: dict) -> Path:
    p = tmp_path / "merge.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _state(path: Path) -> dict[str, torch.Tensor]:
    with Checkpoint(path) as c:
        return {n: c.get(n) for n in c.names()}


def test_task_arithmetic_mixed_inputs_matches_formula(family, tmp_path):
    base, ft1, ft2 = family
    skill = extract(ExtractSpec(base=base, tuned=ft2, out=tmp_path / "ft2.skill", dense=True)).path
    cfg = from_dict(
        {
            "base": str(base),
            "method": "task_arithmetic",
            "parameters": {"lambda": 0.5},
            "inputs": [{"source": str(ft1), "weight": 1.0}, {"source": str(skill), "weight": -0.5}],
        }
    )
    res = merge(cfg, MergeOptions(out=tmp_path / "out"))
    assert res.merged == res.tensors
    b, t1, t2, out = _state(base), _state(ft1), _state(ft2), _state(tmp_path / "out")
    for n in b:
        expected = b[n] + 0.5 * ((t1[n] - b[n]) - 0.5 * (t2[n] - b[n]))
        torch.testing.assert_close(out[n], expected, rtol=0, atol=1e-6)
    assert load(tmp_path / "out").generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False).shape[1] == 7


def test_single_input_weight_one_reproduces_it(family, tmp_path):
    base, ft1, _ = family
    cfg = from_dict({"base": str(base), "method": "task_arithmetic", "inputs": [str(ft1)]})
    merge(cfg, MergeOptions(out=tmp_path / "out"))
    assert torch.equal(logits(load(tmp_path / "out")), logits(load(ft1)))


def test_out_formats_skill_and_lora(family, tmp_path, capsys):
    base, ft1, ft2 = family
    cfg = from_dict({"base": str(base), "method": "linear", "inputs": [str(ft1), str(ft2)]})
    merge(cfg, MergeOptions(out=tmp_path / "hf"))
    merge(cfg, MergeOptions(out=tmp_path / "m.skill", out_format="skill"))
    from skillgraft import apply_to_checkpoint

    apply_to_checkpoint(base, [(tmp_path / "m.skill", 1.0)], tmp_path / "via_skill")
    assert torch.equal(logits(load(tmp_path / "hf")), logits(load(tmp_path / "via_skill")))
    res = merge(cfg, MergeOptions(out=tmp_path / "lora", out_format="lora", rank=8))
    assert (tmp_path / "lora" / "adapter_config.json").exists()
    assert 0 < res.details["max_rel_error"] < 1 and res.details["dropped"]  # norms cannot be a LoRA
    # the CLI reports the truncation error without --json
    p = _write(tmp_path, {"base": str(base), "method": "linear", "inputs": [str(ft1), str(ft2)]})
    assert main(["merge", str(p), "-o", str(tmp_path / "lora2"), "--out-format", "lora", "--rank", "8"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"largest relative error of the truncated SVD {res.details['max_rel_error']:.3g}" in out
    assert f"dropped (no LoRA holds them): {len(res.details['dropped'])} tensors" in out


def test_dry_run_reads_no_weights(family, tmp_path, capsys, monkeypatch):
    base, ft1, ft2 = family
    p = _write(tmp_path, {"base": str(base), "method": "linear", "inputs": [str(ft1), str(ft2)]})
    from skillgraft.io import safetensors_file

    def boom(self, name):
        raise AssertionError("dry run read a tensor")

    monkeypatch.setattr(safetensors_file.MappedFile, "get", boom)
    assert main(["merge", str(p), "-o", str(tmp_path / "out"), "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["merged_tensors"] == plan["total_tensors"] > 0
    assert plan["expected_output_bytes"] == sum(r["bytes"] for r in plan["tensors"])
    assert not (tmp_path / "out").exists()


def test_dry_run_with_a_skill_pack_reads_no_weights(family, tmp_path, capsys, monkeypatch):
    """A skill pack's base fingerprint hashes every base weight: a dry run skips it and says so."""
    base, ft1, ft2 = family
    skill = extract(ExtractSpec(base=base, tuned=ft2, out=tmp_path / "ft2.skill", rank=2)).path
    p = _write(tmp_path, {"base": str(base), "method": "ties", "inputs": [str(ft1), str(skill)]})
    from skillgraft.io import safetensors_file
    from skillgraft.skill import fingerprint

    def boom(*args, **kwargs):
        raise AssertionError("dry run read a tensor")

    with monkeypatch.context() as m:
        m.setattr(safetensors_file.MappedFile, "get", boom)
        m.setattr(fingerprint, "fingerprint_checkpoint", boom)
        m.setattr("skillgraft.merge.plan.fingerprint_checkpoint", boom)
        assert main(["merge", str(p), "-o", str(tmp_path / "out"), "--dry-run", "--json"]) == 0
        plan = json.loads(capsys.readouterr().out)
        assert plan["fingerprints_not_checked"] == [plan["inputs"][1]["source"]]
        assert main(["merge", str(p), "-o", str(tmp_path / "out"), "--dry-run"]) == 0
        assert "Not checked: that" in " ".join(capsys.readouterr().out.split())
    assert main(["merge", str(p), "-o", str(tmp_path / "out")]) == 0  # the real run checks it (and fits)
    assert not tmp_path.joinpath("out").joinpath("x").exists()


def test_gpt2_merge_loads_and_generates(tmp_path):
    m = build(gpt2_config())
    base = save(m, tmp_path / "base")
    finetune_like(m, seed=5)
    ft = save(m, tmp_path / "ft")
    cfg = from_dict({"base": str(base), "method": "linear", "inputs": [str(ft), str(base)]})
    merge(
        cfg,
        MergeOptions(
            out=tmp_path / "out",
        ),
    )
    merged = load(tmp_path / "out")
    # linear with two inputs of weight 1: the mean of the fine-tune and the base, tensor by tensor (GPT-2's Conv1D
    # weights and the tied lm_head included), and the loaded model decodes like one built from that mean
    want = {k: (a + b) / 2 for (k, a), b in zip(load(ft).state_dict().items(), load(base).state_dict().values())}
    got = merged.state_dict()
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=k)
    ref = build(gpt2_config())
    ref.load_state_dict(want)
    prompt = torch.tensor([[1, 2, 3]])
    out = merged.generate(prompt, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6) and torch.equal(out, ref.eval().generate(prompt, max_new_tokens=3, do_sample=False))
    assert not torch.equal(
        got["transformer.h.0.attn.c_attn.weight"], load(base).state_dict()["transformer.h.0.attn.c_attn.weight"]
    )


def test_out_dtype_bf16(family, tmp_path):
    base, ft1, _ = family
    cfg = from_dict({"base": str(base), "method": "linear", "inputs": [str(ft1)], "out_dtype": "bf16"})
    merge(cfg, MergeOptions(out=tmp_path / "out"))
    assert all(t.dtype == torch.bfloat16 for t in _state(tmp_path / "out").values())
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"


@pytest.mark.parametrize(
    "cfg_change, text",
    [
        ({"method": "tiess"}, "unknown merge method"),
        ({"parameters": {"lambdaa": 1}}, "unknown parameter"),
        ({"inputs": ["nosuch.skill"]}, "no such skill pack"),
        ({"colour": "blue"}, "unsupported key"),
        ({"inputs": [{"source": "x", "weight": "heavy"}]}, "weight must be a finite number"),
    ],
)
def test_bad_configs_fail_before_work(family, tmp_path, capsys, cfg_change, text):
    base, ft1, _ = family
    cfg = {"base": str(base), "method": "task_arithmetic", "inputs": [str(ft1)], **cfg_change}
    p = _write(tmp_path, cfg)
    rc = main(["merge", str(p), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc != 0 and text in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_other_architecture_refused(family, tmp_path, capsys):
    base, _, _ = family
    other = save(build(gpt2_config()), tmp_path / "gpt2")
    p = _write(tmp_path, {"base": str(base), "method": "linear", "inputs": [str(other)]})
    assert main(["merge", str(p), "-o", str(tmp_path / "out")]) == 5
    assert "base" in capsys.readouterr().err


def test_mergekit_yaml_accepted_and_unknown_keys_named(family, tmp_path, capsys):
    base, ft1, ft2 = family
    mk = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "dtype": "float32",
        "models": [
            {"model": str(ft1), "parameters": {"weight": 0.7}},
            {"model": str(ft2), "parameters": {"weight": 0.3}},
        ],
    }
    assert main(["-q", "merge", str(_write(tmp_path, mk)), "-o", str(tmp_path / "out")]) == 0
    b, t1, t2, out = _state(base), _state(ft1), _state(ft2), _state(tmp_path / "out")
    n = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(out[n], b[n] + 0.7 * (t1[n] - b[n]) + 0.3 * (t2[n] - b[n]), rtol=0, atol=1e-6)
    mk["modules"] = {"text_decoder": {}}  # a mergekit key skillgraft does not take: refused by name
    assert main(["merge", str(_write(tmp_path, mk)), "-o", str(tmp_path / "out2")]) == 2
    assert "'modules'" in capsys.readouterr().err


def test_nan_stops_with_tensor_name(family, tmp_path, capsys):
    base, ft1, _ = family
    p = _write(
        tmp_path,
        {
            "base": str(base),
            "method": "task_arithmetic",
            "parameters": {"lambda": 1e38},
            "inputs": [{"source": str(ft1), "weight": 1e38}],
        },
    )
    rc = main(["merge", str(p), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 6 and "NaN or Inf in tensor" in err
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


@pytest.mark.parametrize("direct", [True, False])
def test_full_disk_during_writing(family, tmp_path, capsys, monkeypatch, direct):
    """The output writer's every byte goes through ``direct.write_all``: make the disk fill up after a few."""
    import errno

    from skillgraft.io import direct as direct_io

    base, ft1, ft2 = family
    p = _write(tmp_path, {"base": str(base), "method": "linear", "inputs": [str(ft1), str(ft2)]})
    real = direct_io.write_all
    calls = {"n": 0}

    def full_disk(fd, data):
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(direct_io, "write_all", full_disk)
    monkeypatch.setattr(direct_io.StreamFile, "STAGE", 4096)  # many small writes, so the failure comes mid-file
    if not direct:
        monkeypatch.setattr(direct_io.os, "O_DIRECT", 0, raising=False)
    rc = main(["merge", str(p), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert calls["n"] > 2, "the writer never reached the failing write"
    assert rc == 10 and "disk full" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_ties_whole_model_trim_keeps_density(family, tmp_path):
    base, ft1, _ = family
    cfg = from_dict(
        {
            "base": str(base),
            "method": "ties",
            "inputs": [str(ft1)],
            "parameters": {"density": 0.3, "trim_scope": "global"},
        }
    )
    merge(cfg, MergeOptions(out=tmp_path / "out"))
    b, out = _state(base), _state(tmp_path / "out")
    kept = sum(int((out[n] != b[n]).sum()) for n in b)
    total = sum(t.numel() for t in b.values())
    assert 0.3 <= kept / total < 0.31  # threshold exact to bf16 resolution: at most slightly more than k
    per_tensor = [float((out[n] != b[n]).float().mean()) for n in b if b[n].numel() > 1000]
    assert max(abs(f - 0.3) for f in per_tensor) > 0.01  # a per-tensor trim would keep 30% of every tensor


def test_layer_swap_takes_layers_from_the_named_input(family, tmp_path):
    base, ft1, ft2 = family
    cfg = from_dict(
        {
            "base": str(base),
            "method": "layer_swap",
            "inputs": [str(ft1), str(ft2)],
            "parameters": {"default": 0, "ranges": [{"layers": [1, 2], "input": 1}]},
        }
    )
    merge(cfg, MergeOptions(out=tmp_path / "out"))
    t1, t2, out = _state(ft1), _state(ft2), _state(tmp_path / "out")
    for n in out:
        src = t2 if ".layers.1." in n else t1
        torch.testing.assert_close(out[n], src[n], rtol=0, atol=1e-6, msg=n)


def test_dare_is_reproducible_with_seed(family, tmp_path):
    base, ft1, ft2 = family
    outs = []
    for i, seed in enumerate((3, 3, 4)):
        cfg = from_dict(
            {
                "base": str(base),
                "method": "dare_ties",
                "seed": seed,
                "inputs": [str(ft1), str(ft2)],
                "parameters": {"density": 0.5},
            }
        )
        merge(cfg, MergeOptions(out=tmp_path / f"o{i}"))
        outs.append(_state(tmp_path / f"o{i}"))
    n = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(outs[0][n], outs[1][n]) and not torch.equal(outs[0][n], outs[2][n])


SLICE_CASES = [
    ("linear", {}),
    ("task_arithmetic", {"lambda": 0.7}),
    ("ties", {"density": 0.4}),
    ("ties", {"density": 0.4, "mode": "mergekit"}),
    ("ties", {"density": 0.4, "mode": "mergekit", "tie_break": "position"}),
    ("ties", {"density": 0.3, "trim_scope": "global"}),
    ("magnitude_prune", {"density": 0.5, "mode": "mergekit"}),
    ("dare_linear", {"density": 0.5}),
    ("dare_ties", {"density": 0.5, "mode": "mergekit"}),
    ("breadcrumbs_ties", {"density": 0.8, "gamma": 0.05}),
    ("della", {"density": 0.5, "epsilon": 0.1}),
    ("pcb", {}),
    ("consensus", {"k": 2}),
    ("slerp", {"t": [0.2, 0.8]}),
    ("layer_swap", {"ranges": [{"layers": [1, 2], "input": 1}]}),
    ("model_stock", {"filter_wise": True}),
]


SLICE_IDS = [f"{m}-{'-'.join(map(str, p.values()))}" for m, p in SLICE_CASES]


@pytest.mark.parametrize("method,params", SLICE_CASES, ids=SLICE_IDS)
def test_engine_slices_equal_the_method_on_whole_tensors(family, tmp_path, monkeypatch, method, params):
    """The engine's one loop (tiny slices here, two lanes, reused buffers) gives bit for bit what the method's own
    function gives on each whole tensor — the same weights, per-input generators and whole-model pass — for
    every kind of method (slice methods, whole-tensor methods, randomized, needing the base)."""
    from skillgraft.merge import steps
    from skillgraft.merge.plan import input_rngs, layer_of, plan_merge
    from skillgraft.merge.registry import TensorJob
    from skillgraft.progress import no_progress

    base, ft1, ft2 = family
    cfg = from_dict({"base": str(base), "method": method, "parameters": params, "seed": 5,
           "inputs": [{"source": str(ft1), "weight": 0.6}, {"source": str(ft2), "weight": 0.5}]})  # fmt: skip
    monkeypatch.setattr(steps, "SLICE", 1000)
    monkeypatch.setattr("skillgraft.merge.engine.SLICE", 1000)
    merge(cfg, MergeOptions(out=tmp_path / "sliced", threads=2))
    got, b, fts = _state(tmp_path / "sliced"), _state(base), [_state(ft1), _state(ft2)]
    plan = plan_merge(cfg, MergeOptions(out=None))
    try:
        info, run = plan.method, plan.method.steps
        found = run.model_pass(plan, plan.params, no_progress) if run.model_pass else None
        changed = 0
        for t in plan.tensors:
            b32 = b[t.name].float()
            deltas = torch.stack([f[t.name].float() - b32 if i in t.users else torch.zeros_like(b32)
                                  for i, f in enumerate(fts)])  # fmt: skip
            job = TensorJob(
                t.name, deltas, torch.tensor(cfg.weights_for(t.name)), base=b32 if info.needs_base else None,
                rng=input_rngs(5, t.name, 2) if info.randomized else None, layer=layer_of(t.name),
                num_layers=plan.num_layers, **(found.fields(t.name) if found else {}),
            )  # fmt: skip
            want = (b32 + info.fn(job, plan.params)).to(t.out_dtype) if t.users else b[t.name]
            assert torch.equal(got[t.name], want), t.name
            changed += not torch.equal(got[t.name], b[t.name])
        assert changed > 0
    finally:
        plan.close()


def test_public_api_merge_is_callable_with_a_dict_or_a_yaml_file(family, tmp_path):
    """``skillgraft.merge(config, out)``: the package is callable; a dict and a YAML file give the same model,
    equal to θ₀ + Σ wᵢΔᵢ; a bad config raises before anything is written."""
    import skillgraft
    import skillgraft.merge.engine  # noqa: F401  (importing a submodule must not shadow the callable)
    from skillgraft.errors import InputError

    base, ft1, ft2 = family
    cfg = {"base": str(base), "method": "task_arithmetic", "inputs": [{"source": str(ft1), "weight": 0.7}]}
    events: list[tuple[str, int, int]] = []
    res = skillgraft.merge(cfg, tmp_path / "a", progress=lambda *e: events.append(e))
    assert res.merged == res.tensors and res.out == tmp_path / "a"
    counted = [e for e in events if e[0] == "merge: tensors"]  # the bar's tensors/s
    assert [e[1] for e in counted] == list(range(1, res.tensors + 1)) and counted[-1][2] == res.tensors
    skillgraft.merge(_write(tmp_path, cfg), tmp_path / "b", out_format="hf")
    b, t1, a, y = _state(base), _state(ft1), _state(tmp_path / "a"), _state(tmp_path / "b")
    for n in b:
        assert torch.equal(a[n], y[n]), n
        expected = b[n].float() + 0.7 * (t1[n].float() - b[n].float())
        torch.testing.assert_close(a[n].float(), expected.to(a[n].dtype).float())
    with pytest.raises(InputError, match="density"):
        skillgraft.merge({**cfg, "method": "ties", "parameters": {"density": 1.5}}, tmp_path / "c")
    assert not (tmp_path / "c").exists() and leftovers(tmp_path) == []
