"""Search strategies: evosax algorithms plus what the engine needs to start them.

Two registries map a name to a factory ``(population_size, num_genes, **options)
-> Strategy``; every strategy names the kind of genome it evolves
(:data:`GENOME_KINDS`):

* :data:`STRATEGIES`: strategies over the **units genome** (one gene per prunable
  unit, ``"binary"`` or ``"real"``), the names ``gp.prune(strategy=...)`` runs
  with the engine; ``"evosax:NAME"`` names any algorithm of ``evosax.algorithms``
  on real-valued genomes (decoded by top-k, so every individual meets the budget).
* :data:`GENOME_STRATEGIES`: strategies over a genome of their own (per-weight
  scores, per-group keep ratios), run by the method that owns that encoding
  (``ga_scores``, ``profile_random``); they are not ``gp.prune`` strategy names.

Both run through the same engine and meet the same contract (ask/tell in a loop
or in ``lax.scan``, deterministic by seed).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
from evosax import algorithms as evosax_algorithms
from evosax.algorithms.distribution_based.base import DistributionBasedAlgorithm
from evosax.algorithms.population_based.base import PopulationBasedAlgorithm

from .binary_ga import BinaryGA
from .profile_sampler import ProfileSampler
from .random_search import RandomSearch
from .score_ga import PAPER_INITIAL_RATE, ScoreGA

GENOME_KINDS = {
    "binary": "one 0/1 bit per prunable unit",
    "real": "one real score per prunable unit (top-k under the budget)",
    "weights": "one real score per kernel weight (encoding.WeightEncoding)",
    "profile": "one keep ratio per prunable group (encoding.ProfileEncoding)",
}


@dataclasses.dataclass(frozen=True, eq=False)
class Strategy:
    """An evosax algorithm, its params, and the kind of genome it evolves.

    Population-based algorithms start from an evaluated initial population;
    distribution-based ones from a mean (``center``); the others (plain
    ``EvolutionaryAlgorithm`` subclasses) from their own ``_init``.
    """

    name: str
    algorithm: Any
    params: Any
    genome: str = "real"  # a key of GENOME_KINDS

    def __post_init__(self):
        if self.genome not in GENOME_KINDS:
            known = ", ".join(GENOME_KINDS)
            raise ValueError(f"unknown genome kind {self.genome!r}; known: {known}")

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
        if isinstance(self.algorithm, DistributionBasedAlgorithm):
            return self.algorithm.init(key, center, self.params)
        return self.algorithm.init(key, self.params)

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


def make_score_ga(
    population_size: int,
    num_genes: int,
    *,
    layer_sizes=None,
    fan_in=None,
    elitism: float = 0.0,
    goodness: str = "inverse",
    schedule=None,
    mutation_rate: float = PAPER_INITIAL_RATE,
    power: float = 1.0,
) -> Strategy:
    """Pham Van et al.'s GA on per-weight scores (:mod:`gapruning.search.score_ga`).

    ``layer_sizes`` (default: one layer of ``num_genes``) must sum to
    ``num_genes``; ``fan_in`` (default 1 per layer) sets each layer's
    Kaiming-uniform bound ``1/sqrt(fan_in)``."""
    layer_sizes = [num_genes] if layer_sizes is None else list(layer_sizes)
    if sum(layer_sizes) != num_genes:
        raise ValueError(f"layer_sizes sum to {sum(layer_sizes)}, not {num_genes}")
    fan_in = [1] * len(layer_sizes) if fan_in is None else fan_in
    algo = ScoreGA(
        population_size,
        layer_sizes,
        fan_in,
        elitism=elitism,
        goodness=goodness,
        schedule=schedule,
    )
    params = algo.default_params.replace(mutation_rate=mutation_rate, power=power)
    return Strategy("score_ga", algo, params, genome="weights")


def make_profile_sampler(
    population_size: int, num_genes: int, *, grid=None, low: float = 0.05
) -> Strategy:
    """Random profiles (ratios in ``[low, 1]``) or the rows of ``grid``
    (:mod:`gapruning.search.profile_sampler`); ``num_genes`` is the number of
    groups."""
    algo = ProfileSampler(population_size, num_genes, grid)
    params = algo.default_params.replace(low=low)
    return Strategy("profile_sampler", algo, params, genome="profile")


STRATEGIES: dict[str, Callable[..., Strategy]] = {
    "ga": make_ga,
    "random": make_random,
}

GENOME_STRATEGIES: dict[str, Callable[..., Strategy]] = {
    "score_ga": make_score_ga,
    "profile_sampler": make_profile_sampler,
}


def register_strategy(name: str, factory: Callable[..., Strategy]) -> None:
    """Adds ``factory(population_size, num_genes, **options) -> Strategy`` (a
    units-genome strategy) to :data:`STRATEGIES`."""
    if name in STRATEGIES:
        raise ValueError(f"strategy {name!r} is already registered")
    STRATEGIES[name] = factory


def make_strategy(
    name: str, population_size: int, num_genes: int, **options
) -> Strategy:
    """Builds a units-genome strategy of :data:`STRATEGIES`, or
    ``"evosax:NAME"``, by name."""
    _check_population(population_size)
    if name.startswith("evosax:"):
        factory = make_evosax(name.split(":", 1)[1])
    else:
        factory = _lookup(STRATEGIES, name, "evosax:<Algorithm>")
    return factory(population_size, num_genes, **options)


def make_genome_strategy(
    name: str, population_size: int, num_genes: int, **options
) -> Strategy:
    """Builds a strategy of :data:`GENOME_STRATEGIES` (a genome of its own)."""
    _check_population(population_size)
    factory = _lookup(GENOME_STRATEGIES, name)
    return factory(population_size, num_genes, **options)


def _check_population(population_size: int) -> None:
    if population_size < 2:
        raise ValueError(f"population must be at least 2, got {population_size}")


def _lookup(registry: dict, name: str, *more: str) -> Callable[..., Strategy]:
    if name not in registry:
        known = ", ".join([*sorted(registry), *more])
        raise KeyError(f"unknown strategy {name!r}; known: {known}")
    return registry[name]
