"""Step-wise batched decoding with a KV cache, for the server: each row has its own length, stop strings and
sampling, streams text deltas as it goes, and leaves the batch (and its cache) the step it finishes.

Rows are left-padded with an attention mask and position ids counting real tokens, as ``eval.generate`` pads
them, so a greedy row gives the same text as ``generate`` (EOS ends a row and is not part of the text; a stop
string ends it and is cut off). ``context(active)`` wraps every forward pass, given the indices of the rows in
it: the server sets each row's skill there (``SkillRuntime.rows``).
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from skillgraft.errors import InputError
from skillgraft.eval.generate import _device, _eos_ids, _pad_id, cut_at_stop, left_pad

Context = Callable[[list[int]], AbstractContextManager[Any]]


@dataclass(frozen=True)
class Sampling:
    """How one row decodes. ``temperature == 0`` is greedy; ``seed`` None draws a fresh one."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise InputError("max_tokens must be >= 1")
        if not (self.temperature >= 0 and 0 < self.top_p <= 1 and self.top_k >= 0):
            raise InputError("need temperature >= 0, top_p in (0, 1] and top_k >= 0")


@dataclass
class Row:
    """One prompt to continue. ``on_delta`` gets new text as it becomes final; ``alive`` False drops the row."""

    ids: list[int]
    sampling: Sampling = field(default_factory=Sampling)
    on_delta: Callable[[str], None] | None = None
    alive: Callable[[], bool] | None = None


@dataclass(frozen=True)
class Finished:
    """A row's whole text, its generated token count and why it ended (``stop``, ``length`` or ``cancelled``)."""

    text: str
    tokens: int
    finish_reason: str


@dataclass
class StepTimes:
    """Forward passes of ``decode``, summed over calls: prefills and decode steps, their wall seconds (the forward
    and its skill context only), and the rows the decode steps carried (Σ batch size over steps)."""

    prefills: int = 0
    prefill_s: float = 0.0
    steps: int = 0
    step_s: float = 0.0
    row_steps: int = 0

    def as_dict(self) -> dict[str, float | int]:
        return {k: getattr(self, k) for k in ("prefills", "prefill_s", "steps", "step_s", "row_steps")}


class _State:
    """A row while it decodes: its tokens, its text so far and how much of that text was already sent."""

    def __init__(self, row: Row, device: torch.device) -> None:
        self.row, self.new, self.text, self.sent = row, [], "", 0
        self.done: Finished | None = None
        s = row.sampling
        self.gen = None
        if s.temperature > 0:
            self.gen = torch.Generator(device).manual_seed(s.seed if s.seed is not None else secrets.randbits(63))
        self.hold = max((len(x) for x in s.stop), default=1) - 1  # a stop string may be forming at the end

    def push(self, token: int, tokenizer: Any, eos: set[int]) -> None:
        s = self.row.sampling
        if self.row.alive is not None and not self.row.alive():
            self.done = Finished(self.text, len(self.new), "cancelled")
            return
        if token in eos:
            self._finish("stop")
            return
        self.new.append(token)
        self.text = tokenizer.decode(self.new, skip_special_tokens=True)
        if s.stop:
            cut = cut_at_stop(self.text, s.stop)
            if len(cut) < len(self.text):
                self.text = cut
                self._finish("stop")
                return
        if len(self.new) >= s.max_tokens:
            self._finish("length")
            return
        self._send(self._stable())

    def _stable(self) -> int:
        """How much of the text cannot change any more: not a trailing partial character, whitespace (a
        decoder's clean-up may still merge it) or the start of a stop string."""
        end = len(self.text)
        while end > self.sent and (self.text[end - 1] == "\ufffd" or self.text[end - 1].isspace()):
            end -= 1
        for k in range(min(self.hold, end - self.sent), 0, -1):
            if any(x.startswith(self.text[end - k : end]) for x in self.row.sampling.stop):
                return end - k
        return end

    def _send(self, upto: int) -> None:
        if upto > self.sent and self.row.on_delta is not None:
            self.row.on_delta(self.text[self.sent : upto])
        self.sent = max(self.sent, upto)

    def _finish(self, reason: str) -> None:
        self._send(len(self.text))
        self.done = Finished(self.text, len(self.new), reason)


def _sample(logits: torch.Tensor, s: Sampling, gen: torch.Generator) -> int:
    """One token from ``logits`` [V] at ``s.temperature`` after top-k, then top-p (nucleus) filtering."""
    z = logits / s.temperature
    if s.top_k:
        kth = torch.topk(z, min(s.top_k, z.shape[-1])).values[-1]
        z = z.masked_fill(z < kth, -math.inf)
    if s.top_p < 1:
        sorted_z, order = torch.sort(z, descending=True)
        p = torch.softmax(sorted_z, -1)
        drop = p.cumsum(-1) - p > s.top_p  # keep the smallest prefix whose mass reaches top_p
        z = z.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), -math.inf)
    return int(torch.multinomial(torch.softmax(z, -1), 1, generator=gen))


def _new_cache(model: Any) -> Any:
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # transformers < 4.56
        return DynamicCache()


def _forward_args(model: Any) -> tuple[str, dict[str, int]]:
    """The cache argument's name (``cache`` from transformers 5.x, before that ``past_key_values``) and
    ``logits_to_keep=1`` where the model takes it (the prefill then computes one position's logits)."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}  # type: ignore[assignment]
    return ("cache" if "cache" in params else "past_key_values"), (
        {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    )


@torch.no_grad()
def decode(
    model: Any, tokenizer: Any, rows: Sequence[Row], context: Context | None = None, times: StepTimes | None = None
) -> list[Finished]:
    """Continue every row in one batch (left padding, KV cache); results in the rows' order. ``times``, when
    given, accumulates the forward passes' count and wall time."""
    if not rows:
        return []
    wrap: Context = context or (lambda active: nullcontext())
    device, eos = _device(model), set(_eos_ids(model, tokenizer))
    cache_arg, keep = _forward_args(model)
    states = [_State(r, device) for r in rows]
    enc = left_pad([r.ids for r in rows], _pad_id(tokenizer), device)
    ids, mask, pos = enc["input_ids"], enc["attention_mask"], enc["position_ids"]
    cache, active = _new_cache(model), list(range(len(rows)))  # the cache is updated in place
    prefill = True
    while True:
        t0 = time.perf_counter()
        with wrap(active):
            out = model(
                input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{cache_arg: cache}, **keep
            )
        if times is not None:
            spent = time.perf_counter() - t0
            if prefill:
                times.prefills, times.prefill_s = times.prefills + 1, times.prefill_s + spent
            else:
                times.steps, times.step_s, times.row_steps = (
                    times.steps + 1,
                    times.step_s + spent,
                    times.row_steps + len(active),
                )
        prefill = False
        logits = out.logits[:, -1, :].float()  # [B, V]
        nxt = logits.argmax(-1)
        for j, i in enumerate(active):
            st = states[i]
            if st.gen is not None:
                nxt[j] = _sample(logits[j], st.row.sampling, st.gen)
            st.push(int(nxt[j]), tokenizer, eos)
        still = [j for j, i in enumerate(active) if states[i].done is None]
        if not still:
            break
        if len(still) < len(active):  # finished rows leave the batch and the cache
            sel = torch.tensor(still, device=device)
            cache.batch_select_indices(sel)
            mask, pos, nxt = mask[sel], pos[sel], nxt[sel]
            active = [active[j] for j in still]
        ids = nxt[:, None]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        pos = pos[:, -1:] + 1
    return [st.done for st in states if st.done is not None]
