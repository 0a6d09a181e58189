"""Learned composition: per-block weights in merge configs, the in-memory merge, and ``skillgraft compose``
(blockwise, entropy, search) on the quick SkillBench build: bounded coefficients, a falling objective, a merge YAML
that rebuilds the same model, and bad input refused with nothing written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from skillgraft.cli.main import main
from skillgraft.compose.blocks import REST, Blocks, block_of
from skillgraft.merge.config import from_dict


def test_block_names_and_order():
    assert block_of("model.layers.3.self_attn.q_proj.weight", "block") == "model.layers.3.self_attn"
    assert block_of("model.layers.3.self_attn.q_proj.weight", "layer") == "model.layers.3"
    assert block_of("model.layers.3.mlp.up_proj.weight", "skill") == REST
    assert block_of("model.embed_tokens.weight", "block") == REST
    names = ["model.layers.10.mlp.w", "model.layers.2.mlp.w", "model.layers.2.self_attn.w", "model.norm.weight"]
    b = Blocks.of(names, "block")
    assert b.names == (REST, "model.layers.2.mlp", "model.layers.2.self_attn", "model.layers.10.mlp")
    assert b.index["model.norm.weight"] == 0 and b.index["model.layers.10.mlp.w"] == 3


def test_block_weights_first_match_wins():
    cfg = from_dict(
        {
            "base": "b",
            "method": "task_arithmetic",
            "inputs": [{"source": "x", "weight": 0.5, "blocks": {"m.layers.1.mlp.*": 2.0, "m.layers.1.*": 3.0}}],
        }
    )
    assert cfg.weights_for("m.layers.1.mlp.up.weight") == [2.0]
    assert cfg.weights_for("m.layers.1.self_attn.q.weight") == [3.0]
    assert cfg.weights_for("m.layers.10.mlp.up.weight") == [0.5]  # layer 10 is not layer 1
    with pytest.raises(ValueError, match="finite"):
        from_dict({"base": "b", "method": "linear", "inputs": [{"source": "x", "blocks": {"a*": float("nan")}}]})


def test_block_weights_merge_and_in_memory_merge(llama_pair, tmp_path):
    """θ = θ₀ + w(t)·Δ per tensor, on disk (both engine paths) and in memory, all identical."""
    from skillgraft.merge import merge
    from skillgraft.merge.engine import merge_in_memory

    base, tuned = llama_pair
    d = {
        "base": str(base),
        "method": "task_arithmetic",
        "inputs": [{"source": str(tuned), "weight": 0.25, "blocks": {"model.layers.0.mlp.*": 1.0}}],
    }
    merge(d, tmp_path / "m")
    got = load_file(tmp_path / "m" / "model.safetensors")
    b0, t0 = load_file(base / "model.safetensors"), load_file(tuned / "model.safetensors")
    for name, value in got.items():
        w = 1.0 if name.startswith("model.layers.0.mlp.") else 0.25
        torch.testing.assert_close(value, b0[name] + w * (t0[name] - b0[name]), rtol=0, atol=1e-6)
    mem = merge_in_memory(from_dict(d))
    assert set(mem) == set(got) and all(torch.equal(mem[n], got[n]) for n in got)


# ---------------------------------------------------------------- compose on the quick SkillBench build


def _args(q, out: Path, learn: str, skills=("caesar", "sort"), kind: str = "full", extra=()) -> list[str]:
    args = ["compose", str(q.model_dir("base"))]
    args += [f"{s}={q.model_dir(f'experts/{s}-{kind}')}" for s in skills]
    for s in skills:
        args += ["-d", f"{s}={q.data_path(s, 'train')}"]
    return [*args, "--learn", learn, "-o", str(out), *extra]


def _coefficients(out: Path) -> dict:
    return json.loads((out / "compose.json").read_text())["compose"][0]


@pytest.mark.slow
def test_blockwise_fits_bounded_coefficients_and_yaml_rebuilds_the_model(quick_bench, tmp_path):
    out = tmp_path / "composed"
    extra = ["--examples", "16", "--steps", "12", "--lr", "0.2", "--bounds", "0,1.5", "--init", "0.5"]
    assert main(_args(quick_bench, out, "blockwise", extra=extra)) == 0
    rec = _coefficients(out)
    curve = rec["curve"]
    assert len(curve) == 12 and all(math.isfinite(v) for v in curve)
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3  # the target loss falls
    values = [v for blocks in rec["coefficients"].values() for v in blocks.values()]
    assert all(0.0 <= v <= 1.5 for v in values) and len(set(values)) > 2  # moved, per block, within bounds
    assert rec["examples"] == {"caesar": 16, "sort": 16}
    # the YAML alone rebuilds the same model, bit for bit
    assert main(["merge", str(out / "merge.yaml"), "-o", str(tmp_path / "again")]) == 0
    a, b = load_file(out / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)
    # and compose.json renders as a report with the curve and the coefficients
    from skillgraft.eval.report import load_results, render_html

    assert render_html(load_results(out / "compose.json")).count("data:image/png;base64,") >= 2


@pytest.mark.slow
def test_entropy_and_search_run_without_gradients_to_labels(quick_bench, tmp_path):
    out = tmp_path / "ent"
    assert main(_args(quick_bench, out, "entropy", extra=["--steps", "6", "--gen-tokens", "2"])) == 0
    assert len(_coefficients(out)["curve"]) == 6
    out = tmp_path / "search"
    assert main(_args(quick_bench, out, "search", extra=["--steps", "12", "--examples", "8"])) == 0
    rec = _coefficients(out)
    assert rec["granularity"] == "skill" and all(list(c) == [REST] for c in rec["coefficients"].values())
    cfg = (out / "merge.yaml").read_text()
    assert "blocks" not in cfg and cfg.count("weight:") == 2


@pytest.mark.slow
@pytest.mark.parametrize(
    "case, message",
    [
        ("unknown_skill", "not among the inputs"),
        ("empty", "no examples"),
        ("malformed", ":2: not valid JSON"),
        ("nan", "diverged"),
        ("bounds", "lo < hi"),
    ],
)
def test_bad_input_is_refused_and_nothing_is_written(quick_bench, tmp_path, capsys, case, message):
    q = quick_bench
    out = tmp_path / "out"
    args = _args(q, out, "blockwise", extra=["--steps", "2"])
    if case == "unknown_skill":
        args += ["-d", f"reverse={q.data_path('caesar', 'train')}"]
    elif case in ("empty", "malformed"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text("" if case == "empty" else '{"prompt": "a", "target": "b"}\n{not json\n')
        args[args.index("-d") + 1] = f"caesar={bad}"
    elif case == "bounds":
        args += ["--bounds", "1,0"]
    else:  # an input whose weights overflow: the objective is NaN at the first step
        from transformers import AutoModelForCausalLM

        broken = AutoModelForCausalLM.from_pretrained(q.model_dir("experts/sort-full"))
        with torch.no_grad():
            broken.model.layers[0].mlp.up_proj.weight.fill_(float("inf"))
        broken.save_pretrained(tmp_path / "broken")
        args[3] = f"sort={tmp_path / 'broken'}"
    assert main(args) != 0
    err = capsys.readouterr().err
    assert message in err and "error:" in err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name not in ("bad.jsonl", "broken")) == []


def test_target_loss_weighs_rows_not_tokens():
    """A one-token answer counts as much as a long one: the batch loss is the mean of the rows' own losses."""
    from conftest import build, llama_config

    from skillgraft.bench.train import _batch
    from skillgraft.compose.objective import Composite, target_loss

    model = build(llama_config())
    name = "model.layers.0.mlp.up_proj.weight"
    delta = torch.randn((2, *dict(model.named_parameters())[name].shape), generator=torch.Generator().manual_seed(0))
    comp = Composite(model, {name: 0.1 * delta}, Blocks.of([name], "block"))
    lam = torch.tensor([[0.3, 0.7], [0.5, 0.2]])
    short, long = ([5, 6, 7, 8], 3), ([9, 10, 11, 12, 13, 14, 15, 16, 17, 18], 2)
    both = target_loss(comp, lam, _batch([short, long], 0))
    each = [target_loss(comp, lam, _batch([row], 0)) for row in (short, long)]
    torch.testing.assert_close(both, (each[0] + each[1]) / 2, rtol=1e-5, atol=1e-6)
    assert abs(float(each[0]) - float(each[1])) > 1e-3  # the rows differ, so token weighting would show
