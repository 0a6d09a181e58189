"""Inputs and golden outputs of the tokenizer-merge differential test against mergekit (test_vocab.py).

Three tiny Llamas (untied embeddings, bf16) with three different tokenizers are generated from a seed: ``base``
(a BPE vocabulary with one added token past its vocab_size, which mergekit strips), ``ft_a`` (the base's words,
five of its own and two special chat tokens) and ``ft_b`` (most of the base's words in another order, two of ft_a's,
two of its own, one of its chat tokens, two padding rows). mergekit 0.1.5 merges them for each case
below; its output tensors, config.json and tokenizer files are stored in data/mergekit_vocab/CASE/ (about 20 KB a
case). The inputs are not committed: the test regenerates them and checks their digest against meta.json.

Regenerate (mergekit lives in its own venv, never in skillgraft's)::

    .venv/bin/python tests/merge/make_mergekit_vocab.py --mergekit-py /tmp/mkvenv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import make_mergekit_e2e as e2e
import torch
import yaml
from make_mergekit_e2e import load  # noqa: F401  (re-exported: test_vocab.py reads outputs with it)
from safetensors.torch import save_file

DATA = Path(__file__).resolve().parent / "data" / "mergekit_vocab"
# spelled out (not conftest.llama_config) so the committed goldens never move with shared fixtures
CONFIG = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=64,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)
SEED = 0
SPECIAL = ["<unk>", "<s>", "</s>"]
WORDS = [f"w{i}" for i in range(20)]
# (plain vocabulary in id order, added tokens as (content, special), padding rows past the tokenizer)
MODELS: dict[str, tuple[list[str], list[tuple[str, bool]], int]] = {
    "base": (SPECIAL + WORDS, [("<extra>", False)], -1),  # -1: vocab_size one short of the tokenizer (stripped)
    "ft_a": (SPECIAL + WORDS + [f"a{i}" for i in range(5)], [("<|im_start|>", True), ("<|im_end|>", True)], 0),
    "ft_b": (SPECIAL + ["b0", "b1"] + WORDS[:10][::-1] + ["a0", "a1"] + WORDS[10:18], [("<|im_end|>", True)], 2),
}
TEMPLATE_A = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
TEMPLATE = "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '\\n' }}{% endfor %}"
MK_FLAGS = ["--lazy-unpickle", "--random-seed", "0", "--no-write-model-card"]
_MODELS = [{"model": "./ft_a", "parameters": {"weight": 0.6}}, {"model": "./ft_b", "parameters": {"weight": 0.4}}]
CASES: dict[str, dict] = {
    # the union of the three vocabularies (tokens only ft_a has take its rows, ft_a and ft_b's shared ones their mean)
    "union_task_arithmetic": {
        "models": _MODELS,
        "merge_method": "task_arithmetic",
        "base_model": "./base",
        "parameters": {"lambda": 0.9},
        "tokenizer_source": "union",
        "dtype": "float32",
        "out_dtype": "bfloat16",
    },
    # the base's (stripped) vocabulary, padded to a multiple of 8 (padding rows: the mean of the others), in bf16
    "base_task_arithmetic": {
        "models": _MODELS,
        "merge_method": "task_arithmetic",
        "base_model": "./base",
        "tokenizer": {"source": "base", "pad_to_multiple_of": 8},
        "dtype": "bfloat16",
    },
    # no base_model: no model's rows take precedence, tokens several models have are averaged
    "union_linear": {
        "models": [{"model": "./base", "parameters": {"weight": 0.5}}, *_MODELS],
        "merge_method": "linear",
        "tokenizer_source": "union",
        "dtype": "bfloat16",
    },
    # a model's tokenizer, an inline chat template
    "model_source_template": {
        "models": _MODELS,
        "merge_method": "task_arithmetic",
        "base_model": "./base",
        "tokenizer_source": "./ft_a",
        "chat_template": TEMPLATE,
        "dtype": "float32",
        "out_dtype": "bfloat16",
    },
    # tokenizer.tokens: a donor model, zeros, another token's row (forced), a token new to every model
    "union_tokens": {
        "models": _MODELS,
        "merge_method": "task_arithmetic",
        "base_model": "./base",
        "tokenizer": {
            "source": "union",
            "tokens": {
                "<|im_end|>": {"source": "./ft_b", "force": True},
                "a2": {"source": {"kind": "zero"}},
                "w3": {"source": {"kind": "model_token", "model": "./ft_b", "token": "b0"}, "force": True},
                "<new>": {"source": {"kind": "model_token", "model": "./ft_a", "token_id": 4}},
            },
        },
        "chat_template": "auto",
        "dtype": "bfloat16",
    },
    # chat_template without a tokenizer source: mergekit re-saves the donor model's tokenizer with it
    "template_only": {
        "models": [{"model": "./ft_a"}],
        "merge_method": "passthrough",
        "chat_template": TEMPLATE,
        "dtype": "bfloat16",
    },
}


def save_tokenizer(path: Path, model: str) -> None:
    """A PreTrainedTokenizerFast (whitespace pre-tokenizer; BPE without merges for the base, word-level else)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    plain, added, _ = MODELS[model]
    vocab = {t: i for i, t in enumerate(plain)}
    kind = models.BPE(vocab, [], unk_token="<unk>") if model == "base" else models.WordLevel(vocab, unk_token="<unk>")
    tok = Tokenizer(kind)
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tok.add_tokens([AddedToken(t, special=s, normalized=not s) for t, s in added])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if model == "ft_a":
        fast.chat_template = TEMPLATE_A
    fast.save_pretrained(path)


def vocab_of(model: str) -> list[str]:
    plain, added, _ = MODELS[model]
    return plain + [t for t, _ in added]


def write_inputs(root: Path) -> dict[str, Path]:
    """base, ft_a and ft_b under ``root`` (bf16 ``model.safetensors``, config.json, tokenizer); same bytes every
    run. Rows of tokens the base has are the base's plus a small delta; other rows are new draws."""
    from transformers import LlamaConfig, LlamaForCausalLM

    g = torch.Generator().manual_seed(SEED)
    dirs = {}
    base_rows: dict[str, dict[str, torch.Tensor]] = {}
    base_state: dict[str, torch.Tensor] = {}
    for k, model in enumerate(MODELS):
        tokens = vocab_of(model)
        rows = len(tokens) + MODELS[model][2]
        config = LlamaConfig(**CONFIG, vocab_size=rows, dtype="bfloat16")
        config.architectures = ["LlamaForCausalLM"]
        with torch.device("meta"):
            shapes = {n: tuple(t.shape) for n, t in LlamaForCausalLM(config).state_dict().items()}
        state = {}
        for name, shape in shapes.items():
            if name.endswith(("embed_tokens.weight", "lm_head.weight")):
                t = torch.randn((rows, shape[1]), generator=g) * 0.5
                for i, tok in enumerate(tokens[:rows]):
                    if model != "base" and tok in base_rows[name]:
                        t[i] = base_rows[name][tok] + 0.05 * torch.randn(shape[1], generator=g)
                if model == "base":
                    base_rows[name] = {tok: t[i].clone() for i, tok in enumerate(tokens[:rows])}
            elif model == "base":
                t = torch.randn(shape, generator=g) * 0.3 + (1.0 if name.endswith("norm.weight") else 0.0)
                base_state[name] = t
            else:
                t = base_state[name] + 0.02 * (k + 1) * torch.randn(shape, generator=g)
            state[name] = t.to(torch.bfloat16)
        d = dirs[model] = root / model
        d.mkdir(parents=True, exist_ok=True)
        save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        save_tokenizer(d, model)
    return dirs


def digest(dirs: dict[str, Path]) -> str:
    """sha256 over every input tensor (name, dtype, shape, raw bytes) and tokenizer.json."""
    return e2e.digest(dirs, ("tokenizer.json",))


def run_mergekit(python: str, cfg: Path, out: Path) -> None:
    """``mergekit-yaml CFG OUT`` with ``python``'s mergekit and this script's flags, in ``cfg``'s directory."""
    e2e.run_mergekit(python, cfg, out, MK_FLAGS)


KEEP = ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mergekit-py", default=os.environ.get("SKILLGRAFT_MERGEKIT_PY", "/tmp/mkvenv/bin/python"))
    p.add_argument("--cases", nargs="+", choices=sorted(CASES), help="regenerate only these cases (default: all)")
    a = p.parse_args(argv)
    DATA.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dirs = write_inputs(root)
        for case in a.cases or CASES:
            text = yaml.safe_dump(CASES[case], sort_keys=False)
            (root / f"{case}.yaml").write_text(text)
            run_mergekit(a.mergekit_py, root / f"{case}.yaml", root / f"out-{case}")
            dest = DATA / case
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir()
            for f in KEEP:
                if (root / f"out-{case}" / f).exists():
                    shutil.copy2(root / f"out-{case}" / f, dest / f)
            (dest / "mergekit.yaml").write_text(text)
            print(case, sorted(os.listdir(root / f"out-{case}")))
        meta = {
            "inputs_sha256": digest(dirs),
            "date": time.strftime("%Y-%m-%d"),
            **json.loads(
                subprocess.run(
                    [
                        a.mergekit_py,
                        "-c",
                        "import importlib.metadata as m, json; print(json.dumps({p: m.version(p) "
                        "for p in ('mergekit', 'torch', 'transformers', 'tokenizers')}))",
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
            ),
        }
        (DATA / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
