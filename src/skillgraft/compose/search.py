"""The CMA-ES loop of ``skillgraft evolve``, seeded and replayable: its only randomness is one numpy generator
owned by the search, so the same seed and the same fitnesses always give the same candidates.

Resume = build a new search with the seed, then :meth:`Search.replay` every stored generation (ask, check the
genomes match, tell the stored fitnesses): the state is then exactly that of the uninterrupted run.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from skillgraft.errors import FormatError


class Search:
    """Ask/tell over gene vectors (CMA-ES minimizes, so fitness is told negated).

    cma draws its normal samples through the ``randn`` option; giving it a method of our own
    ``numpy.random.Generator`` (and ``seed: nan`` so it never touches numpy's global state) keeps the draws
    independent of anything else in the process — model code, a Ray client, a test — that uses numpy.
    The run always lasts ``generations``: cma's own stop criteria (flat fitness, tiny steps) are ignored,
    because the budget, not convergence, decides a search over a few noisy scores.
    """

    def __init__(self, x0: Sequence[float], sigma: float, population: int, seed: int) -> None:
        import cma
        import numpy as np

        self._rng = np.random.Generator(np.random.PCG64(seed))
        opts = {
            "popsize": population,
            "randn": self._randn,
            "seed": float("nan"),
            "verbose": -9,
            "verb_log": 0,
            "verb_disp": 0,
        }
        with _quiet():
            self.es = cma.CMAEvolutionStrategy(list(x0), sigma, opts)

    def _randn(self, *shape: int) -> Any:
        return self._rng.standard_normal(shape)

    def ask(self) -> list[list[float]]:
        with _quiet():
            return [[float(v) for v in x] for x in self.es.ask()]

    def tell(self, genomes: Sequence[Sequence[float]], fitnesses: Sequence[float]) -> None:
        import numpy as np

        with _quiet():
            self.es.tell([np.asarray(g, dtype=float) for g in genomes], [-float(f) for f in fitnesses])

    def replay(self, generation: int, stored: Sequence[Sequence[float]], fitnesses: Sequence[float]) -> None:
        """Redo one finished generation from a checkpoint without scoring anything."""
        genomes = self.ask()
        if [list(map(float, g)) for g in stored] != genomes:
            raise FormatError(
                f"the checkpoint's generation {generation} does not replay: CMA-ES drew other candidates",
                hint="the cma or numpy version changed since the run started; start again with --overwrite",
            )
        self.tell(genomes, fitnesses)


def cma_version() -> str:
    import cma

    return str(cma.__version__)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """cma warns on flat fitness and on small populations; the run's budget is fixed, so the notes are noise."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
