"""The merge-methods reference page, rendered from the registry so it cannot drift from the code.

``python -m skillgraft.merge.docs > docs/merging-methods.md`` regenerates ``docs/merging-methods.md``.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from skillgraft.merge.registry import MethodInfo, all_methods, config_key

HEADER = """# Merge methods

Generated from the method registry by `python -m skillgraft.merge.docs > docs/merging-methods.md`; do not edit by
hand. Every method is a pure function of one tensor's deltas Δᵢ = θᵢ − θ₀ and the user weights wᵢ, returning the
merged delta in fp32. Parameter names are the config keys (`lambda_` is written `lambda`).
"""


def render_methods_page() -> str:
    """The whole page: a summary table, then one section per method."""
    methods = all_methods()
    lines = [HEADER, "| method | flags |", "|---|---|"]
    lines += [f"| [`{m.name}`](#{m.name}) | {', '.join(_flags(m)) or '—'} |" for m in methods]
    for m in methods:
        lines += ["", *_section(m)]
    return "\n".join(lines) + "\n"


def _section(m: MethodInfo) -> list[str]:
    out = [f"## {m.name}", ""]
    out += [f"Flags: {', '.join(_flags(m)) or 'none'}", ""]
    fields = dataclasses.fields(m.params)
    if fields:
        out += ["| parameter | type | default |", "|---|---|---|"]
        out += [f"| `{config_key(f.name)}` | `{_type(f.type)}` | `{_default(f)}` |" for f in fields]
    else:
        out.append("No parameters.")
    out += ["", inspect.cleandoc(m.doc) if m.doc else "(undocumented)"]
    return out


def _flags(m: MethodInfo) -> list[str]:
    flags = []
    if m.needs_base:
        flags.append("needs base")
    if m.randomized:
        flags.append("randomized (seeded per tensor)")
    if m.stats:
        flags.append(f"needs statistics: {m.stats}")
    if m.steps is not None and m.steps.model_pass is not None and not m.stats:
        flags.append("whole-model pass (optional)")
    if m.steps is not None and m.steps.whole_tensor:
        flags.append("whole tensor at once")
    if m.min_inputs != 1 or m.max_inputs is not None:
        hi = m.max_inputs if m.max_inputs is not None else "any"
        flags.append(f"inputs: {m.min_inputs}–{hi}" if hi != m.min_inputs else f"inputs: exactly {hi}")
    return flags


def _type(t: Any) -> str:
    return (t if isinstance(t, str) else getattr(t, "__name__", str(t))).replace("|", "\\|")


def _default(f: dataclasses.Field[Any]) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return repr(f.default_factory())
    return "required"


if __name__ == "__main__":
    print(render_methods_page(), end="")
