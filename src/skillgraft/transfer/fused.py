"""``FusedModel``: a large base plus (expert, expert-base) pairs decoded together, one batch at a time.

Each model keeps its own KV cache and its own left-padded prompt encoding; per step the large model and every
distinct small model run one forward, their last-token logits are combined (``combine``), and one token is
chosen for all. ``loglik`` scores targets under the fused distribution with teacher forcing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from skillgraft.errors import InputError
from skillgraft.transfer import speculative
from skillgraft.transfer.combine import METHODS, combine, prompt_gate
from skillgraft.transfer.parallel import SmallWorker, threads_for
from skillgraft.transfer.stream import advance, forward, new_stream
from skillgraft.transfer.vocab import check_shared_vocab


@dataclass(frozen=True)
class GenerationSpec:
    """Decoding settings. ``temperature == 0`` is greedy."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise InputError("max_new_tokens must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise InputError("need temperature >= 0, top_p in (0, 1], top_k >= 0")


@dataclass
class ExpertPair:
    """A small fine-tuned model, the small base it was tuned from, and the weight α of its logit offset."""

    expert: Any
    base: Any
    alpha: float = 1.0
    label: str = "expert"


def _encode(tok: Any, prompts: list[str], special: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=special)
    return enc.input_ids, enc.attention_mask


def chat_format(tok: Any, prompt: str, who: str = "model") -> str:
    """``prompt`` as one user turn in ``tok``'s chat template, ready for the assistant's reply."""
    if not getattr(tok, "chat_template", None):
        raise InputError(
            f"{who}: its tokenizer has no chat template, so the prompt cannot be formatted as a chat",
            hint="drop --chat (prompts are then used as they are), or use a chat model's tokenizer",
        )
    return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)


def check_modes(speculate: int, gate: bool, parallel: bool, chat: bool) -> None:
    """Refuse decoding modes that do not combine (also called before any model loads, by ``load_fused``)."""
    if parallel and (speculate or gate):
        raise InputError(
            "parallel decoding does not combine with speculative decoding or the prompt gate",
            hint="drop --parallel, or drop --speculate / --gate",
        )
    if chat and (speculate or gate):
        raise InputError(
            "chat-formatted prompts do not combine with speculative decoding or the prompt gate (they need "
            "every model's prompt to be the same tokens)",
            hint="drop --chat, or drop --speculate / --gate",
        )


class FusedModel:
    """Decode with ``method`` in {proxy, eft, dlf} from a large base steered by expert pairs."""

    def __init__(
        self,
        large: Any,
        tokenizer: Any,
        experts: list[ExpertPair],
        method: str = "proxy",
        dlf_grid: int = 11,
        tokenizers: dict[str, Any] | None = None,
        speculate: int = 0,
        gate: bool = False,
        parallel: bool = False,
        chat: bool = False,
        model_tokenizers: dict[int, Any] | None = None,
        router: Callable[[list[str]], torch.Tensor] | None = None,
    ) -> None:
        if method not in METHODS:
            raise InputError(f"unknown transfer method {method!r}", hint=f"use one of {', '.join(METHODS)}")
        if not 2 <= dlf_grid <= 201:
            raise InputError("dlf grid size must be in [2, 201]")
        if not 0 <= speculate <= 32:
            raise InputError(f"speculate must be 0 (off) to 32 draft tokens, not {speculate}")
        if speculate and not experts:
            raise InputError("speculative decoding needs at least one expert to draft", hint="drop --speculate")
        check_modes(speculate, gate, parallel, chat)
        if router is not None and gate:
            raise InputError("the prompt gate and a router both choose experts", hint="drop --gate or --route")
        # Chat: each model formats the prompt with its own tokenizer's chat template (``model_tokenizers``: id of
        # a model -> its tokenizer; models not in it use ``tokenizer``); the generated tokens are shared.
        self.chat = bool(chat)
        self.model_tokenizers = dict(model_tokenizers or {})
        # The small models decode in a second process, side by side with the large one (transfer/parallel.py).
        self.parallel = bool(parallel) and bool(experts)
        self._worker: tuple[SmallWorker, tuple[int, int]] | None = None
        self.speculate = speculate  # draft tokens per round (0: the plain loop); see transfer/speculative.py
        # Several experts: weight each one per prompt by how much it raises the prompt's likelihood over its own
        # base (combine.prompt_gate); opt-in (see docs/transfer.md for when it identifies the task).
        self.gate = bool(gate)
        self._gate: torch.Tensor | None = None  # [batch, n_experts] for the batch being decoded
        # A router (``route.routers.Router.gate``): prompts -> one-hot [batch, n_experts], the chosen expert per
        # prompt, used as the gate.
        self.router = router
        self.large, self.tok, self.experts, self.method = large, tokenizer, experts, method
        named = [("large", tokenizer), *((k, v) for k, v in (tokenizers or {}).items())]
        self.vocab = check_shared_vocab(named)
        for m in [large, *(p.expert for p in experts), *(p.base for p in experts)]:
            if m.config.vocab_size < self.vocab:
                raise InputError(f"a model's output layer ({m.config.vocab_size}) is smaller than the vocabulary")
        self.grid = torch.linspace(0.0, 2.0, dlf_grid)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.last_alphas: list[torch.Tensor] = []
        self.tokens_generated = 0  # batch rows × decoding steps of the last generate() call
        self.draft_stats = (0, 0)  # (rounds, accepted drafts) of the last speculative generate()

    def small_models(self) -> list[Any]:
        """Distinct small models (an expert base shared by several experts runs once per step)."""
        seen: dict[int, Any] = {}
        for p in self.experts:
            for m in (p.expert, p.base):
                seen.setdefault(id(m), m)
        return list(seen.values())

    def _tokenizer_of(self, m: Any) -> Any:
        return self.model_tokenizers.get(id(m), self.tok) if self.chat else self.tok

    def _prompt_texts(self, m: Any, prompts: list[str]) -> list[str]:
        """The prompts as model ``m`` sees them: as given, or (``chat``) in its tokenizer's chat template."""
        if not self.chat:
            return prompts
        who = "the large model" if m is self.large else f"small model {type(m).__name__}"
        return [chat_format(self._tokenizer_of(m), p, who) for p in prompts]

    def _encodings(self, prompts: list[str], models: list[Any]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Left-padded (ids, mask) per model: one shared encoding, or with ``chat`` each model's own (the chat
        template already holds any special tokens, so none are added)."""
        if not self.chat:
            shared = _encode(self.tok, prompts)
            return {id(m): shared for m in models}
        return {id(m): _encode(self._tokenizer_of(m), self._prompt_texts(m, prompts), special=False) for m in models}

    def _remote_models(self) -> list[Any]:
        """The small models the worker runs (all but one that is the large model itself)."""
        return [m for m in self.small_models() if m is not self.large]

    def _start_worker(self) -> tuple[SmallWorker, tuple[int, int]]:
        if self._worker is None:
            remote = self._remote_models()
            threads = threads_for(self.large, remote)
            self._worker = (SmallWorker(remote, threads[1]), threads)
        return self._worker

    def close(self) -> None:
        """Stop the small-model process, if one was started (``parallel``); the model stays usable."""
        if self._worker is not None:
            self._worker[0].close()
            self._worker = None

    def __enter__(self) -> FusedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def scores(self, logits: dict[int, torch.Tensor]) -> torch.Tensor:
        """Fused scores of one position from every model's logits there (keyed by ``id(model)``)."""
        v = self.vocab
        zl = logits[id(self.large)][:, :v]
        ze = [logits[id(p.expert)][:, :v] for p in self.experts]
        zb = [logits[id(p.base)][:, :v] for p in self.experts]
        alphas = torch.tensor([[float(p.alpha) for p in self.experts]], dtype=torch.float32).reshape(1, -1)
        alphas = alphas.expand(zl.shape[0], -1)
        gate = self._gate if self.gate or self.router is not None else None
        if gate is not None and gate.shape[0] != zl.shape[0]:  # loglik scores one prompt's target positions
            gate = gate.expand(zl.shape[0], -1)
        scores, used = combine(self.method, zl, ze, zb, alphas, self.grid, gate)
        self.last_alphas.append(used)
        return scores

    @torch.no_grad()
    def generate(self, prompts: list[str], spec: GenerationSpec = GenerationSpec()) -> list[str]:
        """Decode a batch; returns the continuation text of each prompt (cut at a stop string or EOS)."""
        if not self.parallel:
            return self._generate(prompts, spec, None)
        worker, (threads, _) = self._start_worker()
        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return self._generate(prompts, spec, worker)
        finally:
            torch.set_num_threads(saved)

    def _generate(self, prompts: list[str], spec: GenerationSpec, worker: SmallWorker | None) -> list[str]:
        remote = self._remote_models() if worker is not None else []
        models = [m for m in [self.large, *self.small_models()] if not any(m is r for r in remote)]
        enc = self._encodings(prompts, [*models, *remote])
        ids, mask = enc[id(self.large)]  # (without chat, every model's)
        streams = {id(m): new_stream(m, enc[id(m)][1]) for m in models}
        small_ids = [id(m) for m in remote]
        if self.router is not None:
            self._gate = self.router(prompts)
        if self.gate:  # the small models' prefill keeps every position's logits for the gate
            full = {id(m): forward(streams[id(m)], ids, every=True) for m in self.small_models()}
            self._gate = self._prompt_gate(ids, mask, full)
            logits = {k: v[:, -1] for k, v in full.items()}
            logits.update({k: forward(s, ids) for k, s in streams.items() if k not in logits})
        else:
            if worker is not None:
                worker.start([enc[k] for k in small_ids])
            logits = {k: forward(s, enc[k][0]) for k, s in streams.items()}
            if worker is not None:
                logits.update(zip(small_ids, worker.wait()))
        if self.speculate:
            if spec.temperature != 0:
                raise InputError("speculative decoding is greedy only", hint="use temperature 0, or speculate 0")
            rows, rounds, accepted = speculative.generate(self, streams, logits, spec, self.speculate)
            self.tokens_generated, self.draft_stats = sum(map(len, rows)), (rounds, accepted)
            return [self._finish(torch.tensor(row), spec.stop) for row in rows]
        gen = torch.Generator().manual_seed(spec.seed)
        eos = self.tok.eos_token_id
        out = torch.empty(len(prompts), 0, dtype=torch.long)
        done = torch.zeros(len(prompts), dtype=torch.bool)
        self.last_alphas = []
        for _ in range(spec.max_new_tokens):
            nxt = _sample(self.scores(logits), spec, gen)
            nxt = torch.where(done, torch.full_like(nxt, eos if eos is not None else 0), nxt)
            out = torch.cat([out, nxt[:, None]], 1)
            done |= nxt == eos if eos is not None else torch.zeros_like(done)
            done |= self._stopped(out, spec.stop)
            if bool(done.all()):
                break
            if worker is not None:
                worker.send(nxt)  # the small models step in their own process while the large one steps here
            for k, s in streams.items():
                logits[k] = advance(s, nxt)
            if worker is not None:
                logits.update(zip(small_ids, worker.wait()))
        self.tokens_generated = out.numel()
        return [self._finish(row, spec.stop) for row in out]

    def _prompt_gate(self, ids: torch.Tensor, mask: torch.Tensor, full: dict[int, torch.Tensor]) -> torch.Tensor:
        v = self.vocab
        ze = [full[id(p.expert)][..., :v] for p in self.experts]
        zb = [full[id(p.base)][..., :v] for p in self.experts]
        return prompt_gate(ids, mask, ze, zb)

    def _stopped(self, out: torch.Tensor, stop: tuple[str, ...]) -> torch.Tensor:
        if not stop:
            return torch.zeros(out.shape[0], dtype=torch.bool)
        texts = self.tok.batch_decode(out, skip_special_tokens=True)
        return torch.tensor([any(s in t for s in stop) for t in texts])

    def _finish(self, row: torch.Tensor, stop: tuple[str, ...]) -> str:
        eos = self.tok.eos_token_id
        ids = row.tolist()
        if eos is not None and eos in ids:
            ids = ids[: ids.index(eos)]
        text = self.tok.decode(ids, skip_special_tokens=True)
        cuts = [text.index(s) for s in stop if s in text]
        return text[: min(cuts)] if cuts else text

    # -- the evaluation harness's protocol (skillgraft.eval.generate dispatches on these names) ----------
    training = False

    def eval(self) -> FusedModel:
        return self

    def train(self, mode: bool = True) -> FusedModel:
        return self

    def harness_generate(self, prompts: list[str], max_new_tokens: int, stop: tuple[str, ...], batch: int) -> list[str]:
        spec = GenerationSpec(max_new_tokens=max_new_tokens, stop=stop)
        return [o for i in range(0, len(prompts), batch) for o in self.generate(prompts[i : i + batch], spec)]

    def harness_loglik(self, pairs: list[tuple[str, str]]) -> list[tuple[float, int, bool]]:
        return self.loglik(pairs, with_greedy=True)  # type: ignore[return-value]

    @torch.no_grad()
    def loglik(self, pairs: list[tuple[str, str]], with_greedy: bool = False) -> list[tuple]:
        """Sum of log p(target | prompt) under the fused (renormalised) distribution, and the token count
        (and, with ``with_greedy``, whether every target token is the fused argmax)."""
        results: list[tuple] = []
        for prompt, target in pairs:
            t_ids = self.tok(target, add_special_tokens=False).input_ids
            per_model, full = {}, {}
            for m in [self.large, *self.small_models()]:
                m_ids = self._tokenizer_of(m)(self._prompt_texts(m, [prompt])[0], add_special_tokens=False).input_ids
                full[id(m)] = m(input_ids=torch.tensor([m_ids + t_ids])).logits.float()
                per_model[id(m)] = full[id(m)][0, len(m_ids) - 1 : -1]
            if self.gate:  # from the prompt alone, as in generate() (never with chat: one encoding for all)
                p_ids = self.tok(prompt, add_special_tokens=False).input_ids
                prompt_ids = torch.tensor([p_ids])
                self._gate = self._prompt_gate(
                    prompt_ids, torch.ones_like(prompt_ids), {k: v[:, : len(p_ids)] for k, v in full.items()}
                )
            if self.router is not None:
                self._gate = self.router([prompt])
            scores = self.scores(per_model)
            lp = torch.log_softmax(scores, -1)
            tgt = torch.tensor(t_ids)
            total = float(lp[torch.arange(len(t_ids)), tgt].sum())
            greedy = bool((lp.argmax(-1) == tgt).all())
            results.append((total, len(t_ids), greedy) if with_greedy else (total, len(t_ids)))
        return results


def _sample(scores: torch.Tensor, spec: GenerationSpec, gen: torch.Generator) -> torch.Tensor:
    if spec.temperature == 0:
        return scores.argmax(-1)
    z = scores / spec.temperature
    if spec.top_k:
        kth = torch.topk(z, min(spec.top_k, z.shape[-1]), -1).values[:, -1:]
        z = z.masked_fill(z < kth, -math.inf)
    if spec.top_p < 1:
        sorted_z, order = torch.sort(z, descending=True)
        cum = torch.softmax(sorted_z, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_z, -1) > spec.top_p
        z = z.masked_fill(drop.scatter(1, order, drop), -math.inf)
    return torch.multinomial(torch.softmax(z, -1), 1, generator=gen)[:, 0]
