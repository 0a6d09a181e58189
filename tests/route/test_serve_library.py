"""The library server: every way of naming skills answers what SkillRuntime.generate answers, streamed or not,
under concurrent load, with skills added while it runs; bad requests get OpenAI-style JSON errors."""

from __future__ import annotations

import asyncio
import copy
import json
import threading
import time
from pathlib import Path

import peft
import pytest
import torch
from conftest import build, finetune_like, llama_config, save

from skillgraft.bench.tokenizer import make_tokenizer, save_tokenizer
from skillgraft.eval.generate import GenerateParams, encode_prompt, generate
from skillgraft.eval.harness import load_model
from skillgraft.library import Library
from skillgraft.route.decode import Row, Sampling, decode
from skillgraft.route.routers import read_router
from skillgraft.route.runtime import ARROW_MIX, SkillRuntime
from skillgraft.route.serve import ApiError, Job, ServeSpec, SkillServer, make_app, make_uvicorn, resolve_model
from skillgraft.skill.extract import ExtractSpec, extract
from skillgraft.skill.peft import import_lora

PROMPTS = ["abc>", "ba hd>", "hgfedcb>", "a>", "dd>", "cab>", "zz top>", "q>"]
TEMPLATE = (  # the char tokenizer's letters only: "s be brief>u dcba>a "
    "{% for m in messages %}{{ m['role'][0] }} {{ m['content'] }}>{% endfor %}"
    "{% if add_generation_prompt %}a {% endif %}"
)
N = 8  # max_tokens everywhere


def _adapter(model, out, seed, **kw):
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(out)


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    tok = make_tokenizer()
    tok.chat_template = TEMPLATE
    base = build(llama_config(vocab_size=len(tok), initializer_range=0.3), seed=3)
    base_dir = save(base, root / "base")
    save_tokenizer(tok, base_dir)
    library = Library(root / "lib")
    specs = [
        ("cipher", 1, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
        ("units", 2, dict(r=8, lora_alpha=8, target_modules=["k_proj", "o_proj", "up_proj"])),
        ("late", 4, dict(r=4, lora_alpha=4, target_modules=["q_proj", "up_proj"])),
    ]
    for name, seed, kw in specs:
        _adapter(base, root / f"{name}-adapter", seed, **kw)
        import_lora(root / f"{name}-adapter", root / f"{name}.skill", name=name, base=base_dir)
        if name != "late":
            library.add(root / f"{name}.skill")
    tuned = copy.deepcopy(base)
    finetune_like(tuned, seed=5, scale=0.3)
    extract(ExtractSpec(base=base_dir, tuned=save(tuned, root / "tuned"), out=root / "dense.skill", dense=True))
    library.add(root / "dense.skill", name="dense")
    library.close()
    model, tok2 = load_model(base_dir)
    ref = SkillRuntime(model, tok2)
    for key in ("cipher@1", "units@1", "dense@1"):
        ref.load(key, key=key, library=root / "lib")
    return root, base_dir, ref


@pytest.fixture(scope="module")
def client(lib):
    from starlette.testclient import TestClient

    root, base_dir, _ = lib
    server = SkillServer.open(base_dir, root / "lib", ServeSpec(batch_wait_ms=5))
    with TestClient(make_app(server)) as c:
        yield c, server


def _want(ref, prompts, mix):
    """What SkillRuntime.generate answers on the reference runtime (it holds the skills the server does)."""
    return ref.generate(prompts, [mix] * len(prompts), GenerateParams(N))


def _post(c, body, path="/v1/completions"):
    r = c.post(path, json=body)
    return r.status_code, r.json()


def _events(lines):
    data = [ln[len("data: ") :] for ln in lines if ln.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


# -- decoding ---------------------------------------------------------------------------------------------
def test_decode_matches_generate_and_streams_its_text(lib):
    _, _, ref = lib
    model, tok = ref.model, ref.tok
    for stop in [(), ("3",), ("b", "ff")]:
        params = GenerateParams(10, stop=stop)
        deltas: dict[int, list[str]] = {i: [] for i in range(len(PROMPTS))}
        rows = [
            Row(encode_prompt(tok, p), Sampling(max_tokens=10, stop=stop), deltas[i].append)
            for i, p in enumerate(PROMPTS)
        ]
        got = decode(model, tok, rows)
        assert [g.text for g in got] == generate(model, tok, PROMPTS, params)
        assert all("".join(deltas[i]) == g.text for i, g in enumerate(got))
        assert {g.finish_reason for g in got} <= {"stop", "length"}
    sampled = [decode(model, tok, [Row(encode_prompt(tok, "ab>"), Sampling(12, 1.0, seed=s))])[0] for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]  # a seed fixes the sample


# -- completions ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "model, mix",
    [
        ("base", ()),
        ("cipher", (("cipher@1", 1.0),)),
        ("base+units@1", (("units@1", 1.0),)),
        ("cipher:0.5+units:-1", (("cipher@1", 0.5), ("units@1", -1.0))),
        ("dense", (("dense@1", 1.0),)),
        ("dense:0.5+cipher", (("cipher@1", 1.0), ("dense@1", 0.5))),
        ("arrow-token", ARROW_MIX),
    ],
)
def test_completions_equal_runtime_generate(lib, client, model, mix):
    _, _, ref = lib
    c, _ = client
    status, body = _post(c, {"model": model, "prompt": PROMPTS[:5], "max_tokens": N})
    assert status == 200, body
    assert body["object"] == "text_completion" and body["model"] == model
    assert [ch["text"] for ch in body["choices"]] == _want(ref, PROMPTS[:5], mix)
    info = body["choices"][0]["skillgraft"]
    if mix != ARROW_MIX:
        assert info["skills"] == [k for k, _ in mix] and info["routed"] is False
    assert body["usage"]["prompt_tokens"] == sum(len(encode_prompt(ref.tok, p)) for p in PROMPTS[:5])


def test_auto_routes_each_prompt(lib, client):
    _, _, ref = lib
    c, _ = client
    status, body = _post(c, {"model": "auto", "prompt": PROMPTS[:4], "max_tokens": N})
    assert status == 200, body
    # the router the server saved beside the library, applied to the reference runtime
    router = read_router(lib[0] / "lib", "arrow")
    assert router is not None and router.keys == ["cipher@1", "units@1"]
    for p, ch, key in zip(PROMPTS[:4], body["choices"], router.choose(ref, PROMPTS[:4])):
        assert ch["skillgraft"] == {"skills": [key], "weights": [1.0], "routed": True, "router": "arrow"}
        assert ch["text"] == _want(ref, [p], ((key, 1.0),))[0]


def test_streaming_chunks_concatenate_to_the_whole_answer(lib, client):
    c, _ = client
    for path, body in [
        ("/v1/completions", {"model": "cipher", "prompt": PROMPTS[:3], "stop": ["3"]}),
        ("/v1/chat/completions", {"model": "dense", "messages": [{"role": "user", "content": "ab"}]}),
    ]:
        body = {**body, "max_tokens": N}
        whole = c.post(path, json=body).json()
        with c.stream("POST", path, json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = _events(list(r.iter_lines()))
        texts: dict[int, str] = {}
        for ev in events[:-1]:
            (ch,) = ev["choices"]
            part = ch["delta"].get("content", "") if "delta" in ch else ch["text"]
            texts[ch["index"]] = texts.get(ch["index"], "") + part
            if ch["finish_reason"]:
                assert ch["skillgraft"]["skills"] == whole["choices"][ch["index"]]["skillgraft"]["skills"]
        if "messages" in body:
            assert texts == {0: whole["choices"][0]["message"]["content"]}
        else:
            assert texts == {i: ch["text"] for i, ch in enumerate(whole["choices"])}
        assert events[-1]["choices"] == [] and events[-1]["usage"] == whole["usage"]


def test_chat_uses_the_base_template(lib, client):
    _, _, ref = lib
    c, server = client
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "dcba"}]
    status, body = _post(c, {"model": "units", "messages": messages, "max_tokens": N}, "/v1/chat/completions")
    assert status == 200 and body["object"] == "chat.completion"
    prompt = ref.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == "s be brief>u dcba>a "
    assert body["choices"][0]["message"] == {
        "role": "assistant",
        "content": _want(ref, [prompt], (("units@1", 1.0),))[0],
    }
    tok = server.runtime.tok
    saved, tok.chat_template = tok.chat_template, None
    try:
        status, body = _post(c, {"messages": messages}, "/v1/chat/completions")
    finally:
        tok.chat_template = saved
    assert status == 400 and body["error"]["code"] == "no_chat_template" and "chat template" in body["error"]["message"]


def test_sampling_is_seeded(client):
    c, _ = client
    body = {"model": "cipher", "prompt": "ab>", "max_tokens": 12, "temperature": 1.0, "top_p": 0.9, "top_k": 20}
    a, b, d = (_post(c, {**body, "seed": s})[1]["choices"][0]["text"] for s in (7, 7, 8))
    assert a == b and a != d


def test_models_and_health(client):
    c, _ = client
    body = c.get("/v1/models").json()
    ids = [m["id"] for m in body["data"]]
    assert ids[:3] == ["base", "auto", "arrow-token"]
    assert {"cipher@1", "cipher", "units@1", "units", "dense@1", "dense"} <= set(ids) and "late" not in ids
    health = c.get("/health").json()
    assert health["status"] == "ok" and health["skills"] == 3
    assert health["runtime_bytes"] > 0 and health["rss_bytes"] > 10_000_000


def test_health_counts_forward_passes(client):
    """``/health``'s ``forward``: one prefill per batch, then one decode step per further token of its rows."""
    c, _ = client
    before = c.get("/health").json()["forward"]
    status, body = _post(c, {"model": "base", "prompt": PROMPTS[0], "max_tokens": 5})
    after = c.get("/health").json()["forward"]
    tokens = body["usage"]["completion_tokens"]
    steps = after["steps"] - before["steps"]
    assert status == 200 and after["prefills"] == before["prefills"] + 1 and after["prefill_s"] > before["prefill_s"]
    assert tokens - 1 <= steps <= tokens  # (an EOS token ends the row without counting as text)
    assert after["row_steps"] - before["row_steps"] == steps and (steps == 0 or after["step_s"] > before["step_s"])


def test_errors(client):
    c, _ = client

    def err(path, body=None, raw=None, method="POST"):
        r = c.request(method, path, content=raw if raw is not None else json.dumps(body))
        e = r.json()["error"]
        assert set(e) == {"message", "type", "param", "code"}
        return r.status_code, e

    assert err("/v1/completions", raw=b"{not json")[:1] == (400,)
    assert err("/v1/completions", raw=b"[1, 2]")[1]["code"] == "invalid_json"
    status, e = err("/v1/completions", {"model": "cihper", "prompt": "a>"})
    assert status == 404 and e["code"] == "model_not_found" and "did you mean 'cipher'" in e["message"]
    status, e = err("/v1/completions", {"model": "cipher:0.5+unitz", "prompt": "a>"})
    assert status == 404 and "'units'" in e["message"]
    status, e = err("/v1/completions", {"model": "cipher@3", "prompt": "a>"})
    assert status == 404 and "cipher@1" in e["message"]
    status, e = err("/v1/completions", {"model": "cipher:x", "prompt": "a>"})
    assert status == 400 and e["param"] == "model"
    status, e = err("/v1/completions", {"prompt": "a>", "n": 2})
    assert status == 400 and e["param"] == "n"
    status, e = err("/v1/completions", {"prompt": "a>", "max_tokens": "8"})
    assert status == 400 and e["code"] == "invalid_type" and "an integer" in e["message"]
    assert err("/v1/completions", {"prompt": "a>", "temperature": True})[0] == 400
    assert err("/v1/completions", {"prompt": "a>", "temperature": -1})[0] == 400
    assert err("/v1/completions", {"prompt": ["a>", 3]})[1]["param"] == "prompt"
    assert err("/v1/chat/completions", {"messages": "hi"})[1]["param"] == "messages"
    status, e = err("/v1/completions", {"prompt": "a" * 60, "max_tokens": 10})
    assert status == 400 and e["code"] == "context_length_exceeded"
    assert err("/v1/completions", raw=b'{"prompt": "' + b"a" * (1 << 20) + b'"}')[0] == 413
    assert err("/v1/completions", method="GET")[0] == 405
    assert err("/v1/nope", {})[0] == 404
    r = c.post("/v1/completions", json={"prompt": "a>", "max_tokens": 2, "echo": False, "user": "x"})
    assert r.status_code == 200  # unknown fields are ignored


def test_resolve_model_syntax():
    from skillgraft.route.serve import Served

    served = Served(("a@2", "b@1"), {"a": "a@2", "b": "b@1"}, frozenset({"a@2"}))
    assert resolve_model("base", served).mix == () and resolve_model("auto", served).mix is None
    assert resolve_model("base+a", served).mix == (("a@2", 1.0),)
    assert resolve_model("b:2+a@2:-0.5", served).mix == (("a@2", -0.5), ("b@1", 2.0))
    for bad in ["a+a@2", "a:inf", "base+"]:
        with pytest.raises(ApiError):
            resolve_model(bad, served)


def test_full_queue_is_503(lib):
    root, base_dir, ref = lib
    rt = SkillRuntime(build(llama_config(vocab_size=len(ref.tok))), ref.tok)
    server = SkillServer(rt, root / "lib", "no-such-base", ServeSpec(queue=1))  # worker never started

    async def go():
        server.submit(Job(["a>"], Sampling(), resolve_model("base", server.served), False))
        with pytest.raises(ApiError) as e:
            server.submit(Job(["a>"], Sampling(), resolve_model("base", server.served), False))
        return e.value

    e = asyncio.run(go())
    assert e.status == 503 and e.code == "queue_full" and server.served.keys == ()  # nothing fits that base


# -- load and a live library ------------------------------------------------------------------------------
def test_concurrent_mixed_requests_over_http(lib):
    """8 clients at once over real HTTP (uvicorn on port 0): batched together, each answer its own skill's."""
    import httpx

    root, base_dir, ref = lib
    server = SkillServer.open(base_dir, root / "lib", ServeSpec(max_batch=16, batch_wait_ms=300))
    srv, sock, url = make_uvicorn(server, "127.0.0.1", 0)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    models = ["base", "cipher", "units", "dense", "cipher:0.5+units", "cipher", "dense", "units@1"]
    mixes = [resolve_model(m, server.served).mix for m in models]
    try:
        while not srv.started:
            time.sleep(0.01)

        async def go():
            async with httpx.AsyncClient(base_url=url, timeout=60) as hc:
                calls = [
                    hc.post("/v1/completions", json={"model": m, "prompt": p, "max_tokens": N, "stream": i % 2 == 1})
                    for i, (m, p) in enumerate(zip(models, PROMPTS))
                ]
                return await asyncio.gather(*calls)

        answers = asyncio.run(go())
    finally:
        srv.should_exit = True
        thread.join(timeout=30)
        sock.close()
    for i, (r, p, mix) in enumerate(zip(answers, PROMPTS, mixes)):
        assert r.status_code == 200
        if i % 2:
            events = _events(r.text.splitlines())
            text = "".join(ev["choices"][0]["text"] for ev in events)
        else:
            text = r.json()["choices"][0]["text"]
        assert text == _want(ref, [p], mix)[0], (i, models[i])
    assert server.stats["largest_batch"] >= 4  # the LoRA rows shared a batch
    assert not thread.is_alive()


def test_skill_added_while_serving_is_listed_and_used(lib, client):
    root, _, ref = lib
    c, _ = client
    before = c.get("/health").json()
    with Library(root / "lib") as library:
        library.add(root / "late.skill")
    deadline = time.monotonic() + 10
    while "late" not in [m["id"] for m in c.get("/v1/models").json()["data"]]:
        assert time.monotonic() < deadline, "the new skill never showed up"
        time.sleep(0.1)
    status, body = _post(c, {"model": "late", "prompt": PROMPTS[:3], "max_tokens": N})
    ref.load(root / "late.skill", key="late@1")
    try:
        assert status == 200 and [ch["text"] for ch in body["choices"]] == _want(ref, PROMPTS[:3], (("late@1", 1.0),))
    finally:
        ref.unload("late@1")
    after = c.get("/health").json()
    assert after["skills"] == before["skills"] + 1 and after["runtime_bytes"] > before["runtime_bytes"]
    with Library(root / "lib") as library:
        library.rm("late")
    deadline = time.monotonic() + 10
    while "late" in [m["id"] for m in c.get("/v1/models").json()["data"]]:
        assert time.monotonic() < deadline, "the removed skill is still listed"
        time.sleep(0.1)
    status, body = _post(c, {"model": "late", "prompt": "a>"})
    assert status == 404


# -- the command ------------------------------------------------------------------------------------------
def test_cli_serves_until_ctrl_c(lib):
    import os
    import signal
    import subprocess
    import sys

    import httpx

    root, base_dir, _ = lib
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [
        str(Path(sys.executable).parent / "skillgraft"),
        "serve",
        "--base",
        str(base_dir),
        "--library",
        str(root / "lib"),
    ]
    proc = subprocess.Popen([*cmd, "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines = []
        while not any("serving" in ln for ln in lines):
            line = proc.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
        url = lines[-1].split(" on ")[1].split()[0]
        r = httpx.post(f"{url}/completions", json={"model": "cipher", "prompt": "a>", "max_tokens": 3}, timeout=30)
        assert r.status_code == 200 and r.json()["choices"][0]["skillgraft"]["skills"] == ["cipher@1"]
        assert "3 skills" in "".join(lines)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "stopped" in out, out


def test_cli_needs_a_library_or_experts(capsys, monkeypatch, lib):
    from skillgraft.cli.main import main

    monkeypatch.delenv("SKILLGRAFT_LIBRARY", raising=False)
    _, base_dir, _ = lib
    assert main(["serve", "--base", str(base_dir)]) == 2
    assert "--library" in capsys.readouterr().err
    assert main(["serve", "--base", str(base_dir), "--library", str(base_dir / "nope")]) == 3
