"""Search strategies: evosax algorithms plus what the engine needs to start them.

``STRATEGIES`` maps a name to a factory ``(population_size, num_genes, **options) ->
Strategy``; ``"evosax:NAME"`` names any algorithm of ``evosax.algorithms`` on
real-valued genomes (decoded by top-k, so every individual meets the budget).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
from evosax import algorithms as evosax_algorithms
from evosax.algorithms.population_based.base import PopulationBasedAlgorithm

from .binary_ga import BinaryGA
from .random_search import RandomSearch

GENOME_KINDS = ("binary", "real")


@dataclasses.dataclass(frozen=True, eq=False)
class Strategy:
    """An evosax algorithm, its params, and the kind of genome it evolves.

    Population-based algorithms start from an evaluated initial population;
    distribution-based ones from a mean (``center``).
    """

    name: str
    algorithm: Any
    params: Any
    genome: str = "real"  # "binary": genes are 0/1 bits; "real": unit scores

    @property
    def population_size(self) -> int:
        return self.algorithm.population_size

    @property
    def num_genes(self) -> int:
        return self.algorithm.num_dims

    @property
    def needs_evaluated_start(self) -> bool:
        return isinstance(self.algorithm, PopulationBasedAlgorithm)

    def init(self, key, genomes, fitness, center):
        if self.needs_evaluated_start:
            return self.algorithm.init(key, genomes, fitness, self.params)
        return self.algorithm.init(key, center, self.params)

    def ask(self, key, state):
        return self.algorithm.ask(key, state, self.params)

    def tell(self, key, genomes, fitness, state):
        new_state, _ = self.algorithm.tell(key, genomes, fitness, state, self.params)
        return new_state


def _solution(num_genes: int):
    return jnp.zeros((num_genes,), jnp.float32)


def make_ga(
    population_size: int,
    num_genes: int,
    *,
    selection="tournament",
    tournament_size=3,
    crossover="uniform",
    num_elites=2,
    crossover_rate=0.9,
    mutation_rate=-1.0,
) -> Strategy:
    """The binary GA (:mod:`gapruning.search.binary_ga`)."""
    algo = BinaryGA(
        population_size,
        _solution(num_genes),
        selection=selection,
        tournament_size=tournament_size,
        crossover=crossover,
        num_elites=num_elites,
    )
    params = algo.default_params.replace(
        crossover_rate=crossover_rate, mutation_rate=mutation_rate
    )
    return Strategy("ga", algo, params, genome="binary")


def make_random(population_size: int, num_genes: int) -> Strategy:
    """Random search under the budget (:mod:`gapruning.search.random_search`)."""
    algo = RandomSearch(population_size, _solution(num_genes))
    return Strategy("random", algo, algo.default_params)


def make_evosax(name: str) -> Callable[..., Strategy]:
    """A factory for ``evosax.algorithms.<name>`` on real-valued genomes."""
    if name not in evosax_algorithms.algorithms:
        known = ", ".join(sorted(evosax_algorithms.algorithms))
        raise KeyError(f"unknown evosax algorithm {name!r}; known: {known}")
    cls = evosax_algorithms.algorithms[name]

    def factory(population_size: int, num_genes: int, **options) -> Strategy:
        algo = cls(
            population_size=population_size, solution=_solution(num_genes), **options
        )
        return Strategy(f"evosax:{name}", algo, algo.default_params)

    factory.__doc__ = f"evosax {name} ({cls.__doc__ or ''}) on real-valued unit scores."
    return factory


STRATEGIES: dict[str, Callable[..., Strategy]] = {
    "ga": make_ga,
    "random": make_random,
}


def register_strategy(name: str, factory: Callable[..., Strategy]) -> None:
    """Adds ``factory(population_size, num_genes, **options) -> Strategy``."""
    if name in STRATEGIES:
        raise ValueError(f"strategy {name!r} is already registered")
    STRATEGIES[name] = factory


def make_strategy(
    name: str, population_size: int, num_genes: int, **options
) -> Strategy:
    """Builds a registered strategy, or ``"evosax:NAME"``, by name."""
    if population_size < 2:
        raise ValueError(f"population must be at least 2, got {population_size}")
    if name.startswith("evosax:"):
        factory = make_evosax(name.split(":", 1)[1])
    elif name in STRATEGIES:
        factory = STRATEGIES[name]
    else:
        known = ", ".join([*sorted(STRATEGIES), "evosax:<Algorithm>"])
        raise KeyError(f"unknown strategy {name!r}; known: {known}")
    return factory(population_size, num_genes, **options)
