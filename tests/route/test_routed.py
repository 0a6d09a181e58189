"""Routed inference from the CLI: `eval|generate --library L --route M` give each prompt the answer of the skill
its router picked (checked against that skill's own runtime row), `route build|show` save and use routers, and
routed multi-expert logit transfer equals the chosen expert's single-expert transfer."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from conftest import build, finetune_like, llama_config, save

from skillgraft.bench.tokenizer import make_tokenizer, save_tokenizer
from skillgraft.cli.main import main
from skillgraft.eval.generate import GenerateParams
from skillgraft.eval.harness import load_model
from skillgraft.library import Library
from skillgraft.route.routers import build_router, read_router
from skillgraft.route.runtime import SkillRuntime
from skillgraft.skill.peft import import_lora
from skillgraft.transfer.fused import ExpertPair, FusedModel, GenerationSpec

TAGS = {"rev": "[rev]", "sort": "[sort]"}


def _prompts(tag: str, n: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [
        tag + " " + "".join("abcdefgh"[int(i)] for i in torch.randint(0, 8, (int(k),), generator=g)) + ">"
        for k in torch.randint(3, 8, (n,), generator=g)
    ]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    root = tmp_path_factory.mktemp("routed")
    tok = make_tokenizer()
    base = build(llama_config(vocab_size=len(tok), initializer_range=0.3), seed=3)
    base_dir = save(base, root / "base")
    save_tokenizer(tok, base_dir)
    library = Library(root / "lib")
    for i, (name, kw) in enumerate(
        [
            ("rev", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
            ("sort", dict(r=8, lora_alpha=8, target_modules=["k_proj", "o_proj", "up_proj"])),
        ]
    ):
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
        g = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for pname, p in pm.named_parameters():
                if "lora_" in pname:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
        pm.save_pretrained(root / f"{name}-adapter")
        import_lora(root / f"{name}-adapter", root / f"{name}.skill", name=name, base=base_dir)
        library.add(root / f"{name}.skill")
    library.close()
    for name, tag in TAGS.items():
        _jsonl(root / f"{name}-train.jsonl", [{"prompt": p} for p in _prompts(tag, 8, seed=len(name))])
    test = [p for i, tag in enumerate(TAGS.values()) for p in _prompts(tag, 6, seed=50 + i)]
    _jsonl(root / "mixed.jsonl", [{"prompt": p, "target": "ab"} for p in test])
    model, tok2 = load_model(base_dir)
    ref = SkillRuntime(model, tok2)
    for key in ("rev@1", "sort@1"):
        ref.load(key, key=key, library=root / "lib")
    return root, base_dir, ref, test


def test_route_build_then_eval_and_generate_use_the_saved_router(lib, capsys):
    root, base_dir, ref, test = lib
    examples = [f"--examples={n}={root / f'{n}-train.jsonl'}" for n in TAGS]
    args = ["route", "build", "--library", str(root / "lib"), "--base", str(base_dir), "--method", "centroid"]
    assert main([*args, *examples, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["skills"] == ["rev@1", "sort@1"] and summary["examples"] == {"rev": 8, "sort": 8}
    router = read_router(root / "lib", "centroid")
    chosen = router.choose(ref, test)
    assert chosen.count("rev@1") >= 5 and chosen.count("sort@1") >= 5  # the tags tell them apart
    # generate: each prompt's output is its chosen skill's own answer
    gen = ["generate", "--base", str(base_dir), "--library", str(root / "lib"), "--route", "centroid"]
    assert main([*gen, "--prompts", str(root / "mixed.jsonl"), "--max-new-tokens", "6", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)["results"]
    assert [r["skill"] for r in out] == chosen
    want = ref.generate(test, [((k, 1.0),) for k in chosen], GenerateParams(6))
    assert [r["output"] for r in out] == want
    # eval: the same choices, and the exact-match predictions are those answers
    ev = ["eval", str(base_dir), "--library", str(root / "lib"), "--route", "centroid"]
    assert main([*ev, "--tasks", str(root / "mixed.jsonl"), "--max-new-tokens", "6", "--json", "--samples"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["routing"]["chosen"] == {k: chosen.count(k) for k in set(chosen)}
    (task,) = res["tasks"].values()
    preds = [s["prediction"] for s in task["samples"]]
    assert preds == want
    # show: the same choice per prompt
    show = ["route", "show", "--library", str(root / "lib"), "--base", str(base_dir), "--method", "centroid"]
    assert main([*show, "--prompts", str(root / "mixed.jsonl"), "--json"]) == 0
    assert [r["skill"] for r in json.loads(capsys.readouterr().out)["results"]] == chosen


def test_arrow_token_and_arrow_route_without_labels(lib, capsys):
    root, base_dir, ref, test = lib
    gen = ["generate", "--base", str(base_dir), "--library", str(root / "lib"), "--prompts", str(root / "mixed.jsonl")]
    assert main([*gen, "--route", "arrow", "--max-new-tokens", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)["results"]
    assert {r["skill"] for r in out} <= {"rev@1", "sort@1"}
    assert (root / "lib" / "routers" / "arrow.json").exists()
    assert main([*gen, "--route", "arrow-token", "--max-new-tokens", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)["results"]
    assert {r["skill"] for r in out} == {"arrow"}
    assert [r["output"] for r in out] == ref.generate(test, [(("arrow", 1.0),)] * len(test), GenerateParams(4))


def test_routing_errors(lib, capsys, monkeypatch):
    root, base_dir, _, _ = lib
    monkeypatch.delenv("SKILLGRAFT_LIBRARY", raising=False)
    prompts = str(root / "mixed.jsonl")
    cases = [
        (["generate", "--base", str(base_dir), "--prompts", prompts], "--expert"),
        (["generate", "--base", str(base_dir), "--prompts", prompts, "--route", "arrow"], "--library"),
        (["eval", str(base_dir), "--tasks", prompts, "--library", str(root / "lib"), "--route", "nearest"], "nearest"),
        (["eval", str(base_dir), "--tasks", prompts, "--examples", "rev=x.jsonl"], "--route"),
        (
            ["route", "build", "--library", str(root / "lib"), "--base", str(base_dir), "--method", "classifier"],
            "example prompts for",
        ),
    ]
    fresh = root / "fresh-lib"  # classifier needs examples: use a library with no saved classifier router
    fresh.mkdir()
    with Library(fresh) as other, Library(root / "lib") as src:
        for r in src.list():
            other.add(src.path(r.ref), name=r.name)
    cases[-1][0][3] = str(fresh)
    for argv, needle in cases:
        code = main(argv)
        err = capsys.readouterr().err
        assert code != 0 and needle in err, (argv, err)
    assert not (fresh / "routers").exists()  # nothing half-written


def test_routed_transfer_equals_the_chosen_experts_own_transfer(tmp_path):
    tok = make_tokenizer()
    large = build(llama_config(vocab_size=len(tok), hidden_size=96, initializer_range=0.3), seed=7).eval()
    small = build(llama_config(vocab_size=len(tok), initializer_range=0.3), seed=3).eval()
    experts = {}
    for i, name in enumerate(TAGS):
        e = copy.deepcopy(small)
        finetune_like(e, seed=10 + i, scale=0.5)
        experts[name] = e.eval()
    pairs = [ExpertPair(experts[n], small, 1.0, n) for n in TAGS]
    rt = SkillRuntime(large, tok)
    examples = {n: _prompts(tag, 8, seed=i) for i, (n, tag) in enumerate(TAGS.items())}
    router = build_router("centroid", rt, dict.fromkeys(TAGS, ""), examples, name_of={n: n for n in TAGS})
    prompts = [p for i, tag in enumerate(TAGS.values()) for p in _prompts(tag, 4, seed=80 + i)]
    chosen = router.choose(rt, prompts)
    assert set(chosen) == set(TAGS)
    routed = FusedModel(large, tok, pairs, "proxy", router=router.gate(rt, list(TAGS)))
    spec = GenerationSpec(max_new_tokens=6)
    got = routed.generate(prompts, spec)
    for name in TAGS:
        mine = [p for p, c in zip(prompts, chosen) if c == name]
        alone = FusedModel(large, tok, [ExpertPair(experts[name], small, 1.0, name)], "proxy")
        assert [g for g, c in zip(got, chosen) if c == name] == alone.generate(mine, spec)
        for (t_r, n_r), (t_a, n_a) in zip(
            routed.loglik([(p, "abc") for p in mine]), alone.loglik([(p, "abc") for p in mine])
        ):
            assert n_r == n_a and t_r == pytest.approx(t_a, abs=1e-4)
    # all experts at once (no router) is a different model
    assert FusedModel(large, tok, pairs, "proxy").generate(prompts, spec) != got
