"""Routers: which skill serves a prompt. Arrow (from the LoRA weights alone), centroid and classifier (from the
base's hidden states on labelled example prompts). Each is built once, saved beside the library, and rebuilt
when the skills it routes among change.

Features (centroid, classifier): the base's last hidden state (after its final norm), max-pooled over the
prompt's tokens (each dimension's largest value), centred on the mean of all example features and scaled to unit
length. Max rather than mean pooling was chosen on val prompts: a short skill tag ("[sort] …") is a few tokens of
the prompt, and a mean washes it out (tiny ``full`` profile's large base: classifier 88 % mean, 99 % max; real-quick
100 % both; docs/benchmarks.md, session 29). Routers saved with mean features (no ``MAX_POOL`` in their state)
still score as built and are rebuilt by ``load_router``. The base runs without any skill,
so a router's choice never depends on which skills are loaded.

* ``arrow`` — Ostapenko et al. 2024 ("Towards Modular LLMs by Building and Reusing a Library of LoRAs"): each LoRA
  module's prototype vᵢ is the top right-singular vector of ΔWᵢ (``ModuleFactors.prototype``). Per prompt, skill i
  scores the mean over its modules and the prompt's tokens of |⟨vᵢ, x − μ⟩| / ‖x − μ‖ (x: the module's input on the
  base); the top score wins. No labels and no data: μ, the module's mean input, is estimated on text the base
  samples itself (``arrow_centres``: ``CALIBRATION`` sequences from BOS, seeded). Centring is our change to the
  paper, which scores |⟨vᵢ, x⟩| / ‖x‖: module inputs share a large common component, and a skill whose top
  direction leans on it wins every prompt (measured in docs/benchmarks.md). A router without centres in its state
  (``Router("arrow", …, state={})``) scores as published. Per token (the paper's own routing, uncentred) is
  ``SkillRuntime``'s ``ARROW_MIX``.
* ``centroid`` — the nearest per-skill mean feature (cosine) of a few example prompts per skill.
* ``classifier`` — multinomial logistic regression (L2, full-batch L-BFGS) on the same features.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from skillgraft.errors import FormatError, InputError
from skillgraft.eval.generate import encode_prompt, left_pad
from skillgraft.route.runtime import Mix, SkillRuntime

METHODS = ("arrow", "centroid", "classifier")
FORMAT = "skillgraft-router/1"
L2 = 1e-3  # classifier weight decay (on unit-length features)
CALIBRATION = (32, 48)  # Arrow's centres: sequences the base samples, and tokens each (capped by its context)
CENTRE = "centre:"  # state key prefix of Arrow's per-module mean inputs
MAX_POOL = "pool:max"  # state marker: centroid/classifier features are max-pooled (older routers: mean)


@dataclass
class Router:
    """Chooses one of ``keys`` per prompt. ``skills``: key → content hash the router was built from;
    ``examples``: skill name → prompts (centroid/classifier keep them so a rebuild needs no new input)."""

    method: str
    keys: list[str]
    skills: dict[str, str]
    state: dict[str, torch.Tensor]
    examples: dict[str, list[str]] = field(default_factory=dict)
    base: str = ""  # the content fingerprint of the base whose hidden states (or LoRA inputs) it scores

    def scores(self, runtime: SkillRuntime, prompts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
        """[len(prompts), len(keys)]: higher is a better fit."""
        if not self.keys:
            raise InputError("the router has no skills to choose among", hint="add skills, then rebuild it")
        if self.method == "arrow":
            centres = {k[len(CENTRE) :]: v for k, v in self.state.items() if k.startswith(CENTRE)}
            return arrow_scores(runtime, self.keys, prompts, batch_size, centres or None)
        pool = "max" if MAX_POOL in self.state else "mean"
        f = (features(runtime, prompts, batch_size, pool) - self.state["mean"]).float()
        f = torch.nn.functional.normalize(f, dim=-1)
        if self.method == "centroid":
            return f @ self.state["centroids"].T
        return f @ self.state["weight"].T + self.state["bias"]

    def choose(self, runtime: SkillRuntime, prompts: Sequence[str], batch_size: int = 16) -> list[str]:
        """The chosen key per prompt."""
        if not prompts:
            return []
        idx = self.scores(runtime, prompts, batch_size).argmax(-1).tolist()
        return [self.keys[i] for i in idx]

    def route(self, runtime: SkillRuntime, prompts: Sequence[str]) -> list[Mix]:
        """The chosen skill per prompt as a runtime mix (weight 1)."""
        return [((k, 1.0),) for k in self.choose(runtime, prompts)]

    def gate(self, runtime: SkillRuntime, order: Sequence[str]) -> Callable[[Sequence[str]], torch.Tensor]:
        """A prompt gate for multi-expert logit transfer (``FusedModel(router=...)``): prompts → one-hot
        [len(prompts), len(order)] on the chosen key's position in ``order`` (the experts' order)."""
        missing = [k for k in self.keys if k not in order]
        if missing:
            raise InputError(f"the router chooses {missing[0]!r}, which is not among the experts {list(order)}")
        pos = torch.tensor([list(order).index(k) for k in self.keys])

        def fn(prompts: Sequence[str]) -> torch.Tensor:
            idx = pos[self.scores(runtime, prompts).argmax(-1)]
            return torch.nn.functional.one_hot(idx, len(order)).float()

        return fn


# -- features ---------------------------------------------------------------------------------------------
def _batches(runtime: SkillRuntime, prompts: Sequence[str], batch_size: int) -> Any:
    model, tok = runtime.model, runtime.tok
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    device = next(model.parameters()).device
    enc = [encode_prompt(tok, p) for p in prompts]
    for i in range(0, len(enc), batch_size):
        yield i, left_pad(enc[i : i + batch_size], pad, device)


@torch.no_grad()
def features(runtime: SkillRuntime, prompts: Sequence[str], batch_size: int = 16, pool: str = "max") -> torch.Tensor:
    """[len(prompts), hidden]: the base's last hidden state pooled over each prompt's tokens (padding left out):
    ``max`` (each dimension's largest value) or ``mean``."""
    if pool not in ("max", "mean"):
        raise ValueError(f"pool must be 'max' or 'mean', not {pool!r}")
    out = []
    for _, batch in _batches(runtime, prompts, batch_size):
        h = runtime.model(**batch, output_hidden_states=True, use_cache=False).hidden_states[-1].float()
        m = batch["attention_mask"][..., None].bool()
        out.append(h.masked_fill(~m, float("-inf")).amax(1) if pool == "max" else (h * m).sum(1) / m.sum(1))
    return torch.cat(out)


@torch.no_grad()
def arrow_centres(runtime: SkillRuntime, modules: Sequence[str], seed: int = 0) -> dict[str, torch.Tensor]:
    """Each module's mean input on the base (no skill applied), over ``CALIBRATION`` sequences the base samples
    from BOS at temperature 1 (seeded; the global RNG is left as it was) — no labels, no data."""
    model, tok = runtime.model, runtime.tok
    n, length = CALIBRATION
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    length = min(length, limit - 1) if limit else length
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if start is None:
        raise InputError("Arrow's centres need the tokenizer's BOS or EOS token to start sampling from")
    device = next(model.parameters()).device
    ids = torch.full((n, 1), int(start), dtype=torch.long, device=device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        seqs = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            min_new_tokens=length,
            max_new_tokens=length,
            pad_token_id=int(start),
        )
    sums: dict[str, list] = {m: [0.0, 0] for m in modules}
    named = dict(model.named_modules())

    def hook(name: str) -> Any:
        def fn(module: Any, args: tuple, output: Any) -> None:
            x = args[0].float()
            sums[name][0] = sums[name][0] + x.sum((0, 1))
            sums[name][1] += x.shape[0] * x.shape[1]

        return fn

    handles = [named[m].register_forward_hook(hook(m)) for m in modules]
    try:
        model(input_ids=seqs, attention_mask=torch.ones_like(seqs), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {m: (s / c).cpu() for m, (s, c) in sums.items()}


@torch.no_grad()
def arrow_scores(
    runtime: SkillRuntime,
    keys: Sequence[str],
    prompts: Sequence[str],
    batch_size: int,
    centres: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Arrow per prompt: mean |⟨vᵢ, x − μ⟩| / ‖x − μ‖ over skill i's modules and the prompt's tokens, on the
    base (μ: ``centres[module]``; without ``centres``, μ = 0 as published)."""
    protos: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for i, k in enumerate(keys):
        factors = runtime.skills[k].factors
        if factors is None:
            raise InputError(f"skill {k!r} is not LoRA-form, so Arrow cannot route to it", hint="use centroid")
        for name, f in factors.items():
            protos.setdefault(name, []).append((i, f.prototype()))
    modules = dict(runtime.model.named_modules())
    total = torch.zeros(len(prompts), len(keys))
    count = torch.zeros(len(keys))
    for k_i, k in enumerate(keys):
        count[k_i] = len(runtime.skills[k].factors or {})
    cur: dict[str, torch.Tensor] = {}  # this batch's mask [B, T] and score sums [B, len(keys)]

    def hook(name: str) -> Any:
        idx = torch.tensor([i for i, _ in protos[name]])
        v = torch.stack([p for _, p in protos[name]])  # [n_here, in]
        mu = centres[name] if centres is not None else None

        def fn(module: Any, args: tuple, output: Any) -> None:
            x, mask = args[0].float(), cur["mask"]
            if mu is not None:
                x = x - mu.to(x.device)
            s = (x @ v.T).abs() / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # [B, T, n_here]
            cur["acc"][:, idx] += (s * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)

        return fn

    handles = [modules[n].register_forward_hook(hook(n)) for n in protos]
    try:
        for start, batch in _batches(runtime, prompts, batch_size):
            mask = cur["mask"] = batch["attention_mask"].float()
            cur["acc"] = torch.zeros(mask.shape[0], len(keys))
            runtime.model(**batch, use_cache=False)
            total[start : start + mask.shape[0]] = cur["acc"] / count.clamp_min(1)
    finally:
        for h in handles:
            h.remove()
    return total


# -- building ---------------------------------------------------------------------------------------------
def build_router(
    method: str,
    runtime: SkillRuntime,
    skills: dict[str, str],
    examples: dict[str, list[str]] | None = None,
    name_of: dict[str, str] | None = None,
    base: str = "",
) -> Router:
    """Build a router over ``skills`` (key → content hash; keys loaded in ``runtime`` for Arrow).

    ``examples`` maps a skill *name* (``name_of[key]``, default the key before ``@``) to labelled prompts.
    """
    if method not in METHODS:
        raise InputError(f"unknown router {method!r}", hint=f"use one of {', '.join(METHODS)}")
    keys = sorted(skills)
    if not keys:
        raise InputError("no skills to route among", hint="add skills that fit this base to the library")
    if method == "arrow":
        for k in keys:
            if k not in runtime.skills or not runtime.skills[k].lora:
                raise InputError(f"Arrow routes among LoRA-form skills; {k!r} is not one", hint="use centroid")
        modules = sorted({n for k in keys for n in runtime.skills[k].factors or {}})
        state = {CENTRE + m: c for m, c in arrow_centres(runtime, modules).items()}
        return Router(method, keys, dict(skills), state, base=base)
    names = name_of or {k: k.split("@")[0] for k in keys}
    examples = examples or {}
    missing = [k for k in keys if not examples.get(names[k])]
    if missing:
        raise InputError(
            f"the {method} router needs example prompts for {', '.join(names[k] for k in missing)}",
            hint=f"pass --examples {names[missing[0]]}=PROMPTS.jsonl (a 'prompt' per line) for each skill",
        )
    kept = {n: list(v) for n, v in examples.items()}  # all kept: a skill removed and added back needs none
    feats = [features(runtime, kept[names[k]]) for k in keys]
    mean = torch.cat(feats).mean(0)
    unit = [torch.nn.functional.normalize(f - mean, dim=-1) for f in feats]
    if method == "centroid":
        cent = torch.nn.functional.normalize(torch.stack([u.mean(0) for u in unit]), dim=-1)
        state = {"mean": mean, "centroids": cent}
    else:
        x = torch.cat(unit)
        y = torch.cat([torch.full((len(u),), i) for i, u in enumerate(unit)])
        state = {"mean": mean, **_logistic(x, y, len(keys))}
    state[MAX_POOL] = torch.ones(())
    return Router(method, keys, dict(skills), state, kept, base)


def _logistic(x: torch.Tensor, y: torch.Tensor, n: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    w = torch.zeros(n, x.shape[1], requires_grad=True)
    b = torch.zeros(n, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w.T + b, y) + L2 * w.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return {"weight": w.detach(), "bias": b.detach()}


# -- beside the library -----------------------------------------------------------------------------------
def router_dir(library_root: Path) -> Path:
    return Path(library_root) / "routers"


def save_router(router: Router, library_root: Path) -> Path:
    """Write ``routers/<method>.json`` + ``.safetensors`` atomically (temp files renamed into place)."""
    d = router_dir(library_root)
    d.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT,
        "method": router.method,
        "keys": router.keys,
        "skills": router.skills,
        "examples": router.examples,
        "base": router.base,
    }
    for suffix, write in (
        (".safetensors", lambda p: save_file({k: v.contiguous() for k, v in router.state.items()}, p)),
        (".json", lambda p: Path(p).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")),
    ):
        fd, tmp = tempfile.mkstemp(prefix=f".{router.method}.", suffix=suffix, dir=d)
        os.close(fd)
        try:
            write(tmp)
            os.replace(tmp, d / f"{router.method}{suffix}")
        finally:
            Path(tmp).unlink(missing_ok=True)
    return d / f"{router.method}.json"


def read_router(library_root: Path, method: str) -> Router | None:
    """The saved router, or None when there is none."""
    d = router_dir(library_root)
    meta_path, state_path = d / f"{method}.json", d / f"{method}.safetensors"
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT or meta.get("method") != method:
            raise ValueError("format")
        state = load_file(str(state_path)) if state_path.exists() else {}
        return Router(
            method, list(meta["keys"]), dict(meta["skills"]), state, dict(meta["examples"]), str(meta["base"])
        )
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise FormatError(
            f"{meta_path}: not a readable {FORMAT} router ({e})",
            hint=f"rebuild it: skillgraft route build --method {method} …",
        ) from None


def load_router(
    library_root: Path,
    runtime: SkillRuntime,
    method: str,
    skills: dict[str, str] | None = None,
    base: str = "",
    examples: dict[str, list[str]] | None = None,
) -> Router:
    """The saved router when it was built from exactly ``skills`` (key → sha256; default: every skill loaded in
    ``runtime`` with its pack's content hash as ``LoadedSkill.sha256``) on ``base`` (a fingerprint), else rebuilt
    from the saved examples updated by ``examples`` (and saved again). A skill added since needs example prompts
    for centroid/classifier (an error says so)."""
    if method not in METHODS:
        raise InputError(f"unknown router {method!r}", hint=f"use one of {', '.join(METHODS)}")
    if skills is None:
        skills = {k: s.sha256 for k, s in runtime.skills.items() if method != "arrow" or s.lora}
    saved = read_router(library_root, method)
    marker = (lambda k: k.startswith(CENTRE)) if method == "arrow" else (lambda k: k == MAX_POOL)
    current = saved is not None and any(marker(k) for k in saved.state)  # older: Arrow uncentred, mean features
    if current and saved.skills == skills and saved.base == base and not examples:
        return saved
    merged = {**(saved.examples if saved else {}), **(examples or {})}
    router = build_router(method, runtime, skills, merged, base=base)
    save_router(router, library_root)
    return router
