"""Apply skills to a base: θ = θ₀ + Σ wᵢΔᵢ, either streamed into a new checkpoint or patched in place.

``apply_to_checkpoint`` writes a full HF checkpoint atomically; ``apply``/``unapply`` patch an already loaded
``transformers`` model and restore it bit for bit from a backup of the touched tensors.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from skillgraft.errors import InputError, MismatchError, NumericError, SkillgraftWarning
from skillgraft.io.checkpoint import Checkpoint
from skillgraft.io.writer import CheckpointWriter, check_output
from skillgraft.progress import ProgressFn, no_progress
from skillgraft.skill.fingerprint import fingerprint_checkpoint, fingerprint_state, fingerprint_tokenizer, model_state
from skillgraft.skill.pack import SkillPack


@dataclass(frozen=True)
class WeightedSkill:
    """A skill reference (path or library reference) and its weight; negative weights remove a skill."""

    ref: str
    weight: float = 1.0

    @classmethod
    def parse(cls, text: str) -> WeightedSkill:
        """``math.skill``, ``math@2:0.5`` or ``./x.skill:-1`` (the weight follows the last colon)."""
        ref, sep, w = text.rpartition(":")
        if sep and ref:
            try:
                weight = float(w)
            except ValueError:
                return cls(text, 1.0)
            if not math.isfinite(weight):
                raise InputError(f"skill weight {w!r} in {text!r} is not a finite number")
            return cls(ref, weight)
        return cls(text, 1.0)


def open_skill(ref: str | Path | SkillPack, library: Path | None = None) -> SkillPack:
    """Open a skill pack from a path or a library reference (``name`` or ``name@version``)."""
    if isinstance(ref, SkillPack):
        return ref
    from skillgraft.library import Library, resolve_skill

    return SkillPack(resolve_skill(str(ref), Library(library) if library else None))


def check_fit(
    pack: SkillPack,
    shapes: dict[str, tuple[int, ...]],
    fingerprint: str | None,
    force: bool,
    tokenizer: str | None = None,
) -> list[str]:
    """Refuse a pack made for another base (weights or tokenizer fingerprint), or whose tensors the base lacks
    or shapes differ. Returns warnings: what could not be checked (a pack that records no base fingerprint)."""
    m = pack.manifest
    if m.base.fingerprint and fingerprint and m.base.fingerprint != fingerprint and not force:
        raise MismatchError(
            f"skill {m.name}@{m.version} was made for another base ({m.base.name}, fingerprint "
            f"{m.base.fingerprint}, this base has {fingerprint})",
            hint="use the base the skill was extracted from, or pass --force to apply it anyway",
        )
    if m.base.tokenizer and tokenizer and m.base.tokenizer != tokenizer and not force:
        raise MismatchError(
            f"skill {m.name}@{m.version} was made with another tokenizer (fingerprint {m.base.tokenizer}, "
            f"this base's tokenizer files give {tokenizer}): token ids may mean other text",
            hint="use the base's own tokenizer files, or pass --force if they encode the same vocabulary",
        )
    for name, entry in m.tensors.items():
        if name not in shapes:
            raise MismatchError(
                f"skill {m.name} changes tensor {name!r}, which the base does not have",
                hint="the skill was made for a different architecture",
            )
        if tuple(entry["shape"]) != tuple(shapes[name]):
            raise MismatchError(
                f"skill {m.name}: tensor {name!r} has shape {entry['shape']} but the base's is {list(shapes[name])}"
            )
    if not m.base.fingerprint:
        return [
            f"skill {m.name}@{m.version} records no base fingerprint (a LoRA imported without --base), so only "
            "its tensor names and shapes were checked against this base; re-import it with --base to check it"
        ]
    return []


def _needs_fingerprint(packs: list[SkillPack], force: bool) -> bool:
    return not force and any(p.manifest.base.fingerprint for p in packs)


def apply_to_checkpoint(
    base: str | Path,
    skills: Sequence[tuple[str | Path | SkillPack, float]],
    out: str | Path,
    *,
    force: bool = False,
    overwrite: bool = False,
    allow_pickle: bool = False,
    library: Path | None = None,
    progress: ProgressFn = no_progress,
) -> dict:
    """Write ``base + Σ wᵢ·Δᵢ`` as a full checkpoint at ``out``; returns a summary dict."""
    out = Path(out)
    check_output(out, overwrite)
    if not skills:
        raise InputError("no skills given", hint="pass at least one SKILL[:WEIGHT]")
    packs = [(open_skill(s, library), float(w)) for s, w in skills]
    with Checkpoint(base, allow_pickle) as ckpt:
        shapes = {n: ckpt.shape(n) for n in ckpt.names()}
        fp = fingerprint_checkpoint(ckpt).content if _needs_fingerprint([p for p, _ in packs], force) else None
        tok = fingerprint_tokenizer(ckpt.path)
        notes = [w for p, _ in packs for w in check_fit(p, shapes, fp, force, tok)]
        touched = 0
        names = ckpt.names()
        layout = [(n, ckpt.dtype(n), ckpt.shape(n)) for n in names]
        with CheckpointWriter(out, overwrite=overwrite, copy_from=ckpt.path, plan=layout) as writer:
            for i, name in enumerate(names):
                progress("apply", i, len(names))
                t = ckpt.get(name)
                users = [(p, w) for p, w in packs if name in p.manifest.tensors and w != 0.0]
                if users:
                    t = _add(t, name, users)
                    touched += 1
                writer.add(name, t)
            progress("apply", len(names), len(names))
    for p, _ in packs:
        p.close()
    return {
        "out": str(out),
        "tensors": len(shapes),
        "changed": touched,
        "bytes": writer.total_bytes,
        "skills": [{"name": p.manifest.name, "version": p.manifest.version, "weight": w} for p, w in packs],
        "warnings": notes,
    }


def _add(t: torch.Tensor, name: str, users: list[tuple[SkillPack, float]]) -> torch.Tensor:
    acc = t.float()
    for p, w in users:
        d = p.delta(name)
        acc = acc + d if w == 1.0 else acc + w * d
    if not torch.isfinite(acc).all():
        raise NumericError(f"applying skills to {name!r} produced NaN or Inf", hint="check the skill weights")
    return acc.to(t.dtype)


BACKUP_ATTR = "_skillgraft_backup"


def apply(
    model: torch.nn.Module,
    skills: Sequence[tuple[str | Path | SkillPack, float] | str | Path | SkillPack],
    *,
    force: bool = False,
    library: Path | None = None,
) -> list[str]:
    """Patch a loaded model in place with ``Σ wᵢ·Δᵢ``; returns the names of the changed tensors.

    The original values of every touched tensor are kept on the model so :func:`unapply` restores them bit
    for bit. Calls stack: ``unapply`` undoes all of them.
    """
    pairs = [s if isinstance(s, tuple) else (s, 1.0) for s in skills]
    packs = [(open_skill(s, library), float(w)) for s, w in pairs]
    state = model_state(model)
    shapes = {n: tuple(t.shape) for n, t in state.items()}
    fp = fingerprint_state(state).content if _needs_fingerprint([p for p, _ in packs], force) else None
    if fp and getattr(model, BACKUP_ATTR, None):
        fp = None  # the model is already patched; its fingerprint was checked by the first apply
    for p, _ in packs:
        for note in check_fit(p, shapes, fp, force):
            warnings.warn(note, SkillgraftWarning, stacklevel=2)
    backup: dict[str, torch.Tensor] = getattr(model, BACKUP_ATTR, None) or {}
    touched = sorted({n for p, _ in packs for n in p.manifest.tensors})
    new_values = {}
    with torch.no_grad():
        for name in touched:
            users = [(p, w) for p, w in packs if name in p.manifest.tensors and w != 0.0]
            if users:
                new_values[name] = _add(state[name], name, users)
        for name, value in new_values.items():  # only mutate once everything succeeded
            backup.setdefault(name, state[name].detach().clone())
            state[name].copy_(value)
    setattr(model, BACKUP_ATTR, backup)
    return sorted(new_values)


def unapply(model: torch.nn.Module) -> list[str]:
    """Restore every tensor patched by :func:`apply` to its original bits; returns their names."""
    backup: dict[str, torch.Tensor] | None = getattr(model, BACKUP_ATTR, None)
    if not backup:
        return []
    state = model_state(model)
    with torch.no_grad():
        for name, orig in backup.items():
            state[name].copy_(orig)
    delattr(model, BACKUP_ATTR)
    return sorted(backup)
