"""`skillgraft merge` refuses bad configs and bad inputs before reading a tensor, and merges PEFT LoRA inputs
exactly as peft's ``merge_and_unload`` does.

Every refusal goes through the real CLI (``main(argv)``, with and without ``--dry-run`` where the config is at
fault): a non-zero exit, one ``error:`` line naming the problem, no traceback and nothing under the output name.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import build, leftovers, llama_config, save
from test_peft_interop import CASES, make_adapter, merged_deltas

from skillgraft import ExtractSpec, extract
from skillgraft.cli.main import main
from skillgraft.io.checkpoint import Checkpoint
from skillgraft.merge.config import from_dict
from skillgraft.merge.engine import MergeOptions, merge


@pytest.fixture(scope="module")
def pair(llama_pair, other_base) -> tuple[Path, Path, Path]:
    """(base, input a, input b): two distinct checkpoints of the base's architecture (2 layers)."""
    base, tuned = llama_pair
    return base, tuned, other_base


def cli(capsys, tmp_path: Path, cfg: dict, *args: str) -> tuple[int, str, str, list[str]]:
    """Write ``cfg`` as YAML and run ``skillgraft merge`` on it into ``tmp_path/out``: (rc, stdout, stderr, the
    error and hint lines)."""
    path = tmp_path / "merge.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    rc = main(["merge", str(path), "-o", str(tmp_path / "out"), *args])
    out, err = capsys.readouterr()
    return rc, out, err, [line for line in err.splitlines() if line.startswith(("error:", "hint:"))]


def refused(capsys, tmp_path: Path, cfg: dict, text: str, *args: str) -> list[str]:
    """The merge fails cleanly with ``text`` in its one error line; returns the error and hint lines."""
    rc, _, err, lines = cli(capsys, tmp_path, cfg, *args)
    assert rc != 0, err
    assert lines and lines[0].startswith("error:") and text in lines[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)
    return lines


def two_inputs(pair, method: str, **parameters) -> dict:
    base, a, b = pair
    return {"base": str(base), "method": method, "parameters": parameters, "inputs": [str(a), str(b)]}


# --- the audit's holes: each refused at validation, also under --dry-run -------------------------------------------

CONFIG_HOLES = {
    "layer_swap_range_input": (
        ("layer_swap", {"ranges": [{"layers": [0, 1], "input": 2}]}),
        "range [0, 1) takes input 2, but there are 2 inputs",
    ),
    "layer_swap_default": (("layer_swap", {"default": 5}), "default is input 5, but there are 2 inputs"),
    "layer_swap_past_last_layer": (
        ("layer_swap", {"ranges": [{"layers": [0, 40], "input": 1}]}),
        "layer range [0, 40) goes past the model's 2 layers",
    ),
    "layer_swap_partly_past": (
        ("layer_swap", {"ranges": [{"layers": [1, 3], "input": 1}]}),
        "layer range [1, 3) goes past the model's 2 layers",
    ),
    "consensus_k": (("consensus", {"k": 5}), "k = 5 but there are 2 inputs"),
    "consensus_k3": (("consensus", {"k": 3}), "k = 3 but there are 2 inputs"),
    "breadcrumbs": (("breadcrumbs", {"density": 0.9, "gamma": 0.95}), "density 0.9 + gamma 0.95 > 1"),
    "breadcrumbs_ties": (("breadcrumbs_ties", {"density": 0.5, "gamma": 0.6}), "density 0.5 + gamma 0.6 > 1"),
    "ties_density_0": (("ties", {"density": 0}), "density must be a number in (0, 1]"),
    "ties_density_1.5": (("ties", {"density": 1.5}), "density must be a number in (0, 1]"),
    "dare_ties_density_0": (("dare_ties", {"density": 0}), "density must be a number in (0, 1]"),
    "breadcrumbs_density_1.5": (("breadcrumbs", {"density": 1.5}), "density must be a number in (0, 1]"),
}


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
@pytest.mark.parametrize("case", list(CONFIG_HOLES))
def test_bad_parameters_refused_before_any_tensor(case, dry_run, pair, tmp_path, capsys, monkeypatch):
    from skillgraft.io import safetensors_file

    def no_reads(self, name):
        raise AssertionError("validation read a tensor")

    monkeypatch.setattr(safetensors_file.MappedFile, "get", no_reads)
    (method, params), text = CONFIG_HOLES[case]
    lines = refused(capsys, tmp_path, two_inputs(pair, method, **params), text, *(["--dry-run"] * dry_run))
    assert len(lines) == 2 and lines[1].startswith("hint:")


def test_breadcrumbs_boundary_and_density_one_are_accepted(pair, tmp_path, capsys):
    """density + gamma = 1 keeps the top density below the outliers; at density 1 gamma is ignored (no mask)."""
    for i, params in enumerate(({"density": 0.7, "gamma": 0.3}, {"density": 1.0, "gamma": 0.5})):
        rc, _, err, _ = cli(capsys, tmp_path / str(i), two_inputs(pair, "breadcrumbs", **params), "--dry-run")
        assert rc == 0, err


def test_breadcrumbs_refused_in_a_mergekit_config(pair, tmp_path, capsys):
    base, a, b = pair
    mk = {
        "merge_method": "breadcrumbs",
        "base_model": str(base),
        "parameters": {"density": 0.9, "gamma": 0.95},
        "models": [{"model": str(a), "parameters": {"weight": 1.0}}, {"model": str(b), "parameters": {"weight": 0.5}}],
    }
    refused(capsys, tmp_path, mk, "density 0.9 + gamma 0.95 > 1")


def test_layer_count_from_tensor_names_without_config_keys(pair, tmp_path, capsys):
    base, a, b = pair
    bare = shutil.copytree(base, tmp_path / "bare")
    cfg = json.loads((bare / "config.json").read_text())
    del cfg["num_hidden_layers"]
    (bare / "config.json").write_text(json.dumps(cfg))
    bad = {**two_inputs(pair, "layer_swap", ranges=[{"layers": [0, 40], "input": 1}]), "base": str(bare)}
    refused(capsys, tmp_path, bad, "goes past the model's 2 layers", "--dry-run")


def test_layer_swap_dry_run_lists_the_supplying_input(pair, tmp_path, capsys):
    base, a, b = pair
    cfg = two_inputs(pair, "layer_swap", default=0, ranges=[{"layers": [1, 2], "input": 1}])
    rc, out, err, _ = cli(capsys, tmp_path, cfg, "--dry-run", "--json")
    assert rc == 0, err
    plan = json.loads(out)
    for row in plan["tensors"]:
        want = b if ".layers.1." in row["tensor"] else a
        assert row["inputs"] == [f"{want}:checkpoint"], row
    assert plan["merged_tensors"] == plan["total_tensors"]
    # The real run reads only those inputs and still takes each block from the named one.
    assert main(["-q", "merge", str(tmp_path / "merge.yaml"), "-o", str(tmp_path / "out")]) == 0
    with Checkpoint(tmp_path / "out") as merged, Checkpoint(a) as ca, Checkpoint(b) as cb:
        for n in merged.names():
            want = (cb if ".layers.1." in n else ca).get(n)  # θ₀ + (θᵢ − θ₀): equal up to fp32 rounding
            torch.testing.assert_close(merged.get(n), want, rtol=0, atol=1e-6, msg=n)


@pytest.mark.parametrize("source", ["m/nosuchdir", "./m/nosuchdir", "m/nosuchdir@2"])
def test_missing_input_path_says_it_does_not_exist(source, pair, tmp_path, capsys):
    base, a, _ = pair
    cfg = {"base": str(base), "method": "linear", "inputs": [str(a), source]}
    lines = refused(capsys, tmp_path, cfg, f"{source}: no such file or directory", "--dry-run")
    assert not any("invalid skill name" in line for line in lines)


@pytest.mark.parametrize("ref", ["nosuchskill", "nosuchskill@2"])
def test_bare_name_is_still_a_library_reference(ref, pair, tmp_path, capsys):
    base, a, _ = pair
    cfg = {"base": str(base), "method": "linear", "inputs": [str(a), ref]}
    lines = refused(capsys, tmp_path, cfg, "nosuchskill", "--library", str(tmp_path / "lib"))
    assert "no such file or directory" not in lines[0]


# --- bad inputs at merge level --------------------------------------------------------------------------------------


def test_input_of_another_shape_refused(pair, tmp_path, capsys):
    base, a, _ = pair
    wider = save(build(llama_config(hidden_size=96, intermediate_size=128)), tmp_path / "wider")
    cfg = {"base": str(base), "method": "task_arithmetic", "inputs": [str(a), str(wider)]}
    lines = refused(capsys, tmp_path, cfg, "has shape [128, 96], the base's is [128, 64]", "--dry-run")
    assert "same base architecture" in lines[1]


def test_vocab_resize_refused(pair, tmp_path, capsys):
    base, a, _ = pair
    m = build(llama_config())
    m.resize_token_embeddings(130)
    big = save(m, tmp_path / "big")
    cfg = {"base": str(base), "method": "ties", "inputs": [str(a), str(big)]}
    lines = refused(capsys, tmp_path, cfg, "embed_tokens.weight' has shape [130, 64], the base's is [128, 64]")
    assert "vocabulary" in lines[1]


def test_skill_for_another_base_refused_unless_forced(pair, tmp_path, capsys):
    base, a, other = pair
    skill = extract(ExtractSpec(base=other, tuned=a, out=tmp_path / "other.skill", rank=2)).path
    cfg = {"base": str(base), "method": "task_arithmetic", "inputs": [str(skill)]}
    lines = refused(capsys, tmp_path, cfg, "made for another base")
    assert "--force" in lines[1]
    rc, _, err, _ = cli(capsys, tmp_path, cfg, "--force", "--dry-run")
    assert rc == 0, err


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_safetensors_input_refused(damage, pair, tmp_path, capsys):
    base, a, _ = pair
    bad = shutil.copytree(a, tmp_path / damage)
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100] if damage == "truncated" else b"\x07" * 64 + b"not safetensors" * 10)
    cfg = {"base": str(base), "method": "linear", "inputs": [str(a), str(bad)]}
    lines = refused(capsys, tmp_path, cfg, "truncated" if damage == "truncated" else "model.safetensors")
    assert lines[1].startswith("hint:") and "damaged or incomplete" in lines[1]


# --- PEFT LoRA directories as merge inputs ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["rslora", "patterns", "gpt2_fan_in_fan_out"])
def test_lora_input_merges_like_peft(case, llama_pair, gpt2_pair, tmp_path):
    """At weight 1 the merge is peft's ``merge_and_unload()``; at weight −1 it is the base minus that delta."""
    arch, lora_kw = CASES[case]
    base = (llama_pair if arch == "llama" else gpt2_pair)[0]
    model = make_adapter(base, tmp_path / "adapter", **lora_kw)
    delta = merged_deltas(model, base)
    with Checkpoint(base) as c:
        base_sd = {n: c.get(n) for n in c.names()}
    assert sum(bool(delta[n].any()) for n in base_sd) >= 2  # the adapter changes several tensors
    for weight in (1.0, -1.0):
        out = tmp_path / f"merged{weight:+.0f}"
        adapter = {"source": str(tmp_path / "adapter"), "weight": weight}
        merge(from_dict({"base": str(base), "method": "task_arithmetic", "inputs": [adapter]}), MergeOptions(out=out))
        with Checkpoint(out) as c:
            assert set(c.names()) == set(base_sd)
            for n, b in base_sd.items():
                torch.testing.assert_close(c.get(n), b + weight * delta[n], rtol=1e-6, atol=1e-7, msg=n)


def test_mergekit_linear_base_model_must_be_listed():
    """mergekit's linear averages every model: a base_model that is listed keeps its weight (Δ = 0), one that is
    not listed is refused (mergekit refuses it too: it has no weight)."""
    from skillgraft.errors import InputError
    from skillgraft.merge.config import from_dict

    models = [{"model": "./a", "parameters": {"weight": 0.6}}, {"model": "./b", "parameters": {"weight": 0.4}}]
    cfg = from_dict({"merge_method": "linear", "base_model": "./a", "models": models})
    assert [(i.source, i.weight) for i in cfg.inputs] == [("./a", 0.6), ("./b", 0.4)]
    ties = from_dict({"merge_method": "ties", "base_model": "./a", "models": models, "parameters": {"density": 0.5}})
    assert [i.source for i in ties.inputs] == ["./b"]  # other methods leave the base out
    with pytest.raises(InputError, match="base_model is not among 'models'"):
        from_dict({"merge_method": "linear", "base_model": "./base", "models": models})
