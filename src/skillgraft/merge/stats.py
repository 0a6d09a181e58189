"""Per-input statistics some merge methods need: diagonal Fisher (``fisher``) and input Gram matrices
of Linear layers (``regmean``), estimated by running each input model on a small JSONL of examples.

Each input is materialised in memory as base + Δ (one at a time), measured, and its statistics are spilled to a
temporary safetensors file that the engine reads back one tensor at a time.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from skillgraft.errors import FormatError, InputError
from skillgraft.io.safetensors_file import MappedFile
from skillgraft.merge.registry import ModelPass
from skillgraft.progress import ProgressFn, no_progress
from skillgraft.skill.fingerprint import model_state


class LazyStats:
    """Statistics of one input, read per tensor from a spilled safetensors file."""

    def __init__(self, path: Path) -> None:
        self.file = MappedFile(path)

    def get(self, name: str) -> torch.Tensor | None:
        return self.file.get(name) if name in self.file.tensors else None


def read_examples(path: str | Path, limit: int) -> list[tuple[str, str]]:
    """JSONL rows ``{"prompt", "target"}`` or ``{"text"}`` → (prompt, target) pairs (prompt may be empty)."""
    from skillgraft.eval.tasks import json_lines

    rows = []
    for i, d in json_lines(path, "examples file"):
        if not isinstance(d, dict):
            raise FormatError(f"{path}:{i}: expected a JSON object")
        if "text" in d:
            rows.append(("", str(d["text"])))
        elif "prompt" in d and "target" in d:
            rows.append((str(d["prompt"]), str(d["target"])))
        else:
            raise FormatError(f"{path}:{i}: expected keys 'prompt' and 'target', or 'text'")
        if len(rows) >= limit:
            break
    if not rows:
        raise InputError(f"{path}: no examples")
    return rows


def _encode(tok: Any, prompt: str, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and labels (prompt tokens masked with -100)."""
    p_ids = tok(prompt, add_special_tokens=False).input_ids if prompt else []
    t_ids = tok(target, add_special_tokens=False).input_ids
    ids = torch.tensor([p_ids + t_ids])
    labels = ids.clone()
    labels[0, : len(p_ids)] = -100
    return ids, labels


def _materialise(plan: Any, i: int) -> torch.nn.Module:
    """Load the base and add input i's delta in place (fp32)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(plan.base.path, dtype=torch.float32).eval()
    state = model_state(model)
    src = plan.sources[i]
    with torch.no_grad():
        for name in src.names():
            state[name].add_(src.delta(name, plan.base.get(name)).to(state[name].dtype))
    return model


def fisher_diag(model: torch.nn.Module, tok: Any, examples: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Empirical diagonal Fisher: mean over examples of the squared gradient of the target log-likelihood."""
    params = {n: t for n, t in model.named_parameters() if t.requires_grad}  # tied aliases appear once
    acc = {n: torch.zeros_like(t, dtype=torch.float32) for n, t in params.items()}
    for prompt, target in examples:
        ids, labels = _encode(tok, prompt, target)
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=labels).loss.backward()
        for n, t in params.items():
            if t.grad is not None:
                acc[n] += t.grad.float() ** 2
    return {n: a / len(examples) for n, a in acc.items()}


def gram_matrices(model: torch.nn.Module, tok: Any, examples: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Σ xᵀx over every token that enters each ``nn.Linear`` (keyed by ``<module>.weight``)."""
    grams: dict[str, torch.Tensor] = {}
    hooks = []
    for mname, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):

            def hook(m: torch.nn.Module, inp: tuple, out: Any, key: str = mname + ".weight") -> None:
                x = inp[0].detach().reshape(-1, inp[0].shape[-1]).float()
                g = x.T @ x
                grams[key] = grams[key] + g if key in grams else g

            hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for prompt, target in examples:
                ids, _ = _encode(tok, prompt, target)
                model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return grams


class StatsPass(ModelPass):
    """Each input's statistics for every tensor, as ``job.stats`` (None where an input has none)."""

    def __init__(self, stats: list[LazyStats | None]) -> None:
        self.stats = stats

    def fields(self, name: str) -> dict:
        return {"stats": tuple(s.get(name) if s is not None else None for s in self.stats)}

    def close(self) -> None:
        for s in self.stats:
            if s is not None:
                s.file.close()


def statistics_pass(plan: Any, params: Any, progress: ProgressFn) -> StatsPass:
    """The whole-model pass of Fisher and RegMean: :func:`compute_stats` for the plan's method."""
    return StatsPass(compute_stats(plan, progress))


def compute_stats(plan: Any, progress: ProgressFn = no_progress) -> list[LazyStats | None]:
    """Statistics (``plan.method.stats``: "fisher" or "gram") for every input of ``plan``, spilled to a temp
    dir that is removed with the plan."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(plan.base.path)
    except (OSError, ValueError) as e:
        raise InputError(f"{plan.base.path}: no tokenizer to encode the examples with ({e.__class__.__name__})") from e
    examples = read_examples(plan.config.examples, plan.config.num_examples)
    kind = plan.method.stats
    tmp = tempfile.TemporaryDirectory(prefix="skillgraft-stats-")
    plan.resources.append(tmp)  # removed with the plan
    out: list[LazyStats | None] = []
    for i in range(len(plan.sources)):
        progress(f"{kind} statistics", i, len(plan.sources))
        model = _materialise(plan, i)
        torch.manual_seed(0)
        stats = fisher_diag(model, tok, examples) if kind == "fisher" else gram_matrices(model, tok, examples)
        path = Path(tmp.name) / f"{i}.safetensors"
        save_file({k: v.contiguous() for k, v in stats.items()}, str(path))
        out.append(LazyStats(path))
        del model, stats
    progress(f"{kind} statistics", len(plan.sources), len(plan.sources))
    return out
