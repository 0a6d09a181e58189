"""One base model in memory serving many skills: each batch row gets its own skill (or mix) in one forward pass.

LoRA-form skills (``route.lora``) run unmerged. Every patched module keeps, per *slot*, stacked factors
``P [S, in, R]`` and ``Q [S, R, out]`` (slot 0 is the base: zeros; ranks padded with zeros to the widest slot),
and a forward hook adds ``bmm(bmm(x, P[slot_of_row]), Q[slot_of_row])`` — a grouped low-rank matmul, so rows
that use different skills share the base's matmuls. A mix ``[(a, wa), (b, wb)]`` is one slot with the factors
concatenated: ``x [Pa Pb] [wa·Qa; wb·Qb] = wa·x Pa Qa + wb·x Pb Qb`` exactly. Slot ``ARROW`` routes every token
of a row at every module by Arrow (Ostapenko et al., 2024: the top-k skills by ``|⟨vᵢ, x⟩|``, softmax-weighted).
Skills with dense or sparse entries are hot-swapped instead: ``skill.apply`` patches the weights, the rows that
use them run, ``unapply`` restores the base bit for bit; nothing is reloaded.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from skillgraft.errors import InputError, NotFoundError
from skillgraft.eval.generate import GenerateParams, Loglik, generate, loglikelihood
from skillgraft.library.blobs import hash_file
from skillgraft.route.lora import ModuleFactors, lora_form
from skillgraft.skill.apply import apply, check_fit, open_skill, unapply
from skillgraft.skill.fingerprint import model_state
from skillgraft.skill.pack import SkillPack

Mix = tuple[tuple[str, float], ...]  # skill keys and weights for one request; () is the base alone
ARROW = "arrow"  # the per-token Arrow mix (a request's ``route="arrow-token"``)
ARROW_MIX: Mix = ((ARROW, 1.0),)


@dataclass
class LoadedSkill:
    """A skill held by the runtime: ``factors`` when LoRA-form (runs unmerged), else the open pack (hot-swap)."""

    key: str
    pack: SkillPack
    factors: dict[str, ModuleFactors] | None
    warnings: tuple[str, ...] = ()
    sha256: str = ""  # the pack file's content hash (what a saved router was built from)

    @property
    def lora(self) -> bool:
        return self.factors is not None

    @property
    def nbytes(self) -> int:
        if self.factors is None:
            return self.pack.manifest.total_bytes
        return sum(4 * (f.p.numel() + f.q.numel()) for f in self.factors.values())


class _Module:
    """The per-slot stacks of one patched module, rebuilt lazily when slots change."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype) -> None:
        self.shape, self.dtype = (in_features, out_features), dtype
        self.p: torch.Tensor | None = None  # [S, in, R]
        self.q: torch.Tensor | None = None  # [S, R, out]
        self.arrow: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None = None  # V, P cat, Q cat, rank


class SkillRuntime:
    """Skills over one loaded ``transformers`` causal LM (never reloaded); rows choose skills per batch.

    >>> rt = SkillRuntime(model, tokenizer)
    >>> rt.load("cipher@1", library=lib); rt.load("units@1", library=lib)
    >>> rt.generate(["...", "..."], [(("cipher@1", 1.0),), (("units@1", 1.0),)], GenerateParams(16))
    """

    def __init__(self, model: Any, tokenizer: Any, arrow_top_k: int = 1) -> None:
        self.model, self.tok = model.eval(), tokenizer
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.skills: dict[str, LoadedSkill] = {}
        self.arrow_top_k = arrow_top_k
        self._slots: dict[Mix, int] = {(): 0}
        self._modules: dict[str, _Module] = {}
        self._hooks: dict[str, Any] = {}
        self._rows: torch.Tensor | None = None  # [B] slot per row, set while a batch runs
        self._arrow_rows: torch.Tensor | None = None  # [B] bool: rows routed per token
        self._shapes = {n: tuple(t.shape) for n, t in model_state(model).items()}

    # -- skills -----------------------------------------------------------------------------------------
    def load(self, ref: str | Path | SkillPack, key: str | None = None, library: Path | None = None) -> LoadedSkill:
        """Hold a skill (path, library reference or open pack) under ``key`` (default: the reference given)."""
        pack = open_skill(ref, library)
        key = key or (str(ref) if not isinstance(ref, SkillPack) else f"{pack.manifest.name}@{pack.manifest.version}")
        if key == ARROW or ":" in key:
            raise InputError(f"skill key {key!r} is reserved or contains ':'", hint="load it under another key")
        # Shapes are checked here; the base's identity is the caller's (``library.list(base=...)``).
        notes = check_fit(pack, self._shapes, None, force=True)
        factors = lora_form(pack, self.model)
        if key in self.skills:
            self.unload(key)
        skill = LoadedSkill(key, pack, factors, tuple(notes), hash_file(pack.path)[0])
        self.skills[key] = skill
        if factors is not None:
            self._slot(((key, 1.0),))
        return skill

    def unload(self, key: str) -> None:
        """Drop a skill (and every mix that used it); the base is untouched."""
        if key not in self.skills:
            raise NotFoundError(f"skill {key!r} is not loaded", hint=f"loaded: {', '.join(self.skills) or 'none'}")
        self.skills.pop(key).pack.close()
        keep = [m for m in self._slots if m and all(k != key for k, _ in m)]
        self._slots = {(): 0, **{m: i + 1 for i, m in enumerate(keep)}}
        self._invalidate()

    @property
    def lora_keys(self) -> list[str]:
        return [k for k, s in self.skills.items() if s.lora]

    def nbytes(self) -> int:
        """Bytes held for skills (factors, stacks, open packs' stored parts), beyond the base's weights."""
        stacks = sum(
            (m.p.numel() + m.q.numel()) * m.p.element_size() for m in self._modules.values() if m.p is not None
        )
        return stacks + sum(s.nbytes for s in self.skills.values())

    def check_mix(self, mix: Mix) -> None:
        for key, w in mix:
            if key != ARROW and key not in self.skills:
                raise NotFoundError(f"skill {key!r} is not loaded", hint=f"loaded: {', '.join(self.skills)}")
            if not isinstance(w, (int, float)) or w != w or abs(w) == float("inf"):
                raise InputError(f"skill weight {w!r} for {key!r} is not a finite number")

    def _dense(self, mix: Mix) -> bool:
        return any(k != ARROW and not self.skills[k].lora for k, _ in mix)

    # -- slots and the hook ---------------------------------------------------------------------------
    def _slot(self, mix: Mix) -> int:
        if mix not in self._slots:
            self._slots[mix] = len(self._slots)
            self._invalidate()
        return self._slots[mix]

    def _invalidate(self) -> None:
        for m in self._modules.values():
            m.p = m.q = m.arrow = None
        names = {n for s in self.skills.values() if s.factors for n in s.factors}
        for name in list(self._hooks):
            if name not in names:
                self._hooks.pop(name).remove()
                self._modules.pop(name)
        mods = dict(self.model.named_modules())
        for name in names - set(self._hooks):
            mod = mods[name]
            w = mod.weight
            in_f, out_f = (w.shape[1], w.shape[0]) if isinstance(mod, torch.nn.Linear) else tuple(w.shape)
            self._modules[name] = _Module(int(in_f), int(out_f), w.dtype)
            self._hooks[name] = mod.register_forward_hook(self._make_hook(name))

    def _factors(self, name: str, mix: Mix) -> tuple[torch.Tensor, torch.Tensor] | None:
        ps, qs = [], []
        for key, w in mix:
            f = (self.skills[key].factors or {}).get(name)
            if f is not None and w != 0.0:
                ps.append(f.p)
                qs.append(f.q * w if w != 1.0 else f.q)
        return (torch.cat(ps, 1), torch.cat(qs, 0)) if ps else None

    def _build(self, name: str, m: _Module) -> None:
        order = sorted(self._slots.items(), key=lambda kv: kv[1])
        per = [self._factors(name, mix) if mix and mix != ARROW_MIX else None for mix, _ in order]
        rank = max([f[0].shape[1] for f in per if f is not None], default=1)
        in_f, out_f = m.shape
        p = torch.zeros(len(order), in_f, rank, dtype=m.dtype)
        q = torch.zeros(len(order), rank, out_f, dtype=m.dtype)
        for i, f in enumerate(per):
            if f is not None:
                p[i, :, : f[0].shape[1]] = f[0]
                q[i, : f[1].shape[0]] = f[1]
        m.p, m.q = p, q

    def _build_arrow(self, name: str, m: _Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Arrow's per-skill prototypes V [n, in] and the skills' factors padded to one rank R:
        P [in, n·R], Q [n·R, out] (skills without this module: zero factors and a zero prototype)."""
        keys = self.lora_keys
        facs = [(self.skills[k].factors or {}).get(name) for k in keys]
        rank = max([f.rank for f in facs if f is not None], default=1)
        in_f, out_f = m.shape
        v = torch.zeros(len(keys), in_f)
        p = torch.zeros(in_f, len(keys), rank)
        q = torch.zeros(len(keys), rank, out_f)
        for i, f in enumerate(facs):
            if f is not None:
                v[i] = f.prototype()
                p[:, i, : f.rank] = f.p
                q[i, : f.rank] = f.q
        return v.to(m.dtype), p.reshape(in_f, -1).to(m.dtype), q.reshape(-1, out_f).to(m.dtype), rank

    def _make_hook(self, name: str) -> Any:
        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            rows = self._rows
            if rows is None:
                return output
            m = self._modules[name]
            x = args[0]
            if x.shape[0] != rows.shape[0]:
                raise RuntimeError(f"{name}: batch of {x.shape[0]} rows but {rows.shape[0]} row skills set")
            if m.p is None:
                self._build(name, m)
            assert m.p is not None and m.q is not None
            x3 = x.reshape(x.shape[0], -1, x.shape[-1])
            extra = torch.bmm(torch.bmm(x3, m.p[rows]), m.q[rows])  # [B, T, out]
            if self._arrow_rows is not None and bool(self._arrow_rows.any()):
                extra = extra + self._arrow_extra(name, m, x3) * self._arrow_rows[:, None, None]
            return output + extra.reshape(output.shape).to(output.dtype)

        return hook

    def _arrow_extra(self, name: str, m: _Module, x3: torch.Tensor) -> torch.Tensor:
        if m.arrow is None:
            m.arrow = self._build_arrow(name, m)
        v, p, q, rank = m.arrow
        n = v.shape[0]
        scores = (x3 @ v.T).abs()  # [B, T, n]
        k = min(self.arrow_top_k, n)
        top, idx = scores.topk(k, -1)
        weights = torch.zeros_like(scores).scatter_(-1, idx, torch.softmax(top, -1))  # [B, T, n]
        xp = (x3 @ p).reshape(*x3.shape[:2], n, rank) * weights[..., None]
        return xp.reshape(*x3.shape[:2], n * rank) @ q

    @contextmanager
    def rows(self, mixes: Sequence[Mix]) -> Iterator[None]:
        """Within the block, row i of every forward pass uses ``mixes[i]`` (LoRA-form skills and Arrow only)."""
        for mix in mixes:
            self.check_mix(mix)
            if self._dense(mix):
                raise InputError("rows() takes LoRA-form skills only; dense skills are hot-swapped by generate()")
        self._set_rows(mixes)
        try:
            yield
        finally:
            self._rows = self._arrow_rows = None

    @contextmanager
    def swapped(self, mix: Mix) -> Iterator[None]:
        """Within the block the model's weights carry ``mix`` (hot swap, for dense skills); restored bit for bit
        after. Rows in the block run without per-row skills (do not nest ``rows()`` inside)."""
        self.check_mix(mix)
        if any(k == ARROW for k, _ in mix):
            raise InputError("arrow-token routing cannot mix with a hot-swapped (dense) skill")
        apply(self.model, [(self.skills[k].pack, w) for k, w in mix], force=True)
        try:
            yield
        finally:
            unapply(self.model)

    def is_dense(self, mix: Mix) -> bool:
        """Whether ``mix`` needs a hot swap (it names a skill that is not LoRA-form)."""
        self.check_mix(mix)
        return self._dense(mix)

    @property
    def mixes(self) -> int:
        """How many slots (base, each LoRA skill alone, each weighted mix seen) the stacks hold."""
        return len(self._slots)

    def drop_mixes(self) -> None:
        """Forget every weighted mix (each LoRA skill alone keeps its slot); stacks are rebuilt on next use.
        A long-running server calls this so clients naming ever-new weights cannot grow the stacks forever."""
        keep = [((k, 1.0),) for k in self.lora_keys]
        self._slots = {(): 0, **{m: i + 1 for i, m in enumerate(keep)}}
        self._invalidate()

    def _set_rows(self, mixes: Sequence[Mix]) -> None:
        self._rows = torch.tensor([0 if mix == ARROW_MIX else self._slot(mix) for mix in mixes], dtype=torch.long)
        arrow = torch.tensor([mix == ARROW_MIX for mix in mixes])
        self._arrow_rows = arrow if bool(arrow.any()) else None

    # -- batched inference ----------------------------------------------------------------------------
    def _groups(self, mixes: Sequence[Mix]) -> list[tuple[Mix | None, list[int]]]:
        """(None, rows) for everything LoRA-form (one mixed pass), then (mix, rows) per hot-swapped mix."""
        for mix in mixes:
            self.check_mix(mix)
        lora = [i for i, m in enumerate(mixes) if not self._dense(m)]
        groups: list[tuple[Mix | None, list[int]]] = [(None, lora)] if lora else []
        dense: dict[Mix, list[int]] = {}
        for i, m in enumerate(mixes):
            if self._dense(m):
                dense.setdefault(m, []).append(i)
        return groups + list(dense.items())

    def _run(self, mixes: Sequence[Mix], n: int, call: Any) -> list[Any]:
        out: list[Any] = [None] * n
        for swap, idx in self._groups(mixes):
            if swap is not None:
                if any(k == ARROW for k, _ in swap):
                    raise InputError("arrow-token routing cannot mix with a hot-swapped (dense) skill")
                apply(self.model, [(self.skills[k].pack, w) for k, w in swap], force=True)
            try:
                sub = [mixes[i] for i in idx]

                def before(batch: list[int], sub: list[Mix] = sub, swap: Mix | None = swap) -> None:
                    if swap is None:
                        self._set_rows([sub[j] for j in batch])

                results = call(idx, before)
            finally:
                self._rows = self._arrow_rows = None
                if swap is not None:
                    unapply(self.model)
            for i, r in zip(idx, results):
                out[i] = r
        return out

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], mixes: Sequence[Mix], params: GenerateParams) -> list[str]:
        """Greedy continuations, row i with skill mix ``mixes[i]`` (batched across LoRA-form mixes)."""
        if len(prompts) != len(mixes):
            raise InputError(f"{len(prompts)} prompts but {len(mixes)} skill choices")
        return self._run(
            mixes,
            len(prompts),
            lambda idx, before: generate(self.model, self.tok, [prompts[i] for i in idx], params, before_batch=before),
        )

    @torch.no_grad()
    def loglik(self, pairs: Sequence[tuple[str, str]], mixes: Sequence[Mix], batch_size: int = 8) -> list[Loglik]:
        """``log p(target | prompt)`` per pair under its row's mix."""
        return self._run(
            mixes,
            len(pairs),
            lambda idx, before: loglikelihood(
                self.model, self.tok, [pairs[i] for i in idx], batch_size, before_batch=before
            ),
        )
