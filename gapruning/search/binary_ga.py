"""Binary genetic algorithm for pruning masks, as an evosax population-based algorithm.

A textbook generational GA (Holland, 1975; Goldberg, 1989) on bit strings, one bit
per prunable unit: tournament or rank selection, uniform / one-point / two-point
crossover, independent bit-flip mutation, and elitism. Genomes are decoded by the
PruneSpace encoding with an exact budget (surplus or missing bits are resolved by
the decoder's tie-breaking prior), so every individual meets the budget. Fitness is
minimised, as everywhere in evosax.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from evosax.algorithms.population_based.base import (
    Params as BaseParams,
)
from evosax.core.fitness_shaping import identity_fitness_shaping_fn
from flax import struct

from .generational import GenerationalAlgorithm, State

SELECTIONS = ("tournament", "rank")
CROSSOVERS = ("uniform", "one_point", "two_point")


@struct.dataclass
class Params(BaseParams):
    crossover_rate: float  # probability that a child is a crossover of two parents
    mutation_rate: float  # per-bit flip probability; negative means 1 / num_bits


class BinaryGA(GenerationalAlgorithm):
    """Generational GA on 0/1 genomes.

    Args:
        population_size: individuals per generation.
        solution: an example genome (its size sets the number of bits).
        selection: "tournament" (size ``tournament_size``) or "rank" (linear).
        crossover: "uniform", "one_point" or "two_point".
        num_elites: best individuals copied unchanged into the next generation.
    """

    def __init__(
        self,
        population_size: int,
        solution,
        selection: str = "tournament",
        tournament_size: int = 3,
        crossover: str = "uniform",
        num_elites: int = 2,
        fitness_shaping_fn: Callable = identity_fitness_shaping_fn,
    ):
        if selection not in SELECTIONS:
            raise ValueError(f"unknown selection {selection!r}; known: {SELECTIONS}")
        if crossover not in CROSSOVERS:
            raise ValueError(f"unknown crossover {crossover!r}; known: {CROSSOVERS}")
        if not 0 <= num_elites < population_size:
            raise ValueError(
                f"num_elites must be in [0, {population_size}), got {num_elites}"
            )
        if population_size < 2:
            raise ValueError(
                f"population_size must be at least 2, got {population_size}"
            )
        super().__init__(population_size, solution, fitness_shaping_fn)
        self.selection = selection
        self.tournament_size = tournament_size
        self.crossover = crossover
        self.num_elites_kept = num_elites

    @property
    def _default_params(self) -> Params:
        return Params(crossover_rate=0.9, mutation_rate=-1.0)

    def _select(self, key, fitness, n):
        """Indices of ``n`` parents."""
        p = self.population_size
        if self.selection == "tournament":
            entrants = jax.random.randint(key, (n, self.tournament_size), 0, p)
            winner = jnp.argmin(fitness[entrants], axis=1)
            return jnp.take_along_axis(entrants, winner[:, None], axis=1)[:, 0]
        rank = jnp.argsort(jnp.argsort(fitness))  # 0 = best
        weights = (p - rank).astype(jnp.float32)
        return jax.random.choice(key, p, (n,), p=weights / weights.sum())

    def _cross(self, key, a, b):
        d = self.num_dims
        if self.crossover == "uniform":
            take_b = jax.random.bernoulli(key, 0.5, (d,))
        elif self.crossover == "one_point":
            cut = jax.random.randint(key, (), 1, max(d, 2))
            take_b = jnp.arange(d) >= cut
        else:
            cuts = jnp.sort(jax.random.randint(key, (2,), 0, d + 1))
            pos = jnp.arange(d)
            take_b = (pos >= cuts[0]) & (pos < cuts[1])
        return jnp.where(take_b, b, a)

    def _ask(self, key, state: State, params: Params):
        n_children = self.population_size - self.num_elites_kept
        k1, k2, k3, k4, k5 = jax.random.split(key, 5)
        fitness = jnp.where(jnp.isnan(state.fitness), jnp.inf, state.fitness)
        mothers = state.population[self._select(k1, fitness, n_children)]
        fathers = state.population[self._select(k2, fitness, n_children)]
        crossed = jax.vmap(self._cross)(
            jax.random.split(k3, n_children), mothers, fathers
        )
        do_cross = jax.random.bernoulli(k4, params.crossover_rate, (n_children, 1))
        children = jnp.where(do_cross, crossed, mothers)
        rate = jnp.where(
            params.mutation_rate < 0, 1.0 / self.num_dims, params.mutation_rate
        )
        flips = jax.random.bernoulli(k5, rate, children.shape)
        children = jnp.where(flips, 1.0 - children, children)
        elites = state.population[jnp.argsort(fitness)[: self.num_elites_kept]]
        return jnp.concatenate([elites, children]), state
