"""Overlap reading, merging and writing: a read-ahead thread and a write-behind thread with bounded queues.

Bounded queues keep peak memory at a few tensors per input; errors in either thread surface in the caller.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")


def prefetch(it: Iterator[T], depth: int = 2) -> Iterator[T]:
    """Read ahead in a background thread (safetensors mmap reads and LoRA matmuls release the GIL)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work() -> None:
        try:
            for x in it:
                while not stop.is_set():
                    try:
                        q.put(x, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # surfaced in the consumer
            q.put(e)

    th = threading.Thread(target=work, daemon=True)
    th.start()
    try:
        while True:
            x = q.get()
            if x is done:
                return
            if isinstance(x, BaseException):
                raise x
            yield x
    finally:
        stop.set()
        th.join(timeout=5)


class WriteBehind:
    """Calls ``sink(*args)`` in a background thread so writing overlaps the next merge step."""

    def __init__(self, sink: Callable[..., None], depth: int = 2) -> None:
        self.sink: Callable[..., None] = sink
        self.error: BaseException | None = None
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.th = threading.Thread(target=self._run, daemon=True)
        self.th.start()

    def _run(self) -> None:
        while (x := self.q.get()) is not None:
            if self.error is None:
                try:
                    self.sink(*x)
                except BaseException as e:
                    self.error = e

    def put(self, *args: object) -> None:
        if self.error is not None:
            raise self.error
        self.q.put(args)

    def close(self) -> None:
        """Wait for pending writes; re-raise the first error of the writer thread."""
        self.q.put(None)
        self.th.join()
        if self.error is not None:
            raise self.error
