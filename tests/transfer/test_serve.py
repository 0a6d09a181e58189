"""The OpenAI-style completions endpoint: same text as FusedModel.generate, JSON errors for bad requests."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import pytest
from conftest import build, finetune_like, llama_config

from skillgraft.transfer import ExpertPair, FusedModel, GenerationSpec
from skillgraft.transfer.serve import make_server


@pytest.fixture(scope="module")
def server():
    from skillgraft.bench.tokenizer import make_tokenizer

    tok = make_tokenizer()
    small = build(llama_config(vocab_size=len(tok)), seed=2)
    expert = build(llama_config(vocab_size=len(tok)), seed=2)
    finetune_like(expert, seed=9, scale=0.5)
    large = build(llama_config(vocab_size=len(tok), hidden_size=96), seed=1)
    fm = FusedModel(large, tok, [ExpertPair(expert, small)], method="dlf")
    srv = make_server(fm, "127.0.0.1", 0, model_name="test-model")
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield fm, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def _call(url: str, body: object | None = None) -> tuple[int, dict]:
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_completions_match_generate(server):
    fm, url = server
    prompts = ["abc>", "hgfedcb>"]
    status, body = _call(f"{url}/v1/completions", {"prompt": prompts, "max_tokens": 6, "stop": ["\n"]})
    assert status == 200 and body["object"] == "text_completion" and body["model"] == "test-model"
    want = fm.generate(prompts, GenerationSpec(max_new_tokens=6, stop=("\n",)))
    assert [c["text"] for c in body["choices"]] == want
    assert [c["index"] for c in body["choices"]] == [0, 1]
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
    status, one = _call(f"{url}/v1/completions", {"prompt": "abc>", "max_tokens": 6, "stop": "\n"})
    assert status == 200 and one["choices"][0]["text"] == want[0]


def test_models_route_and_errors(server):
    _, url = server
    status, body = _call(f"{url}/v1/models")
    assert status == 200 and body["data"][0]["id"] == "test-model"
    for payload, text in [
        ({"prompt": 3}, "'prompt' must be"),
        ({"prompt": "a>", "temperature": -1}, "temperature"),
        ({"prompt": "a>", "max_tokens": "many"}, "bad sampling parameter"),
        (b"{not json", "not JSON"),
        ([1, 2], "JSON object"),
    ]:
        status, body = _call(f"{url}/v1/completions", payload)
        assert status == 400 and text in body["error"]["message"], body
    status, body = _call(f"{url}/v1/chat/completions", {"prompt": "a>"})
    assert status == 404 and "/v1/completions" in body["error"]["message"]
