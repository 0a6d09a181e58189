"""skillgraft: extract, store, apply and compose skills (fine-tune deltas) of language models.

The public API: :func:`extract`, :func:`apply` / :func:`unapply` (in place), :func:`apply_to_checkpoint`,
:class:`SkillPack`, :class:`Checkpoint`, :class:`~skillgraft.library.Library`, :func:`import_lora`,
:func:`export_lora`, and :func:`merge` (``skillgraft.merge(config, out)``; ``skillgraft.merge`` is also the merging
package). Names are imported lazily so ``skillgraft --help`` does not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_LAZY = {
    "SkillgraftError": "skillgraft.errors",
    "Checkpoint": "skillgraft.io.checkpoint",
    "apply": "skillgraft.skill.apply",
    "unapply": "skillgraft.skill.apply",
    "apply_to_checkpoint": "skillgraft.skill.apply",
    "extract": "skillgraft.skill.extract",
    "ExtractSpec": "skillgraft.skill.extract",
    "ExtractResult": "skillgraft.skill.extract",
    "Manifest": "skillgraft.skill.pack",
    "SkillPack": "skillgraft.skill.pack",
    "Library": "skillgraft.library",
    "import_lora": "skillgraft.skill.peft",
    "export_lora": "skillgraft.skill.peft",
}
__all__ = sorted(_LAZY)

if TYPE_CHECKING:  # pragma: no cover
    from skillgraft.errors import SkillgraftError  # noqa: F401
    from skillgraft.io.checkpoint import Checkpoint  # noqa: F401
    from skillgraft.library import Library  # noqa: F401
    from skillgraft.skill.apply import apply, apply_to_checkpoint, unapply  # noqa: F401
    from skillgraft.skill.extract import ExtractResult, ExtractSpec, extract  # noqa: F401
    from skillgraft.skill.pack import Manifest, SkillPack  # noqa: F401
    from skillgraft.skill.peft import export_lora, import_lora  # noqa: F401


def __getattr__(name: str):
    if name == "merge":  # the package, which is callable: skillgraft.merge(config, out)
        return importlib.import_module("skillgraft.merge")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'skillgraft' has no attribute {name!r}")
