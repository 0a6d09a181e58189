"""Inputs and golden outputs of the end-to-end differential test against mergekit (test_mergekit_e2e.py).

A tiny Llama (tied embeddings, bf16) and two fine-tunes of it are generated from a seed, tensor by tensor, with
the synthetic recipe of benchmarks/merge_vs_mergekit.py; mergekit YAMLs for five methods are merged by
mergekit 0.1.5 itself and its output tensors stored in data/mergekit_e2e/ (a few hundred KB). The inputs are not
committed: the test regenerates them and checks their digest against the one recorded here.

Regenerate (mergekit lives in its own venv, never in skillgraft's)::

    python3 -m venv /tmp/mkvenv && /tmp/mkvenv/bin/pip install torch==2.13.0 mergekit==0.1.5
    .venv/bin/python tests/merge/make_mergekit_e2e.py --mergekit-py /tmp/mkvenv/bin/python
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[2]
DATA = Path(__file__).resolve().parent / "data" / "mergekit_e2e"
sys.path.insert(0, str(REPO / "benchmarks"))
from extract_apply import synthetic_delta  # noqa: E402
from merge_vs_mergekit import WEIGHTS, _base_tensor  # noqa: E402

# ~33k parameters: every output is 66 KB of bf16. The smallest tensors (norms) have 32 entries, so the
# breadcrumbs gamma below drops int(0.05·32) = 1 outlier there (gamma·numel ≥ 1 everywhere). Spelled out rather
# than taken from conftest.llama_config: the committed golden outputs must not move when shared fixtures change.
CONFIG = dict(
    hidden_size=32,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=64,
    tie_word_embeddings=True,
)
SEED = 0
# ‖Δ‖/‖W‖ of each fine-tune. ft_a's deltas are a few bf16 steps, so many |Δ| are equal and TIES' k-th magnitude
# is nonzero (tie-breaking of the sort matters); most of ft_b's round to 0 (its k-th magnitude is 0).
RELS = {"ft_a": 0.02, "ft_b": 0.002}
NOISE = 0.2
MK_FLAGS = ["--lazy-unpickle", "--no-write-model-card", "--random-seed", "0"]
# name: (merge_method, per-model parameters besides weight, top-level parameters, the base's weight when it is
# also listed among the models)
CASES: dict[str, tuple[str, dict, dict, float | None]] = {
    "task_arithmetic": ("task_arithmetic", {}, {"lambda": 0.9}, None),
    "linear": ("linear", {}, {}, None),
    "ties": ("ties", {"density": 0.5}, {"normalize": True}, None),
    "breadcrumbs": ("breadcrumbs", {"density": 0.6, "gamma": 0.05}, {}, None),
    "breadcrumbs_ties": ("breadcrumbs_ties", {"density": 0.6, "gamma": 0.05}, {}, None),
    # mergekit's linear averages every listed model, base_model included (a known difference, see the test)
    "linear_base_listed": ("linear", {}, {}, 0.2),
    # the most common published configs: int8_mask (mergekit stores masks as int8; no number changes)
    "ties_int8_mask": ("ties", {"density": 0.5}, {"normalize": True, "int8_mask": True}, None),
    # no density: mergekit keeps every entry (its default density is 1.0), TIES then only elects signs
    "ties_no_density": ("ties", {}, {}, None),
    "task_arithmetic_normalize": ("task_arithmetic", {}, {"normalize": True, "lambda": 0.9, "int8_mask": True}, None),
    # the other sparsifying methods without density: mergekit's default 1.0 keeps every entry here too (DARE and
    # DELLA then draw nothing, so the outputs are deterministic)
    "dare_ties_no_density": ("dare_ties", {}, {}, None),
    "breadcrumbs_ties_no_density": ("breadcrumbs_ties", {}, {}, None),
    "della_linear_no_density": ("della_linear", {}, {}, None),
    # mergekit's other defaults: gamma 0.01 (density < 1 makes it matter), and the normalize default of
    # dare_linear (false) and della (true; its consensus makes the divisor matter)
    "breadcrumbs_default_gamma": ("breadcrumbs_ties", {"density": 0.6}, {}, None),
    "dare_linear_no_density": ("dare_linear", {}, {}, None),
    "della_no_density": ("della", {}, {}, None),
    "della_default_epsilon": ("della", {"density": 0.5}, {}, None),
    "model_stock": ("model_stock", {}, {}, None),
    "model_stock_filter_wise": ("model_stock", {}, {"filter_wise": True}, None),
    "nearswap": ("nearswap", {}, {"t": 0.0005}, None),
    # the most published SLERP config: per-filter t gradients over the layers, a catch-all value for the rest
    "slerp_filters": (
        "slerp",
        {},
        {
            "t": [
                {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                {"value": 0.5},
            ]
        },
        None,
    ),
    # a weight gradient over the layers (per model) with TIES
    "ties_weight_gradient": ("ties", {"density": 0.5, "weight": [0.2, 0.8]}, {"normalize": True}, None),
    # SCE (weights ignored: each model weighs its mean squared Δ), and with the variance top-k selection (the
    # count 0.7·#varying is taken in fp32); RAM with its default epsilon and one that leaves ft_b unique on ~5% of
    # the entries; Arcee Fusion (one fine-tune, no parameters)
    "sce": ("sce", {}, {}, None),
    "sce_topk": ("sce", {}, {"select_topk": 0.7}, None),
    "ram": ("ram", {}, {}, None),
    "ram_epsilon": ("ram", {}, {"epsilon": 1e-4}, None),
    "arcee_fusion": ("arcee_fusion", {}, {}, None),
    # the spherical methods: karcher averages base_model's weights with the models' (mergekit adds the unlisted
    # base as an input); multislerp and nuslerp interpolate the deltas from base_model
    "karcher": ("karcher", {}, {}, None),
    # tol 0.5: every angle is below it (no step is taken) and k_proj/v_proj (‖θ‖ ≈ 0.44) merge to 0
    "karcher_params": ("karcher", {}, {"max_iter": 3, "tol": 0.5}, None),
    "multislerp": ("multislerp", {}, {}, None),
    # equal per-tensor weights from a gradient, not normalised (their sum runs from 0.4 to 1.6), and a larger eps
    "multislerp_no_normalize": ("multislerp", {"weight": [0.2, 0.8]}, {"normalize_weights": False, "eps": 1e-3}, None),
    "nuslerp": ("nuslerp", {}, {}, None),
    "nuslerp_rows": ("nuslerp", {}, {"nuslerp_flatten": False}, None),
    "nuslerp_row_wise": ("nuslerp", {}, {"nuslerp_flatten": False, "nuslerp_row_wise": True}, None),
    # without base_model: karcher averages the two models only, multislerp and nuslerp their full weights
    "karcher_no_base": ("karcher", {}, {}, None),
    "multislerp_no_base": ("multislerp", {}, {}, None),
    "nuslerp_no_base": ("nuslerp", {}, {}, None),
}
# Cases whose YAML has no base_model.
NO_BASE = {"karcher_no_base", "multislerp_no_base", "nuslerp_no_base"}
# Cases that merge fewer fine-tunes than RELS lists (nearswap takes exactly one besides the base).
ONLY: dict[str, tuple[str, ...]] = {"nearswap": ("ft_a",), "slerp_filters": ("ft_a",), "arcee_fusion": ("ft_a",)}
# The cases above run with ``dtype: float32`` (mergekit computes in fp32). Published configs nearly all name
# bfloat16 or float16, and mergekit then loads every tensor in that dtype and computes in it: these variants
# are the same configs with (case, dtype, out_dtype); dtype None leaves the key out (mergekit then computes in the
# checkpoints' own dtype, bf16 here).
LOW_PRECISION: dict[str, tuple[str, str | None, str]] = {
    **{
        f"{c}_bf16": (c, "bfloat16", "bfloat16")
        for c in (
            "task_arithmetic",
            "task_arithmetic_normalize",
            "linear",
            "ties",
            "ties_no_density",
            "breadcrumbs",
            "breadcrumbs_ties",
            "dare_ties_no_density",
            "della_linear_no_density",
            "model_stock",
            "model_stock_filter_wise",
            "nearswap",
            "slerp_filters",
        )
    },
    "ties_stored": ("ties", None, "bfloat16"),
    "linear_fp16": ("linear", "float16", "bfloat16"),
    "task_arithmetic_fp16": ("task_arithmetic", "float16", "bfloat16"),
    "ties_fp16": ("ties", "float16", "bfloat16"),
    # the spherical methods in bf16 (mergekit computes every step in it), and karcher in the checkpoints' dtype
    **{
        f"{c}_bf16": (c, "bfloat16", "bfloat16")
        for c in ("karcher", "multislerp", "multislerp_no_base", "nuslerp", "nuslerp_row_wise", "nuslerp_no_base")
    },
    "karcher_stored": ("karcher", None, "bfloat16"),
    # sce and ram compute in bf16 as mergekit does, arcee_fusion on the bf16 parameters; and sce without dtype
    **{f"{c}_bf16": (c, "bfloat16", "bfloat16") for c in ("sce", "sce_topk", "ram", "ram_epsilon", "arcee_fusion")},
    "sce_stored": ("sce", None, "bfloat16"),
}
for _case, (_of, _, _) in LOW_PRECISION.items():
    CASES[_case] = CASES[_of]
    if _of in ONLY:
        ONLY[_case] = ONLY[_of]
    if _of in NO_BASE:
        NO_BASE.add(_case)

_T = [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"filter": "mlp", "value": [1, 0.5, 0]}, {"value": 0.5}]
# Whole YAMLs, for what the shape of CASES cannot say: layer layouts (``slices``).
RAW: dict[str, dict] = {
    # a frankenmerge: 4 blocks stacked from three models (embeddings from the first slice's, norm from the last's)
    "passthrough_frankenmerge": {
        "slices": [
            {"sources": [{"model": "./base", "layer_range": [0, 2]}]},
            {"sources": [{"model": "./ft_a", "layer_range": [0, 1]}]},
            {"sources": [{"model": "./ft_b", "layer_range": [1, 2]}]},
        ],
        "merge_method": "passthrough",
        "dtype": "bfloat16",
    },
    "passthrough_one_model": {"models": [{"model": "./ft_a"}], "merge_method": "passthrough", "dtype": "bfloat16"},
    # the SLERP config most often published: one slice over every block of both models, per-filter t gradients
    "slerp_slices": {
        "slices": [
            {"sources": [{"model": "./base", "layer_range": [0, 2]}, {"model": "./ft_a", "layer_range": [0, 2]}]}
        ],
        "merge_method": "slerp",
        "base_model": "./base",
        "parameters": {"t": _T},
        "dtype": "bfloat16",
    },
    # two one-block slices over the same models: gradients resolve within each slice (position 1 in both)
    "ties_two_slices": {
        "slices": [
            {"sources": [{"model": f"./{m}", "layer_range": [k, k + 1]} for m in ("base", "ft_a", "ft_b")]}
            for k in (0, 1)
        ],
        "merge_method": "ties",
        "base_model": "./base",
        "parameters": {"density": 0.5, "weight": [0.2, 0.8], "normalize": True},
        "dtype": "bfloat16",
    },
    # blocks reordered: output block 0 merges the models' block 1, output block 1 their block 0
    "task_arithmetic_swapped_slices": {
        "slices": [
            {"sources": [{"model": f"./{m}", "layer_range": [1 - k, 2 - k]} for m in ("base", "ft_a", "ft_b")]}
            for k in (0, 1)
        ],
        "merge_method": "task_arithmetic",
        "base_model": "./base",
        "parameters": {"weight": 0.5, "lambda": 0.9},
        "dtype": "bfloat16",
    },
}
# mergekit's own examples/ (github.com/arcee-ai/mergekit, examples/*.yml), adapted to the local models: model names
# replaced by base / ft_a / ft_b and layer ranges scaled to 2 blocks; everything else as written there. Examples
# left out, and why (docs/merging.md): ties.yml (ranked_ties: not a mergekit 0.1.5 method, 0.1.5 refuses it),
# linear_small.yml and metrics-*.yml (no merge_method: not merge configs), mega.yml (a multi-stage
# mergekit-mega file), vlm-*/whisper-*/evo_bert_large (other architectures), cabs/chipalign/core_space/lrp/zipit
# (methods mergekit 0.1.5 does not have).
EXAMPLES: dict[str, dict] = {
    # examples/gradient-slerp.yml: its conditions say ``pattern``, a key mergekit 0.1.5 ignores (it reads
    # ``filter``), so its first condition matches every tensor; we do the same, with a warning
    "example_gradient_slerp": {
        "slices": [
            {"sources": [{"model": "./base", "layer_range": [0, 2]}, {"model": "./ft_a", "layer_range": [0, 2]}]}
        ],
        "merge_method": "slerp",
        "base_model": "./base",
        "parameters": {
            "t": [
                {"pattern": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                {"pattern": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                {"value": 0.5},
            ]
        },
        "dtype": "float16",
    },
    # examples/orcamini-platy-44layer.yml: overlapping ranges of two models stacked (24 + 20 of 40 → 2 + 1 of 2)
    "example_orcamini_platy_44layer": {
        "slices": [
            {"sources": [{"model": "./ft_a", "layer_range": [0, 2]}]},
            {"sources": [{"model": "./ft_b", "layer_range": [1, 2]}]},
        ],
        "merge_method": "passthrough",
        "dtype": "float16",
    },
    # examples/gpt2-small.yml: the first blocks of one model (8 of 12 → 1 of 2)
    "example_gpt2_small": {
        "slices": [{"sources": [{"model": "./ft_a", "layer_range": [0, 1]}]}],
        "merge_method": "passthrough",
        "dtype": "float16",
    },
    # examples/bio-merge.yml
    "example_bio_merge": {
        "models": [
            {"model": "./ft_a", "parameters": {"density": 0.5, "weight": 0.5}},
            {"model": "./ft_b", "parameters": {"density": 0.5, "weight": 0.5}},
        ],
        "merge_method": "ties",
        "base_model": "./base",
        "parameters": {"normalize": False, "int8_mask": True},
        "dtype": "float16",
    },
    # examples/linear.yml: three models, no base_model
    "example_linear": {
        "models": [
            {"model": "./base", "parameters": {"weight": 1.0}},
            {"model": "./ft_a", "parameters": {"weight": 0.3}},
            {"model": "./ft_b", "parameters": {"weight": 0.5}},
        ],
        "merge_method": "linear",
        "dtype": "float16",
    },
}
RAW.update(EXAMPLES)
ALL = [*CASES, *RAW]


def layout() -> tuple[dict, list[tuple[str, tuple[int, ...]]]]:
    """The config.json dict and the (name, shape) list a tied-embedding LlamaForCausalLM saves."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**CONFIG, dtype="bfloat16")
    config.architectures = ["LlamaForCausalLM"]  # mergekit picks its architecture table from this
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return config.to_dict(), [(n, tuple(t.shape)) for n, t in model.state_dict().items() if n != "lm_head.weight"]


def write_inputs(root: Path) -> dict[str, Path]:
    """base, ft_a and ft_b under ``root`` (bf16 ``model.safetensors`` + ``config.json``); same bytes every run."""
    cfg, names = layout()
    tensors: dict[str, dict[str, torch.Tensor]] = {"base": {}, **{k: {} for k in RELS}}
    for name, shape in names:
        w = _base_tensor(name, shape, SEED)
        tensors["base"][name] = w
        for k, (model, rel) in enumerate(RELS.items()):  # seeds as in merge_vs_mergekit.child_generate
            d = synthetic_delta(name, w, rel, NOISE, 1000 * (SEED + 1) + k)
            tensors[model][name] = (w.float() + d).to(torch.bfloat16)
    dirs = {}
    for model, state in tensors.items():
        d = dirs[model] = root / model
        d.mkdir(parents=True, exist_ok=True)
        save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return dirs


def digest(dirs: dict[str, Path], json_files: tuple[str, ...] = ()) -> str:
    """sha256 over every input tensor (name, dtype, shape, raw bytes), independent of file layout, then each
    model's ``json_files`` (parsed, keys sorted). Shared by the other make_mergekit_*.py scripts."""
    h = hashlib.sha256()
    for model in sorted(dirs):
        for name, t in sorted(load(dirs[model]).items()):
            h.update(f"{model}/{name}/{t.dtype}/{list(t.shape)}".encode())
            h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
        for f in json_files:
            h.update(json.dumps(json.loads((dirs[model] / f).read_text()), sort_keys=True).encode())
    return h.hexdigest()


def load(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file or of all the ``*.safetensors`` in a directory."""
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    out = {}
    for f in files:
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def mergekit_yaml(case: str) -> str:
    """The mergekit YAML of one case; model paths are relative (mergekit: to its cwd; skillgraft: to the file)."""
    if case in RAW:
        return yaml.safe_dump(RAW[case], sort_keys=False)
    method, per_model, params, base_weight = CASES[case]
    models = [("./base", base_weight)] if base_weight is not None else []
    models += [(f"./{m}", w) for m, w in zip(RELS, WEIGHTS) if m in ONLY.get(case, RELS)]
    cfg: dict = {
        "merge_method": method,
        "base_model": "./base",
        "models": [{"model": m, "parameters": {"weight": w, **per_model}} for m, w in models],
    }
    if (method == "linear" and base_weight is None) or case in NO_BASE:  # linear: mergekit needs a base weight
        del cfg["base_model"]
    if params:
        cfg["parameters"] = params
    _, dtype, out_dtype = LOW_PRECISION.get(case, (case, "float32", "bfloat16"))
    if dtype is not None:
        cfg["dtype"] = dtype
    cfg["out_dtype"] = out_dtype
    return yaml.safe_dump(cfg, sort_keys=False)


def run_mergekit(python: str, cfg: Path, out: Path, flags: list[str] = MK_FLAGS, script: str = "run_yaml") -> None:
    """``mergekit-yaml CFG OUT`` (or another of mergekit's scripts, e.g. ``moe``) with ``python``'s mergekit, in
    ``cfg``'s directory (its paths are relative)."""
    cmd = [
        python,
        "-c",
        f"import sys; from mergekit.scripts.{script} import main; sys.exit(main())",
        str(cfg),
        str(out),
        *flags,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    res = subprocess.run(cmd, cwd=cfg.parent, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"mergekit {script} failed ({res.returncode}): {' '.join(cmd)}\n{res.stderr[-3000:]}")


def versions(python: str, packages: tuple[str, ...] = ("mergekit", "torch", "transformers")) -> dict[str, str]:
    code = f"import importlib.metadata as m, json; print(json.dumps({{p: m.version(p) for p in {packages!r}}}))"
    return json.loads(subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--mergekit-py",
        default=os.environ.get("SKILLGRAFT_MERGEKIT_PY", "/tmp/mkvenv/bin/python"),
        help="a python with mergekit 0.1.5 (default $SKILLGRAFT_MERGEKIT_PY or /tmp/mkvenv/bin/python)",
    )
    p.add_argument("--cases", nargs="+", choices=sorted(ALL), help="regenerate only these cases (default: all)")
    a = p.parse_args(argv)
    DATA.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dirs = write_inputs(root)
        n_params = sum(t.numel() for t in load(dirs["base"]).values())
        for case in a.cases or ALL:
            text = mergekit_yaml(case)
            (root / f"{case}.yaml").write_text(text)
            run_mergekit(a.mergekit_py, root / f"{case}.yaml", root / f"out-{case}")
            save_file(load(root / f"out-{case}"), str(DATA / f"{case}.safetensors"), metadata={"format": "pt"})
            (DATA / f"{case}.yaml").write_text(text)
            print(f"{case}: {(DATA / f'{case}.safetensors').stat().st_size} bytes")
        meta = {
            "versions": versions(a.mergekit_py),
            "date": time.strftime("%Y-%m-%d"),
            "command": f"mergekit-yaml CASE.yaml OUT {' '.join(MK_FLAGS)}",
            "params": n_params,
            "inputs_sha256": digest(dirs),
            "recipe": {"config": CONFIG, "seed": SEED, "rels": RELS, "noise": NOISE, "weights": WEIGHTS},
        }
        (DATA / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {DATA} ({n_params} parameters per model)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
