"""An OpenAI-style completions endpoint over a ``FusedModel``: ``POST /v1/completions``, ``GET /v1/models``.

Standard library only (``http.server``): one process, requests decoded one batch at a time under a lock (the
models are shared and CPU-bound). Request fields: ``prompt`` (a string or a list of strings), ``max_tokens``
(default 16), ``temperature`` (default 0: greedy), ``top_p``, ``top_k``, ``stop`` (a string or a list), ``seed``;
unknown fields are ignored, as OpenAI-compatible servers do. Bad requests get HTTP 400 with
``{"error": {"message": …, "type": "invalid_request_error"}}``.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from skillgraft.errors import InputError
from skillgraft.transfer.fused import FusedModel, GenerationSpec

MAX_BODY = 1 << 20  # bytes


def completion(fm: FusedModel, request: dict[str, Any], model_name: str) -> dict[str, Any]:
    """Answer one completions request (already parsed JSON) with an OpenAI-style ``text_completion`` object."""
    prompts = request.get("prompt")
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise InputError("'prompt' must be a string or a non-empty list of strings")
    stop = request.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    try:
        spec = GenerationSpec(
            max_new_tokens=int(request.get("max_tokens", 16)),
            temperature=float(request.get("temperature", 0.0)),
            top_p=float(request.get("top_p", 1.0)),
            top_k=int(request.get("top_k", 0)),
            stop=tuple(str(s) for s in stop),
            seed=int(request.get("seed", 0)),
        )
    except (TypeError, ValueError) as e:
        raise InputError(f"bad sampling parameter: {e}") from None
    texts = fm.generate(prompts, spec)
    lengths = [len(fm.tok(t, add_special_tokens=False).input_ids) for t in texts]
    prompt_tokens = sum(len(fm.tok(p).input_ids) for p in prompts)
    choices = [
        {"text": t, "index": i, "logprobs": None, "finish_reason": "length" if n >= spec.max_new_tokens else "stop"}
        for i, (t, n) in enumerate(zip(texts, lengths))
    ]
    return {
        "id": f"cmpl-{uuid.uuid4().hex[:24]}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model_name,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": sum(lengths),
            "total_tokens": prompt_tokens + sum(lengths),
        },
    }


def make_server(fm: FusedModel, host: str, port: int, model_name: str = "skillgraft-fused") -> ThreadingHTTPServer:
    """A server bound to ``host:port`` (port 0: any free port; see ``server.server_address``); call
    ``serve_forever()`` to run it and ``shutdown()`` to stop it."""
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  (quiet by default)
            pass

        def _send(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str) -> None:
            self._send(status, {"error": {"message": message, "type": "invalid_request_error"}})

        def do_GET(self) -> None:  # noqa: N802
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": model_name, "object": "model"}]})
            else:
                self._error(404, f"no route {self.path}; use POST /v1/completions")

        def do_POST(self) -> None:  # noqa: N802
            if self.path.rstrip("/") != "/v1/completions":
                self._error(404, f"no route {self.path}; use POST /v1/completions")
                return
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 < length <= MAX_BODY:
                self._error(400, f"request body must be 1 byte to {MAX_BODY} bytes of JSON")
                return
            try:
                request = json.loads(self.rfile.read(length))
                if not isinstance(request, dict):
                    raise InputError("the request body must be a JSON object")
                with lock:
                    answer = completion(fm, request, model_name)
            except json.JSONDecodeError as e:
                self._error(400, f"request body is not JSON: {e}")
                return
            except InputError as e:
                self._error(400, e.message + (f" ({e.hint})" if e.hint else ""))
                return
            self._send(200, answer)

    return ThreadingHTTPServer((host, port), Handler)
