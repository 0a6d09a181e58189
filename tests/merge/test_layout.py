"""Layer layouts (mergekit ``slices``): validation before any weight is read, and what a layout's output holds.

The numbers against mergekit itself are in test_mergekit_e2e.py (the RAW cases); here: errors and the layout's
own bookkeeping on the same tiny tied-embedding Llama inputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from make_mergekit_e2e import load, write_inputs

from skillgraft.errors import InputError, MismatchError
from skillgraft.merge.config import from_dict
from skillgraft.merge.engine import MergeOptions, merge
from skillgraft.merge.layout import OutputSlice, SliceSource, block_position


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return write_inputs(tmp_path_factory.mktemp("layout"))


def _src(model: Path, lo: int, hi: int) -> dict:
    return {"model": str(model), "layer_range": [lo, hi]}


def _run(cfg: dict, out: Path, **opts) -> None:
    merge(from_dict(cfg), MergeOptions(out=out, **opts))


def test_frankenmerge_stacks_the_named_blocks(models, tmp_path):
    cfg = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [_src(models["ft_b"], 1, 2)]},
            {"sources": [_src(models["ft_a"], 0, 2)]},
        ],
        "base_model": str(models["base"]),
    }
    _run(cfg, tmp_path / "out")
    got, a, b = load(tmp_path / "out"), load(models["ft_a"]), load(models["ft_b"])
    blk = "self_attn.q_proj.weight"
    assert torch.equal(got[f"model.layers.0.{blk}"], b[f"model.layers.1.{blk}"])
    assert torch.equal(got[f"model.layers.1.{blk}"], a[f"model.layers.0.{blk}"])
    assert torch.equal(got[f"model.layers.2.{blk}"], a[f"model.layers.1.{blk}"])
    # embeddings from the first slice's model, the final norm from the last slice's
    assert torch.equal(got["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    assert torch.equal(got["model.norm.weight"], a["model.norm.weight"])
    assert not any(n.startswith("model.layers.3.") for n in got)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 3


def test_gradient_positions_are_per_slice():
    layout = (OutputSlice((SliceSource("a", 0, 3),)), OutputSlice((SliceSource("a", 0, 1),)))
    assert [block_position(i, layout) for i in range(4)] == [0.0, 0.5, 1.0, 1.0]


@pytest.mark.parametrize(
    ("slices", "message"),
    [
        ([], "non-empty list"),
        ([{"sources": [{"model": "X", "layer_range": [0, 1]}], "residual_weight": 0.5}], "residual_weight"),
        ([{"sources": [{"model": "X", "layer_range": [1, 1]}]}], "empty or negative"),
        ([{"sources": [{"model": "X", "layer_range": [0]}]}], "two integers"),
        ([{"sources": [{"model": "X"}]}], "'model' and 'layer_range'"),
    ],
)
def test_bad_slices_are_refused_by_name(slices, message):
    with pytest.raises(InputError, match=message):
        from_dict({"merge_method": "passthrough", "slices": slices})


def test_merge_slices_must_merge_the_same_models(models):
    b, a, c = (str(models[k]) for k in ("base", "ft_a", "ft_b"))
    cfg = {
        "merge_method": "ties",
        "base_model": b,
        "slices": [
            {"sources": [_src(b, 0, 1), _src(a, 0, 1)]},
            {"sources": [_src(b, 1, 2), _src(c, 1, 2)]},
        ],
    }
    with pytest.raises(InputError, match=r"slices\[1\] merges other models"):
        from_dict(cfg)


def test_passthrough_takes_one_source_per_slice(models):
    b, a = str(models["base"]), str(models["ft_a"])
    with pytest.raises(InputError, match="exactly one source per slice"):
        from_dict({"merge_method": "passthrough", "slices": [{"sources": [_src(b, 0, 1), _src(a, 0, 1)]}]})
    with pytest.raises(InputError, match="copies one model"):
        from_dict({"merge_method": "passthrough", "models": [{"model": b}, {"model": a}]})


def test_sources_of_one_slice_have_equal_lengths(models):
    b, a = str(models["base"]), str(models["ft_a"])
    with pytest.raises(InputError, match="different numbers of layers"):
        from_dict({"merge_method": "linear", "slices": [{"sources": [_src(b, 0, 2), _src(a, 0, 1)]}]})


def test_models_and_slices_together_are_refused(models):
    b = str(models["base"])
    with pytest.raises(InputError, match="not both"):
        from_dict({"merge_method": "passthrough", "models": [{"model": b}], "slices": [{"sources": [_src(b, 0, 1)]}]})


def test_per_model_parameters_must_agree_across_slices(models):
    b, a = str(models["base"]), str(models["ft_a"])
    s1 = {"sources": [_src(b, 0, 1), {**_src(a, 0, 1), "parameters": {"weight": 0.3}}]}
    s2 = {"sources": [_src(b, 1, 2), {**_src(a, 1, 2), "parameters": {"weight": 0.7}}]}
    with pytest.raises(InputError, match="parameters differ"):
        from_dict({"merge_method": "task_arithmetic", "base_model": b, "slices": [s1, s2]})


def test_range_past_the_model_fails_before_writing(models, tmp_path):
    cfg = {"merge_method": "passthrough", "slices": [{"sources": [_src(models["base"], 0, 5)]}]}
    with pytest.raises(MismatchError, match="past its 2 layers"):
        _run(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_base_model_must_be_in_every_slice(models, tmp_path):
    b, a, c = (str(models[k]) for k in ("base", "ft_a", "ft_b"))
    cfg = {"merge_method": "ties", "base_model": b, "slices": [{"sources": [_src(a, 0, 2), _src(c, 0, 2)]}]}
    with pytest.raises(InputError, match="base_model .* is not among the slice's sources"):
        _run(cfg, tmp_path / "out")


def test_a_layout_writes_only_full_models(models, tmp_path):
    cfg = {"merge_method": "passthrough", "slices": [{"sources": [_src(models["base"], 0, 1)]}]}
    with pytest.raises(InputError, match="writes a full model"):
        _run(cfg, tmp_path / "x.skill", out_format="skill")


def test_the_cli_reads_a_slices_yaml_with_relative_paths(models, tmp_path):
    from skillgraft.cli.main import main

    root = models["base"].parent
    cfg = root / "franken.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "merge_method": "passthrough",
                "slices": [{"sources": [{"model": "./ft_a", "layer_range": [0, 2]}]}] * 2,
                "out_path": "./ignored",  # mergekit ignores it; so do we, with a warning
            }
        )
    )
    assert main(["-q", "merge", str(cfg), "-o", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 4


def test_a_method_mergekit_lacks_is_refused_by_name(models):
    """mergekit's own examples/ties.yml names ranked_ties, which mergekit 0.1.5 does not have either."""
    cfg = {"merge_method": "ranked_ties", "base_model": str(models["base"]), "models": [{"model": str(models["ft_a"])}]}
    with pytest.raises(InputError, match="'ranked_ties' is not supported"):
        from_dict(cfg)


def test_a_mergekit_moe_config_points_to_skillgraft_moe():
    with pytest.raises(InputError, match="mergekit-moe config") as e:
        from_dict({"base_model": "./base", "gate_mode": "hidden", "experts": [{"source_model": "./a"}]})
    assert "skillgraft moe" in (e.value.hint or "")
