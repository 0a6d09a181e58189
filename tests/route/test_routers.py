"""Routers: Arrow's scores equal a hand computation from ΔW's SVD; centroid and classifier route held-out prompts of
distinct skills; saved routers are reused when the skills are the same and rebuilt (or refused) when they change."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from conftest import build, llama_config, save

from skillgraft.bench.tokenizer import make_tokenizer
from skillgraft.errors import FormatError, InputError
from skillgraft.eval.generate import encode_prompt
from skillgraft.route.routers import (
    CENTRE,
    MAX_POOL,
    Router,
    arrow_centres,
    arrow_scores,
    build_router,
    features,
    load_router,
    read_router,
    save_router,
)
from skillgraft.route.runtime import SkillRuntime
from skillgraft.skill.peft import import_lora

TARGETS = {
    "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "b": dict(r=8, lora_alpha=8, target_modules=["k_proj", "o_proj", "up_proj"]),
    "c": dict(r=2, lora_alpha=4, target_modules=["q_proj", "up_proj"]),
}


def _prompts(tag: str, n: int, seed: int) -> list[str]:
    """SkillBench-like prompts: a task tag, then random letters (the same alphabet for every skill)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(3, 9, (1,), generator=g))
        out.append(tag + " " + "".join("abcdefgh"[int(i)] for i in torch.randint(0, 8, (k,), generator=g)) + ">")
    return out


# Three "skills" told apart by their prompts' tags alone.
LETTERS = {"a": "[rev]", "b": "[sort]", "c": "[rot]"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("routers")
    tok = make_tokenizer()
    base = build(llama_config(vocab_size=len(tok), initializer_range=0.3), seed=3)
    base_dir = save(base, root / "base")
    merged = {}
    for i, (name, kw) in enumerate(TARGETS.items()):
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
        g = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for pname, p in pm.named_parameters():
                if "lora_" in pname:
                    p.copy_(0.2 * torch.randn(p.shape, generator=g))
        pm.save_pretrained(root / f"{name}-adapter")
        merged[name] = pm.merge_and_unload().eval()
        import_lora(root / f"{name}-adapter", root / f"{name}.skill", name=name, base=base_dir)
    rt = SkillRuntime(base.eval(), tok)
    for name in TARGETS:
        rt.load(root / f"{name}.skill", key=f"{name}@1")
    return root, rt, base, merged


def _shas(rt, keys):
    return {k: rt.skills[k].sha256 for k in keys}


@pytest.mark.parametrize("centred", [False, True])
def test_arrow_scores_equal_a_hand_computation(setup, centred):
    _, rt, base, merged = setup
    prompts = ["abc>", "hijk lm>", "q>"]
    keys = ["a@1", "b@1", "c@1"]
    g = torch.Generator().manual_seed(7)
    sizes = {n: m.in_features for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    centres = {n: torch.randn(k, generator=g) for n, k in sizes.items()} if centred else None
    got = arrow_scores(rt, keys, prompts, batch_size=2, centres=centres)  # two batches, left-padded
    modules = dict(base.named_modules())
    base_w = {n: m.weight.detach() for n, m in modules.items() if isinstance(m, torch.nn.Linear)}
    for j, prompt in enumerate(prompts):
        ids = torch.tensor([encode_prompt(rt.tok, prompt)])
        inputs: dict[str, torch.Tensor] = {}
        handles = [
            m.register_forward_hook(lambda mod, args, out, n=n, seen=inputs: seen.__setitem__(n, args[0][0].detach()))
            for n, m in modules.items()
            if n in base_w
        ]
        with torch.no_grad():
            base(input_ids=ids)
        for h in handles:
            h.remove()
        for i, name in enumerate(TARGETS):
            tuned = dict(merged[name].named_modules())
            per_module = []
            for n in base_w:
                delta = tuned[n].weight.detach() - base_w[n]
                if delta.abs().max() == 0:
                    continue  # not a module of this LoRA
                v = torch.linalg.svd(delta.double())[2][0].float()  # top right-singular vector, input space
                x = inputs[n] - (centres[n] if centred else 0.0)
                per_module.append(((x @ v).abs() / x.norm(dim=-1)).mean())
            assert len(per_module) == 2 * len(TARGETS[name]["target_modules"])  # two layers
            want = torch.stack(per_module).mean()
            assert got[j, i].item() == pytest.approx(want.item(), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("method", ["centroid", "classifier"])
def test_label_routers_route_held_out_prompts(setup, method):
    _, rt, _, _ = setup
    train = {k: _prompts(v, 8, seed=i) for i, (k, v) in enumerate(LETTERS.items())}
    router = build_router(method, rt, _shas(rt, ["a@1", "b@1", "c@1"]), train)
    assert router.keys == ["a@1", "b@1", "c@1"]
    test = [(k, p) for i, (k, v) in enumerate(LETTERS.items()) for p in _prompts(v, 10, seed=100 + i)]
    chosen = router.choose(rt, [p for _, p in test])
    correct = sum(c == f"{k}@1" for (k, _), c in zip(test, chosen))
    assert correct >= 27, (correct, chosen)  # of 30
    assert router.route(rt, ["[rev] abc>"]) == [(("a@1", 1.0),)]


def test_label_router_needs_examples_for_every_skill(setup):
    _, rt, _, _ = setup
    with pytest.raises(InputError, match="example prompts for c"):
        build_router("centroid", rt, _shas(rt, ["a@1", "c@1"]), {"a": ["abc>"]})
    with pytest.raises(InputError, match="unknown router"):
        build_router("nearest", rt, _shas(rt, ["a@1"]), {"a": ["abc>"]})


def test_saved_router_is_reused_then_rebuilt_when_skills_change(setup, tmp_path):
    _, rt, _, _ = setup
    lib = tmp_path / "lib"
    train = {k: _prompts(v, 6, seed=i) for i, (k, v) in enumerate(LETTERS.items())}
    first = build_router("centroid", rt, _shas(rt, ["a@1", "b@1", "c@1"]), train)
    save_router(first, lib)
    assert sorted(p.name for p in (lib / "routers").iterdir()) == ["centroid.json", "centroid.safetensors"]
    again = load_router(lib, rt, "centroid", skills=_shas(rt, ["a@1", "b@1", "c@1"]))
    assert again.keys == first.keys and torch.equal(again.state["centroids"], first.state["centroids"])
    # a skill removed: rebuilt from the saved examples, and saved again
    fewer = load_router(lib, rt, "centroid", skills=_shas(rt, ["a@1", "b@1"]))
    assert fewer.keys == ["a@1", "b@1"] and fewer.state["centroids"].shape[0] == 2
    assert read_router(lib, "centroid").keys == ["a@1", "b@1"]
    # a skill added with no examples saved for it: a clear error, and the saved router is left as it was
    rt.load(rt.skills["c@1"].pack.path, key="d@1")
    try:
        with pytest.raises(InputError, match="example prompts for d"):
            load_router(lib, rt, "centroid", skills=_shas(rt, ["a@1", "b@1", "d@1"]))
    finally:
        rt.unload("d@1")
    assert read_router(lib, "centroid").keys == ["a@1", "b@1"]
    # a changed pack (same key, other content hash) also triggers a rebuild
    changed = {**_shas(rt, ["a@1", "b@1"]), "b@1": "0" * 64}
    assert load_router(lib, rt, "centroid", skills=changed).skills["b@1"] == "0" * 64
    # arrow needs no examples and routes among the LoRA skills loaded
    arrow = load_router(lib, rt, "arrow")
    assert arrow.keys == ["a@1", "b@1", "c@1"] and (lib / "routers" / "arrow.json").exists()


def test_damaged_router_file_is_a_format_error(setup, tmp_path):
    _, rt, _, _ = setup
    lib = tmp_path / "lib"
    save_router(build_router("arrow", rt, _shas(rt, ["a@1"])), lib)
    path = lib / "routers" / "arrow.json"
    meta = json.loads(path.read_text())
    path.write_text(json.dumps({**meta, "format": "other/9"}))
    with pytest.raises(FormatError, match="rebuild it"):
        read_router(lib, "arrow")
    path.write_text("{not json")
    with pytest.raises(FormatError):
        load_router(lib, rt, "arrow")


def test_arrow_centres_are_seeded_means_of_module_inputs_and_leave_the_rng_alone(setup):
    _, rt, base, _ = setup
    modules = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    c1 = arrow_centres(rt, modules)
    assert torch.equal(torch.random.get_rng_state(), before)
    c2 = arrow_centres(rt, modules)
    other = arrow_centres(rt, modules, seed=1)
    for m in modules:
        assert c1[m].shape == (dict(base.named_modules())[m].in_features,)
        assert torch.equal(c1[m], c2[m]) and not torch.equal(c1[m], other[m])
        assert torch.isfinite(c1[m]).all() and c1[m].abs().sum() > 0


def test_arrow_router_holds_centres_and_routes_with_them(setup):
    _, rt, _, _ = setup
    keys = ["a@1", "b@1", "c@1"]
    router = build_router("arrow", rt, _shas(rt, keys))
    centres = {k[len(CENTRE) :]: v for k, v in router.state.items() if k.startswith(CENTRE)}
    assert set(centres) == {n for k in keys for n in rt.skills[k].factors}  # every module any skill touches
    prompts = ["abc>", "hijk lm>"]
    assert torch.equal(router.scores(rt, prompts), arrow_scores(rt, keys, prompts, 16, centres))
    plain = Router("arrow", keys, router.skills, {})  # no centres: the published, uncentred scores
    assert torch.equal(plain.scores(rt, prompts), arrow_scores(rt, keys, prompts, 16))
    assert not torch.equal(plain.scores(rt, prompts), router.scores(rt, prompts))


def test_a_saved_arrow_router_without_centres_is_rebuilt(setup, tmp_path):
    _, rt, _, _ = setup
    keys = ["a@1", "b@1", "c@1"]
    save_router(Router("arrow", keys, _shas(rt, keys), {}), tmp_path)  # as saved before centring existed
    router = load_router(tmp_path, rt, "arrow")
    assert any(k.startswith(CENTRE) for k in router.state)
    assert any(k.startswith(CENTRE) for k in read_router(tmp_path, "arrow").state)  # and saved again


def test_features_pool_the_last_hidden_state_over_the_prompt_tokens_only(setup):
    _, rt, base, _ = setup
    prompts = ["[rev] abc>", "[sort] abcdefgh hg>"]  # different lengths: the short one is left-padded
    got = {pool: features(rt, prompts, pool=pool) for pool in ("max", "mean")}
    for i, p in enumerate(prompts):
        ids = torch.tensor([encode_prompt(rt.tok, p)])
        with torch.no_grad():
            h = base(input_ids=ids, output_hidden_states=True).hidden_states[-1][0].float()
        torch.testing.assert_close(got["max"][i], h.amax(0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got["mean"][i], h.mean(0), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="pool"):
        features(rt, prompts, pool="sum")


@pytest.mark.parametrize("method", ["centroid", "classifier"])
def test_a_saved_mean_feature_router_scores_as_built_and_is_rebuilt(setup, tmp_path, method):
    _, rt, _, _ = setup
    keys = ["a@1", "b@1", "c@1"]
    train = {k: _prompts(v, 6, seed=i) for i, (k, v) in enumerate(LETTERS.items())}
    new = build_router(method, rt, _shas(rt, keys), train)
    assert MAX_POOL in new.state
    old = Router(method, keys, new.skills, {k: v for k, v in new.state.items() if k != MAX_POOL}, new.examples)
    prompts = ["[rev] abc>", "[rot] hgf>"]
    f = torch.nn.functional.normalize(features(rt, prompts, pool="mean") - old.state["mean"], dim=-1)
    want = f @ old.state["centroids"].T if method == "centroid" else f @ old.state["weight"].T + old.state["bias"]
    torch.testing.assert_close(old.scores(rt, prompts), want)  # as it was built: mean features
    save_router(old, tmp_path)  # as saved before max pooling
    rebuilt = load_router(tmp_path, rt, method, skills=_shas(rt, keys))
    assert MAX_POOL in rebuilt.state and MAX_POOL in read_router(tmp_path, method).state
    torch.testing.assert_close(rebuilt.scores(rt, prompts), new.scores(rt, prompts))
