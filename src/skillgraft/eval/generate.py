"""Model calls of the harness: batched greedy generation (KV cache, left padding, stop strings) and batched
log-likelihood of a target given a prompt, summed over the target's tokens.

Both sort requests by length, pad on the left with attention masks and explicit position ids, and return
results in the caller's order; a batch scores the same as one request at a time (up to float rounding).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

Counter = Callable[[int, int], None]
BatchHook = Callable[[list[int]], None]  # called with a batch's request indices before its forward passes


def _no_count(done: int, total: int) -> None:
    """Ignore progress."""


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id
    return 0 if pad is None else int(pad)


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids = set()
    for value in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return sorted(ids)


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` [B, T] padded on the left, and ``position_ids`` counting real tokens
    from 0 (so absolute-position models score a padded row like an unpadded one)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(list(s), dtype=torch.long)
            mask[i, width - len(s) :] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": pos.to(device)}


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Prompt token ids with the tokenizer's special tokens (e.g. BOS); never empty (falls back to BOS/EOS)."""
    ids = list(tokenizer(prompt).input_ids)
    if not ids:
        fallback = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ids = [int(fallback if fallback is not None else 0)]
    return ids


def encode_pair(tokenizer: Any, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """(context ids, target ids): ``prompt + target`` encoded as a whole and split after the prompt's tokens,
    or, when a token straddles the boundary, the prompt and target encoded apart."""
    ctx = encode_prompt(tokenizer, prompt)
    if not target:
        return ctx, []
    whole = list(tokenizer(prompt + target).input_ids)
    if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
        return ctx, whole[len(ctx) :]
    return ctx, list(tokenizer(target, add_special_tokens=False).input_ids)


def _by_length(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Index batches, longest first (an out-of-memory shows at once, and rows in a batch have similar lengths)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


# ---------------------------------------------------------------------------------------------------------------
# Generation


def _stop_criteria(tokenizer: Any, prompt_width: int, stops: Sequence[str]) -> Any:
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopOnStrings(StoppingCriteria):
        """Per-row: done once the decoded new text contains a stop string."""

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kw: Any) -> torch.Tensor:
            texts = tokenizer.batch_decode(input_ids[:, prompt_width:], skip_special_tokens=True)
            return torch.tensor([any(s in t for s in stops) for t in texts], device=input_ids.device)

    return StoppingCriteriaList([StopOnStrings()])


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


@dataclass(frozen=True)
class GenerateParams:
    """How :func:`generate` decodes: greedy, at most ``max_new_tokens``, stopping at EOS or a stop string."""

    max_new_tokens: int
    stop: tuple[str, ...] = ()
    batch_size: int = 8


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    params: GenerateParams,
    count: Counter = _no_count,
    before_batch: BatchHook | None = None,
) -> list[str]:
    """Greedy continuations of ``prompts`` (KV cache via ``model.generate``), cut at EOS and stop strings.

    ``before_batch`` sees each batch's request indices (in its row order) before the batch runs: routed
    inference sets each row's skill there (``skillgraft.route.SkillRuntime``).

    A :class:`skillgraft.transfer.FusedModel` (large base steered by small experts) decodes with its own loop.
    """
    from transformers import GenerationConfig

    if hasattr(model, "harness_generate"):
        return model.harness_generate(list(prompts), params.max_new_tokens, tuple(params.stop), params.batch_size)

    eos, pad = _eos_ids(model, tokenizer), _pad_id(tokenizer)
    config = GenerationConfig(
        max_new_tokens=params.max_new_tokens,
        do_sample=False,
        num_beams=1,
        use_cache=True,
        pad_token_id=pad,
        eos_token_id=eos or None,
    )
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    out: list[str] = [""] * len(prompts)
    done = 0
    count(0, len(prompts))
    for batch in _by_length([len(e) for e in encoded], params.batch_size):
        enc = left_pad([encoded[i] for i in batch], pad, _device(model))
        width = enc["input_ids"].shape[1]
        stopping = _stop_criteria(tokenizer, width, params.stop) if params.stop else None
        if before_batch is not None:
            before_batch(batch)
        with torch.no_grad():
            ids = model.generate(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                generation_config=config,
                stopping_criteria=stopping,
            )
        for row, i in enumerate(batch):
            new = ids[row, width:].tolist()
            end = next((k for k, t in enumerate(new) if t in eos), len(new))
            text = tokenizer.decode(new[:end], skip_special_tokens=True)
            out[i] = cut_at_stop(text, params.stop)
        done += len(batch)
        count(done, len(prompts))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Log-likelihood


@dataclass(frozen=True)
class Loglik:
    """``log p(target | prompt)`` summed over the target's ``tokens``; ``greedy``: every target token is the argmax."""

    total: float
    tokens: int
    greedy: bool

    @property
    def mean(self) -> float:
        """Per-token mean (0 for an empty target)."""
        return self.total / self.tokens if self.tokens else 0.0


def _accepts(model: Any, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def loglikelihood(
    model: Any,
    tokenizer: Any,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 8,
    count: Counter = _no_count,
    before_batch: BatchHook | None = None,
) -> list[Loglik]:
    """Score each ``(prompt, target)`` pair in batches: one forward pass over ``prompt + target[:-1]``
    (``before_batch`` as in :func:`generate`).

    A FusedModel scores under its fused, renormalised distribution.
    """
    if hasattr(model, "harness_loglik"):
        return [Loglik(t, n, g) for t, n, g in model.harness_loglik(list(requests))]
    pairs = [encode_pair(tokenizer, p, t) for p, t in requests]
    results: list[Loglik | None] = [Loglik(0.0, 0, True) if not cont else None for _, cont in pairs]
    todo = [i for i, r in enumerate(results) if r is None]
    seqs = {i: (pairs[i][0] + pairs[i][1])[:-1] for i in todo}
    pad, keep = _pad_id(tokenizer), _accepts(model, "logits_to_keep")
    done = len(requests) - len(todo)
    count(done, len(requests))
    for chunk in _by_length([len(seqs[i]) for i in todo], batch_size):
        batch = [todo[k] for k in chunk]
        n_cont = [len(pairs[i][1]) for i in batch]
        enc = left_pad([seqs[i] for i in batch], pad, _device(model))
        kw = {"logits_to_keep": max(n_cont)} if keep else {}
        if before_batch is not None:
            before_batch(batch)
        with torch.no_grad():
            logits = model(**enc, use_cache=False, **kw).logits  # [B, K, V], the last K positions
        logp = torch.log_softmax(logits[:, -max(n_cont) :].float(), dim=-1)
        for row, (i, n) in enumerate(zip(batch, n_cont)):
            target = torch.tensor(pairs[i][1], device=logp.device)
            lp = logp[row, logp.shape[1] - n :]  # [n, V]: position t predicts target token t
            total = lp.gather(-1, target[:, None]).sum().item()
            results[i] = Loglik(float(total), n, bool((lp.argmax(-1) == target).all()))
        done += len(batch)
        count(done, len(requests))
    return [r for r in results if r is not None]
