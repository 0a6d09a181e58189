"""The small models of a ``FusedModel`` decoding in a second process, side by side with the large one.

Why: at each step the fused model needs the large base's logits *and* every small model's, and all of them
depend only on the tokens chosen so far — so the small forwards can run at the same time as the large one. In
one process they cannot: at decoding sizes torch's kernels are too short to release the GIL for long, and a
second Python thread mostly waits for it. A second process has its own interpreter.

Protocol (a ``multiprocessing`` pipe; both ends are this module's code, nothing from outside is unpickled):

* the worker is started once with the small models, whose parameters are first moved to shared memory
  (``Module.share_memory``) so the child maps the same pages instead of copying them;
* ``start(encodings)`` starts a batch (one left-padded ``(ids, mask)`` per small model: the same one for all,
  or with chat templates each model's own): the worker builds one KV cache per small model and runs the prompt;
  the first ``wait()`` returns shared ``[batch, vocab]`` fp32 buffers holding each model's last-position logits;
* ``send(tokens)`` feeds one token per row to every small model; ``wait()`` blocks until the buffers hold the
  new logits. The caller reads the buffers only between ``wait`` and the next ``send``.

Both ``start`` and ``send`` return at once, so the caller runs the large model meanwhile.

Each side runs torch on its own threads (``threads_for``): on 2 cores, one each.
"""

from __future__ import annotations

from typing import Any

import torch

from skillgraft.errors import SkillgraftError
from skillgraft.machine import cpu_count
from skillgraft.transfer.stream import advance, forward, new_stream


class WorkerError(SkillgraftError):
    """The small-model process failed or died."""


def threads_for(large: Any, small: list[Any], cores: int | None = None) -> tuple[int, int]:
    """(large-process threads, worker threads): cores split by parameter count, at least one each."""
    cores = cores or cpu_count()
    n_large = sum(p.numel() for p in large.parameters())
    n_small = sum(p.numel() for m in small for p in m.parameters())
    worker = max(1, min(cores - 1, round(cores * n_small / max(n_large + n_small, 1))))
    return max(1, cores - worker), worker


class SmallWorker:
    """A child process that owns the decoding state of ``models`` (see the module docstring)."""

    def __init__(self, models: list[Any], threads: int = 1) -> None:
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")  # fork would copy torch's thread pools mid-use
        for m in models:
            m.share_memory()
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, models, threads), daemon=True, name="skillgraft-small")
        self._proc.start()
        child.close()
        self._outs: list[torch.Tensor] = []
        self._pending: str | None = "hello"
        self.wait()  # the child is up and holds the models

    def start(self, encodings: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Start a batch (one left-padded ``(ids, mask)`` per model, in ``models`` order); the worker runs the
        prompts at once."""
        self.wait()
        self._call(("prefill", encodings))
        self._pending = "prefill"

    def send(self, tokens: torch.Tensor) -> None:
        """Feed one token per row (``[batch]``); the worker steps at once."""
        self.wait()
        self._call(("step", tokens.tolist()))
        self._pending = "step"

    def wait(self) -> list[torch.Tensor]:
        """Each small model's last-position logits after the last ``start`` or ``send`` (shared buffers)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            value = self._reply()
            if pending == "prefill":
                self._outs = value
        return self._outs

    def close(self) -> None:
        if self._proc.is_alive():
            try:
                self.wait()
                self._conn.send(("stop",))
            except (OSError, EOFError, WorkerError):
                pass
            self._proc.join(timeout=10)
            if self._proc.is_alive():
                self._proc.kill()
        self._conn.close()

    def _call(self, msg: tuple) -> None:
        try:
            self._conn.send(msg)
        except (OSError, EOFError):
            raise WorkerError(f"the small-model process is gone (exit code {self._proc.exitcode})") from None

    def _reply(self) -> Any:
        try:
            status, value = self._conn.recv()
        except (OSError, EOFError):
            self._proc.join(timeout=1)
            raise WorkerError(f"the small-model process died (exit code {self._proc.exitcode})") from None
        if status != "ok":
            raise WorkerError(f"the small-model process failed: {value}")
        return value


def _serve(conn: Any, models: list[Any], threads: int) -> None:
    """The child's loop: one KV cache per model, answers per message (see the module docstring)."""

    torch.set_num_threads(threads)
    streams: list = []
    outs: list[torch.Tensor] = []
    conn.send(("ok", None))
    with torch.no_grad():
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                return
            try:
                if msg[0] == "stop":
                    return
                if msg[0] == "prefill":
                    encodings = msg[1]
                    streams = [new_stream(m, mask) for m, (_, mask) in zip(models, encodings)]
                    outs = [forward(s, ids).share_memory_() for s, (ids, _) in zip(streams, encodings)]
                    conn.send(("ok", outs))
                elif msg[0] == "step":
                    nxt = torch.tensor(msg[1], dtype=torch.long)
                    for s, out in zip(streams, outs):
                        out.copy_(advance(s, nxt))
                    conn.send(("ok", None))
                else:
                    conn.send(("error", f"unknown message {msg[0]!r}"))
            except Exception as e:  # reported to the parent, which raises WorkerError
                conn.send(("error", f"{type(e).__name__}: {e}"))
