"""Inputs and golden outputs of the mixture-of-experts differential test against mergekit-moe (test_moe.py).

A tiny Llama base (tied embeddings, bf16, a word-level tokenizer) and three fine-tunes of it are generated from
a seed, tensor by tensor; mergekit-moe 0.1.5 builds a Mixtral model from them for each case below, and its output
tensors and config.json are stored in data/mergekit_moe/ (about 25 KB a case). The inputs are not committed: the
test regenerates them and checks their digest against the one recorded in meta.json.

Regenerate (mergekit lives in its own venv, never in skillgraft's)::

    python3 -m venv /tmp/mkvenv && /tmp/mkvenv/bin/pip install torch==2.13.0 mergekit==0.1.5
    .venv/bin/python tests/merge/make_mergekit_moe.py --mergekit-py /tmp/mkvenv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import zlib
from pathlib import Path

import torch
import yaml
from make_mergekit_e2e import digest, load, run_mergekit, versions
from safetensors.torch import save_file

DATA = Path(__file__).resolve().parent / "data" / "mergekit_moe"
# ~12k parameters; spelled out (not conftest.llama_config) so the committed goldens never move with fixtures
CONFIG = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    vocab_size=64,
    max_position_embeddings=64,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
)
SEED = 0
WORDS = (
    "<unk> <s> </s> solve add sum two three numbers math equation what is plus minus times write a poem about "
    "the sea moon story love sing code python function list sort return def class print"
).split()
# ft_c also changes its attention: a MoE takes attention from base_model only, as mergekit's does
EXPERTS = {"ft_a": ("mlp",), "ft_b": ("mlp",), "ft_c": ("mlp", "self_attn")}
PROMPTS = {
    "ft_a": (["solve two plus three", "what is the sum of two numbers", "math equation"], ["write a poem"]),
    "ft_b": (["write a poem about the sea", "sing a love story", "the moon"], []),
    "ft_c": (["def function return", "sort a list in python", "print class"], ["math"]),
}
MK_FLAGS = ["--random-seed", "0", "--no-write-model-card", "--no-copy-tokenizer"]
# name: top-level keys besides base_model/experts, per-expert extra keys, whether the experts carry prompts
CASES: dict[str, tuple[dict, dict, bool]] = {
    "hidden": ({"gate_mode": "hidden", "dtype": "bfloat16"}, {}, True),
    "hidden_avg": ({"gate_mode": "hidden_avg", "dtype": "bfloat16", "experts_per_token": 1}, {}, True),
    "cheap_embed": ({"gate_mode": "cheap_embed"}, {}, True),  # no dtype: the base config's (bfloat16)
    "random_fp32": ({"gate_mode": "random", "dtype": "float32", "experts_per_token": 1}, {}, False),
    "uniform_random": ({"gate_mode": "uniform_random", "dtype": "bfloat16"}, {}, True),  # mergekit wants prompts
    # noise drawn after the gates, per layer, expert, then gate/down/up projection; residual_scale on down_proj
    "random_noise": (
        {"gate_mode": "random", "dtype": "bfloat16"},
        {"ft_a": {"noise_scale": 0.01}, "ft_c": {"noise_scale": 0.05, "residual_scale": 0.5}},
        False,
    ),
    "hidden_noise": ({"gate_mode": "hidden"}, {"ft_b": {"noise_scale": 0.02, "residual_scale": 2.0}}, True),
}


def tiny_tokenizer(words: list[str] | tuple[str, ...] = WORDS):
    """A word-level fast tokenizer (``<s>`` BOS, ``</s>`` EOS, ``<unk>``) built with the ``tokenizers`` library."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_input_names=["input_ids", "attention_mask"],
    )


def _names() -> tuple[dict, list[tuple[str, tuple[int, ...]]]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**CONFIG, dtype="bfloat16")
    config.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    layout = [(n, tuple(t.shape)) for n, t in model.state_dict().items() if n != "lm_head.weight"]
    return config.to_diff_dict(), layout  # what save_pretrained writes


def _draw(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randn(shape, generator=g)


def write_inputs(root: Path) -> dict[str, Path]:
    """base, ft_a, ft_b, ft_c under ``root`` (bf16 ``model.safetensors`` + ``config.json``; the base also has
    the tokenizer); the same bytes every run."""
    cfg, names = _names()
    states: dict[str, dict[str, torch.Tensor]] = {"base": {}, **{e: {} for e in EXPERTS}}
    for name, shape in names:
        w = 1 + 0.1 * _draw(name, shape, SEED) if len(shape) == 1 else 0.2 * _draw(name, shape, SEED)
        states["base"][name] = w.to(torch.bfloat16)
        for k, (expert, parts) in enumerate(EXPERTS.items()):
            d = 0.05 * _draw(name, shape, SEED + k + 1) if any(f".{p}." in name for p in parts) else 0
            states[expert][name] = (w + d).to(torch.bfloat16)
    dirs = {}
    for model, state in states.items():
        d = dirs[model] = root / model
        d.mkdir(parents=True, exist_ok=True)
        save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    tiny_tokenizer().save_pretrained(dirs["base"])
    return dirs


def moe_yaml(case: str) -> str:
    """The mergekit-moe YAML of one case; model paths are relative (mergekit: to its cwd; skillgraft: to the
    file)."""
    top, per_expert, prompts = CASES[case]
    experts = []
    for name in EXPERTS:
        e: dict = {"source_model": f"./{name}"}
        if prompts:
            pos, neg = PROMPTS[name]
            e["positive_prompts"] = pos
            if neg:
                e["negative_prompts"] = neg
        e.update(per_expert.get(name, {}))
        experts.append(e)
    return yaml.safe_dump({"base_model": "./base", **top, "experts": experts}, sort_keys=False)


def run_mergekit_moe(python: str, cfg: Path, out: Path) -> None:
    """``mergekit-moe CFG OUT`` with ``python``'s mergekit, in ``cfg``'s directory (its paths are relative)."""
    run_mergekit(python, cfg, out, MK_FLAGS, "moe")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--mergekit-py",
        default=os.environ.get("SKILLGRAFT_MERGEKIT_PY", "/tmp/mkvenv/bin/python"),
        help="a python with mergekit 0.1.5 (default $SKILLGRAFT_MERGEKIT_PY or /tmp/mkvenv/bin/python)",
    )
    a = p.parse_args(argv)
    DATA.mkdir(parents=True, exist_ok=True)
    configs = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dirs = write_inputs(root)
        for case in CASES:
            text = moe_yaml(case)
            (root / f"{case}.yaml").write_text(text)
            run_mergekit_moe(a.mergekit_py, root / f"{case}.yaml", root / f"out-{case}")
            save_file(load(root / f"out-{case}"), str(DATA / f"{case}.safetensors"), metadata={"format": "pt"})
            configs[case] = json.loads((root / f"out-{case}" / "config.json").read_text())
            (DATA / f"{case}.yaml").write_text(text)
            print(f"{case}: {(DATA / f'{case}.safetensors').stat().st_size} bytes")
        meta = {
            "versions": versions(a.mergekit_py, ("mergekit", "torch", "transformers", "tokenizers")),
            "date": time.strftime("%Y-%m-%d"),
            "command": f"mergekit-moe CASE.yaml OUT {' '.join(MK_FLAGS)}",
            "inputs_sha256": digest(dirs),
            "configs": configs,
        }
        (DATA / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
