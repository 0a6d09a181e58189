"""Where ``skillgraft evolve`` scores its candidates: in this process, or on Ray actors (a local Ray instance or
an existing cluster). Both return results in the order of the recipes given, so the search never sees timing.

Ray design: one actor per worker, each holding a :class:`~skillgraft.compose.scoring.Scorer` that loads the base
model once; ``ray.util.ActorPool.map`` hands each actor the next candidate as it frees up and yields results in
submission order. Plain Ray tasks would reload the model (seconds each on a 135M model) for every candidate, or
need a hidden per-process cache; an actor makes that cache explicit and owned by one run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from skillgraft.errors import InputError, WorkerError

RAY_PIP = "pip install 'skillgraft[ray]'"


@dataclass(frozen=True)
class ScorerArgs:
    """What every scorer is built from (shipped to each Ray actor once)."""

    base: str
    tasks: tuple[Any, ...]  # Task objects (rows travel with them: workers need no task files)
    batch_size: int
    threads: int


class InProcess:
    """Score one candidate after another in this process."""

    name = "in-process"

    def __init__(self, args: ScorerArgs) -> None:
        from skillgraft.compose.scoring import Scorer

        self.workers = 1
        self.scorer = Scorer(args.base, args.tasks, args.batch_size, args.threads)

    def map(self, recipes: Sequence[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for r in recipes:
            yield self.scorer.score(r)

    def close(self) -> None:
        del self.scorer


class RayPool:
    """Score candidates on ``workers`` Ray actors of ``threads`` CPUs each. Connects to ``address`` when given,
    else starts a local instance with ``workers × threads`` CPUs; shuts Ray down at :meth:`close` only if it
    started it (a caller's own ``ray.init`` is left alone)."""

    name = "ray"

    def __init__(self, args: ScorerArgs, workers: int | None, address: str | None) -> None:
        import logging

        import ray
        from ray.util import ActorPool

        from skillgraft.compose.scoring import Scorer

        self.started = not ray.is_initialized()
        if self.started:
            if address:
                _check_reachable(address)
                try:
                    ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
                except (ConnectionError, RuntimeError, ValueError) as e:
                    raise WorkerError(
                        f"could not connect to the Ray cluster at {address}: {_last_line(str(e))}",
                        hint="start it with `ray start --head` and pass HEAD:6379 (see docs/evolve.md)",
                    ) from e
            else:
                cpus = (workers or 1) * args.threads
                ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        try:
            if workers is None:  # a cluster: as many actors as its CPUs hold
                workers = max(1, int(ray.cluster_resources().get("CPU", 1)) // args.threads)
            self.workers = workers
            actor = ray.remote(num_cpus=args.threads)(Scorer)
            self.actors = [actor.remote(args.base, args.tasks, args.batch_size, args.threads) for _ in range(workers)]
            self.pool = ActorPool(self.actors)
        except BaseException:
            self._shutdown()
            raise

    def map(self, recipes: Sequence[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        import ray

        try:
            yield from self.pool.map(lambda a, r: a.score.remote(r), list(recipes))
        except ray.exceptions.RayActorError as e:
            raise WorkerError(
                f"a Ray worker died: {_last_line(str(e))}",
                hint="every node needs skillgraft installed and the base, inputs at the same paths",
            ) from e

    def close(self) -> None:
        import ray

        for a in getattr(self, "actors", []):
            ray.kill(a)
        self._shutdown()

    def _shutdown(self) -> None:
        import ray

        if self.started and ray.is_initialized():
            ray.shutdown()


def _last_line(text: str) -> str:
    """The line of a Ray error that names the cause (its last; the rest is the remote traceback), no colours."""
    import re

    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines() if line.strip()]
    return lines[-1] if lines else "no reason given"


def _check_reachable(address: str) -> None:
    """Fail fast on a ``HOST:PORT`` nothing listens on (Ray itself retries for minutes); other forms (``auto``,
    ``ray://…``) are left to Ray."""
    import socket

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or "://" in address:
        return
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as e:
        raise WorkerError(
            f"could not connect to the Ray cluster at {address} ({e.strerror or e})",
            hint="start it with `ray start --head` on HEAD and pass --ray-address HEAD:6379",
        ) from None


def ray_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is not None


def open_backend(
    args: ScorerArgs, workers: int | None, address: str | None, notify: Callable[[str], None]
) -> InProcess | RayPool:
    """Pick the backend: ``address`` → that Ray cluster; ``workers`` > 1 → a local Ray instance; else (or when
    Ray is not installed and no address was given, with a notice) in this process."""
    if workers is not None and workers < 1:
        raise InputError(f"--workers must be at least 1, not {workers}")
    if address:
        if not ray_installed():
            raise WorkerError("--ray-address needs Ray, which is not installed", hint=RAY_PIP)
        return RayPool(args, workers, address)
    if (workers or 1) > 1:
        if ray_installed():
            return RayPool(args, workers, None)
        notify(f"Ray is not installed: scoring in this process, one candidate at a time ({RAY_PIP} for --workers)")
    return InProcess(args)
