"""SkillBench: skills and splits (fast), and the quick profile built for real (slow): determinism, reuse,
accuracy margins, an honest manifest, the tokenizer, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from skillgraft.bench import skills as sk
from skillgraft.errors import InputError

# -- skills (no training) ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,x,y",
    [
        ("reverse", "abc", "cba"),
        ("sort", "hbfa", "abfh"),
        ("caesar", "abh", "dec"),  # a+3=d, b+3=e, h+3 wraps to c in 'abcdefgh'
        ("swapcase", "aB", "Ab"),
        ("dedup", "abca", "abc"),
        ("count", "abaa", "3"),
        ("rotate", "abcd", "bcda"),
        ("interleave", "abc,def", "adbecf"),
    ],
)
def test_skill_functions(name, x, y):
    assert sk.SKILLS[name].fn(x) == y


def test_at_least_eight_skills_with_distinct_tags():
    tags = [s.tag for s in sk.SKILLS.values()] + [s.tag for s in sk.GENERIC.values()]
    assert len(sk.SKILLS) >= 8 and len(set(tags)) == len(tags)
    assert not set(sk.SKILLS) & set(sk.GENERIC)


@pytest.mark.parametrize("name", list(sk.SKILLS))
def test_splits_disjoint_deterministic_and_nontrivial(name):
    rows = {split: sk.examples(name, split, 100, seed=0) for split in sk.SPLITS}
    inputs = {split: {r["prompt"] for r in rs} for split, rs in rows.items()}
    assert all(len(v) == 100 for v in inputs.values())
    assert not inputs["train"] & inputs["val"] and not inputs["train"] & inputs["test"]
    assert not inputs["val"] & inputs["test"]
    assert sk.examples(name, "test", 100, seed=0) == rows["test"]
    assert sk.examples(name, "test", 100, seed=1) != rows["test"]
    for r in rows["test"]:
        x = r["prompt"].split(" ", 1)[1][:-1]
        assert r["target"] != x and r["target"] == sk.SKILLS[name].fn(x)


def test_compositions_only_score_when_both_skills_are_done():
    for r in sk.composition_examples("reverse", "sort", 50):
        x = r["prompt"].split(" ", 1)[1][:-1]
        assert r["prompt"].startswith("[rev][sort] ")
        assert r["target"] == "".join(sorted(x))[::-1]
        assert r["target"] not in (x, x[::-1], "".join(sorted(x)))
        assert sk.split_of("sort", x) == "test"


def test_unknown_skill_suggests():
    with pytest.raises(InputError, match="no skill named") as e:
        sk.examples("revers", "test", 3)
    assert "reverse" in (e.value.hint or "")
    with pytest.raises(InputError, match="no split"):
        sk.examples("reverse", "dev", 3)


def test_tokenizer_roundtrip(tmp_path):
    from transformers import AutoTokenizer

    from skillgraft.bench.tokenizer import make_tokenizer

    make_tokenizer().save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    prompt = "[mix] abC,dE9>"
    ids = tok(prompt).input_ids
    assert tok.convert_ids_to_tokens(ids)[:2] == ["[mix]", " "]
    assert len(ids) == len(prompt) - len("[mix]") + 1
    assert tok.decode(ids) == prompt
    assert tok.decode([*ids, tok.eos_token_id, tok.pad_token_id], skip_special_tokens=True) == prompt


# -- the quick profile, built for real ------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick(quick_bench):
    """The session's one quick build (tests/conftest.py), shared with the study and demo tests."""
    return quick_bench


def _files(root: Path, pattern: str) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob(pattern))}


def _micro():
    """A private profile with every kind of job but tiny models and stages, so building it twice is cheap."""
    from skillgraft.bench import ModelSize, Profile, Stage

    return Profile(
        name="micro",
        skills=("reverse", "count"),
        compositions=(("caesar", "reverse"),),
        base=ModelSize(hidden=32, layers=1, intermediate=64, heads=2),
        large=ModelSize(hidden=64, layers=1, intermediate=128, heads=2),
        pretrain=Stage(steps=12, lr=3e-3, batch=16),
        pretrain_large=Stage(steps=8, lr=2e-3, batch=16),
        full=Stage(steps=8, lr=5e-3, batch=16),
        lora=Stage(steps=8, lr=1e-2, batch=16),
        full_large=Stage(steps=6, lr=3e-3, batch=16),
        step_scale=(("count", 0.5),),
        lr_scale=(("reverse", 0.5),),
        n_train=200,
        n_val=20,
        n_test=20,
        n_mix=100,
    )


@pytest.mark.slow
def test_rebuild_gives_identical_data_and_weights(tmp_path):
    from skillgraft.bench import build

    one = build(_micro(), tmp_path / "a")
    again = build(_micro(), tmp_path / "b")
    assert one.models["experts/count-full"]["steps"] == 4 and one.models["experts/reverse-lora"]["lr"] == 5e-3
    for pattern in ("*.jsonl", "*.safetensors", "tokenizer*.json", "config.json"):
        a, b = _files(one.root, pattern), _files(again.root, pattern)
        assert a and a.keys() == b.keys()
        assert [k for k in a if a[k] != b[k]] == [], pattern
    assert again.accuracy == one.accuracy


@pytest.mark.slow
def test_layout_and_reuse(quick):
    from skillgraft.bench import build

    root = quick.root
    assert root.name == "quick" and not list(root.parent.glob(".quick.*"))
    for s in quick.skills:
        for split in sk.SPLITS:
            assert (root / "data" / s / f"{split}.jsonl").exists()
        assert (root / "models" / "experts" / f"{s}-lora" / "adapter_model.safetensors").exists()
    for key in quick.models:
        d = quick.model_dir(key)
        weights = "adapter_model.safetensors" if key.endswith("-lora") else "model.safetensors"
        assert (d / weights).exists() and (d / "tokenizer.json").exists(), key
    assert len(list((root / "data" / "compositions").glob("*.jsonl"))) == len(quick.compositions) >= 1
    assert quick.models["base-large"]["params"] >= 3 * quick.models["base"]["params"]
    assert build("quick", root.parent).build_seconds == quick.build_seconds  # reused, not rebuilt


@pytest.mark.slow
def test_experts_beat_the_base_by_a_wide_margin(quick):
    acc = quick.accuracy
    for s in quick.skills:
        assert acc["base"][s] <= 0.10, (s, acc["base"][s])
        assert acc["base-large"][s] <= 0.10, (s, acc["base-large"][s])
        assert acc[f"experts/{s}-full"][s] >= 0.70, (s, acc)
        assert acc[f"experts/{s}-full"][s] >= acc["base"][s] + 0.60
        assert acc[f"experts/{s}-lora"][s] >= 0.50, (s, acc)
        assert acc[f"experts-large/{s}-full"][s] >= 0.50, (s, acc)


@pytest.mark.slow
def test_manifest_accuracy_is_honest(quick):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from skillgraft.bench import exact_match

    s = quick.skills[0]
    rows = [json.loads(line) for line in quick.data_path(s, "test").read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(quick.model_dir(f"experts/{s}-full"))
    torch.set_num_threads(2)
    full = AutoModelForCausalLM.from_pretrained(quick.model_dir(f"experts/{s}-full"))
    assert exact_match(full, tok, rows) == pytest.approx(quick.accuracy[f"experts/{s}-full"][s], abs=1e-4)
    base = AutoModelForCausalLM.from_pretrained(quick.model_dir("base"))
    lora = PeftModel.from_pretrained(base, quick.model_dir(f"experts/{s}-lora"))
    assert exact_match(lora, tok, rows) == pytest.approx(quick.accuracy[f"experts/{s}-lora"][s], abs=1e-4)


@pytest.mark.slow
def test_one_tokenizer_everywhere(quick):
    from transformers import AutoTokenizer

    from skillgraft.skill.fingerprint import fingerprint_tokenizer

    prints = {fingerprint_tokenizer(quick.model_dir(k)) for k in quick.models}
    assert prints == {fingerprint_tokenizer(quick.tokenizer_dir)} and None not in prints
    tok = AutoTokenizer.from_pretrained(quick.model_dir("base-large"))
    row = json.loads(quick.data_path(quick.skills[0], "val").read_text().splitlines()[0])
    assert tok.decode(tok(row["prompt"] + row["target"]).input_ids) == row["prompt"] + row["target"]


@pytest.mark.slow
def test_cli_build_reuses_and_show_prints(quick, capsys):
    from skillgraft.cli.main import main

    cache = str(quick.root.parent)
    assert main(["-q", "bench", "build", "--profile", "quick", "--cache", cache, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["build_seconds"] == quick.build_seconds and out["accuracy"] == quick.accuracy
    assert main(["bench", "show", "--profile", "quick", "--cache", cache]) == 0
    assert "caesar" in capsys.readouterr().out


def test_cli_errors(tmp_path, capsys):
    from skillgraft.cli.main import main

    assert main(["bench", "show", "--profile", "quick", "--cache", str(tmp_path)]) == 3
    assert "no SkillBench build" in capsys.readouterr().err
    assert main(["bench", "build", "--profile", "huge", "--cache", str(tmp_path)]) == 2
    assert "hint:" in capsys.readouterr().err
    assert main(["bench", "build", "--help"]) == 0
    assert "Example:" in capsys.readouterr().out
