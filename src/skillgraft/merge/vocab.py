"""Output vocabularies: mergekit's ``tokenizer_source`` / ``tokenizer`` / ``chat_template`` — the output tokenizer,
and every model's embedding rows re-indexed to it as checkpoint views (the engine is unchanged).

A :class:`Vocabulary` builds the output tokenizer (the base's, a named model's, or the union of every model's) and,
per model, which of its rows each output token takes; :class:`VocabCheckpoint` views show the base and each input
with their vocabulary tensors (input and output embeddings, vocabulary axis 0) re-indexed to the output vocabulary.
A token a model lacks gets mergekit's fill: the row of the one model that has it; else the base's; else the mean
of the models that have it; zeros where none has it (or what ``tokenizer.tokens`` names). Everything but the rows
is decided before any weight is read.
"""

from __future__ import annotations

import json
import tempfile
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from skillgraft.errors import FormatError, InputError, MismatchError, UnsupportedError
from skillgraft.io.checkpoint import Checkpoint

# mergekit 0.1.5 ships these chat templates under names; skillgraft does not ship their text
MERGEKIT_TEMPLATES = ("alpaca", "chatml", "exaone", "llama3", "mistral")
TOKENIZER_KEYS = {"source", "tokens", "pad_to_multiple_of"}
TOKEN_KEYS = {"source", "force"}


@dataclass(frozen=True)
class TokenSource:
    """Where one ``tokenizer.tokens`` entry's embedding comes from: ``model``'s row for this token, or for another
    one (``token`` / ``token_id`` in that model's own vocabulary); zeros (``zero``); nothing given (``model`` None):
    only valid while every model has the token. ``force`` uses it even in the models that have the token."""

    model: str | None = None
    token: str | None = None
    token_id: int | None = None
    zero: bool = False
    force: bool = False


@dataclass(frozen=True)
class TokenizerSpec:
    """A mergekit YAML's tokenizer keys, parsed (paths as given until :meth:`with_paths`)."""

    source: str | None  # "union", "base" or a model path; None: the base's tokenizer as is (chat_template only)
    models: tuple[str, ...]  # the models whose rows are re-indexed, in mergekit's order (listed, then base_model)
    base_model: str | None = None  # mergekit's base_model (None: the first model stands in, with no precedence)
    tokens: tuple[tuple[str, TokenSource], ...] = ()
    pad_to_multiple_of: int | None = None
    chat_template: str | None = None  # Jinja text, or "auto"

    @property
    def base(self) -> str:
        return self.base_model or self.models[0]

    def with_paths(self, fix: Callable[[str], str]) -> TokenizerSpec:
        src = self.source if self.source in (None, "union", "base") else fix(self.source)  # type: ignore[arg-type]
        tokens = tuple((t, replace(s, model=fix(s.model) if s.model else None)) for t, s in self.tokens)
        base = fix(self.base_model) if self.base_model else None
        return replace(self, source=src, models=tuple(map(fix, self.models)), base_model=base, tokens=tokens)


def parse_tokenizer(d: dict, models: list[str], base_model: str | None) -> TokenizerSpec | None:
    """The tokenizer keys of a mergekit YAML (None without any); ``models`` in mergekit's order."""
    if d.get("tokenizer_source") is not None and d.get("tokenizer") is not None:
        raise InputError("mergekit config: give 'tokenizer_source' or 'tokenizer', not both (mergekit's rule)")
    template = d.get("chat_template") or None  # mergekit ignores an empty one
    if template is not None:
        check_chat_template(template)
    source, pad = d.get("tokenizer_source"), None
    tokens: tuple[tuple[str, TokenSource], ...] = ()
    if d.get("tokenizer") is not None:
        t = d["tokenizer"]
        if not isinstance(t, dict):
            raise InputError("mergekit config: 'tokenizer' must be a mapping (source, tokens, pad_to_multiple_of)")
        extra = sorted(set(t) - TOKENIZER_KEYS)
        if extra:
            raise InputError(f"mergekit config: unsupported key(s) {extra} in 'tokenizer'", hint="see docs/merging.md")
        source = t.get("source", "union")
        tokens = _tokens(t.get("tokens") or {})
        pad = t.get("pad_to_multiple_of")
        if pad is not None and (type(pad) is not int or pad < 1):
            raise InputError(f"tokenizer.pad_to_multiple_of must be a positive integer, not {pad!r}")
    if source is None and template is None:
        return None
    if source is not None and (not isinstance(source, str) or not source):
        raise InputError(f"tokenizer source must be 'union', 'base' or a model path, not {source!r}")
    return TokenizerSpec(source, tuple(models), base_model, tokens, pad, template)


def _tokens(value: Any) -> tuple[tuple[str, TokenSource], ...]:
    if not isinstance(value, dict):
        raise InputError("tokenizer.tokens must map tokens to {source, force}")
    out = []
    for token, cfg in value.items():
        where = f"tokenizer.tokens[{token!r}]"
        cfg = cfg or {}
        if not isinstance(cfg, dict) or set(cfg) - TOKEN_KEYS:
            raise InputError(f"{where}: expected a mapping with 'source' and/or 'force'", hint="e.g. {source: ./model}")
        force, src = cfg.get("force", False), cfg.get("source")
        if not isinstance(force, bool):
            raise InputError(f"{where}.force must be true or false, not {force!r}")
        if src is None or isinstance(src, str):
            out.append((str(token), TokenSource(model=src, force=force)))
        elif isinstance(src, dict) and src.get("kind") == "zero" and set(src) == {"kind"}:
            out.append((str(token), TokenSource(zero=True, force=force)))
        elif (
            isinstance(src, dict)
            and src.get("kind") == "model_token"
            and set(src) <= {"kind", "model", "token", "token_id"}
        ):
            has = [k for k in ("token", "token_id") if src.get(k) is not None]
            if not isinstance(src.get("model"), str) or len(has) != 1:
                raise InputError(f"{where}.source: model_token needs 'model' and exactly one of 'token' or 'token_id'")
            tid = src.get("token_id")
            if tid is not None and (type(tid) is not int or tid < 0):
                raise InputError(f"{where}.source.token_id must be a non-negative integer, not {tid!r}")
            out.append((str(token), TokenSource(src["model"], src.get("token"), tid, force=force)))
        else:
            raise InputError(
                f"{where}.source: expected a model path, {{kind: zero}} or {{kind: model_token, model, token}}",
                hint="mergekit's three token sources",
            )
    return tuple(out)


def check_chat_template(value: Any) -> None:
    """mergekit's rule: a string without ``{`` names a bundled template (not shipped here); otherwise Jinja text of
    at least 20 characters, or ``auto`` (the template most of the models' tokenizers carry)."""
    if not isinstance(value, str):
        raise InputError(f"chat_template must be a string (Jinja text, 'auto' or a name), not {value!r}")
    if value == "auto":
        return
    if "{" not in value and "\n" not in value and value in MERGEKIT_TEMPLATES:
        raise UnsupportedError(
            f"chat_template {value!r} is one of mergekit's bundled templates, which skillgraft does not ship",
            hint="paste the template's Jinja text as chat_template, or use 'auto' to take the models' own",
        )
    if len(value) < 20 or "{" not in value:
        raise InputError(
            f"chat_template {value!r} is neither Jinja text nor a known name",
            hint="give the template's Jinja text, or 'auto'",
        )


def load_tokenizer(path: str) -> Any:
    """A model directory's fast tokenizer (transformers), or None where it has none that loads."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, use_fast=True)
    except (OSError, ValueError, KeyError, TypeError):  # no tokenizer files, or files transformers cannot read
        return None


def stripped_tokenizer(path: str, vocab_size: int) -> Any:
    """The tokenizer of ``path`` without the tokens whose id is ≥ the model's ``vocab_size`` (rows it does not
    have), as mergekit strips the base's: only a BPE model can be stripped (its merges that use them go too)."""
    tok = load_tokenizer(path)
    if tok is None:
        raise InputError(f"{path}: no tokenizer to build the output vocabulary from", hint="a tokenizer merge needs it")
    unused = {t for t, i in tok.get_vocab().items() if i >= vocab_size}
    if not unused:
        return tok
    doc = json.loads(tok.backend_tokenizer.to_str())
    if doc["model"]["type"] != "BPE":
        raise UnsupportedError(
            f"{path}: its tokenizer has {len(unused)} token(s) past vocab_size {vocab_size} and is "
            f"{doc['model']['type']}, not BPE (mergekit strips such tokens from BPE tokenizers only)"
        )
    doc["added_tokens"] = [a for a in doc["added_tokens"] if a["id"] < vocab_size]
    doc["model"]["vocab"] = {t: i for t, i in doc["model"]["vocab"].items() if t not in unused}
    doc["model"]["merges"] = [m for m in doc["model"]["merges"] if not set(_pair(m)) & unused]
    with tempfile.TemporaryDirectory(prefix="skillgraft-tok-") as tmp:
        tok.save_pretrained(tmp)
        (Path(tmp) / "tokenizer.json").write_text(json.dumps(doc))
        cfg_file = Path(tmp) / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text())
        decoder = cfg.get("added_tokens_decoder") or {}
        cfg["added_tokens_decoder"] = {k: v for k, v in decoder.items() if int(k) < vocab_size}
        cfg_file.write_text(json.dumps(cfg))
        return load_tokenizer(tmp)


def _pair(merge: Any) -> list[str]:
    if isinstance(merge, str) and merge.count(" ") == 1:
        return merge.split(" ")
    if isinstance(merge, list):
        return merge
    raise FormatError(f"unexpected BPE merge {merge!r} in a tokenizer.json")


def union_tokenizer(base: Any, tokenizers: list[tuple[Any, int]]) -> Any:
    """``base`` plus every token of ``tokenizers`` (the base's first; each with the vocab_size its model has rows
    for) that it lacks: plain tokens first, in model order then id order, then added tokens (the first model's
    settings win). A fresh tokenizer; ``base`` is unchanged. (mergekit takes the plain tokens in the order Python
    iterates over a set of models and over their vocabularies, which changes from run to run: same tokens, other
    ids.)"""
    from transformers import AutoTokenizer

    plain: dict[str, None] = {}
    added: dict[str, Any] = {}
    for tok, size in tokenizers:
        plain.update((t, None) for t, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]) if i < size)
        for i, info in tok.added_tokens_decoder.items():
            if i < size:
                added.setdefault(info.content, info)
    with tempfile.TemporaryDirectory(prefix="skillgraft-tok-") as tmp:
        base.save_pretrained(tmp)
        out = AutoTokenizer.from_pretrained(tmp, use_fast=True)
    have = base.get_vocab()
    out.add_tokens([t for t in plain if t not in added and t not in have])
    out.add_tokens(list(added.values()))
    return out


@dataclass(frozen=True)
class FillPlan:
    """For every output token, the row each model takes: its own (``perm[m, t]`` ≥ 0 and not forced), else the
    token's default — zeros, a model's row (``take``) or the mean over the models that have it (``mean``)."""

    perm: torch.Tensor  # [models, V] int64: the model's row for output token t, −1 where it lacks the token
    forced: torch.Tensor  # [V] bool
    take: tuple[tuple[int, int, int], ...]  # (token id, model index, that model's row)
    mean: tuple[int, ...]  # token ids averaged over the models that have them
    size: int  # rows out: V, padded to pad_to_multiple_of


def fill_plan(
    vocab: dict[str, int],
    model_vocabs: list[dict[str, int]],
    base: int | None,
    tokens: dict[str, TokenSource],
    pad: int | None = None,
    model_index: dict[str, int] | None = None,
) -> tuple[FillPlan, list[str]]:
    """Each model's row for every output token, and each missing token's default, as mergekit fills them: a token
    only one model has takes that model's row; one several have takes the base's (``base``: its index, None when
    the merge has no base_model), else their mean; one none has is zero (a warning); ``tokens`` entries first."""
    n, size = len(model_vocabs), len(vocab)
    if size and max(vocab.values()) >= size:
        raise FormatError(f"the output tokenizer's ids are not 0..{size - 1} (it has gaps)")
    token_of = sorted(vocab, key=vocab.__getitem__)
    perm = torch.tensor([[mv.get(t, -1) for t in token_of] for mv in model_vocabs], dtype=torch.int64)
    perm = perm.reshape(n, size)
    count = (perm >= 0).sum(dim=0)
    forced = torch.zeros(size, dtype=torch.bool)
    take, mean, notes = [], [], []
    index = model_index or {}
    for i in sorted({*(count < n).nonzero().flatten().tolist(), *(vocab[t] for t in tokens if t in vocab)}):
        t = token_of[i]
        present = [m for m in range(n) if perm[m, i] >= 0]
        cfg = tokens.get(t)
        if cfg is None:
            if len(present) == 1:
                take.append((i, present[0], int(perm[present[0], i])))
            elif not present:
                notes.append(f"token {t!r} is in no model's vocabulary: its embedding is zero")
            elif base is not None and base in present:
                take.append((i, base, int(perm[base, i])))
            else:
                mean.append(i)
            continue
        forced[i] = cfg.force
        if not cfg.force and len(present) == n or cfg.zero:
            continue
        where = f"tokenizer.tokens[{t!r}]"
        if cfg.model is None:
            raise InputError(f"{where}: needs a source (not every model has the token)", hint="give 'source'")
        if cfg.model not in index:
            raise InputError(f"{where}: source {cfg.model} is not one of the merged models")
        m = index[cfg.model]
        if cfg.token_id is not None:
            row = cfg.token_id
        else:
            row = model_vocabs[m].get(cfg.token, -1) if cfg.token else int(perm[m, i])
        if row < 0:
            raise InputError(f"{where}: {cfg.model} has no token {cfg.token or t!r}")
        take.append((i, m, row))
    if pad and size % pad:
        size += pad - size % pad
    return FillPlan(perm, forced, tuple(take), tuple(mean), size), notes


def permute_rows(rows: list[torch.Tensor], plan: FillPlan) -> list[torch.Tensor]:
    """Every model's rows (``[rows_m, ...]``, one dtype) re-indexed to the output vocabulary (``[plan.size, ...]``):
    mergekit's arithmetic — a mean is Σ rows in model order from zero, then ÷ count, in the rows' dtype; padding
    rows are the mean of the model's V output rows."""
    n, v = plan.perm.shape
    dtype, rest = rows[0].dtype, tuple(rows[0].shape[1:])
    default = torch.zeros((v, *rest), dtype=dtype)
    for m in range(n):
        mine = [(i, row) for i, j, row in plan.take if j == m]
        if mine:
            default[[i for i, _ in mine]] = rows[m][[row for _, row in mine]]
    if plan.mean:
        ids = torch.tensor(plan.mean)
        acc = torch.zeros((len(ids), *rest), dtype=dtype)
        count = torch.zeros(len(ids), dtype=torch.int64)
        for m in range(n):
            has = plan.perm[m, ids] >= 0
            acc[has] = acc[has] + rows[m][plan.perm[m, ids][has]]
            count += has
        for c in count.unique().tolist():  # ÷ a Python int, row by row as mergekit divides
            sel = count == c
            acc[sel] = acc[sel] / c
        default[ids] = acc
    out = []
    for m in range(n):
        own = (plan.perm[m] >= 0) & ~plan.forced
        t = torch.empty((plan.size, *rest), dtype=dtype)
        t[:v] = default
        t[:v][own] = rows[m][plan.perm[m][own]]
        if plan.size > v:
            t[v:] = torch.mean(t[:v], dim=0)
        out.append(t)
    return out


class Vocabulary:
    """A merge's output tokenizer and every model's vocabulary tensors re-indexed to it: tokenizers, fill plan and
    shapes are settled here, before any weight is read; rows are read and permuted per tensor, when the engine
    asks (all models' at once: a missing token's row comes from another model). Close it once, at the end."""

    def __init__(self, spec: TokenizerSpec, compute: str | None, allow_pickle: bool = False) -> None:
        self.spec = spec
        self.compute = compute
        self.warnings: list[str] = []
        self.plan: FillPlan | None = None  # None: the vocabulary is the base's as is (chat_template alone)
        self.tensor_names: set[str] = set()
        self.config_updates: dict[str, Any] = {}
        self._ckpts: dict[str, Checkpoint] = {}
        self._lock = threading.Lock()
        self._cached: tuple[str, dict[str, torch.Tensor]] | None = None
        self._aux: tempfile.TemporaryDirectory | None = None
        try:
            for key in dict.fromkeys((spec.base, *spec.models)):
                self._ckpts[key] = Checkpoint(key, allow_pickle)
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        spec, sizes = self.spec, {k: vocab_size(c) for k, c in self._ckpts.items()}
        if spec.source is None:  # mergekit re-saves the base's tokenizer (unstripped) with the chat template
            self.tokenizer = load_tokenizer(spec.base)
            if self.tokenizer is None:
                raise InputError(f"{spec.base}: no tokenizer to set the chat template on")
            others = (
                {k: load_tokenizer(k) for k in spec.models if k != spec.base} if spec.chat_template == "auto" else {}
            )
            self._set_template({spec.base: self.tokenizer, **others})
            return
        base_tok = stripped_tokenizer(spec.base, sizes[spec.base])
        toks = {spec.base: base_tok}
        for key in spec.models:
            if key not in toks:
                toks[key] = load_tokenizer(key)
                if toks[key] is None:
                    self.warnings.append(f"{key}: no tokenizer; its vocabulary is taken to be the base's")
        have = {k: {t: i for t, i in tok.get_vocab().items() if i < sizes[k]} for k, tok in toks.items() if tok}
        if spec.source == "union":
            out = union_tokenizer(base_tok, [(t, sizes[k]) for k, t in toks.items() if t is not None])
        elif spec.source == "base":
            out = base_tok
        else:
            out = load_tokenizer(spec.source)
            if out is None:
                raise InputError(f"tokenizer source {spec.source}: no tokenizer there")
        vocab = out.get_vocab()
        out.add_tokens([t for t, _ in spec.tokens if t not in vocab])
        self.tokenizer = out
        self._set_template(toks)
        index = {k: i for i, k in enumerate(spec.models)}
        base = index.get(spec.base_model) if spec.base_model else None
        model_vocabs = [{t: i for t, i in have.get(k, have[spec.base]).items() if i < sizes[k]} for k in spec.models]
        self.plan, notes = fill_plan(
            out.get_vocab(), model_vocabs, base, dict(spec.tokens), spec.pad_to_multiple_of, index
        )
        self.warnings += notes
        self._check_tensors()
        self.config_updates = _vocab_size_update(self._ckpts[spec.base].config, self.plan.size)

    def _check_tensors(self) -> None:
        """Every model has each vocabulary tensor of the base, with the same shape past the vocabulary axis and the
        rows its permutation reads."""
        assert self.plan is not None
        self.tensor_names = set(vocab_tensors(self._ckpts[self.spec.base]))
        if not self.tensor_names:
            raise UnsupportedError(f"{self.spec.base}: no embedding tensors found to re-index to the output vocabulary")
        need = self.plan.perm.max(dim=1).values.tolist()
        for _, m, row in self.plan.take:
            need[m] = max(need[m], row)
        want = self._ckpts[self.spec.base].shape
        for name in sorted(self.tensor_names):
            for m, key in enumerate(self.spec.models):
                ckpt = self._ckpts[key]
                if name not in ckpt:
                    raise MismatchError(
                        f"{key} has no {name!r}, which the base has", hint="merge models of one architecture"
                    )
                shape = ckpt.shape(name)
                if shape[1:] != want(name)[1:] or shape[0] <= need[m]:
                    raise MismatchError(
                        f"{key}: {name!r} has shape {list(shape)}; its vocabulary needs {need[m] + 1} rows of "
                        f"{list(want(name)[1:])}",
                        hint="check the model's tokenizer and config.json vocab_size",
                    )

    def _set_template(self, toks: dict[str, Any]) -> None:
        template = self.spec.chat_template
        if template == "auto":  # the template most of the models carry (the first seen among equals)
            seen = [_template_of(t) for t in toks.values() if t is not None]
            seen = [s for s in seen if s]
            template = Counter(seen).most_common(1)[0][0] if seen else None
            if template is None:
                self.warnings.append("chat_template auto: no model has a chat template; none is set")
        if template:
            self.tokenizer.chat_template = template

    def dtype(self, name: str) -> torch.dtype:
        """The rows' dtype: the compute dtype, or (mergekit without ``dtype``) the models' stored ones promoted."""
        from skillgraft.merge.plan import TORCH_DTYPES

        if self.compute in TORCH_DTYPES:
            return TORCH_DTYPES[self.compute]
        dtype = self._ckpts[self.spec.models[0]].dtype(name)
        for key in self.spec.models[1:]:
            dtype = torch.promote_types(dtype, self._ckpts[key].dtype(name))
        return dtype

    def shape(self, name: str) -> tuple[int, ...]:
        assert self.plan is not None
        return (self.plan.size, *self._ckpts[self.spec.base].shape(name)[1:])

    def rows(self, name: str, key: str) -> torch.Tensor:
        """Model ``key``'s tensor ``name`` re-indexed to the output vocabulary (every model's is made at once and
        kept until another tensor is asked for: the engine reads a tensor's base and inputs together)."""
        assert self.plan is not None
        with self._lock:
            if self._cached is None or self._cached[0] != name:
                self._cached = None  # free the last tensor's rows first
                dtype = self.dtype(name)
                rows = [self._ckpts[k].get(name).to(dtype) for k in self.spec.models]
                self._cached = (name, dict(zip(self.spec.models, permute_rows(rows, self.plan))))
            try:
                return self._cached[1][key]
            except KeyError:
                raise InputError(f"{key} is not among the models whose vocabulary was merged") from None

    def view(self, ckpt: Any, key: str) -> VocabCheckpoint:
        if self.plan is not None and key not in self.spec.models:
            raise InputError(f"{key} is not among the models whose vocabulary is merged")
        return VocabCheckpoint(self, ckpt, key)

    def source(self, src: Any, key: str) -> Any:
        """A checkpoint input as a source over its re-indexed view."""
        from skillgraft.merge.sources import CheckpointSource

        if not isinstance(src, CheckpointSource):
            src.close()
            raise UnsupportedError(
                f"input {src.label}: a tokenizer merge re-indexes full checkpoints, not a {src.kind}",
                hint="merge full fine-tuned checkpoints, or drop the tokenizer keys",
            )
        return CheckpointSource.of(self.view(src.ckpt, key), src.label)

    def aux_dir(self, config_from: Path) -> Path:
        """A directory with ``config_from``'s config.json and the output tokenizer (saved by transformers, as
        mergekit saves it), for the output writer to copy; made once, removed by :meth:`close`."""
        with self._lock:
            if self._aux is None:
                self._aux = tempfile.TemporaryDirectory(prefix="skillgraft-vocab-")
                cfg = Path(config_from) / "config.json"
                if cfg.exists():
                    (Path(self._aux.name) / "config.json").write_bytes(cfg.read_bytes())
                self.tokenizer.save_pretrained(self._aux.name)
            return Path(self._aux.name)

    def close(self) -> None:
        for c in self._ckpts.values():
            c.close()
        self._ckpts.clear()
        self._cached = None
        if self._aux is not None:
            self._aux.cleanup()
            self._aux = None


class VocabCheckpoint:
    """A read-only checkpoint: another checkpoint (or view) with its vocabulary tensors re-indexed to the output
    vocabulary (``Vocabulary.rows``); every other tensor is the inner checkpoint's."""

    def __init__(self, vocab: Vocabulary, inner: Any, key: str) -> None:
        self.path = inner.path
        self.config_updates = {**getattr(inner, "config_updates", {}), **vocab.config_updates}
        self.config = {**inner.config, **self.config_updates}
        self._vocab, self._inner, self._key = vocab, inner, key

    @property
    def tied_embeddings(self) -> bool:
        return bool(self._inner.tied_embeddings)

    @property
    def aux_dir(self) -> Path:
        return self._vocab.aux_dir(self.path)

    def _ours(self, name: str) -> bool:
        return name in self._vocab.tensor_names

    def names(self) -> list[str]:
        return self._inner.names()

    def __contains__(self, name: str) -> bool:
        return name in self._inner

    def __len__(self) -> int:
        return len(self._inner)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._vocab.shape(name) if self._ours(name) else self._inner.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self._vocab.dtype(name) if self._ours(name) else self._inner.dtype(name)

    def nbytes(self, name: str) -> int:
        if not self._ours(name):
            return self._inner.nbytes(name)
        n = self.dtype(name).itemsize
        for s in self.shape(name):
            n *= s
        return n

    def get(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        if not self._ours(name):
            return self._inner.get(name, out)
        t = self._vocab.rows(name, self._key)
        if out is None:
            return t.clone()
        dst = out[: t.numel() * t.element_size()].view(t.dtype).view(t.shape)
        return dst.copy_(t)

    def map(self, name: str) -> torch.Tensor:
        return self._vocab.rows(name, self._key) if self._ours(name) else self._inner.map(name)

    def chunks(self, name: str) -> Any:
        if not self._ours(name):
            yield from self._inner.chunks(name)
            return
        yield self._vocab.rows(name, self._key).contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()

    def total_bytes(self) -> int:
        return sum(self.nbytes(n) for n in self.names())

    def aux_files(self) -> Any:
        return self._inner.aux_files()

    def close(self) -> None:
        self._inner.close()


def vocab_size(ckpt: Checkpoint) -> int:
    """The rows a model has for its tokens: config.json's ``vocab_size`` (or its ``text_config``'s), else the row
    count of its input embedding."""
    cfg = ckpt.config
    n = cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")
    if isinstance(n, int) and n > 0:
        return n
    names = vocab_tensors(ckpt)
    if not names:
        raise FormatError(f"{ckpt.path}: no vocab_size in config.json and no embedding tensor")
    return ckpt.shape(names[0])[0]


def _vocab_size_update(config: dict, size: int) -> dict[str, Any]:
    if "vocab_size" not in config and isinstance(config.get("text_config"), dict):
        return {"text_config": {**config["text_config"], "vocab_size": size}}
    return {"vocab_size": size}


def _template_of(tok: Any) -> str | None:
    t = tok.chat_template
    if isinstance(t, dict):
        t = t.get("default")
    return t.strip() if t else None


COMMON_EMBEDDINGS = ("embed_tokens.weight", "lm_head.weight", "wte.weight", "embed_in.weight", "embed_out.weight")


def vocab_tensors(ckpt: Checkpoint) -> list[str]:
    """The checkpoint's tensors with a vocabulary axis (axis 0): the weights and biases of the model's input and
    output embeddings, found as mergekit finds them — in transformers' own module tree, built on the meta device
    from config.json; for an architecture transformers cannot build, the usual embedding names."""
    found = _embedding_params(ckpt.config)
    if found is None:
        found = {n for n in ckpt.names() if n.endswith(COMMON_EMBEDDINGS)}
    return [n for n in ckpt.names() if n in found]


def _embedding_params(config: dict) -> set[str] | None:
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        kwargs = {k: v for k, v in config.items() if k != "model_type"}
        cfg = AutoConfig.for_model(config["model_type"], **kwargs)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    except Exception:  # noqa: BLE001 — any failure means "unknown layout", handled by the caller
        return None
    ids = set()
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        for p in (getattr(module, "weight", None), getattr(module, "bias", None)):
            if p is not None:
                ids.add(id(p))
    return {n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in ids}
