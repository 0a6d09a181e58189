"""An OpenAI-compatible server over one base model and the skills of a library: ``skillgraft serve --library``.

``POST /v1/completions`` and ``POST /v1/chat/completions`` (each with ``"stream": true`` for server-sent events),
``GET /v1/models``, ``GET /health``. The request's ``model`` chooses the skills of each answer:

* ``base`` — the base alone; ``auto`` — the router (``--route arrow|centroid|classifier``) picks one skill per
  prompt; ``arrow-token`` — Arrow routes every token at every module among the LoRA-form skills;
* ``cipher`` (the latest version served) or ``cipher@2``, optionally prefixed ``base+`` (``base+cipher@2``);
* a weighted sum ``cipher:0.5+units:1`` — terms joined by ``+``, each ``NAME[@VERSION][:WEIGHT]`` (weight 1 when
  left out, negative weights subtract a skill). LoRA-form terms run as one exact slot; any dense term makes the
  whole mix a hot swap.

Only the latest version of each skill that fits the base is served; the library is watched (its index and
journal files) before each batch and at least every second, so ``skillgraft library add`` while the server runs
makes a skill available and ``library rm`` withdraws it.

Why starlette + uvicorn rather than the standard library's ``http.server`` (which ``transfer/serve.py`` uses):
answers stream token by token as server-sent events to many clients at once, while one thread owns the model.
``http.server`` spends a thread per connection and has no async streaming, so a hundred waiting clients would be a
hundred blocked threads; an asyncio server holds each waiting request as a coroutine, streams with
``StreamingResponse``, and hands requests to the model thread through a queue. Both are small, maintained and
pure Python (uvicorn's optional C speed-ups are not required).

Batching: requests go into a bounded queue (full: 503). One worker thread takes up to ``max_batch`` prompts
(waiting at most ``batch_wait_ms`` for more), resolves each row's skill mix (routing the ``auto`` rows in one
call), then decodes every LoRA-form row in one batch (``SkillRuntime.rows`` around each forward of
``route.decode``) and each dense mix's rows apart under ``SkillRuntime.swapped``. Text deltas reach the request's
coroutine through ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import json
import math
import os
import queue
import threading
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from skillgraft.errors import InputError, SkillgraftError
from skillgraft.eval.generate import encode_prompt
from skillgraft.route.decode import Finished, Row, Sampling, StepTimes, decode
from skillgraft.route.runtime import ARROW_MIX, Mix, SkillRuntime

MAX_BODY = 1 << 20  # bytes
MAX_MIXES = 64  # weighted mixes kept in the runtime's stacks before they are dropped (each skill alone stays)
ROUTES = ("arrow", "centroid", "classifier")


class ApiError(Exception):
    """An error answered as OpenAI's ``{"error": {message, type, param, code}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# -- requests ---------------------------------------------------------------------------------------------
def _field(body: dict, name: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        value = None  # JSON true is not a number
    if not isinstance(value, kind):
        kinds = kind if isinstance(kind, tuple) else (kind,)
        names = " or ".join(_KINDS[k] for k in kinds if not (k is int and float in kinds))
        raise ApiError(400, f"'{name}' must be {names}", "invalid_type", name)
    return value


_KINDS = {int: "an integer", float: "a number", str: "a string", list: "a list", dict: "an object", bool: "a boolean"}


def parse_sampling(body: dict) -> Sampling:
    """Decoding settings from a request body (OpenAI's names; ``top_k`` and ``seed`` as vLLM takes them)."""
    if _field(body, "n", int, 1) != 1:
        raise ApiError(400, "only n=1 is supported (send the request again for more samples)", "unsupported", "n")
    stop = _field(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a non-empty string or a list of them", "invalid_type", "stop")
    max_tokens = _field(body, "max_tokens", int, None)
    max_tokens = _field(body, "max_completion_tokens", int, 16) if max_tokens is None else max_tokens
    values = {
        "max_tokens": max_tokens,
        "temperature": float(_field(body, "temperature", (float, int), 0.0)),
        "top_p": float(_field(body, "top_p", (float, int), 1.0)),
        "top_k": _field(body, "top_k", int, 0),
        "seed": _field(body, "seed", int, None),
    }
    for name in ("max_tokens", "temperature", "top_p", "top_k"):
        if not math.isfinite(values[name]):
            raise ApiError(400, f"'{name}' must be finite", "invalid_value", name)
    try:
        return Sampling(stop=tuple(stop), **values)
    except SkillgraftError as e:
        raise ApiError(400, e.message, "invalid_value") from None


def parse_prompts(body: dict) -> list[str]:
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ApiError(400, "'prompt' must be a string or a non-empty list of strings", "invalid_type", "prompt")
    return prompts


def chat_prompt(tokenizer: Any, body: dict) -> str:
    """The messages as one prompt in the base tokenizer's chat template, ready for the assistant's turn."""
    messages = body.get("messages")
    ok = isinstance(messages, list) and messages
    if not ok or not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        raise ApiError(
            400, "'messages' must be a non-empty list of {role, content} objects", "invalid_type", "messages"
        )
    if not all(isinstance(m.get("content"), str) for m in messages):
        raise ApiError(400, "each message's 'content' must be a string", "invalid_type", "messages")
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(
            400,
            "the base model's tokenizer has no chat template; use POST /v1/completions with a formatted prompt",
            "no_chat_template",
            "messages",
        )
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    try:
        return str(tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False))
    except Exception as e:  # a template may raise on roles it does not know (jinja's TemplateError)
        raise ApiError(400, f"the chat template refused these messages: {e}", "invalid_value", "messages") from None


# -- what a model name means ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Served:
    """The skills the worker holds right now (replaced whole, so the event loop reads it without a lock)."""

    keys: tuple[str, ...] = ()  # "name@version", the runtime's keys
    latest: dict[str, str] = field(default_factory=dict)  # name -> key
    lora: frozenset[str] = frozenset()

    def ids(self) -> list[str]:
        return ["base", "auto", *(["arrow-token"] if self.lora else []), *self.keys, *self.latest]


@dataclass(frozen=True)
class Target:
    """A request's ``model``: the mix to run (None: routed by ``auto``)."""

    name: str
    mix: Mix | None


def resolve_model(name: str, served: Served) -> Target:
    """Parse a ``model`` field (see the module docstring) against the skills served now."""
    if name in ("base", "auto"):
        return Target(name, () if name == "base" else None)
    if name == "arrow-token":
        if not served.lora:
            raise ApiError(
                400, "arrow-token routes among LoRA-form skills, and none is served", "invalid_value", "model"
            )
        return Target(name, ARROW_MIX)
    body = name.removeprefix("base+")
    weights: dict[str, float] = {}
    for term in body.split("+"):
        ref, colon, w = term.partition(":")
        try:
            weight = float(w) if colon else 1.0
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight):
            raise ApiError(400, f"model {name!r}: weight {w!r} of {ref!r} is not a number", "invalid_value", "model")
        ref = ref.removesuffix("@latest")
        key = served.latest.get(ref) if "@" not in ref else (ref if ref in served.keys else None)
        if key is None:
            raise _not_found(name, ref, served)
        if key in weights:
            raise ApiError(400, f"model {name!r} names {key} twice", "invalid_value", "model")
        weights[key] = weight
    return Target(name, tuple(sorted(weights.items())))


def _not_found(name: str, ref: str, served: Served) -> ApiError:
    skill = ref.split("@")[0]
    if "@" in ref and skill in served.latest:
        hint = f"only the latest version of a skill is served: {served.latest[skill]}"
    else:
        close = difflib.get_close_matches(ref, served.ids(), n=3, cutoff=0.5)
        hint = ("did you mean " + " or ".join(repr(c) for c in close) + "?") if close else "see GET /v1/models"
    what = f"model {name!r}" if ref == name else f"skill {ref!r} in model {name!r}"
    return ApiError(404, f"{what} not found; {hint}", "model_not_found", "model")


# -- jobs and the worker ----------------------------------------------------------------------------------
class Job:
    """One request's prompts on their way through the worker; events come back on ``events``:
    ``("start", infos, prompt_tokens)``, ``("delta", i, text)``, ``("done", i, Finished)``, ``("error", ApiError)``."""

    def __init__(self, prompts: list[str], sampling: Sampling, target: Target, stream: bool) -> None:
        self.prompts, self.sampling, self.target, self.stream = prompts, sampling, target, stream
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[tuple] = asyncio.Queue()
        self.cancelled = False
        self.failed = False
        self.ids: list[list[int]] = []
        self.mixes: list[Mix] = []

    def push(self, *event: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def fail(self, error: ApiError) -> None:
        if not self.failed:
            self.failed = True
            self.push("error", error)


@dataclass(frozen=True)
class ServeSpec:
    """``skillgraft serve --library``'s settings (the model and library are given to :class:`SkillServer`)."""

    max_batch: int = 16
    batch_wait_ms: float = 10.0
    queue: int = 256
    route: str = "arrow"

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.batch_wait_ms < 0 or self.queue < 1:
            raise InputError("need --max-batch >= 1, --batch-wait-ms >= 0 and --queue >= 1")
        if self.route not in ROUTES:
            raise InputError(f"unknown router {self.route!r}", hint=f"use one of {', '.join(ROUTES)}")


def rss_bytes() -> int:
    """This process's resident memory (Linux: /proc; elsewhere the peak from getrusage)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


RouterFactory = Callable[[SkillRuntime, dict[str, str]], Any]


class SkillServer:
    """The model thread: the runtime, the library it serves, the queue and the batching loop."""

    def __init__(
        self,
        runtime: SkillRuntime,
        library_root: Path,
        base_fingerprint: str,
        spec: ServeSpec = ServeSpec(),
        router_factory: RouterFactory | None = None,
    ) -> None:
        self.runtime, self.root, self.fingerprint, self.spec = runtime, Path(library_root), base_fingerprint, spec
        self.router_factory = router_factory or self._load_router
        self.served = Served()
        self.stats: dict[str, Any] = {"batches": 0, "rows": 0, "largest_batch": 0, "skipped": {}}
        self.times = StepTimes()  # forward passes of every batch (``/health``'s ``forward``)
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=spec.queue)
        self._shas: dict[str, str] = {}
        self._signature: tuple | None = None
        self._checked = 0.0
        self._router: Any = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.max_positions = getattr(runtime.model.config, "max_position_embeddings", None)
        self.refresh()

    @classmethod
    def open(cls, base: Path, library_root: Path, spec: ServeSpec = ServeSpec()) -> SkillServer:
        """Load the base (weights and tokenizer) and every fitting skill of the library."""
        from skillgraft.eval.harness import load_model
        from skillgraft.io.checkpoint import Checkpoint
        from skillgraft.skill.fingerprint import fingerprint_checkpoint

        with Checkpoint(base) as ckpt:
            fp = fingerprint_checkpoint(ckpt).content
        model, tok = load_model(base)
        return cls(SkillRuntime(model, tok), library_root, fp, spec)

    # -- the library ----------------------------------------------------------------------------------
    def _files(self) -> tuple:
        def stat(name: str) -> tuple[int, int] | None:
            try:
                st = os.stat(self.root / name)
            except OSError:
                return None
            return st.st_mtime_ns, st.st_size

        return tuple(stat(n) for n in ("index.sqlite", "index.sqlite-wal", "journal.jsonl"))

    def refresh(self) -> bool:
        """Load skills added to the library since the last look and unload removed ones (worker thread only).
        True when the served set changed."""
        self._checked = time.monotonic()
        if self._files() == self._signature:
            return False
        from skillgraft.library import Library

        rt, changed, skipped = self.runtime, False, dict(self.stats["skipped"])  # replaced whole: health() reads it
        with Library(self.root) as lib:
            latest = {r.name: r for r in lib.list() if r.base_fingerprint == self.fingerprint}  # by version
            want = {r.ref: r.sha256 for r in latest.values()}
            for key in [k for k in rt.skills if want.get(k) != self._shas.get(k)]:
                rt.unload(key)
                self._shas.pop(key, None)
                changed = True
            for ref, sha in want.items():
                if ref in rt.skills or skipped.get(ref, (None,))[0] == sha:
                    continue
                try:
                    rt.load(lib.path(ref), key=ref)
                except SkillgraftError as e:
                    skipped[ref] = (sha, e.message)
                    continue
                self._shas[ref], changed = sha, True
        self.stats["skipped"] = {k: v for k, v in skipped.items() if k in want}
        self._signature = self._files()
        if changed:
            self._router = None
            keys = tuple(sorted(rt.skills))
            self.served = Served(keys, {k.split("@")[0]: k for k in keys}, frozenset(rt.lora_keys))
        self.stats["runtime_bytes"] = rt.nbytes()
        return changed

    def _load_router(self, runtime: SkillRuntime, shas: dict[str, str]) -> Any:
        from skillgraft.route.routers import load_router

        return load_router(self.root, runtime, self.spec.route, skills=shas, base=self.fingerprint)

    def _route(self, prompts: list[str]) -> list[Mix]:
        if self._router is None:
            lora = self.spec.route == "arrow"
            shas = {k: s for k, s in self._shas.items() if not lora or self.runtime.skills[k].lora}
            if not shas:
                raise ApiError(400, "model 'auto' has no skills to route among", "invalid_value", "model")
            self._router = self.router_factory(self.runtime, shas)
        return list(self._router.route(self.runtime, prompts))

    # -- the worker -----------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stopping.clear()
            self._thread = threading.Thread(target=self._work, name="skillgraft-serve", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Finish the batch in progress; queued requests get 503."""
        self._stopping.set()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        if self._thread is not None:
            self._thread.join()
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.fail(ApiError(503, "the server is shutting down", "shutting_down"))

    def submit(self, job: Job) -> None:
        if self._stopping.is_set():
            raise ApiError(503, "the server is shutting down", "shutting_down")
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise ApiError(503, f"the request queue is full ({self.spec.queue}); retry later", "queue_full") from None

    def _take(self) -> list[Job] | None:
        """The next batch's requests (None: stop); waits for the first, then up to batch_wait_ms for more."""
        while True:
            try:
                first = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                self._guard(self.refresh)
        if first is None:
            return None
        jobs, rows = [first], len(first.prompts)
        deadline = time.monotonic() + self.spec.batch_wait_ms / 1000
        while rows < self.spec.max_batch:
            try:
                job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:
                self._stopping.set()
                break
            jobs.append(job)
            rows += len(job.prompts)
        return jobs

    def _work(self) -> None:
        while not self._stopping.is_set():
            jobs = self._take()
            if jobs is None:
                return
            jobs = [j for j in jobs if not j.cancelled]
            self._guard(self.refresh)  # on failure the skills loaded before keep serving
            try:
                self._run(jobs)
            except Exception as e:  # a bug or an out-of-memory: answer 500, keep serving
                traceback.print_exc()
                for job in jobs:
                    job.fail(ApiError(500, f"internal error: {type(e).__name__}: {e}", "internal_error"))
            self.stats["runtime_bytes"] = self.runtime.nbytes()

    @staticmethod
    def _guard(fn: Callable[[], Any]) -> bool:
        try:
            fn()
            return True
        except Exception:  # a damaged library index must not stop the server; it is retried next batch
            traceback.print_exc()
            return False

    def _prepare(self, jobs: list[Job]) -> list[Job]:
        """Tokenize, check lengths, route the ``auto`` rows and check every mix; failing jobs are answered."""
        rt, ok = self.runtime, []
        if rt.mixes > MAX_MIXES + len(rt.lora_keys):
            rt.drop_mixes()
        for job in jobs:
            job.ids = [encode_prompt(rt.tok, p) for p in job.prompts]
            longest = max(len(i) for i in job.ids) + job.sampling.max_tokens
            if self.max_positions and longest > self.max_positions:
                job.fail(
                    ApiError(
                        400,
                        f"prompt + max_tokens is {longest} tokens; the base takes {self.max_positions}",
                        "context_length_exceeded",
                        "max_tokens",
                    )
                )
            else:
                ok.append(job)
        auto = [(j, i) for j in ok if j.target.mix is None for i in range(len(j.prompts))]
        routed: dict[int, list[Mix]] = {}
        if auto:
            try:
                mixes = self._route([j.prompts[i] for j, i in auto])
            except (ApiError, SkillgraftError) as e:
                err = e if isinstance(e, ApiError) else ApiError(400, str(e), "routing_failed", "model")
                for j, _ in auto:
                    j.fail(err)
                mixes = []
            for (j, _), mix in zip(auto, mixes):
                routed.setdefault(id(j), []).append(tuple(sorted(mix)) if mix != ARROW_MIX else mix)
        ready = []
        for job in ok:
            if job.failed:
                continue
            job.mixes = routed[id(job)] if job.target.mix is None else [job.target.mix] * len(job.prompts)
            try:
                dense = [rt.is_dense(m) for m in job.mixes]
            except SkillgraftError as e:  # removed from the library after the request was parsed
                job.fail(ApiError(404, f"model {job.target.name!r}: {e.message}", "model_not_found", "model"))
                continue
            if ARROW_MIX in job.mixes and not rt.lora_keys:
                job.fail(ApiError(400, "arrow-token needs a LoRA-form skill, and none is served", "invalid_value"))
                continue
            infos = [self._info(m, job.target.mix is None, d) for m, d in zip(job.mixes, dense)]
            job.push("start", infos, [len(i) for i in job.ids])
            ready.append(job)
        return ready

    def _info(self, mix: Mix, routed: bool, dense: bool) -> dict[str, Any]:
        if mix == ARROW_MIX:
            return {"skills": list(self.runtime.lora_keys), "weights": None, "routed": True, "per_token": True}
        info: dict[str, Any] = {"skills": [k for k, _ in mix], "weights": [w for _, w in mix], "routed": routed}
        if routed:
            info["router"] = self.spec.route
        if dense:
            info["hot_swap"] = True
        return info

    def _run(self, jobs: list[Job]) -> None:
        rt, n = self.runtime, self.spec.max_batch
        lora: list[tuple[Job, int]] = []
        dense: dict[Mix, list[tuple[Job, int]]] = {}
        for job in self._prepare(jobs):
            for i, mix in enumerate(job.mixes):
                (dense.setdefault(mix, []) if rt.is_dense(mix) else lora).append((job, i))
        for k in range(0, len(lora), n):
            chunk = lora[k : k + n]
            mixes = [j.mixes[i] for j, i in chunk]
            self._decode(chunk, lambda active, mixes=mixes: rt.rows([mixes[a] for a in active]))
        for mix, items in dense.items():
            with rt.swapped(mix):
                for k in range(0, len(items), n):
                    self._decode(items[k : k + n], None)

    def _decode(self, items: list[tuple[Job, int]], context: Any) -> None:
        rows = []
        for job, i in items:
            delta = (lambda text, job=job, i=i: job.push("delta", i, text)) if job.stream else None
            rows.append(Row(job.ids[i], job.sampling, delta, lambda job=job: not job.cancelled))
        results = decode(self.runtime.model, self.runtime.tok, rows, context, self.times)
        self.stats["batches"] += 1
        self.stats["rows"] += len(rows)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(rows))
        for (job, i), result in zip(items, results):
            job.push("done", i, result)

    def health(self) -> dict[str, Any]:
        s = self.stats
        return {
            "status": "stopping" if self._stopping.is_set() else "ok",
            "skills": len(self.served.keys),
            "runtime_bytes": s.get("runtime_bytes", 0),
            "rss_bytes": rss_bytes(),
            "queued": self._queue.qsize(),
            "batches": s["batches"],
            "rows": s["rows"],
            "largest_batch": s["largest_batch"],
            "forward": self.times.as_dict(),
            "skipped": {k: v[1] for k, v in s["skipped"].items()},
        }


# -- HTTP ---------------------------------------------------------------------------------------------------
async def _read_json(request: Any) -> dict:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY:
        raise ApiError(413, f"the request body is over {MAX_BODY} bytes", "request_too_large")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_BODY:
            raise ApiError(413, f"the request body is over {MAX_BODY} bytes", "request_too_large")
    try:
        body = json.loads(bytes(data))
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not JSON: {e}", "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", "invalid_json")
    return body


class _Answer:
    """Builds OpenAI's completion / chat.completion objects and their stream chunks for one request."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat, self.model = chat, model
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def _wrap(self, choices: list[dict], chunk: bool, **extra: Any) -> dict[str, Any]:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }

    def whole(self, results: list[Finished], infos: list[dict], prompt_tokens: int) -> dict[str, Any]:
        choices = []
        for i, (r, info) in enumerate(zip(results, infos)):
            if self.chat:
                body: dict[str, Any] = {"message": {"role": "assistant", "content": r.text}}
            else:
                body = {"text": r.text, "logprobs": None}
            choices.append({"index": i, **body, "finish_reason": r.finish_reason, "skillgraft": info})
        return self._wrap(choices, False, usage=self.usage(prompt_tokens, results))

    def chunk(self, i: int, text: str | None, finish: str | None = None, info: dict | None = None) -> str:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if text is None else {}
            if text:
                delta = {"content": text}
            body: dict[str, Any] = {"delta": delta}
        else:
            body = {"text": text or "", "logprobs": None}
        choice = {"index": i, **body, "finish_reason": finish, **({"skillgraft": info} if info else {})}
        return self.sse(self._wrap([choice], True))

    @staticmethod
    def usage(prompt_tokens: int, results: list[Finished]) -> dict[str, int]:
        done = sum(r.tokens for r in results)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": done, "total_tokens": prompt_tokens + done}

    @staticmethod
    def sse(obj: Any) -> str:
        return f"data: {json.dumps(obj)}\n\n"


def make_app(server: SkillServer) -> Any:
    """The Starlette app over ``server`` (its lifespan starts and stops the worker)."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    def error(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    async def api_error(request: Request, e: Exception) -> Response:
        assert isinstance(e, ApiError)
        return error(e)

    async def http_error(request: Request, e: Exception) -> Response:
        assert isinstance(e, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        msg = f"{request.method} {request.url.path}: {e.detail}; use POST /v1/completions or /v1/chat/completions"
        return error(ApiError(e.status_code, msg, code))

    async def complete(request: Request, chat: bool) -> Response:
        body = await _read_json(request)
        sampling = parse_sampling(body)
        prompts = [chat_prompt(server.runtime.tok, body)] if chat else parse_prompts(body)
        model = _field(body, "model", str, "base")
        stream = _field(body, "stream", bool, False)
        usage = stream and bool(_field(body, "stream_options", dict, {}).get("include_usage"))
        job = Job(prompts, sampling, resolve_model(model, server.served), stream)
        server.submit(job)
        try:
            first = await job.events.get()
        except asyncio.CancelledError:
            job.cancelled = True
            raise
        if first[0] == "error":
            return error(first[1])
        _, infos, prompt_tokens = first
        answer = _Answer(chat, model)
        if not stream:
            try:
                results = await _collect(job)
            except asyncio.CancelledError:
                job.cancelled = True
                raise
            if isinstance(results, ApiError):
                return error(results)
            return JSONResponse(answer.whole(results, infos, sum(prompt_tokens)))
        return StreamingResponse(
            _stream(job, answer, infos, sum(prompt_tokens), usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

    async def completions(request: Request) -> Response:
        return await complete(request, chat=False)

    async def chat_completions(request: Request) -> Response:
        return await complete(request, chat=True)

    async def models(request: Request) -> Response:
        served, created = server.served, int(time.time())
        lora = served.lora

        def entry(mid: str, **extra: Any) -> dict[str, Any]:
            return {"id": mid, "object": "model", "created": created, "owned_by": "skillgraft", **extra}

        data = [entry("base"), entry("auto", skillgraft={"router": server.spec.route})]
        if lora:
            data.append(entry("arrow-token", skillgraft={"skills": sorted(lora)}))
        for key in served.keys:
            data.append(entry(key, skillgraft={"lora": key in lora}))
        for name, key in sorted(served.latest.items()):
            data.append(entry(name, skillgraft={"serves": key, "lora": key in lora}))
        return JSONResponse({"object": "list", "data": data, "skillgraft": server.health()})

    async def health(request: Request) -> Response:
        return JSONResponse(server.health())

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        server.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, server.stop)

    routes = [
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ]
    handlers = {ApiError: api_error, HTTPException: http_error}
    return Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)  # type: ignore[arg-type]


async def _collect(job: Job) -> list[Finished] | ApiError:
    results: dict[int, Finished] = {}
    while len(results) < len(job.prompts):
        event = await job.events.get()
        if event[0] == "error":
            return event[1]
        if event[0] == "done":
            results[event[1]] = event[2]
    return [results[i] for i in range(len(job.prompts))]


async def _stream(job: Job, answer: _Answer, infos: list[dict], prompt_tokens: int, usage: bool) -> AsyncIterator[str]:
    done: dict[int, Finished] = {}
    try:
        if answer.chat:
            for i in range(len(job.prompts)):
                yield answer.chunk(i, None)
        while len(done) < len(job.prompts):
            event = await job.events.get()
            if event[0] == "delta":
                yield answer.chunk(event[1], event[2])
            elif event[0] == "done":
                done[event[1]] = event[2]
                yield answer.chunk(event[1], "", event[2].finish_reason, infos[event[1]])
            else:  # the status line is sent; the error goes in the stream
                yield answer.sse(event[1].body())
                break
        if usage:
            yield answer.sse(answer._wrap([], True, usage=answer.usage(prompt_tokens, list(done.values()))))
        yield "data: [DONE]\n\n"
    finally:
        if len(done) < len(job.prompts):
            job.cancelled = True


def make_uvicorn(server: SkillServer, host: str, port: int, log_level: str = "warning") -> tuple[Any, Any, str]:
    """``(uvicorn.Server, listening socket, url)`` for ``host:port`` (0: any free port); run it with
    ``srv.run(sockets=[sock])`` (in any thread; set ``srv.should_exit`` to stop it)."""
    import socket

    import uvicorn

    sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    bound = sock.getsockname()
    shown = f"[{bound[0]}]" if ":" in str(bound[0]) else bound[0]
    config = uvicorn.Config(make_app(server), log_level=log_level, access_log=False, timeout_graceful_shutdown=10)
    return uvicorn.Server(config), sock, f"http://{shown}:{bound[1]}"
