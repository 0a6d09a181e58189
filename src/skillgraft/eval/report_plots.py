"""Figures of a study report, each rendered to PNG bytes with matplotlib's Agg canvas.

One function per figure, taking the validated results dict and returning ``None`` when its section has no data.
No pyplot: every figure is a standalone ``Figure``, so nothing global is touched and no display is needed.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable
from typing import Any

_DPI = 100
# the two ends of the gap (0 and 1 by definition): drawn as lines, not bars
_TRANSFER_REFERENCES = ("large_base", "large_ft")


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=_DPI, layout="constrained")


def _png(fig: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _num(value: Any) -> float | None:
    """A finite float, or None for missing / non-numeric / NaN values."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _em(cell: Any) -> float | None:
    return _num(cell.get("em")) if isinstance(cell, dict) else None


def interference_heatmap(kind: str, matrix: dict[str, Any], skills: list[str]) -> bytes | None:
    """Expert i (rows) scored on skill j (columns), exact match, annotated; blank where not measured."""
    experts = list(matrix)
    if not experts or not skills:
        return None
    values = [[_em(matrix[e].get(s) if isinstance(matrix[e], dict) else None) for s in skills] for e in experts]
    grid = [[math.nan if v is None else v for v in row] for row in values]
    fig = _new_figure(1.6 + 0.9 * len(skills), 1.2 + 0.55 * len(experts))
    ax = fig.add_subplot()
    image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(skills)), labels=skills, rotation=30, ha="right")
    ax.set_yticks(range(len(experts)), labels=[f"{e} expert" for e in experts])
    ax.set_xlabel("evaluated on skill")
    ax.set_title(f"Interference: {kind} experts (exact match)")
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            if v is not None:
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="black" if v > 0.6 else "white")
    fig.colorbar(image, ax=ax, shrink=0.8)
    return _png(fig)


def merge_bars(rows: list[dict[str, Any]]) -> bytes | None:
    """Mean normalized accuracy per method, grouped by (experts, n_skills); best setting of each method."""
    best: dict[str, dict[str, float]] = {}
    for r in rows:
        value = _num(r.get("mean_normalized"))
        if value is None:
            continue
        group = f"{r.get('experts', '?')}, {r.get('n_skills', '?')} skills"
        per_method = best.setdefault(group, {})
        method = str(r.get("method", "?"))
        per_method[method] = max(value, per_method.get(method, -math.inf))
    if not best:
        return None
    groups = list(best)
    methods = sorted({m for d in best.values() for m in d})
    width = 0.8 / len(methods)
    fig = _new_figure(max(5.0, 1.2 + 0.35 * len(groups) * len(methods)), 3.8)
    ax = fig.add_subplot()
    for k, method in enumerate(methods):
        xs = [i + (k - (len(methods) - 1) / 2) * width for i in range(len(groups))]
        ys = [best[g].get(method, math.nan) for g in groups]
        ax.bar(xs, ys, width=width, label=method)
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="experts (1.0)")
    ax.set_xticks(range(len(groups)), labels=groups)
    ax.set_ylabel("mean normalized accuracy")
    ax.set_title("Merge methods (best setting per method)")
    ax.legend(fontsize="small", ncols=min(4, len(methods) + 1), loc="upper center", bbox_to_anchor=(0.5, -0.12))
    return _png(fig)


def compression_curve(rows: list[dict[str, Any]]) -> bytes | None:
    """Retained accuracy vs pack budget (log x); the dense delta is the right-most point, labelled 'dense'."""
    budgets = [b for r in rows if (b := _num(r.get("budget"))) is not None and b > 0]
    dense_x = max(1.0, 2 * max(budgets)) if budgets and max(budgets) >= 1.0 else 1.0
    by_skill: dict[str, dict[float, float]] = {}
    for r in rows:
        retained = _num(r.get("retained"))
        budget = _num(r.get("budget"))
        if retained is None or (r.get("budget") is not None and (budget is None or budget <= 0)):
            continue
        by_skill.setdefault(str(r.get("skill", "?")), {})[dense_x if budget is None else budget] = retained
    if not by_skill:
        return None
    fig = _new_figure(5.6, 3.8)
    ax = fig.add_subplot()
    for skill, points in sorted(by_skill.items()):
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], marker="o", linewidth=1, alpha=0.8, label=skill)
    all_x = sorted({x for points in by_skill.values() for x in points})
    mean_y = [_mean(p[x] for p in by_skill.values() if x in p) for x in all_x]
    ax.plot(all_x, mean_y, color="black", linewidth=2.5, marker="s", label="mean")
    ax.set_xscale("log")
    ticks = all_x
    ax.set_xticks(ticks, labels=["dense" if x == dense_x else f"{100 * x:g}%" for x in ticks])
    ax.minorticks_off()
    ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("pack budget (fraction of the dense delta's bytes)")
    ax.set_ylabel("retained (EM / expert EM)")
    ax.set_title("Compression")
    ax.legend(fontsize="small")
    return _png(fig)


def lambda_sweep(rows: list[dict[str, Any]]) -> bytes | None:
    """Mean normalized accuracy vs the scaling λ, one line per (method, experts, n_skills)."""
    lines: dict[str, dict[float, float]] = {}
    for r in rows:
        lam, value = _num(r.get("lambda")), _num(r.get("mean_normalized"))
        if lam is None or value is None:
            continue
        label = f"{r.get('method', '?')} ({r.get('experts', '?')}, {r.get('n_skills', '?')})"
        lines.setdefault(label, {})[lam] = value
    if not lines:
        return None
    fig = _new_figure(5.6, 3.8)
    ax = fig.add_subplot()
    for label, points in sorted(lines.items()):
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], marker="o", label=label)
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
    ax.set_xlabel("λ (scale of the merged delta)")
    ax.set_ylabel("mean normalized accuracy")
    ax.set_title("λ sweep")
    ax.legend(fontsize="small")
    return _png(fig)


def transfer_bars(rows: list[dict[str, Any]], skills: list[str] | None = None) -> bytes | None:
    """Gap closed (large base = 0, large fine-tune = 1, dashed) per skill, one bar per transfer method."""
    cells: dict[str, dict[str, float]] = {}
    for r in rows:
        gap, method = _num(r.get("gap_closed")), str(r.get("method", "?"))
        if gap is not None and method not in _TRANSFER_REFERENCES:
            cells.setdefault(method, {})[str(r.get("skill", "?"))] = gap
    if not cells:
        return None
    present = {s for d in cells.values() for s in d}
    skills = [s for s in skills or [] if s in present] + sorted(present - set(skills or []))
    methods = sorted(cells)
    width = 0.8 / len(methods)
    fig = _new_figure(max(5.0, 1.2 + 0.35 * len(skills) * len(methods)), 3.8)
    ax = fig.add_subplot()
    for k, method in enumerate(methods):
        xs = [i + (k - (len(methods) - 1) / 2) * width for i in range(len(skills))]
        ax.bar(xs, [cells[method].get(s, math.nan) for s in skills], width=width, label=method)
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="large fine-tune (1.0)")
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(skills)), labels=skills)
    ax.set_ylabel("gap closed")
    ax.set_title("Transfer to the large model")
    ax.legend(fontsize="small", ncols=min(4, len(methods) + 1), loc="upper center", bbox_to_anchor=(0.5, -0.08))
    return _png(fig)


def _compose_label(r: dict[str, Any]) -> str:
    return f"{r.get('learn', '?')} ({r.get('experts', '?')}, {len(_obj(r.get('coefficients')))} skills)"


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def compose_curves(rows: list[dict[str, Any]]) -> bytes | None:
    """The fitted objective per step (search: best of each generation), one line per ``compose`` run."""
    lines = [(r, [v for v in (r.get("curve") or []) if _num(v) is not None]) for r in rows]
    lines = [(r, c) for r, c in lines if c]
    if not lines:
        return None
    fig = _new_figure(5.6, 3.8)
    ax = fig.add_subplot()
    for r, c in lines:
        ax.plot(range(1, len(c) + 1), c, label=_compose_label(r))
    ax.set_xlabel("step (search: generation)")
    ax.set_ylabel("objective (loss, entropy or 1 − EM)")
    ax.set_title("Learned composition: objective")
    ax.legend(fontsize="small")
    return _png(fig)


def compose_coefficients(row: dict[str, Any]) -> bytes | None:
    """The fitted coefficients of one ``compose`` run: skills (rows) × blocks (columns)."""
    coef = {s: _obj(v) for s, v in _obj(row.get("coefficients")).items()}
    blocks = list(next(iter(coef.values()), {}))
    if not coef or not blocks:
        return None
    grid = [[_num(coef[s].get(b)) or math.nan for b in blocks] for s in coef]
    fig = _new_figure(min(14.0, 2.5 + 0.12 * len(blocks)), 1.4 + 0.45 * len(coef))
    ax = fig.add_subplot()
    image = ax.imshow(grid, cmap="magma", aspect="auto")
    ax.set_yticks(range(len(coef)), labels=list(coef))
    step = max(1, len(blocks) // 16)
    short = [b.split("layers.")[-1] for b in blocks]
    ax.set_xticks(range(0, len(blocks), step), labels=short[::step], rotation=60, ha="right", fontsize="small")
    ax.set_title(f"Coefficients: {_compose_label(row)}")
    fig.colorbar(image, ax=ax, shrink=0.8)
    return _png(fig)


def _mean(values: Iterable[float]) -> float:
    vals = list(values)
    return sum(vals) / len(vals) if vals else math.nan
