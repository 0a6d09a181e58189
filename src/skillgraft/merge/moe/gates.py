"""Router weights of a mixture of experts: one (experts × hidden) matrix per layer, computed as mergekit-moe does.

Modes (mergekit 0.1.5's definitions; tensors are ``(layers, experts, hidden)``):

* ``random``: standard normal draws, ``randn(L, E, H)`` from one generator seeded with the run's seed — the same
  numbers mergekit-moe draws with ``--random-seed`` set to that seed;
* ``uniform_random``: uniform on [−b, b) with b = √(1/H) (torch.nn.Linear's default init), ``u·2·b − b`` for
  ``u = rand(L, E, H)`` from that generator;
* ``hidden`` / ``hidden_last``: the base runs (in bfloat16, as mergekit runs it) over each expert's positive prompts;
  the hidden state entering layer i at the last token, averaged over the prompts, minus the same for the negative
  prompts, scaled to unit length, is row e of layer i's router;
* ``hidden_avg``: the same with each prompt's hidden states averaged over its positions — all of them, the left
  padding included, as mergekit averages them;
* ``cheap_embed``: the prompts' token embeddings (fp32) summed over their real tokens and over the prompts, unit
  length; minus the negative prompts' vector; unit length again; the same row for every layer.

Prompts are tokenized as mergekit tokenizes them: the base's tokenizer, the BOS token's text prefixed to each
prompt, no other special tokens, left padding with the BOS token (the EOS token without one). Unit length means
x / max(‖x‖₂, 1e-8).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from skillgraft.errors import InputError
from skillgraft.io import Checkpoint
from skillgraft.merge.moe.config import MoeConfig, MoeExpert
from skillgraft.progress import ProgressFn, no_progress

EMBED = "model.embed_tokens.weight"
# mergekit warns when a layer's router matrix has a condition number above this: its gates barely differ
DEGENERATE_COND = 5.0


def gate_dtype(mode: str) -> torch.dtype:
    """The dtype the gates are computed in (the output's dtype when the config and the base name none)."""
    return torch.bfloat16 if mode.startswith("hidden") else torch.float32


def gate_weights(
    config: MoeConfig,
    base: Checkpoint,
    layers: int,
    generator: torch.Generator,
    progress: ProgressFn = no_progress,
) -> torch.Tensor:
    """The routers of every layer, ``(layers, experts, hidden)``; random modes draw from ``generator``."""
    hidden = int(base.shape(EMBED)[1])
    shape = (layers, len(config.experts), hidden)
    if config.gate_mode == "random":
        return torch.randn(shape, generator=generator)
    if config.gate_mode == "uniform_random":
        bound = math.sqrt(1.0 / hidden)
        return torch.rand(shape, generator=generator) * 2 * bound - bound
    tokenizer = load_tokenizer(base.path)
    if config.gate_mode == "cheap_embed":
        embed = base.get(EMBED).float()
        return _per_expert(config.experts, lambda p: _embedding_mean(embed, tokenize(tokenizer, p)), layers, progress)
    model = _load_bf16(base.path)  # freed on return, before any expert is read
    last = config.gate_mode != "hidden_avg"
    return _per_expert(config.experts, lambda p: _hidden_mean(model, tokenize(tokenizer, p), last), None, progress)


def _per_expert(experts: tuple[MoeExpert, ...], embed_prompts: Any, layers: int | None, progress: ProgressFn):
    """Row e of every layer: unit(v(positive) − v(negative)); ``embed_prompts`` maps prompts to ``(L, H)`` or,
    for ``cheap_embed``, ``(1, H)`` repeated over ``layers``."""
    rows = []
    for e, expert in enumerate(experts):
        v = embed_prompts(list(expert.positive_prompts))
        if expert.negative_prompts:
            v = v - embed_prompts(list(expert.negative_prompts))
        rows.append(_unit(v))
        progress("gates (prompt passes)", e + 1, len(experts))
    gates = torch.stack(rows, dim=1)  # (L, E, H)
    return gates.expand(layers, -1, -1).contiguous() if layers is not None else gates


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)


def load_tokenizer(path: Path) -> Any:
    """The base's tokenizer, set up to pad on the left with its BOS token (its EOS token without one)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise InputError(
            f"{path}: cannot load the base's tokenizer ({str(e).splitlines()[0]})",
            hint="prompt-based gate modes need the base's tokenizer files; or use gate_mode random",
        ) from e
    tok.padding_side = "left"
    if tok.bos_token_id is not None:
        tok.pad_token_id = tok.bos_token_id
    elif tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    else:
        raise InputError(
            f"{path}: the base's tokenizer has neither a BOS nor an EOS token to pad prompts with",
            hint="set bos_token in its tokenizer_config.json, or use gate_mode random",
        )
    return tok


def tokenize(tokenizer: Any, prompts: list[str]) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` ``(prompts, positions)``, each prompt after the BOS token's text."""
    bos = tokenizer.bos_token or ""
    enc = tokenizer([bos + p for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _embedding_mean(embed: torch.Tensor, enc: dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ over prompts of Σ over real tokens of the token embeddings, unit length: ``(1, H)``."""
    ids = enc["input_ids"]
    if int(ids.max()) >= embed.shape[0]:
        raise InputError(
            f"the tokenizer gives token id {int(ids.max())}, beyond the base's {embed.shape[0]} embedding rows",
            hint="base_model's tokenizer files do not belong to its weights",
        )
    h = embed[ids] * enc["attention_mask"].unsqueeze(-1)  # (B, S, H), fp32
    return _unit(h.sum(dim=1).sum(dim=0, keepdim=True))


def _load_bf16(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).eval()


def _hidden_mean(model: Any, enc: dict[str, torch.Tensor], last: bool) -> torch.Tensor:
    """The hidden state entering each decoder layer, at the last position (or averaged over positions), averaged
    over the prompts: ``(L, H)`` in bfloat16."""
    with torch.no_grad():
        out = model(**enc, output_hidden_states=True, return_dict=True)
    states = torch.stack(out.hidden_states[:-1])  # (L, B, S, H): embeddings, then each layer's output but the last
    per_prompt = states[:, :, -1, :] if last else states.sum(dim=2) / states.shape[2]  # (L, B, H)
    return per_prompt.sum(dim=1) / per_prompt.shape[1]


def degenerate_layers(gates: torch.Tensor) -> list[int]:
    """Layers whose router rows are nearly dependent (condition number > 5, mergekit's warning)."""
    if gates.shape[1] < 2:
        return []
    return [i for i in range(gates.shape[0]) if float(torch.linalg.cond(gates[i].float())) > DEGENERATE_COND]
