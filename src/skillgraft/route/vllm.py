"""Export a library's LoRA-form skills as PEFT adapters plus the ``vllm serve`` command that serves them all.

``export_vllm`` writes ``DIR/<name>/`` (via ``skill.peft.export_lora``), ``serve.sh``, ``skills.json`` and
``README.md`` into a temporary sibling of ``DIR`` and renames it into place only when everything is written.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from skillgraft.errors import InputError, NotFoundError, OutputExistsError, UnsupportedError
from skillgraft.io.writer import _replace, _umask
from skillgraft.library.record import SkillRecord
from skillgraft.skill.modules import module_kind

if TYPE_CHECKING:
    from skillgraft.library.store import Library

# vLLM refuses any other --max-lora-rank: LoRAConfig.possible_max_ranks = (8, 16, 32, 64, 128, 256, 320, 512)
# in the 0.6-0.10 releases, MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512] from 0.11 on
# (vllm/config/lora.py). We never pick 1, so the command works on both.
VLLM_MAX_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
DEFAULT_MAX_LORAS = 8  # vLLM reserves GPU memory for max_loras x max_lora_rank per adapted layer
BASE_PLACEHOLDER = "BASE_MODEL"
EXPORT_FORMAT = "skillgraft.vllm-export"


@dataclass(frozen=True)
class ExportedSkill:
    """One adapter written: the library version it came from, its largest rank and the modules it adapts."""

    name: str
    version: int
    sha256: str
    rank: int
    target_modules: tuple[str, ...]  # module-name suffixes (q_proj, down_proj, …)
    adapter_dir: Path

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "ref": f"{self.name}@{self.version}",
            "sha256": self.sha256,
            "rank": self.rank,
            "target_modules": list(self.target_modules),
            "adapter_dir": self.adapter_dir.name,
        }


@dataclass(frozen=True)
class SkippedSkill:
    ref: str
    reason: str


@dataclass(frozen=True)
class VllmExport:
    """What ``export_vllm`` wrote; ``command`` is the ``vllm serve`` argv (base ``BASE_MODEL`` when none given)."""

    out_dir: Path
    base: str | None
    adapters: tuple[ExportedSkill, ...]
    skipped: tuple[SkippedSkill, ...]
    max_lora_rank: int
    max_loras: int
    command: tuple[str, ...]

    @property
    def command_line(self) -> str:
        return shlex.join(self.command)

    def to_dict(self) -> dict:
        return {
            "out_dir": str(self.out_dir),
            "base": self.base,
            "adapters": [a.to_dict() for a in self.adapters],
            "skipped": [{"ref": s.ref, "reason": s.reason} for s in self.skipped],
            "max_lora_rank": self.max_lora_rank,
            "max_loras": self.max_loras,
            "command": self.command_line,
            "serve_script": str(self.out_dir / "serve.sh"),
        }


def vllm_rank(rank: int) -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts that holds ``rank`` (UnsupportedError past 512)."""
    for r in VLLM_MAX_LORA_RANKS:
        if rank <= r:
            return r
    raise UnsupportedError(f"rank {rank} exceeds vLLM's largest --max-lora-rank {VLLM_MAX_LORA_RANKS[-1]}")


def not_lora_form(tensors: dict[str, dict]) -> str | None:
    """Why a pack's entries are no adapter vLLM can serve exactly, or None when every entry is a low-rank delta
    of a linear weight inside the blocks (embeddings and output heads are left out: vLLM's support for them
    depends on its version and the model)."""
    if not tensors:
        return "the pack holds no tensors"
    for param, entry in tensors.items():
        shape = tuple(entry.get("shape", ()))
        if not param.endswith(".weight") or len(shape) != 2:
            return f"not LoRA-form: {param} (shape {list(shape)}) is not a 2-D weight matrix"
        if entry.get("encoding") != "lowrank":
            return (
                f"not LoRA-form: {param} is a {entry.get('encoding')} delta "
                "(`skillgraft export-lora --rank R` approximates it by SVD, with its error reported)"
            )
        if entry.get("module_type") == "embedding" or module_kind(param, shape) == "embedding":
            return f"not LoRA-form for vLLM: {param} is an embedding or output head"
    return None


def _check_out(out: Path, force: bool) -> None:
    if not out.parent.is_dir():
        raise NotFoundError(f"{out.parent}: output's parent directory does not exist")
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise OutputExistsError(f"{out}: output exists and is not empty", hint="choose another path or pass --force")


def _open_library(root: str | Path | None) -> Library:
    from skillgraft.library.store import Library, default_root

    path = Path(root).expanduser() if root is not None else default_root()
    if not (path / "index.sqlite").is_file():
        raise NotFoundError(
            f"{path}: no skill library here (no index.sqlite)",
            hint="pass --library DIR of a library made by `skillgraft library add`",
        )
    return Library(path)


def _base_fingerprint(base: Path) -> str:
    from skillgraft.io.checkpoint import Checkpoint
    from skillgraft.skill.fingerprint import fingerprint_checkpoint

    with Checkpoint(base) as ckpt:
        return fingerprint_checkpoint(ckpt).content


def _choose(lib: Library, skills: list[str] | None, fp: str | None) -> tuple[list[SkillRecord], list[SkippedSkill]]:
    """The record to export per skill name (the latest version made for the base), and names left out."""
    versions: dict[str, list[SkillRecord]] = {}
    for rec in lib.list():  # by name, then version
        versions.setdefault(rec.name, []).append(rec)
    if not versions:
        raise InputError(f"{lib.root}: the library holds no skills", hint="add some with `skillgraft library add`")
    if skills:
        picked = [lib.get(ref) for ref in skills]  # NotFoundError with "did you mean" for a wrong name
        if len({r.name for r in picked}) != len(picked):
            raise InputError("a skill name is given twice", hint="give each --skill once (NAME or NAME@VERSION)")
        groups = {r.name: [r] if "@" in ref else versions[r.name] for r, ref in zip(picked, skills)}
    else:
        groups = versions
    chosen, skipped = [], []
    for recs in groups.values():
        fits = [r for r in recs if fp is None or r.base_fingerprint == fp]
        if fits:
            chosen.append(fits[-1])
        elif recs[-1].base_fingerprint is None:
            skipped.append(SkippedSkill(recs[-1].ref, "records no base fingerprint, so it cannot be matched to --base"))
        else:
            skipped.append(SkippedSkill(recs[-1].ref, f"made for another base ({recs[-1].base_name or 'unnamed'})"))
    return chosen, skipped


def _export_one(lib: Library, rec: SkillRecord, out: Path) -> ExportedSkill | str:
    """Write ``out`` as a PEFT adapter of ``rec``, or return why it cannot be served by vLLM."""
    from skillgraft.skill.pack import SkillPack
    from skillgraft.skill.peft import export_lora

    pack_path = lib.path(rec.ref)
    with SkillPack(pack_path) as pack:
        reason = not_lora_form(pack.manifest.tensors)
        ranks = [int(e.get("rank", 0)) for e in pack.manifest.tensors.values()]
    if reason is not None:
        return reason
    if max(ranks) > VLLM_MAX_LORA_RANKS[-1]:
        return f"rank {max(ranks)} exceeds vLLM's largest --max-lora-rank {VLLM_MAX_LORA_RANKS[-1]}"
    try:
        report = export_lora(pack_path, out)  # low-rank factors as stored: exact, scale 1
    except UnsupportedError as e:
        return e.message
    suffixes = sorted({m.module.rsplit(".", 1)[-1] for m in report.modules})
    return ExportedSkill(rec.name, rec.version, rec.sha256, max(m.rank for m in report.modules), tuple(suffixes), out)


def _limits(n: int, rank: int, max_loras: int) -> list[str]:
    """``--max-lora-rank``, ``--max-loras`` and, when fewer slots than adapters, ``--max-cpu-loras`` (all cached)."""
    args = ["--max-lora-rank", str(rank), "--max-loras", str(max_loras)]
    return args + (["--max-cpu-loras", str(n)] if n > max_loras else [])


def _serve_argv(base: str, adapters: list[tuple[str, str]], rank: int, max_loras: int) -> list[str]:
    argv = ["vllm", "serve", base, "--enable-lora", *_limits(len(adapters), rank, max_loras)]
    return argv + ["--lora-modules", *(f"{name}={path}" for name, path in adapters)]


def _serve_script(base: str | None, adapters: tuple[ExportedSkill, ...], rank: int, max_loras: int) -> str:
    largest = max(a.rank for a in adapters)
    lines = [
        "#!/bin/sh",
        f"# Serve {_count(len(adapters), 'skillgraft skill')} as LoRA adapters on one vLLM server (skills.json "
        "lists them).",
        '# Clients pick a skill with "model": "<name>" (the base alone: the base path as model).',
        "# Usage: ./serve.sh [more vllm serve options, e.g. --port 8000 --tensor-parallel-size 2]",
        f"# --max-lora-rank {rank}: the largest adapter rank here ({largest}) rounded up to a value vLLM accepts",
        f"#   ({', '.join(map(str, VLLM_MAX_LORA_RANKS))}). --max-loras {max_loras}: adapters in one batch (GPU",
        "#   memory is reserved for each); the others wait in CPU memory (--max-cpu-loras) until requested.",
        "set -eu",
        'HERE=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)',
    ]
    if base is None:
        lines += [
            "# No base was given at export: set BASE_MODEL to the model the skills were made for.",
            f'BASE="${{{BASE_PLACEHOLDER}:?set {BASE_PLACEHOLDER} to the base model directory or hub id}}"',
        ]
    else:
        lines += [
            f"# The skills were checked against this base (fingerprint); {BASE_PLACEHOLDER}=... overrides the path.",
            f"DEFAULT_BASE={shlex.quote(base)}",
            f'BASE="${{{BASE_PLACEHOLDER}:-$DEFAULT_BASE}}"',
        ]
    lines += [
        'exec vllm serve "$BASE" \\',
        "  --enable-lora \\",
        *(f"  {flag} {value} \\" for flag, value in _pairs(_limits(len(adapters), rank, max_loras))),
        "  --lora-modules \\",
        *(f'    {a.name}="$HERE/{a.name}" \\' for a in adapters),
        '  "$@"',
    ]
    return "\n".join(lines) + "\n"


def _readme(export: VllmExport) -> str:
    names = [a.name for a in export.adapters]
    base = export.base or f"${BASE_PLACEHOLDER}"
    lines = [
        "# skillgraft skills for vLLM",
        "",
        f"{_count(len(names), 'skill')} exported as PEFT LoRA adapters (one directory each: `adapter_config.json` + "
        "`adapter_model.safetensors`), exact copies of the skills' low-rank factors. `skills.json` lists each "
        "skill's library version, sha256, rank and target modules.",
        "",
        "Start the server (needs `pip install vllm` and a GPU; extra options are passed on to `vllm serve`):",
        "",
        "```",
        "./serve.sh --port 8000" if export.base else f"{BASE_PLACEHOLDER}=/path/to/base ./serve.sh --port 8000",
        "```",
        "",
        'Each skill is a model of the OpenAI-compatible API: send `"model": "<name>"`, one of '
        + ", ".join(f"`{n}`" for n in names)
        + f'; the base alone is `"model": "{base}"`. Requests naming different skills share batches.',
        "",
        "```",
        "curl http://localhost:8000/v1/completions -H 'Content-Type: application/json' \\",
        f'  -d \'{{"model": "{names[0]}", "prompt": "...", "max_tokens": 32}}\'',
        "```",
        "",
    ]
    if not export.base:
        lines += [f"No base was given at export: set `{BASE_PLACEHOLDER}` to the model the skills were made for.", ""]
    if export.skipped:
        lines += ["Not exported (no exact LoRA form):", ""]
        lines += [f"- `{s.ref}`: {s.reason}" for s in export.skipped] + [""]
    return "\n".join(lines)


def _write_files(tmp: Path, export: VllmExport, base_fp: str | None) -> None:
    script = tmp / "serve.sh"
    script.write_text(_serve_script(export.base, export.adapters, export.max_lora_rank, export.max_loras))
    script.chmod(0o755)
    index = {
        "format": EXPORT_FORMAT,
        "format_version": 1,
        "base": export.base,
        "base_fingerprint": base_fp,
        "max_lora_rank": export.max_lora_rank,
        "max_loras": export.max_loras,
        "skills": [a.to_dict() for a in export.adapters],
        "skipped": [{"ref": s.ref, "reason": s.reason} for s in export.skipped],
    }
    (tmp / "skills.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (tmp / "README.md").write_text(_readme(export))


def _check_one_base(chosen: list[SkillRecord]) -> None:
    bases = {r.base_fingerprint for r in chosen if r.base_fingerprint is not None}
    if len(bases) > 1:
        raise InputError(
            f"the skills were made for {len(bases)} different base models; one vLLM server serves one base",
            hint="pass --base MODEL_DIR to export the skills made for it (or --skill to choose)",
        )


def export_vllm(
    library_root: str | Path | None,
    out_dir: str | Path,
    base: str | Path | None = None,
    skills: list[str] | None = None,
    max_loras: int | None = None,
    force: bool = False,
) -> VllmExport:
    """Export the latest version of every LoRA-form library skill (made for ``base`` when given) for vLLM.

    Skills that are not LoRA-form are skipped with a reason; InputError when none is left. ``max_loras``
    defaults to the number of adapters, at most 8. An existing non-empty ``out_dir`` is replaced only with ``force``.
    """
    out = Path(out_dir).expanduser()
    _check_out(out, force)
    if max_loras is not None and max_loras < 1:
        raise InputError(f"max_loras must be at least 1 (got {max_loras})")
    base_path = Path(base).expanduser().resolve() if base is not None else None
    fp = _base_fingerprint(base_path) if base_path is not None else None
    with _open_library(library_root) as lib:
        chosen, skipped = _choose(lib, skills, fp)
        if fp is None:
            _check_one_base(chosen)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
        try:
            written = []
            for rec in chosen:
                result = _export_one(lib, rec, tmp / rec.name)
                if isinstance(result, str):
                    skipped.append(SkippedSkill(rec.ref, result))
                else:
                    written.append(result)
            if not written:
                detail = "; ".join(f"{s.ref}: {s.reason}" for s in skipped[:3])
                more = f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
                raise InputError(
                    f"no skill can be exported for vLLM ({detail}{more})",
                    hint="vLLM serves LoRA adapters: skills imported by `import-lora` are LoRA-form; "
                    "`export-lora --rank R --drop-unrepresentable` approximates another one",
                )
            rank = vllm_rank(max(a.rank for a in written))
            n = max_loras or min(len(written), DEFAULT_MAX_LORAS)
            final = tuple(replace(a, adapter_dir=out.resolve() / a.name) for a in written)
            base_name = str(base_path) if base_path is not None else None
            argv = _serve_argv(base_name or BASE_PLACEHOLDER, [(a.name, str(a.adapter_dir)) for a in final], rank, n)
            export = VllmExport(out, base_name, final, tuple(skipped), rank, n, tuple(argv))
            _write_files(tmp, export, fp)
            _replace_dir(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return export


def _replace_dir(tmp: Path, out: Path) -> None:
    """Give the tree the user's usual modes (mkdtemp makes 0700 directories, which a server running as another
    user could not read), then rename it over ``out``."""
    mode = 0o777 & ~_umask()
    for d in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
        os.chmod(d, mode)
    _replace(tmp, out)


def _pairs(args: list[str]) -> list[tuple[str, str]]:
    return list(zip(args[::2], args[1::2]))


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
