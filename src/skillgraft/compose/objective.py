"""The composite model θ(λ) = θ₀ + Σₖ λₖ,b(t)·Δₖ,t run as a function of the coefficients, and the objectives fitted
through it: the target loss on labelled rows, and the prediction entropy on unlabelled prompts.

Parameters stay the base's; each forward passes θ(λ) through ``torch.func.functional_call``, so gradients reach the
coefficients (``K × B``) and nothing else. Deltas are held dense in fp32, one stacked ``[K, *shape]`` per tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from skillgraft.compose.blocks import Blocks
from skillgraft.errors import MismatchError


class Composite:
    """A base model plus K skills' deltas, merged on the fly with per-skill, per-block coefficients."""

    def __init__(self, model: Any, deltas: dict[str, torch.Tensor], blocks: Blocks) -> None:
        params = dict(model.named_parameters())
        missing = sorted(set(deltas) - set(params))
        if missing:
            raise MismatchError(
                f"the inputs change {missing[0]!r}, which the loaded model has no parameter for",
                hint="inputs must be fine-tunes of the base architecture",
            )
        for p in params.values():
            p.requires_grad_(False)
        self.model, self.deltas, self.blocks = model, deltas, blocks
        self.base = {n: params[n].detach().float().clone() for n in deltas}
        self._index = {n: blocks.index[n] for n in deltas}

    def params(self, lam: torch.Tensor) -> dict[str, torch.Tensor]:
        """θ(λ) for every changed tensor; ``lam`` is ``[K, B]``."""
        out = {}
        for name, d in self.deltas.items():
            coef = lam[:, self._index[name]]  # [K]
            out[name] = self.base[name] + torch.tensordot(coef, d, dims=1)
        return out

    def forward(self, lam: torch.Tensor, **batch: Any) -> Any:
        from torch.func import functional_call

        return functional_call(self.model, self.params(lam), args=(), kwargs=batch, tie_weights=True, strict=False)

    @torch.no_grad()
    def load(self, lam: torch.Tensor) -> None:
        """Write θ(λ) into the model's own parameters (for generation and exact-match scoring)."""
        own = dict(self.model.named_parameters())
        for name, value in self.params(lam.detach()).items():
            own[name].copy_(value)

    @torch.no_grad()
    def reset(self) -> None:
        own = dict(self.model.named_parameters())
        for name, value in self.base.items():
            own[name].copy_(value)


def target_loss(comp: Composite, lam: torch.Tensor, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Cross-entropy of the target tokens (prompt and padding masked), averaged per row, then over rows — so a
    skill whose answers are one token ("71") weighs as much as one whose answers are fifty (a JSON object);
    a mean over all target tokens of the batch would let the long answers decide."""
    ids, mask, labels = batch
    logits = comp.forward(lam, input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    target = labels[:, 1:]
    keep = target != -100
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.clamp(min=0).reshape(-1), reduction="none"
    ).view(target.shape)
    per_row = (nll * keep).sum(1) / keep.sum(1).clamp(min=1)
    return per_row.mean()


def left_padded(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(list(s), dtype=torch.long)
        mask[i, width - len(s) :] = 1
    return ids, mask


@torch.no_grad()
def greedy_continuations(
    comp: Composite, lam: torch.Tensor, prompts: Sequence[Sequence[int]], n: int, pad_id: int, eos_id: int | None
) -> list[list[int]]:
    """The first ``n`` greedy tokens after each prompt under θ(λ) (cut after eos)."""
    seqs = [list(p) for p in prompts]
    conts: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for _ in range(n):
        ids, mask = left_padded(seqs, pad_id)
        nxt = comp.forward(lam.detach(), input_ids=ids, attention_mask=mask).logits[:, -1].argmax(-1).tolist()
        for i, t in enumerate(nxt):
            if not done[i]:
                conts[i].append(t)
                seqs[i].append(t)
                done[i] = t == eos_id
        if all(done):
            break
    return conts


def prediction_entropy(
    comp: Composite, lam: torch.Tensor, prompts: Sequence[Sequence[int]], conts: Sequence[Sequence[int]], pad_id: int
) -> torch.Tensor:
    """Mean Shannon entropy (nats) of the next-token distribution at the last prompt position and at every
    continuation position before the last — the predictions that produce the answer (AdaMerging's objective,
    on tokens instead of classes)."""
    seqs = [list(p) + list(c) for p, c in zip(prompts, conts)]
    ids, mask = left_padded(seqs, pad_id)
    logits = comp.forward(lam, input_ids=ids, attention_mask=mask).logits  # [N, L, V]
    width = ids.shape[1]
    sel = torch.zeros(ids.shape, dtype=torch.bool)
    for i, c in enumerate(conts):
        last_prompt = width - 1 - len(c)
        sel[i, last_prompt : max(width - 1, last_prompt + 1)] = True
    logp = torch.log_softmax(logits[sel].float(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()
