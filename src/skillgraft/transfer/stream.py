"""One model's decoding state over a left-padded batch, and the steps that advance it (plain, parallel and
speculative logit transfer all decode through these)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Stream:
    """One model's decoding state over a batch."""

    model: Any
    mask: torch.Tensor
    pos: torch.Tensor
    past: Any = None


def new_stream(model: Any, mask: torch.Tensor) -> Stream:
    """A fresh decoding state for ``model`` over a left-padded batch with attention ``mask``."""
    return Stream(model, mask.clone(), (mask.cumsum(-1) - 1).clamp_min(0))


def forward(s: Stream, ids: torch.Tensor, every: bool = False) -> torch.Tensor:
    """The last position's fp32 logits (``every``: all positions') after feeding ``ids``."""
    out = s.model(
        input_ids=ids,
        attention_mask=s.mask,
        position_ids=s.pos,
        past_key_values=s.past,
        use_cache=True,
        logits_to_keep=0 if every else 1,
    )
    s.past = out.past_key_values
    return out.logits.float() if every else out.logits[:, -1].float()


def advance(s: Stream, nxt: torch.Tensor) -> torch.Tensor:
    """Feed one token per row (``nxt``: ``[batch]``) after ``s``'s cache; the new last-position logits."""
    s.mask = torch.cat([s.mask, torch.ones(len(nxt), 1, dtype=s.mask.dtype)], 1)
    s.pos = s.pos[:, -1:] + 1
    return forward(s, nxt[:, None])


def feed(s: Stream, ids: torch.Tensor) -> torch.Tensor:
    """Run ``s.model`` on ``ids`` ([batch, m]) after its cache; returns fp32 logits for all m positions."""
    m = ids.shape[1]
    s.mask = torch.cat([s.mask, torch.ones(ids.shape[0], m, dtype=s.mask.dtype)], 1)
    pos = s.pos[:, -1:] + torch.arange(1, m + 1)
    out = s.model(
        input_ids=ids,
        attention_mask=s.mask,
        position_ids=pos,
        past_key_values=s.past,
        use_cache=True,
        logits_to_keep=m,
    )
    s.past, s.pos = out.past_key_values, pos[:, -1:]
    return out.logits.float()
