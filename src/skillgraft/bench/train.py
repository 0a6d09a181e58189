"""Training and scoring SkillBench's tiny Llama models: pretraining on the generic mixture, full and LoRA
fine-tunes (loss on target tokens only), and batched greedy exact match with left padding and a KV cache.
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

Example = dict[str, str]
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelSize:
    """A Llama shape (multi-head attention, no grouped keys/values)."""

    hidden: int
    layers: int
    intermediate: int
    heads: int

    def config(self, tok: Any) -> Any:
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=len(tok),
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.heads,
            max_position_embeddings=32,
            tie_word_embeddings=True,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            bos_token_id=tok.eos_token_id,
        )


@dataclass(frozen=True)
class Stage:
    """One training run: AdamW at peak ``lr``, 5% linear warm-up then cosine decay to 10% of ``lr``."""

    steps: int
    lr: float
    batch: int = 64


def new_model(size: ModelSize, tok: Any, seed: int) -> Any:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(size.config(tok)).eval()


def n_params(model: torch.nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def encode(tok: Any, rows: Sequence[Example]) -> list[tuple[list[int], int]]:
    """Token ids of prompt + target + eos, and how many of them are prompt (masked from the loss)."""
    out = []
    for r in rows:
        p = tok(r["prompt"], add_special_tokens=False).input_ids
        t = tok(r["target"], add_special_tokens=False).input_ids
        out.append((p + t + [tok.eos_token_id], len(p)))
    return out


def _batch(items: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and labels (-100 on prompt and padding)."""
    width = max(len(ids) for ids, _ in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    for i, (seq, n_prompt) in enumerate(items):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, n_prompt : len(seq)] = ids[i, n_prompt : len(seq)]
    return ids, mask, labels


def _lr_at(step: int, stage: Stage) -> float:
    warm = max(1, stage.steps // 20)
    if step < warm:
        return stage.lr * (step + 1) / warm
    t = (step - warm) / max(1, stage.steps - warm)
    return stage.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train(
    model: torch.nn.Module,
    tok: Any,
    rows: Sequence[Example],
    stage: Stage,
    seed: int,
    on_step: Callable[[int], None] | None = None,
) -> float:
    """Teacher-forced training on ``rows`` (batches drawn with replacement from a seeded generator); returns the
    mean loss of the last 10% of steps. Only parameters with ``requires_grad`` are trained (LoRA: the adapter)."""
    data = encode(tok, rows)
    rng = random.Random(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=stage.lr, weight_decay=0.0)
    model.train()
    tail: list[float] = []
    for step in range(stage.steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, stage)
        ids, mask, labels = _batch([data[rng.randrange(len(data))] for _ in range(stage.batch)], tok.pad_token_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step >= stage.steps * 0.9:
            tail.append(float(loss.detach()))
        if on_step:
            on_step(step + 1)
    model.eval()
    return sum(tail) / max(1, len(tail))


def with_lora(model: torch.nn.Module, rank: int, seed: int) -> Any:
    """Wrap ``model`` in a PEFT LoRA adapter on every attention and MLP projection (alpha = 2 × rank)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:  # pragma: no cover - peft is a dev dependency
        from skillgraft.errors import UnsupportedError

        raise UnsupportedError("building SkillBench's LoRA experts needs peft", hint="pip install peft") from e
    # peft (0.21) calls a transformers method that transformers 5 deprecates, once per training step.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(LORA_TARGETS))
    return get_peft_model(model, cfg)


@torch.no_grad()
def exact_match(model: Any, tok: Any, rows: Sequence[Example], batch_size: int = 256) -> float:
    """Share of rows whose greedy continuation (up to eos) equals the target exactly; batched, left-padded."""
    if not rows:
        return 0.0
    model.eval()
    hits = 0
    max_new = max(len(tok(r["target"], add_special_tokens=False).input_ids) for r in rows) + 1
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        enc = tok([r["prompt"] for r in chunk], return_tensors="pt", padding=True, padding_side="left")
        out = model.generate(
            input_ids=enc.input_ids,
            attention_mask=enc.attention_mask,
            max_new_tokens=max_new,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        texts = tok.batch_decode(out[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
        hits += sum(t == r["target"] for t, r in zip(texts, chunk))
    return hits / len(rows)
