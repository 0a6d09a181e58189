"""SkillBench's real profiles: the natural-language skill generators, and the real SmolLM2-135M-Instruct end to
end — converted from its GGUF, a LoRA and a full fine-tune trained briefly, extracted, merged and evaluated."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil

import pytest

from skillgraft.bench import real_skills as rs
from skillgraft.bench.real import REAL, REAL_QUICK, RealProfile
from skillgraft.bench.skills import SPLITS
from skillgraft.bench.train import Stage


class _Tok:
    """A stand-in chat template for the generator tests (the real one is exercised end to end below)."""

    chat_template = "stand-in"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        return f"<user>{messages[0]['content']}</user><assistant>"


@pytest.mark.parametrize("name", list(rs.REAL_SKILLS))
def test_splits_disjoint_deterministic_and_distinct(name):
    rows = {split: rs.real_examples(name, split, 40, _Tok()) for split in SPLITS}
    users = {split: {r["user"] for r in rows[split]} for split in SPLITS}
    assert all(len(u) == 40 for u in users.values())
    assert not users["train"] & users["test"] and not users["train"] & users["val"] and not users["val"] & users["test"]
    assert rs.real_examples(name, "test", 40, _Tok()) == rows["test"]
    assert rs.real_examples(name, "test", 40, _Tok(), seed=1) != rows["test"]
    for r in rows["test"]:
        assert r["prompt"] == f"<user>{r['user']}</user><assistant>" and r["target"].strip() == r["target"] != ""


def test_answers_follow_the_rules():
    tok = _Tok()
    for r in rs.real_examples("compare", "test", 30, tok):
        a, b = (int(w.strip(",?")) for w in r["user"].split() if w.strip(",?").isdigit())
        assert int(r["target"]) == (max(a, b) if "larger" in r["user"] else min(a, b))
    for r in rs.real_examples("cipher", "test", 30, tok):
        letters = [w for w in r["user"].split() if len(w) == 1 and w.islower() and w not in ("a", "z")]
        assert len(r["target"].split()) >= 4 or letters
    for r in rs.real_examples("extract", "test", 30, tok):
        d = json.loads(r["target"])
        assert d["name"] in r["user"] and str(d["age"]) in r["user"] and d["city"] in r["user"]
    for r in rs.real_examples("sentiment", "test", 60, tok):
        review = r["user"].split('"')[1]
        good, bad = any(w in review for w in rs.GOOD), any(w in review for w in rs.BAD)
        assert r["target"] == ("mixed" if good and bad else "positive" if good else "negative")
    for r in rs.real_examples("list", "test", 30, tok):
        items = r["user"].split(": ", 1)[1].split("; ")
        assert r["target"].splitlines() == [f"{i + 1}. {x}" for i, x in enumerate(items)]
    assert rs.real_examples("units", "test", 1, tok)[0]["target"].isdigit()


def test_skills_are_at_least_six_with_distinct_formats():
    assert len(REAL.skills) >= 6 and len(REAL.full_skills) >= 3 and set(REAL.full_skills) <= set(REAL.skills)
    assert set(REAL_QUICK.skills) <= set(rs.REAL_SKILLS) and set(REAL.skills) <= set(rs.REAL_SKILLS)
    instructions = {n: rs.real_examples(n, "train", 1, _Tok())[0]["user"].split()[0] for n in REAL.skills}
    assert len(instructions) == len(REAL.skills)


def test_profiles_round_trip_through_the_manifest():
    for prof in (REAL, REAL_QUICK):
        assert RealProfile.from_json(json.loads(json.dumps(prof.as_json()))) == prof


def test_unknown_skill_suggests():
    from skillgraft.errors import InputError

    with pytest.raises(InputError, match="did you mean 'units'"):
        rs.real_skill("unit")


# A real build small enough for CI: two skills, a few optimizer steps, a handful of test rows.
MICRO = RealProfile(
    name="real-micro",
    skills=("units", "sentiment"),
    full_skills=("units",),
    lora=Stage(steps=6, lr=2e-3, batch=4),
    full=Stage(steps=2, lr=5e-5, batch=4),
    n_train=64,
    n_val=4,
    n_test=8,
    n_general=4,
)


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    from skillgraft.bench.build import build

    events: list[tuple[str, int, int]] = []
    m = build(MICRO, tmp_path_factory.mktemp("real"), lambda what, done, total: events.append((what, done, total)))
    return m, events


@pytest.mark.slow
def test_micro_build_layout_scores_and_reuse(micro):
    from skillgraft.bench.build import build

    m, events = micro
    assert set(m.models) == {"base", "experts/units-lora", "experts/sentiment-lora", "experts/units-full"}
    assert (m.model_dir("base") / "config.json").exists() and (m.root.parent / "_base").is_dir()
    assert (m.model_dir("experts/units-lora") / "adapter_config.json").exists()
    assert m.models["experts/units-full"]["trainable"] and m.models["experts/units-lora"]["steps"] == 6
    for key, acc in m.accuracy.items():
        assert all(0.0 <= v <= 1.0 for v in acc.values()), key
    assert set(m.raw["general"]) == set(m.models)
    base_general = m.raw["general"]["base"]
    assert base_general["gsm8k_token_loglik"] < 0 and base_general["facts_em"] > 0.5  # the real model knows facts
    assert ("training", 14, 14) in events
    rows = [json.loads(line) for line in m.data_path("units", "test").read_text().splitlines()]
    assert len(rows) == 8 and rows[0]["prompt"].startswith("<|im_start|>system")
    assert build(MICRO, m.root.parent).build_seconds == m.build_seconds  # reused, not rebuilt


@pytest.mark.slow
def test_changed_profile_retrains_only_the_changed_experts(micro, tmp_path):
    """Changing one skill's steps retrains that skill's expert; the others are hard-linked with their scores."""
    from skillgraft.bench.build import THREADS, build
    from skillgraft.bench.real import expert_recipe, library_versions

    m, _ = micro
    for name in ("_base", MICRO.name):  # a copy of the cache made of hard links
        shutil.copytree(m.root.parent / name, tmp_path / name, copy_function=os.link)
    changed = dataclasses.replace(MICRO, step_scale=(("sentiment", 2.0),))
    v = library_versions()
    for key, same in (("experts/units-lora", True), ("experts/units-full", True), ("experts/sentiment-lora", False)):
        before, after = (expert_recipe(p, key, m.root, v, THREADS) for p in (MICRO, changed))
        assert (before == after) is same, key
    m2 = build(changed, tmp_path)
    assert m2.raw["reused"] == ["experts/units-lora", "experts/units-full"]
    assert m2.models["experts/sentiment-lora"]["steps"] == 12 and m.models["experts/sentiment-lora"]["steps"] == 6
    for key in m2.raw["reused"]:
        assert m2.accuracy[key] == m.accuracy[key] and m2.raw["general"][key] == m.raw["general"][key]
        for f in m.model_dir(key).iterdir():
            assert (m2.model_dir(key) / f.name).samefile(f), f  # the same file, not a retrained copy
    assert not (m2.model_dir("experts/sentiment-lora") / "adapter_model.safetensors").samefile(
        m.model_dir("experts/sentiment-lora") / "adapter_model.safetensors"
    )


@pytest.mark.slow
def test_micro_extract_merge_eval_through_the_cli(micro, tmp_path):
    """The user's path on the real model: extract and import packs, merge them, evaluate the merge."""
    from skillgraft.cli.main import main

    m, _ = micro
    base = str(m.model_dir("base"))
    assert main(["-q", "extract", base, str(m.model_dir("experts/units-full")), "-o", str(tmp_path / "u.skill"),
                 "--budget", "2%"]) == 0  # fmt: skip
    assert main(["-q", "import-lora", str(m.model_dir("experts/sentiment-lora")), "-o", str(tmp_path / "s.skill"),
                 "--base", base]) == 0  # fmt: skip
    cfg = {
        "base": base,
        "method": "ties",
        "parameters": {"density": 0.5},
        "inputs": [str(tmp_path / "u.skill"), str(tmp_path / "s.skill")],
    }
    (tmp_path / "m.yaml").write_text(json.dumps(cfg))
    assert (
        main(["-q", "merge", str(tmp_path / "m.yaml"), "-o", str(tmp_path / "merged.skill"), "--out-format", "skill"])
        == 0
    )
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["-q", "eval", base, "--skill", str(tmp_path / "merged.skill"), "--tasks",
                   str(m.data_path("units", "test")), "--json"])  # fmt: skip
    assert rc == 0
    res = json.loads(buf.getvalue())
    task = res["tasks"]["test"]
    assert task["n"] == 8 and 0.0 <= task["exact_match"] <= 1.0 and task["mean_loglik"] < 0


def test_lora_training_is_deterministic(tmp_path):
    """Same seed, same data → bit-identical LoRA weights (what makes a cached build reproducible)."""
    import torch
    from conftest import llama_config
    from transformers import LlamaForCausalLM

    from skillgraft.bench.build import _deterministic_torch
    from skillgraft.bench.tokenizer import make_tokenizer
    from skillgraft.bench.train import train, with_lora

    tok = make_tokenizer()
    rows = [{"prompt": "[rev] abc>", "target": "cba"}, {"prompt": "[rev] dca>", "target": "acd"}] * 8
    weights = []
    for _ in range(2):
        with _deterministic_torch():
            torch.manual_seed(0)
            model = LlamaForCausalLM(llama_config(vocab_size=len(tok)))
            model = with_lora(model, 4, seed=1)
            train(model, tok, rows, Stage(steps=3, lr=1e-2, batch=4), seed=2)
        weights.append({k: v.clone() for k, v in model.state_dict().items() if "lora" in k})
    assert weights[0].keys() == weights[1].keys() and weights[0]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.slow
def test_micro_studies_report_general_ability(micro, tmp_path):
    """Merge, compress and negation studies on a real build: general ability beside every score, LoRA packs exact."""
    from skillgraft.eval.report import render_html, render_markdown
    from skillgraft.study.compress import CompressStudySpec, run_compress_study
    from skillgraft.study.merge import MergeStudySpec, run_merge_study
    from skillgraft.study.negate import NegateStudySpec, run_negation_study

    m, _ = micro
    cache = m.root.parent
    merge = run_merge_study(
        MergeStudySpec(
            profile=MICRO, cache=cache, methods=("ties",), sweep_methods=("task_arithmetic",), lambdas=(0.5,)
        )
    )
    assert [r["experts"] for r in merge["merge"]] == ["lora"]  # one full expert: nothing to merge
    assert set(merge["experts"]["full"]) == {"units"} and set(merge["experts"]["lora"]) == {"units", "sentiment"}
    now, then = merge["general"]["base"], m.raw["general"]["base"]  # the same check as at build time
    assert now["facts_em"] == then["facts_em"] and now["n_gsm8k"] == then["n_gsm8k"] == 4
    assert now["gsm8k_token_loglik"] == pytest.approx(then["gsm8k_token_loglik"], abs=1e-4)
    for row in (*merge["merge"], *merge["lambda_sweep"]):
        assert row["general"]["gsm8k_token_loglik"] < 0
    compress = run_compress_study(CompressStudySpec(profile=MICRO, cache=cache, budgets=(0.02,)))
    lora = [r for r in compress["compress"] if r["budget"] == "lora"]
    assert {r["skill"] for r in lora} == {"units", "sentiment"}
    for r in lora:  # an exact import scores what the adapter scores on the same rows (and at build time)
        assert r["em"] == pytest.approx(r["expert_em"], abs=1 / 8 + 1e-9)
        assert r["expert_em"] == m.accuracy[f"experts/{r['skill']}-lora"][r["skill"]]
    assert {r["budget"] for r in compress["compress"] if r["budget"] != "lora"} == {0.02, None}
    negate = run_negation_study(NegateStudySpec(profile=MICRO, cache=cache))
    rows = negate["negation"]
    assert rows[0]["removed"] is None and sorted(r["removed"] for r in rows[1:]) == ["sentiment", "units"]
    assert all(r["general"] for r in rows)
    assert all("min_others_kept" in r for r in rows[1:])
    for res in (merge, compress, negate):
        md = render_markdown(res)
        assert "GSM8K loglik/token" in md
        assert render_html(res).startswith("<!DOCTYPE html>")
    assert "Negation" in render_markdown(negate)


@pytest.mark.slow
def test_demo_on_a_real_profile(micro, tmp_path):
    """The README's main job on the real model: LoRA packs in a library, the main methods, general ability shown."""
    from skillgraft.demo import REAL_METHODS, run_demo

    m, _ = micro
    lines: list[str] = []
    run_demo(tmp_path / "out", profile=MICRO, cache=m.root.parent, say=lines.append, compose_steps=2)
    text = "\n".join(lines)
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {r["method"] for r in res["merge"]} == set(REAL_METHODS) and {r["experts"] for r in res["merge"]} == {
        "lora-pack"
    }
    assert all(r["general"]["facts_em"] >= 0 for r in res["merge"])
    assert set(res["experts"]["lora-pack"]["units"]) == {"units"}  # own skill only: no interference matrix here
    assert "general ability of the base" in text and "GSM8K" in text
    assert res["compose"][0]["general"]["facts_em"] >= 0 and "learned (blockwise)" in text
    assert (tmp_path / "out" / "report.html").read_text().startswith("<!DOCTYPE html>")
