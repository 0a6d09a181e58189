"""Studies and the demo on the quick SkillBench build: the numbers are consistent with their definitions."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_merge_study_normalizes_by_the_experts(quick_bench, tmp_path):
    from skillgraft.eval.report import render_html
    from skillgraft.study.merge import MergeStudySpec, run_merge_study

    spec = MergeStudySpec(
        cache=quick_bench.root.parent, methods=("task_arithmetic", "ties"), experts=("full",), lambdas=(0.5,), limit=40
    )
    res = run_merge_study(spec)
    skills = res["skills"]
    own = {s: res["experts"]["full"][s][s]["em"] for s in skills}
    assert all(own[s] >= res["base"][s]["em"] + 0.5 for s in skills)  # experts far above the base
    assert {r["method"] for r in res["merge"]} == {"task_arithmetic", "ties"}
    for row in res["merge"]:
        for s in skills:
            assert row["normalized"][s] == pytest.approx(row["scores"][s]["em"] / own[s])
        assert row["mean_normalized"] == pytest.approx(sum(row["normalized"].values()) / len(skills))
    assert len(res["lambda_sweep"]) == 2
    html = render_html(res)
    assert html.count("data:image/png;base64,") >= 3


def test_merge_study_rows_on_ray_workers_equal_one_process(quick_bench, monkeypatch):
    """`study merge --workers N`: the rows merged in memory and scored on 2 local Ray workers equal the same rows
    scored in this process (workers=1), and agree with the default path (packs applied to one model)."""
    from skillgraft.study.merge import MergeStudySpec, run_merge_study

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    kw = dict(cache=quick_bench.root.parent, methods=("task_arithmetic", "ties"), experts=("full",), lambdas=(0.5,))
    kw.update(limit=20, interference=False)
    one = run_merge_study(MergeStudySpec(**kw, workers=1))
    two = run_merge_study(MergeStudySpec(**kw, workers=2))
    plain = run_merge_study(MergeStudySpec(**kw))
    for a, b, c in zip(
        one["merge"] + one["lambda_sweep"], two["merge"] + two["lambda_sweep"], plain["merge"] + plain["lambda_sweep"]
    ):
        assert a["method"] == b["method"] == c["method"]
        assert a["mean_normalized"] == b["mean_normalized"]
        assert abs(a["mean_normalized"] - c["mean_normalized"]) <= 0.05
    assert len(one["merge"]) == 2 and len(one["lambda_sweep"]) == 2


def test_compress_study_dense_keeps_everything(quick_bench):
    from skillgraft.study.compress import CompressStudySpec, run_compress_study

    skill = quick_bench.skills[0]
    res = run_compress_study(
        CompressStudySpec(cache=quick_bench.root.parent, skills=(skill,), budgets=(0.05,), limit=40)
    )
    rows = {r["budget"]: r for r in res["compress"]}
    assert rows[None]["retained"] == 1.0 and rows[None]["energy_retained"] == pytest.approx(1.0)
    assert rows[0.05]["bytes"] <= 0.05 * rows[0.05]["dense_bytes"]
    assert 0 <= rows[0.05]["energy_retained"] < 1


def test_transfer_study_gap_definitions_and_lift(quick_bench):
    from skillgraft.study.transfer import TransferStudySpec, run_transfer_study

    res = run_transfer_study(TransferStudySpec(cache=quick_bench.root.parent, limit=40, multi=False))
    rows = res["transfer"]
    for r in rows:
        if r["method"] == "large_base":
            assert r["gap_closed"] in (0.0, None)
        if r["method"] == "large_ft":
            assert r["gap_closed"] in (1.0, None)
    proxy = [r for r in rows if r["method"] == "proxy"]
    base = {r["skill"]: r["em"] for r in rows if r["method"] == "large_base"}
    # a small expert lifts the large base on most skills
    assert sum(r["em"] > base[r["skill"]] + 0.2 for r in proxy) >= len(proxy) - 1
    assert res["transfer_speed"]["large_tokens_per_s"] > 0


def test_route_study_routes_mixed_prompts_and_transfer(quick_bench):
    """Routing accuracy is what the confusion counts say; the oracle row is each expert alone (100% normalized);
    the classifier routes most mixed prompts right, and routing beats the merges and all-experts transfer."""
    from skillgraft.eval.report import render_html
    from skillgraft.study.route import RouteStudySpec, run_route_study

    spec = RouteStudySpec(
        cache=quick_bench.root.parent,
        limit=20,
        routers=("arrow", "classifier"),
        arrow_token=False,
        alpha_grid=(1.0, 2.0),
    )
    res = run_route_study(spec)
    route, skills = res["route"], res["skills"]
    assert [r["router"] for r in route["routing"]] == ["arrow", "classifier", "arrow-uncentred"]
    assert route["settings"]["mixed_prompts"] == 20 * len(skills)
    for r in route["routing"]:
        right = sum(r["confusion"][s][s] for s in skills)
        assert r["accuracy"] == pytest.approx(right / (20 * len(skills)))
        assert all(sum(r["confusion"][s].values()) == 20 for s in skills)
    rows = {r["method"]: r for r in route["end_to_end"]}
    assert rows["experts (oracle routing)"]["mean_normalized"] == pytest.approx(1.0)
    classifier = next(r for r in route["routing"] if r["router"] == "classifier")
    assert classifier["accuracy"] >= 0.8  # 96.7% measured (limit 30)
    routed = rows["routed:classifier"]["mean_normalized"]
    assert routed >= 0.7 and routed > rows["merge:task_arithmetic (λ 1)"]["mean_normalized"] + 0.3
    gap = {r["method"]: r["gap_closed"] for r in res["transfer"]}
    assert gap["proxy+route:oracle"] > gap["proxy"] + 0.3 and gap["proxy+route:classifier"] > gap["proxy"]
    for a in res["transfer_alpha"].values():  # each expert's α: the best on its val rows, ties to the smaller
        em = {float(k): v for k, v in a["val_em"].items()}
        assert set(em) == {1.0, 2.0} and em[a["chosen"]] == max(em.values())
        assert a["chosen"] == 1.0 or em[2.0] > em[1.0]
    assert {"proxy(α val)+route:oracle", "proxy(α val)+route:classifier"} <= set(gap)
    assert "Routing" in render_html(res)


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan"), float("inf")])
def test_route_study_refuses_a_non_positive_alpha_before_any_work(tmp_path, alpha):
    from skillgraft.errors import InputError
    from skillgraft.study.route import RouteStudySpec, run_route_study

    with pytest.raises(InputError, match="not a positive number"):
        run_route_study(RouteStudySpec(cache=tmp_path / "cache", alpha_grid=(1.0, alpha)))
    assert not (tmp_path / "cache").exists()  # nothing was built


def test_demo_end_to_end(quick_bench, tmp_path):
    from skillgraft.demo import run_demo

    lines: list[str] = []
    ok = run_demo(tmp_path / "out", profile="quick", cache=quick_bench.root.parent, say=lines.append, compose_steps=4)
    assert ok, "\n".join(lines)
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {r["experts"] for r in res["merge"]} == {"full-pack", "lora-pack"}
    (learned,) = res["compose"]
    assert learned["learn"] == "blockwise" and len(learned["curve"]) == 4 and learned["examples_used"] == 48
    assert 0 <= learned["mean_normalized"] and "learned (blockwise)" in "\n".join(lines)
    html = (tmp_path / "out" / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and "Learned composition" in html


@pytest.mark.slow
def test_demo_fails_when_a_pack_does_not_lift_its_skill(quick_bench, tmp_path):
    """Packs extracted at a millionth of the dense delta keep none of the full fine-tunes' skill: the demo
    must say FAILED and return False (the CLI exits 1), not print a table and pass."""
    from skillgraft.demo import run_demo

    lines: list[str] = []
    ok = run_demo(tmp_path / "out", profile="quick", budget=1e-6, cache=quick_bench.root.parent, say=lines.append)
    text = "\n".join(lines)
    assert not ok and "FAILED: a pack did not lift its skill" in text, text
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    full = res["experts"]["full-pack"]
    assert any(full[s][s]["em"] < res["base"][s]["em"] + 0.3 for s in full)
