"""Speculative greedy decoding for ``FusedModel``: the small models draft, one large forward verifies.

A round, with every model's KV cache holding the sequence up to a *pending* token g (emitted, not yet fed):

1. the small models (every expert and expert base) consume g, then draft k tokens greedily from the
   small-scale fusion z_base₁ + Σₜ αₜ (z_expert,t − z_base,t) — for one expert at α = 1 that is the expert
   itself — consuming each draft as it is made (k + 1 small forwards; the last gives the logits after d_k);
2. the large model consumes [g, d₁ … d_k] in one forward, which gives its logits at all k + 1 positions;
3. the fused scores (``FusedModel._scores``: proxy, EFT or DLF, exactly as the plain loop computes them) pick
   the greedy token at each position; each row accepts its drafts while they equal it and emits them plus the
   fused token after its last accepted draft, which becomes its new pending token;
4. every cache is cut back (``Cache.crop``) to the longest accepted run; a row that accepted fewer drafts masks
   its rejected ones out of the attention mask, and its position ids continue from its own last real token,
   so rows advance at their own pace while every cache keeps one length.

Output is the plain greedy loop's, token for token (the tests check it): each emitted token is the fused argmax
given exactly the tokens before it; drafts only decide how many positions one large forward covers. Per round
the large model runs once for a + 1 tokens per row (a accepted drafts), the small ones k + 1 times; it pays when the
small models are much cheaper than the large one and the drafts are usually right.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from skillgraft.transfer.stream import Stream, feed

if TYPE_CHECKING:
    from skillgraft.transfer.fused import FusedModel, GenerationSpec


def generate(fm: FusedModel, streams: dict[int, Stream], first: dict[int, torch.Tensor], spec: GenerationSpec,
             k: int) -> tuple[list[list[int]], int, int]:  # fmt: skip
    """Decode greedily from prefilled ``streams`` (``first``: each model's logits after the prompt).

    Returns each row's emitted token ids (cut after EOS or a completed stop string, at most
    ``max_new_tokens``), the number of rounds and the number of accepted drafts, summed over rows.
    """
    batch = next(iter(first.values())).shape[0]
    large = id(fm.large)
    small = [id(m) for m in fm.small_models() if id(m) != large]  # the large model may double as a base
    pending = fm.scores(first).argmax(-1)
    outs: list[list[int]] = [[int(t)] for t in pending]
    done = torch.tensor([_finished(fm, o, spec) for o in outs])
    rounds = accepted = 0
    while not bool(done.all()):
        emitted = torch.tensor([len(o) for o in outs])
        room = (spec.max_new_tokens - emitted - 1).masked_fill(done, 0)  # drafts each row could still emit
        steps = min(k, int(room.max()))
        start = streams[large].mask.shape[1]  # every model's cache length before this round
        last_pos = streams[large].pos[:, -1:].clone()  # each row's position of its last fed token
        # 1. drafts from the small models (they consume the pending token first)
        small_logits = {i: [feed(streams[i], pending[:, None])[:, -1]] for i in small}
        drafts = []
        for _ in range(steps):
            d = _draft_scores(fm, {i: v[-1] for i, v in small_logits.items()}).argmax(-1)
            drafts.append(d)
            for i in small:
                small_logits[i].append(feed(streams[i], d[:, None])[:, -1])
        # 2. one large forward over the pending token and the drafts
        fed = torch.stack([pending, *drafts], 1)  # [batch, steps + 1]
        large_logits = feed(streams[large], fed)
        # 3. the fused greedy token at every position; per row, drafts accepted while they match it
        greedy = torch.stack(
            [
                fm.scores({large: large_logits[:, j], **{i: v[j] for i, v in small_logits.items()}}).argmax(-1)
                for j in range(steps + 1)
            ],
            1,
        )
        match = (greedy[:, :steps] == fed[:, 1:]).long().cumprod(1).sum(1) if steps else torch.zeros_like(room)
        took = torch.minimum(match, room).masked_fill(done, 0)  # accepted drafts per row
        for r in range(batch):
            if not done[r]:
                for t in greedy[r, : int(took[r]) + 1].tolist():  # accepted drafts, then the fused token
                    outs[r].append(t)
                    if _finished(fm, outs[r], spec):
                        done[r] = True
                        break
        pending = greedy.gather(1, took[:, None])[:, 0]
        # 4. rollback: keep the pending token fed this round and the longest accepted run; rows that accepted
        # fewer drafts mask their rejected ones out, so every cache keeps one length
        keep = int(took.max())
        for s in streams.values():
            _rollback(s, start, keep, took, last_pos)
        rounds += 1
        accepted += int(took.sum())
    return outs, rounds, accepted


def _rollback(s: Stream, start: int, keep: int, took: torch.Tensor, last_pos: torch.Tensor) -> None:
    """Cut ``s`` to ``start + 1 + keep`` tokens; row r keeps its first ``took[r]`` drafts, the rest are masked."""
    length = start + 1 + keep
    if s.mask.shape[1] > length:
        s.past.crop(length - s.mask.shape[1])  # transformers ≥ 5: a negative count of tokens to remove
        s.mask = s.mask[:, :length].clone()
    rejected = torch.arange(keep)[None, :] >= took[:, None]  # [batch, keep]: drafts beyond each row's run
    s.mask[:, start + 1 :] = s.mask[:, start + 1 :].masked_fill(rejected, 0)
    s.pos = last_pos + 1 + took[:, None]


def _finished(fm: FusedModel, ids: list[int], spec: GenerationSpec) -> bool:
    """A row stops at EOS, at a completed stop string, or at ``max_new_tokens``."""
    eos = fm.tok.eos_token_id
    if len(ids) >= spec.max_new_tokens or (eos is not None and ids[-1] == eos):
        return True
    return bool(spec.stop) and any(x in fm.tok.decode(ids, skip_special_tokens=True) for x in spec.stop)


def _draft_scores(fm: FusedModel, logits: dict[int, torch.Tensor]) -> torch.Tensor:
    """The small-scale fusion z_base₁ + Σₜ αₜ (z_expert,t − z_base,t) with each pair's α.

    ``logits`` holds the small models only; a pair whose model is the large one (a test set-up) is left out,
    and with the first base missing the draft is the first expert alone."""
    v = fm.vocab
    anchor = logits.get(id(fm.experts[0].base))
    if anchor is None:
        return logits[id(fm.experts[0].expert)][:, :v]
    z = anchor[:, :v].clone()
    for p in fm.experts:
        if id(p.expert) in logits and id(p.base) in logits:
            z += p.alpha * (logits[id(p.expert)][:, :v] - logits[id(p.base)][:, :v])
    return z
