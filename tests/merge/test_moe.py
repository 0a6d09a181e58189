"""Mixture of experts from dense fine-tunes (``skillgraft moe``, merge/moe/): the Mixtral checkpoint loads and
generates, routes exactly to the dense expert its gates pick, matches mergekit-moe 0.1.5's own outputs tensor for
tensor, and every bad config is one error line with nothing written."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import build, finetune_like, leftovers, llama_config, mergekit_python, save
from make_mergekit_moe import CASES, DATA, digest, load, run_mergekit_moe, tiny_tokenizer, write_inputs

from skillgraft.cli.main import main
from skillgraft.errors import InputError, MismatchError, UnsupportedError
from skillgraft.merge.moe import build_moe, parse_moe_config

META = json.loads((DATA / "meta.json").read_text())
# Gate modes that read prompts; the others draw from the seed.
PROMPTS = {
    "e0": ["solve two plus three", "math equation"],
    "e1": ["write a poem about the sea"],
    "e2": ["def function return", "sort a list"],
}


def _mlp_only_finetune(base_dir: Path, seed: int, out: Path) -> Path:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    finetune_like(m, seed=seed, skip=("self_attn", "norm", "embed"))
    with torch.no_grad():
        for layer in m.model.layers:
            layer.mlp.down_proj.weight[0] = 0  # keep hidden feature 0 out of the MLPs (see `models`)
    return save(m, out)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A tiny fp32 Llama base (with a word-level tokenizer) and three fine-tunes that changed only their MLPs.

    Hidden feature 0 is 3 for every token in every layer's residual stream (embedding column 0 is 3, no
    attention output or MLP writes to it), so a router row ±c·e₀ sends every token to one chosen expert.
    """
    root = tmp_path_factory.mktemp("moe")
    m = build(llama_config())
    with torch.no_grad():
        m.model.embed_tokens.weight[:, 0] = 3.0
        for layer in m.model.layers:
            layer.self_attn.o_proj.weight[0] = 0
            layer.mlp.down_proj.weight[0] = 0
    base = save(m, root / "base")
    tiny_tokenizer().save_pretrained(base)
    dirs = {"base": base}
    for k in range(3):
        dirs[f"e{k}"] = _mlp_only_finetune(base, 10 + k, root / f"e{k}")
    return dirs


def _config(models: dict[str, Path], mode: str = "random", k: int = 1, **top) -> dict:
    experts = [{"source_model": str(models[e]), "positive_prompts": PROMPTS[e]} for e in ("e0", "e1", "e2")]
    return {"base_model": str(models["base"]), "gate_mode": mode, "experts_per_token": k, "experts": experts, **top}


def _write(tmp_path: Path, cfg: dict, name: str = "moe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


# -- the output is a working Mixtral model ----------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["fused", "per_expert"])
def test_loads_as_mixtral_holds_each_experts_mlp_and_generates(models, tmp_path, layout):
    from transformers import LlamaForCausalLM, MixtralForCausalLM

    out = tmp_path / "moe"
    res = build_moe(_config(models, "hidden", k=2), out, layout=layout)
    assert (res.experts, res.layers, res.experts_per_token, res.layout) == (3, 2, 2, layout)
    assert any("power of two" in w for w in res.warnings)
    assert {"tokenizer.json", "tokenizer_config.json", "config.json"} <= {p.name for p in out.iterdir()}
    moe = MixtralForCausalLM.from_pretrained(out).eval()
    assert (moe.config.num_local_experts, moe.config.num_experts_per_tok) == (3, 2)
    base = LlamaForCausalLM.from_pretrained(models["base"])
    for i, layer in enumerate(moe.model.layers):
        assert torch.equal(layer.self_attn.q_proj.weight, base.model.layers[i].self_attn.q_proj.weight)
        for e in range(3):
            dense = LlamaForCausalLM.from_pretrained(models[f"e{e}"]).model.layers[i].mlp
            gate, up = layer.mlp.experts.gate_up_proj[e].chunk(2, dim=0)
            assert torch.equal(gate, dense.gate_proj.weight) and torch.equal(up, dense.up_proj.weight)
            assert torch.equal(layer.mlp.experts.down_proj[e], dense.down_proj.weight)
    rows = moe.model.layers[0].mlp.gate.weight.float()
    assert torch.allclose(rows.norm(dim=-1), torch.ones(3), atol=1e-2)  # hidden gates are unit rows (bf16)
    ids = moe.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=4, do_sample=False)
    assert ids.shape == (1, 7)


def test_mistral_experts_with_an_untied_head(tmp_path):
    from transformers import MistralConfig, MixtralForCausalLM

    cfg = MistralConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=96,
        sliding_window=16,
        tie_word_embeddings=False,
    )
    m = build(cfg)
    base = save(m, tmp_path / "base")
    experts = []
    for k in range(2):
        finetune_like(m, seed=20 + k, skip=("self_attn", "norm", "embed", "lm_head"))
        experts.append({"source_model": str(save(m, tmp_path / f"ft{k}"))})
    res = build_moe({"base_model": str(base), "gate_mode": "uniform_random", "experts": experts}, tmp_path / "moe")
    assert res.warnings == ()  # two experts: a power of two
    moe = MixtralForCausalLM.from_pretrained(tmp_path / "moe").eval()
    assert moe.config.sliding_window is None and not moe.config.tie_word_embeddings
    assert torch.equal(moe.lm_head.weight, load(base)["lm_head.weight"])
    assert torch.equal(
        moe.model.layers[1].mlp.experts.down_proj[1], load(tmp_path / "ft1")["model.layers.1.mlp.down_proj.weight"]
    )
    assert moe.generate(torch.tensor([[1, 2]]), max_new_tokens=2, do_sample=False).shape == (1, 4)


@pytest.mark.parametrize("expert", [0, 1, 2])
def test_one_expert_per_token_with_forcing_gates_equals_that_dense_expert(models, tmp_path, expert):
    from transformers import LlamaForCausalLM, MixtralForCausalLM

    build_moe(_config(models, "random", k=1), tmp_path / "moe")
    moe = MixtralForCausalLM.from_pretrained(tmp_path / "moe").eval()
    with torch.no_grad():
        for layer in moe.model.layers:  # feature 0 is positive everywhere: +c picks `expert`, −c the others
            w = torch.zeros_like(layer.mlp.gate.weight)
            w[:, 0] = -10.0
            w[expert, 0] = 10.0
            layer.mlp.gate.weight.copy_(w)
    dense = LlamaForCausalLM.from_pretrained(models[f"e{expert}"]).eval()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(expert))
    with torch.no_grad():
        got, want = moe(input_ids=ids).logits, dense(input_ids=ids).logits
        other = LlamaForCausalLM.from_pretrained(models[f"e{(expert + 1) % 3}"]).eval()(input_ids=ids).logits
    # bit-identical here (the fused gate_up matmul rounds as gate_proj and up_proj do); a BLAS that blocks the
    # wider matrix differently may round differently, hence a bound rather than torch.equal
    assert (got - want).abs().max() <= 1e-6 * want.abs().max()
    assert (got - other).abs().max() > 1e-3  # the experts really differ: routing picked the right one


def test_random_gates_follow_the_seed(models, tmp_path):
    from make_mergekit_moe import load as load_tensors

    gates = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        build_moe(_config(models, "random", dtype="float32"), tmp_path / name, seed=seed)
        gates[name] = load_tensors(tmp_path / name)["model.layers.1.mlp.gate.weight"]
    assert torch.equal(gates["a"], gates["b"]) and not torch.equal(gates["a"], gates["c"])
    # random is randn(layers, experts, hidden) from the seed (mergekit-moe's draw with --random-seed)
    want = torch.randn((2, 3, 64), generator=torch.Generator().manual_seed(1))[1]
    assert torch.equal(gates["a"], want)
    build_moe(_config(models, "uniform_random", dtype="float32"), tmp_path / "u")
    u = load_tensors(tmp_path / "u")["model.layers.0.mlp.gate.weight"]
    assert u.abs().max() <= 64**-0.5 and u.min() < 0 < u.max()


def test_cheap_embed_gives_every_layer_the_same_unit_rows(models, tmp_path):
    build_moe(_config(models, "cheap_embed", dtype="float32"), tmp_path / "moe")
    t = load(tmp_path / "moe")
    g0, g1 = t["model.layers.0.mlp.gate.weight"], t["model.layers.1.mlp.gate.weight"]
    assert torch.equal(g0, g1)
    assert torch.allclose(g0.norm(dim=-1), torch.ones(3), atol=1e-6)
    # hand-computed row 1: the one prompt's token embeddings (BOS first) summed, scaled to unit length
    tok = tiny_tokenizer()
    ids = tok("<s>write a poem about the sea", add_special_tokens=False)["input_ids"]
    embed = load(models["base"])["model.embed_tokens.weight"]
    v = embed[ids].sum(dim=0)
    assert torch.allclose(g0[1], v / v.norm(), atol=1e-6)


# -- against mergekit-moe's own outputs ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mk_inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mergekit_moe")
    dirs = write_inputs(root)
    assert digest(dirs) == META["inputs_sha256"], (
        "the regenerated inputs differ from those mergekit merged: regenerate data/mergekit_moe with "
        "tests/merge/make_mergekit_moe.py"
    )
    return root


def _ours(root: Path, case: str) -> Path:
    out = root / f"skillgraft-{case}"
    if not out.exists():
        cfg = root / f"{case}.yaml"
        cfg.write_text((DATA / f"{case}.yaml").read_text())
        assert main(["-q", "moe", str(cfg), "-o", str(out), "--seed", "0"]) == 0
    return out


def _config_json(path: Path | dict) -> dict:
    """A config.json without the writer's transformers version (ours keeps the base's)."""
    cfg = json.loads(path.read_text()) if isinstance(path, Path) else dict(path)
    cfg.pop("transformers_version", None)
    return cfg


def _identical(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors that are not bit-identical (dtype, shape and bytes)."""
    assert sorted(ours) == sorted(theirs)
    return [n for n, b in theirs.items() if ours[n].dtype != b.dtype or not torch.equal(ours[n], b)]


@pytest.mark.parametrize("case", list(CASES))
def test_matches_committed_mergekit_moe_output(mk_inputs, case):
    from transformers import MixtralForCausalLM

    out = _ours(mk_inputs, case)
    assert _identical(load(out), load(DATA / f"{case}.safetensors")) == []
    assert _config_json(out / "config.json") == _config_json(META["configs"][case])
    model = MixtralForCausalLM.from_pretrained(out).eval()
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert model.generate(torch.tensor([[1, 4, 5]]), max_new_tokens=3, do_sample=False).shape == (1, 6)


@pytest.mark.slow
@pytest.mark.live_mergekit  # deselected (not skipped) where no mergekit python exists: see tests/conftest.py
@pytest.mark.parametrize("case", list(CASES))
def test_live_mergekit_moe(mk_inputs, case, tmp_path):
    """mergekit-moe itself on the same YAML and inputs (opt-in; a broken mergekit python fails, not skips)."""
    python = mergekit_python()
    assert python is not None
    cfg = mk_inputs / f"live-{case}.yaml"  # in the inputs' directory: mergekit resolves paths against its cwd
    cfg.write_text((DATA / f"{case}.yaml").read_text())
    run_mergekit_moe(python, cfg, tmp_path / "mergekit")
    theirs = load(tmp_path / "mergekit")
    assert _identical(theirs, load(DATA / f"{case}.safetensors")) == [], (
        "this mergekit no longer reproduces the committed golden output: regenerate data/mergekit_moe"
    )
    assert _identical(load(_ours(mk_inputs, case)), theirs) == []
    assert _config_json(tmp_path / "mergekit" / "config.json") == _config_json(META["configs"][case])


# -- bad configs: one error line, nothing written ------------------------------------------------------------------
def _edit(cfg: dict, change) -> dict:
    cfg = copy.deepcopy(cfg)
    change(cfg)
    return cfg


BAD = {
    "unknown key": (lambda c: c.update(tokenizer_source="base"), "unknown key(s) 'tokenizer_source'", 2),
    "unknown expert key": (lambda c: c["experts"][1].update(weight=0.5), "experts[1]: unknown key(s) 'weight'", 2),
    "gate mode": (lambda c: c.update(gate_mode="hiden"), "did you mean 'hidden'", 2),
    "shared experts": (lambda c: c.update(shared_experts=[{"source_model": "x"}]), "shared_experts", 7),
    "architecture": (lambda c: c.update(architecture="qwen"), "'Qwen MoE' output is not supported", 7),
    "no architecture": (lambda c: c.update(architecture="gpt"), "no mergekit-moe output architecture", 2),
    "too many per token": (lambda c: c.update(experts_per_token=4), "experts_per_token: 4 is more than the 3", 2),
    "no prompts": (lambda c: c["experts"][2].pop("positive_prompts"), "experts[2]: gate_mode hidden needs", 2),
    "same prompts": (
        lambda c: [e.update(positive_prompts=["x"]) for e in c["experts"]],
        "every expert has the same prompts",
        2,
    ),
    "dtype": (lambda c: c.update(dtype="float64"), "dtype: 'float64' is not supported", 2),
    "prompts not a list": (lambda c: c["experts"][0].update(positive_prompts="math"), "expected a list of strings", 2),
    "lora reference": (lambda c: c.update(base_model="./base+./lora"), "'model+lora' reference", 7),
    "noise": (lambda c: c["experts"][0].update(noise_scale=-1), "noise_scale: must be ≥ 0", 2),
    "merge config": (lambda c: c.update(merge_method="ties"), "skillgraft merge", 2),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_config_is_one_error_line_and_writes_nothing(models, tmp_path, capsys, case):
    change, message, code = BAD[case]
    cfg = _write(tmp_path, _edit(_config(models, "hidden", k=1), change))
    assert main(["moe", str(cfg), "-o", str(tmp_path / "out")]) == code
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) <= 2  # error: … and hint: …
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_config_errors_are_raised_by_the_parser(models):
    with pytest.raises(InputError, match="missing required key 'experts'"):
        parse_moe_config({"base_model": "x"})
    with pytest.raises(UnsupportedError, match="Qwen MoE"):
        parse_moe_config({**_config(models), "architecture": "Qwen"})
    assert parse_moe_config({**_config(models), "architecture": "mix"}).gate_mode == "random"  # mergekit's prefix


def _gpt2(tmp_path: Path) -> Path:
    from conftest import gpt2_config

    return save(build(gpt2_config()), tmp_path / "gpt2")


def test_models_checked_before_any_weight_is_read(models, tmp_path, capsys):
    # an expert of another size
    other = save(build(llama_config(intermediate_size=96)), tmp_path / "wide")
    cfg = _config(models)
    cfg["experts"][1]["source_model"] = str(other)
    assert main(["moe", str(_write(tmp_path, cfg)), "-o", str(tmp_path / "out")]) == MismatchError.exit_code
    assert "experts[1]" in capsys.readouterr().err
    # a base that is no Llama/Mistral
    cfg = {**_config(models), "base_model": str(_gpt2(tmp_path))}
    assert main(["moe", str(_write(tmp_path, cfg)), "-o", str(tmp_path / "out")]) == UnsupportedError.exit_code
    assert "takes Llama or Mistral models" in capsys.readouterr().err
    # a prompt gate mode without the base's tokenizer
    bare = save(build(llama_config()), tmp_path / "bare")
    cfg = {**_config(models, "hidden"), "base_model": str(bare)}
    assert main(["moe", str(_write(tmp_path, cfg)), "-o", str(tmp_path / "out")]) == 2
    assert "needs the base's tokenizer" in capsys.readouterr().err
    # the same model three times: refused unless asked for
    cfg = _config(models)
    for e in cfg["experts"]:
        e["source_model"] = str(models["e0"])
    path = _write(tmp_path, cfg)
    assert main(["moe", str(path), "-o", str(tmp_path / "out")]) == 2
    assert "--allow-identical-experts" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    assert main(["-q", "moe", str(path), "-o", str(tmp_path / "out"), "--allow-identical-experts"]) == 0


def test_existing_output_is_kept_unless_overwrite(models, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    path = _write(tmp_path, _config(models))
    assert main(["moe", str(path), "-o", str(tmp_path / "out")]) == 8
    assert "already exists" in capsys.readouterr().err
    assert main(["-q", "moe", str(path), "-o", str(tmp_path / "out"), "--overwrite"]) == 0
    assert (tmp_path / "out" / "model.safetensors").exists()


# -- CLI -----------------------------------------------------------------------------------------------------------
def test_cli_json_summary_and_dry_run(models, tmp_path, capsys):
    path = _write(tmp_path, _config(models, "cheap_embed", k=2))
    assert main(["moe", str(path), "-o", str(tmp_path / "plan"), "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert not (tmp_path / "plan").exists()
    names = [t["tensor"] for t in plan["tensors"]]
    assert "model.layers.1.mlp.experts.gate_up_proj" in names and not any("gate_proj" in n for n in names)
    up = next(t for t in plan["tensors"] if t["tensor"].endswith("0.mlp.experts.gate_up_proj"))
    assert up["shape"] == [3, 256, 64] and up["dtype"] == "float32"
    assert main(["-q", "moe", str(path), "-o", str(tmp_path / "moe"), "--json", "--layout", "per_expert"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert (res["experts"], res["layout"], res["gate_mode"]) == (3, "per_expert", "cheap_embed")
    assert res["bytes"] == plan["expected_output_bytes"]
    assert "model.layers.0.block_sparse_moe.experts.2.w2.weight" in load(tmp_path / "moe")
    assert main(["moe", str(path), "-o", str(tmp_path / "x"), "--layout", "stacked"]) == 2
    assert "layout" in capsys.readouterr().err


def test_docs_example_config_parses():
    doc = (Path(__file__).parents[2] / "docs" / "merging.md").read_text()
    section = doc.split("## Mixture of experts from dense fine-tunes", 1)[1]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    cfg = parse_moe_config(yaml.safe_load(block))
    assert (cfg.gate_mode, cfg.experts_per_token, len(cfg.experts)) == ("hidden", 2, 2)
    assert cfg.experts[1].noise_scale == 0.01 and cfg.experts[0].negative_prompts == ("Write a poem",)
