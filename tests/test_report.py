"""Study reports: self-contained HTML with one decodable PNG per figure, ranked Markdown, CLI errors and overwrite."""

from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser

import pytest

from skillgraft.cli.main import main
from skillgraft.errors import FormatError
from skillgraft.eval.report import load_results, ranked_methods, render_html, render_markdown

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
VOID = {"meta", "img", "br", "hr", "link", "input"}


def _cell(em: float) -> dict:
    return {"em": em, "loglik": -1.5}


def full_results() -> dict:
    skills = ["reverse", "sort", "caesar"]

    def matrix(diag: float, off: float) -> dict:
        return {i: {j: _cell(diag if i == j else off) for j in skills} for i in skills}

    def merge(method: str, experts: str, n: int, mean: float, **params: float) -> dict:
        return {
            "method": method,
            "experts": experts,
            "n_skills": n,
            "params": params,
            "lambda": 1.0,
            "scores": {s: _cell(mean * 0.9) for s in skills[:n]},
            "normalized": {s: mean for s in skills[:n]},
            "mean_normalized": mean,
            "mean_em": mean * 0.9,
            "seconds": 1.25,
        }

    return {
        "kind": "skillgraft-study",
        "version": 1,
        "profile": "quick",
        "created": "2025-01-01T00:00:00Z",
        "machine": "2 CPU cores",
        "command": "skillgraft study --profile quick",
        "skills": skills,
        "base": {s: _cell(0.02) for s in skills},
        "experts": {"full": matrix(0.95, 0.05), "lora": matrix(0.9, 0.04)},
        "merge": [
            merge("task_arithmetic", "full", 3, 0.62),
            merge("ties", "full", 3, 0.81, density=0.2),
            merge("average", "full", 3, 0.45),
            merge("ties", "lora", 2, 0.7, density=0.2),
            merge("dare_ties", "full", 3, 0.74, density=0.1),
        ],
        "lambda_sweep": [
            {"method": m, "experts": "full", "n_skills": 3, "lambda": lam, "mean_normalized": v, "mean_em": v * 0.9}
            for m in ("task_arithmetic", "ties")
            for lam, v in ((0.3, 0.5), (0.6, 0.7), (1.0, 0.6))
        ],
        "compress": [
            {
                "skill": s,
                "budget": b,
                "bytes": int(600000 * (b or 1.0)),
                "dense_bytes": 600000,
                "em": 0.95 * r,
                "expert_em": 0.95,
                "retained": r,
                "energy_retained": min(1.0, r + 0.1),
            }
            for s in skills
            for b, r in ((0.005, 0.4), (0.02, 0.74), (0.1, 0.93), (None, 1.0))
        ],
        "transfer": [
            {"skill": s, "method": m, "em": em, "loglik": -2.0, "gap_closed": gap}
            for s in skills
            for m, em, gap in (
                ("large_base", 0.05, 0.0),
                ("large_ft", 0.97, 1.0),
                ("small_expert", 0.9, None),
                ("proxy", 0.6, 0.7),
                ("dlf", 0.5, 0.55),
            )
        ],
        "transfer_speed": {
            "large_tokens_per_s": 120.0,
            "fused_tokens_per_s": {"proxy": 90.0, "dlf": 60.0},
            "slowdown": {"proxy": 1.333, "dlf": 2.0},
        },
    }


class _Balance(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.imgs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs)["src"])
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}> with open {self.stack[-3:]}")
        else:
            self.stack.pop()


def _check_page(page: str, n_figures: int) -> None:
    parser = _Balance()
    parser.feed(page)
    parser.close()
    assert not parser.errors and not parser.stack, (parser.errors, parser.stack)
    assert page.startswith("<!DOCTYPE html>")
    assert page.count('<img src="data:image/png;base64,') == n_figures == len(parser.imgs)
    for src in parser.imgs:
        png = base64.b64decode(src.removeprefix("data:image/png;base64,"), validate=True)
        assert png.startswith(PNG_SIGNATURE) and len(png) > 1000
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"<(script|link)\b", page), "no external CSS or JS"


def _ranked_methods_in_markdown(md: str) -> list[str]:
    section = md.split("## Merge methods (ranked)", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if re.match(r"\| \d+ \|", line)]
    return [line.split("|")[2].strip() + " " + line.split("|")[4].strip() for line in rows]


def test_full_report_has_every_figure_and_table():
    results = full_results()
    # 2 heatmaps (full, lora) + merge bars + λ sweep + compression + transfer
    _check_page(render_html(results), 6)
    md = render_markdown(results)
    for title in ("Merge methods (ranked)", "Base and experts", "λ sweep", "Compression", "Transfer", "Transfer speed"):
        assert f"## {title}" in md
    assert _ranked_methods_in_markdown(md) == [
        "ties full",
        "dare_ties full",
        "ties lora",
        "task_arithmetic full",
        "average full",
    ]
    assert "| 1 | ties | density=0.2, λ=1 | full | 3 | 81.0% | 72.9% | 1.25 |" in md
    assert "| full / reverse | 95.0% | 5.0% | 5.0% |" in md
    assert "| reverse | dense | 585.9 KiB | 100.0% |" in md
    assert "| fused: dlf | 60.0 | 2.00× |" in md


def test_ranked_methods_sorted_best_first_missing_last():
    results = full_results()
    results["merge"].append({"method": "broken", "experts": "full", "n_skills": 3, "mean_normalized": None})
    ranked = ranked_methods(results)
    values = [r["mean_normalized"] for r in ranked]
    assert values[:-1] == sorted(values[:-1], reverse=True) and values[-1] is None
    assert [r["rank"] for r in ranked] == list(range(1, len(ranked) + 1))
    assert "rank" not in results["merge"][0], "the input is not modified"


def test_partial_report_renders_only_present_sections():
    full = full_results()
    results = {k: full[k] for k in ("kind", "version", "skills", "base", "compress")}
    results["experts"] = {"lora": full["experts"]["lora"]}
    _check_page(render_html(results), 2)  # one heatmap + compression curve
    md = render_markdown(results)
    assert "## Compression" in md and "## Base and experts" in md
    assert "## Merge" not in md and "## Transfer" not in md and "λ sweep" not in md

    bare = {"kind": "skillgraft-study", "version": 1}
    _check_page(render_html(bare), 0)
    assert "no sections" in render_markdown(bare)


def test_markdown_escapes_pipes_and_html_escapes_text():
    results = full_results()
    results["command"] = "skillgraft study <x> | tee log"
    results["merge"][0]["method"] = "a|b"
    md = render_markdown(results)
    assert "a\\|b" in md
    page = render_html({k: results[k] for k in ("kind", "command", "merge")})
    assert "&lt;x&gt;" in page and "<x>" not in page


@pytest.mark.parametrize(
    "content",
    ['{"kind": "something-else"}', "[1, 2]", "not json {", '{"kind": "skillgraft-study", "version": 99}'],
)
def test_not_a_study_is_a_one_line_error(tmp_path, capsys, content):
    path = tmp_path / "results.json"
    path.write_text(content)
    with pytest.raises(FormatError):
        load_results(path)
    assert main(["report", str(path), "-o", str(tmp_path / "r.html")]) == FormatError.exit_code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(path) in err.splitlines()[0]
    assert len([line for line in err.splitlines() if line.startswith("error")]) == 1
    assert not (tmp_path / "r.html").exists()


def test_bad_section_type_is_a_format_error(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"kind": "skillgraft-study", "merge": {"oops": 1}}))
    with pytest.raises(FormatError, match="merge"):
        load_results(path)


def test_cli_writes_html_and_markdown_and_refuses_overwrite(tmp_path, capsys):
    path = tmp_path / "study.json"
    path.write_text(json.dumps(full_results()))
    html_out, md_out = tmp_path / "report.html", tmp_path / "report.md"
    assert main(["-q", "report", str(path), "-o", str(html_out), "--markdown", str(md_out)]) == 0
    _check_page(html_out.read_text(encoding="utf-8"), 6)
    assert md_out.read_text(encoding="utf-8") == render_markdown(full_results())
    assert capsys.readouterr().out == ""

    before = html_out.read_text(encoding="utf-8")
    assert main(["report", str(path), "-o", str(html_out)]) == 8
    assert "already exists" in capsys.readouterr().err
    assert html_out.read_text(encoding="utf-8") == before
    assert main(["-q", "report", str(path), "-o", str(html_out), "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "report.md", "study.json"]

    assert main(["report", str(path)]) == 0
    assert capsys.readouterr().out.startswith("# skillgraft study report")
