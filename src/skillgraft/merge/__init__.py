"""Merging: pure per-tensor merge methods (``methods/``), their registry, configs and the streaming engine.

A method sees one tensor name's inputs (a :class:`TensorJob`) and returns the merged delta; the engine owns
reading, writing, threads, dtypes and memory.

The package itself is callable: ``skillgraft.merge(config, out)`` is :func:`merge` (the API behind
``skillgraft merge``), while ``skillgraft.merge.engine``, ``.config`` and ``.methods`` stay importable.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import TYPE_CHECKING, Any

from skillgraft.merge.registry import REGISTRY, MethodInfo, TensorJob, get_method, merge_method
from skillgraft.progress import ProgressFn, no_progress

if TYPE_CHECKING:  # pragma: no cover
    from skillgraft.merge.config import MergeConfig
    from skillgraft.merge.engine import MergeResult

__all__ = ["REGISTRY", "MethodInfo", "TensorJob", "get_method", "merge", "merge_method"]


def merge(
    config: str | Path | dict | MergeConfig,
    out: str | Path,
    *,
    out_format: str = "hf",
    rank: int | None = None,
    seed: int | None = None,
    overwrite: bool = False,
    force: bool = False,
    library: str | Path | None = None,
    allow_pickle: bool = False,
    progress: ProgressFn = no_progress,
) -> MergeResult:
    """Validate ``config`` completely, then stream the merge into ``out``; nothing is left at ``out`` on error.

    ``config`` is a YAML file (skillgraft's schema or a mergekit file; relative paths resolve against the
    file's directory), the same mapping as a ``dict`` (relative paths resolve against the working directory),
    or a parsed :class:`~skillgraft.merge.config.MergeConfig`. ``out_format`` is ``hf`` (a full checkpoint),
    ``skill`` (a skill pack) or ``lora`` (a PEFT adapter of ``rank``). ``seed`` overrides the config's seed for
    randomised methods. Returns the :class:`~skillgraft.merge.engine.MergeResult`.

    Example::

        import skillgraft
        res = skillgraft.merge({"base": "./base", "method": "ties", "inputs": ["math.skill", "./code-ft"],
                                "parameters": {"density": 0.5}}, "./merged")
    """
    from skillgraft.merge.config import MergeConfig, from_dict, load_config
    from skillgraft.merge.engine import MergeOptions
    from skillgraft.merge.engine import merge as run

    if isinstance(config, dict):
        cfg = from_dict(config)
    elif isinstance(config, MergeConfig):
        cfg = config
    else:
        cfg = load_config(config)
    opts = MergeOptions(
        out=Path(out),
        out_format=out_format,
        rank=rank,
        overwrite=overwrite,
        force=force,
        seed=seed,
        library=Path(library) if library is not None else None,
        allow_pickle=allow_pickle,
    )
    return run(cfg, opts, progress)


class _CallableModule(types.ModuleType):
    """Lets ``skillgraft.merge(...)`` call :func:`merge` while ``skillgraft.merge`` stays a package."""

    def __call__(self, *args: Any, **kwargs: Any) -> MergeResult:
        return merge(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
