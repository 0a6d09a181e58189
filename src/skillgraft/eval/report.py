"""Study reports: load a ``skillgraft study`` results JSON and render it as Markdown or one self-contained HTML page.

Pure functions; the only I/O is ``load_results`` reading its file. Figures live in ``report_plots``.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from skillgraft.errors import FormatError, NotFoundError

KIND = "skillgraft-study"
SUPPORTED_VERSION = 1

# section name -> expected JSON container type
_SECTIONS: dict[str, type] = {
    "skills": list,
    "base": dict,
    "experts": dict,
    "merge": list,
    "lambda_sweep": list,
    "compress": list,
    "transfer": list,
    "transfer_speed": dict,
    "compose": list,
    "route": dict,
}
# transfer methods in reading order: references around the fused methods
_TRANSFER_FIRST = ("large_base", "small_expert")
_TRANSFER_LAST = ("large_ft",)


# ---------------------------------------------------------------- loading and validation


def validate_results(data: Any, source: str = "results") -> dict[str, Any]:
    """Check ``data`` is a skillgraft study of a version we read, with each present section of the right type."""
    if not isinstance(data, dict) or data.get("kind") != KIND:
        raise FormatError(
            f'{source}: not a skillgraft study results file (no "kind": "{KIND}")',
            hint="pass the JSON written by `skillgraft study`",
        )
    version = data.get("version", SUPPORTED_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version > SUPPORTED_VERSION:
        raise FormatError(
            f"{source}: study results version {version!r} is not readable (this skillgraft reads {SUPPORTED_VERSION})",
            hint="upgrade skillgraft",
        )
    for name, typ in _SECTIONS.items():
        value = data.get(name)
        if value is None:
            continue
        if not isinstance(value, typ):
            raise FormatError(f"{source}: section {name!r} must be a JSON {'array' if typ is list else 'object'}")
        if isinstance(value, list) and name != "skills" and not all(isinstance(row, dict) for row in value):
            raise FormatError(f"{source}: every entry of section {name!r} must be a JSON object")
    return data


def load_results(path: str | Path) -> dict[str, Any]:
    """Read and validate a study results JSON; one-line ``FormatError``/``NotFoundError`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"{path}: no such results file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(
            f"{path}: not a JSON file ({e})", hint="pass the JSON written by `skillgraft study`"
        ) from None
    return validate_results(data, source=str(path))


# ---------------------------------------------------------------- number formatting


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _pct(value: Any) -> str:
    v = _num(value)
    return "-" if v is None else f"{100 * v:.1f}%"


def _fixed(value: Any, digits: int = 2) -> str:
    v = _num(value)
    return "-" if v is None else f"{v:.{digits}f}"


def _seconds(value: Any) -> str:
    v = _num(value)
    if v is None:
        return "-"
    return f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 100 else f"{v:.0f}"


def _bytes(value: Any) -> str:
    v = _num(value)
    if v is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(v) < 1024 or unit == "GiB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return "-"  # pragma: no cover


def _budget(value: Any) -> str:
    v = _num(value)
    if value == "lora":
        return "LoRA, exact"
    return "dense" if value is None else "-" if v is None else f"{100 * v:g}%"


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _settings(row: dict[str, Any]) -> str:
    params = _obj(row.get("params"))
    parts = [f"{k}={v:g}" if _num(v) is not None else f"{k}={v}" for k, v in sorted(params.items())]
    lam = _num(row.get("lambda"))
    if lam is not None:
        parts.append(f"λ={lam:g}")
    return ", ".join(parts) or "-"


# ---------------------------------------------------------------- tables


@dataclass(frozen=True)
class Table:
    """A rendered table: header, string cells, and which columns are numeric (right-aligned)."""

    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    numeric: tuple[bool, ...]
    caption: str = ""


@dataclass(frozen=True)
class Section:
    title: str
    tables: tuple[Table, ...]
    figures: tuple[Callable[[], bytes | None], ...] = field(default=())
    figure_captions: tuple[str, ...] = field(default=())


def _table(columns: Sequence[str], rows: Sequence[Sequence[str]], numeric_from: int, caption: str = "") -> Table:
    return Table(
        columns=tuple(columns),
        rows=tuple(tuple(r) for r in rows),
        numeric=tuple(i >= numeric_from for i in range(len(columns))),
        caption=caption,
    )


def ranked_methods(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``merge`` rows sorted by mean normalized accuracy (best first; rows without it last), each with a rank."""
    rows = [dict(r) for r in results.get("merge") or []]
    rows.sort(
        key=lambda r: (
            _num(r.get("mean_normalized")) is None,
            -(_num(r.get("mean_normalized")) or 0.0),
            -(_num(r.get("mean_em")) or 0.0),
            str(r.get("method", "")),
        )
    )
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    return rows


def method_table(results: dict[str, Any]) -> Table:
    """The ranked merge-method table (what ``demo`` prints); general-ability columns where the study has them."""
    ranked = ranked_methods(results)
    general = any(r.get("general") for r in ranked)
    rows = [
        (
            str(r["rank"]),
            str(r.get("method", "?")),
            _settings(r),
            str(r.get("experts", "-")),
            str(r.get("n_skills", "-")),
            _pct(r.get("mean_normalized")),
            _pct(r.get("mean_em")),
            _seconds(r.get("seconds")),
            *(_general_cells(r.get("general")) if general else ()),
        )
        for r in ranked
    ]
    columns: tuple[str, ...] = (
        "#",
        "method",
        "settings",
        "experts",
        "skills",
        "mean normalized",
        "mean EM",
        "time (s)",
    )
    columns += GENERAL_COLUMNS if general else ()
    return Table(columns, tuple(rows), (True, False, False, False, *(True,) * (len(columns) - 4)))


GENERAL_COLUMNS = ("GSM8K loglik/token", "facts EM")


def _general_cells(general: Any) -> tuple[str, str]:
    """A model's general-ability check (real profiles): GSM8K reference log-likelihood per token, facts EM."""
    g = _obj(general)
    return _fixed(g.get("gsm8k_token_loglik"), 3), _pct(g.get("facts_em"))


def _skills(results: dict[str, Any]) -> list[str]:
    """The declared skills, then any other skill named by the base or expert scores, in first-seen order."""
    skills = [str(s) for s in results.get("skills") or []]
    found = list(results.get("base") or {})
    for matrix in (results.get("experts") or {}).values():
        for row in (matrix if isinstance(matrix, dict) else {}).values():
            found += list(row) if isinstance(row, dict) else []
    for s in found:
        if s not in skills:
            skills.append(s)
    return skills


def _em(cell: Any) -> Any:
    return cell.get("em") if isinstance(cell, dict) else None


def models_table(results: dict[str, Any]) -> Table | None:
    """Exact match of the base and of every expert (row) on every skill (column)."""
    base, experts = results.get("base") or {}, results.get("experts") or {}
    if not base and not experts:
        return None
    skills = _skills(results)
    general = _obj(results.get("general"))
    extra = GENERAL_COLUMNS if general else ()
    rows = []
    if base:
        rows.append(("base", *(_pct(_em(base.get(s))) for s in skills), *_general_row(general.get("base"), extra)))
    for kind, matrix in experts.items():
        gens = _obj(_obj(general.get("experts")).get(kind))
        for expert, scores in (matrix if isinstance(matrix, dict) else {}).items():
            scores = scores if isinstance(scores, dict) else {}
            cells = (_pct(_em(scores.get(s))) for s in skills)
            rows.append((f"{kind} / {expert}", *cells, *_general_row(gens.get(expert), extra)))
    caption = "Exact match; rows are models (expert kind / skill trained on), columns the skill evaluated."
    if extra:
        caption += " General ability: GSM8K reference log-likelihood per token and fact prompts (higher is better)."
    return _table(("model", *skills, *extra), rows, 1, caption)


def _general_row(general: Any, extra: tuple[str, ...]) -> tuple[str, ...]:
    return _general_cells(general) if extra else ()


def sweep_table(results: dict[str, Any]) -> Table | None:
    rows = results.get("lambda_sweep") or []
    if not rows:
        return None
    ordered = sorted(
        rows,
        key=lambda r: (str(r.get("method")), str(r.get("experts")), str(r.get("n_skills")), _num(r.get("lambda")) or 0),
    )
    extra = GENERAL_COLUMNS if any(r.get("general") for r in rows) else ()
    cells = [
        (
            str(r.get("method", "?")),
            str(r.get("experts", "-")),
            str(r.get("n_skills", "-")),
            _fixed(r.get("lambda"), 2),
            _pct(r.get("mean_normalized")),
            _pct(r.get("mean_em")),
            *_general_row(r.get("general"), extra),
        )
        for r in ordered
    ]
    return _table(("method", "experts", "skills", "λ", "mean normalized", "mean EM", *extra), cells, 2)


def compress_table(results: dict[str, Any]) -> Table | None:
    rows = results.get("compress") or []
    if not rows:
        return None
    skill = _skill_key(results)
    ordered = sorted(rows, key=lambda r: (skill(r.get("skill")), r.get("budget") is None, _num(r.get("budget")) or 0))
    extra = GENERAL_COLUMNS if any(r.get("general") for r in rows) else ()
    cells = []
    for r in ordered:
        size, dense = _num(r.get("bytes")), _num(r.get("dense_bytes"))
        cells.append(
            (
                str(r.get("skill", "?")),
                _budget(r.get("budget")),
                _bytes(size),
                _pct(size / dense) if size is not None and dense else "-",
                _pct(r.get("em")),
                _pct(r.get("expert_em")),
                _pct(r.get("retained")),
                _pct(r.get("energy_retained")),
                *_general_row(r.get("general"), extra),
            )
        )
    columns = ("skill", "budget", "size", "of dense", "EM", "expert EM", "retained", "energy retained", *extra)
    caption = "Retained = EM of the compressed skill / EM of the dense expert (LoRA: / the adapter's own EM)."
    return _table(columns, cells, 1, caption)


def negation_table(results: dict[str, Any]) -> Table | None:
    """Each removal (one pack applied at −1 on top of all packs at +1): every skill's EM, the removed skill's
    distance to the base, and the smallest share of their start-model accuracy the other skills keep."""
    rows = results.get("negation") or []
    if not rows:
        return None
    skills = _skills(results)
    extra = GENERAL_COLUMNS if any(r.get("general") for r in rows) else ()
    cells = []
    for r in rows:
        scores = _obj(r.get("scores"))
        above = _num(r.get("removed_above_base"))
        cells.append(
            (
                str(r.get("experts", "-")),
                "none (all packs)" if r.get("removed") is None else f"− {r['removed']}",
                *(_pct(_em(scores.get(s))) if s in scores else "-" for s in skills),
                "-" if above is None else f"{100 * above:+.1f} pts",
                _pct(r.get("min_others_kept")),
                *_general_row(r.get("general"), extra),
            )
        )
    columns = ("experts", "removed", *skills, "removed vs base", "others kept (min)", *extra)
    caption = "Start: every pack at +1 (task arithmetic, λ 1); removing a skill applies its pack again at −1."
    return _table(columns, cells, 2, caption)


def _transfer_order(method: str) -> tuple[int, str]:
    if method in _TRANSFER_FIRST:
        return (_TRANSFER_FIRST.index(method), "")
    if method in _TRANSFER_LAST:
        return (len(_TRANSFER_FIRST) + 1 + _TRANSFER_LAST.index(method), "")
    return (len(_TRANSFER_FIRST), method)


def transfer_table(results: dict[str, Any]) -> Table | None:
    rows = results.get("transfer") or []
    if not rows:
        return None
    skill = _skill_key(results)
    ordered = sorted(rows, key=lambda r: (skill(r.get("skill")), _transfer_order(str(r.get("method")))))
    cells = [
        (
            str(r.get("skill", "?")),
            str(r.get("method", "?")),
            _pct(r.get("em")),
            _fixed(r.get("loglik"), 2),
            _pct(r.get("gap_closed")),
        )
        for r in ordered
    ]
    caption = "Gap closed = (EM − large base EM) / (large fine-tune EM − large base EM)."
    return _table(("skill", "method", "EM", "log-lik", "gap closed"), cells, 2, caption)


def speed_table(results: dict[str, Any]) -> Table | None:
    speed = results.get("transfer_speed") or {}
    if not speed:
        return None
    fused, slowdown = _obj(speed.get("fused_tokens_per_s")), _obj(speed.get("slowdown"))
    cells = [("large model alone", _fixed(speed.get("large_tokens_per_s"), 1), "1.00×")]
    for method in sorted(set(fused) | set(slowdown)):
        s = _num(slowdown.get(method))
        cells.append((f"fused: {method}", _fixed(fused.get(method), 1), "-" if s is None else f"{s:.2f}×"))
    return _table(("decoding", "tokens/s", "slowdown"), cells, 1)


def _skill_key(results: dict[str, Any]) -> Callable[[Any], tuple[int, str]]:
    order = {s: i for i, s in enumerate(_skills(results))}
    return lambda skill: (order.get(str(skill), len(order)), str(skill))


def sections(results: dict[str, Any]) -> list[Section]:
    """The report's sections in reading order; each only when its data is present. Figures are drawn lazily."""
    from skillgraft.eval import report_plots as plots

    out: list[Section] = []
    if results.get("merge"):
        out.append(
            Section(
                "Merge methods (ranked)",
                (method_table(results),),
                (partial(plots.merge_bars, results["merge"]),),
                ("Mean normalized accuracy (merged EM / expert EM, averaged over skills); dashed: the experts.",),
            )
        )
    skills = _skills(results)
    table = models_table(results)
    if table:
        kinds = [(k, m) for k, m in _obj(results.get("experts")).items() if isinstance(m, dict) and m]
        out.append(
            Section(
                "Base and experts",
                (table,),
                tuple(partial(plots.interference_heatmap, k, m, skills) for k, m in kinds),
                tuple(f"Interference matrix of the {k} experts: expert (row) on skill (column)." for k, _ in kinds),
            )
        )
    table = sweep_table(results)
    if table:
        figure = partial(plots.lambda_sweep, results["lambda_sweep"])
        out.append(Section("λ sweep", (table,), (figure,), ("Mean normalized accuracy vs λ.",)))
    table = compress_table(results)
    if table:
        figure = partial(plots.compression_curve, results["compress"])
        out.append(Section("Compression", (table,), (figure,), ("Retained accuracy vs pack budget (log x).",)))
    table = negation_table(results)
    if table:
        out.append(Section("Negation", (table,)))
    table = transfer_table(results)
    if table:
        figure = partial(plots.transfer_bars, results["transfer"], skills)
        out.append(Section("Transfer", (table,), (figure,), ("Gap closed per skill and transfer method.",)))
    table = speed_table(results)
    if table:
        out.append(Section("Transfer speed", (table,)))
    tables = route_tables(results)
    if tables:
        out.append(Section("Routing", tables))
    table = compose_table(results)
    if table:
        rows = results["compose"]
        figures = (partial(plots.compose_curves, rows), *(partial(plots.compose_coefficients, r) for r in rows))
        captions = ("Objective while fitting the coefficients.",) + tuple(
            f"Fitted coefficients, run {i}: skill (row) × block (column)." for i in range(1, len(rows) + 1)
        )
        out.append(Section("Learned composition", (table,), figures, captions))
    return out


def route_tables(results: dict[str, Any]) -> tuple[Table, ...]:
    """``study route``: each router's routing accuracy, then end-to-end accuracy on the mixed prompts."""
    route = _obj(results.get("route"))
    if not route:
        return ()
    skills = _skills(results)
    out = []
    routing = [r for r in route.get("routing") or [] if isinstance(r, dict)]
    if routing:
        cells = [
            (
                str(r.get("router", "?")),
                str(r.get("examples_per_skill") or "none"),
                _pct(r.get("accuracy")),
                *(_pct(_obj(r.get("per_skill")).get(s)) for s in skills),
                _seconds(r.get("build_seconds")),
            )
            for r in routing
        ]
        caption = "Routing accuracy: the fraction of mixed prompts sent to their own skill's expert."
        out.append(_table(("router", "labelled prompts / skill", "accuracy", *skills, "build (s)"), cells, 2, caption))
    rows = [r for r in route.get("end_to_end") or [] if isinstance(r, dict)]
    if rows:
        cells = []
        for r in rows:
            em = _obj(r.get("scores"))
            cells.append(
                (
                    str(r.get("method", "?")),
                    str(r.get("kind", "-")),
                    _pct(r.get("mean_normalized")),
                    _pct(r.get("mean_em")),
                    *(_pct(_em(em.get(s))) for s in skills),
                )
            )
        caption = (
            "Exact match per skill on the mixed prompts; normalized = EM / the expert's own EM, averaged over skills. "
            "Reference rows come from the results file named in the JSON (same experts, measured by study merge "
            "or compose)."
        )
        out.append(_table(("method", "kind", "mean normalized", "mean EM", *skills), cells, 2, caption))
    return tuple(out)


def compose_table(results: dict[str, Any]) -> Table | None:
    """One row per ``skillgraft compose`` run: how it was fitted, on how many rows, and what it kept."""
    rows = results.get("compose") or []
    if not rows:
        return None
    general = any(r.get("general") for r in rows)
    cells = []
    for i, r in enumerate(rows, 1):
        curve = [v for v in r.get("curve") or [] if _num(v) is not None]
        base = _obj(r.get("baseline"))
        cells.append(
            (
                str(i),
                str(r.get("learn", "?")),
                str(r.get("granularity", "-")),
                str(r.get("experts", "-")),
                str(len(_obj(r.get("coefficients")))),
                str(sum(_obj(r.get("examples")).values()) if r.get("examples") else "-"),
                f"{curve[0]:.3f} → {curve[-1]:.3f}" if curve else "-",
                _pct(r.get("mean_normalized")),
                f"{base.get('method', '?')} {_pct(base.get('mean_normalized'))}" if base else "-",
                _seconds(r.get("seconds")),
                *(_general_cells(r.get("general")) if general else ()),
            )
        )
    columns = ("#", "learn", "granularity", "experts", "skills", "examples", "objective", "mean normalized",
               "best training-free", "time (s)", *(GENERAL_COLUMNS if general else ()))  # fmt: skip
    return _table(columns, cells, 7)


# ---------------------------------------------------------------- Markdown


def _md_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _md_table(table: Table) -> str:
    lines = [
        "| " + " | ".join(_md_cell(c) for c in table.columns) + " |",
        "|" + "|".join("---:" if n else ":---" for n in table.numeric) + "|",
    ]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in table.rows]
    if table.caption:
        lines += ["", f"_{table.caption}_"]
    return "\n".join(lines)


def _meta_lines(results: dict[str, Any], markdown: bool = False) -> list[str]:
    meta = [f"{k} {results[k]}" for k in ("profile", "created") if isinstance(results.get(k), (str, int, float))] + [
        f"version {results.get('version', SUPPORTED_VERSION)}"
    ]
    lines = [" · ".join(meta)]
    if results.get("skills"):
        lines.append("skills: " + ", ".join(str(s) for s in results["skills"]))
    if results.get("machine"):
        lines.append(f"machine: {results['machine']}")
    if results.get("command"):
        command = str(results["command"])
        lines.append(f"command: `{command}`" if markdown and "`" not in command else f"command: {command}")
    return lines


def render_markdown(results: dict[str, Any]) -> str:
    """The report's tables as GitHub-flavoured Markdown (no figures)."""
    validate_results(results)
    parts = ["# skillgraft study report", "", *(f"{line}  " for line in _meta_lines(results, markdown=True))]
    body = sections(results)
    for sec in body:
        parts += ["", f"## {sec.title}"]
        for table in sec.tables:
            parts += ["", _md_table(table)]
    if not body:
        parts += ["", "_This results file holds no sections to report._"]
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------- HTML

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1100px; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } .meta { color: #555; font-size: 0.9em; } .meta code { font-size: 0.95em; }
table { border-collapse: collapse; margin: 1em 0 0.4em; font-size: 0.9em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.3em 0.7em; } th { background: #f4f4f4; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; } td.txt, th.txt { text-align: left; }
.caption { color: #555; font-size: 0.85em; font-style: italic; }
figure { display: inline-block; margin: 0.6em 1em 0.6em 0; vertical-align: top; }
figure img { max-width: 100%; } figcaption { color: #555; font-size: 0.85em; max-width: 560px; }
"""


def _html_table(table: Table) -> str:
    def cls(i: int) -> str:
        return "num" if table.numeric[i] else "txt"

    head = "".join(f'<th class="{cls(i)}">{html.escape(c)}</th>' for i, c in enumerate(table.columns))
    body = "".join(
        "<tr>" + "".join(f'<td class="{cls(i)}">{html.escape(c)}</td>' for i, c in enumerate(row)) + "</tr>\n"
        for row in table.rows
    )
    out = f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>\n"
    if table.caption:
        out += f'<p class="caption">{html.escape(table.caption)}</p>\n'
    return out


def _html_figure(png: bytes, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    alt = html.escape(caption, quote=True)
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{alt}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>\n"
    )


def render_html(results: dict[str, Any]) -> str:
    """One self-contained HTML page: tables plus figures embedded as base64 PNGs; no external resources."""
    validate_results(results)
    meta = "".join(f"<div>{html.escape(line)}</div>" for line in _meta_lines(results))
    parts = [
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n',
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n',
        "<title>skillgraft study report</title>\n",
        f"<style>{_CSS}</style>\n</head>\n<body>\n",
        f'<h1>skillgraft study report</h1>\n<div class="meta">{meta}</div>\n',
    ]
    body = sections(results)
    for sec in body:
        parts.append(f"<section>\n<h2>{html.escape(sec.title)}</h2>\n")
        parts += [_html_table(t) for t in sec.tables]
        for make, caption in zip(sec.figures, sec.figure_captions):
            png = make()
            if png is not None:
                parts.append(_html_figure(png, caption))
        parts.append("</section>\n")
    if not body:
        parts.append("<p>This results file holds no sections to report.</p>\n")
    parts.append("</body>\n</html>\n")
    return "".join(parts)
